//! Dead links (TESTPLAN 2 and 3): a relay between the edge and the server stops forwarding
//! but keeps both sockets open. PINGs find the half-open session; dials fail at once instead
//! of hanging; the node comes back by itself; a node that reconnects while its old session is
//! still half-open takes over atomically.

use std::time::{Duration, Instant};

use tether_tests::data::PeerRequest;
use tether_tests::frontend::metric;
use tether_tests::process::open_fds;
use tether_tests::relay::{Direction, Mode};
use tether_tests::server::{EDGE_ENDED, EDGE_ESTABLISHED};
use tether_tests::{poll_until, within, Cluster, ClusterOptions, EdgeTuning, ServerOptions, NODE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Slack for a loaded 2-core machine on top of any configured time.
const MARGIN: Duration = Duration::from_millis(1500);

/// Lines of `log` that mention `needle`.
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_link_is_found_within_ping_interval_times_misses_and_the_edge_reconnects() {
    // The server PINGs every 200 ms and gives up after 3 silent intervals; the edge looks
    // slower (1 s × 3) so there is a window in which the node has no session at all.
    let server_ping = Duration::from_millis(200);
    let misses = 3;
    let mut cluster = Cluster::start(ClusterOptions {
        relay: true,
        server: ServerOptions {
            ping_interval: server_ping,
            ping_misses: misses,
            ..ServerOptions::default()
        },
        edge: EdgeTuning {
            ping_interval: Duration::from_secs(1),
            ping_misses: 3,
            // The relay's accept count below is the session's reconnects: no lane beside it.
            lane: false,
            ..EdgeTuning::default()
        },
        ..ClusterOptions::default()
    })
    .await;
    cluster.checked_exchange(1, 256 << 10).await;

    // A stream in flight when the link dies: the peer waits for our EOF before replying.
    let mut in_flight = cluster
        .connect(&cluster.target(cluster.peer.addr.port()))
        .await
        .expect("CONNECT before the link dies");
    let request = PeerRequest {
        seed: 2,
        reply_len: 1 << 20,
        reply_after_eof: true,
    };
    in_flight.write_all(&request.encode()).await.unwrap();
    in_flight.write_all(&[0x42; 1000]).await.unwrap();
    in_flight.flush().await.unwrap();

    let relay = cluster.relay.as_ref().expect("relay");
    // Let the last PONG through, then cut the live connection silently; a fresh connection
    // through the relay still works (like a dropped NAT mapping).
    tokio::time::sleep(server_ping).await;
    let died = Instant::now();
    for dir in Direction::BOTH {
        relay.set_existing(dir, Mode::Blackhole);
    }
    let bound = server_ping * misses;
    let reason_line = poll_until(
        "the server to declare the session dead",
        bound + MARGIN + Duration::from_secs(2),
        Duration::from_millis(10),
        || {
            let log = cluster.server.log();
            let found = lines_with(&log, EDGE_ENDED)
                .into_iter()
                .find(|l| l.contains(NODE))
                .map(str::to_owned);
            std::future::ready(found)
        },
    )
    .await;
    let detected = died.elapsed();
    println!("half-open session declared dead after {detected:?} (bound {bound:?})");
    assert!(
        reason_line.contains("no PING answer"),
        "the session ended for another reason: {reason_line}"
    );
    assert!(
        detected >= bound - server_ping && detected <= bound + MARGIN,
        "declared dead after {detected:?}; expected about {bound:?}"
    );

    // New dials fail at once with 502 instead of waiting for a dead edge.
    let asked = Instant::now();
    let answer = cluster
        .connect_answer(&cluster.target(cluster.peer.addr.port()))
        .await;
    let took = asked.elapsed();
    assert_eq!(answer.status, 502, "{answer:?}");
    assert!(answer.body.contains("no edge connected"), "{answer:?}");
    assert!(took < Duration::from_secs(1), "the 502 took {took:?}");

    // The stream that was in flight failed visibly: an error, never a clean EOF.
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0usize;
    let ended = within("the in-flight stream to fail", MARGIN * 2, async {
        loop {
            match in_flight.read(&mut buf).await {
                Ok(0) => return Ok(got),
                Ok(n) => got += n,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    assert!(
        ended.is_err(),
        "the in-flight stream ended cleanly after {got} bytes: silent truncation"
    );

    // The edge finds the dead session itself, reconnects through the relay, traffic flows.
    poll_until(
        "the edge's new session",
        Duration::from_secs(3) + MARGIN * 4,
        Duration::from_millis(20),
        || std::future::ready(cluster.server.has_edge_session(NODE).then_some(())),
    )
    .await;
    println!("the edge was back {:?} after the link died", died.elapsed());
    assert_eq!(
        relay.accepted(),
        2,
        "the edge should reconnect through the relay once"
    );
    // The target of the in-flight stream saw a failure too (a reset), not a clean EOF that
    // would pass its 1000 bytes off as the whole upload.
    let report = within(
        "the in-flight stream's target report",
        Duration::from_secs(5),
        cluster.peer.next_report(),
    )
    .await;
    assert_eq!(report.request, Some(request));
    assert!(
        report.error.as_deref().is_some_and(|e| e.contains("reset")),
        "the target of the broken stream should see a reset: {report:?}"
    );
    cluster.checked_exchange(3, 1 << 20).await;
    assert!(
        cluster.edge.log().contains("no PING answer"),
        "the edge should have found the dead session by its own PINGs:\n{}",
        cluster.edge.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testplan_03_same_node_replacement_while_half_open_takes_over_and_no_dial_reaches_the_old_session(
) {
    // The edge notices the dead link quickly (200 ms × 3); the server would take 10 s, so the
    // new session arrives while the old one is still routed.
    let mut cluster = Cluster::start(ClusterOptions {
        relay: true,
        server: ServerOptions {
            ping_interval: Duration::from_secs(1),
            ping_misses: 10,
            dial_timeout: Duration::from_secs(5),
            ..ServerOptions::default()
        },
        edge: EdgeTuning {
            ping_interval: Duration::from_millis(200),
            ping_misses: 3,
            ..EdgeTuning::default()
        },
        ..ClusterOptions::default()
    })
    .await;
    cluster.checked_exchange(1, 256 << 10).await;
    let pid = cluster.server.pid();
    // Baseline: one session, no stream, frontend connections closed.
    let admin = cluster.server.addrs.admin;
    poll_until(
        "a quiet server",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async move {
            let (_, m) = tether_tests::frontend::admin_get(admin, "/metrics")
                .await
                .ok()?;
            (metric(&m, "tether_streams_open") == Some(0.0)).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fds_before = open_fds(pid);

    let relay = cluster.relay.as_ref().expect("relay");
    let died = Instant::now();
    for dir in Direction::BOTH {
        relay.set_existing(dir, Mode::Blackhole);
    }
    poll_until(
        "the new session to replace the half-open one",
        Duration::from_secs(8),
        Duration::from_millis(10),
        || {
            let log = cluster.server.log();
            std::future::ready(
                log.contains("new session replaces the node's previous one")
                    .then_some(()),
            )
        },
    )
    .await;
    println!("replaced {:?} after the link died", died.elapsed());
    assert_eq!(
        lines_with(&cluster.server.log(), EDGE_ESTABLISHED).len(),
        2,
        "exactly one new session"
    );

    // Every dial goes to the new session: one that reached the half-open session would hang
    // until the 5 s dial timeout.
    for seed in 10..30u64 {
        let started = Instant::now();
        cluster.checked_exchange(seed, 64 << 10).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "dial {seed} took {took:?}: did it go to the old session?"
        );
    }

    // The old session winds down by itself (it had no stream), not at its PING deadline.
    let ended = poll_until(
        "the old session to end",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let log = cluster.server.log();
            let line = lines_with(&log, EDGE_ENDED)
                .into_iter()
                .find(|l| l.contains(NODE))
                .map(str::to_owned);
            std::future::ready(line)
        },
    )
    .await;
    // Retired with no stream: it ends by itself (h2 closes it after its last stream, or the
    // server notices it has none), never by a PING deadline.
    assert!(
        ended.contains("retired") || ended.contains("closed after its last stream"),
        "the old session ended for another reason: {ended}"
    );
    assert!(
        died.elapsed() < Duration::from_secs(10),
        "the old session outlived the server's PING deadline"
    );
    assert!(cluster.server.has_edge_session(NODE));
    assert_eq!(
        metric(&cluster.metrics().await, "tether_edges_connected"),
        Some(1.0)
    );

    // Its tasks and sockets are gone: the server holds as many descriptors as before.
    let fds = poll_until(
        "the server's descriptors back to the baseline",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let now = open_fds(pid);
            std::future::ready((now <= fds_before).then_some(now))
        },
    )
    .await;
    println!("server descriptors: {fds_before} before, {fds} after the replacement");
}
