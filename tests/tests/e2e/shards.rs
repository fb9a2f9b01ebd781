//! A sharded server (`--worker-threads 2`, the default on two cores): TCP edge sessions are
//! spread over the shards, and a CONNECT stream, whichever frontend it came through, is
//! moved to its session's shard and carries bytes both ways there. The mTLS frontend's
//! stream is the case that needs care: its TLS state moves with the socket, and the
//! `200` must reach the client although the moved socket is not yet known writable. curl
//! checks both frontends as kube-apiserver's real peer would.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tether_tests::frontend::{curl, curl_proxy_args, metric};
use tether_tests::targets::UnixBridge;
use tether_tests::{within, Cluster, ClusterOptions, EdgeOptions, EdgeProc, EdgeTuning};
use tether_tests::{ServerOptions, NODE_IP};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Shards of the server under test.
const SHARDS: usize = 2;
/// Nodes besides the cluster's own: four sessions in all, two per shard.
const MORE_NODES: u8 = 3;
/// Bytes echoed per stream: several frames and TLS records each way.
const ECHO_BYTES: usize = 256 << 10;
/// Bound on one stream's echo.
const ECHO_TIMEOUT: Duration = Duration::from_secs(20);

/// Write `ECHO_BYTES` of a pattern and read them back through the echo target.
async fn echo_through<S: AsyncRead + AsyncWrite + Unpin>(stream: S, what: &str) {
    let data: Vec<u8> = (0..ECHO_BYTES).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(stream);
    let expected = data.clone();
    let write = async move {
        w.write_all(&data).await.expect("write");
        w.flush().await.expect("flush");
        w
    };
    let read = async move {
        let mut got = vec![0u8; ECHO_BYTES];
        r.read_exact(&mut got).await.expect("read the echo");
        got
    };
    let (_w, got) = within(what, ECHO_TIMEOUT, async { tokio::join!(write, read) }).await;
    assert!(
        got == expected,
        "{what}: the echo differs from what was sent"
    );
}

#[tokio::test]
async fn sessions_spread_over_shards_and_streams_reach_every_node_through_both_frontends() {
    let cluster = Cluster::start(ClusterOptions {
        server: ServerOptions {
            worker_threads: Some(SHARDS),
            ..ServerOptions::default()
        },
        ..ClusterOptions::default()
    })
    .await;
    let echo_port = cluster.echo.addr.port();
    let mut targets = vec![cluster.target(echo_port)];
    let mut edges = Vec::new();
    for i in 1..=MORE_NODES {
        let node = format!("shard-node-{i}");
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10 + i));
        assert_ne!(ip, NODE_IP);
        edges.push(EdgeProc::start_tuned(
            &cluster.pki,
            &[cluster.server.addrs.edge],
            &EdgeOptions {
                files: cluster.pki.issue_edge(&node, &[ip]),
                allow_ports: vec![echo_port],
            },
            &EdgeTuning::default(),
        ));
        cluster.server.wait_for_edge_session(&node).await;
        targets.push(format!("{ip}:{echo_port}"));
    }

    let text = cluster.metrics().await;
    let per_shard: Vec<f64> = (0..SHARDS)
        .map(|i| {
            metric(
                &text,
                &format!("tether_shard_edge_sessions{{shard=\"{i}\"}}"),
            )
            .unwrap_or(0.0)
        })
        .collect();
    assert_eq!(
        per_shard.iter().sum::<f64>(),
        (MORE_NODES + 1) as f64,
        "every TCP session is on a shard: {per_shard:?}"
    );
    assert!(
        per_shard.iter().all(|n| *n >= 1.0),
        "sessions are spread over the shards: {per_shard:?}"
    );

    for target in &targets {
        let tls = within("CONNECT over mTLS", ECHO_TIMEOUT, cluster.connect(target))
            .await
            .expect("CONNECT over mTLS");
        echo_through(tls, &format!("echo via the mTLS frontend to {target}")).await;
        let unix = within(
            "CONNECT over the Unix socket",
            ECHO_TIMEOUT,
            tunnel_server::client::connect_unix(&cluster.server.addrs.connect_unix, target),
        )
        .await
        .expect("CONNECT over the Unix socket");
        echo_through(unix, &format!("echo via the Unix frontend to {target}")).await;
    }

    // curl, the real client, through both frontends of the sharded server to the kubelet.
    let url = format!("https://{NODE_IP}:{}/healthz", cluster.kubelet.addr.port());
    let mut args = curl_proxy_args(cluster.server.addrs.connect_tcp, &cluster.pki);
    args.push(url.clone());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = curl(&args).await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "ok"),
        "curl via mTLS: {}",
        out.stderr
    );
    let bridge = UnixBridge::start(cluster.server.addrs.connect_unix.clone()).await;
    let proxy = format!("http://{}", bridge.addr);
    let cacert = cluster.pki.kubelet_ca_file.display().to_string();
    let out = curl(&["-p", "-x", &proxy, "--cacert", &cacert, &url]).await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "ok"),
        "curl via the Unix socket: {}",
        out.stderr
    );
    drop(edges);
}
