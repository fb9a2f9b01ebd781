//! Edges behind an HTTP egress proxy (issue 15): tinyproxy from Debian between the node and
//! the load balancer, as IDCs that allow outbound traffic only through a proxy run it. The
//! edge joins, holds its session, renews and carries streams through it; a proxy that
//! refuses (403, authentication required, wrong credentials) is reported with its status
//! line; the proxy password appears in no output; `NO_PROXY` bypasses a proxy that is down.

use std::time::Duration;

use tether_tests::data::{exchange, PeerRequest};
use tether_tests::registration::{JoinedEdge, RegistrationOptions, RegistrationServer};
use tether_tests::targets::ChecksumPeer;
use tether_tests::tinyproxy::{self, ProxyRules, Tinyproxy};
use tether_tests::{poll_until, within, Pki};

const NODE: &str = "idc-proxied-1";
const NODE_IP: &str = "192.0.2.10";
const UP: Duration = Duration::from_secs(15);
/// Bytes each way in the checksummed exchange.
const EXCHANGE_BYTES: u64 = 4 << 20;
/// tinyproxy's `BasicAuth` grammar allows only `[-a-z0-9._]`; the `-` is sent
/// percent-encoded in the URL (`%2D`) to prove the decoding.
const PROXY_USER: &str = "alice";
const PROXY_PASSWORD: &str = "s3cret-pass";
const PROXY_PASSWORD_ENCODED: &str = "s3cret%2Dpass";
const WRONG_PASSWORD: &str = "not-the-pass";

async fn registration_server(
    pki: &Pki,
    port: u16,
    cert_lifetime: &'static str,
) -> RegistrationServer {
    RegistrationServer::start(
        pki,
        &RegistrationOptions {
            cert_lifetime,
            allowed_ports: vec![port],
            log_filter: "debug",
            ..Default::default()
        },
    )
    .await
}

/// A checksummed exchange of [`EXCHANGE_BYTES`] each way through the server's mTLS CONNECT
/// frontend, the edge and on to `peer`.
async fn checksummed_exchange(pki: &Pki, server: &RegistrationServer, peer: &mut ChecksumPeer) {
    let target = format!("{NODE_IP}:{}", peer.addr.port());
    let tunnel =
        tunnel_server::client::connect_tls(server.connect_tcp, pki.frontend_client_tls(), &target)
            .await
            .unwrap_or_else(|e| panic!("CONNECT {target}: {e:#}"));
    let request = PeerRequest {
        seed: 15,
        reply_len: EXCHANGE_BYTES,
        reply_after_eof: false,
    };
    let client = within(
        "the exchange",
        Duration::from_secs(20),
        exchange(tunnel, request, EXCHANGE_BYTES),
    )
    .await
    .expect("exchange through the proxied edge");
    let report = within(
        "the peer's report",
        Duration::from_secs(10),
        peer.next_report(),
    )
    .await;
    report.assert_matches(&target, request, EXCHANGE_BYTES, &client);
}

fn proxy_url(proxy: &Tinyproxy, userinfo: &str) -> String {
    format!("http://{userinfo}{}", proxy.addr)
}

#[tokio::test]
async fn edge_joins_holds_its_session_and_renews_through_tinyproxy() {
    let Some(binary) =
        tinyproxy::binary_or_skip("edge_joins_holds_its_session_and_renews_through_tinyproxy")
    else {
        return;
    };
    let pki = Pki::new();
    let mut peer = ChecksumPeer::start().await;
    let server = registration_server(&pki, peer.addr.port(), "6s").await;
    // The proxy lets CONNECT reach exactly the balancer's two ports, as an IDC's would.
    let proxy = Tinyproxy::start(
        binary,
        &ProxyRules {
            connect_ports: vec![server.registration.port(), server.edge.port()],
            basic_auth: None,
        },
    )
    .await;
    let url = proxy_url(&proxy, "");
    let token = server.create_token(&[]);
    let mut edge = JoinedEdge::new();
    let (ok, output) = edge.join(
        &pki,
        &server,
        &token,
        NODE,
        &[NODE_IP],
        &["--proxy", url.as_str()],
    );
    assert!(ok, "join through the proxy failed: {output}");
    assert_eq!(
        proxy.connects_to(&server.registration.to_string()),
        1,
        "{}",
        proxy.log()
    );

    edge.run_with(
        &server,
        &[peer.addr.port()],
        "info",
        &format!("proxy = \"{url}\""),
        &[],
    );
    server
        .wait_log(&["edge session established", NODE], 1, UP)
        .await;
    assert!(
        proxy.connects_to(&server.edge.to_string()) >= 1,
        "{}",
        proxy.log()
    );
    assert!(
        edge.log()
            .contains(&format!("http://{} (from server.proxy)", proxy.addr)),
        "the edge says how it reaches servers:\n{}",
        edge.log()
    );
    checksummed_exchange(&pki, &server, &mut peer).await;

    // Renewal (at about 4 s of the 6 s lifetime) goes through the proxy too.
    poll_until(
        "a renewal through the proxy",
        UP,
        Duration::from_millis(100),
        || {
            let n = proxy.connects_to(&server.registration.to_string());
            std::future::ready((n >= 2).then_some(()))
        },
    )
    .await;
    server
        .wait_log(&["node certificate renewed", NODE], 1, UP)
        .await;
    // Streams still flow after the renewal.
    checksummed_exchange(&pki, &server, &mut peer).await;
}

#[tokio::test]
async fn proxy_refusing_the_port_is_reported_with_its_status_line() {
    let Some(binary) =
        tinyproxy::binary_or_skip("proxy_refusing_the_port_is_reported_with_its_status_line")
    else {
        return;
    };
    let pki = Pki::new();
    let server = registration_server(&pki, 10250, "1h").await;
    // Only 443 may be reached: the balancer's test ports are refused with 403.
    let proxy = Tinyproxy::start(
        binary,
        &ProxyRules {
            connect_ports: vec![443],
            basic_auth: None,
        },
    )
    .await;
    let token = server.create_token(&[]);
    let mut edge = JoinedEdge::new();
    let url = proxy_url(&proxy, "");
    let (ok, output) = edge.join(
        &pki,
        &server,
        &token,
        NODE,
        &[NODE_IP],
        &["--proxy", url.as_str()],
    );
    assert!(!ok, "join succeeded through a refusing proxy: {output}");
    let expected = format!(
        "proxy {} refused CONNECT to {}: 403 Access violation",
        proxy.addr, server.registration
    );
    assert!(
        output.contains(&expected),
        "want `{expected}` in:\n{output}"
    );

    // Joined directly, the running edge meets the same refusal and says so.
    let (ok, output) = edge.join(&pki, &server, &token, NODE, &[NODE_IP], &[]);
    assert!(ok, "direct join failed: {output}");
    edge.run_with(
        &server,
        &[10250],
        "info",
        "",
        &[("HTTPS_PROXY", url.as_str())],
    );
    let expected = format!(
        "proxy {} refused CONNECT to {}: 403 Access violation",
        proxy.addr, server.edge
    );
    poll_until(
        "the edge to report the refusal",
        UP,
        Duration::from_millis(50),
        || std::future::ready(edge.log().contains(&expected).then_some(())),
    )
    .await;
    assert_eq!(server.log_lines_with(&["edge session established"]), 0);
}

#[tokio::test]
async fn proxy_authentication_failures_are_reported_and_the_password_is_never_logged() {
    let Some(binary) = tinyproxy::binary_or_skip(
        "proxy_authentication_failures_are_reported_and_the_password_is_never_logged",
    ) else {
        return;
    };
    let pki = Pki::new();
    let mut peer = ChecksumPeer::start().await;
    let server = registration_server(&pki, peer.addr.port(), "1h").await;
    let proxy = Tinyproxy::start(
        binary,
        &ProxyRules {
            connect_ports: Vec::new(),
            basic_auth: Some((PROXY_USER.into(), PROXY_PASSWORD.into())),
        },
    )
    .await;
    let token = server.create_token(&[]);
    let mut edge = JoinedEdge::new();
    let refused = |status_line: &str| {
        format!(
            "proxy {} refused CONNECT to {}: {status_line}",
            proxy.addr, server.registration
        )
    };

    // No credentials: 407. Wrong ones: tinyproxy 1.11 answers 401 (not 407).
    let (ok, no_auth) = edge.join(
        &pki,
        &server,
        &token,
        NODE,
        &[NODE_IP],
        &["--proxy", proxy_url(&proxy, "").as_str()],
    );
    assert!(
        !ok && no_auth.contains(&refused("407 Proxy Authentication Required")),
        "{no_auth}"
    );
    let wrong = proxy_url(&proxy, &format!("{PROXY_USER}:{WRONG_PASSWORD}@"));
    let (ok, wrong_auth) = edge.join_with_env(
        &pki,
        &server,
        &token,
        NODE,
        &[NODE_IP],
        &[],
        &[("HTTPS_PROXY", wrong.as_str())],
    );
    assert!(
        !ok && wrong_auth.contains(&refused("401 Unauthorized")),
        "{wrong_auth}"
    );

    // The right credentials, percent-encoded, from the environment: join, run, a stream.
    let right = proxy_url(&proxy, &format!("{PROXY_USER}:{PROXY_PASSWORD_ENCODED}@"));
    let (ok, joined) = edge.join_with_env(
        &pki,
        &server,
        &token,
        NODE,
        &[NODE_IP],
        &[],
        &[("https_proxy", right.as_str())],
    );
    assert!(ok, "join with the right credentials failed: {joined}");
    edge.run_with(
        &server,
        &[peer.addr.port()],
        "trace",
        "",
        &[("HTTPS_PROXY", right.as_str())],
    );
    server
        .wait_log(&["edge session established", NODE], 1, UP)
        .await;
    checksummed_exchange(&pki, &server, &mut peer).await;
    assert!(
        proxy.connects_to(&server.edge.to_string()) >= 1,
        "{}",
        proxy.log()
    );

    // TESTPLAN 19: no form of either password in any output, at trace level.
    let basic = |password: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{PROXY_USER}:{password}"))
    };
    let edge_log = edge.log();
    assert!(
        edge_log.contains("TRACE"),
        "the edge did not log at trace level"
    );
    assert!(edge_log.contains("basic auth"), "{edge_log}");
    for (what, text) in [
        ("join without credentials", &no_auth),
        ("join with wrong credentials", &wrong_auth),
        ("join", &joined),
        ("edge log", &edge_log),
    ] {
        for secret in [
            PROXY_PASSWORD.to_owned(),
            PROXY_PASSWORD_ENCODED.to_owned(),
            WRONG_PASSWORD.to_owned(),
            basic(PROXY_PASSWORD),
            basic(WRONG_PASSWORD),
        ] {
            assert!(!text.contains(&secret), "`{secret}` in the {what}:\n{text}");
        }
    }
}

#[tokio::test]
async fn no_proxy_bypasses_a_proxy_that_is_down() {
    let pki = Pki::new();
    let server = registration_server(&pki, 10250, "1h").await;
    // A port nothing listens on: the proxy is down.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a free port");
    let proxy = format!("http://{dead}");
    let token = server.create_token(&[]);
    let mut edge = JoinedEdge::new();

    // Without NO_PROXY the edge really uses the proxy, and says which one failed.
    let (ok, output) = edge.join_with_env(
        &pki,
        &server,
        &token,
        NODE,
        &[NODE_IP],
        &[],
        &[("HTTPS_PROXY", proxy.as_str())],
    );
    assert!(!ok, "join succeeded through a dead proxy: {output}");
    assert!(
        output.contains(&format!(
            "connect to proxy {dead} (for {})",
            server.registration
        )),
        "{output}"
    );

    // NO_PROXY (an address, or a CIDR) sends both join and sessions direct.
    let (ok, output) = edge.join_with_env(
        &pki,
        &server,
        &token,
        NODE,
        &[NODE_IP],
        &["--proxy", proxy.as_str()],
        &[("NO_PROXY", "example.com,127.0.0.1")],
    );
    assert!(ok, "join with NO_PROXY failed: {output}");
    edge.run_with(
        &server,
        &[10250],
        "info",
        "",
        &[("HTTPS_PROXY", proxy.as_str()), ("no_proxy", "127.0.0.0/8")],
    );
    server
        .wait_log(&["edge session established", NODE], 1, UP)
        .await;
}
