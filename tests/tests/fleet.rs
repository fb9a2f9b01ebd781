//! Operator views and the revoked edge, end to end: real `tunnel-server` and `tunnel-edge`
//! processes joined through the registration API, `tunnel-server edges` and `node list`
//! reading the admin API over real HTTP, and a revoked node's edge told why it is refused
//! and then retrying only at its maximum backoff (issue 12; TESTPLAN 17).

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tether_tests::frontend::{admin_get, metric};
use tether_tests::registration::{JoinedEdge, RegistrationOptions, RegistrationServer};
use tether_tests::targets::EchoServer;
use tether_tests::{binary, poll_until, Pki};

const UP: Duration = Duration::from_secs(15);

/// `tunnel-server ARGS` as an operator runs it (no `--config`).
fn operator(args: &[&str]) -> Output {
    Command::new(binary("tunnel-server"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run tunnel-server")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

fn json(output: &Output) -> Value {
    serde_json::from_str(&stdout(output)).expect("JSON output")
}

/// Two joined edges, each routed: (server, edges, echo target). `idc-a` holds its session
/// over TCP, `idc-b` over QUIC.
async fn two_edges(pki: &Pki) -> (RegistrationServer, [JoinedEdge; 2], EchoServer) {
    let echo = EchoServer::start().await;
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
    let mut edges = [JoinedEdge::new(), JoinedEdge::new()];
    for (edge, (node, ip)) in edges
        .iter_mut()
        .zip([("idc-a", "192.0.2.10"), ("idc-b", "192.0.2.11")])
    {
        let (ok, output) = edge.join(pki, &server, &token, node, &[ip], &[]);
        assert!(ok, "{output}");
        let transport = match node {
            "idc-a" => "tcp",
            _ => "quic",
        };
        let extra = format!("transport = \"{transport}\"");
        edge.run_with(&server, &[port], "info", &extra, &[]);
        server
            .wait_log(&["edge session established", node], 1, UP)
            .await;
    }
    (server, edges, echo)
}

fn is_rfc3339(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|s| s.len() == 20 && s.ends_with('Z') && s.as_bytes()[10] == b'T')
}

/// An address where nothing listens (bound, then released).
fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    drop(listener);
    addr
}

#[tokio::test]
async fn edges_and_node_list_show_the_fleet_from_the_admin_api() {
    let pki = Pki::new();
    let (server, _edges, echo) = two_edges(&pki).await;
    let admin = server.admin.to_string();
    server
        .echo_through(&pki, &format!("192.0.2.10:{}", echo.addr.port()), b"hello")
        .await;

    // `edges -o json`: both edges, their IPs, real JSON types, bytes after the CONNECT.
    let listed = json(&operator(&["edges", "--admin", &admin, "-o", "json"]));
    let edges = listed.as_array().expect("an array of edges");
    assert_eq!(edges.len(), 2, "{listed:#}");
    let a = &edges[0];
    let b = &edges[1];
    assert_eq!(a["node"], "idc-a");
    assert_eq!(a["ips"], serde_json::json!(["192.0.2.10"]));
    assert_eq!(b["node"], "idc-b");
    assert_eq!(b["ips"], serde_json::json!(["192.0.2.11"]));
    assert!(a["bytes_to_edge"].as_u64().expect("a number") >= 5, "{a:#}");
    assert!(
        a["bytes_from_edge"].as_u64().expect("a number") >= 5,
        "{a:#}"
    );
    assert_eq!(b["bytes_to_edge"], 0, "{b:#}");
    assert_eq!(a["transport"], "tcp");
    assert_eq!(b["transport"], "quic");
    for edge in edges {
        assert_eq!(edge["admin"], admin.as_str());
        assert!(edge["replica"].as_str().is_some_and(|r| !r.is_empty()));
        assert!(edge["streams_open"].is_u64(), "{edge:#}");
        assert!(is_rfc3339(&edge["since"]), "{edge:#}");
        assert!(is_rfc3339(&edge["certificate_expires"]), "{edge:#}");
        assert!(edge["certificate_serial"].is_string(), "{edge:#}");
    }

    // The table: a header, one line per edge, columns aligned under the header.
    let table = stdout(&operator(&["edges", "--admin", &admin]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NODE "), "{table}");
    let column = lines[0].find("IPS").expect("IPS column");
    assert_eq!(lines[1].find("192.0.2.10"), Some(column), "{table}");
    assert_eq!(lines[2].find("192.0.2.11"), Some(column), "{table}");
    assert!(lines[1].contains(" tcp "), "{table}");

    // A revoked node: listed with its time, no longer connected; the other one untouched.
    let revoked = server.admin(&["node", "revoke", "idc-b"]);
    let nodes = poll_until("idc-b disconnected", UP, Duration::from_millis(100), || {
        let nodes = json(&operator(&[
            "node", "list", "--admin", &admin, "-o", "json",
        ]));
        let gone = nodes
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node"] == "idc-b"))
            .is_some_and(|n| n["connected"] == false);
        std::future::ready(gone.then_some(nodes))
    })
    .await;
    let by_name = |name: &str| {
        nodes
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} not listed: {nodes:#}"))
    };
    let (a, b) = (by_name("idc-a"), by_name("idc-b"));
    assert_eq!(a["connected"], true);
    assert_eq!(a["revoked"], false);
    assert_eq!(a["revoked_at"], Value::Null);
    assert_eq!(a["pool"], "default");
    assert_eq!(a["ips"], serde_json::json!(["192.0.2.10"]));
    assert!(is_rfc3339(&a["certificate_expires"]), "{a:#}");
    assert_eq!(b["revoked"], true);
    let at = b["revoked_at"].as_str().expect("revocation time");
    assert!(
        revoked.contains(at),
        "`node revoke` said {revoked:?}, the list {at}"
    );
    let table = stdout(&operator(&["node", "list", "--admin", &admin]));
    assert!(table.starts_with("NODE "), "{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with("idc-b "))
        .expect("idc-b row");
    assert!(line.contains(" yes ") && line.ends_with(at), "{table}");
    assert_eq!(
        json(&operator(&["edges", "--admin", &admin, "-o", "json"]))
            .as_array()
            .map(Vec::len),
        Some(1),
        "a revoked node's session is still listed"
    );
}

#[tokio::test]
async fn an_admin_address_that_does_not_answer_is_a_clear_error() {
    let dead = dead_address();
    for args in [
        vec!["edges", "--admin", &dead],
        vec!["node", "list", "--admin", &dead, "-o", "json"],
    ] {
        let output = operator(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(output.stdout.is_empty(), "{args:?} printed data");
        assert!(
            stderr.contains(&format!("admin API at {dead} does not answer"))
                && stderr.contains("refused"),
            "{args:?}: {stderr}"
        );
    }

    // One replica down among several: the others are listed, the dead one named, exit 1.
    let pki = Pki::new();
    let (server, _edges, _echo) = two_edges(&pki).await;
    let admin = server.admin.to_string();
    let output = operator(&["edges", "--admin", &admin, "--admin", &dead, "-o", "json"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&dead), "{stderr}");
    let partial: Value = serde_json::from_slice(&output.stdout).expect("JSON of the live one");
    assert_eq!(partial.as_array().map(Vec::len), Some(2), "{partial:#}");
}

/// Seconds since midnight of a log line's leading RFC 3339 timestamp.
fn seconds_of_day(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let time = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// The server-side count of refused-as-revoked handshakes.
async fn revoked_handshakes(server: &RegistrationServer) -> f64 {
    let (status, body) = admin_get(server.admin, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200);
    metric(&body, "tether_edge_handshakes_total{result=\"revoked\"}").unwrap_or(0.0)
}

#[tokio::test]
async fn a_revoked_edge_is_told_why_and_retries_only_at_max_backoff() {
    revoked_edge_is_told_why("tcp").await;
}

#[tokio::test]
async fn quic_a_revoked_edge_is_told_why_and_retries_only_at_max_backoff() {
    revoked_edge_is_told_why("quic").await;
}

async fn revoked_edge_is_told_why(transport: &str) {
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    const WINDOW: Duration = Duration::from_secs(5);
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
    let (ok, output) = edge.join(&pki, &server, &token, "idc-a", &["192.0.2.10"], &[]);
    assert!(ok, "{output}");
    edge.run_over(&server, &[port], "info", "1s", transport);
    server
        .wait_log(&["edge session established", "idc-a"], 1, UP)
        .await;
    let target = format!("192.0.2.10:{port}");
    server.echo_through(&pki, &target, b"before").await;

    let said = server.admin(&["node", "revoke", "idc-a"]);
    let at = said
        .split_whitespace()
        .find(|w| w.ends_with('Z') && w.contains('T'))
        .unwrap_or_else(|| panic!("no RFC 3339 time in {said:?}"))
        .to_owned();
    // The edge logs the reason with the time, at error level, once per attempt.
    let expected = format!("node idc-a revoked at {at}; re-join with a new token");
    poll_until(
        "the edge to log the refusal twice",
        UP,
        Duration::from_millis(50),
        || {
            let told = edge
                .log()
                .lines()
                .filter(|l| l.contains("ERROR") && l.contains(&expected))
                .count();
            std::future::ready((told >= 2).then_some(()))
        },
    )
    .await;

    // Server side: every attempt is a refused handshake, no more often than the maximum.
    let first = revoked_handshakes(&server).await;
    let started = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let attempts = revoked_handshakes(&server).await - first;
    let allowed = (started.elapsed().as_secs_f64() / MAX_BACKOFF.as_secs_f64()).ceil() + 1.0;
    assert!(
        attempts >= 2.0 && attempts <= allowed,
        "{attempts} revoked handshakes in {:?} with a {MAX_BACKOFF:?} maximum backoff",
        started.elapsed()
    );
    let told = edge.log().lines().filter(|l| l.contains(&expected)).count();
    assert!(
        told as f64 >= attempts,
        "{told} refusals logged for {attempts} attempts"
    );
    // And never sooner than the maximum after the previous one (full jitter would draw
    // many waits far below it): the gaps between the server's refusals.
    let refusals: Vec<f64> = server
        .log()
        .lines()
        .filter(|l| l.contains("edge session refused") && l.contains("idc-a is revoked"))
        .filter_map(seconds_of_day)
        .collect();
    assert!(refusals.len() >= 4, "{refusals:?}");
    let gaps: Vec<f64> = refusals
        .windows(2)
        .map(|w| (w[1] - w[0]).rem_euclid(86_400.0))
        .collect();
    let shortest = gaps.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        shortest >= MAX_BACKOFF.as_secs_f64() * 0.95,
        "a revoked edge came back after {shortest:.3} s (gaps {gaps:?})"
    );

    // Nothing routes to it: no session listed, CONNECT refused.
    let edges = json(&operator(&[
        "edges",
        "--admin",
        &server.admin.to_string(),
        "-o",
        "json",
    ]));
    assert_eq!(edges, serde_json::json!([]));
    let refused =
        tunnel_server::client::connect_tls(server.connect_tcp, pki.frontend_client_tls(), &target)
            .await;
    assert!(refused.is_err(), "a revoked node is reachable");
    assert_eq!(
        server.log_lines_with(&["edge session established", "idc-a"]),
        1,
        "a revoked node's session was established"
    );

    // Re-admitted the documented way while the edge runs: it sees the new certificate in
    // its state directory and comes back on its own.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let readmit = server.create_token(&["--reprovision", "idc-a"]);
    let (ok, output) = edge.join(
        &pki,
        &server,
        &readmit,
        "idc-a",
        &["192.0.2.10"],
        &["--force"],
    );
    assert!(ok, "{output}");
    server
        .wait_log(&["edge session established", "idc-a"], 2, UP)
        .await;
    server.echo_through(&pki, &target, b"back").await;
}
