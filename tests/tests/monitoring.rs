//! What an operator's monitoring reads: `/metrics` passes `promtool check metrics` (Debian's
//! `prometheus` package, installed by `.ci/run`) in the text format it asks for, OpenMetrics
//! is served to scrapers that ask for it, and the shipped alert rules and Grafana dashboard
//! (`deploy/monitoring/`) pass `promtool check rules` and use only metrics the server exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tether_tests::frontend::read_answer;
use tether_tests::{Cluster, ClusterOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing under CI: .ci/run installs Debian's prometheus package"
        );
        eprintln!("SKIPPED: promtool not installed (apt-get install prometheus)");
    }
    found
}

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

async fn run(tool: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = tokio::process::Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
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
