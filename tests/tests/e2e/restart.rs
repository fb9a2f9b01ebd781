//! A server crash and restart: the edge, never restarted, reconnects on its own to the same
//! edge port and traffic flows again within the reconnect bounds.

use std::time::{Duration, Instant};

use tether_tests::edge::Transport;
use tether_tests::{poll_until, Cluster, ClusterOptions, NODE, NODE_IP};

/// GET /healthz on the kubelet through the mTLS frontend.
async fn healthz(cluster: &Cluster) -> anyhow::Result<(u16, String)> {
    let tunnel = cluster
        .connect(&cluster.target(cluster.kubelet.addr.port()))
        .await?;
    tunnel_server::client::https_get(
        tunnel,
        cluster.pki.kubelet_client_tls(),
        &NODE_IP.to_string(),
        "/healthz",
    )
    .await
}

#[tokio::test]
async fn edge_reconnects_after_server_restart_on_the_same_port() {
    reconnects_after_restart(Transport::Tcp).await;
}

#[tokio::test]
async fn quic_edge_reconnects_after_server_restart_on_the_same_port() {
    reconnects_after_restart(Transport::Quic).await;
}

async fn reconnects_after_restart(transport: Transport) {
    let mut cluster = Cluster::start(ClusterOptions::over(transport)).await;
    let edge_pid = cluster.edge.pid();
    let (status, body) = healthz(&cluster).await.expect("healthz before the restart");
    assert_eq!((status, body.as_str()), (200, "ok"));

    let old_server = cluster.server.pid();
    cluster.server.kill();
    assert!(
        healthz(&cluster).await.is_err(),
        "a killed server still answered"
    );
    // Let the edge notice and start backing off against a closed port.
    poll_until(
        "the edge to notice the lost session",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            let log = cluster.edge.log();
            // Over QUIC a lost peer is the bridge's end: the session ends rather than fails.
            let noticed = log.contains("session failed")
                || (transport == Transport::Quic && log.contains("session ended"));
            std::future::ready(noticed.then_some(()))
        },
    )
    .await;

    cluster.server.restart().await;
    assert_ne!(
        cluster.server.pid(),
        old_server,
        "the server process was not replaced"
    );
    let restarted = Instant::now();
    // Backoff is capped at 500 ms in the edge's config; allow for slow machines.
    poll_until(
        "healthz through the restarted server",
        Duration::from_secs(15),
        Duration::from_millis(50),
        || async {
            match healthz(&cluster).await {
                Ok((200, body)) if body == "ok" => Some(()),
                _ => None,
            }
        },
    )
    .await;
    println!(
        "traffic flowed again {:?} after the server restarted",
        restarted.elapsed()
    );
    cluster.server.wait_for_edge_session(NODE).await;
    assert!(cluster.edge.running(), "the edge process exited");
    assert_eq!(
        cluster.edge.pid(),
        edge_pid,
        "the edge must not have been restarted"
    );
    assert_eq!(
        cluster.server.edge_transport(NODE).as_deref(),
        Some(transport.as_str()),
        "the new session's transport"
    );
}
