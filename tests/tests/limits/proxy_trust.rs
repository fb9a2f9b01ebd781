//! PROXY headers trusted from anyone (issue 11 point 11): any client could claim any source
//! address (and so dodge per-source caps and lockouts, or frame another address). Now a
//! header is believed only from `proxy_protocol_from` (here 127.0.0.1, where haproxy would
//! connect from); from elsewhere a header refuses the connection, and a plain TLS connection
//! is served under its own address.

use std::net::IpAddr;
use std::time::Duration;

use tether_tests::flood::source;
use tether_tests::raw_edge::RawEdge;
use tether_tests::registration::{RegistrationOptions, RegistrationServer};
use tether_tests::server::log_field;
use tether_tests::{flood, Pki, ServerOptions, ServerProc};
use tokio::io::AsyncWriteExt;

const SPOOFED: &[u8] = b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 9000\r\n";

/// Establish a raw edge session and wait until the server routes it.
async fn session(edge: &mut RawEdge, server: &ServerProc, node: &str) {
    let stream = edge.next_request().await.expect("session-info request");
    edge.answer_ok(stream).await.expect("confirm");
    server.wait_for_edge_session(node).await;
}

/// The peer the server logged for `node`'s established session.
fn logged_peer(server: &ServerProc, node: &str) -> String {
    server
        .established_lines()
        .iter()
        .find(|l| l.contains(node))
        .and_then(|l| log_field(l, "peer"))
        .unwrap_or_else(|| panic!("no established line for {node}: {}", server.log()))
}

#[tokio::test]
async fn proxy_header_spoofing_from_outside_the_balancer_networks() {
    let pki = Pki::new();
    let server = ServerProc::start(
        &pki,
        &ServerOptions {
            proxy_protocol: true,
            ..Default::default()
        },
    )
    .await;
    let ip = |last| [IpAddr::from([192, 0, 2, last])];

    // From the balancer (127.0.0.1) the header is taken.
    let mut via_balancer = RawEdge::connect_from(
        &pki,
        server.addrs.edge,
        "via-balancer",
        &ip(21),
        source(1),
        b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 9000\r\n",
    )
    .await
    .expect("session through the balancer");
    session(&mut via_balancer, &server, "via-balancer").await;
    assert_eq!(logged_peer(&server, "via-balancer"), "198.51.100.7:40000");

    // From 127.0.0.2 a header is refused, and audited.
    let spoofed = RawEdge::connect_from(
        &pki,
        server.addrs.edge,
        "spoofer",
        &ip(22),
        source(2),
        SPOOFED,
    )
    .await;
    assert!(spoofed.is_err(), "a spoofed PROXY header got a session");
    tether_tests::poll_until(
        "the refusal in the audit log",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let log = server.log();
            std::future::ready(
                log.lines()
                    .any(|l| l.contains("edge_refused") && l.contains("proxy_protocol_from"))
                    .then_some(()),
            )
        },
    )
    .await;
    assert!(
        !server.log().contains("203.0.113.9"),
        "the spoofed address was never used"
    );

    // From 127.0.0.2 without a header: served under its own address.
    let mut direct =
        RawEdge::connect_from(&pki, server.addrs.edge, "direct", &ip(23), source(2), b"")
            .await
            .expect("direct session");
    session(&mut direct, &server, "direct").await;
    assert!(
        logged_peer(&server, "direct").starts_with("127.0.0.2:"),
        "{}",
        logged_peer(&server, "direct")
    );
}

#[tokio::test]
async fn proxy_header_spoofing_at_the_registration_listener() {
    let pki = Pki::new();
    let server = RegistrationServer::start(
        &pki,
        &RegistrationOptions {
            proxy_protocol: true,
            ..Default::default()
        },
    )
    .await;
    let mut tcp = flood::connect_from(source(2), server.registration)
        .await
        .expect("connect");
    tcp.write_all(SPOOFED).await.expect("write header");
    let closed = flood::closed_within(&mut tcp, Duration::from_secs(5)).await;
    assert!(
        closed.is_some(),
        "the connection with a spoofed header was closed"
    );
    server
        .wait_log(
            &["registration refused", "proxy_protocol_from"],
            1,
            Duration::from_secs(5),
        )
        .await;
}
