//! A session the server refused with a reason: today only a revoked node's. The server
//! completes the handshakes and sends one request on `/tether.v1/session-refused` with the
//! revocation time; the edge answers, logs at error level ("node N revoked at …; re-join
//! with a new token") and waits its maximum backoff before every later attempt, until its
//! certificate file changes (a re-join wrote a new one), so a fleet of removed nodes does
//! not hammer the servers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use protocol::stream::{parse_revoked_at, sanitize_reason, REASON_HEADER, REVOKED_AT_HEADER};

/// How long the edge keeps driving a refused connection so its answer reaches the server:
/// one round trip on a healthy link; a server that does not read by then is not waited for.
pub(crate) const REFUSAL_FLUSH: Duration = Duration::from_secs(1);

/// Why a session attempt ended without the session serving.
#[derive(Debug)]
pub(crate) enum SessionError {
    /// Connection, handshake or session failure: back off as usual.
    Failed(String),
    /// The server refused the node as revoked (at this time, Unix seconds, if it said).
    Revoked {
        /// Revocation time.
        at: Option<u64>,
        /// The server's own words, sanitized (shown when it gave no time).
        reason: String,
    },
}

impl From<String> for SessionError {
    fn from(reason: String) -> Self {
        SessionError::Failed(reason)
    }
}

impl From<&str> for SessionError {
    fn from(reason: &str) -> Self {
        SessionError::Failed(reason.to_owned())
    }
}

/// Answer the server's refusal (200, so it knows it was heard) and say what it was.
pub(crate) fn answer<B>(request: &Request<B>, mut respond: SendResponse<Bytes>) -> SessionError {
    let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
    let at = header(REVOKED_AT_HEADER).and_then(parse_revoked_at);
    let reason = header(REASON_HEADER)
        .map(sanitize_reason)
        .unwrap_or_else(|| "session refused by the server".to_owned());
    let mut ok = Response::new(());
    *ok.status_mut() = StatusCode::OK;
    // The server may already be gone; the refusal stands either way.
    let _ = respond.send_response(ok, true);
    SessionError::Revoked { at, reason }
}

/// The line the edge logs for a revocation.
pub(crate) fn message(node: &protocol::NodeName, at: Option<u64>, reason: &str) -> String {
    match at {
        Some(at) => format!(
            "node {node} revoked at {}; re-join with a new token",
            tunnel_io::check::rfc3339(i64::try_from(at).unwrap_or(i64::MAX))
        ),
        None => format!("{reason}; re-join with a new token"),
    }
}

/// The certificate file as it was when the server refused it: a different file (a re-join
/// wrote a new certificate) is worth an attempt at the normal pace again.
pub(crate) struct RefusedCertificate {
    path: Option<PathBuf>,
    bytes: Option<Vec<u8>>,
}

impl RefusedCertificate {
    /// Remember the certificate file at `path` as it is now.
    pub(crate) fn of(path: Option<&Path>) -> RefusedCertificate {
        RefusedCertificate {
            path: path.map(Path::to_owned),
            bytes: path.and_then(|p| std::fs::read(p).ok()),
        }
    }

    /// Whether the file now differs from the refused one (unreadable counts as unchanged:
    /// a half-written file is no reason to hurry).
    pub(crate) fn changed(&self) -> bool {
        match (&self.path, &self.bytes) {
            (Some(path), Some(before)) => std::fs::read(path).is_ok_and(|now| &now != before),
            (Some(path), None) => std::fs::read(path).is_ok(),
            (None, _) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_certificate_file_counts_as_a_change_and_the_same_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, "old").unwrap();
        let refused = RefusedCertificate::of(Some(&path));
        assert!(!refused.changed());
        std::fs::write(&path, "new").unwrap();
        assert!(refused.changed());
    }

    #[test]
    fn the_message_names_the_time_in_rfc3339() {
        let node = protocol::NodeName::parse("idc-a").unwrap();
        assert_eq!(
            message(&node, Some(0), "x"),
            "node idc-a revoked at 1970-01-01T00:00:00Z; re-join with a new token"
        );
    }
}
