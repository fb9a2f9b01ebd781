//! What the edge listener knows of a session's certificate beyond its identity: its serial
//! (named in audit lines, so an address conflict says which two certificates met) and
//! whether it is its node's current certificate in the identity registry. A session with an
//! older certificate of the node (re-provisioned elsewhere, or renewed since) may serve
//! when the node has no session, but never replaces the node's live session.

use protocol::NodeName;

use crate::Shared;

/// A session's certificate as the route table sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCertificate {
    /// Serial, lowercase hex (`?` when unreadable).
    pub serial: String,
    /// Whether the registry names it the node's current certificate (true when the registry
    /// does not know the node: certificates issued outside the registration API).
    pub current: bool,
    /// When it expires, Unix seconds (unknown when unreadable), for `/api/v1/edges`.
    pub expires_unix: Option<u64>,
}

impl Default for SessionCertificate {
    fn default() -> Self {
        SessionCertificate {
            serial: "?".into(),
            current: true,
            expires_unix: None,
        }
    }
}

impl SessionCertificate {
    /// Look `der` (the verified leaf of `node`) up in the registry, if there is one.
    pub fn of(shared: &Shared, node: &NodeName, der: &[u8]) -> SessionCertificate {
        let Some(facts) = crate::pki::certificate_facts(der) else {
            return SessionCertificate {
                serial: "?".into(),
                current: false,
                expires_unix: None,
            };
        };
        let current = match shared.identities.as_ref().and_then(|r| r.get(node)) {
            Some(e) => e.serial == facts.serial && e.key_sha256 == facts.key_sha256,
            None => true,
        };
        SessionCertificate {
            serial: facts.serial,
            current,
            expires_unix: Some(facts.expires_unix),
        }
    }
}
