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

/// Set in the environment of the run inside the network namespace.
const IN_NETNS: &str = "TETHER_TEST_IN_NETNS";
/// The iptables rule that stands for a firewall dropping UDP.
const DROP_UDP: [&str; 6] = ["INPUT", "-p", "udp", "-j", "DROP", "-w"];

fn run(program: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
}

/// Removes the namespace (and everything in it) when the test ends, however it ends.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "delete", &self.0]);
    }
}

/// The real firewall case: server, edge and targets run in a network namespace of their own
/// (this test binary again, inside `ip netns exec`) whose iptables drops every UDP packet.
#[tokio::test]
async fn udp_dropped_by_iptables_in_a_network_namespace_falls_back_and_quic_returns() {
    if std::env::var_os(IN_NETNS).is_some() {
        return;
    }
    let root = run("id", &["-u"]);
    if String::from_utf8_lossy(&root.stdout).trim() != "0" {
        eprintln!("skipped: creating a network namespace needs root");
        return;
    }
    let ns = Netns(format!("tether-udp-{}", std::process::id()));
    let added = run("ip", &["netns", "add", &ns.0]);
    assert!(added.status.success(), "ip netns add: {added:?}");
    let lo = run(
        "ip",
        &["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"],
    );
    assert!(lo.status.success(), "lo up: {lo:?}");
    let mut rule = vec!["netns", "exec", &ns.0, "iptables", "-A"];
    rule.extend(DROP_UDP);
    let dropped = run("ip", &rule);
    assert!(dropped.status.success(), "iptables: {dropped:?}");
    let exe = std::env::current_exe().expect("test binary");
    let inner = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(exe)
        .args([
            "--exact",
            "fallback::inside_the_namespace",
            "--ignored",
            "--nocapture",
        ])
        .env(IN_NETNS, "1")
        .output()
        .expect("run the test inside the namespace");
    let out = String::from_utf8_lossy(&inner.stdout);
    let err = String::from_utf8_lossy(&inner.stderr);
    println!("{out}");
    assert!(
        inner.status.success() && out.contains("1 passed"),
        "inside the namespace:\n{out}\n{err}"
    );
}

/// Run by the test above inside its namespace, where iptables drops UDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside a network namespace, started by udp_dropped_by_iptables_in_a_network_namespace_falls_back_and_quic_returns"]
async fn inside_the_namespace() {
    assert!(
        std::env::var_os(IN_NETNS).is_some(),
        "run only inside the namespace"
    );
    let mut tuning = Transport::Auto.tuning();
    tuning.quic_retry_interval = Some(Duration::from_secs(1));
    let started = Instant::now();
    let mut cluster = Cluster::start(ClusterOptions {
        edge: tuning,
        ..ClusterOptions::default()
    })
    .await;
    let up = started.elapsed();
    println!("UDP dropped by iptables: TCP session {up:?} after start");
    assert_eq!(cluster.server.edge_transport(NODE).as_deref(), Some("tcp"));
    assert!(cluster.edge.log().contains("QUIC unavailable; using TCP"));
    assert!(up < BOUND + Duration::from_secs(5), "took {up:?}");
    cluster.checked_exchange(1, 1 << 20).await;

    let mut held = cluster
        .connect(&cluster.target(cluster.echo.addr.port()))
        .await
        .expect("CONNECT to echo");
    echo_round(&mut held, 1).await;
    let mut delete = vec!["-D"];
    delete.extend(DROP_UDP);
    let removed = run("iptables", &delete);
    assert!(removed.status.success(), "iptables -D: {removed:?}");
    let opened = Instant::now();
    wait_transport(&cluster, "quic", Duration::from_secs(10)).await;
    println!("UDP let through: on QUIC after {:?}", opened.elapsed());
    for round in 2..6 {
        echo_round(&mut held, round).await;
    }
    cluster.checked_exchange(2, 1 << 20).await;
}
