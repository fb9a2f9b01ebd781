//! Destination restriction (TESTPLAN 16), checked twice and independently: the server's
//! policy refuses odd spellings of forbidden addresses before any stream opens, and the
//! real edge's allowlist refuses the same targets when a server lets them through. The
//! second half needs a server that does let them through: a permissive stand-in below that
//! speaks the session protocol (TLS with the server certificate, reverse HTTP/2, session
//! info) and opens whatever CONNECT stream the test asks for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::stream::{REASON_HEADER, SERVER_COUNT_HEADER, SERVER_ID_HEADER, SESSION_INFO_URI};
use tether_tests::{within, Cluster, ClusterOptions, EdgeOptions, EdgeProc, Pki, NODE, NODE_IP};
use tokio::net::TcpListener;

/// Spellings of loopback, metadata and link-local addresses that resolvers or URL parsers
/// have been known to accept: octal, hex, a single integer, short forms, zero padding,
/// IPv4-mapped and IPv4-compatible IPv6, a trailing dot. `{p}` is an allowed port.
const ODD_SPELLINGS: &[&str] = &[
    "0177.0.0.1:{p}",
    "0x7f.0.0.1:{p}",
    "0x7f000001:{p}",
    "2130706433:{p}",
    "127.1:{p}",
    "127.000.000.001:{p}",
    "0251.0376.0251.0376:{p}",
    "0xa9.0xfe.0xa9.0xfe:{p}",
    "2852039166:{p}",
    "169.254.169.254.:{p}",
    "169.254.169.254:{p}",
    "[::ffff:169.254.169.254]:{p}",
    "[::ffff:a9fe:a9fe]:{p}",
    "[::ffff:127.0.0.1]:{p}",
    "[::169.254.169.254]:{p}",
    "[0:0:0:0:0:ffff:7f00:1]:{p}",
    "[::1]:{p}",
    "[fe80::1]:{p}",
    "[fd00:ec2::254]:{p}",
    "edge-a.:{p}",
    "127.0.0.1:{p}",
    "0.0.0.0:{p}",
];

fn spell(template: &str, port: u16) -> String {
    template.replace("{p}", &port.to_string())
}

#[tokio::test]
async fn testplan_16_ssrf_odd_address_spellings_are_refused_by_the_server_before_any_stream() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let port = cluster.kubelet.addr.port();
    for template in ODD_SPELLINGS {
        let target = spell(template, port);
        let answer = cluster.connect_answer(&target).await;
        // 403: a well-formed target the policy forbids; 400: a spelling the strict parser
        // will not guess at (a name that is only digits, hex, octal, a trailing dot).
        assert!(
            answer.status == 403 || answer.status == 400,
            "{target} was not refused by the server: {answer:?}"
        );
        assert!(
            !answer.body.contains("refused by edge"),
            "the server itself must refuse {target}: {answer:?}"
        );
    }
    // A name the server routes (ours, spelled exactly) still works: the refusals above are
    // about the spellings, not a broken tunnel.
    let ok = cluster.connect_answer(&format!("{NODE}:{port}")).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let edge_log = cluster.edge.log();
    for template in ODD_SPELLINGS {
        let target = spell(template, port);
        assert!(
            !edge_log.contains(&format!("dest={target}")),
            "a stream for {target} reached the edge:\n{edge_log}"
        );
    }
}

/// A stand-in server that lets every target through: one edge session, CONNECT streams on
/// demand. Only the test drives it; it never checks a policy.
struct PermissiveServer {
    sender: h2::client::SendRequest<Bytes>,
}

impl PermissiveServer {
    /// Accept one edge on `listener`, run the HTTP/2 client side and confirm the session.
    async fn accept(pki: &Pki, listener: &TcpListener) -> PermissiveServer {
        let config = tunnel_io::tls::server_config_mtls(
            &pki.layout.server_cert(),
            &pki.layout.server_key(),
            &pki.layout.ca_cert(),
            &[tunnel_io::tls::ALPN_EDGE_SESSION],
        )
        .expect("stand-in server TLS config");
        let (tcp, _) = listener.accept().await.expect("the edge connects");
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(config))
            .accept(tcp)
            .await
            .expect("TLS with the edge");
        let (sender, connection) = h2::client::handshake(tls)
            .await
            .expect("HTTP/2 with the edge");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut server = PermissiveServer { sender };
        let info = http::Request::builder()
            .method(http::Method::POST)
            .uri(SESSION_INFO_URI)
            .header(SERVER_ID_HEADER, "permissive")
            .header(SERVER_COUNT_HEADER, "1")
            .body(())
            .expect("session-info request");
        let (status, _) = server.send(info).await;
        assert_eq!(status, 200, "the edge confirms the session");
        server
    }

    /// Send `request` with no body; the answer's status and reason header.
    async fn send(&mut self, request: http::Request<()>) -> (u16, String) {
        let mut sender = self.sender.clone().ready().await.expect("session ready");
        let (response, _body) = sender.send_request(request, false).expect("open a stream");
        let response = within("the edge's answer", Duration::from_secs(10), response)
            .await
            .expect("an answer on the stream");
        let reason = response
            .headers()
            .get(REASON_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (response.status().as_u16(), reason)
    }

    /// Open a CONNECT stream to `authority`, as the real server does after its policy.
    async fn connect(&mut self, authority: &str) -> (u16, String) {
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .header(protocol::stream::CLIENT_HEADER, "ssrf-test")
            .body(())
            .unwrap_or_else(|e| panic!("CONNECT {authority}: {e}"));
        self.send(request).await
    }
}

#[tokio::test]
async fn testplan_16_ssrf_the_edge_allowlist_stops_what_a_permissive_server_lets_through() {
    let pki = Pki::new();
    // The node's kubelet port (allowed) and another loopback port (not allowed): the edge
    // dials its own node at 127.0.0.1 (`dial.self_host` of the test edges).
    let kubelet = TcpListener::bind("127.0.0.1:0").await.expect("kubelet");
    let other = TcpListener::bind("127.0.0.1:0").await.expect("other port");
    let (kubelet_port, other_port) = (
        kubelet.local_addr().expect("addr").port(),
        other.local_addr().expect("addr").port(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("server");
    let server_addr: SocketAddr = listener.local_addr().expect("addr");
    let edge = EdgeProc::start(
        &pki,
        server_addr,
        &EdgeOptions {
            files: pki.issue_edge(NODE, &[NODE_IP]),
            allow_ports: vec![kubelet_port],
        },
    );
    let mut server = within(
        "the edge's session",
        Duration::from_secs(15),
        PermissiveServer::accept(&pki, &listener),
    )
    .await;

    // The control: the stand-in's streams work, so the refusals below are the edge's.
    let (status, reason) = server.connect(&format!("{NODE_IP}:{kubelet_port}")).await;
    assert_eq!(status, 200, "the kubelet port on the node: {reason}");
    within(
        "the kubelet's connection",
        Duration::from_secs(5),
        kubelet.accept(),
    )
    .await
    .expect("the edge dialed the kubelet");

    let mut refused = vec![
        // Another node's IP and another node's name, on an allowed port.
        format!("192.0.2.20:{kubelet_port}"),
        format!("edge-b:{kubelet_port}"),
        // Other ports on this node, by IP, by name and on loopback.
        format!("{NODE_IP}:{other_port}"),
        format!("{NODE}:{other_port}"),
        format!("127.0.0.1:{other_port}"),
        // Loopback addresses other than the canonical one, metadata, link-local.
        format!("127.0.0.2:{kubelet_port}"),
        format!("169.254.169.254:{kubelet_port}"),
        "169.254.169.254:80".to_string(),
        format!("[fe80::1]:{kubelet_port}"),
        // A name that means loopback to a resolver; the edge never resolves names.
        format!("localhost:{kubelet_port}"),
    ];
    refused.extend(ODD_SPELLINGS.iter().map(|t| spell(t, other_port)));
    for target in &refused {
        let (status, reason) = server.connect(target).await;
        assert_eq!(status, 403, "the edge let {target} through: {reason}");
        assert!(!reason.is_empty(), "{target}: the refusal says why");
    }
    // Nothing reached the other port, whatever the spelling.
    let leaked = tokio::time::timeout(Duration::from_millis(300), other.accept()).await;
    assert!(
        leaked.is_err(),
        "the edge dialed a port outside its allowlist"
    );
    // The edge audits its refusals and keeps serving.
    assert!(edge.log().contains("edge refused dial"), "{}", edge.log());
    let (status, reason) = server.connect(&format!("{NODE_IP}:{kubelet_port}")).await;
    assert_eq!(status, 200, "{reason}");
}
