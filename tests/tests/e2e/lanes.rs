//! Lanes (issue 16): a stream that shows itself to be bulk moves to its session's lane, a
//! second connection run on other threads at both ends, while it runs. Every byte must
//! arrive once and in order whichever directions are still open when it moves, and a lane
//! lost under a moved stream must fail that stream visibly, never end it cleanly.

use std::time::Duration;

use tether_tests::data::{exchange, PeerRequest, MIB};
use tether_tests::frontend::metric;
use tether_tests::raw_edge::RawEdge;
use tether_tests::relay::{Cut, Direction};
use tether_tests::{poll_until, within, Cluster, ClusterOptions};
use tokio::io::AsyncReadExt;

/// Far above the bound a stream must pass within a second to move (8 MiB), so it moves on
/// any machine, and long enough that it moves mid-stream, with bytes on both connections.
const BULK: u64 = 96 * MIB;

/// One checked exchange through the cluster: `send` bytes up, `reply` bytes down, the reply
/// only after the upload ended when `reply_after_eof`. Both digests are checked by the peer.
async fn checked(cluster: &mut Cluster, seed: u64, send: u64, reply: u64, reply_after_eof: bool) {
    let label = format!("exchange {seed}");
    let tunnel = cluster
        .connect(&cluster.target(cluster.peer.addr.port()))
        .await
        .unwrap_or_else(|e| panic!("{label}: CONNECT: {e:#}"));
    let request = PeerRequest {
        seed,
        reply_len: reply,
        reply_after_eof,
    };
    let client = within(
        &label,
        Duration::from_secs(60),
        exchange(tunnel, request, send),
    )
    .await
    .unwrap_or_else(|e| panic!("{label}: {e}"));
    let report = within(
        "the peer's report",
        Duration::from_secs(10),
        cluster.peer.next_report(),
    )
    .await;
    report.assert_matches(&label, request, send, &client);
}

async fn lane_moves(cluster: &Cluster) -> f64 {
    metric(&cluster.metrics().await, "tether_lane_moves_total").unwrap_or(0.0)
}

async fn wait_for_lane(cluster: &Cluster) {
    poll_until(
        "the session's lane",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let text = cluster.metrics().await;
            (metric(&text, "tether_edge_lanes") == Some(1.0)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_streams_move_to_the_lane_and_every_byte_arrives_in_order() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    wait_for_lane(&cluster).await;

    // A small exchange stays on the session.
    checked(&mut cluster, 1, 64 << 10, 64 << 10, false).await;
    assert_eq!(lane_moves(&cluster).await, 0.0, "a small stream moved");

    // Both directions open when it moves: both switch.
    checked(&mut cluster, 2, BULK, BULK, false).await;
    assert_eq!(lane_moves(&cluster).await, 1.0, "the two-way bulk stream");
    // Upload only, then the reply: the download direction switches alone or both do.
    checked(&mut cluster, 3, BULK, 16 << 10, true).await;
    // The upload ended on the session before the download began: only the download moves.
    checked(&mut cluster, 4, 1 << 10, BULK, true).await;
    assert_eq!(
        lane_moves(&cluster).await,
        3.0,
        "each bulk stream moved once"
    );

    let edge_log = cluster.edge.log();
    let moved = edge_log
        .lines()
        .filter(|l| l.contains("edge stream closed") && l.contains("moved_to_lane=true"))
        .count();
    assert_eq!(
        moved, 3,
        "the edge's audit says which streams moved:\n{edge_log}"
    );
    // The session is still the node's, and small streams still work on it.
    checked(&mut cluster, 5, 4 << 10, 4 << 10, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_lost_under_a_moved_stream_fails_it_visibly_and_the_session_carries_on() {
    let mut cluster = Cluster::start(ClusterOptions {
        relay: true,
        ..ClusterOptions::default()
    })
    .await;
    wait_for_lane(&cluster).await;

    // A download far longer than the test: it moves, then its lane dies under it.
    let mut tunnel = cluster
        .connect(&cluster.target(cluster.peer.addr.port()))
        .await
        .expect("CONNECT the bulk stream");
    let request = PeerRequest {
        seed: 7,
        reply_len: 64 * 1024 * MIB,
        reply_after_eof: false,
    };
    tokio::io::AsyncWriteExt::write_all(&mut tunnel, &request.encode())
        .await
        .expect("send the request");
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    within(
        "the download to move to the lane",
        Duration::from_secs(20),
        async {
            while lane_moves(&cluster).await < 1.0 {
                got += tunnel.read(&mut buf).await.expect("read the download") as u64;
            }
        },
    )
    .await;

    // The lane is the relayed connection the download grows on now (edge → server is the
    // relay's upstream direction).
    let relay = cluster.relay.as_ref().expect("the relay");
    let conns: Vec<_> = relay
        .connections()
        .into_iter()
        .filter(|c| !c.is_done())
        .collect();
    let before: Vec<u64> = conns.iter().map(|c| c.forwarded(Direction::Up)).collect();
    within("more of the download", Duration::from_secs(10), async {
        let target = got + 16 * MIB;
        while got < target {
            got += tunnel.read(&mut buf).await.expect("read the download") as u64;
        }
    })
    .await;
    let lane = conns
        .iter()
        .zip(&before)
        .max_by_key(|(c, b)| c.forwarded(Direction::Up) - **b)
        .map(|(c, _)| c.clone())
        .expect("relayed connections");
    assert_eq!(conns.len(), 2, "the session and its lane");
    lane.cut(Direction::Up, Cut::Rst);
    lane.cut(Direction::Down, Cut::Rst);

    let ended = within("the moved stream to fail", Duration::from_secs(20), async {
        loop {
            match tunnel.read(&mut buf).await {
                Ok(0) => return Ok(got),
                Ok(n) => got += n as u64,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    assert!(
        ended.is_err(),
        "the moved stream ended cleanly after {got} bytes when its lane died: silent truncation"
    );

    // The target's side failed too (a reset, not the clean end of a complete download).
    let report = within(
        "the peer's report",
        Duration::from_secs(10),
        cluster.peer.next_report(),
    )
    .await;
    assert_eq!(report.request, Some(request));
    assert!(
        report.error.is_some(),
        "the target saw a clean end of a stream whose lane died: {report:?}"
    );

    // The session itself never noticed: small streams go on, and a new lane comes up.
    checked(&mut cluster, 8, 16 << 10, 16 << 10, false).await;
    wait_for_lane(&cluster).await;
    checked(&mut cluster, 9, BULK, BULK, false).await;
    assert_eq!(
        lane_moves(&cluster).await,
        2.0,
        "the new lane takes bulk streams again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_lanes_is_told_once_and_bulk_streams_stay_on_the_session() {
    let mut cluster = Cluster::start(ClusterOptions {
        server: tether_tests::ServerOptions {
            edge_extra: "lanes = false".into(),
            ..tether_tests::ServerOptions::default()
        },
        ..ClusterOptions::default()
    })
    .await;
    const SAID: &str = "the server takes no lanes";
    poll_until(
        "the edge to learn the server takes no lanes",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || std::future::ready(cluster.edge.log().contains(SAID).then_some(())),
    )
    .await;
    checked(&mut cluster, 10, BULK, BULK, false).await;
    assert_eq!(lane_moves(&cluster).await, 0.0);
    let text = cluster.metrics().await;
    assert_eq!(metric(&text, "tether_edge_lanes"), Some(0.0));
    // Not retried for this session: one attempt, one line.
    let log = cluster.edge.log();
    assert_eq!(log.matches(SAID).count(), 1, "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("edge stream closed") && l.contains("moved_to_lane=false")),
        "{log}"
    );
}

/// The attack: a lane opened with another valid certificate of the node (an old one, or one
/// issued elsewhere) to a session that has none. Attached, it would receive the bytes of
/// every stream the server moves there; it must be refused, and the streams stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_with_another_certificate_of_the_node_is_refused_and_gets_no_stream() {
    let mut cluster = Cluster::start(ClusterOptions {
        // The real edge opens no lane, so the session's slot is free for the attacker's.
        edge: tether_tests::EdgeTuning {
            lane: false,
            ..tether_tests::EdgeTuning::default()
        },
        ..ClusterOptions::default()
    })
    .await;
    let server = cluster.server.addrs.edge;
    let ips = [tether_tests::NODE_IP];
    // Refused before HTTP/2 (no preface) is the expected end; let through, it would answer
    // the replica's announcement as an edge's lane does, and hold on.
    let mut attacker = RawEdge::connect_lane(&cluster.pki, server, tether_tests::NODE, &ips)
        .await
        .ok();
    if let Some(lane) = attacker.as_mut() {
        if let Ok(Ok(first)) =
            tokio::time::timeout(Duration::from_secs(2), lane.next_request()).await
        {
            let _ = lane.answer_ok(first).await;
        }
    }
    // Long enough for a lane to attach if it were let through.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = cluster.metrics().await;
    assert_eq!(
        metric(&text, "tether_edge_lanes"),
        Some(0.0),
        "a lane with another certificate of the node was attached"
    );
    checked(&mut cluster, 11, BULK, BULK, false).await;
    assert_eq!(
        lane_moves(&cluster).await,
        0.0,
        "a stream moved to a foreign lane"
    );
    let refused = cluster.server.log();
    assert!(
        refused.contains("lane refused: its certificate is not its session's"),
        "no audit line for the refused lane:\n{refused}"
    );
    drop(attacker);
}
