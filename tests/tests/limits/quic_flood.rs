//! TESTPLAN 14, QUIC Initial flood: thousands of valid QUIC Initial packets from many
//! unvalidated sources (127.0.0.x, a fresh port each) that never answer a Retry, as a
//! spoofing attacker cannot. Past `quic_retry_above` handshakes in progress the server
//! answers each with a stateless Retry, so its memory stays flat, and a real edge still
//! connects (it answers the Retry and is validated).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_tests::edge::Transport;
use tether_tests::flood::source;
use tether_tests::frontend::{admin_get, metric};
use tether_tests::{within, EdgeOptions, EdgeProc, Pki, ServerOptions, ServerProc, NODE, NODE_IP};
use tokio::net::UdpSocket;

/// Distinct Initial packets (distinct connection IDs) in the flood.
const INITIALS: usize = 3000;
/// `edge.quic_retry_above` in this test.
const RETRY_ABOVE: usize = 16;

/// VmRSS of `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// `n` valid client Initial datagrams with distinct connection IDs, captured from a real
/// QUIC client that dials a socket playing a silent server.
async fn capture_initials(n: usize) -> Vec<Vec<u8>> {
    let sink = UdpSocket::bind("127.0.0.1:0").await.expect("bind sink");
    let sink_addr = sink.local_addr().expect("sink address");
    let mut tls = rustls::ClientConfig::builder_with_provider(tunnel_io::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.alpn_protocols = vec![tunnel_io::tls::ALPN_QUIC_SESSION.to_vec()];
    let crypto = tunnel_io::quic_bridge::client_crypto(tls).expect("QUIC crypto");
    let config = quinn::ClientConfig::new(crypto);
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("endpoint");
    let mut seen = HashSet::new();
    let mut initials = Vec::with_capacity(n);
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(60);
    while initials.len() < n && Instant::now() < deadline {
        for _ in 0..64 {
            pending.push(
                client
                    .connect_with(config.clone(), sink_addr, "localhost")
                    .expect("connect"),
            );
        }
        while let Ok(Ok((len, _))) =
            tokio::time::timeout(Duration::from_millis(50), sink.recv_from(&mut buf)).await
        {
            // Long header, Initial type; the destination connection ID tells packets apart.
            let (first, dcid_len) = (buf[0], buf[5] as usize);
            if first & 0xf0 == 0xc0 && seen.insert(buf[6..6 + dcid_len].to_vec()) {
                initials.push(buf[..len].to_vec());
            }
        }
        pending.clear();
    }
    assert!(initials.len() >= n, "captured {} initials", initials.len());
    initials.truncate(n);
    initials
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testplan_14_quic_initial_flood_from_unvalidated_sources_gets_retry_and_keeps_memory_flat()
{
    let pki = Pki::new();
    let server = ServerProc::start(
        &pki,
        &ServerOptions {
            edge_extra: format!("quic_retry_above = {RETRY_ABOVE}\n"),
            ..Default::default()
        },
    )
    .await;
    let quic = server.addrs.edge_quic.expect("a QUIC listener");
    let initials = Arc::new(capture_initials(INITIALS).await);
    let before = rss_kib(server.pid());

    // The flood: every Initial from its own socket, spread over 200 source addresses.
    let started = Instant::now();
    let senders: Vec<_> = (0..8usize)
        .map(|part| {
            let initials = initials.clone();
            tokio::spawn(async move {
                for (i, packet) in initials.iter().enumerate().filter(|(i, _)| i % 8 == part) {
                    let from = source(2 + (i % 200) as u8);
                    let Ok(socket) = UdpSocket::bind((from, 0)).await else {
                        continue;
                    };
                    let _ = socket.send_to(packet, quic).await;
                    // About 8000 packets a second in all: a flood the server's socket
                    // buffer takes in, so every packet reaches the listener's logic.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    for sender in senders {
        within("the flood", Duration::from_secs(60), sender)
            .await
            .expect("flood task");
    }
    let flood_took = started.elapsed();

    // A real edge connects meanwhile: it answers the Retry.
    let _edge = EdgeProc::start_tuned(
        &pki,
        &[server.addrs.edge],
        &EdgeOptions {
            files: pki.issue_edge(NODE, &[NODE_IP]),
            allow_ports: vec![],
        },
        &Transport::Quic.tuning(),
    );
    server.wait_for_edge_session(NODE).await;
    assert_eq!(server.edge_transport(NODE).as_deref(), Some("quic"));

    let after = rss_kib(server.pid());
    let (status, body) = admin_get(server.addrs.admin, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200);
    let retries =
        metric(&body, "tether_edge_handshakes_total{result=\"quic_retry\"}").unwrap_or_default();
    for line in body
        .lines()
        .filter(|l| l.starts_with("tether_edge_handshakes_total"))
    {
        println!("{line}");
    }
    println!(
        "{INITIALS} Initials in {flood_took:?}: {retries} Retry answers; server RSS {before} KiB \
         before, {after} KiB after (+{} KiB)",
        after.saturating_sub(before)
    );
    assert!(
        retries >= (INITIALS - RETRY_ABOVE) as f64 * 0.9,
        "only {retries} of {INITIALS} Initials got a Retry"
    );
    assert!(
        after.saturating_sub(before) < 32 << 10,
        "server RSS grew from {before} KiB to {after} KiB"
    );
}
