//! `transport = "auto"` when UDP is blocked: the edge reaches the server through the TCP
//! fault relay, and a UDP relay on the same port number stands for the network's UDP path
//! (absent: nothing listening; black-holed: a firewall that drops). The edge must fall back
//! to TCP within its handshake bound, carry traffic, move to QUIC when it becomes reachable
//! without dropping the stream in flight, and fall back again when UDP is dropped.

use std::time::{Duration, Instant};

use tether_tests::edge::Transport;
use tether_tests::frontend::metric;
use tether_tests::udp_relay::UdpRelay;
use tether_tests::{poll_until, within, Cluster, ClusterOptions, NODE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The edge's default `server.quic_handshake_timeout`.
const BOUND: Duration = Duration::from_secs(2);

async fn echo_round(stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), round: u8) {
    let sent = [round; 100];
    stream.write_all(&sent).await.expect("write");
    let mut back = [0u8; 100];
    within(
        "the echo",
        Duration::from_secs(5),
        stream.read_exact(&mut back),
    )
    .await
    .expect("echo");
    assert_eq!(back, sent, "round {round}");
}

async fn wait_transport(cluster: &Cluster, transport: &str, limit: Duration) {
    let what = format!("a {transport} session of {NODE}");
    poll_until(&what, limit, Duration::from_millis(20), || {
        let now = cluster.server.edge_transport(NODE);
        let live = cluster.server.has_edge_session(NODE);
        std::future::ready((live && now.as_deref() == Some(transport)).then_some(()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_when_udp_is_blocked_and_moves_to_quic_when_it_returns() {
    let mut tuning = Transport::Auto.tuning();
    tuning.quic_retry_interval = Some(Duration::from_secs(1));
    let started = Instant::now();
    // Nothing listens on the relay's port number over UDP.
    let mut cluster = Cluster::start(ClusterOptions {
        relay: true,
        edge: tuning,
        ..ClusterOptions::default()
    })
    .await;
    let up = started.elapsed();
    assert_eq!(cluster.server.edge_transport(NODE).as_deref(), Some("tcp"));
    assert!(
        cluster.edge.log().contains("QUIC unavailable; using TCP"),
        "{}",
        cluster.edge.log()
    );
    println!("nothing on UDP: TCP session {up:?} after start");
    assert!(up < BOUND + Duration::from_secs(5), "took {up:?}");
    cluster.checked_exchange(1, 1 << 20).await;

    // A stream in flight on the TCP session while QUIC becomes reachable.
    let mut held = cluster
        .connect(&cluster.target(cluster.echo.addr.port()))
        .await
        .expect("CONNECT to echo");
    echo_round(&mut held, 1).await;
    let relay = cluster.relay.as_ref().expect("relay").addr;
    let quic = cluster.server.addrs.edge_quic.expect("a QUIC listener");
    let udp = UdpRelay::start(relay, quic).await.expect("UDP relay");
    let opened = Instant::now();
    wait_transport(&cluster, "quic", Duration::from_secs(10)).await;
    println!("UDP open: moved to QUIC after {:?}", opened.elapsed());
    // The stream opened on TCP runs on after the move; new streams take QUIC.
    for round in 2..10 {
        echo_round(&mut held, round).await;
    }
    cluster.checked_exchange(2, 1 << 20).await;
    let metrics = cluster.metrics().await;
    assert_eq!(
        metric(&metrics, "tether_edge_sessions{transport=\"quic\"}"),
        Some(1.0),
        "{metrics}"
    );
    drop(held);

    // UDP dropped from now on: the QUIC session dies of silence and the next one is TCP,
    // within the idle timeout, a backoff and the handshake bound.
    udp.set_blackhole(true);
    let blocked = Instant::now();
    let limit = Duration::from_millis(1500) + Duration::from_millis(500) + BOUND;
    wait_transport(&cluster, "tcp", limit + Duration::from_secs(5)).await;
    let back = blocked.elapsed();
    println!("UDP dropped: back on TCP after {back:?} (idle + backoff + bound = {limit:?})");
    assert!(
        udp.dropped() > 0,
        "the edge tried QUIC through the dropped path"
    );
    cluster.checked_exchange(3, 1 << 20).await;
}
