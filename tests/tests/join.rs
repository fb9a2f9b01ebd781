//! Join and registration end to end: real `tunnel-server` and `tunnel-edge` processes, the
//! operator's `token`/`node` commands, real TLS. Token → certificate → session → CONNECT;
//! renewal under an open stream; one generic error for every bad token; brute-force lockout;
//! revocation; identity hijack (TESTPLAN 15, 17, 19).

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use tether_tests::haproxy::{self, Haproxy};
use tether_tests::registration::{JoinedEdge, RegistrationOptions, RegistrationServer};
use tether_tests::targets::EchoServer;
use tether_tests::{poll_until, within, Pki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_io::registration::pb::{JoinRequest, RenewRequest};

const NODE: &str = "idc-node-1";
const NODE_IP: &str = "192.0.2.10";
const REFUSED: &str = "registration refused";
const UP: Duration = Duration::from_secs(15);

async fn roundtrip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    message: &[u8],
) {
    stream.write_all(message).await.expect("write");
    let mut back = vec![0u8; message.len()];
    within("echo", Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .expect("read echo");
    assert_eq!(back, message);
}

async fn connect(
    pki: &Pki,
    server: &RegistrationServer,
    port: u16,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    tunnel_server::client::connect_tls(
        server.connect_tcp,
        pki.frontend_client_tls(),
        &format!("{NODE_IP}:{port}"),
    )
    .await
}

fn secret_of(token: &str) -> &str {
    token.split_once('.').expect("id.secret").1
}

async fn join_raw(
    pki: &Pki,
    server: &RegistrationServer,
    request: JoinRequest,
) -> Result<tunnel_io::registration::pb::Credentials, (tonic::Code, String)> {
    join_at(pki, server.registration, request)
        .await
        .expect("registration API reachable")
}

/// One Join call to `address` (the registration listener, or a balancer in front of it).
async fn join_at(
    pki: &Pki,
    address: std::net::SocketAddr,
    request: JoinRequest,
) -> anyhow::Result<Result<tunnel_io::registration::pb::Credentials, (tonic::Code, String)>> {
    let answer = tunnel_edge::join::call_join(
        &address.to_string(),
        "127.0.0.1",
        &pki.layout.ca_cert(),
        request,
    )
    .await?;
    Ok(answer.map_err(|s| (s.code(), s.message().to_owned())))
}

fn request(token: &str, node: &str) -> JoinRequest {
    request_with_ips(token, node, &[])
}

/// A Join request claiming `ips` (in the request and in the CSR alike).
fn request_with_ips(token: &str, node: &str, ips: &[&str]) -> JoinRequest {
    let parsed: Vec<std::net::IpAddr> = ips.iter().map(|ip| ip.parse().expect("ip")).collect();
    let (_, csr_der) = tunnel_edge::join::new_csr(node, &parsed).expect("csr");
    JoinRequest {
        token: token.to_owned(),
        node_name: node.to_owned(),
        node_ips: ips.iter().map(|ip| ip.to_string()).collect(),
        csr_der,
    }
}

#[tokio::test]
async fn join_connect_and_renewal_under_an_open_stream_with_no_secret_in_trace_logs() {
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let port = echo.addr.port();
    let server = RegistrationServer::start(
        &pki,
        &RegistrationOptions {
            cert_lifetime: "6s",
            allowed_ports: vec![port],
            log_filter: "trace",
            ..Default::default()
        },
    )
    .await;
    let token = server.create_token(&[
        "--pool",
        "idc",
        "--label",
        "tier=edge",
        "--taint",
        "edge=true:NoSchedule",
        "--usage-limit",
        "1",
    ]);
    let mut edge = JoinedEdge::new();
    let (ok, output) = edge.join(&pki, &server, &token, NODE, &[NODE_IP], &[]);
    assert!(ok, "join failed: {output}");
    let key_mode = std::fs::metadata(edge.state.join("key.pem"))
        .expect("key written")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let kubelet_env = std::fs::read_to_string(edge.state.join("kubelet.env")).expect("env");
    assert!(
        kubelet_env.contains("--node-labels=tier=edge"),
        "{kubelet_env}"
    );
    assert!(
        kubelet_env.contains("edge=true:NoSchedule"),
        "{kubelet_env}"
    );
    // Joining again with the same identity is a no-op, not a second use of the token.
    let (ok, again) = edge.join(&pki, &server, &token, NODE, &[NODE_IP], &[]);
    assert!(ok && again.contains("already joined"), "{again}");

    edge.run(&server, &[port], "trace");
    server
        .wait_log(&["edge session established", NODE], 1, UP)
        .await;
    let mut stream = connect(&pki, &server, port).await.expect("CONNECT");
    roundtrip(&mut stream, b"before renewal").await;

    let before = std::fs::read(edge.state.join("cert.pem")).expect("cert");
    poll_until(
        "the edge to renew its certificate",
        UP,
        Duration::from_millis(100),
        || {
            let now = std::fs::read(edge.state.join("cert.pem")).unwrap_or_default();
            std::future::ready((!now.is_empty() && now != before).then_some(()))
        },
    )
    .await;
    server
        .wait_log(&["node certificate renewed", NODE], 1, UP)
        .await;
    // Renewal keeps the identity and makes the new certificate the node's current one.
    let renewed = std::fs::read_to_string(edge.state.join("cert.pem")).expect("cert");
    let renewed = tunnel_server::pki::certificate_facts_pem(&renewed).expect("facts");
    let registry = std::fs::read_to_string(server.dir().join("tokens.json.identities.json"))
        .expect("identity registry");
    let registry: serde_json::Value = serde_json::from_str(&registry).expect("json");
    let entry = &registry["nodes"][NODE];
    // (or its predecessor, if the 6 s certificate was renewed once more meanwhile)
    assert!(
        entry["serial"] == renewed.serial.as_str()
            || entry["previous_serial"] == renewed.serial.as_str(),
        "{registry}"
    );
    assert_eq!(entry["ips"], serde_json::json!([NODE_IP]), "{registry}");
    // The open stream kept flowing across the renewal; a new one works too.
    roundtrip(&mut stream, b"after renewal, same stream").await;
    let mut fresh = connect(&pki, &server, port).await.expect("CONNECT after");
    roundtrip(&mut fresh, b"new stream").await;

    // TESTPLAN 19: the secret appears in no log at any level, nor in the join output.
    let secret = secret_of(&token);
    assert!(!server.log().contains(secret), "secret in the server log");
    assert!(!edge.log().contains(secret), "secret in the edge log");
    assert!(!output.contains(secret), "secret in the join output");
    assert!(
        server.log().contains("TRACE"),
        "logs were not at trace level"
    );
    let tokens = std::fs::read_to_string(server.dir().join("tokens.json")).expect("tokens");
    assert!(!tokens.contains(secret), "secret stored in clear");
    let listed = server.admin(&["token", "list"]);
    assert!(
        !listed.contains(secret) && listed.contains("used-up"),
        "{listed}"
    );
}

#[tokio::test]
async fn every_bad_token_gets_the_same_generic_error_and_replays_are_refused() {
    let pki = Pki::new();
    let server = RegistrationServer::start(&pki, &RegistrationOptions::default()).await;
    let expired = server.create_token(&["--ttl", "1s"]);
    let exhausted = server.create_token(&["--usage-limit", "1"]);
    let revoked = server.create_token(&[]);
    let good = server.create_token(&["--usage-limit", "5", "--node-name-pattern", "idc-*"]);
    server.admin(&["token", "revoke", revoked.split_once('.').expect("id").0]);
    join_raw(&pki, &server, request(&exhausted, "idc-a"))
        .await
        .expect("first use of a one-use token");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let wrong = format!(
        "{}.{}",
        good.split_once('.').expect("id").0,
        "0000000000000000"
    );
    let cases = [
        (expired.as_str(), "idc-b", "expired"),
        (exhausted.as_str(), "idc-b", "exhausted"),
        (revoked.as_str(), "idc-b", "revoked"),
        ("not-a-token", "idc-b", "malformed"),
        ("abcdef.0123456789ABCDEF", "idc-b", "malformed"),
        (wrong.as_str(), "idc-b", "wrong_secret"),
        ("zzzzzz.0123456789abcdef", "idc-b", "unknown"),
        (good.as_str(), "cloud-b", "node_name"),
    ];
    for (token, node, reason) in cases {
        let refused = join_raw(&pki, &server, request(token, node))
            .await
            .expect_err(reason);
        assert_eq!(
            refused,
            (tonic::Code::PermissionDenied, REFUSED.to_string()),
            "{reason}"
        );
        let needle = format!("reason=\"{reason}\"");
        assert!(
            server.log_lines_with(&["join refused", &needle]) >= 1,
            "audit log lacks {needle}"
        );
    }

    // A token for one site's network: an address outside it is refused (the attempt uses
    // nothing up), an address inside joins.
    let site = server.create_token(&["--node-ip-cidr", "10.8.0.0/16"]);
    let outside = join_raw(
        &pki,
        &server,
        request_with_ips(&site, "idc-d", &["10.9.0.4"]),
    )
    .await
    .expect_err("address outside the token's network");
    assert_eq!(outside.1, REFUSED);
    assert_eq!(
        server.log_lines_with(&["join refused", "reason=\"node_ip\""]),
        1
    );
    join_raw(
        &pki,
        &server,
        request_with_ips(&site, "idc-d", &["10.8.0.4"]),
    )
    .await
    .expect("address inside the token's network");

    // Replay: the very same request (same CSR key) twice; the token still has uses left.
    let original = request(&good, "idc-c");
    join_raw(&pki, &server, original.clone())
        .await
        .expect("first join");
    let replayed = join_raw(&pki, &server, original).await.expect_err("replay");
    assert_eq!(replayed.1, REFUSED);
    assert_eq!(
        server.log_lines_with(&["join refused", "reason=\"replay\""]),
        1
    );
    assert!(!server.log().contains(secret_of(&good)));
}

#[tokio::test]
async fn brute_force_from_one_source_is_locked_out_without_checking() {
    let pki = Pki::new();
    let server = RegistrationServer::start(
        &pki,
        &RegistrationOptions {
            lockout_after: 3,
            ..Default::default()
        },
    )
    .await;
    let good = server.create_token(&[]);
    let id = good.split_once('.').expect("id").0;
    for i in 0..3 {
        let guess = format!("{id}.{i:016}");
        let refused = join_raw(&pki, &server, request(&guess, "idc-a")).await;
        assert_eq!(refused.expect_err("guess").1, REFUSED);
    }
    // The source is locked out: even the right token is refused, before it is checked.
    let started = Instant::now();
    let refused = join_raw(&pki, &server, request(&good, "idc-a")).await;
    let took = started.elapsed();
    let message = refused.expect_err("locked out").1;
    assert!(
        message.starts_with(REFUSED) && message.contains("locked out until 20"),
        "{message}"
    );
    assert!(
        took < Duration::from_secs(2),
        "locked-out attempt took {took:?}"
    );
    assert_eq!(
        server.log_lines_with(&["join refused", "reason=\"locked_out\""]),
        1
    );
    assert_eq!(server.log_lines_with(&["node joined"]), 0);
}

#[tokio::test]
async fn behind_a_proxy_protocol_balancer_the_lockout_keys_on_each_nodes_own_address() {
    let Some(binary) = haproxy::binary_or_skip("registration behind a PROXY balancer") else {
        return;
    };
    let pki = Pki::new();
    let server = RegistrationServer::start(
        &pki,
        &RegistrationOptions {
            lockout_after: 3,
            proxy_protocol: true,
            ..Default::default()
        },
    )
    .await;
    // One balancer; behind it, two nodes with their own addresses.
    let (a, b) = ([203, 0, 113, 7].into(), [203, 0, 113, 8].into());
    let lb = Haproxy::start_with_sources(binary, server.registration, &[a, b]).await;
    let (via_a, via_b) = (lb.addrs[0], lb.addrs[1]);
    let good = server.create_token(&[]);
    let id = good.split_once('.').expect("id").0;
    for i in 0..3 {
        let guess = format!("{id}.{i:016}");
        let refused = join_at(&pki, via_a, request(&guess, "idc-a")).await;
        assert_eq!(refused.expect("reachable").expect_err("guess").1, REFUSED);
    }
    // Node A's own address is locked out, even with the right token, and is told until when...
    let refused = join_at(&pki, via_a, request(&good, "idc-a")).await;
    let message = refused.expect("reachable").expect_err("locked out").1;
    assert!(
        message.starts_with(REFUSED) && message.contains("locked out until 20"),
        "{message}"
    );
    assert_eq!(
        server.log_lines_with(&["join refused", "peer=203.0.113.7:", "reason=\"locked_out\""]),
        1,
        "{}",
        server.log()
    );
    // ...while node B behind the same balancer joins: without the header both would be the
    // balancer's 127.0.0.1 and share A's lockout.
    join_at(&pki, via_b, request(&good, "idc-b"))
        .await
        .expect("reachable")
        .expect("node B joins");
    assert_eq!(server.log_lines_with(&["node joined", "idc-b"]), 1);
    // A connection that skips the balancer (no header) is refused before TLS.
    let direct = join_at(&pki, server.registration, request(&good, "idc-c")).await;
    assert!(
        !matches!(direct, Ok(Ok(_))),
        "a connection without a PROXY header joined"
    );
    server
        .wait_log(&["registration refused: bad PROXY protocol header"], 1, UP)
        .await;
    assert_eq!(server.log_lines_with(&["node joined", "idc-c"]), 0);
}

#[tokio::test]
async fn revocation_closes_the_session_and_blocks_return_until_a_new_token() {
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let port = echo.addr.port();
    let server = RegistrationServer::start(
        &pki,
        &RegistrationOptions {
            allowed_ports: vec![port],
            ..Default::default()
        },
    )
    .await;
    let token = server.create_token(&[]);
    let mut edge = JoinedEdge::new();
    let (ok, output) = edge.join(&pki, &server, &token, NODE, &[NODE_IP], &[]);
    assert!(ok, "{output}");
    edge.run(&server, &[port], "info");
    server
        .wait_log(&["edge session established", NODE], 1, UP)
        .await;
    let mut stream = connect(&pki, &server, port).await.expect("CONNECT");
    roundtrip(&mut stream, b"hello").await;

    let revoked_at = Instant::now();
    server.admin(&["node", "revoke", NODE]);
    // The live stream ends within seconds (EOF or error, never more echo).
    let mut buf = [0u8; 16];
    let read = within("the revoked stream to end", Duration::from_secs(5), async {
        loop {
            let _ = stream.write_all(b"x").await;
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    let () = read;
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
    // The edge keeps trying; every handshake is refused and no stream reaches it.
    server
        .wait_log(&["edge session refused", "is revoked"], 2, UP)
        .await;
    assert!(
        connect(&pki, &server, port).await.is_err(),
        "revoked node reachable"
    );
    // The old token cannot re-admit it.
    let (ok, output) = edge.join(&pki, &server, &token, NODE, &[NODE_IP], &["--force"]);
    assert!(!ok && output.contains(REFUSED), "{output}");
    assert_eq!(
        server.log_lines_with(&["join refused", "reason=\"node_revoked\""]),
        1
    );

    // A token created after the revocation to re-provision the node does.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let readmit = server.create_token(&["--reprovision", NODE]);
    let (ok, output) = edge.join(&pki, &server, &readmit, NODE, &[NODE_IP], &["--force"]);
    assert!(ok, "{output}");
    edge.stop();
    edge.run(&server, &[port], "info");
    server
        .wait_log(&["edge session established", NODE], 2, UP)
        .await;
    let mut again = connect(&pki, &server, port)
        .await
        .expect("CONNECT re-admitted");
    roundtrip(&mut again, b"back").await;
}

#[tokio::test]
async fn identity_hijack_is_refused_and_audited_and_the_victim_untouched() {
    let pki = Pki::new();
    let server = RegistrationServer::start(&pki, &RegistrationOptions::default()).await;
    let token = server.create_token(&[]);
    let mut victim = JoinedEdge::new();
    let (ok, output) = victim.join(&pki, &server, &token, "node-b", &["192.0.2.20"], &[]);
    assert!(ok, "{output}");
    victim.run(&server, &[10250], "info");
    server
        .wait_log(&["edge session established", "node-b"], 1, UP)
        .await;
    let attacker = JoinedEdge::new();
    let (ok, output) = attacker.join(&pki, &server, &token, "node-a", &["192.0.2.10"], &[]);
    assert!(ok, "{output}");
    let cert = attacker.state.join("cert.pem");
    let key = attacker.state.join("key.pem");
    let registration = server.registration.to_string();
    let renew = |csr_der: Vec<u8>, cert: std::path::PathBuf, key: std::path::PathBuf| {
        let (ca, registration) = (pki.layout.ca_cert(), registration.clone());
        async move {
            tunnel_edge::join::call_renew(
                &registration,
                "127.0.0.1",
                &ca,
                (&cert, &key),
                RenewRequest { csr_der },
            )
            .await
        }
    };

    // A's certificate, renewing with a CSR that names B (subject, DNS SAN) or B's IP.
    let b_ip: std::net::IpAddr = "192.0.2.20".parse().expect("ip");
    for (node, ips) in [("node-b", vec![]), ("node-a", vec![b_ip])] {
        let (_, csr) = tunnel_edge::join::new_csr(node, &ips).expect("csr");
        let refused = renew(csr, cert.clone(), key.clone())
            .await
            .expect("reachable");
        assert_eq!(refused.expect_err("hijack").message(), REFUSED);
    }
    // A join whose CSR names someone other than the requested node.
    let (_, csr_der) = tunnel_edge::join::new_csr("node-b", &[]).expect("csr");
    let hijack = JoinRequest {
        token: token.clone(),
        node_name: "node-c".into(),
        node_ips: vec![],
        csr_der,
    };
    assert_eq!(
        join_raw(&pki, &server, hijack).await.expect_err("hijack").1,
        REFUSED
    );
    assert_eq!(
        server.log_lines_with(&["refused", "reason=\"csr_claims_other_identity\""]),
        3
    );
    // A foreign-CA certificate for B, and an expired one from the right CA: the TLS handshake
    // itself is refused (and audited).
    let foreign = pki.issue_foreign_edge("node-b", &[b_ip]);
    let (_, csr) = tunnel_edge::join::new_csr("node-b", &[b_ip]).expect("csr");
    let answer = renew(csr, foreign.cert.clone(), foreign.key.clone()).await;
    assert!(!matches!(answer, Ok(Ok(_))), "foreign CA renewed");
    let ca = tunnel_server::pki::Ca::load(&pki.layout.ca_cert(), &pki.layout.ca_key()).expect("ca");
    let short = ca
        .issue_edge(
            &protocol::NodeName::parse("node-b").expect("name"),
            &[b_ip],
            Duration::from_secs(1),
        )
        .expect("short cert");
    let dir = tempfile::tempdir().expect("dir");
    let (expired_cert, expired_key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&expired_cert, &short.cert_pem).expect("write");
    std::fs::write(&expired_key, &short.key_pem).expect("write");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, csr) = tunnel_edge::join::new_csr("node-b", &[b_ip]).expect("csr");
    let answer = renew(csr, expired_cert, expired_key).await;
    assert!(!matches!(answer, Ok(Ok(_))), "expired certificate renewed");
    server
        .wait_log(&["registration TLS handshake refused"], 2, UP)
        .await;
    // The victim's session was never disturbed.
    assert_eq!(server.log_lines_with(&["edge session ended", "node-b"]), 0);
    assert_eq!(
        server.log_lines_with(&["edge session established", "node-b"]),
        1
    );
}
