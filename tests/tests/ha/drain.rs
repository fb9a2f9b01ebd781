//! Graceful drain (TESTPLAN 4): SIGTERM to one of two replicas behind haproxy while a
//! `kubectl logs -f`-like stream (curl -N, `follow=true`) runs through it. The stream keeps
//! flowing, `/readyz` turns 503, the listeners close, new CONNECTs succeed through the other
//! replica, and the process exits as soon as the stream ends, long before the grace period.
//! On one replica, over TCP and over QUIC alike: an open stream keeps flowing and the exit
//! follows its end, the grace period ends streams still open, and a second signal ends a
//! drain at once.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_tests::edge::Transport;
use tether_tests::frontend::{admin_get, curl_proxy_args};
use tether_tests::ha::{HaCluster, HaOptions};
use tether_tests::server::EDGE_ENDED;
use tether_tests::{poll_until, within, Cluster, ClusterOptions, ServerOptions, NODE, NODE_IP};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The drain's grace period: long, so that exiting early is visible.
const GRACE: Duration = Duration::from_secs(20);

/// Log lines received so far, with when they arrived.
pub(crate) type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

/// `curl -N` of a following log through replica `replica`'s mTLS frontend.
fn follow_logs(cluster: &HaCluster, replica: usize) -> (tokio::process::Child, Lines) {
    follow_logs_via(
        cluster.servers[replica].addrs.connect_tcp,
        &cluster.pki,
        cluster.kubelet.addr.port(),
    )
}

/// `curl -N` of a following log from the demo kubelet on `kubelet_port` through the mTLS
/// frontend at `connect_tcp`; its lines are collected as they arrive.
pub(crate) fn follow_logs_via(
    connect_tcp: std::net::SocketAddr,
    pki: &tether_tests::Pki,
    kubelet_port: u16,
) -> (tokio::process::Child, Lines) {
    let proxy = curl_proxy_args(connect_tcp, pki);
    let url =
        format!("https://{NODE_IP}:{kubelet_port}/containerLogs/default/web/nginx?follow=true");
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["--silent", "--show-error", "-N", "--max-time", "60"])
        .args(&proxy)
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for var in ["http_proxy", "https_proxy", "all_proxy", "no_proxy"] {
        command.env_remove(var).env_remove(var.to_uppercase());
    }
    let mut child = command.spawn().expect("run curl");
    let stdout = child.stdout.take().expect("curl stdout");
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push((Instant::now(), line));
        }
    });
    (child, lines)
}

/// The line number `N` of a `... line N from pod/container` log line.
fn line_number(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once(" line ")?;
    rest.split_whitespace().next()?.parse().ok()
}

async fn wait_lines(lines: &Lines, n: usize, timeout: Duration) {
    poll_until(
        &format!("{n} log lines"),
        timeout,
        Duration::from_millis(20),
        || std::future::ready((lines.lock().unwrap().len() >= n).then_some(())),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_keeps_a_follow_stream_moves_new_connects_and_exits_early_when_idle() {
    let test = "graceful_drain_keeps_a_follow_stream_moves_new_connects_and_exits_early_when_idle";
    let mut options = HaOptions::default();
    options.server.shutdown_grace = GRACE;
    let Some(mut cluster) = HaCluster::start(test, options).await else {
        return;
    };
    let (mut curl, lines) = follow_logs(&cluster, 0);
    wait_lines(&lines, 3, Duration::from_secs(10)).await;

    cluster.servers[0].signal("TERM");
    let term = Instant::now();
    let admin = cluster.servers[0].addrs.admin;
    poll_until(
        "/readyz to turn 503",
        Duration::from_secs(3),
        Duration::from_millis(10),
        || async move { matches!(admin_get(admin, "/readyz").await, Ok((503, _))).then_some(()) },
    )
    .await;
    // Listeners close: no new CONNECT and no new edge session reaches the draining replica.
    for addr in [
        cluster.servers[0].addrs.connect_tcp,
        cluster.servers[0].addrs.edge,
    ] {
        poll_until(
            "the draining replica's listeners to close",
            Duration::from_secs(3),
            Duration::from_millis(10),
            || async move { TcpStream::connect(addr).await.is_err().then_some(()) },
        )
        .await;
    }
    // New CONNECTs during the drain go through the other replica, checksummed.
    for seed in 0..5 {
        cluster.checked_exchange_via(1, 500 + seed, 1 << 20).await;
    }
    // The follow stream keeps flowing through the draining replica.
    let at_term = lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at <= term)
        .count();
    wait_lines(&lines, at_term + 15, Duration::from_secs(10)).await;
    assert!(
        cluster.servers[0].exited().is_none(),
        "the replica exited while a stream was in flight"
    );
    let during = lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at > term)
        .count();

    // The stream ends (the client leaves): the replica exits at once, not after the grace.
    let left = Instant::now();
    curl.kill().await.expect("stop curl");
    cluster.servers[0]
        .wait_exit(GRACE)
        .await
        .expect("the draining replica to exit");
    let exit = left.elapsed();
    let status = cluster.servers[0].exited().expect("exit status");
    println!(
        "{during} lines during the drain; exited {exit:?} after the stream ended, {:?} after \
         SIGTERM (grace {GRACE:?})",
        term.elapsed()
    );
    assert!(status.success(), "drain exit status {status}");
    assert!(
        exit < Duration::from_secs(3),
        "exit took {exit:?} after the last stream ended"
    );
    // Nothing was lost on the stream: its lines are numbered 1, 2, 3, ... without a gap.
    let numbers: Vec<u64> = lines
        .lock()
        .unwrap()
        .iter()
        .map(|(_, l)| line_number(l).unwrap_or_else(|| panic!("not a log line: {l:?}")))
        .collect();
    let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
    assert_eq!(numbers, expected, "log lines lost or reordered");
    let log = cluster.servers[0].log();
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("drained: no stream left"), "{log}");

    // The other replica still reaches the edge, and the edge still runs.
    cluster.checked_exchange_via(1, 600, 1 << 20).await;
    assert!(cluster.edge.running(), "the edge process exited");
    assert!(cluster.servers[1].has_edge_session(NODE));
    assert!(
        !cluster.servers[1].log().contains(EDGE_ENDED),
        "the other replica's session was disturbed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_second_signal_exits_at_once() {
    second_signal_exits_at_once(Transport::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_graceful_drain_second_signal_exits_at_once() {
    second_signal_exits_at_once(Transport::Quic).await;
}

async fn second_signal_exits_at_once(transport: Transport) {
    // A long-lived stream keeps the drain waiting.
    let (mut cluster, mut held) = one_replica_with_a_stream(transport, GRACE).await;
    start_draining(&cluster).await;
    // Still draining: the stream is in flight and the grace is long.
    assert!(
        cluster
            .server
            .wait_exit(Duration::from_millis(500))
            .await
            .is_none(),
        "the server exited during the drain with a stream in flight"
    );
    let second = Instant::now();
    cluster.server.signal("TERM");
    cluster
        .server
        .wait_exit(Duration::from_secs(3))
        .await
        .expect("the second signal ends the process");
    let took = second.elapsed();
    println!("second SIGTERM: exited after {took:?}");
    assert!(took < Duration::from_secs(1), "exit took {took:?}");
    // The stream is cut, visibly (no clean end of the tunneled bytes).
    let mut buf = [0u8; 16];
    let read = within(
        "the cut stream",
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut held, &mut buf),
    )
    .await;
    assert!(
        !matches!(read, Ok(n) if n > 0),
        "the stream carried bytes after the process exited: {read:?}"
    );
    assert!(cluster.server.log().contains("second signal: exiting now"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_grace_period_ends_the_streams_still_open() {
    grace_period_ends_the_streams_still_open(Transport::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_graceful_drain_grace_period_ends_the_streams_still_open() {
    grace_period_ends_the_streams_still_open(Transport::Quic).await;
}

async fn grace_period_ends_the_streams_still_open(transport: Transport) {
    let grace = Duration::from_secs(1);
    let (mut cluster, _held) = one_replica_with_a_stream(transport, grace).await;
    let term = Instant::now();
    cluster.server.signal("TERM");
    cluster
        .server
        .wait_exit(grace + Duration::from_secs(5))
        .await
        .expect("exit after the grace period");
    let took = term.elapsed();
    println!("exited {took:?} after SIGTERM with a stream open (grace {grace:?})");
    assert!(
        took >= grace,
        "exited after {took:?}, before the grace period"
    );
    assert!(
        took < grace + Duration::from_secs(3),
        "exited after {took:?}"
    );
    let log = cluster.server.log();
    assert!(
        log.contains("grace period over; closing remaining streams"),
        "{log}"
    );
}

/// TESTPLAN 4 on one replica, over each transport: the drain keeps an open stream flowing on
/// the session and the process exits as soon as the stream ends, long before the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_keeps_an_open_stream_and_exits_early_when_it_ends() {
    keeps_an_open_stream_and_exits_early_when_it_ends(Transport::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_graceful_drain_keeps_an_open_stream_and_exits_early_when_it_ends() {
    keeps_an_open_stream_and_exits_early_when_it_ends(Transport::Quic).await;
}

async fn keeps_an_open_stream_and_exits_early_when_it_ends(transport: Transport) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cluster, mut held) = one_replica_with_a_stream(transport, GRACE).await;
    start_draining(&cluster).await;
    // The stream in flight keeps echoing through the draining session.
    for round in 0..20u8 {
        let sent = [round; 64];
        held.write_all(&sent).await.expect("write during the drain");
        let mut back = [0u8; 64];
        within(
            "the echo during the drain",
            Duration::from_secs(5),
            held.read_exact(&mut back),
        )
        .await
        .expect("echo during the drain");
        assert_eq!(back, sent, "round {round}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        cluster.server.exited().is_none(),
        "the server exited with a stream in flight"
    );
    let left = Instant::now();
    drop(held);
    cluster
        .server
        .wait_exit(GRACE)
        .await
        .expect("the draining server to exit");
    let exit = left.elapsed();
    println!("{transport:?} drain: exited {exit:?} after the last stream ended (grace {GRACE:?})");
    assert!(
        exit < Duration::from_secs(3),
        "exit took {exit:?} after the last stream ended"
    );
    assert!(cluster.server.log().contains("drained: no stream left"));
}

/// One replica over `transport` with drain grace `grace`, and one CONNECT to its echo target
/// held open (the stream a drain waits for).
async fn one_replica_with_a_stream(
    transport: Transport,
    grace: Duration,
) -> (Cluster, TlsStream<TcpStream>) {
    let cluster = Cluster::start(ClusterOptions {
        server: ServerOptions {
            shutdown_grace: grace,
            ..ServerOptions::default()
        },
        ..ClusterOptions::over(transport)
    })
    .await;
    let held = cluster
        .connect(&cluster.target(cluster.echo.addr.port()))
        .await
        .expect("CONNECT to echo");
    (cluster, held)
}

/// SIGTERM to the replica, then until its `/readyz` says 503: the drain has begun.
async fn start_draining(cluster: &Cluster) {
    cluster.server.signal("TERM");
    let admin = cluster.server.addrs.admin;
    poll_until(
        "/readyz to turn 503",
        Duration::from_secs(3),
        Duration::from_millis(10),
        || async move { matches!(admin_get(admin, "/readyz").await, Ok((503, _))).then_some(()) },
    )
    .await;
}
