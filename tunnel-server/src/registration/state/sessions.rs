//! Live sessions as the fleet sees them: which replica holds a session to which node. Each
//! replica records its own; with a shared backend every replica (and the operator) sees all,
//! and a dead replica's records vanish with its lease.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One edge session held by one replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveSession {
    /// The node.
    pub node: String,
    /// The replica holding the session (its ID).
    pub replica: String,
    /// The node's routable addresses.
    pub addresses: Vec<IpAddr>,
    /// When the session started, Unix seconds.
    pub since_unix: u64,
    /// `tcp` or `quic`.
    pub transport: String,
}

/// The sessions of this replica only: what the file backend, a single replica, can know.
#[derive(Debug, Default)]
pub struct LocalSessions {
    by_node: Mutex<BTreeMap<String, LiveSession>>,
}

impl LocalSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LiveSession>> {
        self.by_node.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record (or replace) the session of `session.node`.
    pub fn put(&self, session: LiveSession) {
        self.lock().insert(session.node.clone(), session);
    }

    /// Forget `node`'s session.
    pub fn remove(&self, node: &str) {
        self.lock().remove(node);
    }

    /// Every session, by node name.
    pub fn list(&self) -> Vec<LiveSession> {
        self.lock().values().cloned().collect()
    }
}
