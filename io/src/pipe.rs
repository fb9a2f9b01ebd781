//! Moves the bytes of one tunneled connection between a tunnel stream (HTTP/2, or QUIC where
//! the server opens streams directly on a QUIC session: [`StreamSend`], [`StreamRecv`]) and a
//! byte stream (a TCP, Unix or TLS socket), honouring flow control in both directions and
//! half-close: socket EOF becomes END_STREAM (FIN), END_STREAM a write shutdown. Errors never end
//! silently: the h2 stream is reset and the socket dropped, so the far end sees a failure
//! instead of a truncated transfer. The one exception is the socket's peer leaving after it
//! finished sending (a client closing a follow stream): that is how such streams end
//! normally, so it is reported as an end ([`PipeEnd::SocketLeft`]), not an error. Bytes
//! are counted as they move ([`ByteMeter`]), so metrics show a long transfer while it runs.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::SendStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

mod activity;
mod halves;
use activity::Activity;
pub use halves::{QuicSend, StreamRecv, StreamSend};

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
    S: AsyncRead + AsyncWrite + Send,
{
    pipe_metered(socket, send, recv, early, config, &(), cancel).await
}

/// [`pipe`], adding every chunk to `meter` as soon as it has moved.
pub async fn pipe_metered<S>(
    socket: S,
    send: impl Into<StreamSend>,
    recv: impl Into<StreamRecv>,
    early: Bytes,
    config: PipeConfig,
    meter: &dyn ByteMeter,
    cancel: &CancellationToken,
) -> PipeReport
where
    S: AsyncRead + AsyncWrite + Send,
{
    let mut send = send.into();
    let recv = recv.into();
    let (reader, writer) = tokio::io::split(socket);
    let abort = cancel.child_token();
    let finished = CancellationToken::new();
    let activity = Activity::new();
    let socket_eof = AtomicBool::new(false);
    let mut up_bytes = 0u64;
    let mut down_bytes = 0u64;

    let up = async {
        let up = SocketToStream {
            config,
            activity: &activity,
            meter,
            eof: &socket_eof,
        };
        let result = tokio::select! {
            biased;
            _ = abort.cancelled() => Err(PipeError::Aborted),
            r = up.run(reader, &mut send, early, &mut up_bytes) => r,
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
        let down = StreamToSocket {
            config,
            activity: &activity,
            meter,
            socket_eof: &socket_eof,
        };
        let result = tokio::select! {
            biased;
            _ = abort.cancelled() => Err(PipeError::Aborted),
            r = down.run(recv, writer, &mut down_bytes) => r,
        };
        if result.is_err() {
            abort.cancel();
        }
        result
    };
    let both = async {
        let results = tokio::join!(up, down);
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
    let ((up_result, down_result), idled) = tokio::join!(both, watchdog);
    // Report the cause, not the `Aborted` it provoked in the other direction.
    let result = match (up_result, down_result) {
        (Ok(()), Ok(end)) => Ok(end),
        _ if idled => Err(PipeError::Idle(config.idle_timeout.unwrap_or_default())),
        (Err(PipeError::Aborted), Err(e)) | (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e),
    };
    if result == Ok(PipeEnd::SocketLeft) {
        // Nobody reads what the far end still sends: tell it to stop.
        send.reset();
    }
    PipeReport {
        socket_to_stream: up_bytes,
        stream_to_socket: down_bytes,
        result,
    }
}

/// The socket → h2 stream direction.
struct SocketToStream<'a> {
    config: PipeConfig,
    activity: &'a Activity,
    meter: &'a dyn ByteMeter,
    /// Set once the socket's EOF was read: its peer has finished sending.
    eof: &'a AtomicBool,
}

impl SocketToStream<'_> {
    async fn run<R: AsyncRead + Unpin>(
        &self,
        mut reader: R,
        send: &mut StreamSend,
        early: Bytes,
        total: &mut u64,
    ) -> Result<(), PipeError> {
        if !early.is_empty() {
            let n = early.len() as u64;
            send.send_all(early, self.config).await?;
            self.moved(n, total);
        }
        let mut chunk = INITIAL_CHUNK;
        let mut buf = BytesMut::new();
        let mut since_yield = 0u64;
        loop {
            buf.reserve(chunk);
            let n = reader
                .read_buf(&mut buf)
                .await
                .map_err(|e| PipeError::Socket(e.to_string()))?;
            if n == 0 {
                self.eof.store(true, Ordering::Release);
                // Half-close: the socket's EOF ends our side of the stream only.
                return send.finish();
            }
            if n >= chunk && chunk < MAX_CHUNK {
                chunk *= 2;
            }
            self.activity.touch();
            send.send_all(buf.split().freeze(), self.config).await?;
            self.moved(n as u64, total);
            since_yield += n as u64;
            if since_yield >= YIELD_EVERY {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
    }

    fn moved(&self, n: u64, total: &mut u64) {
        *total += n;
        self.meter.socket_to_stream(n);
    }
}

/// Send `data` without exceeding the window h2 grants: `send_data` itself would queue
/// without bound. Waiting for window longer than `config.write_timeout` fails. Public for
/// frontends that feed a stream from something other than a socket (Konnectivity DATA).
pub async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    config: PipeConfig,
) -> Result<(), PipeError> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted =
            tokio::time::timeout(config.write_timeout, poll_fn(|cx| send.poll_capacity(cx)))
                .await
                .map_err(|_| PipeError::WriteTimeout(config.write_timeout))?;
        let granted = match granted {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(PipeError::Stream(e.to_string())),
            None => return Err(PipeError::Stream("stream closed".into())),
        };
        let part = data.split_to(granted.min(data.len()));
        send.send_data(part, false)
            .map_err(|e| PipeError::Stream(e.to_string()))?;
    }
    Ok(())
}

/// The h2 stream → socket direction.
struct StreamToSocket<'a> {
    config: PipeConfig,
    activity: &'a Activity,
    meter: &'a dyn ByteMeter,
    /// Set by the other direction once the socket's peer has finished sending.
    socket_eof: &'a AtomicBool,
}

impl StreamToSocket<'_> {
    async fn run<W: AsyncWrite + Unpin>(
        &self,
        mut recv: StreamRecv,
        mut writer: W,
        total: &mut u64,
    ) -> Result<PipeEnd, PipeError> {
        let config = self.config;
        let mut since_yield = 0u64;
        loop {
            match recv.data().await {
                None => {
                    // END_STREAM: the peer finished writing; pass the half-close on.
                    let shutdown = tokio::time::timeout(config.write_timeout, writer.shutdown())
                        .await
                        .map_err(|_| PipeError::WriteTimeout(config.write_timeout))?;
                    return match shutdown {
                        Ok(()) => Ok(PipeEnd::Complete),
                        Err(e) => self.socket_error(e),
                    };
                }
                // After a reset `data()` keeps returning errors: end here, never loop on them.
                Some(Err(e)) => return Err(e),
                Some(Ok(data)) => {
                    let n = data.len();
                    let written = tokio::time::timeout(config.write_timeout, async {
                        writer.write_all(&data).await?;
                        writer.flush().await
                    })
                    .await
                    .map_err(|_| PipeError::WriteTimeout(config.write_timeout))?;
                    if let Err(e) = written {
                        return self.socket_error(e);
                    }
                    *total += n as u64;
                    self.meter.stream_to_socket(n as u64);
                    self.activity.touch();
                    since_yield += n as u64;
                    if since_yield >= YIELD_EVERY {
                        since_yield = 0;
                        tokio::task::yield_now().await;
                    }
                    // Only now may the peer send more: the window tracks bytes not yet written.
                    recv.release(n)?;
                }
            }
        }
    }

    /// A write to the socket failed. After the socket's EOF, EPIPE and ECONNRESET (and
    /// ENOTCONN from a shutdown) mean its peer closed the whole socket: it left, as a client
    /// ending a follow stream does. Before EOF the same errors are a failure: the peer
    /// dropped a connection it was still using.
    fn socket_error(&self, error: std::io::Error) -> Result<PipeEnd, PipeError> {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset, NotConnected};
        let left = matches!(error.kind(), BrokenPipe | ConnectionReset | NotConnected);
        if left && self.socket_eof.load(Ordering::Acquire) {
            Ok(PipeEnd::SocketLeft)
        } else {
            Err(PipeError::Socket(error.to_string()))
        }
    }
}
