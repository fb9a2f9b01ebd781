//! Handing the server's streams to their tasks, with the lane registration that lets a bulk
//! one move, and starting a session's lane on the lane thread (`crate::lane`).

use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::Edge;
use crate::stream::serve_stream;

impl Edge {
    /// Serve one tunneled stream on its own task, tracked for the drain.
    /// `replica` opened it; with a lane, the stream may move there.
    pub(super) fn spawn_stream(
        &self,
        request: http::Request<h2::RecvStream>,
        respond: h2::server::SendResponse<Bytes>,
        streams: &TaskTracker,
        cancel: &CancellationToken,
        replica: Option<&Arc<str>>,
    ) {
        let (allow, metrics) = (self.allow.clone(), self.metrics.clone());
        let (config, cancel) = (self.config.clone(), cancel.clone());
        let lane = match (self.config.server.lane(), self.lane_thread.get()) {
            (true, Some(thread)) => {
                self.lanes
                    .register(replica, &request)
                    .map(|(lane, registered)| crate::stream::LaneSide {
                        lane,
                        registered,
                        thread: thread.handle(),
                    })
            }
            _ => None,
        };
        streams.spawn(async move {
            serve_stream((request, respond, lane), &allow, &config, &metrics, &cancel).await;
        });
    }

    /// Keep a lane beside this TCP session, on the lane thread, until `session_over`.
    pub(super) fn start_lane(
        &self,
        host: &str,
        port: u16,
        session_over: &CancellationToken,
        streams_cancel: &CancellationToken,
    ) {
        let thread = match self.lane_thread.get() {
            Some(thread) => thread,
            None => match crate::lane::LaneThread::start() {
                Ok(thread) => self.lane_thread.get_or_init(|| thread),
                Err(error) => {
                    tracing::warn!(%error, "cannot start the lane thread; bulk streams stay on the session");
                    return;
                }
            },
        };
        let worker = crate::lane::LaneWorker {
            host: host.to_owned(),
            port,
            connector: self.lane_connector.clone(),
            server_name: self.server_name.clone(),
            egress: self.egress.clone(),
            config: self.config.clone(),
            registry: self.lanes.clone(),
            metrics: self.metrics.clone(),
        };
        let (over, cancel) = (session_over.clone(), streams_cancel.clone());
        thread.spawn(
            worker
                .run(over, cancel)
                .instrument(tracing::Span::current()),
        );
    }
}
