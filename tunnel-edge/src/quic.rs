//! The edge's QUIC transport: one client endpoint, the session's TLS material with ALPN
//! `tether-quic/1`, and the bridge that presents a QUIC connection to the session code as
//! the HTTP/2 connection it serves ([`tunnel_io::quic_bridge`]). The streams the server
//! opens reach the edge's stream server; the edge's upstream streams ride the same
//! connection. What the session does with them is `session.rs`'s.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use quinn::{Connection, Endpoint};
use tunnel_io::quic_bridge::{self, Io, QuicTuning, CODE_DONE, DUPLEX_BUFFER};
use tunnel_io::udp_socket;

use crate::config::EdgeConfig;

/// Streams the server may open towards this edge at once. The server's own cap
/// (`max_streams_per_edge`, default 10 000) is what bounds them; this only keeps a broken
/// server from making the edge track more.
pub const MAX_INCOMING_STREAMS: u32 = 10_000;

/// The QUIC client side of an edge.
pub struct QuicClient {
    /// Bound on first use (inside the runtime); one UDP socket for every connection.
    endpoint: Mutex<Option<Endpoint>>,
    /// Replaced when the certificate is renewed, like the TCP connector.
    config: RwLock<quinn::ClientConfig>,
    /// The live QUIC session's connection, for upstream streams (`None`: none is up).
    live: Mutex<Option<Connection>>,
}

impl QuicClient {
    /// A client configuration from `tls`; the endpoint (an ephemeral UDP port) is bound on
    /// first use.
    pub fn new(config: &EdgeConfig, tls: &rustls::ClientConfig) -> Result<QuicClient, String> {
        Ok(QuicClient {
            endpoint: Mutex::new(None),
            config: RwLock::new(client_config(config, tls)?),
            live: Mutex::new(None),
        })
    }

    /// Use `tls` (a renewed certificate) for the next connections.
    pub fn reload(&self, config: &EdgeConfig, tls: &rustls::ClientConfig) -> Result<(), String> {
        let fresh = client_config(config, tls)?;
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// A QUIC handshake with `host:port` within `limit`.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        server_name: &str,
        limit: Duration,
    ) -> Result<Connection, String> {
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let config = self
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let endpoint = {
            let mut slot = self.endpoint.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some(endpoint) => endpoint.clone(),
                None => {
                    let bind = match addr {
                        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
                        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
                    };
                    // Large UDP buffers, as the server's: the edge receives the downloads.
                    let (endpoint, _) =
                        udp_socket::quic_endpoint(bind, None, udp_socket::QUIC_SOCKET_BUFFER)
                            .map_err(|e| e.to_string())?;
                    *slot = Some(endpoint.clone());
                    endpoint
                }
            }
        };
        let connecting = endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| format!("QUIC connect to {addr}: {e}"))?;
        match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(format!("QUIC handshake with {addr}: {e}")),
            Err(_) => Err(format!(
                "no QUIC handshake with {addr} within {limit:?} (UDP blocked?)"
            )),
        }
    }

    /// Record the live session's connection (upstream streams use it) or its end.
    pub fn set_live(&self, conn: Option<Connection>) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = conn;
    }

    /// The byte stream an upstream h2 client runs on, when a QUIC session is up: its
    /// requests become streams the edge opens on that connection.
    pub fn upstream_io(&self, config: &EdgeConfig) -> Option<Box<dyn Io>> {
        let conn = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|c| c.close_reason().is_none())?;
        let (local, remote) = tokio::io::duplex(DUPLEX_BUFFER);
        let builder = config.h2.server_builder();
        tokio::spawn(async move {
            let reason = quic_bridge::serve_outbound(conn, remote, builder).await;
            tracing::debug!(reason, "upstream streams over QUIC ended");
        });
        Some(Box::new(local))
    }
}

/// The session's byte stream over `conn`: streams the server opens become requests to the
/// h2 server the session runs on the returned end. When the h2 side ends, the connection
/// is closed.
pub fn session_io(conn: Connection, config: &EdgeConfig, head_timeout: Duration) -> Box<dyn Io> {
    let (local, remote) = tokio::io::duplex(DUPLEX_BUFFER);
    let builder = config.h2.client_builder();
    tokio::spawn(async move {
        let reason = quic_bridge::serve_inbound(conn.clone(), remote, builder, head_timeout).await;
        tracing::debug!(reason, "QUIC session bridge ended");
        conn.close(CODE_DONE, b"session ended");
    });
    Box::new(local)
}

fn client_config(
    config: &EdgeConfig,
    tls: &rustls::ClientConfig,
) -> Result<quinn::ClientConfig, String> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![tunnel_io::tls::ALPN_QUIC_SESSION.to_vec()];
    let mut client = quinn::ClientConfig::new(quic_bridge::client_crypto(tls)?);
    let live = &config.liveness;
    client.transport_config(Arc::new(
        QuicTuning {
            stream_window: config.h2.stream_window,
            connection_window: config.h2.connection_window,
            max_incoming_streams: MAX_INCOMING_STREAMS,
            keep_alive: live.ping_interval,
            idle_timeout: live.ping_interval * live.ping_misses,
        }
        .transport(),
    ));
    Ok(client)
}
