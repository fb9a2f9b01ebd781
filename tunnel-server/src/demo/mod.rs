//! The demo: a server, an edge named `demo-node` and an HTTPS demo kubelet, all on loopback
//! in this process with fresh certificates; one request through the tunnel as a self-check,
//! then ready-to-paste curl commands. The node IP is a documentation address (192.0.2.10):
//! the edge maps it to 127.0.0.1, so nothing leaves the machine.

pub mod kubelet;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use protocol::NodeName;
use tokio_util::sync::CancellationToken;
use tunnel_edge::{Edge, EdgeConfig, EdgeStatus};

use crate::config::ServerConfig;
use crate::demo::kubelet::DemoKubelet;
use crate::pki::{self, Ca};
use crate::RunningServer;

/// The demo node's name.
pub const DEMO_NODE: &str = "demo-node";
/// The demo node's IP as kube-apiserver would dial it (TEST-NET-1, never routed).
pub const DEMO_NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

/// Run the demo; with `once`, exit after the self-check.
pub async fn run(dir: Option<PathBuf>, once: bool) -> anyhow::Result<()> {
    let temp;
    let dir = match dir {
        Some(d) => d,
        None => {
            temp = tempfile::Builder::new().prefix("tether-demo-").tempdir()?;
            temp.path().to_owned()
        }
    };
    let layout = pki::init_ca_dir(&dir, &[], &[], pki::SERVER_VALIDITY, true)?;
    let node = NodeName::parse(DEMO_NODE).map_err(anyhow::Error::msg)?;

    // The kubelet's serving certificate comes from its own CA, as in a cluster: the tunnel
    // never sees a key that could terminate this TLS.
    let kubelet_ca = Ca::generate("demo kubelet CA", pki::CA_VALIDITY)?;
    pki::write_pem(
        &dir.join("kubelet-ca.pem"),
        kubelet_ca.cert_pem(),
        false,
        true,
    )?;
    let kubelet_cert = kubelet_ca.issue_server(
        &[DEMO_NODE.to_string()],
        &[DEMO_NODE_IP],
        pki::SERVER_VALIDITY,
    )?;
    // The kubelet port if free, else any: policy and allowlist follow the port we got.
    let kubelet = match DemoKubelet::start(
        SocketAddr::from(([127, 0, 0, 1], 10250)),
        &kubelet_cert.cert_pem,
        &kubelet_cert.key_pem,
    )
    .await
    {
        Ok(k) => k,
        Err(_) => {
            DemoKubelet::start(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                &kubelet_cert.cert_pem,
                &kubelet_cert.key_pem,
            )
            .await?
        }
    };
    let port = kubelet.addr.port();

    let socket = dir.join("connect.sock");
    let server_toml = format!(
        r#"
[edge]
listen = "127.0.0.1:0"
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"
[connect]
unix_socket = "{socket}"
tcp_listen = "127.0.0.1:0"
tcp_cert = "server.pem"
tcp_key = "server-key.pem"
tcp_client_ca = "frontend-ca.pem"
[policy]
allowed_ports = [{port}]
[admin]
listen = "127.0.0.1:0"
[registration]
listen = "127.0.0.1:0"
token_file = "tokens.json"
ca_cert = "ca.pem"
ca_key = "ca-key.pem"
"#,
        socket = socket.display()
    );
    std::fs::write(dir.join("server.toml"), &server_toml)?;
    let config = ServerConfig::load(&dir.join("server.toml"))?;
    let server = RunningServer::start(config).await?;
    let addrs = server.addrs.clone();

    // The node joins as a real one would: a one-use bootstrap token from the operator,
    // exchanged over the registration API for a certificate whose key never left the node.
    let (token, _) = crate::registration::state::create(
        &dir.join("tokens.json"),
        crate::registration::state::NodePool {
            name: "demo".into(),
            labels: [("tether.io/pool".to_string(), "demo".to_string())].into(),
            ..Default::default()
        },
        crate::registration::state::DEFAULT_TOKEN_TTL,
        Some(1),
        None,
        "demo".into(),
        vec![],
    )?;
    let state = tunnel_edge::join::StateDir::new(dir.join("demo-node-state"));
    let registration = addrs.registration.context("no registration listener")?;
    tunnel_edge::join::join(&tunnel_edge::join::JoinOptions {
        server: format!("https://{registration}"),
        server_name: Some("127.0.0.1".into()),
        trust: tunnel_edge::join::JoinTrust::CaFile(layout.ca_cert()),
        token: tunnel_io::secret::Secret::new(token.expose()),
        node_name: DEMO_NODE.into(),
        node_ips: vec![DEMO_NODE_IP],
        state: state.clone(),
        force: true,
        egress: tunnel_edge::proxy::Egress::direct(),
    })
    .await?;
    let edge_toml = format!(
        r#"
[server]
address = "{edge}"
server_name = "127.0.0.1"
[dial]
self_host = "127.0.0.1"
[allow]
ports = [{port}]
"#,
        edge = addrs.edge
    );
    std::fs::write(dir.join("edge.toml"), &edge_toml)?;
    let mut edge_config = EdgeConfig::load(&dir.join("edge.toml"))?;
    tunnel_edge::join::apply_state(&mut edge_config, &state)?;
    let edge = Arc::new(Edge::new(edge_config)?);
    let status = Arc::new(EdgeStatus::default());
    let cancel = CancellationToken::new();
    let edge_task = tokio::spawn(edge.clone().run(status.clone(), cancel.clone()));

    let deadline = Instant::now() + Duration::from_secs(10);
    while server.shared.routes.get(&node).is_none() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the demo edge did not connect within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = status.connected.load(Ordering::Acquire);

    // Self-check: what kube-apiserver does, through the mTLS frontend.
    let proxy_tls = Arc::new(tunnel_io::tls::client_config_mtls(
        &layout.ca_cert(),
        &layout.frontend_client_cert(),
        &layout.frontend_client_key(),
        &[],
    )?);
    let kubelet_tls = Arc::new(crate::client::trust_only(kubelet_ca.cert_pem())?);
    let connect_tcp = addrs.connect_tcp.context("no TCP frontend")?;
    let target = format!("{DEMO_NODE_IP}:{port}");
    let started = Instant::now();
    let tunnel = crate::client::connect_tls(connect_tcp, proxy_tls, &target).await?;
    let (status_code, body) =
        crate::client::https_get(tunnel, kubelet_tls, &DEMO_NODE_IP.to_string(), "/healthz")
            .await?;
    println!(
        "Tether demo: GET https://{target}/healthz through the tunnel -> {status_code} {:?} ({:.1} ms)",
        body.trim(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    anyhow::ensure!(status_code == 200, "demo self-check failed");

    let d = dir.display();
    let proxy = format!(
        "--proxy https://{connect_tcp} --proxy-cacert {d}/ca.pem --proxy-cert {d}/apiserver-client.pem --proxy-key {d}/apiserver-client-key.pem --cacert {d}/kubelet-ca.pem"
    );
    println!(
        r#"
Joined: {DEMO_NODE} with a one-use bootstrap token via the registration API at {registration}
        (key, certificate, CA, pool labels in {state})
Server: edge listener {edge}, CONNECT mTLS {connect_tcp}, CONNECT unix {sock}, admin http://{admin}
Edge:   {DEMO_NODE} ({DEMO_NODE_IP}) -> demo kubelet on 127.0.0.1:{port}

Try (curl sends CONNECT to the mTLS frontend, then TLS to the kubelet end to end):
  curl {proxy} https://{DEMO_NODE_IP}:{port}/healthz
  curl -N {proxy} 'https://{DEMO_NODE}:{port}/containerLogs/default/demo/app?follow=true'
  curl {proxy} https://{DEMO_NODE_IP}:22/            # 403: port not allowed by the server
  curl {proxy} https://192.0.2.99:{port}/healthz     # 502: no edge for that address
Unix socket frontend (curl cannot CONNECT over a Unix socket; bridge it):
  socat TCP-LISTEN:18131,bind=127.0.0.1,fork UNIX-CONNECT:{sock} &
  curl -p -x http://127.0.0.1:18131 --cacert {d}/kubelet-ca.pem https://{DEMO_NODE_IP}:{port}/healthz
Metrics: curl http://{admin}/metrics

Press Ctrl-C to stop."#,
        edge = addrs.edge,
        sock = socket.display(),
        state = state.dir.display(),
        admin = addrs.admin.context("no admin listener")?,
    );
    if !once {
        tokio::signal::ctrl_c().await?;
    }
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), edge_task).await;
    server.shutdown(Duration::from_secs(2)).await;
    kubelet.shutdown();
    Ok(())
}
