//! The etcd backend: the control state of every replica in one etcd v3 cluster, so a join
//! reaching any replica is decided against one truth. Each decision is one transaction that
//! compares the mod revision of everything it read (absent keys: version 0) and writes
//! everything it decided; a transaction that lost a race is read and decided again, a
//! bounded number of times ([`decide`]). The data path never waits on etcd: revocations and
//! identities are in-memory views fed by a watch ([`watch`]); live sessions are published
//! under this replica's lease ([`sessions`]).
//!
//! Key layout under `prefix` (default `/tether/`); values are JSON unless said otherwise:
//!
//! | key                          | value                                                  |
//! |------------------------------|--------------------------------------------------------|
//! | `tokens/<id>`                | the token record (secret as SHA-256 only)              |
//! | `uses/<id>`                  | joins admitted with the token (decimal)                |
//! | `keys/<sha256 of public key>`| until when the certified key is remembered (Unix s)    |
//! | `identities/<node>`          | the node's issued identity (IPs, current certificate)  |
//! | `ips/<ip>`                   | the node holding the address (index of `identities/`)  |
//! | `revoked/<node>`             | revocation time (Unix s, decimal)                      |
//! | `sessions/<node>/<replica>`  | a live session, under the holding replica's lease      |
//! | `janitor`                    | the replica pruning this interval, under a lease       |
//!
//! Expired `keys/` records and expired tokens' `uses/` are deleted by [`prune`].

mod decide;
pub mod import;
pub mod keys;
pub mod prune;
mod sessions;
mod tokens;
mod watch;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, TxnOp};

use super::config::StateConfig;
use super::decision::StateError;
use super::revocation::RevocationList;
use keys::Keys;
use watch::EtcdIdentities;

/// Shortest time between two rebuilds of the client after transport errors: tonic's channel
/// reconnects by itself, and rebuilding is the fallback when it stays stuck after every
/// member was down; more often than this would only churn connections.
const REBUILD_INTERVAL: Duration = Duration::from_secs(1);
/// HTTP/2 keep-alive interval to etcd: a dead member is noticed within this plus the timeout.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// The state of every replica in etcd.
pub struct EtcdState {
    config: StateConfig,
    client: Mutex<(Client, Instant)>,
    keys: Keys,
    revocations: Arc<RevocationList>,
    identities: Arc<EtcdIdentities>,
    /// The server's metrics once [`EtcdState::count_in`] ran (the CLI has none).
    counted: std::sync::OnceLock<Arc<crate::metrics::state::StateMetrics>>,
    uncounted: crate::metrics::state::StateMetrics,
}

/// The client options from `[state]`.
fn options(config: &StateConfig) -> Result<ConnectOptions, StateError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_timeout(config.request_timeout)
        .with_keep_alive(KEEP_ALIVE_INTERVAL, config.request_timeout)
        // Without a leader etcd cannot commit: answer at once rather than wait.
        .with_require_leader(true);
    if let Some(ca) = &config.ca {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                StateError::Unavailable(format!("etcd TLS file {}: {e}", path.display()))
            })
        };
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// A client for `config` (lazy: connecting happens on the first request).
pub async fn connect(config: &StateConfig) -> Result<Client, StateError> {
    Client::connect(&config.endpoints, Some(options(config)?))
        .await
        .map_err(|e| StateError::Unavailable(format!("etcd client: {e}")))
}

impl EtcdState {
    /// Open the store `config` names. Does not wait for etcd: a replica starts (and serves
    /// tunnels) while etcd is down, and decides joins once it is back.
    pub async fn open(config: &StateConfig) -> Result<EtcdState, StateError> {
        let client = connect(config).await?;
        Ok(EtcdState {
            keys: Keys::new(&config.prefix),
            config: config.clone(),
            client: Mutex::new((client, Instant::now())),
            revocations: Arc::new(RevocationList::in_memory()),
            identities: Arc::new(EtcdIdentities::default()),
            counted: std::sync::OnceLock::new(),
            uncounted: Default::default(),
        })
    }

    /// Count operations in the server's registry.
    pub fn count_in(&self, metrics: &Arc<crate::metrics::state::StateMetrics>) {
        let _ = self.counted.set(metrics.clone());
    }

    fn metrics(&self) -> &crate::metrics::state::StateMetrics {
        self.counted.get().map(|m| &**m).unwrap_or(&self.uncounted)
    }

    /// The revocation list the edge listener checks (fed by the watch).
    pub fn revocations(&self) -> Arc<RevocationList> {
        self.revocations.clone()
    }

    /// The identity registry the edge listener reads (fed by the watch).
    pub fn identities(&self) -> Arc<dyn super::identities::IdentityStore> {
        self.identities.clone()
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn client(&self) -> Client {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Run one store operation `op` (for metrics) under the request timeout; an error or a
    /// timeout is `state store unavailable`, and a transport failure rebuilds the client
    /// (rate-limited) so the next operation starts from a fresh channel.
    async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, StateError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let answer = tokio::time::timeout(self.config.request_timeout, f(self.client())).await;
        self.metrics().observe(
            op,
            started.elapsed(),
            answer.as_ref().is_ok_and(|a| a.is_ok()),
        );
        match answer {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                self.rebuild_after(&error).await;
                Err(StateError::Unavailable(format!("etcd {op}: {error}")))
            }
            Err(_) => {
                self.rebuild().await;
                Err(StateError::Unavailable(format!(
                    "etcd {op}: no answer within {:?}",
                    self.config.request_timeout
                )))
            }
        }
    }

    async fn rebuild_after(&self, error: &etcd_client::Error) {
        let transport = match error {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            etcd_client::Error::GRpcStatus(status) => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
            _ => false,
        };
        if transport {
            self.rebuild().await;
        }
    }

    async fn rebuild(&self) {
        let due = {
            let guard = self.client.lock().unwrap_or_else(|p| p.into_inner());
            guard.1.elapsed() >= REBUILD_INTERVAL
        };
        if !due {
            return;
        }
        if let Ok(client) = connect(&self.config).await {
            *self.client.lock().unwrap_or_else(|p| p.into_inner()) = (client, Instant::now());
        }
    }

    /// Read `keys` at one revision: each as `(value, mod revision)`, `None` when absent.
    async fn read(&self, op: &'static str, keys: &[String]) -> Result<Vec<Read>, StateError> {
        let txn = etcd_client::Txn::new().and_then(
            keys.iter()
                .map(|k| TxnOp::get(k.as_bytes(), None))
                .collect::<Vec<_>>(),
        );
        let response = self
            .run(op, |mut c| async move { c.txn(txn).await })
            .await?;
        let mut out = Vec::with_capacity(keys.len());
        for (key, answer) in keys.iter().zip(response.op_responses()) {
            let found = match answer {
                etcd_client::TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
                _ => None,
            };
            out.push(Read {
                key: key.clone(),
                found,
            });
        }
        Ok(out)
    }

    /// Commit `ops` if every key in `seen` is unchanged; `Ok(false)` when a race was lost.
    async fn commit(
        &self,
        op: &'static str,
        seen: &[Read],
        ops: Vec<TxnOp>,
    ) -> Result<bool, StateError> {
        let compares: Vec<Compare> = seen.iter().map(Read::unchanged).collect();
        let txn = etcd_client::Txn::new().when(compares).and_then(ops);
        let response = self
            .run(op, |mut c| async move { c.txn(txn).await })
            .await?;
        Ok(response.succeeded())
    }
}

/// One key as a decision read it.
#[derive(Debug, Clone)]
struct Read {
    key: String,
    /// Value and mod revision; `None` when the key did not exist.
    found: Option<(Vec<u8>, i64)>,
}

impl Read {
    /// The compare that holds while the key is as read.
    fn unchanged(&self) -> Compare {
        match &self.found {
            Some((_, revision)) => {
                Compare::mod_revision(self.key.as_bytes(), CompareOp::Equal, *revision)
            }
            None => Compare::version(self.key.as_bytes(), CompareOp::Equal, 0),
        }
    }

    fn value(&self) -> Option<&[u8]> {
        self.found.as_ref().map(|(v, _)| v.as_slice())
    }

    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, StateError> {
        self.value()
            .map(|v| {
                serde_json::from_slice(v).map_err(|e| {
                    StateError::Unavailable(format!("etcd key {}: invalid record: {e}", self.key))
                })
            })
            .transpose()
    }

    fn number(&self) -> Option<u64> {
        self.value()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.trim().parse().ok())
    }
}
