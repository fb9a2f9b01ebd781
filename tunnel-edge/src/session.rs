//! The edge's session with tunnel-server: dial out (TCP, TLS 1.3 with this node's
//! certificate), run HTTP/2 as the *server* over it, accept one stream per tunneled
//! connection, dial the target locally if the allowlist agrees, and pipe bytes. Reconnects
//! with jittered exponential backoff until cancelled.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use protocol::stream::{sanitize_reason, DialFailure, CLIENT_HEADER, REASON_HEADER};
use protocol::Target;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};
use tunnel_io::pipe::{pipe, PipeConfig};

use crate::allow::EdgeAllowlist;
use crate::backoff::Backoff;
use crate::config::EdgeConfig;

/// Everything a running edge needs, built once from the validated config.
pub struct Edge {
    config: EdgeConfig,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    allow: Arc<EdgeAllowlist>,
}

/// Observable state, for tests and the demo.
#[derive(Debug, Default)]
pub struct EdgeStatus {
    /// Sessions established since start.
    pub sessions: std::sync::atomic::AtomicU64,
    /// Whether a session is up now.
    pub connected: std::sync::atomic::AtomicBool,
}

impl Edge {
    /// Build from a validated config: loads the TLS material and this node's identity.
    pub fn new(config: EdgeConfig) -> anyhow::Result<Edge> {
        use anyhow::Context;
        config.validate().map_err(anyhow::Error::msg)?;
        let (host, port) = config.server_host_port().map_err(anyhow::Error::msg)?;
        let s = &config.server;
        let (ca, cert, key) = match (&s.ca, &s.cert, &s.key) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => anyhow::bail!("server.ca, server.cert and server.key are required"),
        };
        let tls = tunnel_io::tls::client_config_mtls(
            ca,
            cert,
            key,
            &[tunnel_io::tls::ALPN_EDGE_SESSION],
        )?;
        let name = s.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = tunnel_io::tls::server_name(&name).map_err(anyhow::Error::msg)?;
        let leaf = tunnel_io::tls::load_certs(cert)?;
        let identity = tunnel_io::identity::edge_identity_from_der(leaf[0].as_ref())
            .with_context(|| format!("identity of {}", cert.display()))?;
        let allow = EdgeAllowlist::new(
            identity.node,
            identity.ips,
            config.allow.ports.clone(),
            config.allow.extra.clone(),
            config.dial.self_host,
        );
        Ok(Edge {
            host,
            port,
            server_name,
            connector: TlsConnector::from(Arc::new(tls)),
            allow: Arc::new(allow),
            config,
        })
    }

    /// This edge's node name.
    pub fn node(&self) -> &protocol::NodeName {
        self.allow.node()
    }

    /// Keep a session up until `cancel`; then stop taking streams and let in-flight ones
    /// finish for up to `shutdown_grace`.
    pub async fn run(self: Arc<Self>, status: Arc<EdgeStatus>, cancel: CancellationToken) {
        use std::sync::atomic::Ordering;
        let r = &self.config.reconnect;
        let mut backoff = Backoff::new(r.min, r.max);
        let streams = TaskTracker::new();
        loop {
            let started = Instant::now();
            let span = tracing::info_span!("session", node = %self.node(), server = %self.host);
            let outcome = self
                .session(&status, &streams, &cancel)
                .instrument(span)
                .await;
            status.connected.store(false, Ordering::Release);
            match outcome {
                Ok(reason) => info!(node = %self.node(), reason, "session ended"),
                Err(reason) => warn!(node = %self.node(), reason, "session failed"),
            }
            if cancel.is_cancelled() {
                break;
            }
            backoff.session_ended(started.elapsed(), r.stable_after);
            let delay = backoff.next_delay(&mut rand::thread_rng());
            debug!(?delay, "reconnecting after backoff");
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        streams.close();
        if tokio::time::timeout(self.config.shutdown_grace, streams.wait())
            .await
            .is_err()
        {
            warn!("streams still open after the shutdown grace period; closing them");
        }
    }

    async fn session(
        &self,
        status: &EdgeStatus,
        streams: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<&'static str, String> {
        use std::sync::atomic::Ordering;
        let limit = self
            .config
            .server
            .connect_timeout
            .unwrap_or(Duration::from_secs(10));
        let handshake = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("connect {}:{}: {e}", self.host, self.port))?;
            tunnel_io::set_nodelay(&tcp);
            let tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            self.config
                .h2
                .server_builder()
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))
        };
        let mut connection = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok("shutting down"),
            r = tokio::time::timeout(limit, handshake) => r
                .map_err(|_| format!("handshake timed out after {limit:?}"))??,
        };
        let ping_pong = connection
            .ping_pong()
            .ok_or("HTTP/2 PING handle unavailable")?;
        status.sessions.fetch_add(1, Ordering::Relaxed);
        status.connected.store(true, Ordering::Release);
        info!("session established");

        let session_cancel = cancel.child_token();
        let live = &self.config.liveness;
        let keepalive =
            tunnel_io::liveness::keepalive(ping_pong, live.ping_interval, live.ping_misses);
        tokio::pin!(keepalive);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    // GOAWAY: the server stops opening streams here; in-flight ones finish.
                    connection.graceful_shutdown();
                    let grace = self.config.shutdown_grace;
                    let drain = async { while let Some(Ok(_)) = connection.accept().await {} };
                    let _ = tokio::time::timeout(grace, drain).await;
                    session_cancel.cancel();
                    return Ok("shutting down");
                }
                reason = &mut keepalive => {
                    session_cancel.cancel();
                    return Err(reason);
                }
                accepted = connection.accept() => match accepted {
                    Some(Ok((request, respond))) => {
                        let allow = self.allow.clone();
                        let config = self.config.clone();
                        let cancel = session_cancel.clone();
                        streams.spawn(async move {
                            serve_stream(request, respond, &allow, &config, &cancel).await;
                        });
                    }
                    Some(Err(e)) => {
                        session_cancel.cancel();
                        return Err(format!("session error: {e}"));
                    }
                    None => return Ok("server closed the session"),
                },
            }
        }
    }
}

/// Answer a stream with an error status and a one-line reason header.
fn refuse(mut respond: SendResponse<Bytes>, failure: DialFailure, reason: &str) {
    let mut builder = Response::builder().status(failure.status());
    builder = builder.header(REASON_HEADER, sanitize_reason(reason));
    if let Ok(response) = builder.body(()) {
        let _ = respond.send_response(response, true);
    }
}

async fn serve_stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    allow: &EdgeAllowlist,
    config: &EdgeConfig,
    cancel: &CancellationToken,
) {
    let started = Instant::now();
    let client = request
        .headers()
        .get(CLIENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(sanitize_reason)
        .unwrap_or_default();
    if request.method() != Method::CONNECT {
        refuse(
            respond,
            DialFailure::PolicyDenied,
            "only CONNECT streams are served",
        );
        return;
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let target = match Target::parse(&authority) {
        Ok(t) => t,
        Err(e) => {
            refuse(
                respond,
                DialFailure::PolicyDenied,
                &format!("bad target: {e}"),
            );
            return;
        }
    };
    let address = match allow.resolve(&target) {
        Ok(a) => a,
        Err(refusal) => {
            warn!(target: "audit", %client, %target, reason = %refusal, "edge refused dial");
            refuse(respond, DialFailure::PolicyDenied, &refusal.to_string());
            return;
        }
    };
    // Race the dial against the server cancelling the stream (client gone, dial timeout):
    // a socket that connects after the cancel is dropped at once, never used.
    let dialed = tokio::select! {
        biased;
        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
            debug!(%target, "dial cancelled by the server");
            return;
        }
        r = tokio::time::timeout(config.dial.timeout, TcpStream::connect(address)) => r,
    };
    let tcp = match dialed {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let failure = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => DialFailure::Refused,
                std::io::ErrorKind::TimedOut => DialFailure::Timeout,
                _ => DialFailure::Unreachable,
            };
            let reason = format!("connect {address}: {e}");
            info!(target: "audit", %client, %target, result = failure.label(), reason, "edge dial failed");
            refuse(respond, failure, &reason);
            return;
        }
        Err(_) => {
            let reason = format!(
                "connect {address}: timed out after {:?}",
                config.dial.timeout
            );
            info!(target: "audit", %client, %target, result = "timeout", reason, "edge dial failed");
            refuse(respond, DialFailure::Timeout, &reason);
            return;
        }
    };
    tunnel_io::set_nodelay(&tcp);
    let send = match Response::builder().status(StatusCode::OK).body(()) {
        Ok(ok) => match respond.send_response(ok, false) {
            Ok(send) => send,
            Err(e) => {
                debug!(%target, error = %e, "stream gone before the dial completed");
                return;
            }
        },
        Err(_) => return,
    };
    let report = pipe(
        tcp,
        send,
        request.into_body(),
        Bytes::new(),
        PipeConfig {
            write_timeout: config.dial.write_timeout,
            idle_timeout: config.dial.idle_timeout,
        },
        cancel,
    )
    .await;
    let result = match &report.result {
        Ok(()) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    info!(
        target: "audit",
        %client,
        %target,
        dialed = %address,
        result,
        bytes_to_target = report.stream_to_socket,
        bytes_from_target = report.socket_to_stream,
        duration_ms = started.elapsed().as_millis() as u64,
        "edge stream closed"
    );
}
