//! Accept loop robustness (TESTPLAN 12): garbage instead of TLS, connections reset in the
//! middle of a TLS handshake, and a server out of file descriptors. After each, the edge
//! listener and the CONNECT frontend still accept, a real edge still gets a session, a real
//! CONNECT still goes through, and the server neither exits nor panics. Descriptor
//! exhaustion is real: the running server's RLIMIT_NOFILE is lowered with `prlimit(1)`
//! (util-linux) to a few above what it holds, then more connections arrive than fit.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tether_tests::flood::{self, source};
use tether_tests::process::open_fds;
use tether_tests::targets::EchoServer;
use tether_tests::{
    poll_until, within, EdgeOptions, EdgeProc, Pki, ServerOptions, ServerProc, NODE, NODE_IP,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections per kind of garbage, per listener.
const GARBAGE_CONNECTIONS: usize = 50;
/// Descriptors left to the server above what it holds when the limit is lowered: fewer than
/// the flood below, more than one edge session and one CONNECT need afterwards.
const FD_HEADROOM: usize = 24;
/// Silent connections opened while the server is at its limit, from each of two sources
/// (under the per-source handshake cap of 64, so the cap is not what stops them).
const EXHAUSTION_CONNECTIONS_PER_SOURCE: usize = 40;
/// The server's log line for an accept error (io/src/accept.rs).
const ACCEPT_FAILED: &str = "accept failed; backing off";

/// The start of a TLS 1.2/1.3 ClientHello record: content type 22, a length that promises
/// more than follows.
const PARTIAL_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5a, 0x5a, 0x5a, 0x5a,
];

/// Garbage of several kinds: plain HTTP, a PROXY line nobody asked for, a TLS record header
/// with an absurd length, and bytes that are nothing at all.
fn garbage(i: usize) -> Vec<u8> {
    match i % 4 {
        0 => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        1 => b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
        2 => vec![0x16, 0x03, 0x03, 0xff, 0xff, 0x01],
        _ => (0..64u8)
            .map(|b| b.wrapping_mul(37).wrapping_add(i as u8))
            .collect(),
    }
}

/// Send `bytes` on a fresh connection to `listener` and wait for the server to close it.
async fn garbage_is_closed(listener: SocketAddr, bytes: Vec<u8>) -> Option<Duration> {
    let mut tcp = TcpStream::connect(listener).await.ok()?;
    let _ = tcp.write_all(&bytes).await;
    flood::closed_within(&mut tcp, Duration::from_secs(8)).await
}

/// A connection reset (RST, via SO_LINGER 0) after a partial ClientHello.
async fn reset_mid_handshake(listener: SocketAddr) {
    if let Ok(mut tcp) = TcpStream::connect(listener).await {
        let _ = tcp.write_all(PARTIAL_CLIENT_HELLO).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = tcp.set_zero_linger();
        drop(tcp);
    }
}

/// A CONNECT through the mTLS frontend to the echo target and a round trip.
async fn connect_roundtrip(pki: &Pki, server: &ServerProc, port: u16) {
    let mut tunnel = within(
        "a CONNECT",
        Duration::from_secs(10),
        tunnel_server::client::connect_tls(
            server.addrs.connect_tcp,
            pki.frontend_client_tls(),
            &format!("{NODE_IP}:{port}"),
        ),
    )
    .await
    .expect("CONNECT through the frontend");
    tunnel.write_all(b"still accepting").await.expect("write");
    let mut back = [0u8; 15];
    within(
        "the echo",
        Duration::from_secs(5),
        tunnel.read_exact(&mut back),
    )
    .await
    .expect("echo");
    assert_eq!(&back, b"still accepting");
}

/// Set the soft and hard open-file limit of process `pid`.
fn set_nofile(pid: u32, limit: usize) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .expect("run prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn testplan_12_accept_loop_survives_garbage_resets_mid_handshake_and_descriptor_exhaustion() {
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let mut server = ServerProc::start(
        &pki,
        &ServerOptions {
            allowed_ports: vec![echo.addr.port()],
            ..ServerOptions::default()
        },
    )
    .await;
    let _edge = EdgeProc::start(
        &pki,
        server.addrs.edge,
        &EdgeOptions {
            files: pki.issue_edge(NODE, &[NODE_IP]),
            allow_ports: vec![echo.addr.port()],
        },
    );
    server.wait_for_edge_session(NODE).await;
    connect_roundtrip(&pki, &server, echo.addr.port()).await;
    let listeners = [server.addrs.edge, server.addrs.connect_tcp];

    // Garbage instead of TLS: every connection is closed, none is kept.
    for listener in listeners {
        let mut closes = tokio::task::JoinSet::new();
        for i in 0..GARBAGE_CONNECTIONS {
            closes.spawn(garbage_is_closed(listener, garbage(i)));
        }
        while let Some(closed) = closes.join_next().await {
            assert!(
                closed.expect("garbage task").is_some(),
                "a garbage connection to {listener} was kept open"
            );
        }
    }
    connect_roundtrip(&pki, &server, echo.addr.port()).await;

    // Resets in the middle of the handshake.
    for listener in listeners {
        let mut resets = tokio::task::JoinSet::new();
        for _ in 0..GARBAGE_CONNECTIONS {
            resets.spawn(reset_mid_handshake(listener));
        }
        while resets.join_next().await.is_some() {}
    }
    connect_roundtrip(&pki, &server, echo.addr.port()).await;

    // Descriptor exhaustion: lower the limit to a little above what the server holds, then
    // open more silent connections than fit.
    let pid = server.pid();
    let held = open_fds(pid);
    set_nofile(pid, held + FD_HEADROOM);
    let mut silent = Vec::new();
    for last in [2u8, 3] {
        for _ in 0..EXHAUSTION_CONNECTIONS_PER_SOURCE {
            if let Ok(tcp) = flood::connect_from(source(last), server.addrs.edge).await {
                silent.push(tcp);
            }
        }
    }
    // Plus the frontend, which shares the process's descriptors.
    for _ in 0..FD_HEADROOM {
        if let Ok(tcp) = TcpStream::connect(server.addrs.connect_tcp).await {
            silent.push(tcp);
        }
    }
    poll_until(
        "the server to run out of descriptors",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || std::future::ready(server.log().contains(ACCEPT_FAILED).then_some(())),
    )
    .await;
    let at_limit = open_fds(pid);
    eprintln!(
        "server held {held} descriptors, limit set to {}, {at_limit} open during the flood \
         of {} connections",
        held + FD_HEADROOM,
        silent.len()
    );
    // The flood leaves: the backlog drains, and the listeners come back on their own.
    drop(silent);
    let b = pki.issue_edge("edge-b", &["192.0.2.20".parse().expect("ip")]);
    let _edge_b = EdgeProc::start(
        &pki,
        server.addrs.edge,
        &EdgeOptions {
            files: b,
            allow_ports: vec![echo.addr.port()],
        },
    );
    server.wait_for_edge_session("edge-b").await;
    connect_roundtrip(&pki, &server, echo.addr.port()).await;

    assert!(server.exited().is_none(), "the server exited");
    let log = server.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}
