//! The edge listener: accepting an edge's connection (per-source and global handshake
//! slots, the pre-TLS prelude), the TLS and HTTP/2 handshakes, the session-info confirm, and
//! then running the routed session until it ends. A child of `session`, so it can reach the
//! session's private state; it owns nothing of the frontends.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::PingPong;
use protocol::NodeName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};
use tunnel_io::control_frames::ControlFrameLimit;

use super::{streams_done, EdgeSession};
use crate::prelude::{Prelude, PreludeError};
use crate::session_info::{announce_changes, announce_once};
use crate::source_limit::{SourceLimit, SourceSlot};
use crate::Shared;

/// Accept edge connections until draining starts. Per-connection failures are logged and skipped;
/// accept errors (such as running out of file descriptors) back off and retry. A connection
/// holds a handshake slot (global, and one of its source's) from accept until its session is
/// confirmed, and must send its first byte within `first_byte_timeout`: connections that never
/// speak cannot hold the listener.
pub async fn serve_edges(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    stop: crate::server::Stop,
    tracker: TaskTracker,
) {
    let edge = &shared.config.edge;
    let handshakes = Arc::new(Semaphore::new(edge.max_handshakes));
    let sources = Arc::new(SourceLimit::new(edge.max_handshakes_per_source));
    let prelude = Prelude {
        first_byte_timeout: edge.first_byte_timeout,
        proxy_protocol: edge.proxy_protocol,
        proxy_from: edge.proxy_protocol_from.clone(),
    };
    let mut retry = tunnel_io::accept::AcceptRetry::new("edge");
    loop {
        let Some((tcp, peer)) = retry.next(&stop.drain, || listener.accept()).await else {
            return;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            shared.metrics.handshake("overloaded");
            debug!(%peer, "too many edge handshakes in progress; connection dropped");
            continue;
        };
        let span = tracing::info_span!("edge", %peer, node = tracing::field::Empty);
        let admission = Admission {
            prelude: prelude.clone(),
            sources: sources.clone(),
            _global: permit,
        };
        tracker.spawn(
            handle_edge(
                tcp,
                peer,
                acceptor.clone(),
                shared.clone(),
                stop.clone(),
                admission,
            )
            .instrument(span),
        );
    }
}

/// What a connection needs before TLS: the listener's pre-TLS rules, the per-source counts,
/// and its global handshake slot (released with it).
struct Admission {
    prelude: Prelude,
    sources: Arc<SourceLimit>,
    _global: OwnedSemaphorePermit,
}

/// A slot of the source's, then the first byte and PROXY header within the handshake
/// deadline. Unless the peer is a trusted balancer, the source is known at accept and counted
/// before anything is awaited, so a flood from one address never waits on a global slot.
async fn admit(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    admission: &Admission,
) -> Result<(SocketAddr, SourceSlot), (&'static str, String)> {
    let source = |ip| {
        admission.sources.try_acquire(ip).ok_or((
            "source_limit",
            "too many handshakes in progress from this source".to_string(),
        ))
    };
    let early = match admission.prelude.trusts(peer.ip()) {
        false => Some(source(peer.ip())?),
        true => None,
    };
    let client = admission
        .prelude
        .read(tcp, peer)
        .await
        .map_err(|e| match e {
            PreludeError::Proxy(e) => ("proxy_protocol", format!("{e} (from {peer})")),
            e @ PreludeError::UntrustedProxy(_) => ("proxy_protocol", e.to_string()),
            e => ("silent", e.to_string()),
        })?;
    if client != peer {
        tracing::Span::current().record("peer", tracing::field::display(client));
    }
    let slot = match early {
        Some(slot) => slot,
        None => source(client.ip())?,
    };
    Ok((client, slot))
}

/// A session connection: TLS with its control-frame rate limit.
type SessionIo = ControlFrameLimit<tokio_rustls::server::TlsStream<TcpStream>>;

type Handshaken = (
    Arc<EdgeSession>,
    h2::client::Connection<SessionIo, Bytes>,
    PingPong,
);

/// What an authenticated connection on the edge listener turned out to be (by ALPN).
enum Accepted {
    /// A tunnel session (`tether-h2/1`).
    Session(Box<Handshaken>),
    /// A tunnel session of a revoked node: told why, then closed ([`super::refusal`]).
    Revoked(Box<super::refusal::Revoked<SessionIo>>),
    /// An edge → cloud upstream connection (`tether-up/1`).
    Upstream {
        tls: Box<tokio_rustls::server::TlsStream<TcpStream>>,
        node: NodeName,
        cert_der: Vec<u8>,
        peer: SocketAddr,
    },
}

async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: &Shared,
) -> Result<Accepted, (&'static str, String)> {
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| ("tls", format!("TLS handshake failed: {e}")))?;
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(("identity", "no client certificate".to_string()))?;
    let identity = crate::pki::edge_identity_from_der(der.as_ref())
        .map_err(|e| ("identity", format!("certificate identity refused: {e}")))?;
    let revoked_at = crate::revocation::revoked_certificate(shared, &identity.node, der.as_ref());
    let issued = crate::pki::issued_unix(der.as_ref());
    let certificate =
        crate::session_certificate::SessionCertificate::of(shared, &identity.node, der.as_ref());
    if tls.get_ref().1.alpn_protocol() == Some(tunnel_io::tls::ALPN_UPSTREAM) {
        // No request goes from server to edge on an upstream connection: refuse it plainly.
        if let Some(at) = revoked_at {
            return Err((
                "revoked",
                crate::revocation::revoked_reason(&identity.node, at),
            ));
        }
        let cert_der = der.as_ref().to_vec();
        return Ok(Accepted::Upstream {
            tls: Box::new(tls),
            node: identity.node,
            cert_der,
            peer,
        });
    }
    let limited = ControlFrameLimit::from_server(tls, shared.config.edge.control_frame_quota());
    let (send_request, mut connection) = shared
        .config
        .h2
        .client_builder()
        .handshake(limited)
        .await
        .map_err(|e| ("h2", format!("HTTP/2 handshake failed: {e}")))?;
    if let Some(at) = revoked_at {
        // Nothing of a session is built: no route, no stream slot, no upstream.
        return Ok(Accepted::Revoked(Box::new(super::refusal::Revoked {
            node: identity.node,
            at,
            send_request,
            connection,
        })));
    }
    let ping_pong = connection
        .ping_pong()
        .ok_or(("h2", "PING handle unavailable".to_string()))?;
    let session = Arc::new(EdgeSession::new(
        shared,
        identity.node,
        identity.ips,
        peer,
        send_request,
    ));
    if let Some(issued) = issued {
        session.set_certificate_issued(issued);
    }
    session.set_certificate(certificate);
    Ok(Accepted::Session(Box::new((
        session, connection, ping_pong,
    ))))
}

async fn handle_edge(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    stop: crate::server::Stop,
    admission: Admission,
) {
    let limit = shared.config.edge.handshake_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    tunnel_io::set_session_socket_options(&tcp);
    let mut tcp = tcp;
    let (peer, source_slot) = match tokio::time::timeout_at(
        deadline,
        admit(&mut tcp, peer, &admission),
    )
    .await
    {
        Ok(Ok(admitted)) => admitted,
        Ok(Err((kind, reason))) => {
            shared.metrics.handshake(kind);
            if kind == "proxy_protocol" {
                warn!(target: "audit", event = "edge_refused", %peer, reason, "edge session refused");
            } else {
                // At debug: under a flood of silent connections this is every connection.
                debug!(%peer, reason, "edge connection refused before TLS");
            }
            return;
        }
        Err(_) => {
            shared.metrics.handshake("timeout");
            debug!(%peer, "edge PROXY header timed out");
            return;
        }
    };
    // Both slots are held until the session is confirmed (or the connection turns out to be
    // an upstream connection): the confirm step is part of the handshake.
    let slots = (admission, source_slot);
    let handshaken =
        tokio::time::timeout_at(deadline, handshake(tcp, peer, acceptor, &shared)).await;
    let (session, mut connection, ping_pong) = match handshaken {
        Ok(Ok(Accepted::Session(h))) => *h,
        Ok(Ok(Accepted::Upstream {
            tls,
            node,
            cert_der,
            peer,
        })) => {
            tracing::Span::current().record("node", node.as_str());
            drop(slots);
            let quota = shared.config.edge.control_frame_quota();
            let limited = ControlFrameLimit::from_client(tls, quota);
            crate::upstream::serve(limited, node, cert_der, peer, shared, stop).await;
            return;
        }
        Ok(Ok(Accepted::Revoked(revoked))) => {
            let revoked = *revoked;
            shared.metrics.handshake("revoked");
            tracing::Span::current().record("node", revoked.node.as_str());
            let reason = crate::revocation::revoked_reason(&revoked.node, revoked.at);
            warn!(target: "audit", event = "edge_refused", %peer, reason, "edge session refused");
            // Still inside the handshake deadline, holding both handshake slots: a revoked
            // node's retries cost no more than any other handshake.
            if let Err(error) = tokio::time::timeout_at(deadline, revoked.refuse())
                .await
                .unwrap_or_else(|_| Err("the edge did not take the refusal in time".into()))
            {
                debug!(%peer, error, "revoked edge not told");
            }
            drop(slots);
            return;
        }
        Ok(Err((kind, reason))) => {
            shared.metrics.handshake(kind);
            warn!(target: "audit", event = "edge_refused", %peer, reason, "edge session refused");
            return;
        }
        Err(_) => {
            shared.metrics.handshake("timeout");
            warn!(target: "audit", event = "edge_refused", %peer, "edge handshake timed out after {limit:?}");
            return;
        }
    };
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
    let routed = Arc::new(crate::node_session::NodeSession::Tether(session.clone()));
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
    // Counted while the session lives (replaced or not), dropped with this task.
    let _expiry = session
        .certificate()
        .expires_unix
        .map(|at| shared.metrics.edge_certificates.session(at as i64));
    shared
        .metrics
        .edges_connected
        .set(shared.routes.len() as i64);
    info!(target: "audit", event = "edge_connected", node = %session.node, ips = ?tunnel_io::logging::JsonList(&session.ips), %peer, "edge session established");

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
                shared.routes.deregister(&routed);
            }
            result = &mut connection => break match result {
                Ok(()) => "session closed after its last stream".to_string(),
                Err(e) => format!("session error: {e}"),
            },
            reason = &mut keepalive => break reason,
            reason = &mut announce => break reason,
            _ = streams_done(&session) => {
                break "retired; its streams are done".to_string()
            }
        }
    };
    session.closed.cancel();
    shared.routes.deregister(&routed);
    shared
        .metrics
        .edges_connected
        .set(shared.routes.len() as i64);
    info!(target: "audit", event = "edge_disconnected", node = %session.node, %peer, reason = ended, "edge session ended");
}
