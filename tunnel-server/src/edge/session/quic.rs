//! The edge listener on UDP: QUIC sessions (ALPN `tether-quic/1`) with the same client
//! certificate identity, revocation refusal, session-info confirm, routing and drain as the
//! TCP listener; only the bytes' way differs. Each connection is presented to the session
//! code as an HTTP/2 connection over an in-memory pipe ([`tunnel_io::quic_bridge`]) for
//! session control, while the streams frontends open go on QUIC streams directly
//! (`super::direct`); the streams the edge opens (edge → cloud upstreams) go to
//! `crate::edge::upstream` through the bridge.
//!
//! Numbers and why:
//! - windows: `[h2] stream_window` (16 MiB) per stream and `connection_window` (64 MiB) per
//!   connection, as the TCP session. 16 MiB per stream is the bandwidth-delay product of
//!   1 Gbit/s at 130 ms (or 100 Mbit/s at 1.3 s), so one stream can fill an IDC uplink, and
//!   it bounds what a stalled stream makes the receiver buffer.
//! - incoming streams: the edge may open `max_upstream_streams_per_node` at once (its
//!   upstream cap); the streams this side opens are bounded by `max_streams_per_edge`.
//! - liveness: keep-alive every `ping_interval`, idle timeout `ping_interval × ping_misses`,
//!   the TCP session's PING settings.
//! - address validation: a stateless Retry for every handshake from an unvalidated address
//!   once `quic_retry_above` are in progress. Retry costs one round trip per connect; under
//!   the bound a fleet reconnecting pays nothing, over it a flood of spoofed Initials makes
//!   the server keep no state. Measured (tests/tests/limits/quic_flood.rs, debug build):
//!   3000 Initials from 200 sources grew the server's RSS by 3.3 MiB with Retry engaged
//!   past 16 handshakes, and by 116 MiB with Retry off (every Initial a connection until
//!   the handshake timeout). Always-Retry would cost every edge a round trip for nothing
//!   when no flood is on, so the bound (default 64) is the trade.
//!
//! PROXY protocol does not apply to UDP: the source logged is the datagram's, which behind a
//! UDP load balancer that does not preserve it is the balancer's.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use quinn::{Endpoint, Incoming};
use rustls::pki_types::CertificateDer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};
use tunnel_io::quic_bridge::{self, QuicTuning, CODE_DONE, DUPLEX_BUFFER};
use tunnel_io::udp_socket;

use super::listener::{identify, Identified, SessionIo};
use super::run::run_session;
use super::EdgeSession;
use crate::listen::source_limit::SourceLimit;
use crate::Shared;

/// Bind the UDP endpoint edges reach over QUIC: `tls` is the edge listener's TLS
/// configuration (its ALPN is replaced by `tether-quic/1`).
pub fn bind_quic(
    config: &crate::config::ServerConfig,
    mut tls: rustls::ServerConfig,
    addr: SocketAddr,
) -> anyhow::Result<Endpoint> {
    use anyhow::Context;
    tls.alpn_protocols = vec![tunnel_io::tls::ALPN_QUIC_SESSION.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quic_bridge::server_crypto(tls).map_err(anyhow::Error::msg)?;
    let mut server = quinn::ServerConfig::with_crypto(crypto);
    server.transport_config(Arc::new(tuning(config).transport()));
    // Migration stays on (quinn's default): an edge behind a NAT that rebinds keeps its
    // session, validated by a path challenge.
    // Large UDP buffers: a long link's burst must not overflow the socket (udp_socket).
    let (endpoint, _) =
        udp_socket::quic_endpoint(addr, Some(server), udp_socket::QUIC_SOCKET_BUFFER)
            .with_context(|| format!("bind QUIC edge listener {addr}"))?;
    Ok(endpoint)
}

fn tuning(config: &crate::config::ServerConfig) -> QuicTuning {
    let edge = &config.edge;
    QuicTuning {
        stream_window: config.h2.stream_window,
        connection_window: config.h2.connection_window,
        max_incoming_streams: u32::try_from(edge.max_upstream_streams_per_node).unwrap_or(u32::MAX),
        keep_alive: edge.ping_interval,
        idle_timeout: edge.ping_interval * edge.ping_misses,
    }
}

/// Accept QUIC edge connections until draining starts; sessions already up run on.
pub async fn serve_quic_edges(
    endpoint: Endpoint,
    shared: Arc<Shared>,
    stop: crate::lifecycle::Stop,
    tracker: TaskTracker,
) {
    let edge = &shared.config.edge;
    let handshakes = Arc::new(Semaphore::new(edge.max_handshakes));
    let sources = Arc::new(SourceLimit::new(edge.max_handshakes_per_source));
    let retry_above = edge.quic_retry_above;
    loop {
        let incoming = tokio::select! {
            biased;
            _ = stop.drain.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let in_progress = edge.max_handshakes - handshakes.available_permits();
        if !incoming.remote_address_validated() && in_progress >= retry_above {
            shared.metrics.handshake("quic_retry");
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        let peer = incoming.remote_address();
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            shared.metrics.handshake("overloaded");
            incoming.refuse();
            continue;
        };
        let Some(source) = sources.try_acquire(peer.ip()) else {
            shared.metrics.handshake("source_limit");
            incoming.refuse();
            continue;
        };
        let span =
            tracing::info_span!("edge", %peer, transport = "quic", node = tracing::field::Empty);
        tracker.spawn(
            handle_quic(incoming, shared.clone(), stop.clone(), (permit, source)).instrument(span),
        );
    }
    // New connections are refused from here on; live ones keep the endpoint's driver
    // running and end with their sessions (their tasks end at the hard stop).
    endpoint.set_server_config(None);
}

async fn handle_quic(
    incoming: Incoming,
    shared: Arc<Shared>,
    stop: crate::lifecycle::Stop,
    slots: (
        OwnedSemaphorePermit,
        crate::listen::source_limit::SourceSlot,
    ),
) {
    let peer = incoming.remote_address();
    let limit = shared.config.edge.handshake_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let connecting = async {
        incoming
            .accept()
            .map_err(|e| ("tls", format!("QUIC handshake failed: {e}")))?
            .await
            .map_err(|e| ("tls", format!("QUIC handshake failed: {e}")))
    };
    let conn = match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err((kind, reason))) => {
            shared.metrics.handshake(kind);
            warn!(target: "audit", event = "edge_refused", %peer, transport = "quic", reason, "edge session refused");
            return;
        }
        Err(_) => {
            shared.metrics.handshake("timeout");
            warn!(target: "audit", event = "edge_refused", %peer, transport = "quic", "edge handshake timed out after {limit:?}");
            return;
        }
    };
    let der = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().cloned());
    let identified = match der {
        Some(der) => identify(&shared, der.as_ref()).map(|i| (i, der.as_ref().to_vec())),
        None => Err(("identity", "no client certificate".to_string())),
    };
    let (identified, cert_der) = match identified {
        Ok(pair) => pair,
        Err((kind, reason)) => {
            shared.metrics.handshake(kind);
            warn!(target: "audit", event = "edge_refused", %peer, transport = "quic", reason, "edge session refused");
            conn.close(CODE_DONE, reason.as_bytes());
            return;
        }
    };
    let Identified {
        identity,
        revoked_at,
        issued,
        certificate,
    } = identified;
    tracing::Span::current().record("node", identity.node.as_str());

    // The session code's HTTP/2 connection, bridged onto this QUIC connection.
    let (local, remote) = tokio::io::duplex(DUPLEX_BUFFER);
    let outbound = tokio::spawn(quic_bridge::serve_outbound(
        conn.clone(),
        remote,
        shared.config.h2.server_builder(),
    ));
    let local: SessionIo = Box::new(local);
    let handshaken = shared
        .config
        .h2
        .client_builder()
        .handshake::<_, Bytes>(local)
        .await;
    let (send_request, mut connection) = match handshaken {
        Ok(pair) => pair,
        Err(e) => {
            debug!(%peer, error = %e, "in-memory HTTP/2 handshake failed");
            conn.close(CODE_DONE, b"internal error");
            return;
        }
    };
    if let Some(at) = revoked_at {
        shared.metrics.handshake("revoked");
        let reason = crate::revocation::revoked_reason(&identity.node, at);
        warn!(target: "audit", event = "edge_refused", %peer, transport = "quic", reason, "edge session refused");
        let revoked = super::refusal::Revoked {
            node: identity.node,
            at,
            send_request,
            connection,
        };
        if let Err(error) = tokio::time::timeout_at(deadline, revoked.refuse())
            .await
            .unwrap_or_else(|_| Err("the edge did not take the refusal in time".into()))
        {
            debug!(%peer, error, "revoked edge not told");
        }
        conn.close(CODE_DONE, b"node revoked");
        drop(slots);
        return;
    }
    let Some(ping_pong) = connection.ping_pong() else {
        conn.close(CODE_DONE, b"internal error");
        return;
    };

    // Streams the edge opens are its upstream connection's.
    let (up_local, up_remote) = tokio::io::duplex(DUPLEX_BUFFER);
    let upstream = tokio::spawn(crate::edge::upstream::serve(
        up_local,
        identity.node.clone(),
        cert_der,
        peer,
        shared.clone(),
        stop.clone(),
    ));
    let inbound = tokio::spawn(quic_bridge::serve_inbound(
        conn.clone(),
        up_remote,
        shared.config.h2.client_builder(),
        limit,
    ));

    let session = Arc::new(EdgeSession::new(
        &shared,
        identity.node,
        identity.ips,
        peer,
        send_request,
    ));
    session.set_transport("quic");
    // Tunneled streams go on QUIC streams directly; the in-memory h2 connection above
    // carries session-info only.
    session.set_quic(conn.clone());
    if let Some(issued) = issued {
        session.set_certificate_issued(issued);
    }
    session.set_certificate(certificate);
    run_session(
        session,
        connection,
        ping_pong,
        shared,
        stop,
        (deadline, limit),
        slots,
        Some(conn.clone()),
    )
    .await;
    conn.close(CODE_DONE, b"session ended");
    outbound.abort();
    inbound.abort();
    upstream.abort();
    info!(%peer, "QUIC connection closed");
}
