//! Starting and stopping a server: bind every listener (so readiness means "listening"),
//! spawn their accept loops under one cancellation token and task tracker, and shut down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::info;
use tunnel_io::tls::{server_config_mtls, ALPN_EDGE_SESSION, ALPN_LANE, ALPN_UPSTREAM};

use crate::config::ServerConfig;
use crate::edge::node_session::NodeSession;
use crate::edge::routing::RouteTable;
use crate::lifecycle::{bind_unix, Stop};
use crate::metrics::Metrics;
use crate::policy::DialPolicy;

/// State every task of one server shares.
pub struct Shared {
    /// The validated configuration.
    pub config: ServerConfig,
    /// Node → live session.
    pub routes: RouteTable<NodeSession>,
    /// The server's destination policy.
    pub policy: DialPolicy,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Source of session ids.
    pub next_session_id: AtomicU64,
    /// Source of the numbers that name streams to an edge with lanes: from a random start,
    /// so a restarted replica's numbers do not meet the ones an edge still holds.
    pub next_stream_id: Arc<AtomicU64>,
    /// Every listener is bound.
    pub ready: AtomicBool,
    /// Shutdown has started.
    pub draining: AtomicBool,
    /// This replica's ID and the replica count.
    pub replica: crate::replicas::Replica,
    /// Revoked nodes (with `[registration]`): checked on every edge handshake.
    pub revocations: Option<Arc<crate::revocation::RevocationList>>,
    /// Issued identities (with `[registration]`): a session whose certificate is not its
    /// node's current one never replaces the node's live session.
    pub identities: Option<Arc<dyn crate::registration::state::identities::IdentityStore>>,
    /// Upstream stream and dial budgets per node.
    pub upstreams: crate::edge::upstream::NodeUpstreams,
    /// Where TCP edge sessions and their CONNECT streams run (none: on this runtime).
    pub shards: crate::shards::Shards,
}

/// The addresses the server actually bound (ports resolved when configured as 0).
#[derive(Debug, Clone, Serialize)]
pub struct BoundAddrs {
    /// Edge listener.
    pub edge: SocketAddr,
    /// Edge listener on UDP (QUIC), if enabled.
    pub edge_quic: Option<SocketAddr>,
    /// mTLS CONNECT frontend, if enabled.
    pub connect_tcp: Option<SocketAddr>,
    /// CONNECT frontend Unix socket, if enabled.
    pub connect_unix: Option<std::path::PathBuf>,
    /// Admin endpoint, if enabled.
    pub admin: Option<SocketAddr>,
    /// mTLS Konnectivity gRPC frontend, if enabled.
    pub konnectivity_tcp: Option<SocketAddr>,
    /// Konnectivity gRPC frontend Unix socket, if enabled.
    pub konnectivity_unix: Option<std::path::PathBuf>,
    /// Konnectivity agent listener (`/AgentService/Connect`), if enabled.
    pub konnectivity_agent: Option<SocketAddr>,
    /// Registration API, if enabled.
    pub registration: Option<SocketAddr>,
}

/// A started server.
pub struct RunningServer {
    /// Where it listens.
    pub addrs: BoundAddrs,
    /// Shared state (route table, metrics) for inspection.
    pub shared: Arc<Shared>,
    stop: Stop,
    /// Tunnel work: listeners, sessions, streams. Draining ends when it is empty.
    tracker: TaskTracker,
    /// The admin endpoint, which keeps answering (`/readyz` 503) while draining.
    admin_tracker: TaskTracker,
}

impl RunningServer {
    /// Bind every listener and start serving, everything on the calling runtime.
    pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
        RunningServer::start_sharded(config, crate::shards::Shards::none()).await
    }

    /// Bind every listener and start serving, TCP edge sessions and the CONNECT streams to
    /// them on `shards` (stopped at the end of [`RunningServer::shutdown`]).
    pub async fn start_sharded(
        config: ServerConfig,
        shards: crate::shards::Shards,
    ) -> anyhow::Result<RunningServer> {
        let edge_tls = server_config_mtls(
            &config.edge.cert,
            &config.edge.key,
            &config.edge.client_ca,
            match config.edge.lanes {
                true => &[ALPN_EDGE_SESSION, ALPN_UPSTREAM, ALPN_LANE],
                false => &[ALPN_EDGE_SESSION, ALPN_UPSTREAM],
            },
        )
        .context("edge listener TLS")?;
        let edge_listener = TcpListener::bind(config.edge.listen)
            .await
            .with_context(|| format!("bind edge listener {}", config.edge.listen))?;
        let edge_quic = match config.edge.quic {
            true => {
                let addr = config
                    .edge
                    .quic_listen
                    .unwrap_or(edge_listener.local_addr()?);
                Some(crate::edge::session::bind_quic(
                    &config,
                    edge_tls.clone(),
                    addr,
                )?)
            }
            false => None,
        };

        let connect_tcp = match config.connect.tcp_listen {
            Some(addr) => {
                // Validation guarantees all three are present.
                let (Some(cert), Some(key), Some(ca)) = (
                    &config.connect.tcp_cert,
                    &config.connect.tcp_key,
                    &config.connect.tcp_client_ca,
                ) else {
                    anyhow::bail!("connect.tcp_listen needs tcp_cert, tcp_key and tcp_client_ca");
                };
                let tls = server_config_mtls(cert, key, ca, &[]).context("connect frontend TLS")?;
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("bind connect frontend {addr}"))?;
                Some((listener, TlsAcceptor::from(Arc::new(tls))))
            }
            None => None,
        };
        let admin = match config.admin.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("bind admin listener {addr}"))?,
            ),
            None => None,
        };

        let mut konnectivity = match &config.konnectivity {
            Some(k) if k.serves_frontend() => Some(crate::frontend::konnectivity::bind(k).await?),
            _ => None,
        };
        let agents = crate::agent::bind(&config).await?;
        let registration = match &config.registration {
            Some(r) => Some(crate::registration::bind(r, &config.edge, &config.state).await?),
            None => None,
        };
        // Unix sockets last: a start that fails on a TCP port (taken by a running instance)
        // must not have touched any socket path.
        let connect_unix = match &config.connect.unix_socket {
            Some(path) => Some(bind_unix(path, config.connect.unix_socket_mode)?),
            None => None,
        };
        let konnectivity_unix = match &config.konnectivity {
            Some(k) if k.serves_frontend() => crate::frontend::konnectivity::bind_unix(k)?,
            _ => None,
        };
        if let (Some(listeners), Some(unix), Some(k)) = (
            konnectivity.as_mut(),
            konnectivity_unix,
            config.konnectivity.as_ref(),
        ) {
            listeners.set_unix(unix, k.unix_socket.clone().unwrap_or_default());
        }
        let addrs = BoundAddrs {
            konnectivity_tcp: konnectivity.as_ref().and_then(|k| k.tcp_addr),
            konnectivity_unix: konnectivity.as_ref().and_then(|k| k.unix_path.clone()),
            konnectivity_agent: agents.as_ref().map(|a| a.addr),
            edge: edge_listener.local_addr()?,
            edge_quic: edge_quic.as_ref().map(|e| e.local_addr()).transpose()?,
            connect_tcp: connect_tcp
                .as_ref()
                .map(|(l, _)| l.local_addr())
                .transpose()?,
            connect_unix: config.connect.unix_socket.clone(),
            admin: admin.as_ref().map(|l| l.local_addr()).transpose()?,
            registration: registration.as_ref().map(|r| r.addr),
        };
        let stop = Stop::default();
        let replica = crate::replicas::Replica::new(&config.replica, stop.hard.clone());
        let shared = Arc::new(Shared {
            replica,
            policy: DialPolicy::new(&config.policy),
            config,
            routes: RouteTable::default(),
            metrics: Metrics::default(),
            next_session_id: AtomicU64::new(1),
            next_stream_id: Arc::new(AtomicU64::new(rand::random::<u64>() >> 1)),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            revocations: registration.as_ref().map(|r| r.revocations.clone()),
            identities: registration.as_ref().map(|r| r.identities.clone()),
            upstreams: crate::edge::upstream::NodeUpstreams::default(),
            shards,
        });
        shared
            .metrics
            .certificate_expiry_from("edge_listener", &shared.config.edge.cert);
        if let Some(cert) = &shared.config.connect.tcp_cert {
            shared
                .metrics
                .certificate_expiry_from("connect_frontend", cert);
        }
        let tracker = TaskTracker::new();
        let admin_tracker = TaskTracker::new();

        tracker.spawn(crate::edge::session::serve_edges(
            edge_listener,
            TlsAcceptor::from(Arc::new(edge_tls)),
            shared.clone(),
            stop.clone(),
            tracker.clone(),
        ));
        if let Some(endpoint) = edge_quic {
            tracker.spawn(crate::edge::session::serve_quic_edges(
                endpoint,
                shared.clone(),
                stop.clone(),
                tracker.clone(),
            ));
        }
        if let Some((listener, acceptor)) = connect_tcp {
            tracker.spawn(crate::frontend::connect::serve_tcp(
                listener,
                acceptor,
                shared.clone(),
                stop.clone(),
                tracker.clone(),
            ));
        }
        if let Some(listener) = connect_unix {
            tracker.spawn(crate::frontend::connect::serve_unix(
                listener,
                shared.clone(),
                stop.clone(),
                tracker.clone(),
            ));
        }
        if let Some(listeners) = konnectivity {
            crate::frontend::konnectivity::spawn(listeners, shared.clone(), stop.clone(), &tracker);
        }
        if let Some(registration) = registration {
            crate::registration::spawn(registration, shared.clone(), stop.clone(), &tracker);
        }
        if let Some(listener) = agents {
            crate::agent::spawn(listener, shared.clone(), stop.clone(), &tracker);
        }
        if let Some(listener) = admin {
            admin_tracker.spawn(crate::admin::serve_admin(
                listener,
                shared.clone(),
                stop.hard.clone(),
                admin_tracker.clone(),
            ));
        }
        shared.ready.store(true, Ordering::Release);
        info!(replica = %shared.replica.id, replicas = shared.replica.count(), edge = %addrs.edge, edge_quic = addrs.edge_quic.map(display), connect_tcp = addrs.connect_tcp.map(display), connect_unix = addrs.connect_unix.as_ref().map(|p| display(p.display())), admin = addrs.admin.map(display), "tunnel-server listening");
        Ok(RunningServer {
            addrs,
            shared,
            stop,
            tracker,
            admin_tracker,
        })
    }

    /// A handle that can start or force shutdown from elsewhere (a signal handler).
    pub fn stop_handle(&self) -> Stop {
        self.stop.clone()
    }

    /// Graceful drain: `/readyz` turns 503, listeners close, edge sessions take no new
    /// streams (h2 GOAWAY once their streams end), in-flight streams run until done or until
    /// `grace` is over; returns as soon as nothing is left. Then everything is closed.
    pub async fn shutdown(self, grace: Duration) {
        self.shared.draining.store(true, Ordering::Release);
        self.stop.drain.cancel();
        self.tracker.close();
        let open = self.shared.metrics.streams_open.get();
        info!(
            streams_open = open,
            grace_ms = grace.as_millis() as u64,
            "draining"
        );
        tokio::select! {
            _ = self.tracker.wait() => info!("drained: no stream left"),
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(streams_open = self.shared.metrics.streams_open.get(), "grace period over; closing remaining streams");
            }
            _ = self.stop.hard.cancelled() => tracing::warn!("forced shutdown"),
        }
        self.stop.hard.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
        self.admin_tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.admin_tracker.wait()).await;
        if let Some(path) = &self.addrs.connect_unix {
            let _ = std::fs::remove_file(path);
        }
        if let Some(path) = &self.addrs.konnectivity_unix {
            let _ = std::fs::remove_file(path);
        }
        self.shared.shards.stop();
    }
}
