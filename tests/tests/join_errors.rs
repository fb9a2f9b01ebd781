//! What `tunnel-edge join` tells the operator when something is off: a malformed token is
//! refused on the node before any network call, and a join without node IPs warns that the
//! node is reachable by name only; times it prints are RFC 3339, not Unix seconds.

use std::process::Command;
use std::time::Duration;

use tether_tests::registration::{JoinedEdge, RegistrationOptions, RegistrationServer};
use tether_tests::Pki;

#[tokio::test]
async fn malformed_token_is_refused_before_any_network_call() {
    let pki = Pki::new();
    // Something listening where the registration API would be: any connection shows up here.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dir = tempfile::tempdir().expect("dir");
    for token in ["abcdef.0123456789ABCDEF", "abcdef0123456789abcdef", "x.y"] {
        let output = Command::new(tether_tests::binary("tunnel-edge"))
            .arg("join")
            .arg("--server")
            .arg(format!("https://{}", listener.local_addr().expect("addr")))
            .arg("--ca")
            .arg(pki.layout.ca_cert())
            .arg("--node-name")
            .arg("idc-node-1")
            .arg("--node-ip")
            .arg("192.0.2.10")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("TETHER_JOIN_TOKEN", token)
            .env_remove("RUST_LOG")
            .output()
            .expect("run tunnel-edge join");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{token}: join succeeded");
        assert!(
            stderr.contains("malformed bootstrap token") && stderr.contains("nothing was sent"),
            "{stderr}"
        );
        assert!(!stderr.contains(token), "the token is echoed: {stderr}");
    }
    // The processes have exited: a connection they made would be waiting in the backlog.
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(
        accepted.is_err(),
        "join connected before checking the token"
    );
}

#[tokio::test]
async fn join_without_node_ip_warns_reachable_by_name_only() {
    let pki = Pki::new();
    let server = RegistrationServer::start(&pki, &RegistrationOptions::default()).await;
    let token = server.create_token(&[]);
    let (ok, output) = JoinedEdge::new().join(&pki, &server, &token, "idc-node-2", &[], &[]);
    assert!(ok, "join failed: {output}");
    assert!(output.contains("reachable by name only"), "{output}");
    let token = server.create_token(&[]);
    let (ok, output) =
        JoinedEdge::new().join(&pki, &server, &token, "idc-node-3", &["192.0.2.13"], &[]);
    assert!(ok, "join failed: {output}");
    assert!(!output.contains("by name only"), "{output}");
}

/// Whether `text` holds an RFC 3339 UTC time (`2026-11-29T11:28:16Z`).
fn has_rfc3339(text: &str) -> bool {
    text.as_bytes().windows(20).any(|w| {
        let digits = |r: std::ops::Range<usize>| w[r].iter().all(u8::is_ascii_digit);
        digits(0..4)
            && w[4] == b'-'
            && digits(5..7)
            && w[7] == b'-'
            && digits(8..10)
            && w[10] == b'T'
            && digits(11..13)
            && w[13] == b':'
            && digits(14..16)
            && w[16] == b':'
            && digits(17..19)
            && w[19] == b'Z'
    })
}

#[tokio::test]
async fn cli_times_are_rfc3339_not_unix_seconds() {
    let pki = Pki::new();
    let server = RegistrationServer::start(&pki, &RegistrationOptions::default()).await;
    let created = Command::new(tether_tests::binary("tunnel-server"))
        .args(["token", "create", "--config"])
        .arg(&server.config)
        .env_remove("RUST_LOG")
        .output()
        .expect("token create");
    assert!(created.status.success());
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(
        has_rfc3339(&stderr) && !stderr.contains("Unix time"),
        "token create: {stderr}"
    );
    let token = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    let listed = server.admin(&["token", "list"]);
    assert!(has_rfc3339(&listed), "token list: {listed}");

    let (ok, output) =
        JoinedEdge::new().join(&pki, &server, &token, "idc-node-4", &["192.0.2.14"], &[]);
    assert!(
        ok && output.contains("valid until") && has_rfc3339(&output),
        "join: {output}"
    );

    let revoked = server.admin(&["node", "revoke", "idc-node-4"]);
    assert!(
        has_rfc3339(&revoked) && !revoked.contains("Unix time"),
        "node revoke: {revoked}"
    );
}

#[tokio::test]
async fn edge_pointed_at_the_wrong_port_says_it_is_not_an_edge_listener() {
    let pki = Pki::new();
    let server = RegistrationServer::start(&pki, &RegistrationOptions::default()).await;
    let files = pki.issue_edge("idc-node-5", &[]);
    let dir = tempfile::tempdir().expect("dir");
    for (what, address) in [
        ("registration", server.registration),
        ("CONNECT", server.connect_tcp),
        ("admin", server.admin),
    ] {
        let mut command = Command::new(tether_tests::binary("tunnel-edge"));
        command
            .arg("run")
            .arg("--server")
            .arg(address.to_string())
            .arg("--server-name")
            .arg("127.0.0.1")
            .arg("--ca")
            .arg(pki.layout.ca_cert())
            .arg("--cert")
            .arg(&files.cert)
            .arg("--key")
            .arg(&files.key)
            .env("RUST_LOG", "info");
        let edge = tether_tests::process::ChildGuard::spawn(
            &format!("tunnel-edge ({what} port)"),
            command,
            &dir.path().join(format!("{what}.log")),
        );
        tether_tests::poll_until(
            &format!("the edge at the {what} port to say what is wrong"),
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                std::future::ready(
                    edge.log()
                        .contains("is not a Tether edge listener")
                        .then_some(()),
                )
            },
        )
        .await;
        let log = edge.log();
        assert!(
            !log.contains("NoApplicationProtocol") && !log.contains("UnknownCA"),
            "{what}: {log}"
        );
    }
}

#[tokio::test]
async fn join_after_a_lockout_says_when_it_ends() {
    let pki = Pki::new();
    let server = RegistrationServer::start(
        &pki,
        &RegistrationOptions {
            lockout_after: 2,
            ..Default::default()
        },
    )
    .await;
    let good = server.create_token(&[]);
    let id = good.split_once('.').expect("id.secret").0;
    let node = JoinedEdge::new();
    for i in 0..2 {
        let guess = format!("{id}.{i:016}");
        let (ok, _) = node.join(&pki, &server, &guess, "idc-node-6", &["192.0.2.16"], &[]);
        assert!(!ok, "a wrong secret joined");
    }
    let (ok, output) = node.join(&pki, &server, &good, "idc-node-6", &["192.0.2.16"], &[]);
    assert!(!ok, "joined while locked out");
    assert!(
        output.contains("locked out until") && has_rfc3339(&output),
        "{output}"
    );
    assert!(
        !output.contains(good.split_once('.').expect("id.secret").1),
        "{output}"
    );
}
