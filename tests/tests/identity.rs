//! Identity takeover with a bootstrap token (issue 11, finding 1), end to end with the real
//! binaries: a token lets its holder choose a node name and IPs, so each attack below is a
//! join that tries to become, squat or outlive another node. Each is refused and audited,
//! and the victim's route is untouched; only a token created to re-provision the node may
//! take its identity, and the old certificate then never displaces the new session. Also
//! what else a token or the cloud side must not decide for a node: the ports it exposes
//! (finding 8), and that revocation reaches every connection of the node (finding 5).

use std::time::Duration;

use tether_tests::registration::{JoinedEdge, RegistrationOptions, RegistrationServer};
use tether_tests::targets::EchoServer;
use tether_tests::{within, Pki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VICTIM: &str = "node-a";
const VICTIM_IP: &str = "192.0.2.10";
const REFUSED: &str = "registration refused";
const UP: Duration = Duration::from_secs(15);

/// A server whose policy allows the echo target's port, and the victim joined and connected.
async fn victim_running(pki: &Pki, echo: &EchoServer) -> (RegistrationServer, JoinedEdge, String) {
    victim_running_over(pki, echo, "tcp").await
}

/// [`victim_running`] with the victim's session on `transport` (`tcp`, `quic`).
async fn victim_running_over(
    pki: &Pki,
    echo: &EchoServer,
    transport: &str,
) -> (RegistrationServer, JoinedEdge, String) {
    let port = echo.addr.port();
    let server = RegistrationServer::start(
        pki,
        &RegistrationOptions {
            allowed_ports: vec![port],
            ..Default::default()
        },
    )
    .await;
    let token = server.create_token(&[]);
    let mut victim = JoinedEdge::new();
    let (ok, output) = victim.join(pki, &server, &token, VICTIM, &[VICTIM_IP], &[]);
    assert!(ok, "victim join: {output}");
    victim.run_over(&server, &[port], "info", "300ms", transport);
    server
        .wait_log(&["edge session established", VICTIM], 1, UP)
        .await;
    (server, victim, token)
}

/// CONNECT to the victim's IP through the mTLS frontend and echo `message`.
async fn echo_via_victim_ip(pki: &Pki, server: &RegistrationServer, port: u16, message: &[u8]) {
    let mut stream = tunnel_server::client::connect_tls(
        server.connect_tcp,
        pki.frontend_client_tls(),
        &format!("{VICTIM_IP}:{port}"),
    )
    .await
    .expect("CONNECT to the victim's IP");
    stream.write_all(message).await.expect("write");
    let mut back = vec![0u8; message.len()];
    within("echo", Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .expect("read echo");
    assert_eq!(back, message);
}

fn assert_victim_untouched(server: &RegistrationServer) {
    assert_eq!(
        server.log_lines_with(&["edge session established", VICTIM]),
        1,
        "{}",
        server.log()
    );
    assert_eq!(server.log_lines_with(&["edge session ended", VICTIM]), 0);
}

#[tokio::test]
async fn second_join_as_a_joined_node_with_its_ip_is_refused_and_its_route_untouched() {
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let (server, _victim, token) = victim_running(&pki, &echo).await;
    let attacker = JoinedEdge::new();
    let (ok, output) = attacker.join(&pki, &server, &token, VICTIM, &[VICTIM_IP], &[]);
    assert!(!ok && output.contains(REFUSED), "{output}");
    assert_eq!(
        server.log_lines_with(&["join refused", VICTIM, "reason=\"node_exists\""]),
        1,
        "{}",
        server.log()
    );
    assert!(!attacker.state.join("cert.pem").exists());
    echo_via_victim_ip(&pki, &server, echo.addr.port(), b"still the victim").await;
    assert_victim_untouched(&server);
}

#[tokio::test]
async fn new_name_with_a_joined_nodes_ip_is_refused() {
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let (server, _victim, token) = victim_running(&pki, &echo).await;
    let squatter = JoinedEdge::new();
    let (ok, output) = squatter.join(&pki, &server, &token, "node-z", &[VICTIM_IP], &[]);
    assert!(!ok && output.contains(REFUSED), "{output}");
    assert_eq!(
        server.log_lines_with(&[
            "join refused",
            "reason=\"ip_taken\"",
            "address 192.0.2.10 belongs to node node-a"
        ]),
        1,
        "{}",
        server.log()
    );
    echo_via_victim_ip(&pki, &server, echo.addr.port(), b"not squatted").await;
    assert_victim_untouched(&server);
}

#[tokio::test]
async fn revoke_then_rejoin_under_a_new_name_with_the_same_ip_is_refused() {
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let (server, mut victim, token) = victim_running(&pki, &echo).await;
    server.admin(&["node", "revoke", VICTIM]);
    server
        .wait_log(&["node revoked", VICTIM], 1, Duration::from_secs(5))
        .await;
    victim.stop();
    // The same machine, the same token, a new name and the revoked node's address.
    let (ok, output) = victim.join(
        &pki,
        &server,
        &token,
        "node-a-new",
        &[VICTIM_IP],
        &["--force"],
    );
    assert!(!ok && output.contains(REFUSED), "{output}");
    assert_eq!(
        server.log_lines_with(&["join refused", "node-a-new", "reason=\"ip_taken\""]),
        1,
        "{}",
        server.log()
    );
    // Even a token created after the revocation does not free the address...
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = server.create_token(&[]);
    let (ok, _) = victim.join(
        &pki,
        &server,
        &later,
        "node-a-new",
        &[VICTIM_IP],
        &["--force"],
    );
    assert!(!ok, "a later token freed a revoked node's address");
    // ...only the operator re-admitting it by name does.
    let readmit = server.create_token(&["--reprovision", VICTIM]);
    let (ok, output) = victim.join(
        &pki,
        &server,
        &readmit,
        "node-a-new",
        &[VICTIM_IP],
        &["--force"],
    );
    assert!(ok, "{output}");
}

#[tokio::test]
async fn reprovision_is_allowed_only_with_the_token_flag_and_the_old_certificate_never_takes_over()
{
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let port = echo.addr.port();
    let (server, _old_machine, token) = victim_running(&pki, &echo).await;
    let mut new_machine = JoinedEdge::new();
    let (ok, _) = new_machine.join(&pki, &server, &token, VICTIM, &[VICTIM_IP], &[]);
    assert!(!ok, "joined a node's name without --reprovision");
    let other = server.create_token(&["--reprovision", "node-q"]);
    let (ok, _) = new_machine.join(&pki, &server, &other, VICTIM, &[VICTIM_IP], &[]);
    assert!(!ok, "a token re-provisioning another node took this one");
    let reprovision = server.create_token(&["--reprovision", VICTIM]);
    let (ok, output) = new_machine.join(&pki, &server, &reprovision, VICTIM, &[VICTIM_IP], &[]);
    assert!(ok, "{output}");
    assert_eq!(
        server.log_lines_with(&["node re-provisioned", VICTIM]),
        1,
        "{}",
        server.log()
    );
    // The new machine's session replaces the old one; the old machine keeps reconnecting
    // with its (not revoked, but no longer current) certificate and is refused every time.
    new_machine.run(&server, &[port], "info");
    server
        .wait_log(&["edge session established", VICTIM], 2, UP)
        .await;
    server
        .wait_log(
            &[
                "edge session refused",
                "is not node node-a's current certificate",
            ],
            2,
            UP,
        )
        .await;
    echo_via_victim_ip(&pki, &server, port, b"the new machine").await;
    assert_eq!(
        server.log_lines_with(&["edge session established", VICTIM]),
        2,
        "the old certificate took the route back: {}",
        server.log()
    );
}

/// Finding 8: a token pool's `--extra-port` reaches the edge in the join answer; the cloud
/// must not widen what the node exposes, so the edge dials it only once its own `[allow]`
/// lists it, and says which ports it ignored.
#[tokio::test]
async fn cloud_sent_extra_port_is_not_dialed_without_local_consent() {
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let port = echo.addr.port();
    let server = RegistrationServer::start(
        &pki,
        &RegistrationOptions {
            allowed_ports: vec![10250, port],
            ..Default::default()
        },
    )
    .await;
    let token = server.create_token(&["--extra-port", &port.to_string()]);
    let mut edge = JoinedEdge::new();
    let (ok, output) = edge.join(&pki, &server, &token, VICTIM, &[VICTIM_IP], &[]);
    assert!(ok, "{output}");
    edge.run(&server, &[10250], "info");
    server
        .wait_log(&["edge session established", VICTIM], 1, UP)
        .await;
    let refused = tunnel_server::client::connect_tls(
        server.connect_tcp,
        pki.frontend_client_tls(),
        &format!("{VICTIM_IP}:{port}"),
    )
    .await;
    let error = format!(
        "{:#}",
        refused.expect_err("the edge dialed a port its owner never allowed")
    );
    assert!(
        error.contains("not allowed by the edge allowlist"),
        "{error}"
    );
    let log = edge.log();
    assert!(
        log.contains("not in this edge's [allow] ports") && log.contains(&port.to_string()),
        "{log}"
    );
    // The node's owner consents by listing the port: now it is dialed.
    edge.stop();
    edge.run(&server, &[10250, port], "info");
    server
        .wait_log(&["edge session established", VICTIM], 2, UP)
        .await;
    echo_via_victim_ip(&pki, &server, port, b"consented").await;
}

/// Finding 5: a session replaced by a newer one of the same node keeps serving its open
/// streams until they end; revoking the node must cut those too, not only the routed one.
#[tokio::test]
async fn revocation_closes_a_replaced_session_still_draining() {
    revocation_closes_a_replaced_session("tcp").await;
}

/// The same over QUIC, where the server carries CONNECT streams on QUIC streams directly:
/// the replaced session's h2 control connection ends at once, its stream must run on, and
/// revocation must still cut it.
#[tokio::test]
async fn quic_revocation_closes_a_replaced_session_still_draining() {
    revocation_closes_a_replaced_session("quic").await;
}

async fn revocation_closes_a_replaced_session(transport: &str) {
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let port = echo.addr.port();
    let (server, first, _) = victim_running_over(&pki, &echo, transport).await;
    let mut stream = tunnel_server::client::connect_tls(
        server.connect_tcp,
        pki.frontend_client_tls(),
        &format!("{VICTIM_IP}:{port}"),
    )
    .await
    .expect("CONNECT");
    let mut buf = [0u8; 5];
    stream.write_all(b"first").await.expect("write");
    within("echo", Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .expect("echo");
    // A second process of the same node (its credentials copied) takes the route over; the
    // first session is retired and keeps serving the open stream.
    let mut second = JoinedEdge::new();
    std::fs::create_dir_all(&second.state).expect("state dir");
    for file in ["key.pem", "cert.pem", "ca.pem", "node.json"] {
        let bytes = std::fs::read(first.state.join(file)).expect("read credentials");
        std::fs::write(second.state.join(file), bytes).expect("copy credentials");
    }
    second.run_over(&server, &[port], "info", "300ms", transport);
    server
        .wait_log(&["new session replaces the node's previous one"], 1, UP)
        .await;
    // Not only at once: still a while after the replacement.
    for _ in 0..5 {
        stream.write_all(b"drain").await.expect("write");
        within("echo", Duration::from_secs(5), stream.read_exact(&mut buf))
            .await
            .expect("the replaced session still serves its stream");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.admin(&["node", "revoke", VICTIM]);
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        let mut byte = [0u8; 1];
        for _ in 0..1000 {
            if stream.write_all(b"x").await.is_err() {
                return;
            }
            match stream.read(&mut byte).await {
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        panic!("still echoing after 1000 round trips");
    })
    .await;
    assert!(
        cut.is_ok(),
        "the replaced session's stream still echoed 5 s after revocation"
    );
}
