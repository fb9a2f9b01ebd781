//! What a state backend is asked to decide and what it answers, the same for every backend:
//! a join or renewal is one decision (token, use count, certified key, identity registry)
//! taken atomically by the backend, with the certificate issued inside it so that what is
//! recorded is exactly what the node gets.

use std::net::IpAddr;

use protocol::NodeName;

use super::files::StoreError;
use super::identities::{CertificateRef, IdentityClash, IssuedIdentity};
use super::store::{Admission, Refusal};
use super::tokens::BootstrapToken;

/// The shared store could not be read or written: joins, renewals and token changes fail
/// closed with this; the data path never sees it.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The backend did not answer in time or refused the operation (etcd down, no quorum).
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// A file of the file backend, or a record in the store, is unreadable or invalid.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A join, validated by the registration service (token format, CSR claims), to be decided.
#[derive(Debug, Clone, Copy)]
pub struct JoinClaim<'a> {
    /// The presented bootstrap token.
    pub token: &'a BootstrapToken,
    /// The node name the caller asks for.
    pub node: &'a NodeName,
    /// The node IPs it asks for.
    pub ips: &'a [IpAddr],
    /// The CSR's public key (DER): certified at most once.
    pub public_key: &'a [u8],
    /// Unix seconds.
    pub now: u64,
    /// When a certificate issued now expires (Unix seconds): the key is remembered until then.
    pub certificate_expires: u64,
}

/// A renewal by a node presenting a verified certificate.
#[derive(Debug, Clone, Copy)]
pub struct RenewClaim<'a> {
    /// The node, from its certificate.
    pub node: &'a NodeName,
    /// Its IPs, from its certificate.
    pub ips: &'a [IpAddr],
    /// The presented certificate.
    pub presented: &'a CertificateRef,
    /// The CSR's public key (DER).
    pub public_key: &'a [u8],
    /// Unix seconds.
    pub now: u64,
    /// When a certificate issued now expires (Unix seconds).
    pub certificate_expires: u64,
}

/// A certificate issued inside a decision.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub pem: String,
    /// What the identity registry records for it.
    pub identity: IssuedIdentity,
}

/// Issues the certificate once the backend has admitted the request; an error is a label
/// for the audit log (the request is refused and nothing is recorded).
pub type IssueFn<'f> = dyn FnMut(&Admission) -> Result<Issued, &'static str> + Send + 'f;

/// An admitted join.
#[derive(Debug)]
pub struct Joined {
    /// What the token allowed.
    pub admission: Admission,
    /// The certificate.
    pub issued: Issued,
    /// Nodes whose name or IPs this join took over (the token allowed it).
    pub reprovisioned: Vec<String>,
}

/// Why a join or renewal was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Declined {
    /// The token refuses it (or the key was certified before).
    #[error("{0}")]
    Token(Refusal),
    /// The name or an IP belongs to another node, or the certificate is not current.
    #[error("{0}")]
    Identity(IdentityClash),
    /// Issuing the certificate failed.
    #[error("{0}")]
    Issue(&'static str),
    /// The store is unavailable: fail closed.
    #[error(transparent)]
    State(#[from] StateError),
}
