//! The Konnectivity test topology, in this process: a server with only the `[konnectivity]`
//! frontend (Unix socket and mTLS TCP, `[connect]` left out on purpose unless
//! [`RigOptions::connect_socket`]), optionally the agent listener for stock Konnectivity
//! agents, a real edge for node `edge-k` (192.0.2.10, dialed at 127.0.0.1), an HTTPS demo
//! kubelet, an echo target and a target that says goodbye and closes. Everything on
//! 127.0.0.1 with kernel ports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::NodeName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_util::sync::{CancellationToken, DropGuard};
use tunnel_server::demo::kubelet::DemoKubelet;
use tunnel_server::pki::{self, Ca, CaLayout};
use tunnel_server::RunningServer;

use super::client::GrpcConn;

/// The real edge's node.
pub const NODE: &str = "edge-k";
/// Its node IP (TEST-NET-1; the edge maps it to 127.0.0.1).
pub const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
/// What the target that closes first writes before closing.
pub const GOODBYE: &[u8] = b"bye from the target\n";

/// What a test needs beyond the default topology.
#[derive(Debug, Clone, Default)]
pub struct RigOptions {
    /// Also run the CONNECT frontend on a Unix socket (`connect.sock`).
    pub connect_socket: bool,
    /// Run the agent listener (`konnectivity.agent_listen`).
    pub agents: bool,
    /// More ports the server policy allows (targets a test starts itself).
    pub extra_ports: Vec<u16>,
    /// `[connect] write_timeout` (default 10 s).
    pub write_timeout: Option<Duration>,
    /// The edge session's transport, `tcp` (default) or `quic`.
    pub transport: Option<&'static str>,
}

/// A running topology. Dropping it stops the edge; [`Rig::shutdown`] also drains the server.
pub struct Rig {
    /// Certificates and configs.
    pub dir: tempfile::TempDir,
    /// PKI layout in `dir`.
    pub layout: CaLayout,
    /// The server.
    pub server: RunningServer,
    /// The HTTPS kubelet stand-in.
    pub kubelet: DemoKubelet,
    /// TLS client config trusting the kubelet's CA.
    pub kubelet_tls: Arc<rustls::ClientConfig>,
    /// Echo target.
    pub echo: SocketAddr,
    /// Target that writes [`GOODBYE`] and closes.
    pub closer: SocketAddr,
    /// `[connect] dial_timeout` of this server.
    pub dial_timeout: Duration,
    _edge: DropGuard,
}

impl Rig {
    /// Start everything and wait until the edge's session is routed.
    pub async fn start() -> Rig {
        Rig::start_with(RigOptions::default()).await
    }

    /// [`Rig::start`] with `options`.
    pub async fn start_with(options: RigOptions) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path().to_owned();
        let layout = pki::init_ca_dir(&d, &[], &[], pki::SERVER_VALIDITY, true).expect("pki");
        let ca = Ca::load(&layout.ca_cert(), &layout.ca_key()).expect("load CA");
        let node = NodeName::parse(NODE).expect("node name");
        let edge_cert = ca
            .issue_edge(&node, &[NODE_IP], pki::EDGE_VALIDITY)
            .expect("edge cert");
        pki::write_pem(&d.join("edge.pem"), &edge_cert.cert_pem, false, true).unwrap();
        pki::write_pem(&d.join("edge-key.pem"), &edge_cert.key_pem, true, true).unwrap();

        let kubelet_ca = Ca::generate("test kubelet CA", pki::CA_VALIDITY).unwrap();
        let kubelet_cert = kubelet_ca
            .issue_server(&[NODE.to_string()], &[NODE_IP], pki::SERVER_VALIDITY)
            .unwrap();
        let kubelet = DemoKubelet::start(
            "127.0.0.1:0".parse().unwrap(),
            &kubelet_cert.cert_pem,
            &kubelet_cert.key_pem,
        )
        .await
        .expect("demo kubelet");
        let kubelet_tls =
            Arc::new(tunnel_server::client::trust_only(kubelet_ca.cert_pem()).unwrap());
        let echo = start_echo().await;
        let closer = start_closer().await;
        let mut ports = format!(
            "{}, {}, {}",
            kubelet.addr.port(),
            echo.port(),
            closer.port()
        );
        for port in &options.extra_ports {
            ports.push_str(&format!(", {port}"));
        }
        let connect_socket = if options.connect_socket {
            "unix_socket = \"connect.sock\""
        } else {
            ""
        };
        let agent_listen = if options.agents {
            "agent_listen = \"127.0.0.1:0\""
        } else {
            ""
        };

        let dial_timeout = Duration::from_secs(10);
        let write_timeout = options.write_timeout.unwrap_or(Duration::from_secs(10));
        std::fs::write(
            d.join("server.toml"),
            format!(
                r#"
[edge]
listen = "127.0.0.1:0"
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"
ping_interval = "1s"
ping_misses = 3
[connect]
{connect_socket}
dial_timeout = "{}s"
write_timeout = "{}ms"
[konnectivity]
{agent_listen}
unix_socket = "konnectivity.sock"
tcp_listen = "127.0.0.1:0"
tcp_cert = "server.pem"
tcp_key = "server-key.pem"
tcp_client_ca = "frontend-ca.pem"
first_packet_timeout = "2s"
[policy]
allowed_ports = [{ports}]
[admin]
listen = "127.0.0.1:0"
"#,
                dial_timeout.as_secs(),
                write_timeout.as_millis()
            ),
        )
        .unwrap();
        let config = tunnel_server::config::ServerConfig::load(&d.join("server.toml"))
            .expect("server config");
        let server = RunningServer::start(config).await.expect("start server");

        std::fs::write(
            d.join("edge.toml"),
            format!(
                "[server]\naddress = \"{}\"\ntransport = \"{}\"\nserver_name = \"127.0.0.1\"\nca = \"ca.pem\"\ncert = \"edge.pem\"\nkey = \"edge-key.pem\"\n\
                 [dial]\nself_host = \"127.0.0.1\"\n[allow]\nports = [{ports}]\n",
                server.addrs.edge,
                options.transport.unwrap_or("tcp"),
            ),
        )
        .unwrap();
        let edge_config = tunnel_edge::EdgeConfig::load(&d.join("edge.toml")).expect("edge config");
        let edge = Arc::new(tunnel_edge::Edge::new(edge_config).expect("edge"));
        let edge_cancel = CancellationToken::new();
        tokio::spawn(edge.run(
            Arc::new(tunnel_edge::EdgeStatus::default()),
            edge_cancel.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(15);
        while server.shared.routes.get(&node).is_none() {
            assert!(
                Instant::now() < deadline,
                "edge did not connect within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Rig {
            dir,
            layout,
            server,
            kubelet,
            kubelet_tls,
            echo,
            closer,
            dial_timeout,
            _edge: edge_cancel.drop_guard(),
        }
    }

    /// Drain the server with `grace` ([`RunningServer::shutdown`]) and stop the edge; returns
    /// how long the server took to stop.
    pub async fn shutdown(self, grace: Duration) -> Duration {
        let started = Instant::now();
        self.server.shutdown(grace).await;
        started.elapsed()
    }

    /// `NODE_IP:port`.
    pub fn target(&self, port: u16) -> String {
        format!("{NODE_IP}:{port}")
    }

    /// The frontend's Unix socket.
    pub fn unix_socket(&self) -> PathBuf {
        self.server
            .addrs
            .konnectivity_unix
            .clone()
            .expect("konnectivity unix socket")
    }

    /// The CONNECT frontend's Unix socket ([`RigOptions::connect_socket`]).
    pub fn connect_socket(&self) -> PathBuf {
        self.server
            .addrs
            .connect_unix
            .clone()
            .expect("connect unix socket")
    }

    /// The agent listener ([`RigOptions::agents`]).
    pub fn agent_addr(&self) -> SocketAddr {
        self.server
            .addrs
            .konnectivity_agent
            .expect("konnectivity agent listener")
    }

    /// TLS client configuration of an agent whose certificate (from the tunnel CA, like an
    /// edge's) names `node` and `ips`; ALPN `h2`, as gRPC clients offer.
    pub fn agent_tls(&self, node: &str, ips: &[IpAddr]) -> Arc<rustls::ClientConfig> {
        let ca = Ca::load(&self.layout.ca_cert(), &self.layout.ca_key()).unwrap();
        let cert = ca
            .issue_edge(&NodeName::parse(node).unwrap(), ips, pki::EDGE_VALIDITY)
            .unwrap();
        let d = self.dir.path();
        let (cert_path, key_path) = (
            d.join(format!("agent-{node}.pem")),
            d.join(format!("agent-{node}-key.pem")),
        );
        pki::write_pem(&cert_path, &cert.cert_pem, false, true).unwrap();
        pki::write_pem(&key_path, &cert.key_pem, true, true).unwrap();
        Arc::new(
            tunnel_io::tls::client_config_mtls(
                &self.layout.ca_cert(),
                &cert_path,
                &key_path,
                &[b"h2"],
            )
            .unwrap(),
        )
    }

    /// A gRPC connection over the Unix socket (kube-apiserver's `GRPC` egress form).
    pub async fn connect_unix(&self) -> GrpcConn {
        let socket = UnixStream::connect(self.unix_socket())
            .await
            .expect("connect to the konnectivity socket");
        GrpcConn::handshake(socket).await.expect("h2 over unix")
    }

    /// TLS to the mTLS TCP form with `tls` (ALPN `h2`).
    pub async fn tls_stream(
        &self,
        tls: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let addr = self
            .server
            .addrs
            .konnectivity_tcp
            .expect("konnectivity tcp");
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let mut stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        // A TLS 1.3 server refuses a missing client certificate after the client's handshake
        // is done; one read surfaces that refusal.
        let mut probe = [0u8; 0];
        let _ = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await;
        Ok(stream)
    }

    /// The frontend client configuration (the apiserver's certificate, ALPN `h2`).
    pub fn frontend_tls(&self) -> Arc<rustls::ClientConfig> {
        Arc::new(
            tunnel_io::tls::client_config_mtls(
                &self.layout.ca_cert(),
                &self.layout.frontend_client_cert(),
                &self.layout.frontend_client_key(),
                &[b"h2"],
            )
            .expect("frontend client TLS"),
        )
    }

    /// A gRPC connection over mTLS TCP.
    pub async fn connect_tls(&self) -> GrpcConn {
        let stream = self.tls_stream(self.frontend_tls()).await.expect("mTLS");
        GrpcConn::handshake(stream).await.expect("h2 over TLS")
    }
}

async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = socket.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

async fn start_closer() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = socket.write_all(GOODBYE).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

/// A fake edge for node `node` with `ip`: a real TLS session with a real certificate, which
/// acknowledges session info but never answers a dial. Each CONNECT it receives is handed to
/// the test (to watch for its reset).
pub struct FakeEdge {
    /// CONNECT streams as they arrive.
    pub dials: tokio::sync::mpsc::Receiver<h2::server::SendResponse<bytes::Bytes>>,
    /// Cancel to drop the whole session (edge loss).
    pub kill: CancellationToken,
}

impl FakeEdge {
    /// Connect to `rig`'s edge listener and wait until routed.
    pub async fn start(rig: &Rig, node: &str, ip: IpAddr) -> FakeEdge {
        let ca = Ca::load(&rig.layout.ca_cert(), &rig.layout.ca_key()).unwrap();
        let node_name = NodeName::parse(node).unwrap();
        let cert = ca
            .issue_edge(&node_name, &[ip], pki::EDGE_VALIDITY)
            .unwrap();
        let d = rig.dir.path();
        let (cert_path, key_path) = (
            d.join(format!("{node}.pem")),
            d.join(format!("{node}-key.pem")),
        );
        pki::write_pem(&cert_path, &cert.cert_pem, false, true).unwrap();
        pki::write_pem(&key_path, &cert.key_pem, true, true).unwrap();
        let tls = tunnel_io::tls::client_config_mtls(
            &rig.layout.ca_cert(),
            &cert_path,
            &key_path,
            &[tunnel_io::tls::ALPN_EDGE_SESSION],
        )
        .unwrap();
        let tcp = TcpStream::connect(rig.server.addrs.edge).await.unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(rig.server.addrs.edge.ip().into());
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .unwrap();
        let mut connection = h2::server::handshake(tls).await.unwrap();
        let (tx, dials) = tokio::sync::mpsc::channel(16);
        let kill = CancellationToken::new();
        let stop = kill.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    n = connection.accept() => n,
                };
                let Some(Ok((request, mut respond))) = next else {
                    return;
                };
                if request.method() == http::Method::CONNECT {
                    let _ = tx.send(respond).await;
                } else {
                    let _ = respond.send_response(http::Response::new(()), true);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while rig.server.shared.routes.get(&node_name).is_none() {
            assert!(Instant::now() < deadline, "fake edge was not routed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        FakeEdge { dials, kill }
    }
}
