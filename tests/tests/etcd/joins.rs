//! Joins decided once for the whole fleet, and what happens to them when etcd fails.

use std::time::Duration;

use tether_tests::data::{exchange, PeerRequest};
use tether_tests::registration::JoinedEdge;
use tether_tests::targets::{ChecksumPeer, EchoServer};

use crate::fixture::{Replicas, REFUSED};

/// Bytes each way of the transfer that spans the etcd outage: 16 MiB, a few seconds
/// through the tunnel on loopback in a debug build, longer than the kills take.
const TRANSFER: u64 = 16 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_token_raced_by_20_joins_over_3_replicas_admits_exactly_one_and_revoked_tokens_are_refused(
) {
    let Some(r) = Replicas::start("single_use_token_race", 3, vec![10250]).await else {
        return;
    };
    let Some(balancer) = r.balancer("single_use_token_race").await else {
        return;
    };
    let token = r.servers[0].create_token(&["--usage-limit", "1"]);
    let (ok, refused) = r.join_burst(balancer.addr, &token, "race", 1, 20).await;
    assert_eq!(
        ok, 1,
        "exactly one certificate for a single-use token: {refused:#?}"
    );
    assert_eq!(refused.len(), 19);
    for output in &refused {
        assert!(
            output.contains(REFUSED),
            "the generic refusal, not: {output}"
        );
    }
    // A token created on another replica, limit 5: exactly 5 of 20.
    let token = r.servers[2].create_token(&["--usage-limit", "5"]);
    let (ok, refused) = r.join_burst(balancer.addr, &token, "five", 2, 20).await;
    assert_eq!(ok, 5, "a limit of 5 admits exactly 5: {refused:#?}");
    assert!(refused.iter().all(|o| o.contains(REFUSED)), "{refused:#?}");
    let listed = r.servers[1].admin(&["token", "list"]);
    let used_up = listed.lines().filter(|l| l.contains("used-up")).count();
    assert_eq!(
        used_up, 2,
        "both tokens listed as used up from etcd:\n{listed}"
    );
    revoked_token_is_refused_on_every_replica(&r, balancer.addr).await;
}

/// `token create|list|revoke` with `--config` (etcd), each from another replica's config: the
/// list shows both tokens and neither secret; a join with the revoked one gets the generic
/// refusal, the other is admitted.
async fn revoked_token_is_refused_on_every_replica(r: &Replicas, balancer: std::net::SocketAddr) {
    let kept = r.servers[0].create_token(&["--description", "kept"]);
    let dropped = r.servers[1].create_token(&["--description", "dropped"]);
    let id = |token: &str| token.split_once('.').expect("id.secret").0.to_owned();
    let secret = |token: &str| token.split_once('.').expect("id.secret").1.to_owned();
    let listed = r.servers[2].admin(&["token", "list"]);
    for token in [&kept, &dropped] {
        assert!(listed.contains(&id(token)), "{listed}");
        assert!(
            !listed.contains(&secret(token)),
            "no secret listed:\n{listed}"
        );
    }
    r.servers[2].admin(&["token", "revoke", &id(&dropped)]);
    let listed = r.servers[0].admin(&["token", "list"]);
    let state = |token: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(&id(token)))
            .and_then(|l| l.split_whitespace().nth(5))
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        (state(&kept), state(&dropped)),
        ("active".into(), "revoked".into()),
        "{listed}"
    );
    // The revoked token on every replica (round robin over 3), then the kept one.
    let (ok, refused) = r.join_burst(balancer, &dropped, "dropped", 3, 3).await;
    assert_eq!(ok, 0, "a revoked token admits nobody");
    assert!(refused.iter().all(|o| o.contains(REFUSED)), "{refused:#?}");
    let (ok, refused) = r.join_burst(balancer, &kept, "kept", 4, 1).await;
    assert_eq!(ok, 1, "the other token still admits: {refused:#?}");
    for server in &r.servers {
        assert!(
            server.log_lines_with(&["join refused", &id(&dropped)]) >= 1,
            "each replica refused the revoked token:\n{}",
            server.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_loss_keeps_joins_and_total_loss_fails_them_closed_but_not_tunnels() {
    let echo = EchoServer::start().await;
    let mut peer = ChecksumPeer::start().await;
    let ports = vec![echo.addr.port(), peer.addr.port()];
    let Some(mut r) = Replicas::start("etcd_faults", 1, ports.clone()).await else {
        return;
    };
    let server = &r.servers[0];
    let token = server.create_token(&[]);
    let mut edge = JoinedEdge::new();
    let (ok, output) = edge.join(&r.pki, server, &token, "fault-0", &["10.78.0.1"], &[]);
    assert!(ok, "{output}");
    edge.run(server, &ports, "info");
    let target = format!("10.78.0.1:{}", echo.addr.port());
    tether_tests::poll_until(
        "the edge's session",
        Duration::from_secs(15),
        Duration::from_millis(50),
        || async {
            tunnel_server::client::connect_tls(
                server.connect_tcp,
                r.pki.frontend_client_tls(),
                &target,
            )
            .await
            .ok()
            .map(|_| ())
        },
    )
    .await;

    // One member down: the other two keep a quorum (after an election if it led).
    r.etcd.kill(0);
    let joined = retry_join(&r, &token, "fault-1", "10.78.0.2", Duration::from_secs(10)).await;
    assert!(joined.0, "join with one member down: {}", joined.1);

    // Every member down while a checksummed transfer runs: it finishes intact; joins fail
    // closed with the clear error; new CONNECTs to the connected edge still work.
    let tunnel = tunnel_server::client::connect_tls(
        r.servers[0].connect_tcp,
        r.pki.frontend_client_tls(),
        &format!("10.78.0.1:{}", peer.addr.port()),
    )
    .await
    .expect("CONNECT to the checksum peer");
    let request = PeerRequest {
        seed: 14,
        reply_len: TRANSFER,
        reply_after_eof: false,
    };
    let transfer = tokio::spawn(exchange(tunnel, request, TRANSFER));
    r.etcd.kill(1);
    r.etcd.kill(2);
    let server = &r.servers[0];
    let started = std::time::Instant::now();
    let (ok, output) =
        JoinedEdge::new().join(&r.pki, server, &token, "fault-2", &["10.78.0.3"], &[]);
    assert!(!ok, "a join without etcd must fail");
    assert!(
        output.contains("state store unavailable"),
        "the clear error: {output}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "failed within the request timeout"
    );
    server
        .echo_through(&r.pki, &target, b"etcd is down, the tunnel is not")
        .await;
    let _stream = tunnel_server::client::connect_tls(
        server.connect_tcp,
        r.pki.frontend_client_tls(),
        &target,
    )
    .await
    .expect("a new CONNECT to a connected edge with etcd down");
    let client = tether_tests::within("the transfer", Duration::from_secs(60), transfer)
        .await
        .expect("transfer task")
        .expect("transfer with etcd down");
    let report = tether_tests::within(
        "the peer's report",
        Duration::from_secs(10),
        peer.next_report(),
    )
    .await;
    report.assert_matches(
        "transfer across the etcd outage",
        request,
        TRANSFER,
        &client,
    );
    assert!(
        server.log_lines_with(&["join refused", "state_store_unavailable"]) >= 1,
        "audited:\n{}",
        server.log()
    );

    // Members back: joins work again without a restart of the replica.
    r.etcd.restart_all(&[0, 1, 2]).await;
    let joined = retry_join(&r, &token, "fault-3", "10.78.0.4", Duration::from_secs(20)).await;
    assert!(joined.0, "join after etcd returned: {}", joined.1);
    store_metrics_pass_promtool(&r).await;
}

/// The store's families after an outage: latency and errors by operation, watch lag and last
/// sync, all passing `promtool check metrics`.
async fn store_metrics_pass_promtool(r: &Replicas) {
    let admin = r.servers[0].admin;
    // The watch resyncs within its retry pause once etcd is back.
    let text = tether_tests::poll_until(
        "a sync after etcd returned",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async move {
            let (_, text) = tether_tests::frontend::admin_get(admin, "/metrics")
                .await
                .ok()?;
            let synced = text.lines().any(|l| {
                l.starts_with("tether_state_last_sync_timestamp_seconds ") && !l.ends_with(" 0")
            });
            synced.then_some(text)
        },
    )
    .await;
    for needle in [
        "tether_state_operation_duration_seconds_count{op=\"join\"}",
        "tether_state_operation_errors_total{op=\"token_get\"}",
        "tether_state_operation_errors_total{op=\"watch\"}",
        "tether_state_watch_lag_seconds ",
    ] {
        assert!(text.contains(needle), "{needle} in /metrics:\n{text}");
    }
    let Some(promtool) = tether_tests::monitoring::promtool() else {
        return;
    };
    let (ok, report) =
        tether_tests::monitoring::run(&promtool, &["check", "metrics"], Some(&text)).await;
    assert!(ok, "promtool check metrics:\n{report}");
}

/// Join until it succeeds or `timeout` passes (an election may be under way).
async fn retry_join(
    r: &Replicas,
    token: &str,
    node: &str,
    ip: &str,
    timeout: Duration,
) -> (bool, String) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let edge = JoinedEdge::new();
        let (ok, output) = edge.join(&r.pki, &r.servers[0], token, node, &[ip], &[]);
        if ok || std::time::Instant::now() >= deadline {
            return (ok, output);
        }
        assert!(
            output.contains("state store unavailable"),
            "only unavailability may be retried: {output}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_replayed_to_another_replica_is_refused_and_node_list_reads_etcd() {
    let Some(r) = Replicas::start("csr_replay_across_replicas", 3, vec![10250]).await else {
        return;
    };
    // Uses left on the token: only the certified-key record in etcd can refuse the replay.
    let token = r.servers[0].create_token(&["--usage-limit", "10"]);
    let ip: std::net::IpAddr = "10.80.0.1".parse().expect("ip");
    let (_, csr_der) = tunnel_edge::join::new_csr("replayed", &[ip]).expect("csr");
    let request = tunnel_io::registration::pb::JoinRequest {
        token,
        node_name: "replayed".into(),
        node_ips: vec![ip.to_string()],
        csr_der,
    };
    let ca = r.pki.layout.ca_cert();
    let call = |i: usize, request| {
        let address = r.servers[i].registration.to_string();
        let ca = ca.clone();
        async move {
            tunnel_edge::join::call_join(&address, "127.0.0.1", &ca, request)
                .await
                .expect("registration API reachable")
        }
    };
    call(0, request.clone()).await.expect("the first join");
    for i in [1, 2] {
        let replayed = call(i, request.clone()).await.expect_err("a replay");
        assert_eq!(replayed.message(), REFUSED, "replica {i}");
        assert_eq!(
            r.servers[i].log_lines_with(&["join refused", "reason=\"replay\""]),
            1,
            "replica {i} refused it as a replay:\n{}",
            r.servers[i].log()
        );
    }
    // Another node joins through replica 1 and is revoked through replica 2's config.
    let gone: std::net::IpAddr = "10.80.0.2".parse().expect("ip");
    let (_, csr_der) = tunnel_edge::join::new_csr("replay-gone", &[gone]).expect("csr");
    let joined = tunnel_io::registration::pb::JoinRequest {
        node_name: "replay-gone".into(),
        node_ips: vec![gone.to_string()],
        csr_der,
        ..request
    };
    call(1, joined).await.expect("the second node's join");
    r.servers[2].admin(&["node", "revoke", "replay-gone"]);
    node_list_from_etcd_matches_a_replicas_view(&r).await;
}

/// `node list --config` reads etcd: the joined node with its certificate's expiry, the revoked
/// one with its revocation time, the same rows a replica's admin API gives once its watch
/// has the revocation.
async fn node_list_from_etcd_matches_a_replicas_view(r: &Replicas) {
    let listed = r.servers[0].admin(&["node", "list", "-o", "json"]);
    let from_etcd: Vec<tunnel_server::admin::api::NodeView> =
        serde_json::from_str(&listed).expect("node list JSON");
    let row = |name: &str| {
        from_etcd
            .iter()
            .find(|n| n.node == name)
            .unwrap_or_else(|| panic!("{name} listed from etcd: {listed}"))
            .clone()
    };
    let joined = row("replayed");
    assert!(joined.joined && !joined.revoked, "{joined:?}");
    assert!(joined.certificate_expires.is_some(), "{joined:?}");
    assert_eq!(
        joined.ips,
        vec!["10.80.0.1".parse::<std::net::IpAddr>().expect("ip")]
    );
    let revoked = row("replay-gone");
    assert!(
        revoked.revoked && revoked.revoked_at.is_some(),
        "{revoked:?}"
    );
    assert!(revoked.certificate_expires.is_some(), "{revoked:?}");
    let admin = r.servers[1].admin.to_string();
    let expected = from_etcd.clone();
    tether_tests::poll_until(
        "replica 1's admin API lists the same rows",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let (admin, expected) = (admin.clone(), expected.clone());
            async move {
                let nodes = tunnel_server::admin::fleet::get::<
                    tunnel_server::admin::api::NodesResponse,
                >(&admin, tunnel_server::admin::api::NODES_PATH)
                .await
                .ok()?;
                (nodes.nodes == expected).then_some(())
            }
        },
    )
    .await;
    let table = r.servers[2].admin(&["node", "list"]);
    // NODE IPS POOL CONNECTED CERT-EXPIRES REVOKED REVOKED-AT
    let columns = |name: &str| -> Vec<String> {
        table
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .find(|c| c.first().map(String::as_str) == Some(name))
            .unwrap_or_else(|| panic!("{name} in the table:\n{table}"))
    };
    let expires = |view: &tunnel_server::admin::api::NodeView| view.certificate_expires.clone();
    let (joined_row, revoked_row) = (columns("replayed"), columns("replay-gone"));
    assert_eq!(
        joined_row[3..],
        [
            "no".to_owned(),
            expires(&joined).expect("expiry"),
            "no".into(),
            "-".into()
        ],
        "{table}"
    );
    assert_eq!(
        revoked_row[3..],
        [
            "no".to_owned(),
            expires(&revoked).expect("expiry"),
            "yes".into(),
            revoked.revoked_at.clone().expect("revocation time"),
        ],
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_through_one_replica_makes_the_new_certificate_current_on_the_others() {
    let echo = EchoServer::start().await;
    let port = echo.addr.port();
    let Some(r) = Replicas::start_with("renewal_across_replicas", 2, vec![port], "6s").await else {
        return;
    };
    let token = r.servers[0].create_token(&[]);
    let mut edge = JoinedEdge::new();
    let (ok, output) = edge.join(
        &r.pki,
        &r.servers[0],
        &token,
        "renew-a",
        &["10.83.0.1"],
        &[],
    );
    assert!(ok, "{output}");
    // The edge renews through replica 0 (where it joined) and holds its session on replica 1.
    edge.run(&r.servers[1], &[port], "info");
    r.servers[0]
        .wait_log(
            &["node certificate renewed", "renew-a"],
            1,
            Duration::from_secs(20),
        )
        .await;
    // Replica 1 learnt the new current certificate through the watch: its node list (the
    // identity view its edge listener checks) names the renewed serial.
    let target = format!("10.83.0.1:{port}");
    let admin = r.servers[1].admin.to_string();
    let state = edge.state.clone();
    tether_tests::poll_until(
        "replica 1 sees the renewed certificate as current",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let (admin, state) = (admin.clone(), state.clone());
            async move {
                let renewed = std::fs::read_to_string(state.join("cert.pem")).ok()?;
                let renewed = tunnel_server::pki::certificate_facts_pem(&renewed)?.serial;
                let nodes = tunnel_server::admin::fleet::get::<
                    tunnel_server::admin::api::NodesResponse,
                >(&admin, tunnel_server::admin::api::NODES_PATH)
                .await
                .ok()?;
                let current = nodes.nodes.into_iter().find(|n| n.node == "renew-a")?;
                (current.certificate_serial.as_deref() == Some(renewed.as_str())).then_some(())
            }
        },
    )
    .await;
    r.servers[1]
        .echo_through(&r.pki, &target, b"renewed elsewhere")
        .await;
}
