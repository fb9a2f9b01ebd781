//! HTTP/2 written frame by frame, for requests no HTTP/2 library will send: an `:authority`
//! that is a socket path (what grpc-go, and so kube-apiserver, sends on a `unix:` target), its
//! %-escaped form (grpcio), or none at all. Header blocks are HPACK literals without
//! indexing; the server's blocks are decoded with a real HPACK decoder. Just enough of HTTP/2
//! for one gRPC stream: SETTINGS and PING are acknowledged, every DATA byte is credited back.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use protocol::konnectivity::Packet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
/// Longest wait for any frame.
const FRAME_WAIT: Duration = Duration::from_secs(10);

/// What the server did on a stream, or to the connection.
#[derive(Debug)]
pub enum Event {
    /// A header block (response headers or trailers).
    Headers(u32, Vec<(String, String)>),
    /// A whole gRPC message.
    Packet(u32, Packet),
    /// RST_STREAM with its error code.
    Reset(u32, u32),
    /// GOAWAY with its error code.
    GoAway(u32),
    /// The connection ended.
    Closed,
}

/// One HTTP/2 client connection.
pub struct RawH2<S> {
    io: S,
    decoder: loona_hpack::Decoder<'static>,
    read: BytesMut,
    /// Unfinished gRPC messages by stream.
    messages: HashMap<u32, BytesMut>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawH2<S> {
    /// Send the preface and empty SETTINGS.
    pub async fn start(mut io: S) -> anyhow::Result<RawH2<S>> {
        let mut out = PREFACE.to_vec();
        frame(&mut out, SETTINGS, 0, 0, &[]);
        io.write_all(&out).await?;
        Ok(RawH2 {
            io,
            decoder: loona_hpack::Decoder::new(),
            read: BytesMut::new(),
            messages: HashMap::new(),
        })
    }

    /// Open `stream` with these header fields, in order, as literals.
    pub async fn headers(&mut self, stream: u32, fields: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut block = Vec::new();
        for (name, value) in fields {
            block.push(0);
            for s in [name.as_bytes(), value.as_bytes()] {
                let _ = loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, &mut block);
                block.extend_from_slice(s);
            }
        }
        self.write(HEADERS, END_HEADERS, stream, &block).await
    }

    /// A raw frame.
    pub async fn write(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(9 + payload.len());
        frame(&mut out, kind, flags, stream, payload);
        self.io.write_all(&out).await?;
        Ok(())
    }

    /// Send `packet` as one gRPC message on `stream`.
    pub async fn send(&mut self, stream: u32, packet: &Packet) -> anyhow::Result<()> {
        let message = packet.to_bytes();
        let mut framed = Vec::with_capacity(5 + message.len());
        framed.put_u8(0);
        framed.put_u32(message.len() as u32);
        framed.extend_from_slice(&message);
        self.write(DATA, 0, stream, &framed).await
    }

    /// The next thing the server did, answering SETTINGS and PING on the way.
    pub async fn next(&mut self) -> anyhow::Result<Event> {
        loop {
            if let Some(event) = self.whole_message()? {
                return Ok(event);
            }
            if self.read.len() >= 9 {
                let len =
                    u32::from_be_bytes([0, self.read[0], self.read[1], self.read[2]]) as usize;
                if self.read.len() >= 9 + len {
                    let kind = self.read[3];
                    let flags = self.read[4];
                    let stream = u32::from_be_bytes(self.read[5..9].try_into()?) & 0x7fff_ffff;
                    self.read.advance(9);
                    let payload = self.read.split_to(len).freeze();
                    if let Some(event) = self.frame_in(kind, flags, stream, payload).await? {
                        return Ok(event);
                    }
                    continue;
                }
            }
            let n = tokio::time::timeout(FRAME_WAIT, self.io.read_buf(&mut self.read))
                .await
                .context("no frame from the server")?;
            match n {
                Ok(0) | Err(_) => return Ok(Event::Closed),
                Ok(_) => {}
            }
        }
    }

    /// The next gRPC message on `stream`; an error naming anything else that ends it.
    pub async fn packet(&mut self, stream: u32) -> anyhow::Result<Packet> {
        loop {
            match self.next().await? {
                Event::Packet(s, packet) if s == stream => return Ok(packet),
                Event::Headers(s, fields)
                    if s == stream && !fields.iter().any(|(n, _)| n == "grpc-status") => {}
                other => bail!("stream {stream}: expected a packet, got {other:?}"),
            }
        }
    }

    async fn frame_in(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        mut payload: Bytes,
    ) -> anyhow::Result<Option<Event>> {
        match kind {
            SETTINGS if flags & ACK == 0 => self.write(SETTINGS, ACK, 0, &[]).await?,
            PING if flags & ACK == 0 => {
                let payload = payload.to_vec();
                self.write(PING, ACK, 0, &payload).await?
            }
            HEADERS => {
                let fields = self
                    .decoder
                    .decode(&payload)
                    .map_err(|e| anyhow::anyhow!("server header block: {e:?}"))?;
                let fields = fields
                    .into_iter()
                    .map(|(n, v)| {
                        (
                            String::from_utf8_lossy(&n).into_owned(),
                            String::from_utf8_lossy(&v).into_owned(),
                        )
                    })
                    .collect();
                return Ok(Some(Event::Headers(stream, fields)));
            }
            DATA => {
                if !payload.is_empty() {
                    let credit = (payload.len() as u32).to_be_bytes();
                    self.write(WINDOW_UPDATE, 0, 0, &credit).await?;
                    self.write(WINDOW_UPDATE, 0, stream, &credit).await?;
                }
                self.messages
                    .entry(stream)
                    .or_default()
                    .extend_from_slice(&payload);
                return self.whole_message();
            }
            RST_STREAM => return Ok(Some(Event::Reset(stream, payload.get_u32()))),
            GOAWAY => {
                payload.advance(4);
                return Ok(Some(Event::GoAway(payload.get_u32())));
            }
            _ => {}
        }
        Ok(None)
    }
}

impl<S> RawH2<S> {
    /// A gRPC message complete in some stream's buffer.
    fn whole_message(&mut self) -> anyhow::Result<Option<Event>> {
        for (stream, buf) in &mut self.messages {
            if buf.len() >= 5 {
                let len = u32::from_be_bytes(buf[1..5].try_into()?) as usize;
                if buf.len() >= 5 + len {
                    buf.advance(5);
                    let message = buf.split_to(len).freeze();
                    return Ok(Some(Event::Packet(*stream, Packet::decode(message)?)));
                }
            }
        }
        Ok(None)
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}
