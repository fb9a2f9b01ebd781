//! Lanes on the edge: beside each TCP session, a second TLS + HTTP/2 connection (ALPN
//! `tether-lane/1`) run on the edge's lane thread, that the server moves streams shown to be
//! bulk to (`tunnel_io::pipe::lane` has the move itself).
//!
//! Why a thread of its own: the edge runs on one thread, and during a bulk transfer the
//! small requests of the node waited for it; a bulk stream on a connection with threads of
//! its own at both ends kept them at 0.66 of their idle rate against 0.18 (docs/BENCHMARKS.md,
//! "A second connection for bulk streams"), while a second connection on the same thread
//! gave nothing.
//!
//! The server names each stream it opens (replica ID and number); a stream registers its
//! name here while its pipe runs, and a lane stream naming it is handed to that pipe. A lane
//! may reach any replica through a load balancer: its first request says which, and it
//! serves the streams of that replica only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use protocol::stream::{
    parse_stream_id, valid_server_id, LANE_PATH, SERVER_ID_HEADER, SESSION_INFO_PATH,
    STREAM_ID_HEADER,
};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use tunnel_io::pipe::lane::{handoff, Handoff, Lane, Moved};

use crate::backoff::Backoff;
use crate::config::EdgeConfig;
use crate::metrics::EdgeMetrics;
use crate::proxy::Egress;

/// A stream's name: the replica that opened it and its number there.
type Name = (Arc<str>, u64);

/// The streams that may move to a lane now, by name.
#[derive(Default)]
pub(crate) struct Registry {
    streams: Mutex<HashMap<Name, Handoff>>,
}

/// Holds a stream's place in the [`Registry`] until dropped (its pipe ended).
pub(crate) struct Registered {
    registry: Arc<Registry>,
    name: Name,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.name);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Name, Handoff>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register the stream `request` names, opened by `replica`: its pipe's [`Lane`] and the
    /// registration. `None` when it names none, or a name already taken (it then stays).
    pub(crate) fn register(
        self: &Arc<Self>,
        replica: Option<&Arc<str>>,
        request: &Request<RecvStream>,
    ) -> Option<(Lane, Registered)> {
        let id = request
            .headers()
            .get(STREAM_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_stream_id)?;
        let name = (replica?.clone(), id);
        let mut streams = self.lock();
        if streams.contains_key(&name) {
            return None;
        }
        let (handoff, takers) = handoff();
        streams.insert(name.clone(), handoff);
        let registered = Registered {
            registry: self.clone(),
            name,
        };
        Some((Lane::Offered(takers), registered))
    }

    /// Where the lane stream `name` goes to its pipe, taken out (a name moves once).
    fn take(&self, name: &Name) -> Option<Handoff> {
        self.lock().remove(name)
    }
}

/// The edge's lane thread: a single-threaded runtime every lane connection runs on.
pub(crate) struct LaneThread {
    handle: tokio::runtime::Handle,
    stop: CancellationToken,
}

impl LaneThread {
    /// Start the thread (`tether-lane`); it stops when this is dropped.
    pub(crate) fn start() -> std::io::Result<LaneThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let stop = CancellationToken::new();
        let until = stop.clone();
        std::thread::Builder::new()
            .name("tether-lane".into())
            .spawn(move || runtime.block_on(until.cancelled()))?;
        Ok(LaneThread { handle, stop })
    }

    /// Where to spawn onto the lane thread.
    pub(crate) fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }

    /// Run `task` on the lane thread.
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.handle.spawn(task);
    }
}

impl Drop for LaneThread {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What one session's lane worker needs, cloned out of the edge.
pub(crate) struct LaneWorker {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) connector: Arc<std::sync::RwLock<TlsConnector>>,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) egress: Egress,
    pub(crate) config: EdgeConfig,
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Arc<EdgeMetrics>,
}

impl LaneWorker {
    /// Keep a lane up until `session_over` (the session ended: no new lane, the one up
    /// finishes its streams) or `streams_cancel` (the session's streams are cancelled).
    pub(crate) async fn run(
        self,
        session_over: CancellationToken,
        streams_cancel: CancellationToken,
    ) {
        let r = &self.config.reconnect;
        let mut backoff = Backoff::new(r.min, r.max);
        loop {
            let started = Instant::now();
            let ended = tokio::select! {
                biased;
                _ = session_over.cancelled() => return,
                _ = streams_cancel.cancelled() => return,
                connected = self.connect() => match connected {
                    Ok(connection) => self.serve(connection, &session_over, &streams_cancel).await,
                    Err(Refused::NoLanes) => {
                        info!("the server takes no lanes (it refused ALPN tether-lane/1): bulk streams stay on the session");
                        return;
                    }
                    Err(Refused::Failed(reason)) => reason,
                },
            };
            debug!(reason = ended, "lane ended");
            backoff.session_ended(started.elapsed(), r.stable_after);
            let delay = backoff.next_delay(&mut rand::thread_rng());
            tokio::select! {
                biased;
                _ = session_over.cancelled() => return,
                _ = streams_cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect(&self) -> Result<h2::server::Connection<LaneIo, Bytes>, Refused> {
        let limit = self
            .config
            .server
            .connect_timeout
            .unwrap_or(Duration::from_secs(10));
        let connect = async {
            let tcp = self
                .egress
                .dial(&self.host, self.port)
                .await
                .map_err(|e| Refused::Failed(e.to_string()))?;
            tunnel_io::set_session_socket_options(&tcp);
            let connector = self
                .connector
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let tls = connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| match refused_alpn(&e) {
                    true => Refused::NoLanes,
                    false => Refused::Failed(format!("lane TLS handshake: {e}")),
                })?;
            if tls.get_ref().1.alpn_protocol() != Some(tunnel_io::tls::ALPN_LANE) {
                return Err(Refused::NoLanes);
            }
            self.config
                .h2
                .server_builder()
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| Refused::Failed(format!("lane HTTP/2 handshake: {e}")))
        };
        tokio::time::timeout(limit, connect)
            .await
            .map_err(|_| Refused::Failed(format!("lane connect timed out after {limit:?}")))?
    }

    /// Serve one lane connection until it ends; returns why.
    async fn serve(
        &self,
        mut connection: h2::server::Connection<LaneIo, Bytes>,
        session_over: &CancellationToken,
        streams_cancel: &CancellationToken,
    ) -> String {
        let Some(ping_pong) = connection.ping_pong() else {
            return "PING handle unavailable".into();
        };
        let live = &self.config.liveness;
        let keepalive =
            tunnel_io::liveness::keepalive(ping_pong, live.ping_interval, live.ping_misses);
        tokio::pin!(keepalive);
        let mut replica: Option<Arc<str>> = None;
        let mut closing = false;
        let _up = Up::new(&self.metrics);
        loop {
            tokio::select! {
                biased;
                _ = streams_cancel.cancelled() => return "the session's streams were cancelled".into(),
                _ = session_over.cancelled(), if !closing => {
                    // No new lane streams; the moved ones finish here.
                    closing = true;
                    connection.graceful_shutdown();
                }
                reason = &mut keepalive => return reason,
                accepted = connection.accept() => match accepted {
                    Some(Ok((request, respond))) => self.answer(request, respond, &mut replica),
                    Some(Err(e)) => return format!("lane error: {e}"),
                    None => return "server closed the lane".into(),
                },
            }
        }
    }

    /// A request on the lane: the replica's ID first, then lane streams.
    fn answer(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        replica: &mut Option<Arc<str>>,
    ) {
        let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
        let path = request.uri().path();
        if request.method() != Method::POST {
            return status(respond, StatusCode::METHOD_NOT_ALLOWED);
        }
        if path == SESSION_INFO_PATH && replica.is_none() {
            let Some(id) = header(SERVER_ID_HEADER).filter(|id| valid_server_id(id)) else {
                return status(respond, StatusCode::BAD_REQUEST);
            };
            info!(replica = id, "lane up");
            *replica = Some(id.into());
            return status(respond, StatusCode::OK);
        }
        let (true, Some(replica)) = (path == LANE_PATH, replica.as_ref()) else {
            return status(respond, StatusCode::BAD_REQUEST);
        };
        let Some(id) = header(STREAM_ID_HEADER).and_then(parse_stream_id) else {
            return status(respond, StatusCode::BAD_REQUEST);
        };
        // Gone: its pipe ended (or never registered); the server keeps it where it is.
        let Some(waiting) = self.registry.take(&(replica.clone(), id)) else {
            return status(respond, StatusCode::NOT_FOUND);
        };
        let send = match Response::builder().status(StatusCode::OK).body(()) {
            Ok(ok) => match respond.send_response(ok, false) {
                Ok(send) => send,
                Err(_) => return,
            },
            Err(_) => return,
        };
        waiting.deliver(Moved {
            send: send.into(),
            recv: request.into_body().into(),
        });
        self.metrics.lane_moves.inc();
    }
}

/// Why a lane did not connect.
enum Refused {
    /// The server offers no lanes (an older server, or `[edge] lanes = false`): not retried
    /// for this session.
    NoLanes,
    /// Anything else: retried after the reconnect backoff.
    Failed(String),
}

/// Whether the server refused the lane's ALPN (its TLS offers no `tether-lane/1`).
fn refused_alpn(error: &std::io::Error) -> bool {
    matches!(
        error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol
        ))
    )
}

/// A lane's connection: TLS over TCP, from the edge.
type LaneIo = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

fn status(mut respond: SendResponse<Bytes>, status: StatusCode) {
    if let Ok(response) = Response::builder().status(status).body(()) {
        let _ = respond.send_response(response, true);
    }
}

/// Counts a lane in `lanes_up` while it is served.
struct Up(prometheus_client::metrics::gauge::Gauge);

impl Up {
    fn new(metrics: &EdgeMetrics) -> Up {
        metrics.lanes_up.inc();
        Up(metrics.lanes_up.clone())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.0.dec();
    }
}
