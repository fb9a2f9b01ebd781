//! `tunnel-edge join --ca-hash`: a node that holds only the line `tunnel-server token create
//! --print-join-command` printed (address, token, CA pin) joins a real registration API and
//! carries a session. A wrong pin, a server whose chain comes from another CA (even one that
//! also presents the pinned CA certificate, which is public), and a malformed pin are each
//! refused with their own message, and nothing is written.

use std::time::Duration;

use tether_tests::registration::{JoinedEdge, RegistrationOptions, RegistrationServer};
use tether_tests::targets::EchoServer;
use tether_tests::Pki;
use tunnel_io::ca_pin::CaPin;
use tunnel_server::pki::{self, Ca};

const NODE: &str = "idc-node-1";
const NODE_IP: &str = "192.0.2.10";
const UP: Duration = Duration::from_secs(15);

/// The pin of the test's tunnel CA, computed from its file.
fn tunnel_ca_pin(pki: &Pki) -> String {
    let ca = tunnel_io::tls::load_certs(&pki.layout.ca_cert()).expect("CA");
    CaPin::of_certificate(ca[0].as_ref())
        .expect("pin")
        .to_string()
}

/// `token create --print-join-command`: the token and the pin the printed line carries.
fn token_and_printed_pin(server: &RegistrationServer) -> (String, String, String) {
    let address = server.registration.to_string();
    let out = server.admin(&[
        "token",
        "create",
        "--print-join-command",
        "--server-address",
        &address,
    ]);
    let token = out.lines().next().expect("token line").trim().to_owned();
    let flag = |line: &str, name: &str| -> Option<String> {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name)?;
        words.next().map(str::to_owned)
    };
    let install = out
        .lines()
        .find(|l| l.starts_with("sh install.sh"))
        .unwrap_or_else(|| panic!("no installer line: {out}"));
    let bare = out
        .lines()
        .find(|l| l.starts_with("tunnel-edge join"))
        .unwrap_or_else(|| panic!("no tunnel-edge join line: {out}"));
    for line in [install, bare] {
        assert!(line.contains(&address), "{line}");
        assert_eq!(
            flag(line, "--token").as_deref(),
            Some(token.as_str()),
            "{line}"
        );
    }
    let pin = flag(install, "--ca-hash").expect("--ca-hash");
    assert_eq!(flag(bare, "--ca-hash").as_deref(), Some(pin.as_str()));
    (token, pin, out)
}

#[tokio::test]
async fn join_with_the_printed_ca_pin_then_routes_a_session() {
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let port = echo.addr.port();
    let options = RegistrationOptions {
        allowed_ports: vec![port],
        ..Default::default()
    };
    let server = RegistrationServer::start(&pki, &options).await;
    let (token, pin, _) = token_and_printed_pin(&server);
    assert_eq!(
        pin,
        tunnel_ca_pin(&pki),
        "the printed pin is not the tunnel CA's"
    );

    let mut edge = JoinedEdge::new();
    let (ok, output) = edge.join_pinned(&server, &token, NODE, &[NODE_IP], &pin);
    assert!(ok, "pinned join failed: {output}");
    // The pinned CA is the node's trust from now on (sessions, renewals).
    let kept = tunnel_io::tls::load_certs(&edge.state.join("ca.pem")).expect("ca.pem");
    let ca = tunnel_io::tls::load_certs(&pki.layout.ca_cert()).expect("CA");
    assert!(
        kept.contains(&ca[0]),
        "the state's CA is not the pinned one"
    );

    edge.run(&server, &[port], "info");
    server
        .wait_log(&["edge session established", NODE], 1, UP)
        .await;
    server
        .echo_through(&pki, &format!("{NODE_IP}:{port}"), b"pinned")
        .await;
}

#[tokio::test]
async fn join_with_a_wrong_ca_pin_is_refused_showing_expected_and_presented() {
    let pki = Pki::new();
    let server = RegistrationServer::start(&pki, &RegistrationOptions::default()).await;
    let token = server.create_token(&[]);
    let other = Ca::generate("some other CA", pki::CA_VALIDITY).expect("CA");
    let wrong = CaPin::of_certificate(other.cert_der().as_ref())
        .expect("pin")
        .to_string();
    let edge = JoinedEdge::new();
    let (ok, output) = edge.join_pinned(&server, &token, NODE, &[NODE_IP], &wrong);
    assert!(!ok, "joined with a wrong pin: {output}");
    let want = format!(
        "CA pin mismatch: expected {wrong}, the server presented {}",
        tunnel_ca_pin(&pki)
    );
    assert!(output.contains(&want), "{output}");
    assert!(!edge.state.exists(), "state written after a refused pin");
    // The token was not spent: a join with the right pin still works.
    let (ok, output) = edge.join_pinned(&server, &token, NODE, &[NODE_IP], &tunnel_ca_pin(&pki));
    assert!(ok, "{output}");
}

/// An impostor registration API whose certificate comes from another CA: with only its own
/// CA in the chain the pin does not match; presenting the real (public) CA certificate as
/// well makes the pin match, and the server certificate then fails verification under it.
#[tokio::test]
async fn join_against_a_chain_from_another_ca_is_refused_even_carrying_the_pinned_ca() {
    let pki = Pki::new();
    let impostor_ca = Ca::generate("tether-tunnel-ca", pki::CA_VALIDITY).expect("CA");
    let leaf = impostor_ca
        .issue_server(
            &["localhost".into()],
            &["127.0.0.1".parse().expect("ip")],
            pki::SERVER_VALIDITY,
        )
        .expect("impostor certificate");
    let real_ca = std::fs::read_to_string(pki.layout.ca_cert()).expect("CA");
    let dir = tempfile::tempdir().expect("dir");
    let key = dir.path().join("impostor-key.pem");
    std::fs::write(&key, &leaf.key_pem).expect("key");
    let right = tunnel_ca_pin(&pki);
    let impostor_pin = CaPin::of_certificate(impostor_ca.cert_der().as_ref())
        .expect("pin")
        .to_string();
    let cases = [
        (
            "own-ca.pem",
            format!("{}{}", leaf.cert_pem, impostor_ca.cert_pem()),
            format!("CA pin mismatch: expected {right}, the server presented {impostor_pin}"),
        ),
        (
            "with-real-ca.pem",
            format!("{}{real_ca}", leaf.cert_pem),
            format!("the server presented the pinned CA {right} but its certificate is not valid under it"),
        ),
    ];
    for (file, chain, want) in cases {
        let cert = dir.path().join(file);
        std::fs::write(&cert, chain).expect("chain");
        let options = RegistrationOptions {
            registration_extra: format!(
                "cert = \"{}\"\nkey = \"{}\"",
                cert.display(),
                key.display()
            ),
            ..Default::default()
        };
        let server = RegistrationServer::start(&pki, &options).await;
        let token = server.create_token(&[]);
        let edge = JoinedEdge::new();
        let (ok, output) = edge.join_pinned(&server, &token, NODE, &[NODE_IP], &right);
        assert!(!ok, "{file}: joined an impostor: {output}");
        assert!(output.contains(&want), "{file}: {output}");
        assert!(!edge.state.exists(), "{file}: state written");
    }
}

#[tokio::test]
async fn join_with_a_malformed_ca_pin_is_refused_before_any_network_call() {
    // Something listening where the registration API would be: any connection shows up here.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dir = tempfile::tempdir().expect("dir");
    for pin in [
        "a156e6af5ebdc21e90f0a0a50de1ed2547a42926f4eeba50dc4f28b6eb1029db",
        "sha256:a156e6af",
        "sha1:a156e6af5ebdc21e90f0a0a50de1ed2547a42926",
    ] {
        let output = std::process::Command::new(tether_tests::binary("tunnel-edge"))
            .arg("join")
            .arg("--server")
            .arg(format!("https://{}", listener.local_addr().expect("addr")))
            .arg("--ca-hash")
            .arg(pin)
            .arg("--node-name")
            .arg(NODE)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("TETHER_JOIN_TOKEN", "abcdef.0123456789abcdef")
            .env_remove("RUST_LOG")
            .output()
            .expect("run tunnel-edge join");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{pin}: join succeeded");
        assert!(
            stderr.contains("malformed CA pin") && stderr.contains("nothing was sent"),
            "{stderr}"
        );
    }
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "join connected before checking the pin");
    assert!(!dir.path().join("state").exists());
}

#[tokio::test]
async fn print_join_command_refuses_what_a_node_could_not_use() {
    let pki = Pki::new();
    let server = RegistrationServer::start(&pki, &RegistrationOptions::default()).await;
    let run = |args: &[&str]| {
        let output = std::process::Command::new(tether_tests::binary("tunnel-server"))
            .args(["token", "create", "--print-join-command", "--config"])
            .arg(&server.config)
            .args(args)
            .output()
            .expect("run tunnel-server");
        assert!(!output.status.success(), "{args:?} printed a command");
        assert!(output.stdout.is_empty(), "{args:?}: a token was printed");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let err = run(&[]);
    assert!(err.contains("needs --server-address HOST:PORT"), "{err}");
    // `ca init`'s certificate names localhost and loopback, not the balancer.
    let err = run(&["--server-address", "lb.example.com:443"]);
    assert!(
        err.contains("a node could not join with this command") && err.contains("--server-name"),
        "{err}"
    );
    let listed = server.admin(&["token", "list"]);
    assert_eq!(listed.lines().count(), 1, "a token was created: {listed}");
    // With a name the certificate holds, the line carries it.
    let out = server.admin(&[
        "token",
        "create",
        "--print-join-command",
        "--server-address",
        "lb.example.com:443",
        "--server-name",
        "localhost",
    ]);
    assert!(
        out.contains("--server lb.example.com:443 ") && out.contains("--server-name localhost"),
        "{out}"
    );
}
