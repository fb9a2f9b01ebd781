//! Reconnect storm (TESTPLAN 1): 200 edges (in-process `tunnel_edge::Edge` instances, each
//! its own node with a certificate from the test CA) hold sessions with a real
//! `tunnel-server` process. The server is killed, stays down for a while, and comes back on
//! the same port: every edge must be back within the backoff cap plus a margin, and their
//! returns must be spread out by the jitter instead of arriving in one instant. Checksummed
//! transfers through a sample of the edges before and after.
//!
//! Its own test binary: 200 sessions and their TLS handshakes should not share the two cores
//! with timing-sensitive tests.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_tests::data::{exchange, PeerRequest};
use tether_tests::frontend::{admin_get, metric};
use tether_tests::targets::ChecksumPeer;
use tether_tests::{poll_until, within, Pki, ServerOptions, ServerProc};
use tokio_util::sync::CancellationToken;
use tunnel_edge::{Edge, EdgeConfig, EdgeStatus};

/// Simulated edges.
const EDGES: usize = 200;
/// Backoff floor and cap of every edge.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// How long the server stays down: long enough for every edge to reach its backoff cap.
const DOWNTIME: Duration = Duration::from_millis(2500);
/// Slack on top of the cap for a loaded 2-core machine (200 TLS handshakes on each side).
const MARGIN: Duration = Duration::from_secs(4);

fn node(i: usize) -> String {
    format!("storm-{i:03}")
}

/// A node IP per edge in 198.18.0.0/15 (benchmarking range; never dialed: the edges map
/// their own addresses to 127.0.0.1).
fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250 + 1) as u8))
}

/// One in-process edge.
struct SimEdge {
    status: Arc<EdgeStatus>,
}

fn start_edges(
    pki: &Pki,
    server: std::net::SocketAddr,
    peer_port: u16,
    cancel: &CancellationToken,
) -> Vec<SimEdge> {
    (0..EDGES)
        .map(|i| {
            let files = pki.issue_edge(&node(i), &[node_ip(i)]);
            let toml = format!(
                r#"
[server]
address = "{server}"
transport = "tcp"
server_name = "127.0.0.1"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
connect_timeout = "5s"
[reconnect]
min = "{min}ms"
max = "{max}ms"
stable_after = "30s"
[liveness]
ping_interval = "2s"
ping_misses = 3
[dial]
self_host = "127.0.0.1"
[allow]
ports = [{peer_port}]
"#,
                ca = pki.layout.ca_cert().display(),
                cert = files.cert.display(),
                key = files.key.display(),
                min = RECONNECT_MIN.as_millis(),
                max = RECONNECT_MAX.as_millis(),
            );
            let config = EdgeConfig::parse(&toml, "storm edge", pki.dir()).expect("edge config");
            let edge = Arc::new(Edge::new(config).expect("edge"));
            let status = Arc::new(EdgeStatus::default());
            tokio::spawn(edge.run(status.clone(), cancel.child_token()));
            SimEdge { status }
        })
        .collect()
}

async fn wait_connected(server: &ServerProc, n: usize, timeout: Duration) {
    let admin = server.addrs.admin;
    poll_until(
        &format!("{n} edges connected"),
        timeout,
        Duration::from_millis(50),
        || async move {
            let (_, text) = admin_get(admin, "/metrics").await.ok()?;
            (metric(&text, "tether_edges_connected") == Some(n as f64)).then_some(())
        },
    )
    .await
}

/// Checksummed exchanges through a sample of the edges, by node name.
async fn sample_exchanges(server: &ServerProc, pki: &Pki, peer: &mut ChecksumPeer, seed: u64) {
    for i in [0, EDGES / 3, EDGES / 2, EDGES - 1] {
        let target = format!("{}:{}", node(i), peer.addr.port());
        let tunnel = tunnel_server::client::connect_tls(
            server.addrs.connect_tcp,
            pki.frontend_client_tls(),
            &target,
        )
        .await
        .unwrap_or_else(|e| panic!("CONNECT {target}: {e:#}"));
        let request = PeerRequest {
            seed: seed + i as u64,
            reply_len: 256 << 10,
            reply_after_eof: false,
        };
        let client = within(
            "an exchange",
            Duration::from_secs(10),
            exchange(tunnel, request, 256 << 10),
        )
        .await
        .unwrap_or_else(|e| panic!("exchange via {target}: {e}"));
        let report = within(
            "the peer's report",
            Duration::from_secs(10),
            peer.next_report(),
        )
        .await;
        report.assert_matches(&target, request, 256 << 10, &client);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_two_hundred_edges_return_within_the_cap_spread_by_jitter() {
    let pki = Pki::new();
    let mut peer = ChecksumPeer::start().await;
    let mut server = ServerProc::start(
        &pki,
        &ServerOptions {
            allowed_ports: vec![peer.addr.port()],
            ..ServerOptions::default()
        },
    )
    .await;
    let cancel = CancellationToken::new();
    let _stop_edges = cancel.clone().drop_guard();
    let started = Instant::now();
    let edges = start_edges(&pki, server.addrs.edge, peer.addr.port(), &cancel);
    wait_connected(&server, EDGES, Duration::from_secs(30)).await;
    println!("{EDGES} edges connected in {:?}", started.elapsed());
    sample_exchanges(&server, &pki, &mut peer, 1).await;

    let before: Vec<u64> = edges
        .iter()
        .map(|e| e.status.sessions.load(Ordering::Relaxed))
        .collect();
    server.kill();
    poll_until(
        "every edge to notice the server is gone",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let up = edges
                .iter()
                .any(|e| e.status.connected.load(Ordering::Acquire));
            std::future::ready((!up).then_some(()))
        },
    )
    .await;
    // The server stays down: the edges back off toward their cap meanwhile.
    tokio::time::sleep(DOWNTIME).await;
    server.restart().await;
    let restarted = Instant::now();

    // When each edge's next session came up, polled every 5 ms.
    let mut back: Vec<Option<Duration>> = vec![None; EDGES];
    let bound = RECONNECT_MAX + MARGIN;
    while back.iter().any(Option::is_none) {
        assert!(
            restarted.elapsed() < bound,
            "{} of {EDGES} edges not back within {bound:?}",
            back.iter().filter(|b| b.is_none()).count()
        );
        for (i, edge) in edges.iter().enumerate() {
            if back[i].is_none() && edge.status.sessions.load(Ordering::Relaxed) > before[i] {
                back[i] = Some(restarted.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut times: Vec<Duration> = back.into_iter().flatten().collect();
    times.sort();
    let pct = |p: usize| times[(times.len() - 1) * p / 100];
    // The busiest 50 ms window.
    let window = Duration::from_millis(50);
    let busiest = (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t < times[i] + window)
                .count()
        })
        .max()
        .unwrap_or(0);
    println!(
        "after the restart: first back {:?}, p10 {:?}, p50 {:?}, p90 {:?}, last {:?}; busiest \
         {window:?} window held {busiest} of {EDGES}",
        times[0],
        pct(10),
        pct(50),
        pct(90),
        times[EDGES - 1]
    );
    assert!(
        times[EDGES - 1] <= bound,
        "last edge back after {:?}",
        times[EDGES - 1]
    );
    assert!(
        pct(90) - pct(10) >= RECONNECT_MAX / 4,
        "reconnects were not spread: p10 {:?}, p90 {:?}",
        pct(10),
        pct(90)
    );
    assert!(
        busiest <= EDGES / 3,
        "{busiest} of {EDGES} edges reconnected within one {window:?} window"
    );
    wait_connected(&server, EDGES, MARGIN).await;
    sample_exchanges(&server, &pki, &mut peer, 1000).await;
}
