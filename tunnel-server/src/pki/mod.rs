//! Certificate authorities and identities: generating and loading the tunnel and frontend CAs,
//! issuing server/edge/client certificates, and reading an edge's node identity back out of a
//! verified client certificate. It does no TLS itself and never trusts a name from anywhere else.
//!
//! [`ca`] holds a CA and issues certificates; [`files`] writes PEM files and the `ca init`
//! directory; [`names`] builds and checks the names and validity windows they carry.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

mod ca;
mod files;
mod names;
#[cfg(test)]
mod tests;

pub use ca::{certificate_facts, certificate_facts_pem, issued_unix, Ca, CertificateFacts};
pub use files::{init_ca_dir, write_pem, CaLayout};
pub use tunnel_io::identity::{edge_identity_from_der, EdgeIdentity, IdentityError};

/// Default lifetime of a CA created by `ca init`: 10 years. Rotating a CA means re-joining every
/// edge, so it is long-lived; its key never leaves the server's secret.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of the tunnel server's certificate: 1 year, renewed with the deployment.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default lifetime of an edge client certificate: 30 days. Short, because revocation is by
/// refusing sessions and the edge renews over its authenticated session well before expiry.
pub const EDGE_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default lifetime of the frontend client certificate kube-apiserver presents: 1 year.
pub const FRONTEND_CLIENT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far `notBefore` is backdated: 5 minutes, so a peer whose clock is slightly behind ours
/// does not reject a certificate we have just issued.
pub(crate) const CLOCK_SKEW_ALLOWANCE: time::Duration = time::Duration::minutes(5);
/// Upper bound of an X.520 common name, in characters (`ub-common-name`).
pub(crate) const MAX_COMMON_NAME_LEN: usize = 64;

/// Errors creating, loading, issuing or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A name cannot be put into a certificate.
    #[error("invalid certificate name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// A server certificate was requested with neither DNS names nor IP addresses.
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoSubjectAltNames,
    /// The requested validity is zero or too large to represent.
    #[error("invalid certificate validity {0:?}")]
    InvalidValidity(Duration),
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file or directory could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file exists and overwriting was not asked for.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file holds no usable PEM certificate or private key.
    #[error("{}: {reason}", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate is not a CA certificate (no `basicConstraints CA:TRUE`).
    #[error("{} is not a CA certificate", path.display())]
    NotCa {
        /// The certificate file.
        path: PathBuf,
    },
    /// The private key does not belong to the CA certificate.
    #[error("{} is not the private key of {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The CA's subject cannot be reproduced byte for byte, so certificates signed with it would
    /// not chain to it.
    #[error("{}: unsupported CA certificate: {reason}", path.display())]
    UnsupportedCa {
        /// The certificate file.
        path: PathBuf,
        /// What could not be reproduced.
        reason: String,
    },
}

/// A freshly issued certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    /// The certificate, PEM (`CERTIFICATE`).
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8 `PRIVATE KEY`).
    pub key_pem: String,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is a secret: never let it reach a log line.
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}
