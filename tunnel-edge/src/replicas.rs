//! Which replicas this edge holds sessions with. Each server announces its replica ID and
//! the replica count on a new session; the edge confirms the first session to a replica and
//! refuses a second one (a load balancer may land several sessions on one replica), and
//! grows or shrinks its set of session workers to the announced count. The same record
//! answers the admin listener's `/readyz` ([`Readiness`]) and feeds the per-replica gauges.

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use protocol::stream::DialFailure;
use tracing::info;

use crate::metrics::{EdgeMetrics, ReplicaLabels};
use crate::stream::refuse;

/// Which replicas this edge holds a session with, and how many the servers say exist.
pub(crate) struct Replicas {
    /// Session workers wanted: the announced replica count (1 until the first announcement).
    pub(crate) wanted: tokio::sync::watch::Sender<usize>,
    pub(crate) held: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// The replica count last announced; 0 before any.
    announced: std::sync::atomic::AtomicUsize,
    replica_gauges: Family<ReplicaLabels, Gauge>,
    announced_gauge: Gauge,
}

/// Whether this edge reaches every replica: `/readyz` answers 200 only then, because a
/// replica without a session to this node fails every dial to it that lands there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Replica IDs held, sorted.
    pub held: Vec<String>,
    /// Replicas the servers announce (0: no session has reached a server yet).
    pub announced: usize,
}

impl Readiness {
    /// At least one replica announced, and a session up to each.
    pub fn ready(&self) -> bool {
        self.announced > 0 && self.held.len() >= self.announced
    }
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const RULE: &str = "ready means a session up to every replica the servers announce";
        let held = match self.held.is_empty() {
            true => String::new(),
            false => format!(" ({})", self.held.join(", ")),
        };
        match (self.ready(), self.announced) {
            (true, n) => write!(f, "ready: sessions up to {n} of {n} replicas{held}"),
            (false, 0) => write!(f, "not ready: no session has reached a server yet; {RULE}"),
            (false, n) => write!(
                f,
                "not ready: sessions up to {} of {n} replicas{held}; {RULE}",
                self.held.len()
            ),
        }
    }
}

impl Replicas {
    /// No replica held or announced yet.
    pub(crate) fn new(metrics: &EdgeMetrics) -> Replicas {
        Replicas {
            wanted: tokio::sync::watch::channel(1usize).0,
            held: Default::default(),
            announced: Default::default(),
            replica_gauges: metrics.replica_sessions.clone(),
            announced_gauge: metrics.replicas_announced.clone(),
        }
    }

    /// What `/readyz` reports.
    pub(crate) fn readiness(&self) -> Readiness {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<String> = held.keys().cloned().collect();
        ids.sort();
        Readiness {
            held: ids,
            announced: self.announced.load(std::sync::atomic::Ordering::Acquire),
        }
    }

    /// Record that `worker` reached replica `id`; false if another worker holds it already.
    pub(crate) fn claim(&self, id: &str, worker: usize) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.get(id) {
            Some(w) if *w != worker => false,
            _ => {
                held.insert(id.to_owned(), worker);
                self.replica_gauges
                    .get_or_create(&ReplicaLabels {
                        replica: id.to_owned(),
                    })
                    .set(1);
                true
            }
        }
    }

    pub(crate) fn release(&self, id: &str, worker: usize) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(id) == Some(&worker) {
            held.remove(id);
            self.replica_gauges.remove(&ReplicaLabels {
                replica: id.to_owned(),
            });
        }
    }

    /// The servers say there are `count` replicas.
    fn announce(&self, count: usize) {
        self.announced
            .store(count, std::sync::atomic::Ordering::Release);
        self.announced_gauge.set(count as i64);
        self.wanted.send_if_modified(|wanted| {
            let changed = *wanted != count;
            *wanted = count;
            changed
        });
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
    replicas.announce(count);
    if let Ok(ok) = Response::builder().status(StatusCode::OK).body(()) {
        let _ = respond.send_response(ok, true);
    }
    Control::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_with_a_session_to_every_announced_replica() {
        let r = |held: &[&str], announced| Readiness {
            held: held.iter().map(|s| s.to_string()).collect(),
            announced,
        };
        assert!(!r(&[], 0).ready());
        assert!(r(&[], 0)
            .to_string()
            .contains("no session has reached a server yet"));
        assert!(!r(&["a"], 2).ready());
        assert!(r(&["a"], 2)
            .to_string()
            .starts_with("not ready: sessions up to 1 of 2 replicas (a);"));
        assert!(r(&["a", "b"], 2).ready());
        assert_eq!(
            r(&["a"], 1).to_string(),
            "ready: sessions up to 1 of 1 replicas (a)"
        );
    }
}
