//! Any `:authority` on the Konnectivity Unix socket. gRPC clients dialing a `unix:` target send
//! the socket path as the HTTP/2 `:authority` (grpc-go, and so kube-apiserver, the raw path;
//! grpcio the %-escaped one). h2's server refuses both as malformed URIs with RST_STREAM
//! PROTOCOL_ERROR before any service code runs, and has no switch to relax that. On a Unix
//! socket the authority means nothing, so on that listener only the client's frames pass
//! through [`Rewriter`] before h2 reads them: every header block is decoded (HPACK, with the
//! client's dynamic table), an `:authority` that is not a valid URI authority becomes
//! [`LOCAL_AUTHORITY`], and every block is re-encoded as literals without indexing, so h2's
//! decoder table stays empty and can never fall out of step with the client's encoder.
//! Every other frame passes byte for byte. The TCP listeners keep h2's strict check.
//!
//! Sans-io: bytes in, bytes out. The server's Konnectivity frontend drives it from the socket.

use bytes::{Buf, BufMut, BytesMut};

/// What a rewritten `:authority` says: the socket is local, whatever the client called it.
pub const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes of a frame header.
const FRAME_HEADER: usize = 9;
/// Largest encoded header block (HEADERS plus CONTINUATION payloads) accepted: 16 KiB. A
/// gRPC request's headers are a few hundred bytes (kube-apiserver's ~150 B); anything near
/// this is abuse, refused before it is buffered.
pub const MAX_HEADER_BLOCK: usize = 16 << 10;
/// Largest decoded header list (RFC 7541 §4.1 sizes: name + value + 32 per field): 16 KiB, so
/// a small block cannot expand into a large one through the dynamic table.
pub const MAX_HEADER_LIST: usize = 16 << 10;
/// The client's HPACK dynamic table size: the default, since the server announces none.
const CLIENT_TABLE_SIZE: usize = 4096;
/// Largest frame the rewriter emits: the smallest SETTINGS_MAX_FRAME_SIZE a peer may set, so
/// it is valid whatever h2 announced.
const MAX_OUT_FRAME: usize = 16_384;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a connection was closed before h2 saw the offending bytes. Each is a protocol error
/// h2 would also close the connection for; the difference is that these are logged and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A header block larger than [`MAX_HEADER_BLOCK`].
    #[error("header block larger than {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge,
    /// A decoded header list larger than [`MAX_HEADER_LIST`].
    #[error("header list larger than {MAX_HEADER_LIST} bytes")]
    HeaderListTooLarge,
    /// HPACK that does not decode.
    #[error("undecodable header block: {0}")]
    Hpack(String),
    /// A frame other than CONTINUATION for the same stream inside a header block, or a
    /// CONTINUATION outside one.
    #[error("header block interrupted or continued out of place")]
    BrokenHeaderBlock,
    /// Padding longer than the frame.
    #[error("HEADERS padding longer than the frame")]
    BadPadding,
}

impl Refusal {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::HeaderBlockTooLarge => "header_block_too_large",
            Refusal::HeaderListTooLarge => "header_list_too_large",
            Refusal::Hpack(_) => "bad_hpack",
            Refusal::BrokenHeaderBlock => "broken_header_block",
            Refusal::BadPadding => "bad_padding",
        }
    }
}

/// What one finished header block looked like, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSeen {
    /// The stream it belongs to.
    pub stream_id: u32,
    /// The client's `:authority`, when it was replaced.
    pub rewritten_from: Option<String>,
    /// Why h2 will refuse this request although its authority is now valid, if it will.
    pub malformed: Option<&'static str>,
}

enum State {
    /// The first bytes, which must be the client preface.
    Preface,
    /// Not an HTTP/2 client: pass everything as it is and let h2 say so.
    Transparent,
    /// At a frame boundary.
    FrameHeader,
    /// Inside a frame that passes as it is.
    Passthrough { remaining: usize },
    /// Waiting for the whole payload of a HEADERS or CONTINUATION frame.
    HeaderPayload {
        kind: u8,
        flags: u8,
        stream_id: u32,
        len: usize,
    },
}

/// A header block being collected across HEADERS and CONTINUATION frames.
struct Pending {
    stream_id: u32,
    /// END_STREAM of the HEADERS frame.
    end_stream: bool,
    /// The HEADERS frame's priority fields, kept as they were.
    priority: Option<[u8; 5]>,
    block: BytesMut,
}

/// The client → server half of one connection, rewritten.
pub struct Rewriter {
    state: State,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(CLIENT_TABLE_SIZE);
        Rewriter {
            state: State::Preface,
            pending: None,
            decoder,
        }
    }
}

impl Rewriter {
    /// Move what can be moved from `input` to `out`, rewriting header blocks; bytes of an
    /// incomplete frame header or header frame stay in `input`. Calls `seen` once per
    /// finished header block.
    pub fn feed(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        seen: &mut dyn FnMut(BlockSeen),
    ) -> Result<(), Refusal> {
        loop {
            match self.state {
                State::Preface => {
                    let n = input.len().min(PREFACE.len());
                    if input[..n] != PREFACE[..n] {
                        self.state = State::Transparent;
                    } else if n == PREFACE.len() {
                        out.extend_from_slice(&input.split_to(n));
                        self.state = State::FrameHeader;
                    } else {
                        return Ok(());
                    }
                }
                State::Transparent => {
                    out.extend_from_slice(&input.split());
                    return Ok(());
                }
                State::FrameHeader => {
                    if input.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let len = (usize::from(input[0]) << 16)
                        | (usize::from(input[1]) << 8)
                        | usize::from(input[2]);
                    let kind = input[3];
                    let flags = input[4];
                    let stream_id =
                        u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & 0x7fff_ffff;
                    let in_block = self.pending.as_ref().map(|p| p.stream_id);
                    match (kind, in_block) {
                        (CONTINUATION, Some(id)) if id == stream_id => {}
                        (HEADERS, None) => {}
                        (CONTINUATION, _) | (_, Some(_)) => return Err(Refusal::BrokenHeaderBlock),
                        _ => {
                            out.extend_from_slice(&input.split_to(FRAME_HEADER));
                            self.state = State::Passthrough { remaining: len };
                            continue;
                        }
                    }
                    let collected = self.pending.as_ref().map_or(0, |p| p.block.len());
                    // Padding (≤ 256) and priority (5) may come on top of the block itself.
                    if collected + len > MAX_HEADER_BLOCK + 256 + 5 {
                        return Err(Refusal::HeaderBlockTooLarge);
                    }
                    input.advance(FRAME_HEADER);
                    self.state = State::HeaderPayload {
                        kind,
                        flags,
                        stream_id,
                        len,
                    };
                }
                State::Passthrough { remaining } => {
                    let n = remaining.min(input.len());
                    out.extend_from_slice(&input.split_to(n));
                    self.consumed_direct(n);
                    if input.is_empty() {
                        return Ok(());
                    }
                }
                State::HeaderPayload {
                    kind,
                    flags,
                    stream_id,
                    len,
                } => {
                    if input.len() < len {
                        return Ok(());
                    }
                    let payload = input.split_to(len);
                    self.header_frame(kind, flags, stream_id, payload)?;
                    self.state = State::FrameHeader;
                    if flags & END_HEADERS != 0 {
                        let pending = self.pending.take().ok_or(Refusal::BrokenHeaderBlock)?;
                        let block_seen = self.finish(pending, out)?;
                        seen(block_seen);
                    }
                }
            }
        }
    }

    /// Payload bytes of the current frame that may be read straight into the caller's
    /// buffer (no rewriting), when the rewriter holds nothing of its own.
    pub fn passthrough_direct(&self) -> Option<usize> {
        match self.state {
            State::Passthrough { remaining } if remaining > 0 => Some(remaining),
            _ => None,
        }
    }

    /// `n` payload bytes went to the caller directly.
    pub fn consumed_direct(&mut self, n: usize) {
        if let State::Passthrough { remaining } = &mut self.state {
            *remaining -= n.min(*remaining);
            if *remaining == 0 {
                self.state = State::FrameHeader;
            }
        }
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: u32,
        mut payload: BytesMut,
    ) -> Result<(), Refusal> {
        if kind == CONTINUATION {
            let pending = self.pending.as_mut().ok_or(Refusal::BrokenHeaderBlock)?;
            pending.block.extend_from_slice(&payload);
        } else {
            if flags & PADDED != 0 {
                if payload.is_empty() {
                    return Err(Refusal::BadPadding);
                }
                let pad = usize::from(payload.get_u8());
                if pad > payload.len() {
                    return Err(Refusal::BadPadding);
                }
                payload.truncate(payload.len() - pad);
            }
            let priority = if flags & PRIORITY != 0 {
                if payload.len() < 5 {
                    return Err(Refusal::BadPadding);
                }
                let mut fields = [0u8; 5];
                payload.copy_to_slice(&mut fields);
                Some(fields)
            } else {
                None
            };
            self.pending = Some(Pending {
                stream_id,
                end_stream: flags & END_STREAM != 0,
                priority,
                block: payload,
            });
        }
        match &self.pending {
            Some(p) if p.block.len() > MAX_HEADER_BLOCK => Err(Refusal::HeaderBlockTooLarge),
            _ => Ok(()),
        }
    }

    /// Decode a whole block, rewrite it, and write it out as HEADERS (+ CONTINUATION).
    fn finish(&mut self, pending: Pending, out: &mut BytesMut) -> Result<BlockSeen, Refusal> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let mut too_large = false;
        self.decoder
            .decode_with_cb(&pending.block, |name, value| {
                size += name.len() + value.len() + 32;
                if size > MAX_HEADER_LIST {
                    too_large = true;
                } else {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| Refusal::Hpack(format!("{e:?}")))?;
        if too_large {
            return Err(Refusal::HeaderListTooLarge);
        }
        let mut rewritten_from = None;
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                let old = std::mem::replace(value, LOCAL_AUTHORITY.to_vec());
                rewritten_from = Some(String::from_utf8_lossy(&old).into_owned());
            }
        }
        let malformed = malformed(&fields);

        let mut block = Vec::with_capacity(size);
        for (name, value) in &fields {
            encode_literal(name, value, &mut block);
        }
        write_block(&pending, &block, out);
        Ok(BlockSeen {
            stream_id: pending.stream_id,
            rewritten_from,
            malformed,
        })
    }
}

/// "Literal Header Field without Indexing — New Name" (RFC 7541 §6.2.2), no Huffman: touches
/// no dynamic table on either side.
fn encode_literal(name: &[u8], value: &[u8], block: &mut Vec<u8>) {
    block.push(0);
    for string in [name, value] {
        // Writing into a Vec cannot fail.
        let _ = loona_hpack::encoder::encode_integer_into(string.len(), 7, 0, block);
        block.extend_from_slice(string);
    }
}

/// HEADERS carrying `block` (split into CONTINUATION frames past [`MAX_OUT_FRAME`]).
fn write_block(pending: &Pending, block: &[u8], out: &mut BytesMut) {
    let first_room = MAX_OUT_FRAME - if pending.priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut flags = if pending.end_stream { END_STREAM } else { 0 };
    if pending.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let priority = pending.priority.as_ref().map_or(&[][..], |p| &p[..]);
    frame_header(
        out,
        priority.len() + first.len(),
        HEADERS,
        flags,
        pending.stream_id,
    );
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(rest.len().min(MAX_OUT_FRAME));
        let flags = if more.is_empty() { END_HEADERS } else { 0 };
        frame_header(out, chunk.len(), CONTINUATION, flags, pending.stream_id);
        out.extend_from_slice(chunk);
        rest = more;
    }
}

fn frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream_id: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id);
}

/// Why h2 will refuse a request whose authority is already fine, for the log line h2 does
/// not write: the checks of RFC 9113 §8.2 and §8.3 that apply to a gRPC request.
fn malformed(fields: &[(Vec<u8>, Vec<u8>)]) -> Option<&'static str> {
    let is_request = fields.iter().any(|(n, _)| n.first() == Some(&b':'));
    for (name, value) in fields {
        if name.iter().any(u8::is_ascii_uppercase) {
            return Some("upper-case header name");
        }
        match name.as_slice() {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => return Some("connection-specific header"),
            b"te" if value.as_slice() != b"trailers" => return Some("te other than trailers"),
            _ => {}
        }
    }
    if !is_request {
        return None;
    }
    let has = |pseudo: &[u8]| fields.iter().any(|(n, _)| n.as_slice() == pseudo);
    if !has(b":method") {
        return Some("no :method");
    }
    let connect = fields
        .iter()
        .any(|(n, v)| n.as_slice() == b":method" && v.as_slice() == b"CONNECT");
    let scheme_and_path = has(b":scheme") && has(b":path");
    if !(connect || scheme_and_path) {
        return Some("no :scheme or :path");
    }
    None
}

#[cfg(test)]
mod tests;
