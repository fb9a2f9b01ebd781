//! One attached agent's life: its in-memory HTTP/2 session, routing it (after a settle time
//! when its node already has a live session here), and the task that reads its packets,
//! serves the in-memory streams, and ends it when the agent leaves, the server drains or
//! shuts down, or a newer session of the node takes over.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::konnectivity::Packet;
use tokio::io::DuplexStream;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tonic::{Status, Streaming};
use tracing::{info, warn, Instrument};
use tunnel_io::pipe::PipeConfig;

use super::mux::{Dispatch, Mux};
use super::{conn, AgentSession};
use crate::edge::node_session::NodeSession;
use crate::edge::routing::{Routable, RouteConflict};
use crate::lifecycle::Stop;
use crate::Shared;

/// How long a new agent stream must stay open before it takes over from a live session of
/// the same node. A stock agent that reaches a replica it already holds (it connects through
/// the load balancer until it has seen `servercount` server IDs) closes the new stream as
/// soon as it reads `serverid`; that duplicate must not displace the stream in use.
const AGENT_SETTLE: Duration = Duration::from_secs(2);

/// Per-stream window of the in-memory session: 256 KiB. With the mux's per-connection
/// buffer, the most one connection's slow frontend can hold.
const MEMORY_STREAM_WINDOW: u32 = 256 << 10;
/// Connection window of the in-memory session: 1 GiB, effectively none. The per-stream
/// windows and buffers bound memory; a connection-wide limit would let stalled streams
/// starve the others.
const MEMORY_CONNECTION_WINDOW: u32 = 1 << 30;
/// Largest frame on the in-memory session: one stream window.
const MEMORY_MAX_FRAME: u32 = 256 << 10;
/// Bytes in flight between the two ends of the in-memory session.
const MEMORY_PIPE: usize = 1 << 20;

pub(super) type MemorySession = (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<DuplexStream, Bytes>,
    h2::server::Connection<DuplexStream, Bytes>,
);

/// An HTTP/2 connection whose two ends are in this process: the server opens streams on the
/// client end exactly as on an edge; the server end is the agent's side.
pub(super) async fn memory_session() -> Result<MemorySession, h2::Error> {
    let (near, far) = tokio::io::duplex(MEMORY_PIPE);
    let mut client = h2::client::Builder::new();
    client
        .initial_window_size(MEMORY_STREAM_WINDOW)
        .initial_connection_window_size(MEMORY_CONNECTION_WINDOW)
        .max_frame_size(MEMORY_MAX_FRAME)
        .max_concurrent_reset_streams(1024)
        .enable_push(false);
    let mut server = h2::server::Builder::new();
    server
        .initial_window_size(MEMORY_STREAM_WINDOW)
        .initial_connection_window_size(MEMORY_CONNECTION_WINDOW)
        .max_frame_size(MEMORY_MAX_FRAME)
        .max_concurrent_reset_streams(1024)
        // Both ends are ours: cancelled dials are routine here, never an attack.
        .max_pending_accept_reset_streams(usize::MAX)
        .max_local_error_reset_streams(None);
    let (client, server) = tokio::join!(
        client.handshake::<_, Bytes>(near),
        server.handshake::<_, Bytes>(far)
    );
    let (send_request, client_side) = client?;
    Ok((send_request, client_side, server?))
}

/// Everything one attached agent's task owns.
pub(super) struct Attached {
    pub agent: Arc<AgentSession>,
    pub routed: Arc<NodeSession>,
    pub incoming: Streaming<Packet>,
    pub client_side: h2::client::Connection<DuplexStream, Bytes>,
    pub edge_side: h2::server::Connection<DuplexStream, Bytes>,
    /// Ends the response stream (`Some`: with that error).
    pub end: oneshot::Sender<Option<Status>>,
    /// The node has a live session here: route this one only after [`AGENT_SETTLE`].
    pub settle: bool,
}

/// Run an admitted agent until it is over.
pub(super) async fn run(attached: Attached, shared: Arc<Shared>, stop: Stop, tracker: TaskTracker) {
    let Attached {
        agent,
        routed,
        mut incoming,
        mut client_side,
        mut edge_side,
        end,
        settle,
    } = attached;
    let config = PipeConfig {
        write_timeout: shared.config.connect.write_timeout,
        idle_timeout: None,
    };
    let reader = read_agent(&mut incoming, &agent, &routed, &shared);
    tokio::pin!(reader);
    let accept = accept_streams(&mut edge_side, &agent.mux, &tracker, config);
    tokio::pin!(accept);

    let unrouted = if settle {
        tokio::select! {
            biased;
            _ = stop.hard.cancelled() => Some(("server shut down".to_string(), Some(Status::unavailable("server shut down")))),
            _ = stop.drain.cancelled() => Some(("server draining".to_string(), Some(Status::unavailable("server draining; connect to another replica")))),
            ended = &mut reader => Some(ended),
            _ = tokio::time::sleep(AGENT_SETTLE) => None,
        }
    } else {
        None
    };
    let unrouted = match unrouted {
        Some(ended) => Err(ended),
        None if agent.drained.load(Ordering::Acquire) => {
            Err(("agent sent DRAIN before it was routed".to_string(), None))
        }
        None => route(&agent, &routed, &shared).map_err(|conflict| {
            let message = format!("{conflict}; not routed to this agent");
            (message.clone(), Some(Status::permission_denied(message)))
        }),
    };
    if let Err((reason, status)) = unrouted {
        agent.tunnel.close();
        agent.mux.shutdown(&reason);
        if status.is_none() {
            // Most likely the agent's duplicate connection to a replica it already holds.
            shared.metrics.agent_session("unrouted");
        }
        let _ = end.send(status);
        info!(node = %agent.tunnel.node(), agent_id = agent.agent_id, reason, "agent stream ended before it was routed");
        return;
    }

    // Also once replaced: a retired agent session still serving connections is the node's.
    let revoked = crate::revocation::until_revoked(
        shared.revocations.clone(),
        agent.tunnel.node().clone(),
        agent.tunnel.certificate_issued(),
    );
    tokio::pin!(revoked);
    let mut draining = false;
    let (reason, status) = loop {
        tokio::select! {
            biased;
            _ = stop.hard.cancelled() => {
                break ("server shut down".to_string(), Some(Status::unavailable("server shut down")));
            }
            _ = agent.tunnel.closed() => {
                break ("session closed by the server".to_string(), Some(Status::unavailable("session closed by the server")));
            }
            _ = &mut revoked => {
                break ("node revoked".to_string(), Some(Status::permission_denied("node revoked")));
            }
            _ = stop.drain.cancelled(), if !draining => {
                // No new dials here; open connections run on, then the stream ends.
                draining = true;
                agent.retire();
                shared.routes.deregister(&routed);
                info!(target: "audit", event = "agent_drain_sent", node = %agent.tunnel.node(), "server draining: DRAIN sent to agent");
            }
            ended = &mut reader => break ended,
            reason = &mut accept => break (reason, Some(Status::internal("in-memory session failed"))),
            r = &mut client_side => break (format!("in-memory session closed: {r:?}"), None),
            _ = agent.tunnel.retired_and_idle() => {
                break ("retired; its connections are done".to_string(), None);
            }
        }
    };
    agent.tunnel.close();
    agent.mux.shutdown(&reason);
    shared.routes.deregister(&routed);
    shared.metrics.agents_connected.dec();
    shared
        .metrics
        .edges_connected
        .set(shared.routes.len() as i64);
    let _ = end.send(status);
    info!(target: "audit", event = "agent_disconnected", node = %agent.tunnel.node(), agent_id = agent.agent_id, peer = %agent.tunnel.peer(), reason, "konnectivity agent detached");
}

/// Make `agent` its node's route (retiring the session it replaces), or refuse it when
/// another node owns one of its addresses.
fn route(
    agent: &AgentSession,
    routed: &Arc<NodeSession>,
    shared: &Shared,
) -> Result<(), RouteConflict> {
    let node = agent.tunnel.node();
    let peer = agent.tunnel.peer();
    match shared.routes.register(routed.clone()) {
        Ok(Some(old)) => {
            info!(%node, old_peer = %old.peer(), old_kind = old.kind(), "agent replaces the node's previous session");
            old.retire();
        }
        Ok(None) => {}
        Err(conflict) => {
            shared.metrics.agent_session("conflict");
            warn!(target: "audit", event = "agent_refused", %peer, %node, agent_id = agent.agent_id, result = "conflict", reason = %conflict, "konnectivity agent refused");
            return Err(conflict);
        }
    }
    shared.metrics.agent_session("ok");
    shared.metrics.agents_connected.inc();
    shared
        .metrics
        .edges_connected
        .set(shared.routes.len() as i64);
    info!(target: "audit", event = "agent_connected", %node, agent_id = agent.agent_id, ips = ?tunnel_io::logging::JsonList(agent.tunnel.ips()), %peer, "konnectivity agent attached");
    Ok(())
}

/// Read the agent's packets until its stream ends. While one connection's backlog is full
/// this waits on it (at most `write_timeout` without progress); the caller's `select!` keeps
/// serving stops, the in-memory session and the other connections meanwhile.
async fn read_agent(
    incoming: &mut Streaming<Packet>,
    agent: &AgentSession,
    routed: &Arc<NodeSession>,
    shared: &Shared,
) -> (String, Option<Status>) {
    loop {
        match incoming.message().await {
            Ok(Some(packet)) => match agent.mux.dispatch(packet) {
                Dispatch::Continue => {}
                // Backpressure: the agent's next packet waits until this one has room.
                Dispatch::Full(held) => agent.mux.deliver(held).await,
                Dispatch::Drain => {
                    if !agent.drained.swap(true, Ordering::AcqRel) {
                        info!(target: "audit", event = "agent_draining", node = %agent.tunnel.node(), "agent sent DRAIN; no new dials");
                    }
                    agent.tunnel.retire();
                    shared.routes.deregister(routed);
                }
            },
            Ok(None) => return ("agent closed its stream".into(), None),
            // A packet our codec refused: the agent broke the protocol.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::OutOfRange
                        | tonic::Code::ResourceExhausted
                ) =>
            {
                let reason = format!("protocol error: {}", status.message());
                return (reason, Some(Status::invalid_argument(status.message())));
            }
            Err(status) => return (format!("agent stream broke: {}", status.message()), None),
        }
    }
}

/// Serve the agent side of the in-memory session: one task per stream the server opens.
async fn accept_streams(
    edge_side: &mut h2::server::Connection<DuplexStream, Bytes>,
    mux: &Arc<Mux>,
    tracker: &TaskTracker,
    config: PipeConfig,
) -> String {
    loop {
        match edge_side.accept().await {
            Some(Ok((request, respond))) => {
                let span = tracing::debug_span!(
                    "agent_conn",
                    authority = request
                        .uri()
                        .authority()
                        .map(|a| tracing::field::display(a.to_string()))
                );
                tracker.spawn(conn::serve(request, respond, mux.clone(), config).instrument(span));
            }
            Some(Err(e)) => return format!("in-memory session failed: {e}"),
            None => return "in-memory session closed".into(),
        }
    }
}
