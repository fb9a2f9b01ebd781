//! The paths load goes through: straight to the target, a TCP relay in front of it (haproxy,
//! rathole), an external plain-HTTP CONNECT proxy (on TCP or a Unix socket, such as a running
//! Tether's), or Tether on loopback with fresh certificates in a temp dir: in-process (the
//! server on one thread and the edge on another, each a single-threaded runtime, as the
//! binaries run) or as the real binaries in child processes, whose RSS can then be read.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tunnel_server::pki::{self, Ca};

use crate::procs::{self, ChildGuard, Watched};
use crate::Frontend;

/// The benchmark node's IP (documentation range; the edge maps it to 127.0.0.1).
const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
/// The IP of the second node of `--bulk-session` (its edge also dials 127.0.0.1).
const BULK_NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11));

/// Bytes of a CONNECT answer head we accept at most.
const MAX_ANSWER_HEAD: usize = 4 << 10;

/// Where a scenario's connections go.
pub enum Path {
    /// Plain TCP to this address: the target itself (`--direct`) or a relay in front of it.
    Tcp(std::net::SocketAddr),
    /// A plain-HTTP CONNECT proxy on TCP, asked for `target`.
    Proxy {
        proxy: std::net::SocketAddr,
        target: String,
    },
    /// A plain-HTTP CONNECT proxy on a Unix socket (a running Tether's), asked for `target`.
    UnixProxy {
        socket: std::path::PathBuf,
        target: String,
    },
    /// Tether started in-process.
    Tether(Box<Tether>),
}

impl Path {
    /// Open one connection to the target along this path.
    pub async fn open(&self) -> anyhow::Result<Box<dyn Tunnel>> {
        match self {
            Path::Tcp(addr) => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                Ok(Box::new(tcp))
            }
            Path::Proxy { proxy, target } => {
                let mut tcp = TcpStream::connect(proxy).await?;
                tcp.set_nodelay(true)?;
                handshake(&mut tcp, target).await?;
                Ok(Box::new(tcp))
            }
            Path::UnixProxy { socket, target } => {
                let mut unix = UnixStream::connect(socket).await?;
                handshake(&mut unix, target).await?;
                Ok(Box::new(unix))
            }
            Path::Tether(t) => t.open().await,
        }
    }

    /// Open the connection of a bulk stream: on its own session when the Tether runs a
    /// second node for bulk (`--bulk-session`), otherwise as [`Path::open`].
    pub async fn open_bulk(&self) -> anyhow::Result<Box<dyn Tunnel>> {
        match self {
            Path::Tether(t) => t.open_to(t.bulk_target.as_ref().unwrap_or(&t.target)).await,
            _ => self.open().await,
        }
    }
}

/// CONNECT on `stream`. Reads the answer in one buffer rather than byte by byte (the tunnel
/// client's way), so the load generator is not the bottleneck; safe because every target mode
/// stays silent until the client has sent its mode byte.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    target: &str,
) -> anyhow::Result<()> {
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; MAX_ANSWER_HEAD];
    let mut len = 0;
    while !head[..len].ends_with(b"\r\n\r\n") {
        anyhow::ensure!(len < head.len(), "CONNECT answer head too long");
        let n = stream.read(&mut head[len..]).await?;
        anyhow::ensure!(n > 0, "proxy closed during CONNECT");
        len += n;
    }
    let head = String::from_utf8_lossy(&head[..len]);
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "CONNECT refused: {status}"
    );
    Ok(())
}

/// How Tether is run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Server and edge as threads of this process.
    InProcess,
    /// The `tunnel-server` and `tunnel-edge` binaries beside this one, as child processes.
    Processes,
}

/// A running loopback Tether.
pub struct Tether {
    /// Child processes (in `Mode::Processes`), killed on drop before the temp dir goes.
    children: Vec<ChildGuard>,
    _dir: tempfile::TempDir,
    frontend: Frontend,
    socket: std::path::PathBuf,
    tcp: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    target: String,
    /// The second node's target under `--bulk-session`.
    bulk_target: Option<String>,
}

/// Either kind of tunnel stream.
pub trait Tunnel: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Tunnel for T {}

impl Tether {
    /// Start server and edge; targets are `NODE_IP:target_port` (dialed at 127.0.0.1). The
    /// server's edge listener takes `edge_port` on 127.0.0.1 (0: any), its QUIC listener the
    /// same port number on UDP.
    pub async fn start(
        target_port: u16,
        edge_port: u16,
        frontend: Frontend,
        mode: Mode,
    ) -> anyhow::Result<Tether> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().to_owned();
        let layout = pki::init_ca_dir(&d, &[], &[], pki::SERVER_VALIDITY, true)?;
        let ca = Ca::load(&layout.ca_cert(), &layout.ca_key())?;
        let node = protocol_node("bench-node")?;
        let edge = ca.issue_edge(&node, &[NODE_IP], pki::EDGE_VALIDITY)?;
        pki::write_pem(&d.join("edge.pem"), &edge.cert_pem, false, true)?;
        pki::write_pem(&d.join("edge-key.pem"), &edge.key_pem, true, true)?;
        let bulk_node = match BULK_SESSION.get() {
            Some(true) => {
                let node = protocol_node("bench-bulk")?;
                let edge = ca.issue_edge(&node, &[BULK_NODE_IP], pki::EDGE_VALIDITY)?;
                pki::write_pem(&d.join("edge-bulk.pem"), &edge.cert_pem, false, true)?;
                pki::write_pem(&d.join("edge-bulk-key.pem"), &edge.key_pem, true, true)?;
                Some(node)
            }
            _ => None,
        };
        let socket = d.join("connect.sock");
        std::fs::write(
            d.join("server.toml"),
            format!(
                "[edge]\nlisten = \"127.0.0.1:{edge_port}\"\ncert = \"server.pem\"\nkey = \"server-key.pem\"\nclient_ca = \"ca.pem\"\n\
                 [connect]\nunix_socket = \"{}\"\ntcp_listen = \"127.0.0.1:0\"\ntcp_cert = \"server.pem\"\ntcp_key = \"server-key.pem\"\ntcp_client_ca = \"frontend-ca.pem\"\n\
                 [policy]\nallowed_ports = [{target_port}]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
                socket.display()
            ),
        )?;
        let (connect_tcp, children) = match mode {
            Mode::InProcess => (
                start_in_process(&d, &node, bulk_node.as_ref(), target_port)?,
                Vec::new(),
            ),
            Mode::Processes => {
                start_processes(&d, &socket, target_port, bulk_node.is_some()).await?
            }
        };
        let tls = Arc::new(tunnel_io::tls::client_config_mtls(
            &layout.ca_cert(),
            &layout.frontend_client_cert(),
            &layout.frontend_client_key(),
            &[],
        )?);
        Ok(Tether {
            children,
            _dir: dir,
            frontend,
            socket,
            tcp: connect_tcp,
            tls,
            target: format!("{NODE_IP}:{target_port}"),
            bulk_target: bulk_node.map(|_| format!("{BULK_NODE_IP}:{target_port}")),
        })
    }

    /// The processes this Tether runs in, to read RSS from (none when in-process).
    pub fn processes(&self) -> Vec<Watched> {
        self.children
            .iter()
            .map(|c| Watched {
                name: c.name.trim_start_matches("tunnel-").to_owned(),
                pid: c.pid(),
            })
            .collect()
    }

    /// Open one tunneled connection to the benchmark target.
    pub async fn open(&self) -> anyhow::Result<Box<dyn Tunnel>> {
        self.open_to(&self.target).await
    }

    /// Open one tunneled connection to `target` (`NODE_IP:port` of one of this Tether's nodes).
    async fn open_to(&self, target: &str) -> anyhow::Result<Box<dyn Tunnel>> {
        Ok(match self.frontend {
            Frontend::Unix => {
                let mut unix = UnixStream::connect(&self.socket).await?;
                handshake(&mut unix, target).await?;
                Box::new(unix)
            }
            Frontend::Tls => {
                let tcp = TcpStream::connect(self.tcp).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::IpAddress(self.tcp.ip().into());
                let mut tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .context("TLS to the CONNECT frontend")?;
                handshake(&mut tls, target).await?;
                Box::new(tls)
            }
        })
    }
}

/// The edge session's transport of a Tether this process starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SessionTransport {
    /// TLS + HTTP/2 over TCP.
    Tcp,
    /// QUIC (UDP).
    Quic,
}

static TRANSPORT: std::sync::OnceLock<SessionTransport> = std::sync::OnceLock::new();

/// Choose the transport of every edge this process starts (once, before the first).
pub fn set_transport(transport: SessionTransport) {
    let _ = TRANSPORT.set(transport);
}

static BULK_SESSION: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Give bulk streams a session of their own (once, before the first Tether starts): a second
/// node, whose edge runs on the first edge's thread in-process (two sessions sharing the
/// edge's runtime, as two connections of one edge would) or as a second edge process with
/// `--processes` (a thread of its own). `hol` sends its bulk stream there: the upper bound
/// of a second connection for bulk streams, without moving a stream from one to the other.
pub fn set_bulk_session(on: bool) {
    let _ = BULK_SESSION.set(on);
}

static NO_LANE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Keep bulk streams on the session (once, before the first Tether starts): the edges are
/// configured with `server.lane = false`, the baseline lanes are measured against.
pub fn set_no_lane(on: bool) {
    let _ = NO_LANE.set(on);
}

fn transport() -> &'static str {
    match TRANSPORT.get() {
        Some(SessionTransport::Quic) => "quic",
        _ => "tcp",
    }
}

/// Write the edge's config for a server whose edge listener is `server`.
fn write_edge_config(
    d: &std::path::Path,
    server: std::net::SocketAddr,
    target_port: u16,
) -> anyhow::Result<()> {
    write_named_edge_config(d, "edge", server, target_port)
}

/// Write `{name}.toml` for the edge whose certificate is `{name}.pem`.
fn write_named_edge_config(
    d: &std::path::Path,
    name: &str,
    server: std::net::SocketAddr,
    target_port: u16,
) -> anyhow::Result<()> {
    std::fs::write(
        d.join(format!("{name}.toml")),
        format!(
            "[server]\naddress = \"{server}\"\ntransport = \"{transport}\"\nlane = {lane}\nserver_name = \"127.0.0.1\"\nca = \"ca.pem\"\ncert = \"{name}.pem\"\nkey = \"{name}-key.pem\"\n\
             [dial]\nself_host = \"127.0.0.1\"\n[allow]\nports = [{target_port}]\n",
            transport = transport(),
            lane = !NO_LANE.get().copied().unwrap_or(false),
        ),
    )?;
    Ok(())
}

/// Server and edge on threads of this process; returns once the edge's session is routed.
/// With `bulk_node`, that node's edge runs on the same thread as the first.
fn start_in_process(
    d: &std::path::Path,
    node: &protocol::NodeName,
    bulk_node: Option<&protocol::NodeName>,
    target_port: u16,
) -> anyhow::Result<std::net::SocketAddr> {
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
    write_edge_config(d, addrs.edge, target_port)?;
    let edge_config = tunnel_edge::EdgeConfig::load(&d.join("edge.toml"))?;
    let edge = Arc::new(tunnel_edge::Edge::new(edge_config)?);
    let bulk_edge = match bulk_node {
        Some(_) => {
            write_named_edge_config(d, "edge-bulk", addrs.edge, target_port)?;
            let config = tunnel_edge::EdgeConfig::load(&d.join("edge-bulk.toml"))?;
            Some(Arc::new(tunnel_edge::Edge::new(config)?))
        }
        None => None,
    };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let run = |edge: Arc<tunnel_edge::Edge>| async move {
            edge.run(
                Arc::new(tunnel_edge::EdgeStatus::default()),
                tokio_util::sync::CancellationToken::new(),
            )
            .await
        };
        rt.block_on(async move {
            tokio::join!(run(edge), async move {
                if let Some(bulk_edge) = bulk_edge {
                    run(bulk_edge).await;
                }
            })
        });
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.routes.get(node).is_none()
        || bulk_node.is_some_and(|n| shared.routes.get(n).is_none())
    {
        anyhow::ensure!(Instant::now() < deadline, "edge did not connect");
        std::thread::sleep(Duration::from_millis(10));
    }
    addrs.connect_tcp.context("no TCP frontend")
}

/// The `tunnel-server` and `tunnel-edge` binaries as children; returns once a CONNECT
/// through the Unix socket succeeds (the edge's session is up and routed).
async fn start_processes(
    d: &std::path::Path,
    socket: &std::path::Path,
    target_port: u16,
    bulk_edge: bool,
) -> anyhow::Result<(std::net::SocketAddr, Vec<ChildGuard>)> {
    let (server, ready) = procs::spawn_server(
        &d.join("server.toml"),
        &d.join("ready.json"),
        &d.join("server.log"),
    )?;
    let connect_tcp = procs::ready_addr(&ready, "connect_tcp")?;
    write_edge_config(d, procs::ready_addr(&ready, "edge")?, target_port)?;
    let edge = procs::spawn_edge(&d.join("edge.toml"), &d.join("edge.log"))?;
    let mut children = vec![server, edge];
    let mut targets = vec![format!("{NODE_IP}:{target_port}")];
    if bulk_edge {
        write_named_edge_config(
            d,
            "edge-bulk",
            procs::ready_addr(&ready, "edge")?,
            target_port,
        )?;
        let mut edge = procs::spawn_edge(&d.join("edge-bulk.toml"), &d.join("edge-bulk.log"))?;
        edge.name = "tunnel-edge_bulk".into();
        children.push(edge);
        targets.push(format!("{BULK_NODE_IP}:{target_port}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for target in &targets {
        loop {
            // A CONNECT answered 200 means the edge's session is up and routed.
            let probe = tokio::time::timeout(
                Duration::from_secs(2),
                tunnel_server::client::connect_unix(socket, target),
            )
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("CONNECT probe timed out")));
            match probe {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "the session for {target} did not come up within 10 s"
                    )))
                }
                Err(_) => {
                    for child in &mut children {
                        child.check_running()?;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    Ok((connect_tcp, children))
}

fn protocol_node(name: &str) -> anyhow::Result<protocol::NodeName> {
    protocol::NodeName::parse(name).map_err(|e| anyhow::anyhow!("{e}"))
}
