//! Tether on loopback for a benchmark: fresh certificates in a temp dir, the server on one
//! thread and the edge on another (each a single-threaded runtime, as the binaries run).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncWrite};
use tunnel_server::pki::{self, Ca};

use crate::Frontend;

/// The benchmark node's IP (documentation range; the edge maps it to 127.0.0.1).
const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

/// A running loopback Tether.
pub struct Tether {
    _dir: tempfile::TempDir,
    frontend: Frontend,
    socket: std::path::PathBuf,
    tcp: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    target: String,
}

/// Either kind of tunnel stream.
pub trait Tunnel: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Tunnel for T {}

impl Tether {
    /// Start server and edge; targets are `NODE_IP:target_port` (dialed at 127.0.0.1).
    pub fn start(target_port: u16, frontend: Frontend) -> anyhow::Result<Tether> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().to_owned();
        let layout = pki::init_ca_dir(&d, &[], &[], pki::SERVER_VALIDITY, true)?;
        let ca = Ca::load(&layout.ca_cert(), &layout.ca_key())?;
        let node = protocol_node("bench-node")?;
        let edge = ca.issue_edge(&node, &[NODE_IP], pki::EDGE_VALIDITY)?;
        pki::write_pem(&d.join("edge.pem"), &edge.cert_pem, false, true)?;
        pki::write_pem(&d.join("edge-key.pem"), &edge.key_pem, true, true)?;
        let socket = d.join("connect.sock");
        std::fs::write(
            d.join("server.toml"),
            format!(
                "[edge]\nlisten = \"127.0.0.1:0\"\ncert = \"server.pem\"\nkey = \"server-key.pem\"\nclient_ca = \"ca.pem\"\n\
                 [connect]\nunix_socket = \"{}\"\ntcp_listen = \"127.0.0.1:0\"\ntcp_cert = \"server.pem\"\ntcp_key = \"server-key.pem\"\ntcp_client_ca = \"frontend-ca.pem\"\n\
                 [policy]\nallowed_ports = [{target_port}]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
                socket.display()
            ),
        )?;
        let config = tunnel_server::config::ServerConfig::load(&d.join("server.toml"))?;
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                match tunnel_server::RunningServer::start(config).await {
                    Ok(server) => {
                        let _ = addr_tx.send(Ok((server.addrs.clone(), server.shared.clone())));
                        std::future::pending::<()>().await;
                    }
                    Err(e) => {
                        let _ = addr_tx.send(Err(e));
                    }
                }
            });
        });
        let (addrs, shared) = addr_rx.recv_timeout(Duration::from_secs(10))??;
        std::fs::write(
            d.join("edge.toml"),
            format!(
                "[server]\naddress = \"{}\"\nserver_name = \"127.0.0.1\"\nca = \"ca.pem\"\ncert = \"edge.pem\"\nkey = \"edge-key.pem\"\n\
                 [dial]\nself_host = \"127.0.0.1\"\n[allow]\nports = [{target_port}]\n",
                addrs.edge
            ),
        )?;
        let edge_config = tunnel_edge::EdgeConfig::load(&d.join("edge.toml"))?;
        let edge = Arc::new(tunnel_edge::Edge::new(edge_config)?);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(edge.run(
                Arc::new(tunnel_edge::EdgeStatus::default()),
                tokio_util::sync::CancellationToken::new(),
            ));
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.routes.get(&node).is_none() {
            anyhow::ensure!(Instant::now() < deadline, "edge did not connect");
            std::thread::sleep(Duration::from_millis(10));
        }
        let tls = Arc::new(tunnel_io::tls::client_config_mtls(
            &layout.ca_cert(),
            &layout.frontend_client_cert(),
            &layout.frontend_client_key(),
            &[],
        )?);
        Ok(Tether {
            _dir: dir,
            frontend,
            socket,
            tcp: addrs.connect_tcp.context("no TCP frontend")?,
            tls,
            target: format!("{NODE_IP}:{target_port}"),
        })
    }

    /// Open one tunneled connection to the benchmark target.
    pub async fn open(&self) -> anyhow::Result<Box<dyn Tunnel>> {
        Ok(match self.frontend {
            Frontend::Unix => {
                Box::new(tunnel_server::client::connect_unix(&self.socket, &self.target).await?)
            }
            Frontend::Tls => Box::new(
                tunnel_server::client::connect_tls(self.tcp, self.tls.clone(), &self.target)
                    .await?,
            ),
        })
    }
}

fn protocol_node(name: &str) -> anyhow::Result<protocol::NodeName> {
    protocol::NodeName::parse(name).map_err(|e| anyhow::anyhow!("{e}"))
}
