//! The in-memory views the data path reads, kept current from etcd: the revocation list and
//! the identity registry. A full read of `revoked/` and `identities/` gives a revision; a
//! watch on the prefix from the next revision applies every change as it commits (within
//! milliseconds on a healthy cluster). A broken watch is re-established from the last
//! revision seen; a compacted one, and every [`RESYNC_INTERVAL`] regardless, starts again
//! from a full read. While etcd is unreachable the views keep the last state seen: handshakes
//! are checked against it (revocations made meanwhile cannot reach this replica anyway).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{EventType, GetOptions, TxnOp, WatchOptions};
use protocol::NodeName;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::EtcdState;
use crate::registration::state::decision::StateError;
use crate::registration::state::files::{unix_now, StoreError};
use crate::registration::state::identities::{Identities, IdentityStore, IssuedIdentity};

/// How often the views are rebuilt from a full read even when the watch reports nothing:
/// bounds how long a missed event (a bug, a proxy dropping a message) could go unnoticed.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// Pause before retrying after etcd did not answer: short, so a revocation made while this
/// replica was cut off arrives soon after it reconnects.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The identity registry as last read from etcd.
#[derive(Default)]
pub struct EtcdIdentities {
    view: RwLock<Identities>,
}

impl EtcdIdentities {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Identities> {
        self.view.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl IdentityStore for EtcdIdentities {
    fn get(&self, node: &NodeName) -> Option<IssuedIdentity> {
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        view.nodes.get(node.as_str()).cloned()
    }

    fn update(&self, _change: &mut dyn FnMut(&mut Identities) -> bool) -> Result<(), StoreError> {
        Err(StoreError::Invalid(
            "the etcd backend changes identities only inside join and renewal transactions".into(),
        ))
    }

    fn all(&self) -> Identities {
        let mut all = self.view.read().unwrap_or_else(|p| p.into_inner()).clone();
        all.prune(unix_now());
        all
    }
}

/// What the loop last applied.
struct Synced {
    revocations: BTreeMap<String, u64>,
    /// Revision of the last change applied: a watch resumes after it.
    revision: i64,
}

impl EtcdState {
    /// Keep the views current and close the sessions of newly revoked nodes, until `cancel`.
    pub async fn watch_views(&self, shared: Arc<crate::Shared>, cancel: CancellationToken) {
        let mut seen = self.revocations.snapshot();
        let mut synced: Option<Synced> = None;
        loop {
            let round = async {
                let state = match synced.take() {
                    Some(state) => state,
                    None => self.full_sync().await?,
                };
                self.follow(state, &shared, &mut seen).await
            };
            let ended = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                ended = round => ended,
            };
            let pause = match ended {
                // Resync due: start again from a full read at once.
                Ok(None) => false,
                Ok(Some(resume)) => {
                    synced = Some(resume);
                    true
                }
                // Counted by the failed operation itself (`sync` or `watch`).
                Err(error) => {
                    warn!(%error, "etcd unreachable; handshakes use the last state seen");
                    true
                }
            };
            if pause {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                }
            }
            self.apply_revocations(&shared, &mut seen);
        }
    }

    /// Close the sessions of nodes whose revocation this loop has not acted on yet.
    fn apply_revocations(&self, shared: &crate::Shared, seen: &mut BTreeMap<String, u64>) {
        let now = self.revocations.snapshot();
        let newly: Vec<String> = now
            .iter()
            .filter(|(node, at)| seen.get(*node) != Some(*at))
            .map(|(node, _)| node.clone())
            .collect();
        *seen = now;
        crate::revocation::close_revoked(shared, newly);
    }

    /// Read every revocation and identity at one revision and replace the views.
    async fn full_sync(&self) -> Result<Synced, StateError> {
        let (revocations, registry, revision) = self.read_views().await?;
        self.revocations.replace(revocations.clone());
        *self.identities.write() = registry;
        self.metrics().synced(0.0);
        Ok(Synced {
            revocations,
            revision,
        })
    }

    /// Every revocation (node → Unix s) and identity as of one revision, and that revision.
    pub async fn read_views(&self) -> Result<(BTreeMap<String, u64>, Identities, i64), StateError> {
        let (revoked, identities) = (self.keys.kind("revoked"), self.keys.kind("identities"));
        let txn = etcd_client::Txn::new().and_then(vec![
            TxnOp::get(revoked.as_bytes(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(identities.as_bytes(), Some(GetOptions::new().with_prefix())),
        ]);
        let response = self
            .run("sync", |mut c| async move { c.txn(txn).await })
            .await?;
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        let answers = response.op_responses();
        let kvs = |i: usize| match answers.get(i) {
            Some(etcd_client::TxnOpResponse::Get(get)) => get.kvs().to_vec(),
            _ => Vec::new(),
        };
        let mut revocations = BTreeMap::new();
        for kv in kvs(0) {
            if let (Some(node), Some(at)) = (
                self.keys.name_in("revoked", kv.key()),
                parse_number(kv.value()),
            ) {
                revocations.insert(node.to_owned(), at);
            }
        }
        let mut registry = Identities::default();
        for kv in kvs(1) {
            if let Some(node) = self.keys.name_in("identities", kv.key()) {
                match serde_json::from_slice::<IssuedIdentity>(kv.value()) {
                    Ok(identity) => {
                        registry.nodes.insert(node.to_owned(), identity);
                    }
                    Err(error) => warn!(node, %error, "etcd: unreadable identity record skipped"),
                }
            }
        }
        Ok((revocations, registry, revision))
    }

    /// Seconds between the newest revocation in `message` and now: how late a change
    /// reached this replica (whole seconds: revocation times are).
    fn watch_lag(&self, message: &etcd_client::WatchResponse) -> f64 {
        let newest = message
            .events()
            .iter()
            .filter_map(|e| e.kv())
            .filter(|kv| self.keys.name_in("revoked", kv.key()).is_some())
            .filter_map(|kv| parse_number(kv.value()))
            .max();
        match newest {
            Some(at) => unix_now().saturating_sub(at) as f64,
            None => 0.0,
        }
    }

    /// Apply watch events from `state.revision + 1` until the watch breaks (`Err`, or `Ok`
    /// with where to resume) or a resync is due (`Ok(None)`).
    async fn follow(
        &self,
        mut state: Synced,
        shared: &crate::Shared,
        seen: &mut BTreeMap<String, u64>,
    ) -> Result<Option<Synced>, StateError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(state.revision + 1);
        let prefix = self.keys.prefix().to_owned();
        let (_watcher, mut stream) = self
            .run("watch", |mut c| async move {
                c.watch(prefix, Some(options)).await
            })
            .await?;
        let deadline = tokio::time::Instant::now() + RESYNC_INTERVAL;
        loop {
            let message = match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => return Ok(None),
                Ok(Ok(Some(message))) => message,
                Ok(Ok(None)) => {
                    self.metrics().watch_error();
                    return Ok(Some(state));
                }
                Ok(Err(error)) => {
                    self.metrics().watch_error();
                    warn!(%error, "etcd watch broke; resuming from the last revision");
                    return Ok(Some(state));
                }
            };
            if message.compact_revision() > 0 || message.canceled() {
                info!(
                    reason = message.cancel_reason(),
                    "etcd watch cancelled; full resync"
                );
                return Ok(None);
            }
            let mut changed = false;
            for event in message.events() {
                let Some(kv) = event.kv() else { continue };
                state.revision = state.revision.max(kv.mod_revision());
                let put = event.event_type() == EventType::Put;
                if let Some(node) = self.keys.name_in("revoked", kv.key()) {
                    match (put, parse_number(kv.value())) {
                        (true, Some(at)) => state.revocations.insert(node.to_owned(), at),
                        _ => state.revocations.remove(node),
                    };
                    changed = true;
                } else if let Some(node) = self.keys.name_in("identities", kv.key()) {
                    let mut view = self.identities.write();
                    match serde_json::from_slice::<IssuedIdentity>(kv.value()) {
                        Ok(identity) if put => {
                            view.nodes.insert(node.to_owned(), identity);
                        }
                        _ => {
                            view.nodes.remove(node);
                        }
                    }
                }
            }
            if let Some(header) = message.header() {
                state.revision = state.revision.max(header.revision());
            }
            if changed {
                self.revocations.replace(state.revocations.clone());
                self.apply_revocations(shared, seen);
            }
            self.metrics().synced(self.watch_lag(&message));
        }
    }
}

fn parse_number(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}
