//! Pruning: records that can no longer decide anything are deleted, so etcd does not grow
//! with every join ever made. A `keys/` record whose time passed (the certificate and the
//! token it was issued under have both expired) cannot refuse a replay any more: the token
//! refuses it. The `uses/` count of an expired token cannot admit or refuse anyone either.
//!
//! One replica per interval does the pass: the one that creates the `janitor` key, under a
//! lease of one interval, while it is absent. Even so every delete compares the mod revision
//! it read, so a record rewritten meanwhile (a renewal remembering its key again) stays, and
//! two replicas pruning at once (a lease expiring mid-pass) only waste a read.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, TxnOp};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::EtcdState;
use crate::registration::state::decision::StateError;
use crate::registration::state::files::unix_now;
use crate::registration::state::tokens::TokenRecord;

/// Most records one pass deletes: a pass is a few transactions, never a storm of writes on
/// the cluster's etcd; a backlog larger than this goes over the next passes.
pub const MAX_DELETES_PER_PASS: usize = 1000;
/// Keys read per range request while looking for expired records (each ~150 bytes: ~150 KB).
const PAGE: i64 = 1000;
/// Most pages one pass reads: bounds a pass over a huge `keys/` to 100k records.
const MAX_PAGES: usize = 100;
/// Deletes per transaction, each with its compare: well under etcd's default
/// `--max-txn-ops` of 128.
const DELETES_PER_TXN: usize = 50;

/// What one pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Expired certified-key records.
    pub keys: usize,
    /// Use counts of expired tokens.
    pub uses: usize,
}

impl EtcdState {
    /// Every `state.prune_interval`, take the janitor key and prune, until `cancel`.
    pub async fn prune_expired(&self, replica: String, cancel: CancellationToken) {
        let interval = self.config.prune_interval;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            match self.take_janitor(&replica, interval).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => {
                    debug!(%error, "etcd unreachable; no pruning this interval");
                    continue;
                }
            }
            match self.prune_once(unix_now()).await {
                Ok(pruned) if pruned != Pruned::default() => info!(
                    keys = pruned.keys,
                    uses = pruned.uses,
                    "pruned expired state records"
                ),
                Ok(_) => {}
                Err(error) => warn!(%error, "pruning stopped; the next pass goes on"),
            }
        }
    }

    /// Create the janitor key for `interval` if no replica holds it: `Ok(true)` when this
    /// replica does the pass of this interval.
    async fn take_janitor(&self, replica: &str, interval: Duration) -> Result<bool, StateError> {
        let key = self.keys.janitor();
        let held = self
            .run("janitor", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        if !held.kvs().is_empty() {
            return Ok(false);
        }
        let ttl = i64::try_from(interval.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = self
            .run(
                "janitor",
                |mut c| async move { c.lease_grant(ttl, None).await },
            )
            .await?
            .id();
        let txn = etcd_client::Txn::new()
            .when(vec![Compare::version(key.as_bytes(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(
                key.as_bytes(),
                replica.as_bytes(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let taken = self
            .run("janitor", |mut c| async move { c.txn(txn).await })
            .await?
            .succeeded();
        if !taken {
            // Another replica won the race; its lease rules this interval.
            let _ = self
                .run(
                    "janitor",
                    |mut c| async move { c.lease_revoke(lease).await },
                )
                .await;
        }
        Ok(taken)
    }

    /// One pass at `now`: expired `keys/` records, then the `uses/` of expired tokens, at
    /// most [`MAX_DELETES_PER_PASS`] in all.
    pub async fn prune_once(&self, now: u64) -> Result<Pruned, StateError> {
        let keys = self.expired_keys(now).await?;
        let pruned_keys = self.delete_unchanged(&keys).await?;
        let room = MAX_DELETES_PER_PASS.saturating_sub(keys.len());
        let uses = self.expired_uses(now, room).await?;
        let pruned_uses = self.delete_unchanged(&uses).await?;
        Ok(Pruned {
            keys: pruned_keys,
            uses: pruned_uses,
        })
    }

    /// `(key, mod revision)` of `keys/` records whose time is at or before `now`.
    async fn expired_keys(&self, now: u64) -> Result<Vec<(String, i64)>, StateError> {
        let prefix = self.keys.kind("keys");
        let mut from = prefix.clone().into_bytes();
        let range_end = prefix_end(prefix.as_bytes());
        let mut expired = Vec::new();
        for _ in 0..MAX_PAGES {
            let options = GetOptions::new()
                .with_range(range_end.clone())
                .with_limit(PAGE);
            let start = from.clone();
            let page = self
                .run(
                    "prune",
                    |mut c| async move { c.get(start, Some(options)).await },
                )
                .await?;
            for kv in page.kvs() {
                let until = std::str::from_utf8(kv.value())
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                // An unreadable record never decides a join as "certified": it goes too.
                if until.is_none_or(|until| until <= now) {
                    expired.push((
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.mod_revision(),
                    ));
                    if expired.len() >= MAX_DELETES_PER_PASS {
                        return Ok(expired);
                    }
                }
            }
            match (page.more(), page.kvs().last()) {
                (true, Some(last)) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(expired)
    }

    /// `(key, mod revision)` of the `uses/` counts of tokens expired at `now`, at most `room`.
    async fn expired_uses(&self, now: u64, room: usize) -> Result<Vec<(String, i64)>, StateError> {
        if room == 0 {
            return Ok(Vec::new());
        }
        let (tokens, uses) = (self.keys.kind("tokens"), self.keys.kind("uses"));
        let txn = etcd_client::Txn::new().and_then(vec![
            TxnOp::get(tokens.as_bytes(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(uses.as_bytes(), Some(GetOptions::new().with_prefix())),
        ]);
        let response = self
            .run("prune", |mut c| async move { c.txn(txn).await })
            .await?;
        let answers = response.op_responses();
        let kvs = |i: usize| match answers.get(i) {
            Some(etcd_client::TxnOpResponse::Get(get)) => get.kvs().to_vec(),
            _ => Vec::new(),
        };
        let expired: std::collections::BTreeSet<String> = kvs(0)
            .iter()
            .filter_map(|kv| serde_json::from_slice::<TokenRecord>(kv.value()).ok())
            .filter(|record| record.expires_unix <= now)
            .map(|record| record.id)
            .collect();
        Ok(kvs(1)
            .iter()
            .filter(|kv| {
                self.keys
                    .name_in("uses", kv.key())
                    .is_some_and(|id| expired.contains(id))
            })
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.mod_revision(),
                )
            })
            .take(room)
            .collect())
    }

    /// Delete each key still at the revision read; returns how many went. A group holding a
    /// record changed meanwhile is left whole for the next pass.
    async fn delete_unchanged(&self, records: &[(String, i64)]) -> Result<usize, StateError> {
        let mut deleted = 0;
        for group in records.chunks(DELETES_PER_TXN) {
            let compares = group
                .iter()
                .map(|(key, revision)| {
                    Compare::mod_revision(key.as_bytes(), CompareOp::Equal, *revision)
                })
                .collect::<Vec<_>>();
            let deletes = group
                .iter()
                .map(|(key, _)| TxnOp::delete(key.as_bytes(), None))
                .collect::<Vec<_>>();
            let txn = etcd_client::Txn::new().when(compares).and_then(deletes);
            let done = self
                .run("prune", |mut c| async move { c.txn(txn).await })
                .await?;
            if done.succeeded() {
                deleted += group.len();
            }
        }
        Ok(deleted)
    }
}

/// The end of the range of keys starting with `prefix`: its last byte below 0xff plus one.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/tether/keys/"), b"/tether/keys0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
