//! Edge listener starvation (issue 11 point 6): raw TCP connections that never speak, reopened
//! as soon as dropped, used to hold every handshake slot, so a real edge needed 20 s and 8
//! attempts to connect. Now a connection must send its first byte within
//! `first_byte_timeout`, and one source holds at most `max_handshakes_per_source` slots.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_tests::flood::{self, source};
use tether_tests::{EdgeOptions, EdgeProc, Pki, ServerOptions, ServerProc, NODE, NODE_IP};
use tokio_util::sync::CancellationToken;

/// `edge.max_handshakes` in this test.
const SLOTS: usize = 64;
/// `edge.max_handshakes_per_source` in this test.
const PER_SOURCE: usize = 8;
/// `edge.first_byte_timeout` in this test.
const FIRST_BYTE: Duration = Duration::from_secs(1);

/// Keep one silent connection to `server` open from `from`, reopening it as soon as the
/// server drops it, until `stop` (at most `MAX_REOPENS` times). Records how long the server
/// kept each one in `longest_ms`.
async fn silent_holder(
    from: std::net::IpAddr,
    server: std::net::SocketAddr,
    stop: CancellationToken,
    opened: Arc<AtomicUsize>,
    longest_ms: Arc<AtomicUsize>,
) {
    const MAX_REOPENS: usize = 100;
    for _ in 0..MAX_REOPENS {
        let Ok(mut tcp) = flood::connect_from(from, server).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        opened.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = stop.cancelled() => return,
            held = flood::closed_within(&mut tcp, Duration::from_secs(10)) => {
                let held = held.unwrap_or(Duration::from_secs(10));
                longest_ms.fetch_max(held.as_millis() as usize, Ordering::Relaxed);
            }
        }
    }
}

#[tokio::test]
async fn testplan_11_edge_handshake_slots_held_by_silent_tcp_connections() {
    let pki = Pki::new();
    let server = ServerProc::start(
        &pki,
        &ServerOptions {
            edge_extra: format!(
                "max_handshakes = {SLOTS}\nmax_handshakes_per_source = {PER_SOURCE}\n\
                 first_byte_timeout = \"{}ms\"\n",
                FIRST_BYTE.as_millis()
            ),
            ..Default::default()
        },
    )
    .await;
    let stop = CancellationToken::new();
    let opened = Arc::new(AtomicUsize::new(0));
    let longest_ms = Arc::new(AtomicUsize::new(0));
    let mut holders = tokio::task::JoinSet::new();
    let mut spawn = |last: u8, n: usize| {
        for _ in 0..n {
            holders.spawn(silent_holder(
                source(last),
                server.addrs.edge,
                stop.clone(),
                opened.clone(),
                longest_ms.clone(),
            ));
        }
    };
    // One source: every slot and 200 more. Six more sources: their share each (48 < 64).
    spawn(2, SLOTS + 200);
    for last in 3..=8 {
        spawn(last, PER_SOURCE);
    }
    // Let the flood settle past its first deadline.
    tokio::time::sleep(FIRST_BYTE + Duration::from_millis(500)).await;
    let flood_connections = opened.load(Ordering::Relaxed);
    assert!(
        flood_connections > SLOTS + 200 + 48,
        "the flood reopened its dropped connections ({flood_connections} opened)"
    );

    let started = Instant::now();
    let _edge = EdgeProc::start(
        &pki,
        server.addrs.edge,
        &EdgeOptions {
            files: pki.issue_edge(NODE, &[NODE_IP]),
            allow_ports: vec![10250],
        },
    );
    server.wait_for_edge_session(NODE).await;
    let took = started.elapsed();
    stop.cancel();
    while holders.join_next().await.is_some() {}
    let longest = Duration::from_millis(longest_ms.load(Ordering::Relaxed) as u64);
    eprintln!(
        "edge session up {took:?} into a flood of {} silent connections; longest held {longest:?}",
        opened.load(Ordering::Relaxed)
    );
    assert!(
        took < Duration::from_secs(3),
        "the edge needed {took:?} to connect during the flood"
    );
    assert!(
        longest <= FIRST_BYTE + Duration::from_millis(700),
        "a silent connection was held {longest:?}, past its first-byte deadline"
    );
}
