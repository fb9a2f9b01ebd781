//! The edge's admin listener, over real HTTP against the real `tunnel-edge` binary:
//! `/readyz` follows the sessions (503 before any server is up, 200 with a session to every
//! announced replica, 503 again once the server dies), and `/metrics` passes
//! `promtool check metrics`, shows the tunneled bytes of a CONNECT and negotiates
//! OpenMetrics like the server.

use std::net::SocketAddr;
use std::time::Duration;

use tether_tests::frontend::{admin_get, metric, read_answer};
use tether_tests::{poll_until, Cluster, ClusterOptions, EdgeOptions, EdgeProc, EdgeTuning};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long readiness may take to follow the session: reconnect bound (500 ms in the test
/// tuning) plus the server's start, with margin for a loaded CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Poll `/readyz` until it answers `status`; the body.
async fn wait_readyz(admin: SocketAddr, status: u16) -> String {
    poll_until(
        &format!("edge /readyz {status}"),
        READY_TIMEOUT,
        Duration::from_millis(25),
        || async move {
            let (got, body) = admin_get(admin, "/readyz").await.ok()?;
            (got == status).then_some(body)
        },
    )
    .await
}

/// `GET /metrics` with an `Accept` header; Content-Type and body.
async fn scrape(admin: SocketAddr, accept: &str) -> (String, String) {
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let answer = read_answer(&mut tcp, false).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let content_type = answer.header("content-type").unwrap_or_default();
    (content_type.to_string(), answer.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_admin_readiness_follows_sessions_and_metrics_check_out() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    // A fresh edge with its admin listener, started while no server runs.
    cluster.server.kill();
    let ports = vec![
        cluster.kubelet.addr.port(),
        cluster.echo.addr.port(),
        cluster.peer.addr.port(),
    ];
    cluster.edge = EdgeProc::start_tuned(
        &cluster.pki,
        &[cluster.server.addrs.edge],
        &EdgeOptions {
            files: cluster.edge_files.clone(),
            allow_ports: ports,
        },
        &EdgeTuning {
            admin: true,
            ..EdgeTuning::default()
        },
    );
    let admin = cluster.edge.admin_addr().await;

    assert_eq!(admin_get(admin, "/healthz").await.unwrap().0, 200);
    let (status, body) = admin_get(admin, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("no session has reached a server yet"),
        "{body}"
    );
    assert!(body.contains("every replica"), "the rule is stated: {body}");

    cluster.server.restart().await;
    cluster
        .server
        .wait_for_edge_session(tether_tests::NODE)
        .await;
    let body = wait_readyz(admin, 200).await;
    assert!(body.contains("1 of 1"), "{body}");

    const LEN: u64 = 64 << 10;
    cluster.checked_exchange(1, LEN).await;
    let (content_type, text) = scrape(admin, "text/plain").await;
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let value = |series: &str| metric(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert!(value("tether_edge_tunneled_bytes_total{direction=\"to_target\"}") >= LEN as f64);
    assert!(value("tether_edge_tunneled_bytes_total{direction=\"from_target\"}") >= LEN as f64);
    assert!(value("tether_edge_dials_total{result=\"ok\"}") >= 1.0);
    assert_eq!(value("tether_edge_sessions_up"), 1.0);
    assert_eq!(value("tether_edge_replicas_announced"), 1.0);
    assert!(
        value("tether_edge_reconnects_total") >= 1.0,
        "refused before the server came"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(value("tether_edge_certificate_expiry_timestamp_seconds") > now);
    for family in [
        "tether_edge_build_info",
        "tether_edge_replica_session_up",
        "tether_edge_upstream_streams_total",
        "tether_edge_upstream_bytes_total",
    ] {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family}:\n{text}"
        );
    }
    if let Some(promtool) = tether_tests::monitoring::promtool() {
        let (ok, report) =
            tether_tests::monitoring::run(&promtool, &["check", "metrics"], Some(&text)).await;
        assert!(ok, "promtool check metrics:\n{report}\n{text}");
    }
    let (content_type, om) = scrape(
        admin,
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    )
    .await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(om.trim_end().ends_with("# EOF"), "{om}");

    cluster.server.kill();
    let body = wait_readyz(admin, 503).await;
    assert!(body.contains("0 of 1"), "{body}");
}
