//! Admission of one join against the token file: the server's view of the file (reloaded
//! when its mtime/size/inode changes) and the usage record beside it, so a replayed join
//! (same CSR key) is refused even for a token with uses left. Secrets are compared in
//! constant time, also for unknown IDs.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use protocol::NodeName;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::files::{read_json, stamp, write_json, FileStamp, StoreError};
use super::tokens::{glob_match, hex_decode, sha256_hex, BootstrapToken, NodePool, TokenFile};
use super::usage::{usage_path, Usage};

/// Why a join was refused. Only audit logs see this; the node always gets one generic error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The token text is not in bootstrap-token format.
    #[error("malformed token")]
    Malformed,
    /// No token has this ID.
    #[error("unknown token id")]
    Unknown,
    /// The secret does not match.
    #[error("wrong secret")]
    WrongSecret,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
    /// Revoked by the operator.
    #[error("token revoked")]
    Revoked,
    /// Its usage limit is reached.
    #[error("token usage limit reached")]
    Exhausted,
    /// The node name does not match the token's pattern.
    #[error("node name not allowed by the token")]
    NodeNameNotAllowed,
    /// A node IP lies outside the token pool's networks.
    #[error("node IP outside the token's networks")]
    NodeIpNotAllowed,
    /// This public key was certified before: a replayed request.
    #[error("CSR key already used (replay)")]
    KeyReused,
}

impl Refusal {
    /// Label for metrics and audit lines.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Unknown => "unknown",
            Refusal::WrongSecret => "wrong_secret",
            Refusal::Expired => "expired",
            Refusal::Revoked => "revoked",
            Refusal::Exhausted => "exhausted",
            Refusal::NodeNameNotAllowed => "node_name",
            Refusal::NodeIpNotAllowed => "node_ip",
            Refusal::KeyReused => "replay",
        }
    }
}

/// A join the token allows.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The token ID used.
    pub token_id: String,
    /// When the token was created (Unix seconds).
    pub token_created_unix: u64,
    /// When the token expires (Unix seconds).
    pub token_expires_unix: u64,
    /// The pool the node joins.
    pub pool: NodePool,
    /// Joined nodes the token may re-provision.
    pub reprovision: Vec<String>,
}

/// The server's view of the token file, reloaded when the file changes.
pub struct TokenStore {
    path: PathBuf,
    usage_path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: TokenFile,
    stamp: Option<FileStamp>,
    usage: Usage,
}

impl TokenStore {
    /// Load the token file (missing = no tokens yet) and its usage record.
    pub fn open(path: &Path) -> Result<TokenStore, StoreError> {
        let usage_path = usage_path(path);
        let stamp = stamp(path);
        let file = read_json(path)?;
        let usage = read_json(&usage_path)?;
        Ok(TokenStore {
            path: path.to_owned(),
            usage_path,
            inner: Mutex::new(Inner { file, stamp, usage }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-read the token file if it changed. A file that no longer parses is logged and the
    /// last good version kept (a half-edited file must not admit or lock out everyone).
    pub fn refresh(&self) {
        let mut inner = self.lock();
        self.refresh_locked(&mut inner);
    }

    fn refresh_locked(&self, inner: &mut Inner) {
        let now = stamp(&self.path);
        if now == inner.stamp {
            return;
        }
        match read_json::<TokenFile>(&self.path) {
            Ok(file) => {
                tracing::info!(file = %self.path.display(), tokens = file.tokens.len(), "token file reloaded");
                inner.file = file;
                inner.stamp = now;
            }
            Err(error) => {
                tracing::warn!(%error, "token file unreadable; keeping the previous version");
            }
        }
    }

    /// When token `id` was created, if it exists (reloading the file first).
    pub fn created_unix(&self, id: &str) -> Option<u64> {
        let mut inner = self.lock();
        self.refresh_locked(&mut inner);
        inner
            .file
            .tokens
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.created_unix)
    }

    /// Check `token` for a join of `node` with a CSR whose public key is `public_key`, at
    /// `now` (Unix seconds), without using anything up: what [`TokenStore::admit`] would
    /// answer. Lets the caller check more (the identity registry) before the use counts.
    pub fn check(
        &self,
        token: &BootstrapToken,
        node: &NodeName,
        ips: &[std::net::IpAddr],
        public_key: &[u8],
        now: u64,
    ) -> Result<Admission, Refusal> {
        let mut inner = self.lock();
        self.refresh_locked(&mut inner);
        evaluate(&inner.file, &inner.usage, token, node, ips, public_key, now)
    }

    /// [`TokenStore::check`], and on success count the use and remember the key before
    /// returning, so two concurrent replays cannot both pass. The key is kept until
    /// `certificate_expires` (Unix seconds) or the token's expiry, whichever is later.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &self,
        token: &BootstrapToken,
        node: &NodeName,
        ips: &[std::net::IpAddr],
        public_key: &[u8],
        now: u64,
        certificate_expires: u64,
    ) -> Result<Admission, Refusal> {
        let mut inner = self.lock();
        self.refresh_locked(&mut inner);
        let admission = evaluate(&inner.file, &inner.usage, token, node, ips, public_key, now)?;
        let until = certificate_expires.max(admission.token_expires_unix);
        inner.usage.keys.insert(sha256_hex(public_key), until);
        *inner
            .usage
            .uses
            .entry(admission.token_id.clone())
            .or_default() += 1;
        self.persist_usage(&mut inner, now);
        Ok(admission)
    }

    /// Prune and write the usage record. A failed write is logged: the in-memory record
    /// still holds, so this replica keeps enforcing limits and refusing replays.
    fn persist_usage(&self, inner: &mut Inner, now: u64) {
        let Inner { file, usage, .. } = inner;
        usage.prune(now, &|id| file.tokens.iter().any(|t| t.id == id));
        if let Err(error) = write_json(&self.usage_path, usage) {
            tracing::warn!(%error, "could not persist token usage");
        }
    }

    /// Remember a public key certified by a renewal, so the same CSR cannot be replayed into
    /// a join. Returns false if it was certified before.
    pub fn remember_key(&self, public_key: &[u8], now: u64, certificate_expires: u64) -> bool {
        let mut inner = self.lock();
        let key = sha256_hex(public_key);
        let fresh = !inner.usage.keys.contains_key(&key);
        if fresh {
            inner.usage.keys.insert(key, certificate_expires);
            self.persist_usage(&mut inner, now);
        }
        fresh
    }
}

/// Every check of a join against the token file and the usage record; changes nothing.
/// Shared by every backend (the etcd one passes the token and use records it read).
pub(crate) fn evaluate(
    file: &TokenFile,
    usage: &Usage,
    token: &BootstrapToken,
    node: &NodeName,
    ips: &[std::net::IpAddr],
    public_key: &[u8],
    now: u64,
) -> Result<Admission, Refusal> {
    let presented = Sha256::digest(token.secret.expose().as_bytes());
    let record = file.tokens.iter().find(|r| r.id == token.id);
    // Compare even for an unknown ID, so timing does not tell known IDs apart.
    let stored = record
        .and_then(|r| hex_decode(&r.secret_sha256))
        .unwrap_or([0u8; 32]);
    let secret_ok: bool = presented.as_slice().ct_eq(&stored).into();
    let record = record.ok_or(Refusal::Unknown)?;
    if !secret_ok {
        return Err(Refusal::WrongSecret);
    }
    if record.revoked {
        return Err(Refusal::Revoked);
    }
    if now >= record.expires_unix {
        return Err(Refusal::Expired);
    }
    let uses = usage.uses.get(&record.id).copied().unwrap_or(0);
    if record.usage_limit.is_some_and(|limit| uses >= limit) {
        return Err(Refusal::Exhausted);
    }
    if let Some(pattern) = &record.node_name_pattern {
        if !glob_match(pattern, node.as_str()) {
            return Err(Refusal::NodeNameNotAllowed);
        }
    }
    let networks = &record.pool.node_ip_cidrs;
    if !networks.is_empty() && !ips.iter().all(|ip| networks.iter().any(|n| n.contains(ip))) {
        return Err(Refusal::NodeIpNotAllowed);
    }
    if usage.keys.contains_key(&sha256_hex(public_key)) {
        return Err(Refusal::KeyReused);
    }
    Ok(Admission {
        token_id: record.id.clone(),
        token_created_unix: record.created_unix,
        token_expires_unix: record.expires_unix,
        pool: record.pool.clone(),
        reprovision: record.reprovision.clone(),
    })
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
