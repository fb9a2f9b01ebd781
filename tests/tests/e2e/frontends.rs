//! The two CONNECT frontends carry kube-apiserver's connections to the kubelet: curl through
//! the mTLS TCP frontend (by node IP and by node name) and through the Unix socket frontend.

use tether_tests::frontend::{curl, curl_proxy_args};
use tether_tests::targets::UnixBridge;
use tether_tests::{Cluster, ClusterOptions, NODE, NODE_IP};

#[tokio::test]
async fn curl_reaches_kubelet_by_node_ip_and_node_name_through_mtls_frontend() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let port = cluster.kubelet.addr.port();
    let proxy = curl_proxy_args(cluster.server.addrs.connect_tcp, &cluster.pki);
    for host in [NODE_IP.to_string(), NODE.to_string()] {
        let url = format!("https://{host}:{port}/healthz");
        let mut args: Vec<&str> = proxy.iter().map(String::as_str).collect();
        args.push(&url);
        let out = curl(&args).await;
        assert_eq!(out.code, 0, "curl {url} failed: {}", out.stderr);
        assert_eq!(out.stdout, "ok", "curl {url}");
    }
}

#[tokio::test]
async fn curl_reaches_kubelet_through_unix_socket_frontend_via_tcp_bridge() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let bridge = UnixBridge::start(cluster.server.addrs.connect_unix.clone()).await;
    let port = cluster.kubelet.addr.port();
    let proxy = format!("http://{}", bridge.addr);
    let cacert = cluster.pki.kubelet_ca_file.display().to_string();
    for host in [NODE_IP.to_string(), NODE.to_string()] {
        let url = format!("https://{host}:{port}/healthz");
        let out = curl(&["-p", "-x", &proxy, "--cacert", &cacert, &url]).await;
        assert_eq!(
            out.code, 0,
            "curl {url} via the Unix socket failed: {}",
            out.stderr
        );
        assert_eq!(out.stdout, "ok", "curl {url}");
    }
}

#[tokio::test]
async fn rust_client_reaches_kubelet_through_unix_socket_frontend() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let target = cluster.target(cluster.kubelet.addr.port());
    let tunnel = tunnel_server::client::connect_unix(&cluster.server.addrs.connect_unix, &target)
        .await
        .expect("CONNECT over the Unix socket");
    let (status, body) = tunnel_server::client::https_get(
        tunnel,
        cluster.pki.kubelet_client_tls(),
        &NODE_IP.to_string(),
        "/healthz",
    )
    .await
    .expect("GET /healthz through the tunnel");
    assert_eq!((status, body.as_str()), (200, "ok"));
}
