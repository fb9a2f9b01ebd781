//! What `tunnel-edge join` tells the operator when something is off: a malformed token is
//! refused on the node before any network call, and a join without node IPs warns that the
//! node is reachable by name only.

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
