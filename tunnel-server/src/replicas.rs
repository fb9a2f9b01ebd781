//! This replica's identity and the replica count it tells edges, so each edge keeps one
//! session with every replica (any replica can then reach any edge). The count is fixed in
//! config or discovered from a DNS name that resolves to every replica (a headless Service).

use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// `[replica]` config section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// This replica's ID (default: `$POD_NAME`, then `$HOSTNAME`, then a random one).
    pub id: Option<String>,
    /// How many replicas serve the cluster (default 1). Ignored when `dns` is set.
    pub count: Option<usize>,
    /// `host:port` resolving to every replica (a headless Service); re-resolved every
    /// `dns_interval` and the distinct addresses counted.
    pub dns: Option<String>,
    /// How often `dns` is resolved.
    #[serde(default, with = "humantime_serde")]
    pub dns_interval: Option<Duration>,
}

impl ReplicaConfig {
    /// Check the values; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(id) = &self.id {
            if !protocol::stream::valid_server_id(id) {
                return Err(format!(
                    "key `replica.id`: {id:?} must be 1-64 characters of [A-Za-z0-9._-]"
                ));
            }
        }
        if let Some(n) = self.count {
            if !(1..=protocol::stream::MAX_SERVER_COUNT).contains(&n) {
                return Err(format!(
                    "key `replica.count` must be 1..={}",
                    protocol::stream::MAX_SERVER_COUNT
                ));
            }
        }
        if self.dns_interval.is_some_and(|d| d.is_zero()) {
            return Err("key `replica.dns_interval` must be > 0".into());
        }
        Ok(())
    }

    /// The ID to use: configured, or from the pod's environment, or random.
    pub fn resolve_id(&self) -> String {
        if let Some(id) = &self.id {
            return id.clone();
        }
        for var in ["POD_NAME", "HOSTNAME"] {
            if let Ok(v) = std::env::var(var) {
                if protocol::stream::valid_server_id(&v) {
                    return v;
                }
            }
        }
        format!("tether-{:016x}", rand::random::<u64>())
    }
}

/// This replica as edges see it.
pub struct Replica {
    /// Stable ID for this process.
    pub id: String,
    count: watch::Sender<usize>,
}

impl Replica {
    /// From config; starts DNS discovery when configured.
    pub fn new(config: &ReplicaConfig, cancel: CancellationToken) -> Replica {
        let (count, _) = watch::channel(config.count.unwrap_or(1));
        let replica = Replica {
            id: config.resolve_id(),
            count,
        };
        if let Some(name) = config.dns.clone() {
            let sender = replica.count.clone();
            let interval = config.dns_interval.unwrap_or(Duration::from_secs(5));
            tokio::spawn(discover(name, interval, sender, cancel));
        }
        replica
    }

    /// The replica count now.
    pub fn count(&self) -> usize {
        *self.count.borrow()
    }

    /// Watch for count changes.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }
}

async fn discover(
    name: String,
    interval: Duration,
    count: watch::Sender<usize>,
    cancel: CancellationToken,
) {
    loop {
        match tokio::net::lookup_host(name.as_str()).await {
            Ok(addrs) => {
                let mut ips: Vec<_> = addrs.map(|a| a.ip()).collect();
                ips.sort();
                ips.dedup();
                let n = ips.len().clamp(1, protocol::stream::MAX_SERVER_COUNT);
                if *count.borrow() != n {
                    info!(replicas = n, %name, "replica count changed");
                    count.send_replace(n);
                }
            }
            Err(error) => warn!(%name, %error, "replica discovery failed; keeping the last count"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
