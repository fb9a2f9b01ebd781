//! Replicas behind a load balancer: N `tunnel-server` processes (each `[replica] id` and
//! `count`), haproxy in TCP mode in front of their edge listeners, and one edge process that
//! knows only haproxy's address and must end up with a session on every replica.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tunnel_server::demo::kubelet::DemoKubelet;

use crate::data::{exchange, PeerRequest};
use crate::edge::{EdgeOptions, EdgeProc, EdgeTuning};
use crate::haproxy::{Backend, Haproxy};
use crate::pki::{EdgeFiles, Pki};
use crate::server::{ServerOptions, ServerProc};
use crate::targets::{ChecksumPeer, EchoServer};
use crate::{poll_until, within, NODE, NODE_IP};

/// How long an edge may take to hold a session with every replica.
pub const ALL_SESSIONS_TIMEOUT: Duration = Duration::from_secs(20);

/// What differs between HA tests.
#[derive(Debug, Clone)]
pub struct HaOptions {
    /// Server replicas.
    pub replicas: usize,
    /// haproxy sends PROXY v2 and the servers expect it.
    pub proxy_protocol: bool,
    /// Base server settings (ports, replica and proxy settings are filled in).
    pub server: ServerOptions,
    /// The edge's timings.
    pub edge: EdgeTuning,
}

impl Default for HaOptions {
    fn default() -> Self {
        HaOptions {
            replicas: 2,
            proxy_protocol: false,
            server: ServerOptions {
                ping_interval: Duration::from_millis(200),
                ping_misses: 3,
                ..ServerOptions::default()
            },
            edge: EdgeTuning {
                ping_interval: Duration::from_millis(200),
                ..EdgeTuning::default()
            },
        }
    }
}

/// A running HA topology. Fields drop in order: edge, haproxy, servers, targets, PKI.
pub struct HaCluster {
    /// The edge process (dials haproxy only).
    pub edge: EdgeProc,
    /// The load balancer.
    pub haproxy: Haproxy,
    /// The replicas; replica `i` has ID `replica-i`.
    pub servers: Vec<ServerProc>,
    /// HTTPS kubelet stand-in.
    pub kubelet: DemoKubelet,
    /// Echo target.
    pub echo: EchoServer,
    /// Checksum target.
    pub peer: ChecksumPeer,
    /// The edge's identity.
    pub edge_files: EdgeFiles,
    /// Certificates.
    pub pki: Pki,
}

impl HaCluster {
    /// Start everything; `None` when haproxy is unavailable (the test is skipped, see
    /// [`crate::haproxy::binary_or_skip`]). Returns once the edge holds a session with every
    /// replica.
    pub async fn start(test: &str, options: HaOptions) -> Option<HaCluster> {
        let binary = crate::haproxy::binary_or_skip(test)?;
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
        let ports = vec![kubelet.addr.port(), echo.addr.port(), peer.addr.port()];
        let mut servers = Vec::new();
        for i in 0..options.replicas {
            let server_options = ServerOptions {
                allowed_ports: ports.clone(),
                replica: Some((replica_id(i), options.replicas)),
                proxy_protocol: options.proxy_protocol,
                ..options.server.clone()
            };
            servers.push(ServerProc::start(&pki, &server_options).await);
        }
        let backends: Vec<Backend> = servers
            .iter()
            .map(|s| Backend {
                addr: s.addrs.edge,
                admin: s.addrs.admin,
            })
            .collect();
        let haproxy = Haproxy::start(binary, &backends, options.proxy_protocol).await;
        let edge_files = pki.issue_edge(NODE, &[NODE_IP]);
        let edge = EdgeProc::start_tuned(
            &pki,
            &[haproxy.addr],
            &EdgeOptions {
                files: edge_files.clone(),
                allow_ports: ports,
            },
            &options.edge,
        );
        let cluster = HaCluster {
            edge,
            haproxy,
            servers,
            kubelet,
            echo,
            peer,
            edge_files,
            pki,
        };
        cluster.wait_all_sessions(ALL_SESSIONS_TIMEOUT).await;
        Some(cluster)
    }

    /// Wait until every running replica holds a session of the edge.
    pub async fn wait_all_sessions(&self, timeout: Duration) {
        poll_until(
            "a session of the edge on every replica",
            timeout,
            Duration::from_millis(20),
            || {
                let all = self.servers.iter().all(|s| s.has_edge_session(NODE));
                std::future::ready(all.then_some(()))
            },
        )
        .await
    }

    /// CONNECT to `port` on the node through replica `i`'s mTLS frontend.
    pub async fn connect_via(&self, i: usize, port: u16) -> anyhow::Result<TlsStream<TcpStream>> {
        tunnel_server::client::connect_tls(
            self.servers[i].addrs.connect_tcp,
            self.pki.frontend_client_tls(),
            &format!("{NODE_IP}:{port}"),
        )
        .await
    }

    /// One checksummed exchange (`len` bytes each way) through replica `i`; panics on any
    /// difference or failure.
    pub async fn checked_exchange_via(&mut self, i: usize, seed: u64, len: u64) {
        let label = format!("exchange {seed} through replica {i}");
        let tunnel = self
            .connect_via(i, self.peer.addr.port())
            .await
            .unwrap_or_else(|e| panic!("{label}: CONNECT: {e:#}"));
        let request = PeerRequest {
            seed,
            reply_len: len,
            reply_after_eof: false,
        };
        let client = within(
            &label,
            Duration::from_secs(20),
            exchange(tunnel, request, len),
        )
        .await
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        let report = within(
            "the peer's report",
            Duration::from_secs(10),
            self.peer.next_report(),
        )
        .await;
        report.assert_matches(&label, request, len, &client);
    }
}

/// The ID of replica `i`.
pub fn replica_id(i: usize) -> String {
    format!("replica-{i}")
}
