//! The two halves of one tunneled connection's stream as the pipe and the frontends use
//! them: an HTTP/2 stream (TCP sessions, Konnectivity agents, the edge's side of any
//! session) or a QUIC stream the server opened directly on a QUIC session, without the
//! in-memory HTTP/2 hop of [`crate::quic_bridge`]. Both mean the same: bytes in order, end of
//! stream as half-close, a reset as failure; each keeps its own flow control. Owns no policy.

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};

use super::{send_all, PipeConfig, PipeError, MAX_CHUNK};
use crate::quic_bridge::CODE_CANCELLED;

/// The sending half: tunnel client → target.
pub enum StreamSend {
    /// An HTTP/2 stream's send half.
    H2(SendStream<Bytes>),
    /// A QUIC stream's send half.
    Quic(QuicSend),
}

/// A QUIC send half that resets its stream when dropped before it was finished. quinn's own
/// `SendStream` *finishes* on drop (a clean FIN), which would turn any error path that drops
/// the stream into a silent truncation; an h2 stream dropped unfinished is reset, and this
/// keeps that meaning.
pub struct QuicSend {
    inner: quinn::SendStream,
    ended: bool,
}

impl QuicSend {
    /// Take over `inner`; it is reset when dropped unless [`StreamSend::finish`] ran.
    pub fn new(inner: quinn::SendStream) -> QuicSend {
        QuicSend {
            inner,
            ended: false,
        }
    }

    /// Write all of `data` (a stream head), waiting for window as long as it takes: the
    /// caller bounds the wait.
    pub async fn write_all(&mut self, data: Bytes) -> Result<(), String> {
        self.inner
            .write_chunk(data)
            .await
            .map_err(|e| e.to_string())
    }
}

impl Drop for QuicSend {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.inner.reset(CODE_CANCELLED);
        }
    }
}

impl From<SendStream<Bytes>> for StreamSend {
    fn from(send: SendStream<Bytes>) -> StreamSend {
        StreamSend::H2(send)
    }
}

impl From<quinn::SendStream> for StreamSend {
    fn from(send: quinn::SendStream) -> StreamSend {
        StreamSend::Quic(QuicSend::new(send))
    }
}

impl StreamSend {
    /// Send all of `data`, never more than the peer's window allows; no progress for longer
    /// than `config.write_timeout` fails. QUIC takes the `Bytes` without copying them.
    pub async fn send_all(&mut self, data: Bytes, config: PipeConfig) -> Result<(), PipeError> {
        match self {
            StreamSend::H2(send) => send_all(send, data, config).await,
            StreamSend::Quic(send) => {
                let mut chunks = [data];
                while !chunks[0].is_empty() {
                    let written = tokio::time::timeout(
                        config.write_timeout,
                        send.inner.write_chunks(&mut chunks),
                    )
                    .await
                    .map_err(|_| PipeError::WriteTimeout(config.write_timeout))?
                    .map_err(|e| PipeError::Stream(e.to_string()))?;
                    if written.chunks == 1 {
                        break;
                    }
                }
                Ok(())
            }
        }
    }

    /// End this direction in order (END_STREAM, QUIC FIN): the target sees EOF.
    pub fn finish(&mut self) -> Result<(), PipeError> {
        match self {
            StreamSend::H2(send) => send
                .send_data(Bytes::new(), true)
                .map_err(|e| PipeError::Stream(e.to_string())),
            StreamSend::Quic(send) => {
                send.ended = true;
                send.inner
                    .finish()
                    .map_err(|e| PipeError::Stream(e.to_string()))
            }
        }
    }

    /// End this direction on this stream with the MOVED trailer: its rest follows on the
    /// lane stream (`super::lane`). Only HTTP/2 streams move.
    pub fn finish_moved(&mut self) -> Result<(), PipeError> {
        match self {
            StreamSend::H2(send) => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert(
                    protocol::stream::MOVED_TRAILER,
                    http::HeaderValue::from_static("1"),
                );
                send.send_trailers(trailers)
                    .map_err(|e| PipeError::Stream(e.to_string()))
            }
            StreamSend::Quic(_) => Err(PipeError::Stream("a QUIC stream has no lane".into())),
        }
    }

    /// Fail the stream (RST_STREAM CANCEL, QUIC RESET_STREAM): the far end sees an error,
    /// never a clean end.
    pub fn reset(&mut self) {
        match self {
            StreamSend::H2(send) => send.send_reset(Reason::CANCEL),
            StreamSend::Quic(send) => {
                send.ended = true;
                let _ = send.inner.reset(CODE_CANCELLED);
            }
        }
    }
}

/// The receiving half: target → tunnel client.
pub enum StreamRecv {
    /// An HTTP/2 stream's receive half.
    H2(RecvStream),
    /// A QUIC stream's receive half; `early` holds bytes read with its response head.
    Quic {
        /// The stream.
        recv: quinn::RecvStream,
        /// Bytes that arrived behind the stream head, delivered first.
        early: Option<Bytes>,
    },
}

impl From<RecvStream> for StreamRecv {
    fn from(recv: RecvStream) -> StreamRecv {
        StreamRecv::H2(recv)
    }
}

impl StreamRecv {
    /// A QUIC receive half whose first bytes, `early`, were read already.
    pub fn quic(recv: quinn::RecvStream, early: Bytes) -> StreamRecv {
        StreamRecv::Quic {
            recv,
            early: (!early.is_empty()).then_some(early),
        }
    }

    /// The next chunk (at most [`MAX_CHUNK`] from QUIC); `None` at the end of the stream.
    /// After an error every call fails again: callers stop at the first.
    pub async fn data(&mut self) -> Option<Result<Bytes, PipeError>> {
        match self {
            StreamRecv::H2(recv) => recv
                .data()
                .await
                .map(|r| r.map_err(|e| PipeError::Stream(e.to_string()))),
            StreamRecv::Quic { recv, early } => {
                if let Some(early) = early.take() {
                    return Some(Ok(early));
                }
                match recv.read_chunk(MAX_CHUNK, true).await {
                    Ok(Some(chunk)) => Some(Ok(chunk.bytes)),
                    Ok(None) => None,
                    Err(e) => Some(Err(PipeError::Stream(e.to_string()))),
                }
            }
        }
    }

    /// After [`StreamRecv::data`] returned `None`: whether this direction ended with the
    /// MOVED trailer, its rest following on the lane stream (`super::lane`).
    pub async fn moved(&mut self) -> Result<bool, PipeError> {
        match self {
            StreamRecv::H2(recv) => match recv.trailers().await {
                Ok(Some(trailers)) => Ok(trailers.contains_key(protocol::stream::MOVED_TRAILER)),
                Ok(None) => Ok(false),
                Err(e) => Err(PipeError::Stream(e.to_string())),
            },
            StreamRecv::Quic { .. } => Ok(false),
        }
    }

    /// `n` bytes of [`StreamRecv::data`] were delivered: the peer may send that many more.
    /// h2 needs it; QUIC credits its window as bytes are read, so a QUIC stream holds at
    /// most one chunk beyond its window.
    pub fn release(&mut self, n: usize) -> Result<(), PipeError> {
        match self {
            StreamRecv::H2(recv) => recv
                .flow_control()
                .release_capacity(n)
                .map_err(|e| PipeError::Stream(e.to_string())),
            StreamRecv::Quic { .. } => Ok(()),
        }
    }
}
