//! Metadata carried in HTTP/2 headers when the server opens a tunneled stream on
//! an edge: header names, why a dial failed and how that maps to a status code.
//! Owns the failure vocabulary and text sanitising; it does not open streams.

use std::fmt;

/// Response header (edge → server) with a one-line human reason when a dial
/// fails. Always pass the text through [`sanitize_reason`] first.
pub const REASON_HEADER: &str = "tether-reason";

/// Request header (server → edge) naming who asked for the stream, for the
/// edge's audit log. Informational only: the edge never authorises by it.
pub const CLIENT_HEADER: &str = "tether-client";

/// Longest reason text in bytes, so a peer cannot bloat headers, response
/// bodies or log lines with it.
pub const MAX_REASON_LEN: usize = 200;

/// Why an edge could not open a tunneled stream to its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DialFailure {
    /// The edge's own allowlist refused the target.
    PolicyDenied,
    /// The target actively refused the connection (RST).
    Refused,
    /// The local dial did not complete in time.
    Timeout,
    /// The target host or network is unreachable.
    Unreachable,
    /// Nothing routes the target: no edge owns it, or the edge does not know it.
    NoRoute,
    /// Too many streams in flight; retry later.
    Overloaded,
    /// A bug or unexpected local error on the edge.
    Internal,
    /// The server's classification of an edge's [`DialFailure::PolicyDenied`] answer: the
    /// server allowed the target but the node's own allowlist did not, so the CONNECT client
    /// gets 502 (the node refused), keeping 403 for the server's own policy.
    EdgeDenied,
}

impl DialFailure {
    /// Every variant, for pre-registering metric labels and for tests.
    pub const ALL: [DialFailure; 8] = [
        DialFailure::PolicyDenied,
        DialFailure::Refused,
        DialFailure::Timeout,
        DialFailure::Unreachable,
        DialFailure::NoRoute,
        DialFailure::Overloaded,
        DialFailure::Internal,
        DialFailure::EdgeDenied,
    ];

    /// HTTP status the edge answers the stream open with, and the server
    /// relays to the CONNECT client.
    pub fn status(self) -> u16 {
        match self {
            DialFailure::PolicyDenied => 403,
            DialFailure::Refused => 502,
            DialFailure::Timeout => 504,
            DialFailure::Unreachable => 502,
            DialFailure::NoRoute => 502,
            DialFailure::Overloaded => 503,
            DialFailure::Internal => 500,
            DialFailure::EdgeDenied => 502,
        }
    }

    /// Snake-case metric label, stable across releases.
    pub fn label(self) -> &'static str {
        match self {
            DialFailure::PolicyDenied => "policy_denied",
            DialFailure::Refused => "refused",
            DialFailure::Timeout => "timeout",
            DialFailure::Unreachable => "unreachable",
            DialFailure::NoRoute => "no_route",
            DialFailure::Overloaded => "overloaded",
            DialFailure::Internal => "internal",
            DialFailure::EdgeDenied => "edge_denied",
        }
    }

    /// Reads a failure back from a status. 502 is shared by three variants and
    /// reads as [`DialFailure::Refused`], the generic "dial failed"; the
    /// [`REASON_HEADER`] text carries the detail. Success and unknown codes give `None`.
    pub fn from_status(status: u16) -> Option<DialFailure> {
        match status {
            403 => Some(DialFailure::PolicyDenied),
            502 => Some(DialFailure::Refused),
            503 => Some(DialFailure::Overloaded),
            504 => Some(DialFailure::Timeout),
            500 => Some(DialFailure::Internal),
            _ => None,
        }
    }
}

impl fmt::Display for DialFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DialFailure::PolicyDenied => "denied by edge policy",
            DialFailure::Refused => "connection refused",
            DialFailure::Timeout => "dial timed out",
            DialFailure::Unreachable => "target unreachable",
            DialFailure::NoRoute => "no route to target",
            DialFailure::Overloaded => "edge overloaded",
            DialFailure::Internal => "internal error",
            DialFailure::EdgeDenied => "denied by the node's allowlist",
        })
    }
}

/// Makes text safe for a header value or a response body line: printable ASCII
/// only, at most [`MAX_REASON_LEN`] bytes. CR, LF and tab become spaces (so a
/// multi-line error stays readable on one line); every other character,
/// including all non-ASCII, becomes `?`.
pub fn sanitize_reason(s: &str) -> String {
    s.chars()
        .take(MAX_REASON_LEN)
        .map(|c| match c {
            ' '..='~' => c,
            '\t' | '\r' | '\n' => ' ',
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn statuses_and_labels() {
        let table = [
            (DialFailure::PolicyDenied, 403, "policy_denied"),
            (DialFailure::Refused, 502, "refused"),
            (DialFailure::Timeout, 504, "timeout"),
            (DialFailure::Unreachable, 502, "unreachable"),
            (DialFailure::NoRoute, 502, "no_route"),
            (DialFailure::Overloaded, 503, "overloaded"),
            (DialFailure::Internal, 500, "internal"),
            (DialFailure::EdgeDenied, 502, "edge_denied"),
        ];
        assert_eq!(table.len(), DialFailure::ALL.len());
        for (failure, status, label) in table {
            assert_eq!(failure.status(), status);
            assert_eq!(failure.label(), label);
        }
    }

    #[test]
    fn from_status_inverts_where_unambiguous() {
        for failure in DialFailure::ALL {
            let back = DialFailure::from_status(failure.status()).unwrap();
            assert_eq!(back.status(), failure.status());
        }
        assert_eq!(
            DialFailure::from_status(403),
            Some(DialFailure::PolicyDenied)
        );
        assert_eq!(DialFailure::from_status(502), Some(DialFailure::Refused));
        assert_eq!(DialFailure::from_status(503), Some(DialFailure::Overloaded));
        assert_eq!(DialFailure::from_status(504), Some(DialFailure::Timeout));
        assert_eq!(DialFailure::from_status(500), Some(DialFailure::Internal));
        for status in [0, 200, 400, 404, 501, 599, 65535] {
            assert_eq!(DialFailure::from_status(status), None, "{status}");
        }
    }

    #[test]
    fn labels_are_snake_case_and_unique() {
        let mut labels: Vec<_> = DialFailure::ALL.iter().map(|f| f.label()).collect();
        assert!(labels
            .iter()
            .all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), DialFailure::ALL.len());
    }

    #[test]
    fn header_names_are_valid_lowercase_h2_names() {
        for name in [REASON_HEADER, CLIENT_HEADER] {
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'));
        }
    }

    #[test]
    fn sanitize_keeps_plain_text() {
        assert_eq!(
            sanitize_reason("connect 10.0.0.1:10250: connection refused"),
            "connect 10.0.0.1:10250: connection refused"
        );
        assert_eq!(sanitize_reason(""), "");
    }

    #[test]
    fn sanitize_defeats_header_injection() {
        let evil = "denied\r\nSet-Cookie: x=1\r\n\r\nHTTP/1.1 200 OK";
        let clean = sanitize_reason(evil);
        assert!(!clean.contains(['\r', '\n']));
        assert_eq!(clean, "denied  Set-Cookie: x=1    HTTP/1.1 200 OK");
    }

    #[test]
    fn sanitize_replaces_control_and_non_ascii() {
        assert_eq!(sanitize_reason("a\0b\x1b[31mc\x7f"), "a?b?[31mc?");
        assert_eq!(sanitize_reason("nöde 🚀"), "n?de ?");
    }

    #[test]
    fn sanitize_truncates() {
        assert_eq!(sanitize_reason(&"x".repeat(10_000)).len(), MAX_REASON_LEN);
        assert_eq!(sanitize_reason(&"é".repeat(10_000)).len(), MAX_REASON_LEN);
        assert_eq!(
            sanitize_reason(&"x".repeat(MAX_REASON_LEN)).len(),
            MAX_REASON_LEN
        );
    }

    proptest! {
        #[test]
        fn sanitized_is_one_short_printable_line(s in any::<String>()) {
            let clean = sanitize_reason(&s);
            prop_assert!(clean.len() <= MAX_REASON_LEN);
            prop_assert!(clean.bytes().all(|b| (b' '..=b'~').contains(&b)));
            prop_assert_eq!(sanitize_reason(&clean), clean.clone());
        }
    }
}

/// Path of the session-info request the server sends on a new edge session (and again when
/// the replica count changes). It is the only non-CONNECT request an edge accepts.
pub const SESSION_INFO_PATH: &str = "/tether.v1/session-info";
/// Full URI of the session-info request (h2 needs a scheme and authority on non-CONNECT).
pub const SESSION_INFO_URI: &str = "https://tether/tether.v1/session-info";
/// Header of the session-info request: the replica's stable ID.
pub const SERVER_ID_HEADER: &str = "tether-server-id";
/// Header of the session-info request: how many replicas serve this cluster.
pub const SERVER_COUNT_HEADER: &str = "tether-server-count";
/// Largest replica count an edge believes (bounds the sessions it opens).
pub const MAX_SERVER_COUNT: usize = 64;

/// Path of the refusal the server sends instead of session info when the edge's certificate
/// belongs to a revoked node. A TLS alert cannot carry text, so the server completes the
/// handshakes and says why here; the edge logs it and waits its maximum backoff before the
/// next attempt. Nothing else is ever sent on such a session.
pub const SESSION_REFUSED_PATH: &str = "/tether.v1/session-refused";
/// Full URI of the session-refused request.
pub const SESSION_REFUSED_URI: &str = "https://tether/tether.v1/session-refused";
/// Header of the session-refused request: when the node was revoked, Unix seconds (the
/// edge prints it as RFC 3339).
pub const REVOKED_AT_HEADER: &str = "tether-revoked-at";

/// Parse a `tether-revoked-at` value: Unix seconds, no sign, at most 12 digits (year 33658)
/// so a peer's value always fits the date arithmetic that prints it.
pub fn parse_revoked_at(value: &str) -> Option<u64> {
    if value.is_empty() || value.len() > 12 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Parse a `tether-server-count` value: 1..=[`MAX_SERVER_COUNT`].
pub fn parse_server_count(value: &str) -> Option<usize> {
    let n: usize = value.parse().ok()?;
    (1..=MAX_SERVER_COUNT).contains(&n).then_some(n)
}

/// Whether a replica ID is acceptable: 1..=64 bytes of `[A-Za-z0-9._-]`.
pub fn valid_server_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod session_info_tests {
    use super::*;

    #[test]
    fn server_count_is_bounded() {
        assert_eq!(parse_server_count("3"), Some(3));
        assert_eq!(parse_server_count("0"), None);
        assert_eq!(parse_server_count("65"), None);
        assert_eq!(parse_server_count("-1"), None);
        assert_eq!(parse_server_count("99999999999999999999999"), None);
    }

    #[test]
    fn revoked_at_is_plain_bounded_seconds() {
        assert_eq!(parse_revoked_at("1796000000"), Some(1_796_000_000));
        assert_eq!(parse_revoked_at(""), None);
        assert_eq!(parse_revoked_at("-1"), None);
        assert_eq!(parse_revoked_at("+5"), None);
        assert_eq!(parse_revoked_at("1e9"), None);
        assert_eq!(parse_revoked_at("9999999999999"), None);
    }

    #[test]
    fn server_ids_are_plain_tokens() {
        assert!(valid_server_id("tether-server-7c9d5-x2x"));
        assert!(!valid_server_id(""));
        assert!(!valid_server_id("a b"));
        assert!(!valid_server_id("a\r\nb"));
        assert!(!valid_server_id(&"a".repeat(65)));
    }
}

/// Header of a tunneled stream's CONNECT when its session has lanes: a number naming the
/// stream, unique per server, by which a lane stream says which stream it continues.
pub const STREAM_ID_HEADER: &str = "tether-stream";
/// Path of a lane stream: the rest of the stream named by its [`STREAM_ID_HEADER`] (a POST
/// on a lane connection, ALPN `tether-lane/1`; the edge answers 200 once it moves its side).
pub const LANE_PATH: &str = "/tether.v1/lane";
/// Full URI of a lane stream.
pub const LANE_URI: &str = "https://tether/tether.v1/lane";
/// Trailer that ends one direction of a stream whose rest goes on its lane stream: the
/// receiver reads the lane stream from here on, so the bytes stay in order.
pub const MOVED_TRAILER: &str = "tether-moved";

/// Parse a [`STREAM_ID_HEADER`] value: decimal, at most 20 digits, fits a `u64`.
pub fn parse_stream_id(value: &str) -> Option<u64> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}
