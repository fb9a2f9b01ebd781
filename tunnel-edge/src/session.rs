//! The edge's sessions with tunnel-server: dial out (TCP with TLS 1.3, or QUIC, with this
//! node's certificate; [`transport`]), run HTTP/2 as the *server* over it, and hand each
//! tunneled stream to [`crate::stream`]. One worker per wanted session (see
//! [`crate::replicas`]), each reconnecting with jittered exponential backoff until cancelled
//! ([`slots`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::allow::{EdgeAllowlist, SelfDial};
use crate::config::{EdgeConfig, Transport};
use crate::metrics::EdgeMetrics;
use crate::proxy::Egress;
use crate::refusal::SessionError;
use crate::replicas::{session_info, Control, Readiness, Replicas};
pub use crate::status::EdgeStatus;

mod lanes;
mod slots;
mod transport;
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
    /// Same credentials, ALPN `tether-lane/1`: each TCP session's lane.
    /// Shared with the lane workers, so a renewed certificate reaches their next redial.
    lane_connector: Arc<std::sync::RwLock<TlsConnector>>,
    /// Streams that may move to a lane now.
    lanes: Arc<crate::lane::Registry>,
    /// Where lanes run (started with the first one).
    lane_thread: std::sync::OnceLock<crate::lane::LaneThread>,
    allow: Arc<EdgeAllowlist>,
    /// How servers are reached: directly or through the egress proxy.
    egress: Egress,
    /// Which replicas the sessions reach (the admin listener's readiness).
    replicas: Arc<Replicas>,
    metrics: Arc<EdgeMetrics>,
    /// The QUIC transport (`None` with `transport = "tcp"`).
    quic: Option<crate::quic::QuicClient>,
    /// Name verified in the server certificate over QUIC (as `server_name` over TCP).
    quic_server_name: String,
    /// When `auto` last found QUIC unavailable: later sessions go straight to TCP for
    /// `quic_retry_interval` (their background probe looks for QUIC meanwhile).
    quic_failed: std::sync::Mutex<Option<Instant>>,
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
        let quic = match s.transport {
            Transport::Tcp => None,
            _ => Some(crate::quic::QuicClient::new(&config, &tls).map_err(anyhow::Error::msg)?),
        };
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
            lane_connector: Arc::new(std::sync::RwLock::new(TlsConnector::from(Arc::new(
                with_alpn(&tls, tunnel_io::tls::ALPN_LANE),
            )))),
            lanes: Arc::default(),
            lane_thread: std::sync::OnceLock::new(),
            connector: std::sync::RwLock::new(TlsConnector::from(Arc::new(tls))),
            allow: Arc::new(allow),
            egress,
            replicas: Arc::new(Replicas::new(&metrics)),
            metrics,
            quic,
            quic_server_name: name,
            quic_failed: std::sync::Mutex::new(None),
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
        if let Some(quic) = &self.quic {
            quic.reload(&self.config, &tls)
                .map_err(anyhow::Error::msg)?;
        }
        *self
            .upstream_connector
            .write()
            .unwrap_or_else(|p| p.into_inner()) =
            TlsConnector::from(Arc::new(with_alpn(&tls, tunnel_io::tls::ALPN_UPSTREAM)));
        *self
            .lane_connector
            .write()
            .unwrap_or_else(|p| p.into_inner()) =
            TlsConnector::from(Arc::new(with_alpn(&tls, tunnel_io::tls::ALPN_LANE)));
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
    pub async fn connect_upstream(&self) -> Result<Box<dyn tunnel_io::quic_bridge::Io>, String> {
        if let Some(io) = self.quic.as_ref().and_then(|q| q.upstream_io(&self.config)) {
            return Ok(io);
        }
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
                .map(|tls| Box::new(tls) as Box<dyn tunnel_io::quic_bridge::Io>)
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
        pending: &mut Option<quinn::Connection>,
    ) -> Result<&'static str, SessionError> {
        let limit = self
            .config
            .server
            .connect_timeout
            .unwrap_or(Duration::from_secs(10));
        let quic = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok("shutting down"),
            quic = self.quic_session(host, port, limit, pending) => quic?,
        };
        let transport = if quic.is_some() { "quic" } else { "tcp" };
        let handshake = async {
            let io: Box<dyn tunnel_io::quic_bridge::Io> = match &quic {
                Some(conn) => crate::quic::session_io(conn.clone(), &self.config, limit),
                None => Box::new(self.tcp_session(host, port).await?),
            };
            self.config
                .h2
                .server_builder()
                .handshake::<_, Bytes>(io)
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
        let by_transport = self
            .metrics
            .session_transport
            .get_or_create(&crate::metrics::TransportLabels { transport })
            .clone();
        by_transport.inc();
        if let (Some(client), Some(conn)) = (&self.quic, &quic) {
            client.set_live(Some(conn.clone()));
        }
        info!(transport, "session established");
        // On TCP under `auto`: look for QUIC in the background and move over when it is there.
        let probe = self.quic_probe(host, port, quic.is_none());
        tokio::pin!(probe);
        let mut switch = None;
        let mut replica: Option<String> = None;
        // Not a child of `cancel`: SIGTERM must not end in-flight streams, only the grace
        // period (or the session's failure) does, below.
        let session_cancel = CancellationToken::new();
        // Cancelled when this session ends: its lane takes no new stream after that.
        let session_over = CancellationToken::new();
        let _over = session_over.clone().drop_guard();
        // Started once the server confirmed the session (its first session-info).
        let mut lane_wanted = quic.is_none() && self.config.server.lane();
        let mut replica_name: Option<Arc<str>> = None;
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
                            let replica = replica_name.as_ref();
                            self.spawn_stream(request, respond, streams, &session_cancel, replica);
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
                conn = &mut probe => {
                    info!("QUIC reachable again; moving the session over");
                    switch = Some(conn);
                    break Ok("moved to QUIC");
                }
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
                                Control::Continue => {
                                    if replica_name.as_deref() != replica.as_deref() {
                                        replica_name = replica.as_deref().map(Arc::from);
                                    }
                                    if lane_wanted && replica.is_some() {
                                        lane_wanted = false;
                                        self.start_lane(host, port, &session_over, &session_cancel);
                                    }
                                    continue;
                                }
                                Control::Duplicate(id) => {
                                    status.duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    debug!(replica = id, "already holding a session with this replica; closing");
                                    break Ok("duplicate session to a replica already held");
                                }
                            }
                        }
                        let replica = replica_name.as_ref();
                        self.spawn_stream(request, respond, streams, &session_cancel, replica);
                    }
                    Some(Err(e)) => break Err(format!("session error: {e}").into()),
                    None => break Ok("server closed the session"),
                },
            }
        };
        if outcome.is_err() || cancel.is_cancelled() {
            session_cancel.cancel();
        }
        if let Some(conn) = switch {
            // The server retires this session once the QUIC one replaces it (GOAWAY); keep
            // serving what is in flight here until then.
            *pending = Some(conn);
            connection.graceful_shutdown();
            let (allow, metrics) = (self.allow.clone(), self.metrics.clone());
            let (config, streams, session_cancel) =
                (self.config.clone(), streams.clone(), session_cancel.clone());
            streams.clone().spawn(async move {
                while let Some(Ok((request, respond))) = connection.accept().await {
                    let (allow, metrics, config) = (allow.clone(), metrics.clone(), config.clone());
                    let cancel = session_cancel.clone();
                    streams.spawn(async move {
                        let stream = (request, respond, None);
                        serve_stream(stream, &allow, &config, &metrics, &cancel).await;
                    });
                }
            });
        }
        by_transport.dec();
        if let (Some(client), Some(_)) = (&self.quic, &quic) {
            client.set_live(None);
        }
        if let Some(id) = &replica {
            replicas.release(id, index);
        }
        status.session_down();
        self.metrics.sessions_up.dec();
        outcome
    }
}

/// A copy of `config` offering only `alpn`.
fn with_alpn(config: &rustls::ClientConfig, alpn: &[u8]) -> rustls::ClientConfig {
    let mut config = config.clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}
