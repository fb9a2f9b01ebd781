//! The part every frontend shares: policy check, route lookup, stream open, with metrics and
//! one failure type carrying the HTTP status and the one-line reason the client sees.

use std::sync::Arc;
use std::time::Instant;

use protocol::stream::DialFailure;
use protocol::Target;

use crate::edge::node_session::NodeSession;
use crate::edge::session::OpenStream;
use crate::Shared;

/// A refused or failed dial, ready to be answered.
#[derive(Debug, Clone)]
pub struct DialError {
    /// Classification (maps to the HTTP status and the metric label).
    pub failure: DialFailure,
    /// One line naming the target and the node, for the client and the audit log.
    pub reason: String,
}

impl DialError {
    /// The HTTP status a CONNECT client gets.
    pub fn status(&self) -> u16 {
        self.failure.status()
    }
}

/// A stream to the edge that owns the target.
pub struct Dialed {
    /// The stream.
    pub stream: OpenStream,
    /// The session it runs on (a Tether edge or a Konnectivity agent).
    pub session: Arc<NodeSession>,
}

/// Check, route and open. `frontend` labels metrics; `client` goes to the edge's audit log.
pub async fn dial(
    shared: &Shared,
    frontend: &'static str,
    target: &Target,
    client: &str,
) -> Result<Dialed, DialError> {
    let started = Instant::now();
    let result = dial_inner(shared, frontend, target, client).await;
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => e.failure.label(),
    };
    shared.metrics.dial(frontend, label);
    shared
        .metrics
        .dial_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn dial_inner(
    shared: &Shared,
    frontend: &'static str,
    target: &Target,
    client: &str,
) -> Result<Dialed, DialError> {
    shared.policy.check(target).map_err(|denial| DialError {
        failure: DialFailure::PolicyDenied,
        reason: format!("target {target} refused: {denial}"),
    })?;
    let timeout = shared.config.connect.dial_timeout;
    // One retry covers the instant where a node's new session replaces its old one.
    for _ in 0..2 {
        let session = shared
            .routes
            .lookup(&target.host)
            .ok_or_else(|| DialError {
                failure: DialFailure::NoRoute,
                reason: format!("no edge connected for {target}"),
            })?;
        // TESTPLAN 17: every stream open is authorized, not only the handshake. A session
        // whose certificate predates its node's revocation is closed and refused here, even
        // before the revocation watcher gets to it.
        if let (Some(list), Some(issued)) = (&shared.revocations, session.certificate_issued()) {
            list.refresh();
            use crate::edge::routing::Routable;
            if list.certificate_revoked(session.node(), issued) {
                session.close();
                return Err(DialError {
                    failure: DialFailure::NoRoute,
                    reason: format!("node {} for {target} is revoked", session.node()),
                });
            }
        }
        let opened = {
            let _pending = shared.metrics.dial_pending(frontend);
            session.open(target, client, timeout).await
        };
        match opened {
            Ok(stream) => return Ok(Dialed { stream, session }),
            Err(e) if e.retry => continue,
            Err(e) => {
                return Err(DialError {
                    failure: e.failure,
                    reason: format!(
                        "dial {target} via node {}: {}",
                        session_node(&session),
                        e.reason
                    ),
                })
            }
        }
    }
    Err(DialError {
        failure: DialFailure::Unreachable,
        reason: format!("node for {target} is reconnecting; retry"),
    })
}

fn session_node(session: &NodeSession) -> &str {
    use crate::edge::routing::Routable;
    session.node().as_str()
}
