//! [`ScheduledWriter`]: the frame scheduler as an `AsyncWrite` between h2 and the TLS stream.
//!
//! h2 writes frames; the writer takes them while its queue is under the limit (so memory is
//! bounded and h2 keeps the rest in its own per-stream queues), and writes them on in the
//! scheduler's order whenever the socket takes more. A flush does not wait for the queue to
//! drain: h2 flushes after every frame it hands over and would otherwise hand over nothing
//! new (no small frame) until the bulk backlog was out, which is the wait this exists to
//! remove. h2 polls the codec, and so this writer, on every wake-up; a write that returned
//! Pending registered h2's task with the socket, so the queue keeps draining.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frames::CLIENT_PREFACE_LEN;
use super::queue::{FrameScheduler, SchedConfig};

/// Slices handed to one vectored write (tokio-rustls encrypts them into as few records as
/// their total needs).
const MAX_SLICES: usize = 64;

/// An HTTP/2 connection's transport with the frame scheduler on its write side (reads pass).
pub struct ScheduledWriter<T> {
    io: T,
    sched: FrameScheduler,
    limit: usize,
}

impl<T> ScheduledWriter<T> {
    /// For the HTTP/2 client's end (it writes the connection preface first).
    pub fn h2_client(io: T, config: SchedConfig, limit: usize) -> Self {
        Self::new(io, config, limit, CLIENT_PREFACE_LEN)
    }

    /// For the HTTP/2 server's end.
    pub fn h2_server(io: T, config: SchedConfig, limit: usize) -> Self {
        Self::new(io, config, limit, 0)
    }

    fn new(io: T, config: SchedConfig, limit: usize, preface: usize) -> Self {
        ScheduledWriter {
            io,
            sched: FrameScheduler::new(config, preface),
            limit,
        }
    }

    /// The wrapped transport.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Bytes accepted from h2 and not yet written to the transport.
    pub fn queued(&self) -> usize {
        self.sched.queued()
    }
}

impl<T: AsyncWrite + Unpin> ScheduledWriter<T> {
    /// Write what may go out until nothing may (Ready) or the transport is full (Pending,
    /// with the task registered to be woken when it takes more).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let ScheduledWriter { io, sched, .. } = self;
        loop {
            let written = {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let n = sched.slices(&mut slices);
                if n == 0 {
                    return Poll::Ready(Ok(()));
                }
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]))?
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            sched.consume(written);
        }
    }

    fn accept(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let blocked = self.poll_drain(cx)?.is_pending();
        let queued = self.sched.queued();
        let room = if queued < self.limit {
            self.limit - queued
        } else if blocked {
            return Poll::Pending;
        } else {
            // Over the limit with nothing that may go out: the queue waits for the rest of
            // a frame (a HEADERS block's CONTINUATION, a frame's payload). Take it.
            total
        };
        let mut take = room.min(total);
        let accepted = take;
        for buf in bufs {
            if take == 0 {
                break;
            }
            let n = buf.len().min(take);
            self.sched.push(&buf[..n]);
            take -= n;
        }
        Poll::Ready(Ok(accepted))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ScheduledWriter<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().accept(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().accept(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_drain(cx)? {
            // Everything that may go out is out: flush the transport (TLS records).
            Poll::Ready(()) if this.sched.is_empty() => Pin::new(&mut this.io).poll_flush(cx),
            // Waiting for the transport (task registered) or for the rest of a frame.
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ScheduledWriter<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}
