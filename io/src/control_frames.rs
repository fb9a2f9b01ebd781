//! A rate limit on the HTTP/2 control frames a peer sends (PING, SETTINGS), enforced below
//! h2: h2 answers PINGs and SETTINGS itself and offers no hook, so a peer flooding them costs
//! CPU on the connection's thread (measured: other nodes' CONNECT latency went from 2 ms to
//! 100–180 ms under one session's flood). [`ControlFrameLimit`] wraps the read side of a
//! session, follows the frame headers in the byte stream (it never buffers or changes
//! bytes), counts PING and SETTINGS frames in a token bucket, and fails the read once the
//! peer exceeds it: the session ends with a clear error instead of serving the flood.

use std::io;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// HTTP/2 frame header length in bytes (RFC 9113 §4.1).
const FRAME_HEADER: usize = 9;
/// The client connection preface (RFC 9113 §3.4) a server reads before the first frame.
pub const CLIENT_PREFACE_LEN: usize = 24;
/// Frame type of SETTINGS.
const SETTINGS: u8 = 0x4;
/// Frame type of PING.
const PING: u8 = 0x6;

/// How many control frames a peer may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlFrameQuota {
    /// Sustained PING + SETTINGS frames per second.
    pub per_second: u32,
    /// Frames allowed at once before the rate applies.
    pub burst: u32,
}

/// Follows HTTP/2 frame boundaries in a byte stream.
#[derive(Debug)]
struct FrameCursor {
    /// Bytes of the client preface still to skip.
    preface: usize,
    /// Header bytes collected so far.
    header: [u8; FRAME_HEADER],
    filled: usize,
    /// Payload bytes of the current frame still to skip.
    payload: usize,
}

impl FrameCursor {
    /// Feed `bytes`; call `on_frame(type)` for every frame header completed.
    fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(u8) -> bool) -> bool {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEADER - self.filled).min(bytes.len());
                self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
                self.filled += n;
                bytes = &bytes[n..];
                if self.filled == FRAME_HEADER {
                    self.filled = 0;
                    let h = &self.header;
                    self.payload =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    if !on_frame(h[3]) {
                        return false;
                    }
                }
            }
        }
        true
    }
}

/// The read side of an HTTP/2 connection with a control-frame rate limit (writes pass).
pub struct ControlFrameLimit<T> {
    io: T,
    cursor: FrameCursor,
    limiter: DefaultDirectRateLimiter,
    quota: ControlFrameQuota,
    tripped: bool,
}

impl<T> ControlFrameLimit<T> {
    /// Wrap `io`, whose peer sends frames from the first byte (it is the HTTP/2 server: the
    /// edge of a tunnel session).
    pub fn from_server(io: T, quota: ControlFrameQuota) -> Self {
        Self::new(io, quota, 0)
    }

    /// Wrap `io`, whose peer starts with the client preface (it is the HTTP/2 client: the
    /// edge of an upstream connection).
    pub fn from_client(io: T, quota: ControlFrameQuota) -> Self {
        Self::new(io, quota, CLIENT_PREFACE_LEN)
    }

    fn new(io: T, quota: ControlFrameQuota, preface: usize) -> Self {
        let per_second = NonZeroU32::new(quota.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(quota.burst).unwrap_or(NonZeroU32::MIN);
        ControlFrameLimit {
            io,
            cursor: FrameCursor {
                preface,
                header: [0; FRAME_HEADER],
                filled: 0,
                payload: 0,
            },
            limiter: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
            quota,
            tripped: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    fn flood_error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "PING/SETTINGS flood: more than {} control frames per second (burst {})",
                self.quota.per_second, self.quota.burst
            ),
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ControlFrameLimit<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.tripped {
            return Poll::Ready(Err(this.flood_error()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let limiter = &this.limiter;
        let within = this.cursor.feed(&buf.filled()[before..], |kind| {
            !matches!(kind, PING | SETTINGS) || limiter.check().is_ok()
        });
        if !within {
            // The bytes of this read are dropped with the connection: h2 never sees them.
            this.tripped = true;
            buf.set_filled(before);
            return Poll::Ready(Err(this.flood_error()));
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ControlFrameLimit<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    const QUOTA: ControlFrameQuota = ControlFrameQuota {
        per_second: 1,
        burst: 5,
    };

    #[test]
    fn the_cursor_follows_frames_split_anywhere() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(SETTINGS, &[0; 6]));
        bytes.extend(frame(0x0, &[7; 100_000]));
        bytes.extend(frame(PING, &[1; 8]));
        bytes.extend(frame(0x8, &[0, 0, 1, 0]));
        for chunk in [1, 2, 7, 9, 4096] {
            let mut cursor = FrameCursor {
                preface: CLIENT_PREFACE_LEN,
                header: [0; FRAME_HEADER],
                filled: 0,
                payload: 0,
            };
            let mut seen = Vec::new();
            for piece in bytes.chunks(chunk) {
                cursor.feed(piece, |k| {
                    seen.push(k);
                    true
                });
            }
            assert_eq!(seen, vec![SETTINGS, 0x0, PING, 0x8], "chunk {chunk}");
        }
    }

    #[tokio::test]
    async fn a_ping_flood_fails_the_read_and_ordinary_traffic_does_not() {
        let (mut peer, local) = tokio::io::duplex(1 << 20);
        let mut limited = ControlFrameLimit::from_server(local, QUOTA);
        // Data frames and the burst of control frames pass.
        let mut ok = Vec::new();
        for _ in 0..50 {
            ok.extend(frame(0x0, &[1; 100]));
        }
        for _ in 0..QUOTA.burst {
            ok.extend(frame(PING, &[0; 8]));
        }
        peer.write_all(&ok).await.unwrap();
        let mut got = vec![0u8; ok.len()];
        limited.read_exact(&mut got).await.unwrap();
        // The next PINGs exceed it.
        let mut flood = Vec::new();
        for _ in 0..10 {
            flood.extend(frame(PING, &[0; 8]));
        }
        peer.write_all(&flood).await.unwrap();
        let error = limited.read(&mut [0u8; 1024]).await.unwrap_err();
        assert!(error.to_string().contains("PING/SETTINGS flood"), "{error}");
        // And it stays failed.
        assert!(limited.read(&mut [0u8; 16]).await.is_err());
    }
}
