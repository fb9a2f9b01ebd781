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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dns_discovery_counts_distinct_addresses_and_keeps_watchers_informed() {
        // A headless Service resolves to one address per replica; `localhost` stands in.
        let expected = {
            let mut ips: Vec<_> = tokio::net::lookup_host("localhost:9000")
                .await
                .unwrap()
                .map(|a| a.ip())
                .collect();
            ips.sort();
            ips.dedup();
            ips.len()
        };
        let config = ReplicaConfig {
            id: Some("r1".into()),
            count: Some(7),
            dns: Some("localhost:9000".into()),
            dns_interval: Some(Duration::from_millis(50)),
        };
        let cancel = CancellationToken::new();
        let replica = Replica::new(&config, cancel.clone());
        assert_eq!(replica.id, "r1");
        let mut watch = replica.subscribe();
        tokio::time::timeout(Duration::from_secs(5), async {
            while *watch.borrow_and_update() != expected {
                watch.changed().await.unwrap();
            }
        })
        .await
        .expect("the discovered count replaces the configured one");
        assert_eq!(replica.count(), expected);
        cancel.cancel();
    }

    #[test]
    fn ids_and_counts_are_validated() {
        let bad_id = ReplicaConfig {
            id: Some("a b".into()),
            ..ReplicaConfig::default()
        };
        assert!(bad_id.validate().unwrap_err().contains("replica.id"));
        let bad_count = ReplicaConfig {
            count: Some(0),
            ..ReplicaConfig::default()
        };
        assert!(bad_count.validate().unwrap_err().contains("replica.count"));
        let from_env = ReplicaConfig::default().resolve_id();
        assert!(protocol::stream::valid_server_id(&from_env), "{from_env}");
    }
}
