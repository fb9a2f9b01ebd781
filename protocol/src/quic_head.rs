//! The head of a tunneled stream on a QUIC edge session: what HTTP/2 carries in a HEADERS
//! frame on the TCP session (method, target or path, a few `tether-*` headers; the answer's
//! status and reason) is written as one length-prefixed frame at the start of each
//! direction of a QUIC bidirectional stream. Everything after it is the stream's bytes, and
//! the QUIC FIN is the end of stream (half-close). Pure encode/decode on bytes, bounded
//! before anything is allocated; the QUIC bridge in `tunnel-io` is the only user.
//!
//! Frame: `u16` big-endian length of the body, then the body:
//! - request: `0x01`, method (short string), URI (string), header count (`u8`), headers;
//! - response: `0x02`, status (`u16`), header count (`u8`), headers;
//!
//! where a string is a `u16` big-endian length then that many bytes, and a header is its
//! name then its value, both strings.

use bytes::{Buf, BufMut, BytesMut};

/// Largest frame body in bytes. A head holds a `host:port` or a control path and at most a
/// few short headers (a reason is at most 200 bytes); 8 KiB leaves room without letting a
/// peer make the reader buffer much per stream.
pub const MAX_HEAD_LEN: usize = 8 << 10;
/// Most headers one head may carry: the session uses at most three per message.
pub const MAX_HEADERS: usize = 16;
/// Longest method name in bytes (`CONNECT` is 7).
pub const MAX_METHOD_LEN: usize = 16;

const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;

/// The head of the direction that opens a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `CONNECT` for tunneled connections, `POST` for session control messages.
    pub method: String,
    /// `host:port` for a CONNECT, an absolute URI for a control message.
    pub uri: String,
    /// Lower-case names and visible-ASCII values.
    pub headers: Vec<(String, String)>,
}

/// The head of the answering direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// HTTP status: 200 means the target is dialed and bytes follow.
    pub status: u16,
    /// Lower-case names and visible-ASCII values.
    pub headers: Vec<(String, String)>,
}

/// Either head, as read off a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// The opener's head.
    Request(RequestHead),
    /// The answer's head.
    Response(ResponseHead),
}

/// Why a head was refused. The stream is reset; nothing else on the session is affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The length prefix is over [`MAX_HEAD_LEN`].
    #[error("stream head of {0} bytes is over the {MAX_HEAD_LEN}-byte limit")]
    TooLong(usize),
    /// The body ended inside a field, or bytes were left after the last one.
    #[error("malformed stream head: {0}")]
    Malformed(&'static str),
    /// A kind byte that is neither request nor response.
    #[error("unknown stream head kind {0}")]
    UnknownKind(u8),
    /// More than [`MAX_HEADERS`] headers.
    #[error("{0} headers in a stream head (at most {MAX_HEADERS})")]
    TooManyHeaders(usize),
    /// A method, URI, header name or value with bytes not allowed there.
    #[error("invalid {0} in stream head")]
    Invalid(&'static str),
}

/// Write `head` as one frame. Fails only on a head this module would refuse to read.
pub fn encode(head: &Head, out: &mut BytesMut) -> Result<(), HeadError> {
    validate(head)?;
    let mut body = BytesMut::new();
    let headers = match head {
        Head::Request(r) => {
            body.put_u8(KIND_REQUEST);
            put_str(&mut body, &r.method);
            put_str(&mut body, &r.uri);
            &r.headers
        }
        Head::Response(r) => {
            body.put_u8(KIND_RESPONSE);
            body.put_u16(r.status);
            &r.headers
        }
    };
    body.put_u8(headers.len() as u8);
    for (name, value) in headers {
        put_str(&mut body, name);
        put_str(&mut body, value);
    }
    if body.len() > MAX_HEAD_LEN {
        return Err(HeadError::TooLong(body.len()));
    }
    out.put_u16(body.len() as u16);
    out.extend_from_slice(&body);
    Ok(())
}

/// Take one frame off the front of `buf`: `Ok(None)` while it is incomplete. The length is
/// checked before the body is awaited, so a reader never buffers more than
/// `2 + MAX_HEAD_LEN` bytes for a head.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    if len > MAX_HEAD_LEN {
        return Err(HeadError::TooLong(len));
    }
    if buf.len() < 2 + len {
        return Ok(None);
    }
    buf.advance(2);
    let mut body = buf.split_to(len).freeze();
    let kind = take_u8(&mut body)?;
    let head = match kind {
        KIND_REQUEST => {
            let method = take_str(&mut body)?;
            let uri = take_str(&mut body)?;
            let headers = take_headers(&mut body)?;
            Head::Request(RequestHead {
                method,
                uri,
                headers,
            })
        }
        KIND_RESPONSE => {
            if body.remaining() < 2 {
                return Err(HeadError::Malformed("status"));
            }
            let status = body.get_u16();
            let headers = take_headers(&mut body)?;
            Head::Response(ResponseHead { status, headers })
        }
        other => return Err(HeadError::UnknownKind(other)),
    };
    if body.has_remaining() {
        return Err(HeadError::Malformed("trailing bytes"));
    }
    validate(&head)?;
    Ok(Some(head))
}

fn validate(head: &Head) -> Result<(), HeadError> {
    let headers = match head {
        Head::Request(r) => {
            let method_ok = !r.method.is_empty()
                && r.method.len() <= MAX_METHOD_LEN
                && r.method.bytes().all(|b| b.is_ascii_uppercase());
            if !method_ok {
                return Err(HeadError::Invalid("method"));
            }
            if r.uri.is_empty() || !r.uri.bytes().all(|b| (b'!'..=b'~').contains(&b)) {
                return Err(HeadError::Invalid("URI"));
            }
            &r.headers
        }
        Head::Response(r) => {
            if !(100..=999).contains(&r.status) {
                return Err(HeadError::Invalid("status"));
            }
            &r.headers
        }
    };
    if headers.len() > MAX_HEADERS {
        return Err(HeadError::TooManyHeaders(headers.len()));
    }
    for (name, value) in headers {
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(HeadError::Invalid("header name"));
        }
        if !value.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return Err(HeadError::Invalid("header value"));
        }
    }
    Ok(())
}

fn put_str(out: &mut BytesMut, s: &str) {
    // Lengths are bounded by MAX_HEAD_LEN once the whole body is checked.
    out.put_u16(s.len().min(u16::MAX as usize) as u16);
    out.extend_from_slice(&s.as_bytes()[..s.len().min(u16::MAX as usize)]);
}

fn take_u8(body: &mut bytes::Bytes) -> Result<u8, HeadError> {
    if !body.has_remaining() {
        return Err(HeadError::Malformed("empty"));
    }
    Ok(body.get_u8())
}

fn take_str(body: &mut bytes::Bytes) -> Result<String, HeadError> {
    if body.remaining() < 2 {
        return Err(HeadError::Malformed("string length"));
    }
    let len = body.get_u16() as usize;
    if body.remaining() < len {
        return Err(HeadError::Malformed("string"));
    }
    let bytes = body.split_to(len);
    String::from_utf8(bytes.to_vec()).map_err(|_| HeadError::Invalid("text"))
}

fn take_headers(body: &mut bytes::Bytes) -> Result<Vec<(String, String)>, HeadError> {
    let count = take_u8(body)? as usize;
    if count > MAX_HEADERS {
        return Err(HeadError::TooManyHeaders(count));
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name = take_str(body)?;
        let value = take_str(body)?;
        headers.push((name, value));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect() -> Head {
        Head::Request(RequestHead {
            method: "CONNECT".into(),
            uri: "10.0.0.5:10250".into(),
            headers: vec![("tether-client".into(), "apiserver 10.1.0.2".into())],
        })
    }

    #[test]
    fn request_and_response_round_trip_and_wait_for_the_whole_frame() {
        let refusal = Head::Response(ResponseHead {
            status: 403,
            headers: vec![("tether-reason".into(), "port 22 not allowed".into())],
        });
        for head in [connect(), refusal] {
            let mut buf = BytesMut::new();
            encode(&head, &mut buf).unwrap();
            buf.extend_from_slice(b"payload");
            let whole = buf.clone();
            for cut in 0..whole.len() - 7 {
                let mut part = BytesMut::from(&whole[..cut]);
                assert_eq!(decode(&mut part), Ok(None), "cut at {cut}");
            }
            assert_eq!(decode(&mut buf), Ok(Some(head)));
            assert_eq!(
                &buf[..],
                b"payload",
                "the stream's bytes are left untouched"
            );
        }
    }

    #[test]
    fn huge_length_prefix_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 1][..]);
        assert_eq!(decode(&mut buf), Err(HeadError::TooLong(0xffff)));
    }

    #[test]
    fn malformed_heads_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            &[0, 0],
            &[0, 1, 9],
            &[0, 3, 1, 0, 9],
            &[0, 4, 2, 0, 200, 1],
            &[0, 4, 2, 0, 200, 0xff],
            &[0, 5, 2, 0, 200, 0, 7],
        ];
        for case in cases {
            let mut buf = BytesMut::from(*case);
            assert!(decode(&mut buf).is_err(), "{case:?}");
        }
    }

    #[test]
    fn invalid_fields_are_refused_on_both_ends() {
        let bad = [
            ("connect", "a:1", "x", "y"),
            ("CONNECT", "a b:1", "x", "y"),
            ("CONNECT", "a:1", "X-Upper", "y"),
            ("CONNECT", "a:1", "x", "line\nbreak"),
        ];
        for (method, uri, name, value) in bad {
            let head = Head::Request(RequestHead {
                method: method.into(),
                uri: uri.into(),
                headers: vec![(name.into(), value.into())],
            });
            assert!(encode(&head, &mut BytesMut::new()).is_err(), "{head:?}");
        }
        let many = Head::Response(ResponseHead {
            status: 200,
            headers: vec![("a".into(), "b".into()); MAX_HEADERS + 1],
        });
        assert_eq!(
            encode(&many, &mut BytesMut::new()),
            Err(HeadError::TooManyHeaders(MAX_HEADERS + 1))
        );
    }
}
