//! Live sessions in etcd: each replica publishes `sessions/<node>/<replica>` for the edges
//! it holds, under a lease of `state.session_ttl` that it keeps alive. A replica that dies
//! stops renewing, and etcd deletes its entries when the lease expires: the fleet view never
//! needs a replica's cooperation to forget it. Publishing follows the route table every
//! [`PUBLISH_INTERVAL`] (a diff, so a quiet fleet writes nothing); nothing on the session
//! path waits for it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{GetOptions, PutOptions};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::EtcdState;
use crate::edge::routing::Routable;
use crate::registration::state::decision::StateError;
use crate::registration::state::sessions::LiveSession;

/// How often the published sessions follow the route table: the fleet view lags a new or
/// closed session by at most this.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

impl EtcdState {
    /// Publish this replica's sessions under its lease until `cancel`; on the way out the
    /// lease is revoked so the entries go at once rather than after the TTL.
    pub async fn publish_sessions(&self, shared: Arc<crate::Shared>, cancel: CancellationToken) {
        let replica = shared.replica.id.to_string();
        let ttl = i64::try_from(self.config.session_ttl.as_secs()).unwrap_or(i64::MAX);
        // Keep-alive three times per TTL: one lost renewal does not drop the entries.
        let renew_every = self.config.session_ttl / 3;
        let mut lease: Option<i64> = None;
        let mut published: BTreeMap<String, LiveSession> = BTreeMap::new();
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(PUBLISH_INTERVAL) => {}
            }
            let id = match lease {
                Some(id) => id,
                None => match self
                    .run("lease_grant", |mut c| async move {
                        c.lease_grant(ttl, None).await
                    })
                    .await
                {
                    Ok(granted) => {
                        published.clear();
                        last_renewal = tokio::time::Instant::now();
                        *lease.insert(granted.id())
                    }
                    Err(error) => {
                        debug!(%error, "no etcd lease for live sessions yet");
                        continue;
                    }
                },
            };
            if last_renewal.elapsed() >= renew_every {
                match self.keep_alive(id).await {
                    Ok(true) => last_renewal = tokio::time::Instant::now(),
                    Ok(false) => {
                        warn!("etcd lease of live sessions expired; publishing them again");
                        lease = None;
                        continue;
                    }
                    Err(error) => debug!(%error, "etcd lease keep-alive failed"),
                }
            }
            let current = current_sessions(&shared, &replica);
            if let Err(error) = self.publish(id, &replica, &mut published, current).await {
                debug!(%error, "live sessions not published");
            }
        }
        if let Some(id) = lease {
            let _ = self
                .run(
                    "lease_revoke",
                    |mut c| async move { c.lease_revoke(id).await },
                )
                .await;
        }
    }

    /// One keep-alive; `Ok(false)` when the lease is gone (TTL 0).
    async fn keep_alive(&self, id: i64) -> Result<bool, StateError> {
        self.run("lease_keep_alive", |mut c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.is_some_and(|m| m.ttl() > 0))
        })
        .await
    }

    /// Bring `published` to `current`: put new or changed sessions, delete gone ones.
    async fn publish(
        &self,
        lease: i64,
        replica: &str,
        published: &mut BTreeMap<String, LiveSession>,
        current: BTreeMap<String, LiveSession>,
    ) -> Result<(), StateError> {
        let gone: Vec<String> = published
            .keys()
            .filter(|node| !current.contains_key(*node))
            .cloned()
            .collect();
        for node in gone {
            let key = self.keys.session(&node, replica);
            self.run("session_delete", |mut c| async move {
                c.delete(key, None).await
            })
            .await?;
            published.remove(&node);
        }
        for (node, session) in current {
            if published.get(&node) == Some(&session) {
                continue;
            }
            let key = self.keys.session(&node, replica);
            let value = serde_json::to_vec(&session).unwrap_or_default();
            let options = PutOptions::new().with_lease(lease);
            self.run("session_put", |mut c| async move {
                c.put(key, value, Some(options)).await
            })
            .await?;
            published.insert(node, session);
        }
        Ok(())
    }

    /// Every live session of the fleet, by node then replica.
    pub async fn list_sessions(&self) -> Result<Vec<LiveSession>, StateError> {
        let prefix = self.keys.kind("sessions");
        let response = self
            .run("session_list", |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let mut sessions: Vec<LiveSession> = response
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        sessions.sort_by(|a, b| (&a.node, &a.replica).cmp(&(&b.node, &b.replica)));
        Ok(sessions)
    }
}

/// This replica's sessions from its route table.
fn current_sessions(shared: &crate::Shared, replica: &str) -> BTreeMap<String, LiveSession> {
    shared
        .routes
        .sessions()
        .iter()
        .map(|routed| {
            let node = routed.node().to_string();
            let session = LiveSession {
                node: node.clone(),
                replica: replica.to_owned(),
                addresses: routed.ips().to_vec(),
                since_unix: routed.edge_session().since_unix(),
                transport: routed.transport().to_owned(),
            };
            (node, session)
        })
        .collect()
}
