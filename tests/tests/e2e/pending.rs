//! Pending dials (TESTPLAN 7): an edge that never answers gets 504 after the dial timeout; an
//! edge lost mid-dial fails the dial at once; a client that leaves cancels the dial at the
//! edge (which never keeps a late socket); the per-node pending cap answers 503 beyond it,
//! under thousands of concurrent dials too, and the pending gauge always returns to 0.

use std::future::poll_fn;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tether_tests::fake_edge::FakeEdge;
use tether_tests::frontend::{metric, metric_sum, read_answer, tls_to};
use tether_tests::{poll_until, within, Cluster, ClusterOptions, ServerOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The fake node's name and IP.
const SLOW_NODE: &str = "edge-slow";
const SLOW_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20));

/// Start a cluster with the given server settings and a fake edge for [`SLOW_NODE`].
async fn cluster_with_slow_edge(server: ServerOptions) -> (Cluster, FakeEdge) {
    let cluster = Cluster::start(ClusterOptions {
        server,
        ..ClusterOptions::default()
    })
    .await;
    let fake = FakeEdge::connect(
        &cluster.pki,
        cluster.server.addrs.edge,
        SLOW_NODE,
        &[SLOW_IP],
    )
    .await;
    cluster.server.wait_for_edge_session(SLOW_NODE).await;
    (cluster, fake)
}

/// A target on the slow node (any port the server's policy allows).
fn slow_target(cluster: &Cluster) -> String {
    format!("{SLOW_IP}:{}", cluster.peer.addr.port())
}

/// The server's pending-dial gauge (every frontend).
async fn pending(cluster: &Cluster) -> f64 {
    metric_sum(&cluster.metrics().await, "tether_dials_pending")
}

async fn wait_pending(cluster: &Cluster, n: f64) {
    let admin = cluster.server.addrs.admin;
    poll_until(
        &format!("{n} pending dials"),
        Duration::from_secs(10),
        Duration::from_millis(10),
        || async move {
            let (_, text) = tether_tests::frontend::admin_get(admin, "/metrics")
                .await
                .ok()?;
            (metric_sum(&text, "tether_dials_pending") == n).then_some(())
        },
    )
    .await
}

/// Send a CONNECT without waiting for its answer.
async fn start_dial(cluster: &Cluster, target: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tls = tls_to(
        cluster.server.addrs.connect_tcp,
        cluster.pki.frontend_client_tls(),
    )
    .await
    .expect("TLS to the frontend");
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_dials_edge_never_answers_gets_504_after_the_dial_timeout() {
    let dial_timeout = Duration::from_secs(1);
    let (cluster, mut fake) = cluster_with_slow_edge(ServerOptions {
        dial_timeout,
        ..ServerOptions::default()
    })
    .await;
    let asked = Instant::now();
    let answer = cluster.connect_answer(&slow_target(&cluster)).await;
    let took = asked.elapsed();
    assert_eq!(answer.status, 504, "{answer:?}");
    assert!(answer.body.contains(SLOW_NODE), "{answer:?}");
    assert!(
        took >= dial_timeout && took < dial_timeout + Duration::from_secs(1),
        "504 after {took:?} with a {dial_timeout:?} dial timeout"
    );
    // The edge's stream was reset, so a late socket there would be dropped.
    let mut stream = fake.dials.recv().await.expect("the dial reached the edge");
    let reason = within(
        "the reset",
        Duration::from_secs(5),
        poll_fn(|cx| stream.poll_reset(cx)),
    )
    .await
    .expect("reset reason");
    assert_eq!(reason, h2::Reason::CANCEL);
    wait_pending(&cluster, 0.0).await;
    let text = cluster.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"tether_dials_total{frontend="connect",result="timeout"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_dials_edge_lost_mid_dial_fails_at_once() {
    let (cluster, mut fake) = cluster_with_slow_edge(ServerOptions {
        dial_timeout: Duration::from_secs(10),
        ..ServerOptions::default()
    })
    .await;
    let mut tls = start_dial(&cluster, &slow_target(&cluster)).await;
    let _held = within(
        "the dial to reach the edge",
        Duration::from_secs(5),
        fake.dials.recv(),
    )
    .await
    .expect("dial at the edge");
    assert_eq!(pending(&cluster).await, 1.0);
    let lost = Instant::now();
    fake.kill.cancel();
    let answer = within(
        "the answer after the edge left",
        Duration::from_secs(5),
        read_answer(&mut tls, true),
    )
    .await
    .expect("an answer");
    let took = lost.elapsed();
    assert!(
        matches!(answer.status, 502 | 503),
        "edge loss mid-dial answered {answer:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "the answer took {took:?} (dial timeout 10 s)"
    );
    wait_pending(&cluster, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_dials_client_cancel_reaches_the_edge_and_the_gauge_returns_to_zero() {
    let (cluster, mut fake) = cluster_with_slow_edge(ServerOptions {
        dial_timeout: Duration::from_secs(10),
        ..ServerOptions::default()
    })
    .await;
    let tls = start_dial(&cluster, &slow_target(&cluster)).await;
    let mut stream = within(
        "the dial to reach the edge",
        Duration::from_secs(5),
        fake.dials.recv(),
    )
    .await
    .expect("dial at the edge");
    wait_pending(&cluster, 1.0).await;
    let left = Instant::now();
    drop(tls);
    let reason = within(
        "the cancellation at the edge",
        Duration::from_secs(5),
        poll_fn(|cx| stream.poll_reset(cx)),
    )
    .await
    .expect("reset reason");
    assert_eq!(reason, h2::Reason::CANCEL);
    assert!(
        left.elapsed() < Duration::from_secs(2),
        "{:?}",
        left.elapsed()
    );
    wait_pending(&cluster, 0.0).await;
    let text = cluster.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"tether_dials_total{frontend="connect",result="client_cancelled"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

/// A listener whose accept queue is full, so a new connection to it hangs in SYN_SENT (the
/// kernel drops SYNs to a full queue; the client retries after about 1 s). Returns the
/// listener and the connections that fill its queue.
async fn full_listener() -> (TcpListener, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => fillers.push(tcp),
            Ok(Err(e)) => panic!("filling the accept queue: {e}"),
            // This one hangs: the queue is full. Dropping it abandons its SYN.
            Err(_) => return (listener, fillers),
        }
    }
    panic!("the accept queue never filled");
}

/// Connections accepted on `listener` within `window`.
async fn accept_for(listener: &TcpListener, window: Duration) -> Vec<SocketAddr> {
    let mut peers = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Ok((_, peer))) = tokio::time::timeout_at(deadline, listener.accept()).await {
        peers.push(peer);
    }
    peers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_dials_cancelled_at_the_real_edge_leave_no_late_socket() {
    let (listener, fillers) = full_listener().await;
    let port = listener.local_addr().unwrap().port();
    let cluster = Cluster::start(ClusterOptions {
        allow_both: vec![port],
        ..ClusterOptions::default()
    })
    .await;
    let target = cluster.target(port);

    // A dial the client abandons while the edge's connect is still in SYN_SENT.
    let abandoned = start_dial(&cluster, &target).await;
    wait_pending(&cluster, 1.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(abandoned);
    wait_pending(&cluster, 0.0).await;
    // Make room in the queue: the fillers are accepted, then nothing else may arrive, although
    // a SYN retry of a socket the edge had kept would now get through.
    let drained = accept_for(&listener, Duration::from_millis(300)).await;
    assert_eq!(drained.len(), fillers.len(), "only the fillers were queued");
    let late = accept_for(&listener, Duration::from_millis(2500)).await;
    assert!(
        late.is_empty(),
        "the edge kept a cancelled dial's socket: {late:?}"
    );

    // Control: the same situation without cancelling reaches the target on the SYN retry,
    // so the check above could have seen a late socket.
    let (listener2, fillers2) = (listener, {
        let mut again = Vec::new();
        for _ in 0..8 {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => again.push(tcp),
                Ok(Err(e)) => panic!("refilling the accept queue: {e}"),
                Err(_) => break,
            }
        }
        again
    });
    assert!(!fillers2.is_empty(), "could not refill the accept queue");
    let mut kept = start_dial(&cluster, &target).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refilled = accept_for(&listener2, Duration::from_millis(200)).await;
    assert_eq!(refilled.len(), fillers2.len());
    let arrived = accept_for(&listener2, Duration::from_millis(2500)).await;
    assert_eq!(
        arrived.len(),
        1,
        "the kept dial should connect on its SYN retry"
    );
    let answer = within(
        "the kept dial's answer",
        Duration::from_secs(5),
        read_answer(&mut kept, true),
    )
    .await
    .expect("answer");
    assert_eq!(answer.status, 200, "{answer:?}");
    drop(fillers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_dials_per_node_cap_answers_503_and_other_nodes_keep_working() {
    const CAP: usize = 3;
    let (mut cluster, mut fake) = cluster_with_slow_edge(ServerOptions {
        dial_timeout: Duration::from_secs(20),
        max_pending_dials: Some(CAP),
        ..ServerOptions::default()
    })
    .await;
    let target = slow_target(&cluster);
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(start_dial(&cluster, &target).await);
    }
    // Keep the edge's side of each stream: dropping it would reset (refuse) the dial.
    let mut at_edge = Vec::new();
    for _ in 0..CAP {
        at_edge.push(
            within(
                "dials at the edge",
                Duration::from_secs(5),
                fake.dials.recv(),
            )
            .await
            .expect("dial at the edge"),
        );
    }
    wait_pending(&cluster, CAP as f64).await;
    let asked = Instant::now();
    let answer = cluster.connect_answer(&target).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.body.contains("dials already pending"), "{answer:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    // The cap is per node: the real edge's node is unaffected.
    cluster.checked_exchange(7, 1 << 20).await;
    drop(held);
    wait_pending(&cluster, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_dials_thousands_concurrent_to_a_slow_edge_stay_capped_and_clean_up() {
    const DIALS: usize = 2000;
    const CAP: usize = 500;
    let (cluster, mut fake) = cluster_with_slow_edge(ServerOptions {
        dial_timeout: Duration::from_secs(30),
        max_pending_dials: Some(CAP),
        ..ServerOptions::default()
    })
    .await;
    let rss_before = rss(cluster.server.pid());
    let socket = cluster.server.addrs.connect_unix.clone();
    let target = slow_target(&cluster);
    // Unix-socket clients (no TLS), as a sidecar apiserver would dial.
    let mut clients = Vec::with_capacity(DIALS);
    let started = Instant::now();
    for _ in 0..DIALS {
        let mut unix = tokio::net::UnixStream::connect(&socket)
            .await
            .expect("connect the Unix socket");
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        unix.write_all(request.as_bytes()).await.unwrap();
        clients.push(unix);
    }
    // Everything beyond the cap is refused at once with 503; the rest waits at the edge.
    let answers: Vec<_> = clients
        .into_iter()
        .map(|mut unix| {
            tokio::spawn(async move {
                let answer =
                    tokio::time::timeout(Duration::from_secs(2), read_answer(&mut unix, true))
                        .await;
                (unix, answer)
            })
        })
        .collect();
    let mut refused = 0;
    let mut waiting = Vec::new();
    for task in answers {
        match task.await.expect("answer task") {
            (_, Ok(Ok(a))) if a.status == 503 => refused += 1,
            (_, Ok(other)) => panic!("unexpected answer {other:?}"),
            (unix, Err(_)) => waiting.push(unix),
        }
    }
    // Keep the edge's side of each stream: dropping it would reset (refuse) the dial.
    let mut at_edge = Vec::new();
    while let Ok(Some(stream)) =
        tokio::time::timeout(Duration::from_millis(500), fake.dials.recv()).await
    {
        at_edge.push(stream);
    }
    println!(
        "{DIALS} dials in {:?}: {refused} refused, {} waiting, {} at the edge",
        started.elapsed(),
        waiting.len(),
        at_edge.len()
    );
    assert_eq!(waiting.len(), CAP, "dials waiting");
    assert_eq!(refused, DIALS - CAP, "dials refused");
    assert_eq!(at_edge.len(), CAP, "dials the edge saw");
    assert_eq!(pending(&cluster).await, CAP as f64);
    let grown = rss(cluster.server.pid()).saturating_sub(rss_before);
    assert!(grown < 64 << 20, "the server grew by {} MiB", grown >> 20);
    drop(waiting);
    wait_pending(&cluster, 0.0).await;
    // The node's cap is free again: a new dial waits at the edge instead of getting 503.
    let again = start_dial(&cluster, &target).await;
    wait_pending(&cluster, 1.0).await;
    drop(again);
    wait_pending(&cluster, 0.0).await;
}

/// Resident memory of a process in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        << 10
}
