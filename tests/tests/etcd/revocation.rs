//! `node revoke` on one replica reaches every replica through the etcd watch.

use std::time::{Duration, Instant};

use tether_tests::registration::JoinedEdge;

use crate::fixture::Replicas;

/// The bound the design promises: revoked on every replica within 2 s.
const REVOCATION_BOUND: Duration = Duration::from_secs(2);

async fn edges_on(admin: std::net::SocketAddr) -> Vec<String> {
    match tunnel_server::admin::fleet::get::<tunnel_server::admin::api::EdgesResponse>(
        &admin.to_string(),
        tunnel_server::admin::api::EDGES_PATH,
    )
    .await
    {
        Ok(r) => r.edges.into_iter().map(|e| e.node).collect(),
        Err(_) => vec!["?".into()],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_revoke_on_one_replica_closes_sessions_on_all_3_within_2s_and_a_new_token_readmits() {
    let Some(r) = Replicas::start("node_revoke_all_replicas", 3, vec![10250]).await else {
        return;
    };
    let token = r.servers[0].create_token(&[]);
    let first = JoinedEdge::new();
    let (ok, output) = first.join(&r.pki, &r.servers[0], &token, "rev-a", &["10.79.0.1"], &[]);
    assert!(ok, "{output}");
    // The same node identity holds a session with every replica.
    let mut edges = Vec::new();
    for server in &r.servers {
        let mut edge = JoinedEdge::new();
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&first.state)
            .arg(&edge.state)
            .status()
            .expect("cp");
        assert!(copied.success());
        edge.run_with_max_backoff(server, &[10250], "info", "300ms");
        edges.push(edge);
    }
    for server in &r.servers {
        let admin = server.admin;
        tether_tests::poll_until(
            "the node's session on every replica",
            Duration::from_secs(15),
            Duration::from_millis(50),
            || async move {
                edges_on(admin)
                    .await
                    .contains(&"rev-a".to_string())
                    .then_some(())
            },
        )
        .await;
    }
    // `tunnel-server edges --config` reads the fleet from etcd: one row per replica.
    tether_tests::poll_until(
        "every session published in etcd",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async {
            let out = r.servers[0].admin(&["edges", "-o", "json"]);
            let rows: Vec<serde_json::Value> = serde_json::from_str(&out).ok()?;
            let replicas: std::collections::BTreeSet<String> = rows
                .iter()
                .filter(|row| row["node"] == "rev-a")
                .filter_map(|row| row["replica"].as_str().map(str::to_owned))
                .collect();
            (replicas.len() == 3).then_some(())
        },
    )
    .await;

    let started = Instant::now();
    r.servers[1].admin(&["node", "revoke", "rev-a"]);
    for server in &r.servers {
        let admin = server.admin;
        tether_tests::poll_until(
            "the node's sessions closed on every replica",
            REVOCATION_BOUND * 2,
            Duration::from_millis(20),
            || async move { (!edges_on(admin).await.contains(&"rev-a".to_string())).then_some(()) },
        )
        .await;
    }
    let took = started.elapsed();
    eprintln!("revocation closed the node's sessions on 3 replicas in {took:?}");
    assert!(
        took <= REVOCATION_BOUND,
        "revocation took {took:?} (bound {REVOCATION_BOUND:?})"
    );
    // Its handshakes are refused everywhere: the edges keep retrying, no session returns.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for server in &r.servers {
        assert!(!edges_on(server.admin).await.contains(&"rev-a".to_string()));
        assert!(
            server.log_lines_with(&["edge session refused", "is revoked"]) >= 1,
            "the edge's retries refused as revoked:\n{}",
            server.log()
        );
    }
    for mut edge in edges {
        edge.stop();
    }
    // A token created after the revocation, allowed to re-provision the node, re-admits it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let readmit = r.servers[2].create_token(&["--reprovision", "rev-a"]);
    let again = JoinedEdge::new();
    let (ok, output) = again.join(
        &r.pki,
        &r.servers[2],
        &readmit,
        "rev-a",
        &["10.79.0.1"],
        &["--force"],
    );
    assert!(ok, "re-admitted with a new token: {output}");
}

/// The rows `tunnel-server edges --config` reads from etcd, as (node, replica).
fn fleet(config_of: &tether_tests::registration::RegistrationServer) -> Vec<(String, String)> {
    let out = config_of.admin(&["edges", "-o", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
    rows.iter()
        .map(|row| {
            let field = |k: &str| row[k].as_str().unwrap_or_default().to_owned();
            (field("node"), field("replica"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_sessions_vanish_from_the_fleet_view_with_its_lease() {
    let Some(r) = Replicas::start("dead_replica_sessions_vanish", 2, vec![10250]).await else {
        return;
    };
    let token = r.servers[0].create_token(&[]);
    let mut edges = Vec::new();
    for (i, server) in r.servers.iter().enumerate() {
        let mut edge = JoinedEdge::new();
        let node = format!("lease-{i}");
        let ip = format!("10.82.0.{}", i + 1);
        let (ok, output) = edge.join(&r.pki, server, &token, &node, &[&ip], &[]);
        assert!(ok, "{output}");
        edge.run(server, &[10250], "info");
        edges.push(edge);
    }
    let both = vec![
        ("lease-0".to_string(), "replica-0".to_string()),
        ("lease-1".to_string(), "replica-1".to_string()),
    ];
    tether_tests::poll_until(
        "both sessions in etcd",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            let rows = fleet(&r.servers[0]);
            std::future::ready((rows == both).then_some(()))
        },
    )
    .await;
    // SIGKILL: no clean shutdown, no lease revocation; etcd expires the lease (3 s here).
    r.servers[1].signal("KILL");
    let killed = Instant::now();
    tether_tests::poll_until(
        "the dead replica's session gone",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let rows = fleet(&r.servers[0]);
            std::future::ready((rows == both[..1]).then_some(()))
        },
    )
    .await;
    eprintln!(
        "a dead replica's sessions left the fleet view after {:?}",
        killed.elapsed()
    );
}
