//! Cutting the byte stream h2 writes into HTTP/2 frames (RFC 9113 §4.1), whatever the
//! boundaries of the writes, and sorting each frame into the lane its type allows. No I/O.

/// HTTP/2 frame header length in bytes (RFC 9113 §4.1).
pub const FRAME_HEADER: usize = 9;
/// The client connection preface (RFC 9113 §3.4), written once before the first frame by
/// the HTTP/2 client (tunnel-server's end of an edge session).
pub const CLIENT_PREFACE_LEN: usize = 24;

/// Frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
/// HEADERS.
pub const HEADERS: u8 = 0x1;
/// PRIORITY.
pub const PRIORITY: u8 = 0x2;
/// RST_STREAM.
pub const RST_STREAM: u8 = 0x3;
/// SETTINGS.
pub const SETTINGS: u8 = 0x4;
/// PUSH_PROMISE.
pub const PUSH_PROMISE: u8 = 0x5;
/// PING.
pub const PING: u8 = 0x6;
/// GOAWAY.
pub const GOAWAY: u8 = 0x7;
/// WINDOW_UPDATE.
pub const WINDOW_UPDATE: u8 = 0x8;
/// CONTINUATION.
pub const CONTINUATION: u8 = 0x9;

/// END_STREAM flag (DATA, HEADERS).
pub const FLAG_END_STREAM: u8 = 0x1;
/// END_HEADERS flag (HEADERS, PUSH_PROMISE, CONTINUATION).
pub const FLAG_END_HEADERS: u8 = 0x4;
/// PADDED flag (DATA, HEADERS): a padded DATA frame is never split, its padding length
/// byte belongs to the frame.
pub const FLAG_PADDED: u8 = 0x8;

/// One parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload length in bytes (24 bits).
    pub len: usize,
    /// Frame type.
    pub kind: u8,
    /// Flags.
    pub flags: u8,
    /// Stream identifier (reserved bit cleared).
    pub stream: u32,
}

impl Header {
    /// Decode the 9 header bytes.
    pub fn parse(b: &[u8; FRAME_HEADER]) -> Header {
        Header {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// Encode a header.
    pub fn encode(&self) -> [u8; FRAME_HEADER] {
        let s = self.stream.to_be_bytes();
        [
            (self.len >> 16) as u8,
            (self.len >> 8) as u8,
            self.len as u8,
            self.kind,
            self.flags,
            s[0],
            s[1],
            s[2],
            s[3],
        ]
    }

    /// Where the scheduler may put this frame.
    pub fn lane(&self) -> Lane {
        match (self.kind, self.stream) {
            (PING, 0) => Lane::Urgent,
            (WINDOW_UPDATE, 0) => Lane::Urgent,
            // SETTINGS, GOAWAY and anything else on stream 0: after everything queued
            // before it, before everything queued after it.
            (_, 0) => Lane::Barrier,
            (WINDOW_UPDATE, _) => Lane::StreamWindowUpdate,
            (DATA, _) if self.flags & FLAG_PADDED == 0 => Lane::Data,
            _ => Lane::Stream,
        }
    }
}

/// The scheduling class of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// PING and connection WINDOW_UPDATE: ahead of every stream's frames.
    Urgent,
    /// SETTINGS, GOAWAY: ordered with respect to everything.
    Barrier,
    /// A stream's WINDOW_UPDATE: urgent once the stream exists on the wire.
    StreamWindowUpdate,
    /// Unpadded DATA: may be split at the quantum.
    Data,
    /// Any other stream frame: in its stream's order, whole.
    Stream,
}

/// Where the parser is in the byte stream.
#[derive(Debug)]
pub enum Cursor {
    /// Bytes of the client preface still to pass through.
    Preface(usize),
    /// Collecting a frame header.
    Header {
        /// Bytes collected.
        buf: [u8; FRAME_HEADER],
        /// How many of `buf` are filled.
        filled: usize,
    },
    /// Inside a frame's payload: `left` bytes still to come.
    Payload {
        /// Payload bytes still to come.
        left: usize,
    },
}

impl Cursor {
    /// A cursor at the start of a stream; `preface` bytes pass through before the first
    /// frame header.
    pub fn new(preface: usize) -> Cursor {
        if preface > 0 {
            Cursor::Preface(preface)
        } else {
            Cursor::empty_header()
        }
    }

    /// Waiting for the first byte of a frame header.
    pub fn empty_header() -> Cursor {
        Cursor::Header {
            buf: [0; FRAME_HEADER],
            filled: 0,
        }
    }

    /// True between frames (no frame is partly received).
    pub fn at_boundary(&self) -> bool {
        matches!(self, Cursor::Header { filled: 0, .. })
    }
}
