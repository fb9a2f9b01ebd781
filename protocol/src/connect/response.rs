//! The client side of HTTP CONNECT, for an edge that must reach the load balancer through an
//! HTTP egress proxy: the request head the edge sends, and the proxy's response head it reads
//! back. Sans-io like the rest of the module: the caller reads bytes and calls again.
//!
//! The response parser reports how many bytes the head took, so a caller can hand anything
//! after it (the first bytes of the tunnel) on instead of dropping them.

use super::HeadLimits;
use crate::stream::sanitize_reason;

/// A proxy's complete answer to CONNECT: its status and where the tunnel starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectResponse {
    /// The status code. Any 2xx opens the tunnel (RFC 9110, 9.3.6).
    pub status: u16,
    /// `"<code> <reason>"` from the status line, passed through [`sanitize_reason`], for
    /// error messages (`407 Proxy Authentication Required`).
    pub status_line: String,
    /// Bytes of the buffer the head used; bytes after it belong to the tunnel.
    pub head_len: usize,
}

impl ConnectResponse {
    /// Whether the proxy opened the tunnel.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Why a proxy's response head was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// No complete head within `max_head_bytes`.
    #[error("response head exceeds {limit} bytes")]
    HeadTooLarge {
        /// The byte limit.
        limit: usize,
    },
    /// More header fields than `max_headers`.
    #[error("more than {limit} header fields in the response")]
    TooManyHeaders {
        /// The header limit.
        limit: usize,
    },
    /// Not a well-formed HTTP/1.x response head.
    #[error("malformed response head: {0}")]
    Malformed(String),
}

/// Why a CONNECT request head could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The authority or a header value holds a byte that would break the head (space,
    /// control character, non-ASCII): refused rather than sent, so configuration text can
    /// never add a header line.
    #[error("{0} holds a character not allowed in a request head")]
    BadCharacter(&'static str),
}

/// The CONNECT request head for `authority` (`host:port`, IPv6 in brackets), with a `Host`
/// header naming the same authority (RFC 9110 requires it) and `Proxy-Authorization` when
/// `proxy_authorization` is given (the whole value, such as `Basic dXNlcjpwYXNz`).
pub fn connect_request(
    authority: &str,
    proxy_authorization: Option<&str>,
) -> Result<Vec<u8>, RequestError> {
    let visible = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !visible(authority) {
        return Err(RequestError::BadCharacter("the CONNECT authority"));
    }
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(value) = proxy_authorization {
        if !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            return Err(RequestError::BadCharacter("the Proxy-Authorization value"));
        }
        head.push_str(&format!("Proxy-Authorization: {value}\r\n"));
    }
    head.push_str("\r\n");
    Ok(head.into_bytes())
}

/// Parses a proxy's response head from the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete and `buf` is shorter than
/// `max_head_bytes`: read more and call again with the whole buffer. Only the first
/// `max_head_bytes` bytes are examined. The body of a refusal is not read: the caller
/// drops the connection, and the status line says what happened.
pub fn parse_connect_response(
    buf: &[u8],
    limits: &HeadLimits,
) -> Result<Option<ConnectResponse>, ResponseError> {
    let window = &buf[..buf.len().min(limits.max_head_bytes)];
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(window) {
        Ok(httparse::Status::Complete(head_len)) => {
            let status = response
                .code
                .ok_or_else(|| ResponseError::Malformed("no status code".to_owned()))?;
            let reason = response.reason.unwrap_or("");
            Ok(Some(ConnectResponse {
                status,
                status_line: sanitize_reason(format!("{status} {reason}").trim_end()),
                head_len,
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            Err(ResponseError::HeadTooLarge {
                limit: limits.max_head_bytes,
            })
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(ResponseError::TooManyHeaders {
            limit: limits.max_headers,
        }),
        Err(e) => Err(ResponseError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINYPROXY_OK: &[u8] =
        b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n";

    fn parse(buf: &[u8]) -> Result<Option<ConnectResponse>, ResponseError> {
        parse_connect_response(buf, &HeadLimits::default())
    }

    #[test]
    fn request_names_the_authority_twice_and_carries_credentials() {
        let head = connect_request("lb.example:9000", None).unwrap();
        assert_eq!(
            head,
            b"CONNECT lb.example:9000 HTTP/1.1\r\nHost: lb.example:9000\r\n\r\n"
        );
        let head = connect_request("[fd00::1]:443", Some("Basic dTpw")).unwrap();
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "CONNECT [fd00::1]:443 HTTP/1.1\r\nHost: [fd00::1]:443\r\n\
             Proxy-Authorization: Basic dTpw\r\n\r\n"
        );
    }

    #[test]
    fn header_injection_through_the_authority_or_credentials_is_refused() {
        for authority in ["lb:1\r\nX-Evil: 1", "lb :1", "", "lb:1\n", "lé:1"] {
            assert!(connect_request(authority, None).is_err(), "{authority:?}");
        }
        assert!(connect_request("lb:1", Some("Basic x\r\nX-Evil: 1")).is_err());
    }

    #[test]
    fn success_is_any_2xx_and_the_head_length_is_exact() {
        let r = parse(TINYPROXY_OK).unwrap().unwrap();
        assert!(r.is_success());
        assert_eq!(r.status_line, "200 Connection established");
        assert_eq!(r.head_len, TINYPROXY_OK.len());
        let r = parse(b"HTTP/1.1 204\r\n\r\n").unwrap().unwrap();
        assert!(r.is_success());
        assert_eq!(r.status_line, "204");
    }

    #[test]
    fn refusals_keep_their_status_line() {
        let r = parse(
            b"HTTP/1.0 407 Proxy Authentication Required\r\n\
              Proxy-Authenticate: Basic realm=\"tinyproxy\"\r\nContent-Length: 5\r\n\r\nbody!",
        )
        .unwrap()
        .unwrap();
        assert!(!r.is_success());
        assert_eq!(r.status_line, "407 Proxy Authentication Required");
        let r = parse(b"HTTP/1.1 403 Access violation\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.status, r.status_line.as_str()),
            (403, "403 Access violation")
        );
        let r = parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!r.is_success(), "1xx does not open a CONNECT tunnel");
    }

    #[test]
    fn bytes_after_the_head_are_left_for_the_tunnel() {
        let mut buf = TINYPROXY_OK.to_vec();
        buf.extend_from_slice(b"\x16\x03\x03tls bytes");
        let r = parse(&buf).unwrap().unwrap();
        assert_eq!(&buf[r.head_len..], b"\x16\x03\x03tls bytes");
    }

    #[test]
    fn split_reads_agree_with_one_read() {
        let whole = parse(TINYPROXY_OK).unwrap().unwrap();
        for cut in 0..TINYPROXY_OK.len() {
            assert_eq!(parse(&TINYPROXY_OK[..cut]), Ok(None), "cut at {cut}");
        }
        // Fed one byte more at a time, the first complete parse is the whole head.
        let mut buf = Vec::new();
        let mut first = None;
        for b in TINYPROXY_OK {
            buf.push(*b);
            if let Some(r) = parse(&buf).unwrap() {
                first.get_or_insert(r);
            }
        }
        assert_eq!(first, Some(whole));
    }

    #[test]
    fn oversized_head_from_a_hostile_proxy_is_refused_at_the_limit() {
        let limits = HeadLimits {
            max_head_bytes: 64,
            max_headers: 64,
        };
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        while head.len() < 200 {
            head.extend_from_slice(b"X-Pad: aaaaaaaa\r\n");
        }
        assert_eq!(
            parse_connect_response(&head[..63], &limits),
            Ok(None),
            "still under the limit"
        );
        assert_eq!(
            parse_connect_response(&head, &limits),
            Err(ResponseError::HeadTooLarge { limit: 64 })
        );
        // A complete head that ends past the limit is refused too: only the window counts.
        head.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_connect_response(&head, &limits),
            Err(ResponseError::HeadTooLarge { limit: 64 })
        );
    }

    #[test]
    fn header_flood_and_garbage_are_errors() {
        let limits = HeadLimits {
            max_head_bytes: 4096,
            max_headers: 2,
        };
        let flood = b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(
            parse_connect_response(flood, &limits),
            Err(ResponseError::TooManyHeaders { limit: 2 })
        );
        assert!(matches!(
            parse(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
            Err(ResponseError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"\x16\x03\x01\x00\x05hello"),
            Err(ResponseError::Malformed(_))
        ));
    }

    #[test]
    fn status_line_is_sanitised_for_logs() {
        let r = parse(b"HTTP/1.1 502 bad\x1b[31m gateway\r\n\r\n");
        // httparse refuses control bytes in the reason phrase; if a future version
        // accepts them, they must not reach a log line.
        if let Ok(Some(r)) = r {
            assert!(r
                .status_line
                .bytes()
                .all(|b| b.is_ascii_graphic() || b == b' '));
        }
        let long = format!("HTTP/1.1 502 {}\r\n\r\n", "x".repeat(1000));
        let r = parse(long.as_bytes()).unwrap().unwrap();
        assert!(r.status_line.len() <= crate::stream::MAX_REASON_LEN);
    }
}
