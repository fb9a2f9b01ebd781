//! Slowloris and handshake exhaustion at the CONNECT frontend (TESTPLAN 11; the edge and
//! registration listeners are `edge_flood.rs` and `registration_flood.rs`): a thousand
//! connections that never start TLS, stop in the middle of the handshake, or finish it and
//! then trickle a CONNECT head one byte at a time. Each is closed at `connect.header_timeout`
//! (5 s in the test servers), and kube-apiserver's own CONNECTs keep succeeding meanwhile.

use std::time::{Duration, Instant};

use tether_tests::flood::{self, source};
use tether_tests::{within, Cluster, ClusterOptions, NODE_IP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Attacking connections of each of the three kinds.
const PER_KIND: usize = 334;
/// `connect.header_timeout` of the test servers (tests/src/server.rs).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Slack for the close after the deadline on a loaded 2-core machine.
const CLOSE_SLACK: Duration = Duration::from_secs(3);
/// Interval between the bytes of a trickled head.
const TRICKLE: Duration = Duration::from_millis(400);
/// Legitimate CONNECTs made while the flood holds its connections.
const LEGIT: usize = 10;
/// The slowest a legitimate CONNECT and round trip may be during the flood.
const LEGIT_WITHIN: Duration = Duration::from_secs(3);

/// The first bytes of a TLS ClientHello record that promises more than it sends.
const PARTIAL_CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];

/// Trickle a never-ending CONNECT head into `stream`, one byte per [`TRICKLE`], until the
/// server closes it; how long after the start it did (`None`: not within the bound).
async fn trickle<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
) -> Option<Duration> {
    let started = Instant::now();
    let head = format!(
        "CONNECT {NODE_IP}:10250 HTTP/1.1\r\nX-Slow: {}",
        "a".repeat(64)
    );
    let limit = HEADER_TIMEOUT + CLOSE_SLACK;
    for byte in head.bytes() {
        if stream.write_all(&[byte]).await.is_err() {
            return Some(started.elapsed());
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(TRICKLE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            // An answer (408, say) is fine; the close follows.
            Ok(Ok(_)) | Err(_) => {}
        }
        if started.elapsed() > limit {
            return None;
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testplan_11_slowloris_thousand_slow_connections_at_the_connect_frontend() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let frontend = cluster.server.addrs.connect_tcp;
    let limit = HEADER_TIMEOUT + CLOSE_SLACK;
    let started = Instant::now();
    let mut watches = Vec::new();
    for i in 0..PER_KIND {
        let from = source(2 + (i % 50) as u8);
        // Never a byte of TLS.
        if let Ok(tcp) = flood::connect_from(from, frontend).await {
            watches.push(flood::watch_close(tcp, limit));
        }
        // Half a ClientHello.
        if let Ok(mut tcp) = flood::connect_from(from, frontend).await {
            let _ = tcp.write_all(PARTIAL_CLIENT_HELLO).await;
            watches.push(flood::watch_close(tcp, limit));
        }
    }
    // TLS done, then the head one byte at a time.
    let tls = cluster.pki.frontend_client_tls();
    let mut trickles = tokio::task::JoinSet::new();
    for i in 0..PER_KIND {
        let from = source(2 + (i % 50) as u8);
        if let Some(stream) =
            flood::tls_from(from, frontend, tls.clone(), Duration::from_secs(5)).await
        {
            trickles.spawn(trickle(stream));
        }
    }
    let opened = watches.len() + trickles.len();
    eprintln!(
        "{opened} slow connections opened in {:?}",
        started.elapsed()
    );
    assert!(
        opened >= 3 * PER_KIND * 9 / 10,
        "only {opened} attackers connected"
    );

    // kube-apiserver meanwhile.
    for seed in 0..LEGIT as u64 {
        let took = Instant::now();
        cluster.checked_exchange(seed, 16 << 10).await;
        let took = took.elapsed();
        assert!(
            took < LEGIT_WITHIN,
            "a legitimate CONNECT took {took:?} during the flood"
        );
    }

    let mut kept = 0;
    let mut latest = Duration::ZERO;
    for watch in watches {
        match within("a watch", limit + Duration::from_secs(5), watch)
            .await
            .expect("watch task")
        {
            Some(after) => latest = latest.max(after),
            None => kept += 1,
        }
    }
    while let Some(t) = trickles.join_next().await {
        match t.expect("trickle task") {
            Some(after) => latest = latest.max(after),
            None => kept += 1,
        }
    }
    eprintln!("every slow connection closed; the last {latest:?} after it started");
    assert_eq!(
        kept, 0,
        "{kept} slow connections outlived the header timeout"
    );
    // And the frontend still serves after the flood.
    cluster.checked_exchange(99, 16 << 10).await;
}
