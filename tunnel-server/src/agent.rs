//! Stock Konnectivity `proxy-agent`s as nodes: `/AgentService/Connect` over TLS with a
//! mandatory client certificate, so agents can attach to Tether during a migration.
//!
//! The certificate is the agent's identity, exactly as for `tunnel-edge` (node name and IPs,
//! `tunnel_io::identity`); `agentidentifiers` are claims checked against it
//! ([`identifiers`]), never trusted. Each agent gets an HTTP/2 session *in memory*: the
//! server side is an ordinary [`EdgeSession`], so the route table, the dialer, both frontends,
//! the pending-dial and stream limits and every failure mapping are the ones Tether edges
//! use; the edge side (`conn.rs`) translates each stream into Konnectivity packets on the
//! agent's one gRPC stream (`mux.rs`). The protocol has no per-connection flow control, so a
//! connection whose frontend falls behind pauses the agent's whole stream, within bounds
//! (`mux.rs`, `backlog.rs`). Admission is `endpoint.rs`, an attached agent's life
//! `edge/session.rs`.

pub mod identifiers;

mod backlog;
mod conn;
mod endpoint;
mod mux;
mod session;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use anyhow::Context as _;
use protocol::konnectivity::Packet;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::config::ServerConfig;
use crate::edge::session::EdgeSession;
use crate::frontend::konnectivity::service::agent_service_server::AgentServiceServer;
use crate::frontend::konnectivity::{accept_tls, GRPC_MAX_HEADER_LIST, HANDOFF_QUEUE};
use crate::lifecycle::Stop;
use crate::Shared;

/// HTTP/2 stream window the server grants an agent's `Connect` stream: 16 MiB. Every
/// connection of the agent shares it; while the server waits on one connection's full
/// backlog (`mux.rs`) it reads nothing, and this is what the agent can still send meanwhile.
const AGENT_STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 connection window of one agent connection: 32 MiB.
const AGENT_CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame accepted from agents: 1 MiB.
const AGENT_MAX_FRAME: u32 = 1 << 20;
/// `Connect` streams on one agent connection: an agent opens one per server.
const AGENT_STREAMS_PER_CONNECTION: u32 = 4;

/// One attached Konnectivity agent, as the route table sees it (through
/// [`NodeSession::Agent`](crate::edge::node_session::NodeSession::Agent)).
pub struct AgentSession {
    /// The server side of the agent's in-memory HTTP/2 session.
    tunnel: EdgeSession,
    /// The `agentid` the agent sent (logs only: the certificate decides who it is).
    agent_id: String,
    mux: Arc<mux::Mux>,
    /// DRAIN was sent (or the agent sent its own): send it at most once.
    drained: AtomicBool,
}

impl AgentSession {
    /// The session streams are opened on.
    pub(crate) fn tunnel(&self) -> &EdgeSession {
        &self.tunnel
    }

    /// The agent's self-declared ID.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// Connections open through this agent now.
    pub fn open_connections(&self) -> usize {
        self.mux.open_connections()
    }

    /// Tell the agent DRAIN and take no new dials; the stream ends once the open
    /// connections have.
    pub fn retire(&self) {
        if !self.drained.swap(true, Ordering::AcqRel) {
            self.mux.control(Packet::Drain);
        }
        self.tunnel.retire();
    }
}

/// The bound agent listener.
pub struct AgentListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    /// The address actually bound.
    pub addr: SocketAddr,
}

/// Bind `konnectivity.agent_listen`, if set: TLS 1.3, ALPN `h2`, client certificate required
/// and verified against `agent_client_ca` (default: the edge CA).
pub async fn bind(config: &ServerConfig) -> anyhow::Result<Option<AgentListener>> {
    let Some(k) = &config.konnectivity else {
        return Ok(None);
    };
    let Some(addr) = k.agent_listen else {
        return Ok(None);
    };
    let cert = k.agent_cert.as_ref().unwrap_or(&config.edge.cert);
    let key = k.agent_key.as_ref().unwrap_or(&config.edge.key);
    let ca = k.agent_client_ca.as_ref().unwrap_or(&config.edge.client_ca);
    let tls = tunnel_io::tls::server_config_mtls(cert, key, ca, &[b"h2"])
        .context("konnectivity agent listener TLS")?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind konnectivity agent listener {addr}"))?;
    Ok(Some(AgentListener {
        addr: listener.local_addr()?,
        listener,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
    }))
}

/// Serve agents on `listener` until `stop.drain` (no new agents; attached ones are told
/// DRAIN and keep their open connections until they end or `stop.hard`).
///
/// tonic's own shutdown sends HTTP/2 GOAWAY, and a stock agent's gRPC channel leaves READY on
/// GOAWAY and drops every connection it carries (seen with a real `proxy-agent`: about 0.4 s
/// later). So the gRPC server is shut down only once draining has started *and* no attached
/// agent is left, or on `stop.hard`: agents keep their stream, with DRAIN sent, while their
/// connections finish, and a server with no agent still stops at once.
pub fn spawn(listener: AgentListener, shared: Arc<Shared>, stop: Stop, tracker: &TaskTracker) {
    let Some(k) = shared.config.konnectivity.clone() else {
        return;
    };
    let (handoff, incoming) = mpsc::channel(HANDOFF_QUEUE);
    tracker.spawn(accept_tls(
        listener.listener,
        listener.acceptor,
        k.handshake_timeout,
        Arc::new(Semaphore::new(k.max_connections)),
        handoff,
        stop.clone(),
        tracker.clone(),
    ));
    // Attached agents' tasks (also in `tracker`, which the server's drain waits for).
    let sessions = TaskTracker::new();
    let service = AgentServiceServer::new(endpoint::AgentEndpoint::new(
        shared.clone(),
        stop.clone(),
        tracker.clone(),
        sessions.clone(),
    ))
    .max_decoding_message_size(protocol::konnectivity::MAX_PACKET);
    let edge = &shared.config.edge;
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(AGENT_STREAMS_PER_CONNECTION)
        .initial_stream_window_size(AGENT_STREAM_WINDOW)
        .initial_connection_window_size(AGENT_CONNECTION_WINDOW)
        .max_frame_size(AGENT_MAX_FRAME)
        .http2_max_header_list_size(GRPC_MAX_HEADER_LIST)
        // Same liveness rule as edge sessions: silent for ping_interval × ping_misses is dead.
        .http2_keepalive_interval(Some(edge.ping_interval))
        .http2_keepalive_timeout(Some(edge.ping_interval * edge.ping_misses));
    let mut incoming = incoming;
    // The accept loop ends when draining starts; tonic would take the end of `incoming` for
    // a shutdown (GOAWAY), so it never ends: `shutdown` decides.
    let incoming = futures_util::stream::poll_fn(move |cx| match incoming.poll_recv(cx) {
        Poll::Ready(None) => Poll::Pending,
        polled => polled,
    });
    let shutdown = async move {
        let no_agent_left = async {
            stop.drain.cancelled().await;
            sessions.close();
            sessions.wait().await;
        };
        tokio::select! {
            _ = stop.hard.cancelled() => {}
            _ = no_agent_left => {}
        }
    };
    tracker.spawn(
        async move {
            let served = server
                .serve_with_incoming_shutdown(service, incoming, shutdown)
                .await;
            if let Err(error) = served {
                warn!(%error, "konnectivity agent listener stopped");
            }
        }
        .instrument(tracing::info_span!("konnectivity_agents")),
    );
    info!(addr = %listener.addr, "konnectivity agent listener up");
}
