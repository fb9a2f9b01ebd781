//! `tunnel-server state import`: copy a file store (tokens, use counts, certified keys,
//! identities with their IP index, revocations) into etcd, to move a single server to
//! replicas. A key already in etcd with the same value is left alone; one with a different
//! value stops the import (nothing of that key written) unless `overwrite` is set, so an
//! import run twice, or against a store replicas already use, cannot silently roll state
//! back. Each key is written with a compare on what was read, so a replica changing it
//! meanwhile is noticed too.

use etcd_client::TxnOp;

use super::EtcdState;
use crate::registration::state::decision::StateError;
use crate::registration::state::files::{read_json, unix_now, StoreError};
use crate::registration::state::identities::{identities_path, Identities};
use crate::registration::state::revocation::RevocationFile;
use crate::registration::state::tokens::TokenFile;
use crate::registration::state::usage::{usage_path, Usage};
use crate::registration::RegistrationConfig;

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Keys written (new, or overwritten when allowed).
    pub written: usize,
    /// Keys already holding the same value.
    pub unchanged: usize,
    /// Keys holding a different value, left alone (the import failed if any).
    pub conflicts: Vec<String>,
}

/// Every key and value the file store of `config` amounts to.
pub fn file_records(
    state: &EtcdState,
    config: &RegistrationConfig,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let keys = state.keys();
    let tokens: TokenFile = read_json(&config.token_file)?;
    let usage: Usage = read_json(&usage_path(&config.token_file))?;
    let identities: Identities = read_json(&identities_path(&config.token_file))?;
    let revoked: RevocationFile = read_json(&config.revocation_path())?;
    let mut out = Vec::new();
    for record in &tokens.tokens {
        out.push((keys.token(&record.id), json(record)));
    }
    for (id, uses) in &usage.uses {
        out.push((keys.uses(id), uses.to_string().into_bytes()));
    }
    let now = unix_now();
    for (key, until) in usage.keys.iter().filter(|(_, until)| **until > now) {
        out.push((keys.certified(key), until.to_string().into_bytes()));
    }
    for (node, identity) in identities
        .nodes
        .iter()
        .filter(|(_, e)| e.expires_unix > now)
    {
        out.push((keys.identity(node), json(identity)));
        for ip in &identity.ips {
            out.push((keys.ip(ip), node.as_bytes().to_vec()));
        }
    }
    for (node, at) in &revoked.nodes {
        out.push((keys.revoked(node), at.to_string().into_bytes()));
    }
    Ok(out)
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

impl EtcdState {
    /// Write `records`, refusing to change differing keys unless `overwrite`.
    pub async fn import(
        &self,
        records: Vec<(String, Vec<u8>)>,
        overwrite: bool,
    ) -> Result<ImportReport, StateError> {
        let mut report = ImportReport::default();
        let wanted: Vec<String> = records.iter().map(|(k, _)| k.clone()).collect();
        let mut existing = Vec::with_capacity(wanted.len());
        for chunk in wanted.chunks(64) {
            existing.extend(self.read("import", chunk).await?);
        }
        let mut writes = Vec::new();
        for ((key, value), read) in records.into_iter().zip(existing) {
            match read.value() {
                Some(old) if same(old, &value) => report.unchanged += 1,
                Some(_) if !overwrite => report.conflicts.push(key),
                _ => writes.push((read, TxnOp::put(key, value, None))),
            }
        }
        if !report.conflicts.is_empty() {
            return Ok(report);
        }
        // A few keys per transaction: etcd caps operations per transaction (128 by default).
        while !writes.is_empty() {
            let chunk: Vec<(super::Read, TxnOp)> = writes.drain(..writes.len().min(32)).collect();
            let (seen, ops): (Vec<super::Read>, Vec<TxnOp>) = chunk.into_iter().unzip();
            let count = ops.len();
            if !self.commit("import", &seen, ops).await? {
                return Err(StateError::Unavailable(
                    "etcd: keys changed during the import; run it again".into(),
                ));
            }
            report.written += count;
        }
        Ok(report)
    }
}

/// Equal bytes, or equal JSON (a record written by another version may order fields
/// differently).
fn same(old: &[u8], new: &[u8]) -> bool {
    old == new
        || matches!(
            (
                serde_json::from_slice::<serde_json::Value>(old),
                serde_json::from_slice::<serde_json::Value>(new),
            ),
            (Ok(a), Ok(b)) if a == b
        )
}
