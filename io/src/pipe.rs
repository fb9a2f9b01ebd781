//! Moves the bytes of one tunneled connection between a tunnel stream (HTTP/2, or QUIC where
//! the server opens streams directly on a QUIC session: [`StreamSend`], [`StreamRecv`]) and a
//! byte stream (a TCP, Unix or TLS socket), honouring flow control in both directions and
//! half-close: socket EOF becomes END_STREAM (FIN), END_STREAM a write shutdown. Errors never end
//! silently: the h2 stream is reset and the socket dropped, so the far end sees a failure
//! instead of a truncated transfer. The one exception is the socket's peer leaving after it
//! finished sending (a client closing a follow stream): that is how such streams end
//! normally, so it is reported as an end ([`PipeEnd::SocketLeft`]), not an error. Bytes
//! are counted as they move ([`ByteMeter`]), so metrics show a long transfer while it runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::future::Future;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

mod activity;
mod directions;
mod halves;
pub mod lane;
mod resume;
use activity::Activity;
pub use directions::send_all;
use directions::{SocketToStream, StreamToSocket};
pub use halves::{QuicSend, StreamRecv, StreamSend};
use lane::{BulkWatch, Lane};
pub use resume::Resume;
use resume::{Parts, Step};

/// First read buffer of a direction. Small, because most tunneled connections are idle or
/// carry small requests (an idle pipe keeps it reserved); it doubles on every read that
/// fills it, so a bulk stream reaches `MAX_CHUNK` within eight reads. 2 KiB instead of
/// 16 KiB saved ~2.4 KiB of RSS per idle connection on each side (docs/BENCHMARKS.md).
pub const INITIAL_CHUNK: usize = 2 << 10;
/// Largest read buffer: h2 sends large chunks far more cheaply than 8 KiB ones.
pub const MAX_CHUNK: usize = 256 << 10;
/// Bytes a direction moves before it yields to the runtime. On a single-threaded runtime a
/// bulk stream whose socket is always ready would otherwise run for milliseconds per poll
/// while small exchanges of other streams wait behind it. 64 KiB halved the small-request
/// p99 during a bulk transfer against 256 KiB, bulk throughput unchanged (docs/BENCHMARKS.md).
pub const YIELD_EVERY: u64 = 64 << 10;

/// Timeouts of one pipe.
#[derive(Debug, Clone, Copy)]
pub struct PipeConfig {
    /// How long a write (to the socket, or waiting for h2 send window) may make no progress
    /// before the stream is reset: a stalled reader must not hold its window forever.
    pub write_timeout: Duration,
    /// A stream with no byte moving in either direction for this long is closed (`None`:
    /// never). Session PINGs do not count as traffic.
    pub idle_timeout: Option<Duration>,
}

/// How a pipe ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipeError {
    /// The socket side failed or reset.
    #[error("socket error: {0}")]
    Socket(String),
    /// The HTTP/2 stream was reset by the peer or the session died.
    #[error("tunnel stream error: {0}")]
    Stream(String),
    /// No progress writing for longer than the write timeout.
    #[error("write stalled longer than {0:?}")]
    WriteTimeout(Duration),
    /// No byte moved in either direction for longer than the idle timeout.
    #[error("idle for longer than {0:?}")]
    Idle(Duration),
    /// The other direction failed, or the owner cancelled the pipe.
    #[error("aborted")]
    Aborted,
}

/// How a pipe ended without failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeEnd {
    /// Both directions reached their end of stream.
    Complete,
    /// The socket's peer had finished sending (EOF), then closed its socket before taking
    /// everything the stream carried: a write failed with EPIPE or ECONNRESET. This is how a
    /// client ends a follow stream (`kubectl logs -f`), so it is no failure; the h2 stream is
    /// reset so the far end stops sending.
    SocketLeft,
}

/// Bytes moved and how the pipe ended.
#[derive(Debug, Clone)]
pub struct PipeReport {
    /// Bytes read from the socket and sent on the h2 stream.
    pub socket_to_stream: u64,
    /// Bytes received on the h2 stream and written to the socket.
    pub stream_to_socket: u64,
    /// How both directions ended, or the first error of either.
    pub result: Result<PipeEnd, PipeError>,
    /// Whether the stream moved to its session's lane ([`lane`]).
    pub moved: bool,
}

/// Where a pipe adds the bytes it moves while it moves them (a metrics counter), so a long
/// transfer shows before it ends. Called once per chunk (at most [`MAX_CHUNK`] bytes) from
/// the pipe's task: an implementation should do no more than an atomic add.
pub trait ByteMeter: Sync {
    /// `n` more bytes read from the socket were sent on the h2 stream.
    fn socket_to_stream(&self, n: u64);
    /// `n` more bytes received on the h2 stream were written to the socket.
    fn stream_to_socket(&self, n: u64);
}

/// No metering.
impl ByteMeter for () {
    fn socket_to_stream(&self, _: u64) {}
    fn stream_to_socket(&self, _: u64) {}
}

/// Copy both directions until both have ended. `early` holds bytes already read from the
/// socket (for example after an HTTP CONNECT head); they are sent first.
pub async fn pipe<S>(
    socket: S,
    send: impl Into<StreamSend>,
    recv: impl Into<StreamRecv>,
    early: Bytes,
    config: PipeConfig,
    cancel: &CancellationToken,
) -> PipeReport
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    pipe_metered(socket, send, recv, early, config, &(), cancel).await
}

/// [`pipe`], adding every chunk to `meter` as soon as it has moved.
pub fn pipe_metered<'a, S>(
    socket: S,
    send: impl Into<StreamSend>,
    recv: impl Into<StreamRecv>,
    early: Bytes,
    config: PipeConfig,
    meter: &'a dyn ByteMeter,
    cancel: &'a CancellationToken,
) -> impl Future<Output = PipeReport> + Send + 'a
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'a,
{
    let stream = Stream {
        send: send.into(),
        recv: recv.into(),
        lane: None,
        handover: false,
    };
    // Mapped, not awaited in an `async fn`: a wrapping future would keep its own copy of
    // the arguments for the pipe's whole life (an idle tunnel's memory).
    pipe_stream(socket, stream, early, config, meter, cancel).map(|piped| match piped {
        Piped::Ended(report, _) => report,
        Piped::Moving(_) => unreachable!("a pipe without a lane never moves"),
    })
}

/// The tunnel side of a pipe: the stream's two halves, and how it may move to a lane.
pub struct Stream {
    /// Socket → tunnel.
    pub send: StreamSend,
    /// Tunnel → socket.
    pub recv: StreamRecv,
    /// `None`: the stream stays on its session.
    pub lane: Option<Lane>,
    /// Once moved, return [`Piped::Moving`] instead of piping on, so the caller can move the
    /// rest of the pipe to the lane's thread.
    pub handover: bool,
}

/// How [`pipe_stream`] returned.
pub enum Piped<S> {
    /// The pipe ended; the socket is given back (to set its linger, for one).
    Ended(PipeReport, S),
    /// The stream moved to its lane and the pipe stopped at a boundary: continue it where
    /// the lane runs with [`pipe_resume`].
    Moving(Resume<S>),
}

/// [`pipe_metered`] on a stream that may move to its session's lane while it runs.
pub fn pipe_stream<'a, S>(
    socket: S,
    stream: Stream,
    early: Bytes,
    config: PipeConfig,
    meter: &'a dyn ByteMeter,
    cancel: &'a CancellationToken,
) -> impl Future<Output = Piped<S>> + Send + 'a
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'a,
{
    let Stream {
        send,
        recv,
        lane,
        handover,
    } = stream;
    let parts = Resume::start(socket, send, recv).into_parts();
    run(parts, early, lane, handover, config, meter, cancel)
}

/// Continue a pipe that stopped to move ([`Piped::Moving`]), on the lane's thread. The
/// report counts the bytes of both parts; the socket is given back.
pub fn pipe_resume<'a, S>(
    resume: Resume<S>,
    config: PipeConfig,
    meter: &'a dyn ByteMeter,
    cancel: &'a CancellationToken,
) -> impl Future<Output = (PipeReport, S)> + Send + 'a
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'a,
{
    let parts = resume.into_parts();
    run(parts, Bytes::new(), None, false, config, meter, cancel).map(|piped| match piped {
        Piped::Ended(report, socket) => (report, socket),
        Piped::Moving(_) => unreachable!("a resumed pipe never hands over"),
    })
}

async fn run<S>(
    mut parts: Parts<S>,
    early: Bytes,
    lane: Option<Lane>,
    handover: bool,
    config: PipeConfig,
    meter: &dyn ByteMeter,
    cancel: &CancellationToken,
) -> Piped<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let Parts {
        reader,
        writer,
        send,
        recv,
        up_done,
        down_end,
        socket_eof,
        up_bytes: up_total,
        down_bytes: down_total,
        moved: was_moved,
    } = &mut parts;
    let (up_done, down_end) = (*up_done, *down_end);
    let abort = cancel.child_token();
    let finished = CancellationToken::new();
    let activity = Activity::new();
    let socket_eof = AtomicBool::new(*socket_eof);
    let moved = AtomicBool::new(*was_moved);
    let (bulk, takers) = match lane {
        Some(Lane::Open(open)) => {
            let (handoff, takers) = lane::handoff();
            (Some(Box::new(BulkWatch::new(open, handoff))), Some(takers))
        }
        Some(Lane::Offered(takers)) => (None, Some(takers)),
        None => (None, None),
    };
    let (lane_send, lane_recv) = match takers {
        Some(t) => (Some(t.send), Some(t.recv)),
        None => (None, None),
    };

    let ((up_result, down_result), idled) = {
        let up = async {
            if up_done {
                return Ok(Step::Done(()));
            }
            let up = SocketToStream {
                config,
                activity: &activity,
                meter,
                eof: &socket_eof,
                bulk: bulk.as_deref(),
                handover,
                moved: &moved,
            };
            let result = tokio::select! {
                biased;
                _ = abort.cancelled() => Err(PipeError::Aborted),
                r = up.run(&mut *reader, &mut *send, early, lane_send, &mut *up_total) => r,
            };
            if let Err(error) = &result {
                abort.cancel();
                if !matches!(error, PipeError::Stream(_)) {
                    send.reset();
                }
            }
            result
        };
        let down = async {
            if let Some(end) = down_end {
                return Ok(Step::Done(end));
            }
            let down = StreamToSocket {
                config,
                activity: &activity,
                meter,
                socket_eof: &socket_eof,
                bulk: bulk.as_deref(),
                handover,
                moved: &moved,
            };
            let result = tokio::select! {
                biased;
                _ = abort.cancelled() => Err(PipeError::Aborted),
                r = down.run(&mut *recv, &mut *writer, lane_recv, &mut *down_total) => r,
            };
            if result.is_err() {
                abort.cancel();
            }
            result
        };
        // Pinned here and joined by reference: an async block that took them by value would
        // keep a copy of both beside the ones `join!` holds (~1.6 KiB per pipe, idle or not).
        tokio::pin!(up, down);
        let both = async {
            let results = tokio::join!(&mut up, &mut down);
            finished.cancel();
            results
        };
        let watchdog = async {
            let Some(limit) = config.idle_timeout.filter(|d| !d.is_zero()) else {
                return false;
            };
            tokio::select! {
                _ = finished.cancelled() => false,
                _ = activity.idle_for(limit) => {
                    abort.cancel();
                    true
                }
            }
        };
        tokio::join!(both, watchdog)
    };
    let moved = moved.load(Ordering::Relaxed);
    let switched = matches!(
        (&up_result, &down_result),
        (Ok(Step::Switched), Ok(_)) | (Ok(_), Ok(Step::Switched))
    );
    if let (true, Ok(up), Ok(down)) = (switched, &up_result, &down_result) {
        // Both directions stopped at a boundary, at least one of them on the lane.
        let (up_done, down_end) = (
            matches!(up, Step::Done(())),
            match down {
                Step::Done(end) => Some(*end),
                Step::Switched => None,
            },
        );
        let socket_eof = socket_eof.load(Ordering::Acquire);
        return Piped::Moving(Resume {
            socket: parts.reader.unsplit(parts.writer),
            send: parts.send,
            recv: parts.recv,
            up_done,
            down_end,
            socket_eof,
            up_bytes: parts.up_bytes,
            down_bytes: parts.down_bytes,
            moved,
        });
    }
    let up_result = up_result.map(|_| ());
    // A direction that stopped on the lane while the other failed: the failure is the result.
    let down_result = down_result.map(|step| match step {
        Step::Done(end) => end,
        Step::Switched => PipeEnd::Complete,
    });
    // Report the cause, not the `Aborted` it provoked in the other direction.
    let result = match (up_result, down_result) {
        (Ok(()), Ok(end)) => Ok(end),
        _ if idled => Err(PipeError::Idle(config.idle_timeout.unwrap_or_default())),
        (Err(PipeError::Aborted), Err(e)) | (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e),
    };
    if result == Ok(PipeEnd::SocketLeft) {
        // Nobody reads what the far end still sends: tell it to stop.
        parts.send.reset();
    }
    let report = PipeReport {
        socket_to_stream: parts.up_bytes,
        stream_to_socket: parts.down_bytes,
        result,
        moved,
    };
    Piped::Ended(report, parts.reader.unsplit(parts.writer))
}
