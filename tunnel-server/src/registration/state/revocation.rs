//! Node removal: the revocation file (`tunnel-server node revoke NAME` writes it; every
//! replica watches it), and the checks that follow from it. A node revoked at time T has every
//! certificate issued at or before T refused (session handshakes, renewals) and its live
//! sessions closed; a join for it is refused unless the token was created after T, so only
//! an operator's new token re-admits it.
//!
//! Time-based rather than serial-based: replicas issue certificates without talking to each
//! other, so there is no shared list of serials to revoke, but they share the clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use protocol::NodeName;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::files::{stamp, unix_now, write_json, FileStamp, StoreError};

/// How often replicas look at the revocation file: revocation takes effect within this.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The revocation file: node name → revocation time (Unix seconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationFile {
    /// Revoked nodes.
    #[serde(default)]
    pub nodes: BTreeMap<String, u64>,
}

fn read(path: &Path) -> Result<RevocationFile, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevocationFile::default()),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Operator command: revoke `node` now. Returns the revocation time.
pub fn revoke_node(path: &Path, node: &NodeName) -> Result<u64, StoreError> {
    let mut file = read(path)?;
    let now = unix_now();
    file.nodes.insert(node.as_str().to_owned(), now);
    write_json(path, &file)?;
    Ok(now)
}

/// The revoked nodes, as the running server sees them.
pub struct RevocationList {
    /// The file polled; `None` when a shared backend's watch feeds the list ([`RevocationList::replace`]).
    path: Option<PathBuf>,
    state: RwLock<(Option<FileStamp>, RevocationFile)>,
    /// Bumped whenever a refresh finds the file changed: what every live connection of a
    /// node waits on ([`until_revoked`]).
    changes: tokio::sync::watch::Sender<u64>,
}

impl RevocationList {
    /// Load the file (missing = nobody revoked).
    pub fn open(path: &Path) -> Result<RevocationList, StoreError> {
        let file = read(path)?;
        Ok(RevocationList {
            path: Some(path.to_owned()),
            state: RwLock::new((stamp(path), file)),
            changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// An empty list fed by a shared backend's watch rather than a file.
    pub fn in_memory() -> RevocationList {
        RevocationList {
            path: None,
            state: RwLock::new((None, RevocationFile::default())),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Replace the whole list (a shared backend's view after a sync or watch event);
    /// returns the nodes whose revocation is new or newer, and wakes [`until_revoked`].
    pub fn replace(&self, nodes: BTreeMap<String, u64>) -> Vec<String> {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let changed: Vec<String> = nodes
            .iter()
            .filter(|(node, at)| state.1.nodes.get(*node) != Some(at))
            .map(|(node, _)| node.clone())
            .collect();
        state.1.nodes = nodes;
        drop(state);
        if !changed.is_empty() {
            self.changes.send_modify(|generation| *generation += 1);
        }
        changed
    }

    /// Re-read the file if it changed; returns the nodes whose revocation is new or newer.
    /// An unreadable file is logged and the last good version kept.
    pub fn refresh(&self) -> Vec<String> {
        let Some(path) = &self.path else {
            return Vec::new();
        };
        let now = stamp(path);
        if self.state.read().unwrap_or_else(|p| p.into_inner()).0 == now {
            return Vec::new();
        }
        let fresh = match read(path) {
            Ok(f) => f,
            Err(error) => {
                warn!(%error, "revocation file unreadable; keeping the previous version");
                return Vec::new();
            }
        };
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let changed: Vec<String> = fresh
            .nodes
            .iter()
            .filter(|(node, at)| state.1.nodes.get(*node) != Some(at))
            .map(|(node, _)| node.clone())
            .collect();
        *state = (now, fresh);
        drop(state);
        if !changed.is_empty() {
            self.changes.send_modify(|generation| *generation += 1);
        }
        changed
    }

    /// Every revoked node and when, as last read.
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state.1.nodes.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// When `node` was revoked, if it was.
    pub fn revoked_at(&self, node: &NodeName) -> Option<u64> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state.1.nodes.get(node.as_str()).copied()
    }

    /// Whether a certificate of `node` issued at `issued_unix` is refused.
    pub fn certificate_revoked(&self, node: &NodeName, issued_unix: u64) -> bool {
        self.revoked_at(node).is_some_and(|at| issued_unix <= at)
    }

    /// Whether a certificate (DER) of `node` is refused; an unreadable issue time counts as
    /// revoked when the node is.
    pub fn der_revoked(&self, node: &NodeName, der: &[u8]) -> bool {
        match crate::pki::issued_unix(der) {
            Some(issued) => self.certificate_revoked(node, issued),
            None => self.revoked_at(node).is_some(),
        }
    }

    /// Whether a join of `node` with a token created at `token_created_unix` is refused.
    pub fn join_refused(&self, node: &NodeName, token_created_unix: u64) -> bool {
        self.revoked_at(node)
            .is_some_and(|at| token_created_unix <= at)
    }
}

/// Resolves once a certificate of `node` issued at `issued_unix` is revoked (`None`: once
/// the node is revoked at all); never without a revocation list. Every live connection of a
/// node waits on this, so revocation reaches what the route table no longer lists: replaced
/// sessions still draining and edge → cloud upstream connections.
pub async fn until_revoked(
    list: Option<Arc<RevocationList>>,
    node: NodeName,
    issued_unix: Option<u64>,
) {
    let Some(list) = list else {
        return std::future::pending().await;
    };
    let mut changes = list.changes.subscribe();
    loop {
        let revoked = match issued_unix {
            Some(issued) => list.certificate_revoked(&node, issued),
            None => list.revoked_at(&node).is_some(),
        };
        if revoked {
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// The edge listener's check: refuse a session whose certificate was issued before the
/// node's revocation. Re-reads the file if it changed, so a revocation is in force for the
/// very next handshake.
pub fn check_handshake(
    shared: &crate::Shared,
    node: &NodeName,
    der: &[u8],
) -> Result<(), (&'static str, String)> {
    match revoked_certificate(shared, node, der) {
        Some(at) => Err(("revoked", revoked_reason(node, at))),
        None => Ok(()),
    }
}

/// When `node` was revoked, if that revocation refuses its certificate `der` (re-reads the
/// file if it changed, like [`check_handshake`]).
pub fn revoked_certificate(shared: &crate::Shared, node: &NodeName, der: &[u8]) -> Option<u64> {
    let list = shared.revocations.as_ref()?;
    list.refresh();
    if !list.der_revoked(node, der) {
        return None;
    }
    // A node revoked since start-up has a time; fall back to 0 if the file lost it between
    // the two reads (the certificate is refused all the same).
    Some(list.revoked_at(node).unwrap_or(0))
}

/// The one line audit logs and the refused edge show: `node N is revoked (at RFC 3339)`.
pub fn revoked_reason(node: &NodeName, at: u64) -> String {
    format!(
        "node {node} is revoked (at {})",
        tunnel_io::check::rfc3339(i64::try_from(at).unwrap_or(i64::MAX))
    )
}

/// Poll the file until `cancel`; close the live sessions of every newly revoked node.
pub async fn watch(
    list: Arc<RevocationList>,
    shared: Arc<crate::Shared>,
    cancel: CancellationToken,
) {
    let mut seen = list.snapshot();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        // Diff against what this watcher saw last, not `refresh()`'s answer: a handshake may
        // have refreshed the list first, and its news must still close live sessions.
        list.refresh();
        let now = list.snapshot();
        let newly: Vec<String> = now
            .iter()
            .filter(|(node, at)| seen.get(*node) != Some(*at))
            .map(|(node, _)| node.clone())
            .collect();
        seen = now;
        close_revoked(&shared, newly);
    }
}

/// Close the live sessions of `newly` revoked nodes on this replica, with an audit line each.
pub fn close_revoked(shared: &crate::Shared, newly: Vec<String>) {
    for name in newly {
        let Ok(node) = NodeName::parse(&name) else {
            continue;
        };
        {
            match shared.routes.get(&node) {
                Some(session) => {
                    session.close();
                    info!(target: "audit", event = "node_revoked", node = %node, peer = %session.peer(), "node revoked: session closed");
                }
                None => {
                    info!(target: "audit", event = "node_revoked", node = %node, "node revoked")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_refuses_old_certificates_and_old_tokens_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.json");
        let list = RevocationList::open(&path).unwrap();
        let node = NodeName::parse("node-a").unwrap();
        let other = NodeName::parse("node-b").unwrap();
        assert!(!list.certificate_revoked(&node, 0));
        let at = revoke_node(&path, &node).unwrap();
        assert_eq!(list.refresh(), vec!["node-a".to_string()]);
        assert!(list.refresh().is_empty(), "no change, nothing new");
        assert!(list.certificate_revoked(&node, at));
        assert!(list.certificate_revoked(&node, at - 100));
        assert!(!list.certificate_revoked(&node, at + 1));
        assert!(!list.certificate_revoked(&other, at));
        assert!(list.join_refused(&node, at));
        assert!(!list.join_refused(&node, at + 1));
    }

    #[tokio::test]
    async fn until_revoked_wakes_on_the_revocation_of_its_node_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.json");
        let list = Arc::new(RevocationList::open(&path).unwrap());
        let node = NodeName::parse("node-a").unwrap();
        let issued = unix_now() - 10;
        let mut waiting = Box::pin(until_revoked(
            Some(list.clone()),
            node.clone(),
            Some(issued),
        ));
        let mut other = Box::pin(until_revoked(
            Some(list.clone()),
            NodeName::parse("node-b").unwrap(),
            Some(issued),
        ));
        let quiet = tokio::time::timeout(Duration::from_millis(50), &mut waiting).await;
        assert!(quiet.is_err(), "woke before any revocation");
        revoke_node(&path, &node).unwrap();
        list.refresh();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("woken by its node's revocation");
        let still = tokio::time::timeout(Duration::from_millis(50), &mut other).await;
        assert!(still.is_err(), "another node's connection was cut");
    }
}
