//! [`StateStore`]: the one interface the registration service, the operator commands and the
//! revocation watcher use, dispatching to the configured backend. An enum rather than a
//! trait object: the backends are known, and their decisions are async for the shared one.

use std::sync::Arc;

use protocol::NodeName;
use tokio_util::sync::CancellationToken;

use super::config::{Backend, StateConfig};
use super::decision::{Declined, IssueFn, Issued, JoinClaim, Joined, RenewClaim, StateError};
use super::etcd::EtcdState;
use super::file::FileState;
use super::identities::IdentityStore;
use super::revocation::RevocationList;
use super::sessions::LiveSession;
use crate::registration::RegistrationConfig;

/// The control state, in one of its backends.
// One per process, behind an `Arc`: the size of the etcd client costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum StateStore {
    /// Files beside the token file: one replica.
    File(FileState),
    /// An etcd cluster: any number of replicas.
    Etcd(EtcdState),
}

impl StateStore {
    /// Open the backend `state` names, for the registration section `registration`.
    /// The etcd backend does not wait for etcd: a replica starts while it is down.
    pub async fn open(
        registration: &RegistrationConfig,
        state: &StateConfig,
    ) -> Result<StateStore, StateError> {
        match state.backend {
            Backend::File => Ok(StateStore::File(FileState::open(registration)?)),
            Backend::Etcd => Ok(StateStore::Etcd(EtcdState::open(state).await?)),
        }
    }

    /// Count store operations in the server's metrics (the etcd backend's).
    pub fn count_in(&self, metrics: &Arc<crate::metrics::state::StateMetrics>) {
        if let StateStore::Etcd(e) = self {
            e.count_in(metrics);
        }
    }

    /// The revocation list the edge listener and frontends check: in memory, kept current
    /// by [`StateStore::watch_revocations`].
    pub fn revocations(&self) -> Arc<RevocationList> {
        match self {
            StateStore::File(f) => f.revocations(),
            StateStore::Etcd(e) => e.revocations(),
        }
    }

    /// The identity registry as the edge listener reads it (in memory).
    pub fn identities(&self) -> Arc<dyn IdentityStore> {
        match self {
            StateStore::File(f) => f.identities(),
            StateStore::Etcd(e) => e.identities(),
        }
    }

    /// When token `id` was created, if it exists.
    pub async fn token_created(&self, id: &str) -> Result<Option<u64>, StateError> {
        match self {
            StateStore::File(f) => Ok(f.token_created(id)),
            StateStore::Etcd(e) => e.token_created(id).await,
        }
    }

    /// Decide a join; see [`FileState::join`].
    pub async fn join(
        &self,
        claim: JoinClaim<'_>,
        issue: &mut IssueFn<'_>,
    ) -> Result<Joined, Declined> {
        match self {
            StateStore::File(f) => f.join(claim, issue),
            StateStore::Etcd(e) => e.join(claim, issue).await,
        }
    }

    /// Decide a renewal; see [`FileState::renew`].
    pub async fn renew(
        &self,
        claim: RenewClaim<'_>,
        issue: &mut (dyn FnMut() -> Result<Issued, &'static str> + Send),
    ) -> Result<Issued, Declined> {
        match self {
            StateStore::File(f) => f.renew(claim, issue),
            StateStore::Etcd(e) => e.renew(claim, issue).await,
        }
    }

    /// Revoke `node` now; returns the revocation time (Unix seconds).
    pub async fn revoke_node(&self, node: &NodeName) -> Result<u64, StateError> {
        match self {
            StateStore::File(f) => f.revoke_node(node),
            StateStore::Etcd(e) => e.revoke_node(node).await,
        }
    }

    /// Record this replica's session to `session.node`.
    pub async fn put_session(&self, session: LiveSession) -> Result<(), StateError> {
        match self {
            StateStore::File(f) => {
                f.sessions.put(session);
                Ok(())
            }
            // Published from the route table under the replica's lease (see
            // `EtcdState::publish_sessions`), not call by call.
            StateStore::Etcd(_) => Ok(()),
        }
    }

    /// Forget this replica's session to `node`.
    pub async fn remove_session(&self, node: &NodeName) -> Result<(), StateError> {
        match self {
            StateStore::File(f) => {
                f.sessions.remove(node.as_str());
                Ok(())
            }
            StateStore::Etcd(_) => Ok(()),
        }
    }

    /// Every live session the store knows (the file backend: this replica's).
    pub async fn list_sessions(&self) -> Result<Vec<LiveSession>, StateError> {
        match self {
            StateStore::File(f) => Ok(f.sessions.list()),
            StateStore::Etcd(e) => e.list_sessions().await,
        }
    }

    /// Keep [`StateStore::revocations`] current and close the sessions of newly revoked
    /// nodes, until `cancel` (the etcd backend also keeps the identity view current,
    /// publishes this replica's live sessions and prunes expired records).
    pub async fn watch_revocations(&self, shared: Arc<crate::Shared>, cancel: CancellationToken) {
        match self {
            StateStore::File(f) => super::revocation::watch(f.revocations(), shared, cancel).await,
            StateStore::Etcd(e) => {
                let replica = shared.replica.id.to_string();
                tokio::join!(
                    e.watch_views(shared.clone(), cancel.clone()),
                    e.prune_expired(replica, cancel.clone()),
                    e.publish_sessions(shared, cancel),
                );
            }
        }
    }
}
