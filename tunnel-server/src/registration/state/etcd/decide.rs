//! Joins and renewals as etcd transactions. A decision reads the token, its use count, the
//! certified-key record, the node's identity, the index entries of the claimed IPs and the
//! identities of their holders; decides with the same code as the file backend
//! ([`crate::registration::state::store::evaluate`], [`Identities`]); issues the
//! certificate; and commits the use count, the key record and the identity claim in one
//! transaction guarded by the mod revision of every key it read. The certificate is returned
//! only if that commit succeeds. A lost race is read and decided again, at most
//! [`MAX_ATTEMPTS`] times, then the store counts as unavailable.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::TxnOp;
use rand::Rng;

use super::{EtcdState, Read};
use crate::registration::state::decision::{
    Declined, IssueFn, Issued, JoinClaim, Joined, RenewClaim, StateError,
};
use crate::registration::state::identities::{Identities, IssuedIdentity};
use crate::registration::state::store::{evaluate, Admission, Refusal};
use crate::registration::state::tokens::{sha256_hex, TokenFile, TokenRecord};
use crate::registration::state::usage::Usage;

/// Attempts of one decision before it fails closed. Every join with one token compares that
/// token's use count, so N concurrent joins commit one per round: 32 covers the 20-way race
/// of the tests with room, and a decision round takes ~2 ms on loopback.
pub const MAX_ATTEMPTS: u32 = 32;
/// Upper bound of the random pause after a lost race, per attempt so far (ms): spreads the
/// contenders so the next round is not the same collision.
const BACKOFF_STEP_MS: u64 = 3;

/// What one round read for a join or renewal.
struct Snapshot {
    seen: Vec<Read>,
    /// Identities of the node and of the holders of its IPs (all the checks look at).
    registry: Identities,
}

impl EtcdState {
    /// Read the node's identity, the IP index of `ips` and the identities of their holders,
    /// plus `extra` keys (returned first in `seen`).
    async fn snapshot(
        &self,
        op: &'static str,
        node: &str,
        ips: &[std::net::IpAddr],
        extra: Vec<String>,
    ) -> Result<Snapshot, StateError> {
        let mut wanted = extra;
        wanted.push(self.keys.identity(node));
        wanted.extend(ips.iter().map(|ip| self.keys.ip(ip)));
        let mut seen = self.read(op, &wanted).await?;
        let holders: BTreeSet<String> = seen
            .iter()
            .filter(|r| self.keys.name_in("ips", r.key.as_bytes()).is_some())
            .filter_map(|r| r.value().map(|v| String::from_utf8_lossy(v).into_owned()))
            .filter(|holder| holder != node)
            .collect();
        let holder_keys: Vec<String> = holders.iter().map(|h| self.keys.identity(h)).collect();
        if !holder_keys.is_empty() {
            seen.extend(self.read(op, &holder_keys).await?);
        }
        let mut registry = Identities::default();
        for read in &seen {
            if let Some(name) = self.keys.name_in("identities", read.key.as_bytes()) {
                if let Some(identity) = read.json::<IssuedIdentity>()? {
                    registry.nodes.insert(name.to_owned(), identity);
                }
            }
        }
        Ok(Snapshot { seen, registry })
    }

    /// The writes that turn `before` into `after` (only the entries a decision looked at),
    /// with the IP index kept in step.
    fn identity_ops(&self, before: &Identities, after: &Identities) -> Vec<TxnOp> {
        let mut ops = Vec::new();
        let names: BTreeSet<&String> = before.nodes.keys().chain(after.nodes.keys()).collect();
        let mut held: BTreeMap<std::net::IpAddr, &str> = BTreeMap::new();
        for (name, entry) in &after.nodes {
            for ip in &entry.ips {
                held.insert(*ip, name);
            }
        }
        for name in names {
            match (before.nodes.get(name), after.nodes.get(name)) {
                (old, Some(new)) if old != Some(new) => {
                    let value = serde_json::to_vec(new).unwrap_or_default();
                    ops.push(TxnOp::put(self.keys.identity(name), value, None));
                }
                (Some(_), None) => ops.push(TxnOp::delete(self.keys.identity(name), None)),
                _ => {}
            }
        }
        for entry in before.nodes.values() {
            for ip in &entry.ips {
                if !held.contains_key(ip) {
                    ops.push(TxnOp::delete(self.keys.ip(ip), None));
                }
            }
        }
        for (ip, name) in held {
            ops.push(TxnOp::put(self.keys.ip(&ip), name.as_bytes(), None));
        }
        ops
    }

    /// Decide a join (see the module doc).
    pub async fn join(
        &self,
        claim: JoinClaim<'_>,
        issue: &mut IssueFn<'_>,
    ) -> Result<Joined, Declined> {
        let JoinClaim {
            token,
            node,
            ips,
            public_key,
            now,
            certificate_expires,
        } = claim;
        let key_hash = sha256_hex(public_key);
        // Issued once per admission: a lost race re-decides, and re-signs only if the token
        // answers differently (pool or ID) this time.
        let mut issued: Option<(String, String, Issued)> = None;
        for attempt in 0..MAX_ATTEMPTS {
            let extra = vec![
                self.keys.token(&token.id),
                self.keys.uses(&token.id),
                self.keys.certified(&key_hash),
            ];
            let snapshot = self.snapshot("join", node.as_str(), ips, extra).await?;
            let (record, uses, certified) =
                (&snapshot.seen[0], &snapshot.seen[1], &snapshot.seen[2]);
            let mut file = TokenFile::default();
            if let Some(record) = record.json::<TokenRecord>()? {
                file.tokens.push(record);
            }
            let used = uses.number().unwrap_or(0);
            let mut usage = Usage::default();
            usage
                .uses
                .insert(token.id.clone(), u32::try_from(used).unwrap_or(u32::MAX));
            if let Some(until) = certified.number().filter(|until| *until > now) {
                usage.keys.insert(key_hash.clone(), until);
            }
            let admission = evaluate(&file, &usage, token, node, ips, public_key, now)
                .map_err(Declined::Token)?;
            let registry = &snapshot.registry;
            registry
                .check_join(node, ips, &admission.reprovision, now)
                .map_err(Declined::Identity)?;
            let reprovisioned = registry.taken_by(node, ips, now);
            let this = issue_once(&mut issued, &admission, issue)?;
            let mut after = registry.clone();
            after.record_join(node, this.identity.clone());
            let mut ops = vec![
                TxnOp::put(self.keys.uses(&token.id), (used + 1).to_string(), None),
                TxnOp::put(
                    self.keys.certified(&key_hash),
                    certificate_expires
                        .max(admission.token_expires_unix)
                        .to_string(),
                    None,
                ),
            ];
            ops.extend(self.identity_ops(registry, &after));
            if self.commit("join", &snapshot.seen, ops).await? {
                return Ok(Joined {
                    admission,
                    issued: this,
                    reprovisioned,
                });
            }
            lost_race(attempt).await;
        }
        Err(exhausted_retries().into())
    }

    /// Decide a renewal: the presented certificate must be the node's current (or previous)
    /// one and the CSR key new; the key record and the new current certificate are committed
    /// together.
    pub async fn renew(
        &self,
        claim: RenewClaim<'_>,
        issue: &mut (dyn FnMut() -> Result<Issued, &'static str> + Send),
    ) -> Result<Issued, Declined> {
        let RenewClaim {
            node,
            ips,
            presented,
            public_key,
            now,
            certificate_expires,
        } = claim;
        let key_hash = sha256_hex(public_key);
        let mut issued: Option<Issued> = None;
        for attempt in 0..MAX_ATTEMPTS {
            let extra = vec![self.keys.certified(&key_hash)];
            let snapshot = self.snapshot("renew", node.as_str(), ips, extra).await?;
            if snapshot.seen[0].number().is_some_and(|until| until > now) {
                return Err(Declined::Token(Refusal::KeyReused));
            }
            let registry = &snapshot.registry;
            registry
                .check_renewal(node, ips, presented, now)
                .map_err(Declined::Identity)?;
            let this = match &issued {
                Some(this) => this.clone(),
                None => {
                    let fresh = issue().map_err(Declined::Issue)?;
                    issued = Some(fresh.clone());
                    fresh
                }
            };
            let mut after = registry.clone();
            after.record_renewal(node, presented, this.identity.clone());
            let mut ops = vec![TxnOp::put(
                self.keys.certified(&key_hash),
                certificate_expires.to_string(),
                None,
            )];
            ops.extend(self.identity_ops(registry, &after));
            if self.commit("renew", &snapshot.seen, ops).await? {
                return Ok(this);
            }
            lost_race(attempt).await;
        }
        Err(exhausted_retries().into())
    }
}

/// The certificate for `admission`, signed at most once per (pool, token).
fn issue_once(
    issued: &mut Option<(String, String, Issued)>,
    admission: &Admission,
    issue: &mut IssueFn<'_>,
) -> Result<Issued, Declined> {
    if let Some((pool, token, this)) = issued {
        if *pool == admission.pool.name && *token == admission.token_id {
            return Ok(this.clone());
        }
    }
    let this = issue(admission).map_err(Declined::Issue)?;
    *issued = Some((
        admission.pool.name.clone(),
        admission.token_id.clone(),
        this.clone(),
    ));
    Ok(this)
}

async fn lost_race(attempt: u32) {
    let bound = BACKOFF_STEP_MS * u64::from(attempt.min(10) + 1);
    let pause = rand::thread_rng().gen_range(0..=bound);
    tokio::time::sleep(Duration::from_millis(pause)).await;
}

fn exhausted_retries() -> StateError {
    StateError::Unavailable(format!(
        "etcd: the decision lost {MAX_ATTEMPTS} transaction races in a row"
    ))
}
