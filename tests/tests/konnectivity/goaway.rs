//! Seeing HTTP/2 GOAWAY as a gRPC client does. h2's client API does not report a GOAWAY, but
//! grpc-go (and so a stock `proxy-agent`) acts on one: its channel leaves READY and the agent
//! drops its connections. [`GoawayWatch`] sits between TLS and h2 on the client side and
//! scans the frames the server sends (their 9-byte headers only) for a GOAWAY.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// HTTP/2 frame type of GOAWAY (RFC 9113, 6.8).
const GOAWAY: u8 = 0x7;
/// Length of an HTTP/2 frame header.
const FRAME_HEADER: usize = 9;

/// A client-side transport that cancels a token when the server sends GOAWAY.
pub struct GoawayWatch<S> {
    inner: S,
    seen: CancellationToken,
    header: [u8; FRAME_HEADER],
    header_len: usize,
    payload_left: usize,
}

impl<S> GoawayWatch<S> {
    /// Watch `inner`, a transport on which the server's first byte starts a frame (the server
    /// sends no connection preface string).
    pub fn new(inner: S) -> Self {
        GoawayWatch {
            inner,
            seen: CancellationToken::new(),
            header: [0; FRAME_HEADER],
            header_len: 0,
            payload_left: 0,
        }
    }

    /// Cancelled once a GOAWAY frame arrived.
    pub fn seen(&self) -> CancellationToken {
        self.seen.clone()
    }

    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len());
                self.payload_left -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            let take = (FRAME_HEADER - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len == FRAME_HEADER {
                self.header_len = 0;
                let [a, b, c, kind, ..] = self.header;
                self.payload_left = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                if kind == GOAWAY {
                    self.seen.cancel();
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GoawayWatch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let fresh = buf.filled()[before..].to_vec();
            self.scan(&fresh);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GoawayWatch<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[test]
fn goaway_is_found_across_reads_and_behind_other_frames() {
    // SETTINGS (6 bytes of payload), then GOAWAY (8 bytes), split at awkward places.
    let mut wire = vec![0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
    wire.extend_from_slice(&[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
    let watch = &mut GoawayWatch::new(());
    watch.scan(&wire[..4]);
    watch.scan(&wire[4..17]);
    assert!(!watch.seen.is_cancelled(), "no GOAWAY yet");
    watch.scan(&wire[17..]);
    assert!(watch.seen.is_cancelled());
}
