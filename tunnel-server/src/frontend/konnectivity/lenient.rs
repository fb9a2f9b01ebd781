//! The Unix-socket connection as h2 reads it: the client's bytes pass through
//! [`Rewriter`] first, writes go straight to the socket.
//! Refused connections and requests h2 is about to refuse are logged at info and counted
//! here, because h2 itself reports them only at debug level.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tracing::{debug, info};

use super::ClientName;
use crate::metrics::RefusalLabels;
use protocol::h2_authority::{BlockSeen, Rewriter};

/// Bytes read from the socket at once: 64 KiB, enough for a burst of small frames; DATA
/// payloads bypass it (read straight into h2's buffer).
const READ_CHUNK: usize = 64 << 10;

/// What the connection counts into.
#[derive(Clone)]
pub struct Counters {
    /// Refused connections and streams by reason.
    pub refusals: Family<RefusalLabels, Counter>,
    /// `:authority` values replaced.
    pub rewrites: Counter,
}

/// A Unix-socket gRPC connection with a lenient `:authority`.
pub struct LenientUnix {
    socket: UnixStream,
    rewriter: Rewriter,
    /// Read from the socket, not yet rewritten (an incomplete frame).
    raw: BytesMut,
    /// Rewritten, not yet taken by h2.
    ready: BytesMut,
    eof: bool,
    failed: bool,
    client: ClientName,
    counters: Counters,
}

impl LenientUnix {
    /// Wrap an accepted socket of `client`.
    pub fn new(socket: UnixStream, client: ClientName, counters: Counters) -> LenientUnix {
        LenientUnix {
            socket,
            rewriter: Rewriter::default(),
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            eof: false,
            failed: false,
            client,
            counters,
        }
    }

    fn refused(&self, reason: &'static str, detail: &str) {
        self.counters
            .refusals
            .get_or_create(&RefusalLabels {
                frontend: super::FRONTEND,
                reason,
            })
            .inc();
        info!(target: "audit", frontend = super::FRONTEND, client = %self.client.0, reason, detail, "konnectivity request refused");
    }

    fn block_seen(&self, seen: BlockSeen) {
        if let Some(from) = &seen.rewritten_from {
            self.counters.rewrites.inc();
            debug!(client = %self.client.0, stream = seen.stream_id, authority = from, "unix socket: :authority replaced");
        }
        if let Some(reason) = seen.malformed {
            self.refused("malformed_request", reason);
        }
    }
}

impl AsyncRead for LenientUnix {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(io::ErrorKind::InvalidData.into()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Inside a DATA (or other pass-through) frame with nothing held back: read
            // straight into h2's buffer, up to the frame's end.
            if this.raw.is_empty() {
                if let Some(remaining) = this.rewriter.passthrough_direct() {
                    let limit = remaining.min(buf.remaining());
                    // Zeroing the destination first keeps this free of `unsafe`; it costs a
                    // memset per read, small beside the system call.
                    let mut direct = ReadBuf::new(&mut buf.initialize_unfilled_to(limit)[..limit]);
                    ready!(Pin::new(&mut this.socket).poll_read(cx, &mut direct))?;
                    let n = direct.filled().len();
                    buf.advance(n);
                    this.rewriter.consumed_direct(n);
                    return Poll::Ready(Ok(()));
                }
            }
            this.raw.reserve(READ_CHUNK);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.socket),
                cx,
                &mut this.raw
            ))?;
            if n == 0 {
                this.eof = true;
            }
            let mut seen = Vec::new();
            let fed = this
                .rewriter
                .feed(&mut this.raw, &mut this.ready, &mut |s| seen.push(s));
            for s in seen {
                this.block_seen(s);
            }
            if let Err(refusal) = fed {
                this.refused(refusal.label(), &refusal.to_string());
                // What was rewritten before the bad frame still goes to h2; then the error.
                this.failed = true;
                this.raw.clear();
            }
        }
    }
}

impl AsyncWrite for LenientUnix {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_shutdown(cx)
    }
}
