//! The HTTP/1.1 CONNECT request head that kube-apiserver (or curl) sends to the
//! server's HTTP CONNECT frontend, and the few response heads we send back; and, in
//! [`response`], the client side an edge behind an HTTP egress proxy speaks.
//! Sans-io: the caller buffers bytes and calls again; nothing here reads a socket.

use crate::stream::sanitize_reason;
use crate::target::{Target, TargetError};

pub mod response;
pub use response::{
    connect_request, parse_connect_response, ConnectResponse, RequestError, ResponseError,
};

/// Default cap on the request head, in bytes. kube-apiserver sends well under
/// 1 KiB; 16 KiB matches common proxies and bounds what one slow client can pin.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 16 * 1024;

/// Default cap on header fields. It sizes the parser's header array, so it also
/// bounds the work done per parse attempt.
pub const DEFAULT_MAX_HEADERS: usize = 64;

/// Longest method name kept in [`ConnectError::MethodNotAllowed`], in bytes, so
/// an absurd method cannot bloat logs.
const MAX_METHOD_SHOWN: usize = 32;

/// The 200 response that tells the client the tunnel is open; tunneled bytes follow it.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Bounds on a CONNECT request head. These come from configuration (never from
/// a peer); validate them there, since `max_headers` sizes an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadLimits {
    /// Most bytes the head (request line, headers, blank line) may take.
    pub max_head_bytes: usize,
    /// Most header fields the head may carry.
    pub max_headers: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits {
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
        }
    }
}

/// A complete, validated CONNECT request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The request-target exactly as sent (authority-form `host:port`).
    pub authority: String,
    /// The parsed target, taken from the request line and never from `Host`.
    pub target: Target,
    /// The first `User-Agent` value, passed through [`sanitize_reason`] for logs.
    pub user_agent: Option<String>,
    /// Bytes of `buf` the head used. `buf[head_len..]` are tunneled bytes the
    /// client sent early and must be forwarded, not dropped.
    pub head_len: usize,
}

/// Why a CONNECT request head was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// No complete head within `max_head_bytes`.
    #[error("request head exceeds {limit} bytes")]
    HeadTooLarge {
        /// The configured byte limit.
        limit: usize,
    },
    /// More header fields than `max_headers`.
    #[error("more than {limit} header fields")]
    TooManyHeaders {
        /// The configured header limit.
        limit: usize,
    },
    /// A method other than `CONNECT` (matched case-sensitively, as HTTP requires).
    #[error("method `{0}` not allowed, only CONNECT")]
    MethodNotAllowed(String),
    /// The request-target is not a valid `host:port`.
    #[error("bad CONNECT target: {0}")]
    BadTarget(#[from] TargetError),
    /// Not a well-formed HTTP/1.x request head, or one we refuse to tunnel.
    #[error("malformed request head: {0}")]
    Malformed(String),
}

impl ConnectError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            ConnectError::HeadTooLarge { .. } | ConnectError::TooManyHeaders { .. } => 431,
            ConnectError::MethodNotAllowed(_) => 405,
            ConnectError::BadTarget(_) | ConnectError::Malformed(_) => 400,
        }
    }

    /// Snake-case metric label.
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::HeadTooLarge { .. } => "head_too_large",
            ConnectError::TooManyHeaders { .. } => "too_many_headers",
            ConnectError::MethodNotAllowed(_) => "method_not_allowed",
            ConnectError::BadTarget(_) => "bad_target",
            ConnectError::Malformed(_) => "malformed",
        }
    }
}

/// Parses a CONNECT request head from the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete and `buf` is shorter than
/// `max_head_bytes`: read more and call again with the whole buffer. Only the
/// first `max_head_bytes` bytes are ever examined. A wrong method or target is
/// reported as soon as the request line is complete, without waiting for headers.
pub fn parse_connect_head(
    buf: &[u8],
    limits: &HeadLimits,
) -> Result<Option<ConnectRequest>, ConnectError> {
    let window = &buf[..buf.len().min(limits.max_head_bytes)];
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(window) {
        Ok(httparse::Status::Complete(head_len)) => {
            let (authority, target) = check_request_line(&req)?
                .ok_or_else(|| ConnectError::Malformed("incomplete request line".to_owned()))?;
            check_head(&req)?;
            Ok(Some(ConnectRequest {
                authority,
                target,
                user_agent: header(&req, "user-agent")
                    .map(|v| sanitize_reason(&String::from_utf8_lossy(v))),
                head_len,
            }))
        }
        Ok(httparse::Status::Partial) => {
            check_request_line(&req)?;
            if buf.len() >= limits.max_head_bytes {
                Err(ConnectError::HeadTooLarge {
                    limit: limits.max_head_bytes,
                })
            } else {
                Ok(None)
            }
        }
        Err(httparse::Error::TooManyHeaders) => Err(ConnectError::TooManyHeaders {
            limit: limits.max_headers,
        }),
        Err(e) => Err(ConnectError::Malformed(e.to_string())),
    }
}

/// Checks whatever parts of the request line httparse has filled in so far.
/// Returns the authority and target once the request-target is known.
fn check_request_line(
    req: &httparse::Request<'_, '_>,
) -> Result<Option<(String, Target)>, ConnectError> {
    if let Some(method) = req.method {
        if method != "CONNECT" {
            // Methods are ASCII tokens, so any byte index is a char boundary.
            let shown = &method[..method.len().min(MAX_METHOD_SHOWN)];
            return Err(ConnectError::MethodNotAllowed(shown.to_owned()));
        }
    }
    let Some(path) = req.path else {
        return Ok(None);
    };
    let target = Target::parse(path)?;
    Ok(Some((path.to_owned(), target)))
}

/// Checks the version and headers of a complete head.
fn check_head(req: &httparse::Request<'_, '_>) -> Result<(), ConnectError> {
    match req.version {
        Some(0 | 1) => {}
        _ => {
            return Err(ConnectError::Malformed(
                "unsupported HTTP version".to_owned(),
            ))
        }
    }
    // A CONNECT request has no content. If one declared some, the bytes after
    // the head would be ambiguous (body or tunnel?), so refuse instead of guessing.
    if header(req, "transfer-encoding").is_some() {
        return Err(ConnectError::Malformed(
            "CONNECT with Transfer-Encoding".to_owned(),
        ));
    }
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0" {
            return Err(ConnectError::Malformed("CONNECT with a body".to_owned()));
        }
    }
    Ok(())
}

/// The value of the first header named `name` (ASCII case-insensitive).
fn header<'b>(req: &httparse::Request<'_, 'b>, name: &str) -> Option<&'b [u8]> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Builds a complete error response: status line, headers and a one-line
/// plain-text body. The reason line is also the status line's reason phrase
/// (`HTTP/1.1 502 no edge connected for 10.8.0.21:10250`), because
/// kube-apiserver drops a CONNECT answer's body and shows only its status line
/// to `kubectl`. `reason_line` goes through [`sanitize_reason`] (printable ASCII,
/// at most [`crate::stream::MAX_REASON_LEN`] bytes, which RFC 9112's reason-phrase
/// grammar allows), so it can never add a header or end the head early; an empty
/// one falls back to the standard phrase. Statuses outside 400..=599 are
/// sent as 500: this only builds refusals, and a 2xx would tell the client a
/// tunnel is open. 405 carries `Allow: CONNECT`.
pub fn response_head(status: u16, reason_line: &str) -> Vec<u8> {
    let status = if (400..=599).contains(&status) {
        status
    } else {
        500
    };
    let reason = sanitize_reason(reason_line);
    let reason = reason.trim();
    let phrase = if reason.is_empty() {
        reason_phrase(status)
    } else {
        reason
    };
    let body = format!("{reason}\n");
    let mut head = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n",
        body.len()
    );
    if status == 405 {
        head.push_str("Allow: CONNECT\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    head.push_str(&body);
    head.into_bytes()
}

/// The RFC 9110 reason phrase for the error statuses we send, used when there is
/// no reason line. The phrase is optional on the wire, so unknown codes get an
/// empty one.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests;
