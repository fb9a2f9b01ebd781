//! The edge's sessions with tunnel-server: dial out (TCP, TLS 1.3 with this node's
//! certificate), run HTTP/2 as the *server* over it, and hand each tunneled stream to
//! [`crate::stream`]. One worker per wanted session (see [`crate::replicas`]), each
//! reconnecting with jittered exponential backoff until cancelled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::allow::{EdgeAllowlist, SelfDial};
use crate::backoff::Backoff;
use crate::config::EdgeConfig;
use crate::metrics::EdgeMetrics;
use crate::proxy::Egress;
use crate::refusal::{RefusedCertificate, SessionError};
use crate::replicas::{session_info, Control, Readiness, Replicas};
pub use crate::status::EdgeStatus;
use crate::stream::serve_stream;

/// Everything a running edge needs, built once from the validated config.
pub struct Edge {
    config: EdgeConfig,
    /// Server addresses; session worker `i` dials `targets[i % len]`.
    targets: Vec<(String, u16)>,
    server_name: ServerName<'static>,
    /// Replaced when the certificate is renewed: new sessions use the new one, live sessions
    /// keep theirs.
    connector: std::sync::RwLock<TlsConnector>,
    /// Same credentials, ALPN `tether-up/1`: the edge → cloud upstream connection.
    upstream_connector: std::sync::RwLock<TlsConnector>,
    allow: Arc<EdgeAllowlist>,
    /// How servers are reached: directly or through the egress proxy.
    egress: Egress,
    /// Which replicas the sessions reach (the admin listener's readiness).
    replicas: Arc<Replicas>,
    metrics: Arc<EdgeMetrics>,
}

impl Edge {
    /// Build from a validated config: loads the TLS material and this node's identity. The
    /// egress proxy is the config's `server.proxy` only; [`Edge::with_egress`] takes one
    /// resolved with the environment.
    pub fn new(config: EdgeConfig) -> anyhow::Result<Edge> {
        config.validate().map_err(anyhow::Error::msg)?;
        let s = &config.server;
        let egress = Egress::resolve(s.proxy.as_deref(), s.no_proxy.as_deref(), |_| None)?;
        Edge::with_egress(config, egress)
    }

    /// [`Edge::new`] reaching servers through `egress`.
    pub fn with_egress(config: EdgeConfig, egress: Egress) -> anyhow::Result<Edge> {
        use anyhow::Context;
        config.validate().map_err(anyhow::Error::msg)?;
        let targets = config.server_addresses().map_err(anyhow::Error::msg)?;
        let host = targets
            .first()
            .map(|(h, _)| h.clone())
            .context("no server address")?;
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
        let first_ip = tunnel_io::identity::first_ip_san(leaf[0].as_ref())
            .with_context(|| format!("IP addresses of {}", cert.display()))?;
        let metrics = Arc::new(EdgeMetrics::default());
        metrics.certificate_expiry_from_der(leaf[0].as_ref());
        let allow = EdgeAllowlist::new(
            identity.node,
            identity.ips,
            config.allow.ports.clone(),
            config.allow.extra.clone(),
            SelfDial::new(config.dial.self_host, first_ip),
        );
        Ok(Edge {
            targets,
            server_name,
            upstream_connector: std::sync::RwLock::new(TlsConnector::from(Arc::new(with_alpn(
                &tls,
                tunnel_io::tls::ALPN_UPSTREAM,
            )))),
            connector: std::sync::RwLock::new(TlsConnector::from(Arc::new(tls))),
            allow: Arc::new(allow),
            egress,
            replicas: Arc::new(Replicas::new(&metrics)),
            metrics,
            config,
        })
    }

    /// Re-read the certificate and key files (after a renewal wrote new ones in place): the
    /// next session handshake uses them; sessions already up are not touched.
    pub fn reload_tls(&self) -> anyhow::Result<()> {
        let s = &self.config.server;
        let (Some(ca), Some(cert), Some(key)) = (&s.ca, &s.cert, &s.key) else {
            anyhow::bail!("server.ca, server.cert and server.key are required");
        };
        let tls = tunnel_io::tls::client_config_mtls(
            ca,
            cert,
            key,
            &[tunnel_io::tls::ALPN_EDGE_SESSION],
        )?;
        *self
            .upstream_connector
            .write()
            .unwrap_or_else(|p| p.into_inner()) =
            TlsConnector::from(Arc::new(with_alpn(&tls, tunnel_io::tls::ALPN_UPSTREAM)));
        *self.connector.write().unwrap_or_else(|p| p.into_inner()) =
            TlsConnector::from(Arc::new(tls));
        if let Some(leaf) = tunnel_io::tls::load_certs(cert)?.first() {
            self.metrics.certificate_expiry_from_der(leaf.as_ref());
        }
        Ok(())
    }

    /// The edge's metrics.
    pub fn metrics(&self) -> &EdgeMetrics {
        &self.metrics
    }

    /// Whether a session is up to every replica the servers announce.
    pub fn readiness(&self) -> Readiness {
        self.replicas.readiness()
    }

    /// The validated configuration.
    pub fn config(&self) -> &EdgeConfig {
        &self.config
    }

    /// How this edge reaches servers (renewal uses it too).
    pub fn egress(&self) -> &Egress {
        &self.egress
    }

    /// Open the TLS connection that carries edge → cloud upstream streams (to the first
    /// server address, through the load balancer like the sessions).
    pub async fn connect_upstream(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let (host, port) = self.targets[0].clone();
        let limit = self
            .config
            .server
            .connect_timeout
            .unwrap_or(Duration::from_secs(10));
        let connector = self
            .upstream_connector
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let connect = async {
            let tcp = self
                .egress
                .dial(&host, port)
                .await
                .map_err(|e| e.to_string())?;
            tunnel_io::set_session_socket_options(&tcp);
            connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| crate::wrong_port::describe(&host, port, &e))
        };
        tokio::time::timeout(limit, connect)
            .await
            .map_err(|_| format!("upstream connection timed out after {limit:?}"))?
    }

    /// This edge's node name.
    pub fn node(&self) -> &protocol::NodeName {
        self.allow.node()
    }

    /// Where targets naming this node are dialed.
    pub fn self_dial(&self) -> SelfDial {
        self.allow.self_dial()
    }

    /// Keep sessions up until `cancel`: one per server address, and as many as the servers
    /// report replicas (each a distinct replica; a session that lands on a replica already
    /// held is closed and retried). Then stop taking streams and let in-flight ones finish
    /// for up to `shutdown_grace`.
    pub async fn run(self: Arc<Self>, status: Arc<EdgeStatus>, cancel: CancellationToken) {
        let streams = TaskTracker::new();
        let replicas = self.replicas.clone();
        let mut wanted_rx = replicas.wanted.subscribe();
        let mut workers: Vec<(CancellationToken, tokio::task::JoinHandle<()>)> = Vec::new();
        loop {
            let want = (*wanted_rx.borrow_and_update())
                .max(self.targets.len())
                .min(protocol::stream::MAX_SERVER_COUNT);
            while workers.len() < want {
                let index = workers.len();
                let token = cancel.child_token();
                let worker = self.clone().worker(
                    index,
                    status.clone(),
                    replicas.clone(),
                    streams.clone(),
                    token.clone(),
                );
                workers.push((token, tokio::spawn(worker)));
            }
            while workers.len() > want {
                if let Some((token, _)) = workers.pop() {
                    token.cancel();
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                changed = wanted_rx.changed() => if changed.is_err() { break },
            }
        }
        for (_, handle) in workers {
            let _ = handle.await;
        }
        streams.close();
        if tokio::time::timeout(self.config.shutdown_grace, streams.wait())
            .await
            .is_err()
        {
            warn!("streams still open after the shutdown grace period; closing them");
        }
    }

    /// One session slot: connect, serve, back off, reconnect, until cancelled.
    async fn worker(
        self: Arc<Self>,
        index: usize,
        status: Arc<EdgeStatus>,
        replicas: Arc<Replicas>,
        streams: TaskTracker,
        cancel: CancellationToken,
    ) {
        let r = &self.config.reconnect;
        let mut backoff = Backoff::new(r.min, r.max);
        let (host, port) = self.targets[index % self.targets.len()].clone();
        // Set while the server refuses this node as revoked: attempts wait the maximum.
        let mut refused: Option<RefusedCertificate> = None;
        for attempt in 0u64.. {
            if attempt > 0 {
                self.metrics.reconnects.inc();
            }
            let started = Instant::now();
            // The certificate this attempt presents, read before it starts: a re-join that
            // lands while the refusal is still under way then counts as a change.
            let presented = RefusedCertificate::of(self.config.server.cert.as_deref());
            let span =
                tracing::info_span!("session", node = %self.node(), server = %host, slot = index);
            let outcome = self
                .session(index, &host, port, &status, &replicas, &streams, &cancel)
                .instrument(span)
                .await;
            match outcome {
                Ok(reason) => info!(node = %self.node(), slot = index, reason, "session ended"),
                Err(SessionError::Failed(reason)) => {
                    warn!(node = %self.node(), slot = index, reason, "session failed")
                }
                Err(SessionError::Revoked { at, reason }) => {
                    let revoked_at = at.map(|at| tunnel_io::check::rfc3339(at as i64));
                    let message = crate::refusal::message(self.node(), at, &reason);
                    error!(node = %self.node(), slot = index, revoked_at = revoked_at.as_deref(), retry_in_ms = r.max.as_millis() as u64, "{message}");
                    refused = Some(presented);
                }
            }
            if cancel.is_cancelled() {
                break;
            }
            let delay = if refused.is_some() {
                r.max
            } else {
                backoff.session_ended(started.elapsed(), r.stable_after);
                backoff.next_delay(&mut rand::thread_rng())
            };
            debug!(
                delay_ms = delay.as_millis() as u64,
                "reconnecting after backoff"
            );
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            if refused.as_ref().is_some_and(RefusedCertificate::changed) {
                match self.reload_tls() {
                    Ok(()) => info!("certificate changed since the refusal; reconnecting with it"),
                    Err(error) => warn!(%error, "certificate changed but does not load"),
                }
                refused = None;
                backoff = Backoff::new(r.min, r.max);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn session(
        &self,
        index: usize,
        host: &str,
        port: u16,
        status: &EdgeStatus,
        replicas: &Replicas,
        streams: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Result<&'static str, SessionError> {
        let limit = self
            .config
            .server
            .connect_timeout
            .unwrap_or(Duration::from_secs(10));
        let handshake = async {
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
        status.session_up();
        self.metrics.sessions_up.inc();
        self.metrics.sessions_established.inc();
        info!("session established");
        let mut replica: Option<String> = None;
        // Not a child of `cancel`: SIGTERM must not end in-flight streams, only the grace
        // period (or the session's failure) does, below.
        let session_cancel = CancellationToken::new();
        let live = &self.config.liveness;
        let keepalive =
            tunnel_io::liveness::keepalive(ping_pong, live.ping_interval, live.ping_misses);
        tokio::pin!(keepalive);
        let outcome = loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    // GOAWAY: the server stops opening streams here. In-flight streams move
                    // bytes only while the connection is polled, so keep driving it until
                    // they have all ended (h2 then closes it) or the grace is over; only
                    // then are the streams that remain cancelled, below.
                    connection.graceful_shutdown();
                    let grace = self.config.shutdown_grace;
                    let drain = async {
                        while let Some(Ok((request, respond))) = connection.accept().await {
                            // Sent before the server saw the GOAWAY: still ours to serve.
                            self.spawn_stream(request, respond, streams, &session_cancel);
                        }
                    };
                    let finished = tokio::time::timeout(grace, drain).await.is_ok();
                    break Ok(if finished {
                        "shut down: in-flight streams finished"
                    } else {
                        "shut down: grace period over, remaining streams cancelled"
                    });
                }
                reason = &mut keepalive => break Err(reason.into()),
                accepted = connection.accept() => match accepted {
                    Some(Ok((request, respond))) => {
                        if request.method() == Method::POST
                            && request.uri().path() == protocol::stream::SESSION_REFUSED_PATH
                        {
                            let refusal = crate::refusal::answer(&request, respond);
                            connection.graceful_shutdown();
                            let flush = async { while connection.accept().await.is_some() {} };
                            let _ = tokio::time::timeout(crate::refusal::REFUSAL_FLUSH, flush).await;
                            break Err(refusal);
                        }
                        if request.method() == Method::POST
                            && request.uri().path() == protocol::stream::SESSION_INFO_PATH
                        {
                            match session_info(&request, respond, index, replicas, &mut replica) {
                                Control::Continue => continue,
                                Control::Duplicate(id) => {
                                    status.duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    debug!(replica = id, "already holding a session with this replica; closing");
                                    break Ok("duplicate session to a replica already held");
                                }
                            }
                        }
                        self.spawn_stream(request, respond, streams, &session_cancel);
                    }
                    Some(Err(e)) => break Err(format!("session error: {e}").into()),
                    None => break Ok("server closed the session"),
                },
            }
        };
        if outcome.is_err() || cancel.is_cancelled() {
            session_cancel.cancel();
        }
        if let Some(id) = &replica {
            replicas.release(id, index);
        }
        status.session_down();
        self.metrics.sessions_up.dec();
        outcome
    }
}

impl Edge {
    /// Serve one tunneled stream on its own task, tracked for the drain.
    fn spawn_stream(
        &self,
        request: http::Request<h2::RecvStream>,
        respond: h2::server::SendResponse<Bytes>,
        streams: &TaskTracker,
        cancel: &CancellationToken,
    ) {
        let (allow, metrics) = (self.allow.clone(), self.metrics.clone());
        let (config, cancel) = (self.config.clone(), cancel.clone());
        streams.spawn(async move {
            serve_stream(request, respond, &allow, &config, &metrics, &cancel).await;
        });
    }
}

/// A copy of `config` offering only `alpn`.
fn with_alpn(config: &rustls::ClientConfig, alpn: &[u8]) -> rustls::ClientConfig {
    let mut config = config.clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}
