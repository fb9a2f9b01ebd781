//! What an operator's monitoring reads: `/metrics` passes `promtool check metrics` (Debian's
//! `prometheus` package, installed by `.ci/run`) in the text format it asks for, OpenMetrics
//! is served to scrapers that ask for it, and the shipped alert rules and Grafana dashboard
//! (`deploy/monitoring/`) pass `promtool check rules` and use only metrics the server exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tether_tests::frontend::read_answer;
use tether_tests::monitoring::{promtool, run};
use tether_tests::{Cluster, ClusterOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

/// `GET /metrics` with `accept`; the Content-Type and the body.
async fn scrape(cluster: &Cluster, accept: &str) -> (String, String) {
    let admin = cluster.server.addrs.admin;
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let answer = read_answer(&mut tcp, false).await.unwrap();
    assert_eq!(answer.status, 200);
    let content_type = answer
        .header("content-type")
        .unwrap_or_default()
        .to_string();
    (content_type, answer.body)
}

/// Metric names (`tether_...`) in PromQL expressions.
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tether_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Names present in Prometheus text: samples, and families declared with `# HELP` (a
/// labelled family has no sample until its first event; a histogram's samples are
/// `_bucket`, `_sum` and `_count`).
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            for suffix in ["", "_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else if !line.starts_with('#') {
            names.extend(line.split(['{', ' ']).next().map(str::to_string));
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_rules_and_dashboard_check_out() {
    let Some(promtool) = promtool() else { return };
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    // Some traffic, so the dial, byte and histogram families have samples.
    cluster.checked_exchange(1, 64 << 10).await;
    let refused = cluster.connect_answer("192.0.2.77:10250").await;
    assert_ne!(refused.status, 200);

    let (content_type, text) = scrape(&cluster, "text/plain").await;
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let (ok, report) = run(&promtool, &["check", "metrics"], Some(&text)).await;
    assert!(ok, "promtool check metrics:\n{report}\n{text}");
    for family in [
        "tether_build_info",
        "tether_process_open_fds",
        "tether_process_resident_memory_bytes",
        "tether_certificate_expiry_timestamp_seconds",
        "tether_stream_duration_seconds",
        "tether_joins_total",
        "tether_join_refusals_total",
        "tether_join_lockouts_total",
        "tether_upstream_streams_total",
        "tether_upstream_bytes_total",
        "tether_edge_certificate_soonest_expiry_timestamp_seconds",
        "tether_edge_certificates_expiring",
    ] {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} missing:\n{text}"
        );
    }

    let (content_type, om) = scrape(
        &cluster,
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    )
    .await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(om.trim_end().ends_with("# EOF"), "{om}");

    let exported = exported(&text);
    let rules = monitoring_dir().join("alerts.yaml");
    let (ok, report) = run(
        &promtool,
        &["check", "rules", rules.to_str().unwrap()],
        None,
    )
    .await;
    assert!(ok, "promtool check rules:\n{report}");
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring_dir().join("dashboard.json")).unwrap(),
    )
    .expect("dashboard.json is JSON");
    let mut exprs = vec![rules_text];
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| names_in(e)).collect();
    assert!(used.len() >= 8, "{used:?}");
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "used but not exported: {missing:?}\n{text}"
    );
}

/// The registration and edge-certificate families, after a join, a refused join (which
/// locks its source out) and the joined node's session: present, counted, and still
/// passing `promtool check metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_refusal_lockout_and_edge_certificate_families_check_out() {
    use tether_tests::frontend::{admin_get, metric};
    use tether_tests::registration::{JoinedEdge, RegistrationOptions, RegistrationServer};
    let Some(promtool) = promtool() else { return };
    let pki = tether_tests::Pki::new();
    let server = RegistrationServer::start(
        &pki,
        &RegistrationOptions {
            lockout_after: 1,
            ..RegistrationOptions::default()
        },
    )
    .await;
    let token = server.create_token(&[]);
    let mut edge = JoinedEdge::new();
    let (ok, out) = edge.join(&pki, &server, &token, "edge-m", &["192.0.2.30"], &[]);
    assert!(ok, "{out}");
    edge.run(&server, &[10250], "info");
    server
        .wait_log(
            &["edge session established", "edge-m"],
            1,
            std::time::Duration::from_secs(20),
        )
        .await;
    // Well-formed but unknown: refused by the server, and the source locked out after it.
    let (ok, out) = JoinedEdge::new().join(
        &pki,
        &server,
        "abcdef.0123456789abcdef",
        "edge-x",
        &["192.0.2.31"],
        &[],
    );
    assert!(!ok, "{out}");

    let (status, text) = admin_get(server.admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let (ok, report) = run(&promtool, &["check", "metrics"], Some(&text)).await;
    assert!(ok, "promtool check metrics:\n{report}\n{text}");
    let value = |series: &str| metric(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert_eq!(value("tether_joins_total{call=\"join\"}"), 1.0);
    assert_eq!(
        value("tether_join_refusals_total{call=\"join\",reason=\"unknown\"}"),
        1.0
    );
    assert_eq!(value("tether_join_lockouts_total"), 1.0);
    // A 1 h certificate: within a day, and the soonest expiry lies ahead.
    assert_eq!(
        value("tether_edge_certificates_expiring{within_days=\"1\"}"),
        1.0
    );
    let now = tunnel_io::check::unix_now() as f64;
    let soonest = value("tether_edge_certificate_soonest_expiry_timestamp_seconds");
    assert!(
        soonest > now && soonest <= now + 3600.0 + 300.0,
        "{soonest}"
    );
    assert!(
        text.contains("# HELP tether_stream_duration_seconds "),
        "{text}"
    );
    assert!(
        text.contains("# HELP tether_upstream_streams_total "),
        "{text}"
    );
}
