//! Moves the bytes of one tunneled connection between an HTTP/2 stream and a byte stream (a
//! TCP, Unix or TLS socket), honouring h2 flow control in both directions and half-close:
//! socket EOF becomes END_STREAM, END_STREAM becomes a write shutdown. Errors never end
//! silently: the h2 stream is reset and the socket dropped, so the far end sees a failure
//! instead of a truncated transfer.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

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

/// Bytes moved and how the pipe ended.
#[derive(Debug, Clone)]
pub struct PipeReport {
    /// Bytes read from the socket and sent on the h2 stream.
    pub socket_to_stream: u64,
    /// Bytes received on the h2 stream and written to the socket.
    pub stream_to_socket: u64,
    /// The first error of either direction, or `Ok` when both ended cleanly.
    pub result: Result<(), PipeError>,
}

/// Copy both directions until both have ended. `early` holds bytes already read from the
/// socket (for example after an HTTP CONNECT head); they are sent first.
pub async fn pipe<S>(
    socket: S,
    mut send: SendStream<Bytes>,
    recv: RecvStream,
    early: Bytes,
    config: PipeConfig,
    cancel: &CancellationToken,
) -> PipeReport
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (reader, writer) = tokio::io::split(socket);
    let abort = cancel.child_token();
    let finished = CancellationToken::new();
    let activity = Activity::new();
    let mut up_bytes = 0u64;
    let mut down_bytes = 0u64;

    let up = async {
        let result = tokio::select! {
            biased;
            _ = abort.cancelled() => Err(PipeError::Aborted),
            r = socket_to_stream(reader, &mut send, early, config, &activity, &mut up_bytes) => r,
        };
        if let Err(error) = &result {
            abort.cancel();
            if !matches!(error, PipeError::Stream(_)) {
                send.send_reset(Reason::CANCEL);
            }
        }
        result
    };
    let down = async {
        let result = tokio::select! {
            biased;
            _ = abort.cancelled() => Err(PipeError::Aborted),
            r = stream_to_socket(recv, writer, config, &activity, &mut down_bytes) => r,
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
        (Ok(()), Ok(())) => Ok(()),
        _ if idled => Err(PipeError::Idle(config.idle_timeout.unwrap_or_default())),
        (Err(PipeError::Aborted), Err(e)) | (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(e),
    };
    PipeReport {
        socket_to_stream: up_bytes,
        stream_to_socket: down_bytes,
        result,
    }
}

/// When a byte last moved, in milliseconds since the pipe started (atomic so the pipe
/// future stays `Send`).
struct Activity {
    started: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.started + last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

async fn socket_to_stream<R: AsyncRead + Unpin>(
    mut reader: R,
    send: &mut SendStream<Bytes>,
    early: Bytes,
    config: PipeConfig,
    activity: &Activity,
    total: &mut u64,
) -> Result<(), PipeError> {
    if !early.is_empty() {
        *total += early.len() as u64;
        send_all(send, early, config).await?;
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
            // Half-close: the socket's EOF ends our side of the stream only.
            return send
                .send_data(Bytes::new(), true)
                .map_err(|e| PipeError::Stream(e.to_string()));
        }
        if n >= chunk && chunk < MAX_CHUNK {
            chunk *= 2;
        }
        *total += n as u64;
        activity.touch();
        send_all(send, buf.split().freeze(), config).await?;
        since_yield += n as u64;
        if since_yield >= YIELD_EVERY {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
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

async fn stream_to_socket<W: AsyncWrite + Unpin>(
    mut recv: RecvStream,
    mut writer: W,
    config: PipeConfig,
    activity: &Activity,
    total: &mut u64,
) -> Result<(), PipeError> {
    let mut since_yield = 0u64;
    loop {
        match recv.data().await {
            None => {
                // END_STREAM: the peer finished writing; pass the half-close on.
                return tokio::time::timeout(config.write_timeout, writer.shutdown())
                    .await
                    .map_err(|_| PipeError::WriteTimeout(config.write_timeout))?
                    .map_err(|e| PipeError::Socket(e.to_string()));
            }
            // After a reset `data()` keeps returning errors: end here, never loop on them.
            Some(Err(e)) => return Err(PipeError::Stream(e.to_string())),
            Some(Ok(data)) => {
                let n = data.len();
                tokio::time::timeout(config.write_timeout, async {
                    writer.write_all(&data).await?;
                    writer.flush().await
                })
                .await
                .map_err(|_| PipeError::WriteTimeout(config.write_timeout))?
                .map_err(|e| PipeError::Socket(e.to_string()))?;
                *total += n as u64;
                activity.touch();
                since_yield += n as u64;
                if since_yield >= YIELD_EVERY {
                    since_yield = 0;
                    tokio::task::yield_now().await;
                }
                // Only now may the peer send more: the window tracks bytes not yet written.
                recv.flow_control()
                    .release_capacity(n)
                    .map_err(|e| PipeError::Stream(e.to_string()))?;
            }
        }
    }
}
