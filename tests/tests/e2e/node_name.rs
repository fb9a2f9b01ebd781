//! Targets that name a node instead of its IP (`edge-n:10250`): the edge dials the node's
//! own certificate IP, never whatever listens on 127.0.0.1, unless `dial.self_host` says
//! where; a node whose certificate has no IP refuses them with a reason instead of guessing.
//! All of 127.0.0.0/8 is loopback on Linux, so 127.0.0.2 stands in for a node IP here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tether_tests::{within, Cluster, ClusterOptions, EdgeOptions, EdgeProc, EdgeTuning};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The node IP of the edges started here (a loopback address other than 127.0.0.1).
const CERT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Attempts to find a port free on both 127.0.0.2 and 127.0.0.1.
const BIND_ATTEMPTS: usize = 20;

/// A listener on `ip:port` (port 0: any) that writes `greeting` to each connection.
async fn greeter(ip: IpAddr, port: u16, greeting: &'static [u8]) -> Option<(u16, JoinHandle<()>)> {
    let listener = TcpListener::bind(SocketAddr::new(ip, port)).await.ok()?;
    let port = listener.local_addr().ok()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp.write_all(greeting).await;
            let _ = tcp.shutdown().await;
        }
    });
    Some((port, task))
}

/// Two greeters on one port: `node-ip` on [`CERT_IP`], `loopback` on 127.0.0.1.
async fn greeters_on_one_port() -> (u16, [JoinHandle<()>; 2]) {
    for _ in 0..BIND_ATTEMPTS {
        let (port, on_node_ip) = greeter(CERT_IP, 0, b"node-ip")
            .await
            .expect("bind 127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux)");
        match greeter(IpAddr::V4(Ipv4Addr::LOCALHOST), port, b"loopback").await {
            Some((_, on_loopback)) => return (port, [on_node_ip, on_loopback]),
            None => on_node_ip.abort(),
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.1 in {BIND_ATTEMPTS} attempts");
}

/// Start an edge for `node` with `ips` in its certificate and no `dial.self_host`.
async fn edge_without_self_host(
    cluster: &Cluster,
    node: &str,
    ips: &[IpAddr],
    port: u16,
) -> EdgeProc {
    let edge = EdgeProc::start_tuned(
        &cluster.pki,
        &[cluster.server.addrs.edge],
        &EdgeOptions {
            files: cluster.pki.issue_edge(node, ips),
            allow_ports: vec![port],
        },
        &EdgeTuning {
            self_host: None,
            ..EdgeTuning::default()
        },
    );
    cluster.server.wait_for_edge_session(node).await;
    edge
}

#[tokio::test]
async fn node_name_target_reaches_the_certificate_ip_not_loopback() {
    let (port, _greeters) = greeters_on_one_port().await;
    let cluster = Cluster::start(ClusterOptions {
        allow_both: vec![port],
        ..ClusterOptions::default()
    })
    .await;
    let _edge = edge_without_self_host(&cluster, "edge-n", &[CERT_IP], port).await;
    let mut tunnel = cluster
        .connect(&format!("edge-n:{port}"))
        .await
        .expect("CONNECT by node name");
    let mut greeting = Vec::new();
    within(
        "the greeting",
        Duration::from_secs(10),
        tunnel.read_to_end(&mut greeting),
    )
    .await
    .expect("read the greeting");
    assert_eq!(String::from_utf8_lossy(&greeting), "node-ip");
}

#[tokio::test]
async fn node_name_target_without_a_certificate_ip_is_refused_with_a_reason() {
    let (port, _greeters) = greeters_on_one_port().await;
    let cluster = Cluster::start(ClusterOptions {
        allow_both: vec![port],
        ..ClusterOptions::default()
    })
    .await;
    let edge = edge_without_self_host(&cluster, "edge-z", &[], port).await;
    let answer = cluster.connect_answer(&format!("edge-z:{port}")).await;
    assert_eq!(answer.status, 502, "{answer:?}");
    assert!(answer.body.contains("dial.self_host"), "{answer:?}");
    assert!(
        edge.log()
            .contains("targets naming this node will be refused"),
        "the edge should say so at startup:\n{}",
        edge.log()
    );
}
