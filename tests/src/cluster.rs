//! The usual test topology, started in one call: PKI, an HTTPS demo kubelet, an echo server
//! and a checksum peer on 127.0.0.1, one server process and one edge process for node
//! [`NODE`] ([`NODE_IP`]) whose session is up when [`Cluster::start`] returns.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tunnel_server::demo::kubelet::DemoKubelet;

use crate::data::{exchange, PeerRequest};
use crate::edge::{EdgeOptions, EdgeProc, EdgeTuning};
use crate::frontend::{self, metric};
use crate::pki::{EdgeFiles, Pki};
use crate::relay::Relay;
use crate::server::{ServerOptions, ServerProc, EDGE_UP_TIMEOUT};
use crate::targets::{ChecksumPeer, EchoServer};
use crate::{poll_until, NODE, NODE_IP};

/// What differs between tests.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Further ports allowed by both the server's policy and the edge's allowlist.
    pub allow_both: Vec<u16>,
    /// Ports the server allows but the edge's allowlist does not.
    pub allow_server_only: Vec<u16>,
    /// Server logs as JSON lines.
    pub log_json: bool,
    /// `connect.max_head_bytes` (default 16 KiB).
    pub max_head_bytes: Option<usize>,
    /// Base server settings (ports, log format and head size come from the fields above).
    pub server: ServerOptions,
    /// The edge's timings.
    pub edge: EdgeTuning,
    /// Put a fault-injecting relay between the edge and the server.
    pub relay: bool,
}

impl ClusterOptions {
    /// The defaults, with the edge on `transport`.
    pub fn over(transport: crate::edge::Transport) -> ClusterOptions {
        ClusterOptions {
            edge: transport.tuning(),
            ..ClusterOptions::default()
        }
    }
}

/// A running test topology.
pub struct Cluster {
    // Fields drop in order: the edge first, then the server, then targets and certificates.
    /// The edge process.
    pub edge: EdgeProc,
    /// The server process.
    pub server: ServerProc,
    /// The relay the edge dials, when asked for.
    pub relay: Option<Relay>,
    /// The HTTPS kubelet stand-in.
    pub kubelet: DemoKubelet,
    /// Echo target.
    pub echo: EchoServer,
    /// Checksum target.
    pub peer: ChecksumPeer,
    /// The edge's identity files.
    pub edge_files: EdgeFiles,
    /// Every certificate.
    pub pki: Pki,
}

impl Cluster {
    /// Start everything and wait for the edge's session.
    pub async fn start(options: ClusterOptions) -> Cluster {
        let pki = Pki::new();
        let kubelet = DemoKubelet::start(
            "127.0.0.1:0".parse().expect("address"),
            &pki.kubelet_cert.cert_pem,
            &pki.kubelet_cert.key_pem,
        )
        .await
        .expect("start demo kubelet");
        let echo = EchoServer::start().await;
        let peer = ChecksumPeer::start().await;
        let mut edge_ports = vec![kubelet.addr.port(), echo.addr.port(), peer.addr.port()];
        edge_ports.extend(&options.allow_both);
        let mut server_ports = edge_ports.clone();
        server_ports.extend(&options.allow_server_only);

        let mut server_options = ServerOptions {
            allowed_ports: server_ports,
            log_json: options.log_json,
            ..options.server.clone()
        };
        if let Some(max) = options.max_head_bytes {
            server_options.max_head_bytes = max;
        }
        let server = ServerProc::start(&pki, &server_options).await;
        let edge_files = pki.issue_edge(NODE, &[NODE_IP]);
        let relay = match options.relay {
            true => Some(Relay::start(server.addrs.edge).await),
            false => None,
        };
        let edge = EdgeProc::start_tuned(
            &pki,
            &[relay.as_ref().map_or(server.addrs.edge, |r| r.addr)],
            &EdgeOptions {
                files: edge_files.clone(),
                allow_ports: edge_ports,
            },
            &options.edge,
        );
        let cluster = Cluster {
            pki,
            kubelet,
            echo,
            peer,
            edge_files,
            edge,
            server,
            relay,
        };
        cluster.server.wait_for_edge_session(NODE).await;
        if options.edge.transport == crate::edge::Transport::Quic {
            assert_eq!(
                cluster.server.edge_transport(NODE).as_deref(),
                Some("quic"),
                "the session runs over QUIC"
            );
        }
        cluster
    }

    /// `NODE_IP:port`.
    pub fn target(&self, port: u16) -> String {
        format!("{NODE_IP}:{port}")
    }

    /// CONNECT to `target` through the mTLS frontend as kube-apiserver; the stream is the
    /// tunnel on success.
    pub async fn connect(&self, target: &str) -> anyhow::Result<TlsStream<TcpStream>> {
        tunnel_server::client::connect_tls(
            self.server.addrs.connect_tcp,
            self.pki.frontend_client_tls(),
            target,
        )
        .await
    }

    /// CONNECT to `target` through the mTLS frontend and return the answer, whatever its
    /// status (the stream is dropped).
    pub async fn connect_answer(&self, target: &str) -> frontend::Answer {
        let mut tls = frontend::tls_to(
            self.server.addrs.connect_tcp,
            self.pki.frontend_client_tls(),
        )
        .await
        .expect("TLS to the mTLS frontend");
        crate::within(
            "the CONNECT answer",
            Duration::from_secs(30),
            frontend::connect_answer(&mut tls, target),
        )
        .await
        .expect("read the CONNECT answer")
    }

    /// One checksummed exchange with the checksum peer (`len` bytes each way, concurrently)
    /// through the mTLS frontend; panics on any failure or difference.
    pub async fn checked_exchange(&mut self, seed: u64, len: u64) {
        let label = format!("exchange {seed}");
        let tunnel = self
            .connect(&self.target(self.peer.addr.port()))
            .await
            .unwrap_or_else(|e| panic!("{label}: CONNECT: {e:#}"));
        let request = PeerRequest {
            seed,
            reply_len: len,
            reply_after_eof: false,
        };
        let client = crate::within(
            &label,
            Duration::from_secs(20),
            exchange(tunnel, request, len),
        )
        .await
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        let report = crate::within(
            "the peer's report",
            Duration::from_secs(10),
            self.peer.next_report(),
        )
        .await;
        report.assert_matches(&label, request, len, &client);
    }

    /// The server's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = frontend::admin_get(self.server.addrs.admin, "/metrics")
            .await
            .expect("GET /metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// Wait until the server's metrics report `n` connected edges.
    pub async fn wait_edges_connected(&self, n: u64) {
        let admin = self.server.addrs.admin;
        let what = format!("tether_edges_connected {n}");
        poll_until(
            &what,
            EDGE_UP_TIMEOUT,
            Duration::from_millis(25),
            || async move {
                let (_, body) = frontend::admin_get(admin, "/metrics").await.ok()?;
                (metric(&body, "tether_edges_connected") == Some(n as f64)).then_some(())
            },
        )
        .await
    }
}
