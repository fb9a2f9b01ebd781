//! What operators see: the admin endpoint's health, readiness and metrics, and one audit
//! log line per closed stream.

use std::time::{Duration, Instant};

use tether_tests::data::{exchange, PeerRequest};
use tether_tests::frontend::{admin_get, connect_answer, metric, tls_to};
use tether_tests::{poll_until, within, Cluster, ClusterOptions, NODE, UNKNOWN_NODE_IP};

/// Two checksummed exchanges of known sizes through the mTLS frontend; returns the bytes
/// each direction carried (the request header counts toward the edge).
async fn two_exchanges(cluster: &mut Cluster) -> (u64, u64) {
    let target = cluster.target(cluster.peer.addr.port());
    let mut to_edge = 0;
    let mut from_edge = 0;
    for (seed, send, reply) in [(1u64, 1000u64, 2000u64), (2, 30_000, 4_000)] {
        let tunnel = cluster.connect(&target).await.expect("CONNECT");
        let request = PeerRequest {
            seed,
            reply_len: reply,
            reply_after_eof: false,
        };
        within(
            "an exchange",
            Duration::from_secs(10),
            exchange(tunnel, request, send),
        )
        .await
        .expect("exchange");
        let report = within(
            "the peer's report",
            Duration::from_secs(10),
            cluster.peer.next_report(),
        )
        .await;
        assert_eq!(report.error, None);
        to_edge += PeerRequest::LEN as u64 + send;
        from_edge += reply;
    }
    (to_edge, from_edge)
}

#[tokio::test]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let admin = cluster.server.addrs.admin;
    let (status, body) = admin_get(admin, "/healthz").await.expect("GET /healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = admin_get(admin, "/readyz").await.expect("GET /readyz");
    assert_eq!((status, body.trim()), (200, "ready"));
    let (status, _) = admin_get(admin, "/nope").await.expect("GET /nope");
    assert_eq!(status, 404);
    cluster.wait_edges_connected(1).await;

    let (to_edge, from_edge) = two_exchanges(&mut cluster).await;
    let refusals = [
        (
            format!("{UNKNOWN_NODE_IP}:{}", cluster.kubelet.addr.port()),
            502,
        ),
        (cluster.target(1), 403),
    ];
    for (target, status) in refusals {
        let mut tls = tls_to(
            cluster.server.addrs.connect_tcp,
            cluster.pki.frontend_client_tls(),
        )
        .await
        .expect("TLS to the frontend");
        let refused = connect_answer(&mut tls, &target)
            .await
            .expect("CONNECT answer");
        assert_eq!(refused.status, status, "{refused:?}");
    }

    let expected = [
        ("tether_edges_connected", 1.0),
        ("tether_streams_open", 0.0),
        ("tether_dials_pending", 0.0),
        (r#"tether_dials_total{frontend="connect",result="ok"}"#, 2.0),
        (
            r#"tether_dials_total{frontend="connect",result="no_route"}"#,
            1.0,
        ),
        (
            r#"tether_dials_total{frontend="connect",result="policy_denied"}"#,
            1.0,
        ),
        (
            r#"tether_tunneled_bytes_total{direction="to_edge"}"#,
            to_edge as f64,
        ),
        (
            r#"tether_tunneled_bytes_total{direction="from_edge"}"#,
            from_edge as f64,
        ),
        (r#"tether_edge_handshakes_total{result="ok"}"#, 1.0),
    ];
    // Byte counters are added when a stream's pipe ends, just after the client sees EOF.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = cluster.metrics().await;
        let wrong: Vec<_> = expected
            .iter()
            .filter(|(series, value)| metric(&text, series) != Some(*value))
            .collect();
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {wrong:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `key=value` field of a text log line (value up to the next space, quotes removed).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let value = line[start..].split_whitespace().next()?;
    Some(value.trim_matches('"'))
}

#[tokio::test]
async fn audit_log_records_each_closed_stream_with_node_target_and_bytes() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let target = cluster.target(cluster.peer.addr.port());
    let (to_edge, from_edge) = two_exchanges(&mut cluster).await;
    let lines = poll_until(
        "two `stream closed` audit lines",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let lines: Vec<String> = cluster
                .server
                .log()
                .lines()
                .filter(|l| l.contains(" audit: stream closed "))
                .map(str::to_owned)
                .collect();
            std::future::ready((lines.len() >= 2).then_some(lines))
        },
    )
    .await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let total = |key: &str| {
        lines
            .iter()
            .map(|l| {
                field(l, key)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum::<u64>()
    };
    assert_eq!(total("bytes_to_edge"), to_edge, "{lines:#?}");
    assert_eq!(total("bytes_from_edge"), from_edge, "{lines:#?}");
    for line in &lines {
        assert_eq!(field(line, "node"), Some(NODE), "{line}");
        assert_eq!(field(line, "dest"), Some(target.as_str()), "{line}");
        assert_eq!(field(line, "result"), Some("ok"), "{line}");
        assert_eq!(field(line, "frontend"), Some("connect"), "{line}");
    }
}

#[tokio::test]
async fn json_audit_log_keeps_the_stream_target() {
    let mut cluster = Cluster::start(ClusterOptions {
        log_json: true,
        ..ClusterOptions::default()
    })
    .await;
    let target = cluster.target(cluster.peer.addr.port());
    let (to_edge, from_edge) = two_exchanges(&mut cluster).await;
    let lines = poll_until(
        "two `stream closed` audit lines",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let lines: Vec<(String, serde_json::Value)> = cluster
                .server
                .log()
                .lines()
                .filter_map(|l| {
                    Some((
                        l.to_owned(),
                        serde_json::from_str::<serde_json::Value>(l).ok()?,
                    ))
                })
                .filter(|(_, v)| v["message"] == "stream closed")
                .collect();
            std::future::ready((lines.len() >= 2).then_some(lines))
        },
    )
    .await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let total = |key: &str| {
        lines
            .iter()
            .map(|(_, v)| v[key].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(total("bytes_to_edge"), to_edge, "{lines:#?}");
    assert_eq!(total("bytes_from_edge"), from_edge, "{lines:#?}");
    for (raw, line) in &lines {
        assert_eq!(line["node"], NODE, "{raw}");
        assert_eq!(line["result"], "ok", "{raw}");
        // Each key once: JSON consumers keep only one of duplicate keys.
        assert_eq!(
            raw.matches("\"target\":").count(),
            1,
            "duplicate `target` keys: {raw}"
        );
        assert_eq!(line["dest"], target.as_str(), "{raw}");
    }
}
