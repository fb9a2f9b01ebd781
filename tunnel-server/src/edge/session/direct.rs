//! Streams the server opens on a QUIC session, carried on QUIC streams directly: the
//! request head ([`protocol::quic_head`]) the edge's bridge expects, then the bytes, with
//! no in-memory HTTP/2 hop on this side. The wire is the bridge's, so the edge cannot tell
//! the difference. That hop was the largest cost per byte of QUIC on the server
//! (docs/BENCHMARKS.md, "QUIC beside TCP"): h2 framing, a duplex pipe copy and task wakeups
//! per chunk. Owns the stream open only; slots, the pending cap, the dial timeout and
//! the session's retirement stay in [`super::EdgeSession::open`], as for h2.

use bytes::BytesMut;
use protocol::quic_head::{self, Head, RequestHead};
use protocol::stream::{sanitize_reason, DialFailure, CLIENT_HEADER, REASON_HEADER};
use protocol::Target;
use tunnel_io::pipe::{QuicSend, StreamRecv, StreamSend};
use tunnel_io::quic_bridge::read_head;

use super::OpenError;

/// Open a stream on `conn`, ask the edge to dial `target` for `client`, and return the
/// stream once the edge answered 200. Dropping the future, or a refusal, resets the stream
/// (the edge cancels its dial), as dropping an h2 stream does.
pub(super) async fn open(
    conn: &quinn::Connection,
    target: &Target,
    client: &str,
) -> Result<(StreamSend, StreamRecv), OpenError> {
    let head = Head::Request(RequestHead {
        method: http::Method::CONNECT.as_str().to_owned(),
        uri: target.to_string(),
        headers: vec![(CLIENT_HEADER.to_owned(), sanitize_reason(client))],
    });
    let mut frame = BytesMut::new();
    quic_head::encode(&head, &mut frame)
        .map_err(|e| OpenError::new(DialFailure::Internal, e.to_string()))?;
    let (send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| OpenError::new(DialFailure::Unreachable, format!("session lost: {e}")))?;
    let failed =
        |e: String| OpenError::new(DialFailure::Unreachable, format!("stream failed: {e}"));
    // Owned from here: an early return or a drop resets the stream.
    let mut send = QuicSend::new(send);
    send.write_all(frame.freeze()).await.map_err(failed)?;
    let mut early = BytesMut::new();
    let answer = match read_head(&mut recv, &mut early).await.map_err(failed)? {
        Head::Response(answer) => answer,
        Head::Request(_) => return Err(failed("a request head where a response was due".into())),
    };
    if answer.status == 200 {
        return Ok((
            StreamSend::Quic(send),
            StreamRecv::quic(recv, early.freeze()),
        ));
    }
    let reason = answer
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(REASON_HEADER))
        .map(|(_, value)| sanitize_reason(value));
    Err(super::refused_by_edge(answer.status, reason))
}
