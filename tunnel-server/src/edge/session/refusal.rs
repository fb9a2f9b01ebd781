//! Telling a revoked node why its session is refused. A TLS alert carries no text, so the
//! listener completes the TLS and HTTP/2 handshakes for a certificate that chains to the
//! tunnel CA but whose node is revoked, sends one request in place of session info (the
//! revocation time and the way back), and closes. The edge logs it and waits its maximum
//! backoff. Nothing of a session is built here: no route, no stream slot, no upstream, and
//! the handshake slots and deadline of the listener still apply.

use bytes::Bytes;
use http::{Method, Request};
use protocol::stream::{sanitize_reason, REASON_HEADER, REVOKED_AT_HEADER, SESSION_REFUSED_URI};
use protocol::NodeName;
use tokio::io::{AsyncRead, AsyncWrite};

/// A handshaken connection of a revoked node, to be told so and closed.
pub(crate) struct Revoked<T> {
    /// The node its certificate names.
    pub node: NodeName,
    /// When the node was revoked, Unix seconds.
    pub at: u64,
    /// The server's (client-role) handle on the connection.
    pub send_request: h2::client::SendRequest<Bytes>,
    /// The connection; polled here only, so the edge gets nothing but the refusal.
    pub connection: h2::client::Connection<T, Bytes>,
}

/// The text the edge logs: `node N revoked at RFC 3339; re-join with a new token`.
pub(crate) fn refusal_text(node: &NodeName, at: u64) -> String {
    format!(
        "node {node} revoked at {}; re-join with a new token",
        tunnel_io::check::rfc3339(i64::try_from(at).unwrap_or(i64::MAX))
    )
}

impl<T: AsyncRead + AsyncWrite + Unpin> Revoked<T> {
    /// Send the refusal, wait for the edge's answer, then close the connection (GOAWAY once
    /// the only sender is gone). The caller bounds the time with the handshake deadline.
    pub(crate) async fn refuse(self) -> Result<(), String> {
        let Revoked {
            node,
            at,
            send_request,
            mut connection,
        } = self;
        let request = Request::builder()
            .method(Method::POST)
            .uri(SESSION_REFUSED_URI)
            .header(REVOKED_AT_HEADER, at)
            .header(REASON_HEADER, sanitize_reason(&refusal_text(&node, at)))
            .body(())
            .map_err(|e| e.to_string())?;
        let ask = async move {
            let mut sender = send_request.ready().await.map_err(|e| e.to_string())?;
            let (response, _) = sender
                .send_request(request, true)
                .map_err(|e| e.to_string())?;
            response.await.map(|_| ()).map_err(|e| e.to_string())
        };
        let answered = tokio::select! {
            r = ask => r,
            r = &mut connection => Err(format!("connection ended before the answer: {r:?}")),
        };
        // Either side may close first; both end the connection.
        let _ = connection.await;
        answered
    }
}
