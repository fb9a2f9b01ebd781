//! Lanes on the server: an edge's second TCP connection (ALPN `tether-lane/1`), attached to
//! the node's live TCP session on this replica and run on another shard, that the session's
//! streams move to once they show themselves to be bulk (`tunnel_io::pipe::lane`).
//!
//! Why: during a bulk transfer the small requests of the same node waited for the one
//! thread its session runs on at each end, which the bulk stream kept busy. A bulk stream on
//! a connection with threads of its own at both ends kept the small requests at 0.66 of
//! their idle rate against 0.18 on one session (docs/BENCHMARKS.md, "A second connection
//! for bulk streams"). A separate connection on the same threads gave nothing, so the lane
//! runs on another shard here and on the edge's lane thread there.
//!
//! A lane has no route of its own: it lives and dies with its session, and only the peer
//! holding the session's own certificate may open it. At most one lane per session; a second one is refused (closed), and the edge retries it later, so with several
//! replicas behind a balancer every replica gets one. The lane's first request tells the
//! edge which replica it reached; streams are named per replica
//! (`protocol::stream::STREAM_ID_HEADER`).

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use protocol::stream::{LANE_URI, SERVER_ID_HEADER, SESSION_INFO_URI, STREAM_ID_HEADER};
use protocol::NodeName;
use tracing::{debug, info, warn, Instrument};
use tunnel_io::control_frames::ControlFrameLimit;
use tunnel_io::pipe::lane::{Lane, Moved};

use crate::edge::node_session::NodeSession;
use crate::edge::session::EdgeSession;
use crate::edge::session_certificate::SessionCertificate;
use crate::lifecycle::Stop;
use crate::shards::{MovableTcp, Rehome};
use crate::Shared;

/// A lane's TLS stream, movable to the shard it runs on.
pub(crate) type LaneTls = Box<tokio_rustls::server::TlsStream<MovableTcp>>;

/// The lane of one session: where its streams' lane streams are opened, once one is up.
#[derive(Default)]
pub struct LaneSlot {
    sender: std::sync::Mutex<Option<h2::client::SendRequest<Bytes>>>,
    /// The shard the lane runs on: a moved stream's pipe continues there.
    shard: std::sync::Mutex<Option<crate::shards::Shard>>,
}

impl LaneSlot {
    fn sender(&self) -> std::sync::MutexGuard<'_, Option<h2::client::SendRequest<Bytes>>> {
        self.sender.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a lane is up.
    pub fn is_up(&self) -> bool {
        self.sender().is_some()
    }

    /// Take `sender` as the lane, running on `shard`, unless one is up already.
    fn attach(
        &self,
        sender: h2::client::SendRequest<Bytes>,
        shard: Option<crate::shards::Shard>,
    ) -> bool {
        let mut slot = self.sender();
        if slot.is_some() {
            return false;
        }
        *slot = Some(sender);
        *self.shard.lock().unwrap_or_else(|p| p.into_inner()) = shard;
        true
    }

    /// The shard the lane runs on (`None`: the server has no shards, or no lane is up).
    pub fn shard(&self) -> Option<crate::shards::Shard> {
        self.shard.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// No new lane streams (the lane ended, or its session retires): with no sender left,
    /// h2 closes the connection once its last lane stream ends.
    pub(crate) fn detach(&self) {
        self.sender().take();
    }

    /// How the stream named `id` moves here: opens its lane stream once the pipe shows it is
    /// bulk, if a lane is up by then.
    pub(crate) fn opener(self: &Arc<Self>, id: u64, naming: &Naming) -> Lane {
        let (slot, moves) = (self.clone(), naming.moves.clone());
        Lane::Open(Box::new(move || {
            Box::pin(async move {
                let moved = open(&slot, id).await;
                if moved.is_some() {
                    moves.inc();
                }
                moved
            })
        }))
    }
}

/// How a session names its streams for a lane, and counts the ones that moved.
pub(crate) struct Naming {
    ids: Arc<std::sync::atomic::AtomicU64>,
    moves: prometheus_client::metrics::counter::Counter,
}

impl Naming {
    pub(crate) fn of(shared: &Shared) -> Naming {
        Naming {
            ids: shared.next_stream_id.clone(),
            moves: shared.metrics.lane_moves.clone(),
        }
    }

    /// A number no other stream of this replica has.
    pub(crate) fn next(&self) -> u64 {
        self.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Open the lane stream of stream `id`; `None` when there is no lane or the edge declined.
async fn open(slot: &LaneSlot, id: u64) -> Option<Moved> {
    let sender = slot.sender().clone()?;
    let mut sender = sender.ready().await.ok()?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(LANE_URI)
        .header(STREAM_ID_HEADER, id)
        .body(())
        .ok()?;
    let (response, send) = sender.send_request(request, false).ok()?;
    let response = response.await.ok()?;
    if response.status() != StatusCode::OK {
        debug!(id, status = %response.status(), "edge declined a lane stream");
        return None;
    }
    Some(Moved {
        send: send.into(),
        recv: response.into_body().into(),
    })
}

/// Serve a lane connection from `node`, presenting `certificate`, until its session ends. A
/// lane for a node with no TCP session here, whose session has one already, or whose
/// certificate is not the session's, is closed at once.
pub(crate) async fn serve(
    tls: LaneTls,
    (node, certificate): (NodeName, SessionCertificate),
    shared: Arc<Shared>,
    stop: Stop,
) {
    let session = match shared.routes.get(&node).as_deref() {
        Some(NodeSession::Tether(session)) if session.transport() == "tcp" => session.clone(),
        _ => {
            debug!(%node, "lane for a node without a TCP session here; closed");
            return;
        }
    };
    // The moved streams' bytes go wherever the lane leads: only the session's own peer may
    // hold it. Another certificate of the node (an older one, or one issued elsewhere) is
    // refused, as it could never replace the session either.
    let session_serial = session.certificate().serial;
    if certificate.serial == "?" || certificate.serial != session_serial {
        warn!(target: "audit", event = "lane_refused", %node, serial = certificate.serial, session_serial, "lane refused: its certificate is not its session's");
        return;
    }
    if session.lane().is_up() || session.retired.is_cancelled() {
        debug!(%node, "lane refused: the session has one, or is retiring");
        return;
    }
    // On another shard than the session's, so the two connections never wait for each other.
    let elsewhere = session
        .shard()
        .and_then(|s| shared.shards.other_than(s))
        .filter(|s| !s.is_current());
    let Some(shard) = elsewhere else {
        return run(tls, session, &shared, &stop).await;
    };
    let moved = shard.spawn(
        async move {
            match tls.rehome() {
                Ok(tls) => run(tls, session, &shared, &stop).await,
                Err(error) => debug!(%error, "lane lost moving to its shard"),
            }
        }
        .in_current_span(),
    );
    let _ = moved.await;
}

async fn run(tls: LaneTls, session: Arc<EdgeSession>, shared: &Arc<Shared>, stop: &Stop) {
    let edge = &shared.config.edge;
    let io: Box<dyn tunnel_io::quic_bridge::Io> = Box::new(ControlFrameLimit::from_server(
        tls,
        edge.control_frame_quota(),
    ));
    let handshake = shared.config.h2.client_builder().handshake::<_, Bytes>(io);
    let (sender, mut connection) =
        match tokio::time::timeout(edge.handshake_timeout, handshake).await {
            Ok(Ok(h)) => h,
            Ok(Err(error)) => return debug!(%error, "lane HTTP/2 handshake failed"),
            Err(_) => return debug!("lane HTTP/2 handshake timed out"),
        };
    let Some(ping_pong) = connection.ping_pong() else {
        return;
    };
    // Tell the edge which replica this is: it names streams by replica and number.
    let info = tell_replica(sender.clone(), shared);
    let told = tokio::select! {
        told = info => told,
        r = &mut connection => Err(format!("lane ended before it was confirmed: {r:?}")),
    };
    if let Err(reason) = told {
        return debug!(reason, "lane not confirmed");
    }
    if !session.lane().attach(sender, shared.shards.here()) {
        return debug!("lane refused: the session has one already");
    }
    shared.metrics.lanes.inc();
    info!(node = %crate::edge::routing::Routable::node(&*session), shard = crate::shards::current().map(|i| i as u64), "lane up");
    let keepalive = tunnel_io::liveness::keepalive(ping_pong, edge.ping_interval, edge.ping_misses);
    let ended = tokio::select! {
        biased;
        _ = stop.hard.cancelled() => "server shut down".to_string(),
        _ = session.closed() => "session closed".to_string(),
        reason = keepalive => reason,
        r = &mut connection => match r {
            Ok(()) => "lane closed".to_string(),
            Err(e) => format!("lane error: {e}"),
        },
        // A retiring session takes no new lane streams; the moved ones run on.
        () = async {
            session.retired.cancelled().await;
            session.lane().detach();
            std::future::pending::<()>().await
        } => unreachable!(),
    };
    session.lane().detach();
    shared.metrics.lanes.dec();
    info!(reason = ended, "lane ended");
}

/// The lane's first request: this replica's ID, as on the session.
async fn tell_replica(
    sender: h2::client::SendRequest<Bytes>,
    shared: &Shared,
) -> Result<(), String> {
    let mut sender = sender.ready().await.map_err(|e| e.to_string())?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(SESSION_INFO_URI)
        .header(SERVER_ID_HEADER, shared.replica.id.as_str())
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, _) = sender
        .send_request(request, true)
        .map_err(|e| e.to_string())?;
    let limit = shared.config.edge.handshake_timeout;
    let response = tokio::time::timeout(limit, response)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
        .map_err(|e| e.to_string())?;
    match response.status() {
        StatusCode::OK => Ok(()),
        status => Err(format!("edge answered {status}")),
    }
}
