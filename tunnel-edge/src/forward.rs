//! Edge → cloud forwarding: loopback listeners whose connections travel through the tunnel
//! to upstreams the *server* names (the node's kubelet reaching kube-apiserver for TLS
//! bootstrap, registration, status and watches). One extra TLS connection to the server
//! (ALPN `tether-up/1`, the usual HTTP/2 roles: the edge is the client) is opened on first
//! use and shared by every forwarded connection; each is one CONNECT stream.
//!
//! Who can use a forward port: any process on the node (it listens on loopback only, so no
//! other host can). It reaches nothing but the upstreams the server names, and the upstream
//! still authenticates the caller (the apiserver checks the kubelet's credentials). Each
//! listener serves at most `max_connections` at once, so one local process cannot exhaust
//! the node's or the server's descriptors (the server has its own per-node caps as well).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use protocol::stream::{sanitize_reason, REASON_HEADER};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use tunnel_io::pipe::{pipe_metered, PipeConfig, PipeEnd};

use crate::session::Edge;

/// One `[[forward]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardRule {
    /// Local address to listen on; must be loopback (this is the node's private door).
    pub listen: SocketAddr,
    /// Upstream name, as configured in the server's `[upstreams]`.
    pub upstream: String,
    /// Connections this listener forwards at once; beyond, new ones are closed at once.
    #[serde(default = "default_forward_connections")]
    pub max_connections: usize,
}

/// Default of `forward.max_connections`: a kubelet keeps a handful of apiserver connections
/// (one HTTP/2 connection plus watches); matches the server's per-node upstream stream cap.
pub const DEFAULT_FORWARD_CONNECTIONS: usize = 256;

fn default_forward_connections() -> usize {
    DEFAULT_FORWARD_CONNECTIONS
}

/// Check the rules; the message names the key.
pub fn validate(rules: &[ForwardRule]) -> Result<(), String> {
    for (i, rule) in rules.iter().enumerate() {
        if rule.max_connections == 0 {
            return Err(format!("key `forward[{i}].max_connections` must be > 0"));
        }
        if !rule.listen.ip().is_loopback() {
            return Err(format!(
                "key `forward[{i}].listen`: {} is not a loopback address",
                rule.listen
            ));
        }
        let ok = !rule.upstream.is_empty()
            && rule.upstream.len() <= 63
            && rule
                .upstream
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(format!(
                "key `forward[{i}].upstream`: {:?} must be 1-63 characters of [a-z0-9-]",
                rule.upstream
            ));
        }
    }
    Ok(())
}

/// The shared upstream connection, opened on demand and reopened after it fails.
pub struct Forwarder {
    edge: Arc<Edge>,
    sender: Mutex<Option<SendRequest<Bytes>>>,
}

impl Forwarder {
    /// A forwarder for `edge` (no connection yet).
    pub fn new(edge: Arc<Edge>) -> Arc<Forwarder> {
        Arc::new(Forwarder {
            edge,
            sender: Mutex::new(None),
        })
    }

    /// Bind every rule's listener (failing fast on a taken port) and serve until `cancel`.
    pub async fn start(
        self: &Arc<Self>,
        rules: &[ForwardRule],
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> anyhow::Result<Vec<SocketAddr>> {
        let mut bound = Vec::new();
        for rule in rules {
            let listener = TcpListener::bind(rule.listen).await.map_err(|e| {
                anyhow::anyhow!("forward listener {} ({}): {e}", rule.listen, rule.upstream)
            })?;
            let addr = listener.local_addr()?;
            info!(listen = %addr, upstream = rule.upstream, "forwarding to upstream");
            bound.push(addr);
            tracker.spawn(self.clone().serve(
                listener,
                rule.upstream.clone(),
                rule.max_connections,
                tracker.clone(),
                cancel.clone(),
            ));
        }
        Ok(bound)
    }

    async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        upstream: String,
        max_connections: usize,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
        let mut retry = tunnel_io::accept::AcceptRetry::new("forward");
        while let Some((socket, client)) = retry.next(&cancel, || listener.accept()).await {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                warn!(%client, upstream, max_connections, "forward listener full; connection closed");
                continue;
            };
            let this = self.clone();
            let upstream = upstream.clone();
            let cancel = cancel.clone();
            tracker.spawn(async move {
                this.forward(socket, client, &upstream, &cancel).await;
                drop(slot);
            });
        }
    }

    /// The live upstream connection, opening one if there is none.
    async fn sender(&self) -> Result<SendRequest<Bytes>, String> {
        let mut slot = self.sender.lock().await;
        if let Some(sender) = slot.as_ref() {
            if let Ok(ready) = sender.clone().ready().await {
                return Ok(ready);
            }
        }
        *slot = None;
        let io = self.edge.connect_upstream().await?;
        let (sender, connection) = self
            .edge
            .config()
            .h2
            .client_builder()
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "upstream connection closed");
            }
        });
        *slot = Some(sender.clone());
        sender.ready().await.map_err(|e| e.to_string())
    }

    async fn forward(
        &self,
        socket: TcpStream,
        client: SocketAddr,
        upstream: &str,
        cancel: &CancellationToken,
    ) {
        let started = Instant::now();
        tunnel_io::set_nodelay(&socket);
        let config = self.edge.config();
        let opened = async {
            let mut sender = self.sender().await?;
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(upstream)
                .body(())
                .map_err(|e| e.to_string())?;
            let (response, send) = sender
                .send_request(request, false)
                .map_err(|e| format!("upstream connection: {e}"))?;
            let response = response.await.map_err(|e| e.to_string())?;
            if response.status() != StatusCode::OK {
                let reason = response
                    .headers()
                    .get(REASON_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(sanitize_reason)
                    .unwrap_or_default();
                return Err(format!("server answered {}: {reason}", response.status()));
            }
            Ok((send, response.into_body()))
        };
        let (send, recv) = match tokio::time::timeout(config.dial.timeout * 2, opened).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(reason)) => {
                self.edge.metrics().upstream_stream("refused");
                warn!(target: "audit", %client, upstream, reason, "forward refused");
                return;
            }
            Err(_) => {
                self.edge.metrics().upstream_stream("timeout");
                warn!(target: "audit", %client, upstream, "forward timed out");
                return;
            }
        };
        self.edge.metrics().upstream_stream("ok");
        let report = pipe_metered(
            socket,
            send,
            recv,
            Bytes::new(),
            PipeConfig {
                write_timeout: config.dial.write_timeout,
                idle_timeout: config.dial.idle_timeout,
            },
            &self.edge.metrics().upstream,
            cancel,
        )
        .await;
        let result = match &report.result {
            Ok(PipeEnd::Complete) => "ok".to_string(),
            Ok(PipeEnd::SocketLeft) => "ok: client closed".to_string(),
            Err(e) => e.to_string(),
        };
        info!(
            target: "audit",
            %client,
            upstream,
            result,
            bytes_to_upstream = report.socket_to_stream,
            bytes_from_upstream = report.stream_to_socket,
            duration_ms = started.elapsed().as_millis() as u64,
            "forwarded stream closed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_listeners_and_plain_names() {
        let ok = ForwardRule {
            listen: "127.0.0.1:6443".parse().unwrap(),
            upstream: "kube-apiserver".into(),
            max_connections: DEFAULT_FORWARD_CONNECTIONS,
        };
        assert!(validate(std::slice::from_ref(&ok)).is_ok());
        let none = ForwardRule {
            max_connections: 0,
            ..ok.clone()
        };
        assert!(validate(&[none]).unwrap_err().contains("max_connections"));
        let open = ForwardRule {
            listen: "0.0.0.0:6443".parse().unwrap(),
            ..ok.clone()
        };
        assert!(validate(&[open]).unwrap_err().contains("loopback"));
        let bad = ForwardRule {
            upstream: "Kube API".into(),
            ..ok
        };
        assert!(validate(&[bad])
            .unwrap_err()
            .contains("forward[0].upstream"));
    }
}
