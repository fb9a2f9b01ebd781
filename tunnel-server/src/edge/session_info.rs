//! The session-info exchange: right after the HTTP/2 handshake the server tells the edge
//! its replica ID and the replica count, and routes the session only once the edge has
//! confirmed it (an edge refuses a second session to a replica it already holds). Count
//! changes are announced again on every live session.

use std::time::Duration;

use http::{Method, Request, StatusCode};
use protocol::stream::{sanitize_reason, REASON_HEADER};

use crate::edge::session::EdgeSession;
use crate::Shared;

/// Tell the edge which replica this is and how many replicas there are. The edge answers
/// 200, or refuses a session to a replica it already holds (through a load balancer, a
/// second session may land on the same replica).
pub(crate) async fn announce_once(
    session: &EdgeSession,
    shared: &Shared,
    count: usize,
) -> Result<(), String> {
    use protocol::stream::{SERVER_COUNT_HEADER, SERVER_ID_HEADER, SESSION_INFO_URI};
    let sender = session
        .sender_slot()
        .clone()
        .ok_or_else(|| "session retired".to_string())?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(SESSION_INFO_URI)
        .header(SERVER_ID_HEADER, shared.replica.id.as_str())
        .header(SERVER_COUNT_HEADER, count)
        .body(())
        .map_err(|e| e.to_string())?;
    let mut sender = sender.ready().await.map_err(|e| e.to_string())?;
    let (response, _) = sender
        .send_request(request, true)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    if response.status() != StatusCode::OK {
        let reason = response
            .headers()
            .get(REASON_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(sanitize_reason)
            .unwrap_or_default();
        return Err(format!("edge answered {}: {reason}", response.status()));
    }
    Ok(())
}

/// Re-announce whenever the replica count changes. Resolves only if the edge stops
/// acknowledging.
pub(crate) async fn announce_changes(session: &EdgeSession, shared: &Shared) -> String {
    let mut counts = shared.replica.subscribe();
    loop {
        if counts.changed().await.is_err() || session.retired.is_cancelled() {
            return std::future::pending().await;
        }
        let count = *counts.borrow_and_update();
        match tokio::time::timeout(
            Duration::from_secs(10),
            announce_once(session, shared, count),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return format!("session info refused: {e}"),
            Err(_) => return "edge did not acknowledge session info within 10 s".into(),
        }
    }
}
