//! The edge listener: accepting an edge's connection (per-source and global handshake
//! slots, the pre-TLS prelude), the TLS and HTTP/2 handshakes, the session-info confirm, and
//! then handing the session to `run`. A child of `session`, so it can reach the
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
use tracing::{debug, warn, Instrument};
use tunnel_io::control_frames::ControlFrameLimit;

use super::EdgeSession;
use crate::listen::prelude::{Prelude, PreludeError};
use crate::listen::source_limit::{SourceLimit, SourceSlot};
use crate::shards::MovableTcp;
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
    stop: crate::lifecycle::Stop,
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
            placed: None,
        };
        let (acceptor, shared, stop) = (acceptor.clone(), shared.clone(), stop.clone());
        let Some(placed) = shared.shards.next() else {
            tracker
                .spawn(handle_edge(tcp, peer, acceptor, shared, stop, admission).instrument(span));
            continue;
        };
        let shard = placed.shard().clone();
        let admission = Admission {
            placed: Some(placed),
            ..admission
        };
        // The connection moves to its shard before its first byte is read, so its
        // handshake, session and streams all run there (`crate::shards`).
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(error) => {
                debug!(%peer, %error, "could not move an edge connection to its shard");
                continue;
            }
        };
        shard.spawn(
            tracker.track_future(
                async move {
                    match TcpStream::from_std(tcp) {
                        Ok(tcp) => handle_edge(tcp, peer, acceptor, shared, stop, admission).await,
                        Err(error) => {
                            warn!(%peer, %error, "edge connection lost moving to its shard")
                        }
                    }
                }
                .instrument(span),
            ),
        );
    }
}

/// What a connection needs before TLS: the listener's pre-TLS rules, the per-source counts,
/// and its global handshake slot (released with it).
struct Admission {
    prelude: Prelude,
    sources: Arc<SourceLimit>,
    _global: OwnedSemaphorePermit,
    /// Its place on a shard, held for the connection's life (given back by a lane).
    placed: Option<crate::shards::Placed>,
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

/// A session connection: TLS with its control-frame rate limit, or the in-memory end of a
/// QUIC session's bridge (`super::quic`).
pub(super) type SessionIo = Box<dyn tunnel_io::quic_bridge::Io>;

pub(super) type Handshaken = (
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
    /// A session's lane (`tether-lane/1`, `crate::edge::lane`).
    Lane {
        tls: crate::edge::lane::LaneTls,
        node: NodeName,
        certificate: crate::edge::session_certificate::SessionCertificate,
    },
    /// An edge → cloud upstream connection (`tether-up/1`).
    Upstream {
        tls: Box<tokio_rustls::server::TlsStream<MovableTcp>>,
        node: NodeName,
        cert_der: Vec<u8>,
        peer: SocketAddr,
    },
}

/// What an edge's client certificate says and how the registry stands on it.
pub(super) struct Identified {
    pub identity: tunnel_io::identity::EdgeIdentity,
    /// When the node was revoked, if it was.
    pub revoked_at: Option<u64>,
    /// When the certificate was issued (Unix seconds).
    pub issued: Option<u64>,
    pub certificate: crate::edge::session_certificate::SessionCertificate,
}

/// The identity checks every transport applies to the peer's certificate (`der`).
pub(super) fn identify(shared: &Shared, der: &[u8]) -> Result<Identified, (&'static str, String)> {
    let identity = crate::pki::edge_identity_from_der(der)
        .map_err(|e| ("identity", format!("certificate identity refused: {e}")))?;
    let revoked_at = crate::revocation::revoked_certificate(shared, &identity.node, der);
    let issued = crate::pki::issued_unix(der);
    let certificate =
        crate::edge::session_certificate::SessionCertificate::of(shared, &identity.node, der);
    Ok(Identified {
        identity,
        revoked_at,
        issued,
        certificate,
    })
}

async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: &Shared,
) -> Result<Accepted, (&'static str, String)> {
    // Movable: a lane moves to another shard than the one it was accepted on.
    let tls = acceptor
        .accept(MovableTcp::new(tcp))
        .await
        .map_err(|e| ("tls", format!("TLS handshake failed: {e}")))?;
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(("identity", "no client certificate".to_string()))?;
    let Identified {
        identity,
        revoked_at,
        issued,
        certificate,
    } = identify(shared, der.as_ref())?;
    if tls.get_ref().1.alpn_protocol() == Some(tunnel_io::tls::ALPN_LANE) {
        if let Some(at) = revoked_at {
            return Err((
                "revoked",
                crate::revocation::revoked_reason(&identity.node, at),
            ));
        }
        return Ok(Accepted::Lane {
            tls: Box::new(tls),
            node: identity.node,
            certificate,
        });
    }
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
    let limited: SessionIo = Box::new(ControlFrameLimit::from_server(
        tls,
        shared.config.edge.control_frame_quota(),
    ));
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
    let session = Arc::new(
        EdgeSession::new(shared, identity.node, identity.ips, peer, send_request)
            .with_lanes(shared),
    );
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
    stop: crate::lifecycle::Stop,
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
    // Held while the connection lives here; the handshake slots go once it is confirmed.
    let mut admission = admission;
    let placed = admission.placed.take();
    let slots = (admission, source_slot);
    let handshaken =
        tokio::time::timeout_at(deadline, handshake(tcp, peer, acceptor, &shared)).await;
    let (session, connection, ping_pong) = match handshaken {
        Ok(Ok(Accepted::Session(h))) => *h,
        Ok(Ok(Accepted::Lane {
            tls,
            node,
            certificate,
        })) => {
            tracing::Span::current().record("node", node.as_str());
            drop(slots);
            // A lane runs beside its session's shard: no place among the sessions.
            drop(placed);
            crate::edge::lane::serve(tls, (node, certificate), shared, stop).await;
            return;
        }
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
            crate::edge::upstream::serve(limited, node, cert_der, peer, shared, stop).await;
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
    super::run::run_session(
        session,
        connection,
        ping_pong,
        shared,
        stop,
        (deadline, limit),
        slots,
        None,
    )
    .await;
    drop(placed);
}
