//! The two directions of a pipe: socket → tunnel stream and tunnel stream → socket, each
//! with its flow control, half-close, yield and lane switch (see `super::lane`).

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use h2::SendStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::activity::Activity;
use super::lane::BulkWatch;
use super::resume::Step;
use super::{
    ByteMeter, PipeConfig, PipeEnd, PipeError, StreamRecv, StreamSend, INITIAL_CHUNK, MAX_CHUNK,
    YIELD_EVERY,
};

/// The socket → h2 stream direction.
pub(super) struct SocketToStream<'a> {
    pub(super) config: PipeConfig,
    pub(super) activity: &'a Activity,
    pub(super) meter: &'a dyn ByteMeter,
    /// Set once the socket's EOF was read: its peer has finished sending.
    pub(super) eof: &'a AtomicBool,
    /// Counts toward moving the stream to its lane (the end that decides).
    pub(super) bulk: Option<&'a BulkWatch>,
    /// Stop once on the lane ([`Step::Switched`]).
    pub(super) handover: bool,
    /// Set once either direction goes on on the lane.
    pub(super) moved: &'a AtomicBool,
}

impl SocketToStream<'_> {
    pub(super) async fn run<R: AsyncRead + Unpin>(
        &self,
        mut reader: R,
        send: &mut StreamSend,
        early: Bytes,
        mut lane: Option<tokio::sync::oneshot::Receiver<StreamSend>>,
        total: &mut u64,
    ) -> Result<Step<()>, PipeError> {
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
            let read = match lane.as_mut() {
                // `read_buf` is cancel safe: when the lane wins, nothing was read.
                Some(arrived) => tokio::select! {
                    biased;
                    moved = arrived => {
                        lane = None;
                        if let Ok(moved) = moved {
                            // The last byte on the old stream is sent: the rest goes on.
                            send.finish_moved()?;
                            *send = moved;
                            self.moved.store(true, Ordering::Relaxed);
                            if self.handover {
                                return Ok(Step::Switched);
                            }
                        }
                        continue;
                    }
                    read = reader.read_buf(&mut buf) => read,
                },
                None => reader.read_buf(&mut buf).await,
            };
            let n = read.map_err(|e| PipeError::Socket(e.to_string()))?;
            if n == 0 {
                self.eof.store(true, Ordering::Release);
                // Half-close: the socket's EOF ends our side of the stream only.
                return send.finish().map(Step::Done);
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
        if let Some(bulk) = self.bulk {
            bulk.add(n);
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

/// The h2 stream → socket direction.
pub(super) struct StreamToSocket<'a> {
    pub(super) config: PipeConfig,
    pub(super) activity: &'a Activity,
    pub(super) meter: &'a dyn ByteMeter,
    /// Set by the other direction once the socket's peer has finished sending.
    pub(super) socket_eof: &'a AtomicBool,
    /// Counts toward moving the stream to its lane (the end that decides).
    pub(super) bulk: Option<&'a BulkWatch>,
    /// Stop once on the lane ([`Step::Switched`]).
    pub(super) handover: bool,
    /// Set once either direction goes on on the lane.
    pub(super) moved: &'a AtomicBool,
}

impl StreamToSocket<'_> {
    pub(super) async fn run<W: AsyncWrite + Unpin>(
        &self,
        recv: &mut StreamRecv,
        mut writer: W,
        mut lane: Option<tokio::sync::oneshot::Receiver<StreamRecv>>,
        total: &mut u64,
    ) -> Result<Step<PipeEnd>, PipeError> {
        let config = self.config;
        let mut since_yield = 0u64;
        loop {
            match recv.data().await {
                None if lane.is_some() && recv.moved().await? => {
                    // The rest comes on the lane stream; its answer may still be on its way
                    // over the other connection.
                    let arrived = lane.take().unwrap_or_else(|| unreachable!());
                    *recv = tokio::time::timeout(config.write_timeout, arrived)
                        .await
                        .map_err(|_| {
                            PipeError::Stream("moved, but the lane stream did not arrive".into())
                        })?
                        .map_err(|_| PipeError::Stream("moved, but the lane was lost".into()))?;
                    self.moved.store(true, Ordering::Relaxed);
                    if self.handover {
                        return Ok(Step::Switched);
                    }
                }
                None => {
                    // END_STREAM: the peer finished writing; pass the half-close on.
                    let shutdown = tokio::time::timeout(config.write_timeout, writer.shutdown())
                        .await
                        .map_err(|_| PipeError::WriteTimeout(config.write_timeout))?;
                    return match shutdown {
                        Ok(()) => Ok(Step::Done(PipeEnd::Complete)),
                        Err(e) => self.socket_error(e).map(Step::Done),
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
                        return self.socket_error(e).map(Step::Done);
                    }
                    *total += n as u64;
                    self.meter.stream_to_socket(n as u64);
                    if let Some(bulk) = self.bulk {
                        bulk.add(n as u64);
                    }
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
