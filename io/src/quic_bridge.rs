//! A QUIC edge session presented as an HTTP/2 connection. Both ends of Tether are written
//! against an h2 connection (the server's `EdgeSession`, the edge's stream server, upstream
//! forwarding); over QUIC each end runs that same code on an in-memory duplex pipe, and this
//! module maps every HTTP/2 stream of the pipe onto its own QUIC bidirectional stream and
//! back: head ([`protocol::quic_head`]) first, then the bytes; END_STREAM ⇄ FIN,
//! RST_STREAM ⇄ RESET_STREAM/STOP_SENDING. The in-memory h2 never loses a packet and keeps
//! per-stream flow control, so a lost UDP packet stalls only its own QUIC stream.
//!
//! It owns no policy: which streams may be opened, and what they mean, is the h2 code's.
//!
//! The server bypasses it for the streams it opens for frontends (the bulk of the bytes):
//! it writes the same request head on a QUIC stream itself (`tunnel-server`'s
//! `session/direct.rs`), so the wire is this module's either way.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderName, HeaderValue, Request, Response};
use protocol::quic_head::{self, Head, RequestHead, ResponseHead, MAX_HEAD_LEN};
use quinn::{Connection, VarInt};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// A byte stream an h2 connection can run on, boxed so one session loop serves the TCP
/// (TLS) and the QUIC (in-memory) transport alike.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// Bytes of the in-memory pipe between an h2 end and the bridge: one [`crate::pipe::MAX_CHUNK`]
/// so a bulk stream's chunk crosses in one write.
pub const DUPLEX_BUFFER: usize = crate::pipe::MAX_CHUNK;
/// Largest chunk read from a QUIC stream at once, as the pipe's largest read.
const MAX_READ: usize = crate::pipe::MAX_CHUNK;
/// Application error code of a stream reset because its other half or its h2 peer failed.
pub const CODE_CANCELLED: VarInt = VarInt::from_u32(1);
/// Application error code of a stream whose head was missing, too long or malformed.
pub const CODE_BAD_HEAD: VarInt = VarInt::from_u32(2);
/// Connection close code of an orderly end (drain, shutdown, last stream done).
pub const CODE_DONE: VarInt = VarInt::from_u32(0);

/// Windows, stream limits and liveness of one side's QUIC transport.
#[derive(Debug, Clone, Copy)]
pub struct QuicTuning {
    /// Per-stream receive window in bytes (the h2 session's `stream_window`).
    pub stream_window: u32,
    /// Per-connection receive window in bytes (the h2 session's `connection_window`).
    pub connection_window: u32,
    /// Streams the peer may have open towards us at once.
    pub max_incoming_streams: u32,
    /// Keep-alive interval: the h2 session's PING interval.
    pub keep_alive: Duration,
    /// Idle timeout: the h2 session's `ping_interval × ping_misses`.
    pub idle_timeout: Duration,
}

impl QuicTuning {
    /// The quinn transport configuration for these numbers.
    pub fn transport(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(VarInt::from_u32(self.stream_window));
        t.receive_window(VarInt::from_u32(self.connection_window));
        t.send_window(u64::from(self.connection_window));
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_incoming_streams));
        // One uni stream: the drain notice ([`send_goaway`]).
        t.max_concurrent_uni_streams(VarInt::from_u32(1));
        t.keep_alive_interval(Some(self.keep_alive));
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .unwrap_or_else(|_| VarInt::from_u32(u32::MAX).into());
        t.max_idle_timeout(Some(idle));
        t
    }
}

/// Requests of the local h2 *client* at the other end of `io` become streams opened on
/// `conn`. Returns, with why, when the local client is done (its last stream ended after
/// GOAWAY) or the connection is lost.
pub async fn serve_outbound<T>(conn: Connection, io: T, builder: h2::server::Builder) -> String
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut h2 = match builder.handshake::<_, Bytes>(io).await {
        Ok(h2) => h2,
        Err(e) => return format!("in-memory HTTP/2 handshake: {e}"),
    };
    loop {
        tokio::select! {
            accepted = h2.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    tokio::spawn(carry_outbound(conn.clone(), request, respond));
                }
                Some(Err(e)) => return format!("in-memory HTTP/2: {e}"),
                None => return "local side closed".to_string(),
            },
            e = conn.closed() => return format!("QUIC connection closed: {e}"),
        }
    }
}

/// Streams the peer opens on `conn` become requests to the local h2 *server* at the other
/// end of `io`; a peer that does not send a stream's head within `head_timeout` has it reset.
/// A drain notice from the peer ([`send_goaway`]) makes the local client go away, as an h2
/// GOAWAY would. Returns, with why, when the connection is lost or the local server is gone.
pub async fn serve_inbound<T>(
    conn: Connection,
    io: T,
    builder: h2::client::Builder,
    head_timeout: Duration,
) -> String
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut h2) = match builder.handshake::<_, Bytes>(io).await {
        Ok(pair) => pair,
        Err(e) => return format!("in-memory HTTP/2 handshake: {e}"),
    };
    let mut sender = Some(sender);
    loop {
        tokio::select! {
            ended = &mut h2 => return match ended {
                Ok(()) => "local side closed".to_string(),
                Err(e) => format!("in-memory HTTP/2: {e}"),
            },
            accepted = conn.accept_bi() => match accepted {
                Ok(streams) => match &sender {
                    Some(s) => {
                        tokio::spawn(carry_inbound(s.clone(), streams, head_timeout));
                    }
                    None => {
                        let (mut send, mut recv) = streams;
                        let _ = send.reset(CODE_CANCELLED);
                        let _ = recv.stop(CODE_CANCELLED);
                    }
                },
                Err(e) => return format!("QUIC connection closed: {e}"),
            },
            notice = conn.accept_uni(), if sender.is_some() => match notice {
                Ok(_) => {
                    debug!("peer is draining: no new streams from here");
                    sender = None;
                }
                Err(e) => return format!("QUIC connection closed: {e}"),
            },
        }
    }
}

/// Tell the peer to open no new streams here (the h2 GOAWAY of a QUIC session). Streams
/// already open run on.
pub async fn send_goaway(conn: &Connection) {
    if let Ok(mut notice) = conn.open_uni().await {
        let _ = notice.write_all(&[0]).await;
        let _ = notice.finish();
    }
}

/// One h2 request from the local client: open a QUIC stream, send its head and body, and
/// answer with the peer's response head and bytes.
async fn carry_outbound(
    conn: Connection,
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let (parts, mut body) = request.into_parts();
    let head = Head::Request(RequestHead {
        method: parts.method.as_str().to_owned(),
        uri: parts.uri.to_string(),
        headers: header_list(&parts.headers),
    });
    let mut frame = BytesMut::new();
    if let Err(e) = quic_head::encode(&head, &mut frame) {
        debug!(error = %e, "request not carried");
        respond.send_reset(Reason::PROTOCOL_ERROR);
        return;
    }
    let opened = tokio::select! {
        opened = conn.open_bi() => opened,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let (mut qsend, mut qrecv) = match opened {
        Ok(streams) => streams,
        Err(e) => {
            debug!(error = %e, "no QUIC stream for the request");
            respond.send_reset(Reason::REFUSED_STREAM);
            return;
        }
    };
    let up = async {
        qsend.write_all(&frame).await.map_err(|e| e.to_string())?;
        h2_to_quic(&mut body, &mut qsend).await
    };
    let down = async {
        let mut buf = BytesMut::new();
        let head = read_head(&mut qrecv, &mut buf).await?;
        let Head::Response(head) = head else {
            return Err("a request head where a response was due".to_string());
        };
        let mut response = Response::builder().status(head.status);
        for (name, value) in &head.headers {
            response = response.header(name.as_str(), value.as_str());
        }
        let response = response.body(()).map_err(|e| e.to_string())?;
        let mut send = respond
            .send_response(response, false)
            .map_err(|e| e.to_string())?;
        let copied = quic_to_h2(&mut qrecv, buf, &mut send).await;
        if copied.is_err() {
            send.send_reset(Reason::CANCEL);
        }
        copied
    };
    if let Err(error) = tokio::try_join!(up, down) {
        debug!(error, "bridged stream failed");
        let _ = qsend.reset(CODE_CANCELLED);
        let _ = qrecv.stop(CODE_CANCELLED);
        respond.send_reset(Reason::CANCEL);
    }
}

/// One QUIC stream the peer opened: read its head, make it a request to the local server,
/// and carry the answer back.
async fn carry_inbound(
    sender: h2::client::SendRequest<Bytes>,
    (mut qsend, mut qrecv): (quinn::SendStream, quinn::RecvStream),
    head_timeout: Duration,
) {
    let mut buf = BytesMut::new();
    let request = match tokio::time::timeout(head_timeout, read_head(&mut qrecv, &mut buf)).await {
        Ok(Ok(Head::Request(head))) => build_request(head),
        Ok(Ok(Head::Response(_))) => Err("a response head where a request was due".to_string()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no stream head within {head_timeout:?}")),
    };
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            debug!(error, "peer stream refused");
            let _ = qsend.reset(CODE_BAD_HEAD);
            let _ = qrecv.stop(CODE_BAD_HEAD);
            return;
        }
    };
    let opened = async {
        let mut sender = sender.ready().await.map_err(|e| e.to_string())?;
        sender
            .send_request(request, false)
            .map_err(|e| e.to_string())
    };
    let (response, mut send) = match opened.await {
        Ok(pair) => pair,
        Err(error) => {
            debug!(error, "local side took no stream");
            let _ = qsend.reset(CODE_CANCELLED);
            let _ = qrecv.stop(CODE_CANCELLED);
            return;
        }
    };
    let up = quic_to_h2(&mut qrecv, buf, &mut send);
    let down = async {
        let response = response.await.map_err(|e| e.to_string())?;
        let (parts, mut body) = response.into_parts();
        let head = Head::Response(ResponseHead {
            status: parts.status.as_u16(),
            headers: header_list(&parts.headers),
        });
        let mut frame = BytesMut::new();
        quic_head::encode(&head, &mut frame).map_err(|e| e.to_string())?;
        qsend.write_all(&frame).await.map_err(|e| e.to_string())?;
        h2_to_quic(&mut body, &mut qsend).await
    };
    if let Err(error) = tokio::try_join!(up, down) {
        debug!(error, "bridged stream failed");
        let _ = qsend.reset(CODE_CANCELLED);
        let _ = qrecv.stop(CODE_CANCELLED);
        send.send_reset(Reason::CANCEL);
    }
}

fn build_request(head: RequestHead) -> Result<Request<()>, String> {
    let mut request = Request::builder()
        .method(head.method.as_str())
        .uri(head.uri.as_str());
    for (name, value) in &head.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    request.body(()).map_err(|e| format!("stream head: {e}"))
}

/// The headers that travel in a stream head (h2 pseudo-headers are in the method, URI and
/// status already); values that are not visible ASCII are left out rather than carried.
fn header_list(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(name, value): (&HeaderName, &HeaderValue)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

/// Read one head off the front of a QUIC stream; bytes after it stay in `buf`. Public for
/// the server's direct streams, which read the edge's response head themselves.
pub async fn read_head(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> Result<Head, String> {
    loop {
        if let Some(head) = quic_head::decode(buf).map_err(|e| e.to_string())? {
            return Ok(head);
        }
        let room = (2 + MAX_HEAD_LEN).saturating_sub(buf.len()).max(1);
        match recv.read_chunk(room, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err("stream ended before its head".to_string()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// h2 body → QUIC stream: capacity is released only once QUIC took the bytes, so h2 flow
/// control sees QUIC's; END_STREAM becomes FIN.
async fn h2_to_quic(body: &mut RecvStream, send: &mut quinn::SendStream) -> Result<(), String> {
    loop {
        match body.data().await {
            Some(Ok(chunk)) => {
                let n = chunk.len();
                send.write_chunk(chunk).await.map_err(|e| e.to_string())?;
                let _ = body.flow_control().release_capacity(n);
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => {
                let _ = send.finish();
                return Ok(());
            }
        }
    }
}

/// QUIC stream → h2 stream, sending no more than h2 grants; FIN becomes END_STREAM.
async fn quic_to_h2(
    recv: &mut quinn::RecvStream,
    early: BytesMut,
    send: &mut SendStream<Bytes>,
) -> Result<(), String> {
    if !early.is_empty() {
        send_all(send, early.freeze()).await?;
    }
    loop {
        match recv.read_chunk(MAX_READ, true).await {
            Ok(Some(chunk)) => send_all(send, chunk.bytes).await?,
            Ok(None) => {
                return send
                    .send_data(Bytes::new(), true)
                    .map_err(|e| e.to_string())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), String> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => {
                let chunk = data.split_to(n.min(data.len()));
                send.send_data(chunk, false).map_err(|e| e.to_string())?;
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("h2 stream closed".to_string()),
        }
    }
    Ok(())
}

/// A client endpoint's or server's crypto for QUIC from a rustls config (TLS 1.3 only, as
/// every rustls config here is).
pub fn client_crypto(
    tls: rustls::ClientConfig,
) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, String> {
    quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map(Arc::new)
        .map_err(|e| format!("QUIC client TLS: {e}"))
}

/// See [`client_crypto`].
pub fn server_crypto(
    tls: rustls::ServerConfig,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, String> {
    quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map(Arc::new)
        .map_err(|e| format!("QUIC server TLS: {e}"))
}
