//! Tokens and node revocations in etcd: what `token create|list|revoke` and `node revoke`
//! write when the server config says etcd. A token record holds only the secret's hash, as
//! in the token file; creating one never overwrites another (the ID must be absent).

use etcd_client::{Compare, CompareOp, GetOptions, TxnOp};
use protocol::NodeName;

use super::EtcdState;
use crate::registration::state::decision::StateError;
use crate::registration::state::files::{unix_now, StoreError};
use crate::registration::state::tokens::{BootstrapToken, TokenRecord, TokenSpec};

/// Attempts at a fresh token ID (36^6 IDs: a collision is already rare) or at a token
/// change racing another operator.
const ATTEMPTS: usize = 8;

impl EtcdState {
    /// Create a token from `spec`.
    pub async fn create_token(
        &self,
        spec: &TokenSpec,
    ) -> Result<(BootstrapToken, TokenRecord), StateError> {
        spec.validate()?;
        for _ in 0..ATTEMPTS {
            let (token, record) = spec.new_token(&|_| false);
            let key = self.keys.token(&record.id);
            let value = serde_json::to_vec(&record).unwrap_or_default();
            let txn = etcd_client::Txn::new()
                .when(vec![Compare::version(key.as_bytes(), CompareOp::Equal, 0)])
                .and_then(vec![
                    TxnOp::put(key.as_bytes(), value, None),
                    TxnOp::delete(self.keys.uses(&record.id), None),
                ]);
            let created = self
                .run("token_create", |mut c| async move { c.txn(txn).await })
                .await?;
            if created.succeeded() {
                return Ok((token, record));
            }
        }
        Err(StateError::Unavailable(
            "etcd: no free token ID found".into(),
        ))
    }

    /// Every token with its use count.
    pub async fn list_tokens(&self) -> Result<Vec<(TokenRecord, u32)>, StateError> {
        let (tokens, uses) = (self.keys.kind("tokens"), self.keys.kind("uses"));
        let txn = etcd_client::Txn::new().and_then(vec![
            TxnOp::get(tokens.as_bytes(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(uses.as_bytes(), Some(GetOptions::new().with_prefix())),
        ]);
        let response = self
            .run("token_list", |mut c| async move { c.txn(txn).await })
            .await?;
        let answers = response.op_responses();
        let kvs = |i: usize| match answers.get(i) {
            Some(etcd_client::TxnOpResponse::Get(get)) => get.kvs().to_vec(),
            _ => Vec::new(),
        };
        let counts: std::collections::BTreeMap<String, u32> = kvs(1)
            .iter()
            .filter_map(|kv| {
                let id = self.keys.name_in("uses", kv.key())?;
                let n = std::str::from_utf8(kv.value()).ok()?.parse().ok()?;
                Some((id.to_owned(), n))
            })
            .collect();
        let mut out = Vec::new();
        for kv in kvs(0) {
            let record: TokenRecord = serde_json::from_slice(kv.value()).map_err(|e| {
                StateError::Store(StoreError::Invalid(format!(
                    "etcd key {}: invalid token record: {e}",
                    String::from_utf8_lossy(kv.key())
                )))
            })?;
            let uses = counts.get(&record.id).copied().unwrap_or(0);
            out.push((record, uses));
        }
        Ok(out)
    }

    /// Revoke token `id` (it stays listed, refused).
    pub async fn revoke_token(&self, id: &str) -> Result<(), StateError> {
        let key = self.keys.token(id);
        for _ in 0..ATTEMPTS {
            let read = self
                .read("token_revoke", std::slice::from_ref(&key))
                .await?;
            let mut record: TokenRecord = read[0]
                .json()?
                .ok_or_else(|| StateError::Store(StoreError::NoSuchToken(id.to_owned())))?;
            record.revoked = true;
            let value = serde_json::to_vec(&record).unwrap_or_default();
            if self
                .commit(
                    "token_revoke",
                    &read,
                    vec![TxnOp::put(key.as_bytes(), value, None)],
                )
                .await?
            {
                return Ok(());
            }
        }
        Err(StateError::Unavailable(format!(
            "etcd: token {id} kept changing"
        )))
    }

    /// When token `id` was created, if it exists.
    pub async fn token_created(&self, id: &str) -> Result<Option<u64>, StateError> {
        let read = self.read("token_get", &[self.keys.token(id)]).await?;
        Ok(read[0].json::<TokenRecord>()?.map(|r| r.created_unix))
    }

    /// Revoke `node` now, for every replica (they watch `revoked/`); returns the time.
    pub async fn revoke_node(&self, node: &NodeName) -> Result<u64, StateError> {
        let at = unix_now();
        let key = self.keys.revoked(node.as_str());
        self.run("node_revoke", |mut c| async move {
            c.put(key, at.to_string(), None).await
        })
        .await?;
        // In force on this replica at once; the watch brings it to the others.
        let mut nodes = self.revocations.snapshot();
        nodes.insert(node.as_str().to_owned(), at);
        self.revocations.replace(nodes);
        Ok(at)
    }
}
