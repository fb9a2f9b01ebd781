//! [`StateStore`]: the one interface the registration service, the operator commands and the
//! revocation watcher use, dispatching to the configured backend. An enum rather than a
//! trait object: the backends are known, and their decisions are async for the shared one.

use std::sync::Arc;

use protocol::NodeName;
use tokio_util::sync::CancellationToken;

use super::config::{Backend, StateConfig};
use super::decision::{Declined, IssueFn, Issued, JoinClaim, Joined, RenewClaim, StateError};
use super::file::FileState;
use super::identities::IdentityStore;
use super::revocation::RevocationList;
use super::sessions::LiveSession;
use crate::registration::RegistrationConfig;

/// The control state, in one of its backends.
pub enum StateStore {
    /// Files beside the token file: one replica.
    File(FileState),
}

impl StateStore {
    /// Open the backend `state` names, for the registration section `registration`.
    pub fn open(
        registration: &RegistrationConfig,
        state: &StateConfig,
    ) -> Result<StateStore, StateError> {
        match state.backend {
            Backend::File => Ok(StateStore::File(FileState::open(registration)?)),
            // Fail closed at startup rather than run replicas that each decide alone.
            Backend::Etcd => Err(StateError::Unavailable(
                "key `state.backend`: the etcd backend is not part of this build yet; use \"file\""
                    .into(),
            )),
        }
    }

    /// The revocation list the edge listener and frontends check: in memory, kept current
    /// by [`StateStore::watch_revocations`].
    pub fn revocations(&self) -> Arc<RevocationList> {
        match self {
            StateStore::File(f) => f.revocations(),
        }
    }

    /// The identity registry as the edge listener reads it (in memory).
    pub fn identities(&self) -> Arc<dyn IdentityStore> {
        match self {
            StateStore::File(f) => f.identities(),
        }
    }

    /// When token `id` was created, if it exists.
    pub async fn token_created(&self, id: &str) -> Result<Option<u64>, StateError> {
        match self {
            StateStore::File(f) => Ok(f.token_created(id)),
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
        }
    }

    /// Revoke `node` now; returns the revocation time (Unix seconds).
    pub async fn revoke_node(&self, node: &NodeName) -> Result<u64, StateError> {
        match self {
            StateStore::File(f) => f.revoke_node(node),
        }
    }

    /// Record this replica's session to `session.node`.
    pub async fn put_session(&self, session: LiveSession) -> Result<(), StateError> {
        match self {
            StateStore::File(f) => {
                f.sessions.put(session);
                Ok(())
            }
        }
    }

    /// Forget this replica's session to `node`.
    pub async fn remove_session(&self, node: &NodeName) -> Result<(), StateError> {
        match self {
            StateStore::File(f) => {
                f.sessions.remove(node.as_str());
                Ok(())
            }
        }
    }

    /// Every live session the store knows (the file backend: this replica's).
    pub async fn list_sessions(&self) -> Result<Vec<LiveSession>, StateError> {
        match self {
            StateStore::File(f) => Ok(f.sessions.list()),
        }
    }

    /// Keep [`StateStore::revocations`] current and close the sessions of newly revoked
    /// nodes, until `cancel`.
    pub async fn watch_revocations(&self, shared: Arc<crate::Shared>, cancel: CancellationToken) {
        match self {
            StateStore::File(f) => super::revocation::watch(f.revocations(), shared, cancel).await,
        }
    }
}
