//! How a session worker reaches the server: TCP + TLS (through the egress proxy if any), or
//! QUIC as `server.transport` says, with `auto`'s fallback and its background probe for
//! QUIC while on TCP. The session loop itself is the parent's and does not care which.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::Edge;
use crate::config::Transport;

impl Edge {
    /// TCP, TLS and the ALPN check of a TCP session (through the egress proxy if any).
    pub(super) async fn tcp_session(
        &self,
        host: &str,
        port: u16,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let tcp = self
            .egress
            .dial(host, port)
            .await
            .map_err(|e| e.to_string())?;
        tunnel_io::set_session_socket_options(&tcp);
        let connector = self
            .connector
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let tls = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| crate::wrong_port::describe(host, port, &e))?;
        crate::wrong_port::check_alpn(host, port, tls.get_ref().1.alpn_protocol())?;
        Ok(tls)
    }

    /// The QUIC connection the next session runs on, or `None` for TCP: `quic` must
    /// connect (within `limit`), `auto` tries within `quic_handshake_timeout` unless QUIC
    /// failed within the last `quic_retry_interval`, and falls back at once.
    pub(super) async fn quic_session(
        &self,
        host: &str,
        port: u16,
        limit: Duration,
        pending: &mut Option<quinn::Connection>,
    ) -> Result<Option<quinn::Connection>, String> {
        let Some(client) = &self.quic else {
            return Ok(None);
        };
        if let Some(conn) = pending.take().filter(|c| c.close_reason().is_none()) {
            return Ok(Some(conn));
        }
        let server = &self.config.server;
        if server.transport == Transport::Quic {
            let conn = client
                .connect(host, port, &self.quic_server_name, limit)
                .await?;
            return Ok(Some(conn));
        }
        // An egress proxy carries TCP only; where one is in use, UDP is assumed closed.
        if self.egress.proxy_for(host).is_some() {
            return Ok(None);
        }
        let failed = *self.quic_failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_some_and(|at| at.elapsed() < server.quic_retry_interval()) {
            return Ok(None);
        }
        let bound = server.quic_handshake_timeout();
        match client
            .connect(host, port, &self.quic_server_name, bound)
            .await
        {
            Ok(conn) => Ok(Some(conn)),
            Err(reason) => {
                warn!(reason, "QUIC unavailable; using TCP");
                self.metrics.quic_fallbacks.inc();
                *self.quic_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                Ok(None)
            }
        }
    }

    /// Under `auto` on a TCP session (`on_tcp`): resolves with a QUIC connection once one
    /// completes, trying every `quic_retry_interval`; otherwise never.
    pub(super) async fn quic_probe(
        &self,
        host: &str,
        port: u16,
        on_tcp: bool,
    ) -> quinn::Connection {
        let server = &self.config.server;
        let proxied = self.egress.proxy_for(host).is_some();
        let (Some(client), Transport::Auto, true, false) =
            (&self.quic, server.transport, on_tcp, proxied)
        else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(server.quic_retry_interval()).await;
            let bound = server.quic_handshake_timeout();
            match client
                .connect(host, port, &self.quic_server_name, bound)
                .await
            {
                Ok(conn) => {
                    *self.quic_failed.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    return conn;
                }
                Err(reason) => debug!(reason, "QUIC still unavailable"),
            }
        }
    }
}
