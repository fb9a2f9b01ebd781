//! Which replicas this edge holds sessions with. Each server announces its replica ID and
//! the replica count on a new session; the edge confirms the first session to a replica and
//! refuses a second one (a load balancer may land several sessions on one replica), and
//! grows or shrinks its set of session workers to the announced count.

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use protocol::stream::DialFailure;
use tracing::info;

use crate::stream::refuse;

/// Which replicas this edge holds a session with, and how many the servers say exist.
pub(crate) struct Replicas {
    pub(crate) wanted: tokio::sync::watch::Sender<usize>,
    pub(crate) held: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl Replicas {
    /// Record that `worker` reached replica `id`; false if another worker holds it already.
    pub(crate) fn claim(&self, id: &str, worker: usize) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.get(id) {
            Some(w) if *w != worker => false,
            _ => {
                held.insert(id.to_owned(), worker);
                true
            }
        }
    }

    pub(crate) fn release(&self, id: &str, worker: usize) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(id) == Some(&worker) {
            held.remove(id);
        }
    }
}

/// What a session worker learns from the server's session-info request.
pub(crate) enum Control {
    /// Keep serving.
    Continue,
    /// This replica is already held by another session: close this one.
    Duplicate(String),
}

/// Handle the server's session-info request: note the replica and the replica count.
pub(crate) fn session_info(
    request: &Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    index: usize,
    replicas: &Replicas,
    replica: &mut Option<String>,
) -> Control {
    use protocol::stream::{
        parse_server_count, valid_server_id, SERVER_COUNT_HEADER, SERVER_ID_HEADER,
    };
    let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
    let id = header(SERVER_ID_HEADER).filter(|id| valid_server_id(id));
    let count = header(SERVER_COUNT_HEADER).and_then(parse_server_count);
    let (Some(id), Some(count)) = (id, count) else {
        refuse(respond, DialFailure::PolicyDenied, "malformed session info");
        return Control::Continue;
    };
    if replica.as_deref() != Some(id) {
        if !replicas.claim(id, index) {
            refuse(
                respond,
                DialFailure::Overloaded,
                "duplicate session to this replica",
            );
            return Control::Duplicate(id.to_owned());
        }
        if let Some(old) = replica.replace(id.to_owned()) {
            replicas.release(&old, index);
        }
        info!(replica = id, replicas = count, "session belongs to replica");
    }
    replicas.wanted.send_if_modified(|wanted| {
        let changed = *wanted != count;
        *wanted = count;
        changed
    });
    if let Ok(ok) = Response::builder().status(StatusCode::OK).body(()) {
        let _ = respond.send_response(ok, true);
    }
    Control::Continue
}
