//! Edge sessions on the server: an authenticated edge's HTTP/2 connection, with the server
//! as the *client*, and opening one stream per tunneled connection on it. Accepting and
//! running sessions is in [`listener`]. Owns nothing of the frontends.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use protocol::stream::{
    sanitize_reason, DialFailure, CLIENT_HEADER, REASON_HEADER, STREAM_ID_HEADER,
};
use protocol::{NodeName, Target};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tunnel_io::pipe::{StreamRecv, StreamSend};

use crate::edge::routing::Routable;
use crate::metrics::TunneledBytes;
use crate::Shared;

mod direct;
mod listener;
mod quic;
mod refusal;
mod run;
pub use listener::serve_edges;
pub use quic::{bind_quic, serve_quic_edges};

/// One live edge session, as the route table and the frontends see it.
pub struct EdgeSession {
    id: u64,
    node: NodeName,
    ips: Vec<IpAddr>,
    peer: SocketAddr,
    /// Taken away when the session retires (drain, replacement): with no sender left, h2
    /// sends GOAWAY and closes the connection once the last stream ends.
    send_request: std::sync::Mutex<Option<h2::client::SendRequest<Bytes>>>,
    slots: Arc<Semaphore>,
    pending: Semaphore,
    max_pending: usize,
    max_streams: usize,
    /// Cancelled when the session is gone: pending dials fail at once.
    closed: CancellationToken,
    /// Cancelled when a newer session of the same node took over: no new streams here.
    pub(crate) retired: CancellationToken,
    /// When the peer's certificate was issued (Unix seconds), for per-stream revocation checks.
    certificate_issued: std::sync::OnceLock<u64>,
    /// Serial and standing of the peer's certificate in the identity registry.
    certificate: std::sync::OnceLock<crate::edge::session_certificate::SessionCertificate>,
    /// When the session was created, Unix seconds (the admin API's `since`).
    since_unix: u64,
    /// What its streams count bytes into.
    meter: StreamMeter,
    /// `tcp` or `quic` (set once, at the handshake; `tcp` when never set).
    transport: std::sync::OnceLock<&'static str>,
    /// A QUIC session's connection: tunneled streams are opened on it directly
    /// ([`direct`]); the h2 sender then carries only session control (session-info).
    quic: std::sync::OnceLock<quinn::Connection>,
    /// The shard the session runs on (`crate::shards`), where its streams' pipes belong.
    shard: Option<crate::shards::Shard>,
    /// Its lane, where streams shown to be bulk move (`crate::edge::lane`).
    lane: Arc<crate::edge::lane::LaneSlot>,
    /// Names its streams for a lane (`None`: `[edge] lanes` is off, streams stay).
    naming: Option<crate::edge::lane::Naming>,
}

/// Bytes moved on one session's streams, for the admin API's per-edge view: one relaxed
/// atomic add per chunk beside the global counter's, read only when an operator asks.
#[derive(Debug, Default)]
pub struct SessionBytes {
    to_edge: AtomicU64,
    from_edge: AtomicU64,
}

impl SessionBytes {
    /// Frontend client → node bytes so far.
    pub fn to_edge(&self) -> u64 {
        self.to_edge.load(Ordering::Relaxed)
    }

    /// Node → frontend client bytes so far.
    pub fn from_edge(&self) -> u64 {
        self.from_edge.load(Ordering::Relaxed)
    }
}

/// What a stream's pipe counts into: `tether_tunneled_bytes_total` and its session's own
/// [`SessionBytes`].
#[derive(Clone, Debug)]
pub struct StreamMeter {
    global: TunneledBytes,
    session: Arc<SessionBytes>,
}

impl StreamMeter {
    /// `n` more bytes went from a frontend client to the node.
    pub fn add_to_edge(&self, n: u64) {
        self.global.add_to_edge(n);
        self.session.to_edge.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` more bytes went from the node to a frontend client.
    pub fn add_from_edge(&self, n: u64) {
        self.global.add_from_edge(n);
        self.session.from_edge.fetch_add(n, Ordering::Relaxed);
    }
}

/// The frontend's socket is the client's: what it reads goes to the edge.
impl tunnel_io::pipe::ByteMeter for StreamMeter {
    fn socket_to_stream(&self, n: u64) {
        self.add_to_edge(n);
    }
    fn stream_to_socket(&self, n: u64) {
        self.add_from_edge(n);
    }
}

/// A stream the edge accepted: its target is dialed and bytes may flow.
pub struct OpenStream {
    /// apiserver → kubelet direction (an h2 stream, or a QUIC stream on a QUIC session).
    pub send: StreamSend,
    /// kubelet → apiserver direction.
    pub recv: StreamRecv,
    /// Holds one of the session's stream slots until dropped.
    pub slot: OwnedSemaphorePermit,
    /// Counts the stream's bytes (globally and for its session).
    pub meter: StreamMeter,
    /// How the stream may move to its session's lane (`None`: it stays).
    pub lane: Option<tunnel_io::pipe::lane::Lane>,
}

/// A dial that did not produce a stream.
#[derive(Debug, Clone)]
pub struct OpenError {
    /// Classification, mapped to an HTTP status by the frontend.
    pub failure: DialFailure,
    /// One line for the client and the audit log.
    pub reason: String,
    /// The session was replaced while we looked: the caller may look up the route again.
    pub retry: bool,
}

impl OpenError {
    fn new(failure: DialFailure, reason: impl Into<String>) -> OpenError {
        OpenError {
            failure,
            reason: reason.into(),
            retry: false,
        }
    }
}

impl Routable for EdgeSession {
    fn session_id(&self) -> u64 {
        self.id
    }
    fn node(&self) -> &NodeName {
        &self.node
    }
    fn ips(&self) -> &[IpAddr] {
        &self.ips
    }
    fn certificate_serial(&self) -> &str {
        self.certificate.get().map_or("?", |c| c.serial.as_str())
    }
    fn certificate_current(&self) -> bool {
        !matches!(self.certificate.get(), Some(c) if !c.current)
    }
}

impl EdgeSession {
    /// A session over an HTTP/2 client connection whose peer the caller has already
    /// authenticated as `node` with `ips` (the edge listener here; the in-memory connection
    /// of a Konnectivity agent in `crate::agent`). Limits come from `[edge]`.
    pub(crate) fn new(
        shared: &Shared,
        node: NodeName,
        ips: Vec<IpAddr>,
        peer: SocketAddr,
        send_request: h2::client::SendRequest<Bytes>,
    ) -> EdgeSession {
        let max_streams = shared.config.edge.max_streams_per_edge;
        EdgeSession {
            id: shared.next_session_id.fetch_add(1, Ordering::Relaxed),
            node,
            ips,
            peer,
            send_request: std::sync::Mutex::new(Some(send_request)),
            slots: Arc::new(Semaphore::new(max_streams)),
            pending: Semaphore::new(shared.config.edge.max_pending_dials),
            max_pending: shared.config.edge.max_pending_dials,
            max_streams,
            closed: CancellationToken::new(),
            retired: CancellationToken::new(),
            certificate_issued: std::sync::OnceLock::new(),
            certificate: std::sync::OnceLock::new(),
            since_unix: crate::registration::state::files::unix_now(),
            meter: StreamMeter {
                global: shared.metrics.tunneled.clone(),
                session: Arc::default(),
            },
            transport: std::sync::OnceLock::new(),
            quic: std::sync::OnceLock::new(),
            shard: shared.shards.here(),
            lane: Arc::default(),
            naming: None,
        }
    }

    /// Name this session's streams so they can move to a lane (TCP sessions with `[edge]
    /// lanes` on; set before the session is routed).
    pub(crate) fn with_lanes(mut self, shared: &Shared) -> EdgeSession {
        if shared.config.edge.lanes {
            self.naming = Some(crate::edge::lane::Naming::of(shared));
        }
        self
    }

    /// Its lane slot.
    pub fn lane(&self) -> &Arc<crate::edge::lane::LaneSlot> {
        &self.lane
    }

    /// The shard this session runs on, if any: a stream's pipe is cheapest there.
    pub fn shard(&self) -> Option<&crate::shards::Shard> {
        self.shard.as_ref()
    }

    /// Open this QUIC session's tunneled streams on `conn` directly (set once, at the
    /// handshake, before the session is routed).
    pub(crate) fn set_quic(&self, conn: quinn::Connection) {
        let _ = self.quic.set(conn);
    }

    /// Record how the edge reached this replica (set once, at the handshake).
    pub(crate) fn set_transport(&self, transport: &'static str) {
        let _ = self.transport.set(transport);
    }

    /// `tcp` (TLS + HTTP/2) or `quic`.
    pub fn transport(&self) -> &'static str {
        self.transport.get().copied().unwrap_or("tcp")
    }

    /// When the session was created, Unix seconds.
    pub fn since_unix(&self) -> u64 {
        self.since_unix
    }

    /// Bytes its streams moved so far.
    pub fn bytes(&self) -> &SessionBytes {
        &self.meter.session
    }

    /// Record the peer certificate's serial and standing (set once, at the handshake).
    pub(crate) fn set_certificate(
        &self,
        certificate: crate::edge::session_certificate::SessionCertificate,
    ) {
        let _ = self.certificate.set(certificate);
    }

    /// The peer certificate's serial and standing (the default when never set).
    pub fn certificate(&self) -> crate::edge::session_certificate::SessionCertificate {
        self.certificate.get().cloned().unwrap_or_default()
    }

    /// Resolves once the session is closed ([`EdgeSession::close`]).
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Resolves once the session is retired and its last stream has ended.
    pub(crate) async fn retired_and_idle(&self) {
        streams_done(self).await
    }

    /// The edge's address as the server saw it.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Streams open on this session now.
    pub fn open_streams(&self) -> usize {
        self.max_streams - self.slots.available_permits()
    }

    /// Record when the peer's certificate was issued (set once, at the handshake).
    pub(crate) fn set_certificate_issued(&self, unix: u64) {
        let _ = self.certificate_issued.set(unix);
    }

    /// When the peer's certificate was issued, if known.
    pub fn certificate_issued(&self) -> Option<u64> {
        self.certificate_issued.get().copied()
    }

    /// Close the session now (revocation, shutdown): its streams fail.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Take no new streams; the connection closes (GOAWAY) once the open ones end.
    pub fn retire(&self) {
        self.retired.cancel();
        self.sender_slot().take();
        self.lane.detach();
    }

    pub(crate) fn sender_slot(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<h2::client::SendRequest<Bytes>>> {
        self.send_request.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ask the edge to dial `target` and wait for its answer up to `dial_timeout`. Dropping
    /// the returned future (client went away) resets the stream, which cancels the edge's dial.
    pub async fn open(
        &self,
        target: &Target,
        client: &str,
        dial_timeout: Duration,
    ) -> Result<OpenStream, OpenError> {
        if self.retired.is_cancelled() {
            return Err(OpenError {
                retry: true,
                ..OpenError::new(DialFailure::Unreachable, "session replaced")
            });
        }
        let _pending = self.pending.try_acquire().map_err(|_| {
            OpenError::new(
                DialFailure::Overloaded,
                format!("{} dials already pending", self.max_pending),
            )
        })?;
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            OpenError::new(
                DialFailure::Overloaded,
                format!("{} streams already open", self.max_streams),
            )
        })?;
        let dial = async {
            let sender = self.sender_slot().clone().ok_or_else(|| OpenError {
                retry: true,
                ..OpenError::new(DialFailure::Unreachable, "session retiring")
            })?;
            if let Some(conn) = self.quic.get() {
                let (send, recv) = direct::open(conn, target, client).await?;
                return Ok((send, recv, None));
            }
            let mut sender = sender.ready().await.map_err(|e| {
                OpenError::new(DialFailure::Unreachable, format!("session lost: {e}"))
            })?;
            let mut request = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .header(CLIENT_HEADER, sanitize_reason(client));
            // Named only while a lane is up: a stream that cannot move carries nothing for it.
            let lane = self
                .naming
                .as_ref()
                .filter(|_| self.lane.is_up())
                .map(|naming| {
                    let id = naming.next();
                    request = std::mem::take(&mut request).header(STREAM_ID_HEADER, id);
                    self.lane.opener(id, naming)
                });
            let request = request
                .body(())
                .map_err(|e| OpenError::new(DialFailure::Internal, e.to_string()))?;
            let (response, send) = sender.send_request(request, false).map_err(|e| {
                OpenError::new(DialFailure::Unreachable, format!("session lost: {e}"))
            })?;
            let response = response.await.map_err(|e| {
                OpenError::new(DialFailure::Unreachable, format!("stream failed: {e}"))
            })?;
            let status = response.status();
            if status == StatusCode::OK {
                return Ok((send.into(), response.into_body().into(), lane));
            }
            let reason = response
                .headers()
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(sanitize_reason);
            Err(refused_by_edge(status.as_u16(), reason))
        };
        tokio::select! {
            biased;
            _ = self.closed.cancelled() => {
                Err(OpenError::new(DialFailure::Unreachable, "edge session closed during dial"))
            }
            result = tokio::time::timeout(dial_timeout, dial) => match result {
                Ok(Ok((send, recv, lane))) => Ok(OpenStream {
                    send,
                    recv,
                    slot,
                    meter: self.meter.clone(),
                    lane,
                }),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(OpenError::new(
                    DialFailure::Timeout,
                    format!("edge did not answer within {dial_timeout:?}"),
                )),
            },
        }
    }
}

/// The edge answered a stream open with `status` (not 200) and maybe a reason.
fn refused_by_edge(status: u16, reason: Option<String>) -> OpenError {
    let reason = reason.unwrap_or_else(|| match StatusCode::from_u16(status) {
        Ok(status) => format!("edge answered {status}"),
        Err(_) => format!("edge answered {status}"),
    });
    let failure = match DialFailure::from_status(status) {
        Some(DialFailure::PolicyDenied) => DialFailure::EdgeDenied,
        Some(f) => f,
        None => DialFailure::Refused,
    };
    OpenError::new(failure, format!("refused by edge: {reason}"))
}

/// Resolves once a retired session has no stream left, so its connection can be dropped.
async fn streams_done(session: &EdgeSession) {
    session.retired.cancelled().await;
    while session.open_streams() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
