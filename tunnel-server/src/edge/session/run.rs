//! A confirmed edge session's life, the same on both transports: the session-info confirm,
//! routing (replacing the node's previous session), liveness, re-announcements, drain and
//! revocation, until it ends. Handshakes are `listener` (TCP) and `quic`.

use std::sync::Arc;

use bytes::Bytes;
use h2::PingPong;
use tracing::{info, warn};

use super::listener::SessionIo;
use super::{streams_done, EdgeSession};
use crate::edge::session_info::{announce_changes, announce_once};
use crate::Shared;

/// Confirm, route and run an authenticated session until it ends, on either transport.
/// `slots` (handshake permits) are held until the session is confirmed; `quic`, for a QUIC
/// session, is told of a drain (its GOAWAY).
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_session<S>(
    session: Arc<EdgeSession>,
    mut connection: h2::client::Connection<SessionIo, Bytes>,
    ping_pong: PingPong,
    shared: Arc<Shared>,
    stop: crate::lifecycle::Stop,
    (deadline, limit): (tokio::time::Instant, std::time::Duration),
    slots: S,
    quic: Option<quinn::Connection>,
) {
    tracing::Span::current().record("node", session.node.as_str());
    // Behind a PROXY-protocol balancer this is the edge's own address, not the balancer's.
    let peer = session.peer;
    // The edge confirms before the session is routed: a duplicate session to this replica
    // (another of the edge's sessions already holds it) is refused without disturbing it.
    let confirm = announce_once(&session, &shared, shared.replica.count());
    let confirmed = tokio::select! {
        r = confirm => r,
        r = &mut connection => Err(format!("session ended before confirming: {r:?}")),
        _ = tokio::time::sleep_until(deadline) => Err(format!("edge did not confirm the session within {limit:?} of connecting")),
        _ = stop.drain.cancelled() => Err("server draining".to_string()),
    };
    drop(slots);
    if let Err(reason) = confirmed {
        shared.metrics.handshake("unconfirmed");
        info!(node = %session.node, %peer, reason, "edge session not established");
        return;
    }
    let routed = Arc::new(crate::edge::node_session::NodeSession::Tether(
        session.clone(),
    ));
    let replaced = match shared.routes.register(routed.clone()) {
        Ok(replaced) => replaced,
        Err(conflict) => {
            shared.metrics.handshake("conflict");
            warn!(target: "audit", event = "edge_refused", %peer, node = %session.node, reason = %conflict, "edge session refused");
            return;
        }
    };
    if let Some(old) = replaced {
        info!(old_peer = %old.peer(), old_kind = old.kind(), "new session replaces the node's previous one");
        old.retire();
    }
    shared.metrics.handshake("ok");
    let by_transport = shared
        .metrics
        .edge_sessions
        .get_or_create(&crate::metrics::TransportLabels {
            transport: session.transport(),
        })
        .clone();
    by_transport.inc();
    let on_shard = session.shard().map(|shard| {
        let gauge = shared
            .metrics
            .shard_sessions
            .get_or_create(&crate::metrics::ShardLabels {
                shard: shard.index().to_string(),
            })
            .clone();
        gauge.inc();
        gauge
    });
    // Counted while the session lives (replaced or not), dropped with this task.
    let _expiry = session
        .certificate()
        .expires_unix
        .map(|at| shared.metrics.edge_certificates.session(at as i64));
    shared
        .metrics
        .edges_connected
        .set(shared.routes.len() as i64);
    info!(target: "audit", event = "edge_connected", node = %session.node, transport = session.transport(), ips = ?tunnel_io::logging::JsonList(&session.ips), %peer, "edge session established");

    let announce = announce_changes(&session, &shared);
    tokio::pin!(announce);
    let edge = &shared.config.edge;
    let keepalive = tunnel_io::liveness::keepalive(ping_pong, edge.ping_interval, edge.ping_misses);
    tokio::pin!(keepalive);
    // Also after the session was replaced: a retired session still draining is the node's too.
    let revoked = crate::revocation::until_revoked(
        shared.revocations.clone(),
        session.node.clone(),
        session.certificate_issued(),
    );
    tokio::pin!(revoked);
    let mut draining = false;
    // A QUIC session's tunneled streams do not ride its h2 connection (`super::direct`), so
    // that connection ending after retirement is not the last stream ending: from then on
    // the session ends when its streams are done or QUIC is lost.
    let mut control_done = false;
    let quic_lost = async {
        match &quic {
            Some(conn) => conn.closed().await.to_string(),
            None => std::future::pending().await,
        }
    };
    tokio::pin!(quic_lost);
    let ended = loop {
        tokio::select! {
            biased;
            _ = stop.hard.cancelled() => break "server shut down".to_string(),
            _ = session.closed.cancelled() => break "session closed by the server".to_string(),
            _ = &mut revoked => break "node revoked".to_string(),
            _ = stop.drain.cancelled(), if !draining => {
                // Drain: no new streams here; in-flight ones run on, then h2 says GOAWAY.
                draining = true;
                session.retire();
                if let Some(quic) = &quic {
                    let quic = quic.clone();
                    tokio::spawn(async move { tunnel_io::quic_bridge::send_goaway(&quic).await });
                }
                shared.routes.deregister(&routed);
            }
            result = &mut connection, if !control_done => match result {
                Ok(()) if quic.is_some() && session.retired.is_cancelled() => control_done = true,
                Ok(()) => break "session closed after its last stream".to_string(),
                Err(e) => break format!("session error: {e}"),
            },
            reason = &mut quic_lost => break format!("QUIC connection closed: {reason}"),
            // QUIC's own keep-alive and idle timeout watch the link once h2 is gone.
            reason = &mut keepalive, if !control_done => break reason,
            reason = &mut announce => break reason,
            _ = streams_done(&session) => {
                break "retired; its streams are done".to_string()
            }
        }
    };
    session.closed.cancel();
    by_transport.dec();
    if let Some(gauge) = on_shard {
        gauge.dec();
    }
    shared.routes.deregister(&routed);
    shared
        .metrics
        .edges_connected
        .set(shared.routes.len() as i64);
    info!(target: "audit", event = "edge_disconnected", node = %session.node, transport = session.transport(), %peer, reason = ended, "edge session ended");
}
