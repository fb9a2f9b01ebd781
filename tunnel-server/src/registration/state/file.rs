//! The file backend: today's single-replica state, nothing to install. Tokens in the
//! operator's token file, use counts and certified keys in `<token file>.usage.json`, the
//! identity registry in `<token file>.identities.json`, revocations in the revocation file
//! (polled), live sessions in memory. One process decides at a time (a mutex around each
//! decision); another replica with its own files would decide alone, which is why replicas
//! use the etcd backend.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use protocol::NodeName;

use super::decision::{Declined, IssueFn, Issued, JoinClaim, Joined, RenewClaim, StateError};
use super::identities::{identities_path, FileIdentityStore, IdentityStore};
use super::revocation::{revoke_node, RevocationList};
use super::sessions::LocalSessions;
use super::store::{Refusal, TokenStore};
use crate::registration::RegistrationConfig;

/// The state of one replica in files.
pub struct FileState {
    tokens: TokenStore,
    identities: Arc<FileIdentityStore>,
    revocations: Arc<RevocationList>,
    revocation_file: PathBuf,
    /// Held from the identity check to the identity record of one join or renewal, so two
    /// concurrent joins cannot both claim a free name or address.
    issuing: Mutex<()>,
    /// This replica's sessions.
    pub sessions: LocalSessions,
}

impl FileState {
    /// Open the files named by `config` (missing files are empty state).
    pub fn open(config: &RegistrationConfig) -> Result<FileState, StateError> {
        let revocation_file = config.revocation_path();
        Ok(FileState {
            tokens: TokenStore::open(&config.token_file)?,
            identities: Arc::new(FileIdentityStore::open(&identities_path(
                &config.token_file,
            ))?),
            revocations: Arc::new(RevocationList::open(&revocation_file)?),
            revocation_file,
            issuing: Mutex::new(()),
            sessions: LocalSessions::default(),
        })
    }

    /// The revocation list the edge listener checks.
    pub fn revocations(&self) -> Arc<RevocationList> {
        self.revocations.clone()
    }

    /// The identity registry the edge listener reads.
    pub fn identities(&self) -> Arc<dyn IdentityStore> {
        self.identities.clone()
    }

    /// When token `id` was created, if it exists.
    pub fn token_created(&self, id: &str) -> Option<u64> {
        self.tokens.created_unix(id)
    }

    /// Revoke `node` now; returns the revocation time.
    pub fn revoke_node(&self, node: &NodeName) -> Result<u64, StateError> {
        let at = revoke_node(&self.revocation_file, node)?;
        self.revocations.refresh();
        Ok(at)
    }

    /// Decide a join: token, then identity registry, then the certificate, then the use
    /// count, key and identity records, all under one lock.
    pub fn join(&self, claim: JoinClaim<'_>, issue: &mut IssueFn<'_>) -> Result<Joined, Declined> {
        let JoinClaim {
            token,
            node,
            ips,
            public_key,
            now,
            certificate_expires,
        } = claim;
        let _issuing = self.issuing.lock().unwrap_or_else(|p| p.into_inner());
        // Token first (nothing used up yet), then the registry, then the use counts.
        let admission = self
            .tokens
            .check(token, node, ips, public_key, now)
            .map_err(Declined::Token)?;
        let mut clash = None;
        let mut reprovisioned = Vec::new();
        self.identities
            .update(&mut |registry| {
                match registry.check_join(node, ips, &admission.reprovision, now) {
                    Ok(()) => reprovisioned = registry.taken_by(node, ips, now),
                    Err(c) => clash = Some(c),
                }
                false
            })
            .map_err(StateError::from)?;
        if let Some(clash) = clash {
            return Err(Declined::Identity(clash));
        }
        // Issue before recording, so a failed issue uses nothing up; under the lock the
        // admission below answers as the check above did.
        let issued = issue(&admission).map_err(Declined::Issue)?;
        let admission = self
            .tokens
            .admit(token, node, ips, public_key, now, certificate_expires)
            .map_err(Declined::Token)?;
        self.record(&mut |registry| registry.record_join(node, issued.identity.clone()));
        Ok(Joined {
            admission,
            issued,
            reprovisioned,
        })
    }

    /// Decide a renewal: the presented certificate must be the node's current (or previous)
    /// one and the CSR key new.
    pub fn renew(
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
        let _issuing = self.issuing.lock().unwrap_or_else(|p| p.into_inner());
        let mut clash = None;
        self.identities
            .update(&mut |registry| {
                clash = registry.check_renewal(node, ips, presented, now).err();
                false
            })
            .map_err(StateError::from)?;
        if let Some(clash) = clash {
            return Err(Declined::Identity(clash));
        }
        if !self
            .tokens
            .remember_key(public_key, now, certificate_expires)
        {
            return Err(Declined::Token(Refusal::KeyReused));
        }
        let issued = issue().map_err(Declined::Issue)?;
        self.record(&mut |registry| {
            registry.record_renewal(node, presented, issued.identity.clone())
        });
        Ok(issued)
    }

    /// Persist a change to the registry. A failed write is logged: the in-memory registry
    /// holds it, so this replica keeps enforcing it.
    fn record(&self, change: &mut dyn FnMut(&mut super::identities::Identities)) {
        let recorded = self.identities.update(&mut |registry| {
            change(registry);
            true
        });
        if let Err(error) = recorded {
            tracing::warn!(%error, "could not persist the identity registry");
        }
    }
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
