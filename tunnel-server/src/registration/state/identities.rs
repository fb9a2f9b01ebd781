//! The registry of issued identities: which node name holds which node IPs and which
//! certificate (serial, public key) is its current one. A bootstrap token lets its holder
//! choose a name and IPs, so without this record a second join could take over a joined
//! node or squat its address. The registry refuses both unless the token was created to
//! re-provision that node, and lets the edge listener tell a node's current certificate
//! from an older one.
//!
//! An entry holds its name and IPs until the last certificate issued for it expires, revoked
//! or not: a revoked node's addresses stay taken until its certificates are worthless.
//! The file backend keeps `<token file>.identities.json` (mode 0600, written atomically,
//! re-read when another process changed it); [`IdentityStore`] is the seam for a shared
//! backend later.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use protocol::NodeName;
use serde::{Deserialize, Serialize};

use super::files::{read_json, stamp, unix_now, write_json, FileStamp, StoreError};

/// One node's identity as issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedIdentity {
    /// The node IPs bound in its certificates.
    pub ips: Vec<IpAddr>,
    /// Serial of the current certificate, lowercase hex.
    pub serial: String,
    /// SHA-256 (hex) of the current certificate's public key.
    pub key_sha256: String,
    /// Serial of the certificate the current one renewed, accepted once more for renewal
    /// (the answer to a renewal can be lost on its way to the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_serial: Option<String>,
    /// The pool it joined.
    pub pool: String,
    /// The token it joined with (public ID); empty when first seen at a renewal.
    #[serde(default)]
    pub token_id: String,
    /// When the current certificate was issued, Unix seconds.
    pub issued_unix: u64,
    /// When the last certificate issued for this node expires, Unix seconds: the entry
    /// holds the name and IPs until then.
    pub expires_unix: u64,
}

/// The certificate facts the registry compares: serial and public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRef {
    /// Serial, lowercase hex.
    pub serial: String,
    /// SHA-256 (hex) of the public key.
    pub key_sha256: String,
}

/// Every issued identity by node name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identities {
    /// Node name → identity.
    #[serde(default)]
    pub nodes: BTreeMap<String, IssuedIdentity>,
}

/// Why a join or renewal clashes with an issued identity. Audit only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityClash {
    /// The node name belongs to a joined node.
    #[error("node {0} is already joined")]
    NodeExists(String),
    /// An IP is bound to another node.
    #[error("address {ip} belongs to node {owner}")]
    IpHeld {
        /// The contested address.
        ip: IpAddr,
        /// The node holding it.
        owner: String,
    },
    /// A renewal with a certificate that is neither the node's current nor its previous one.
    #[error("certificate {0} is not the node's current one")]
    NotCurrent(String),
}

impl IdentityClash {
    /// Label for audit lines.
    pub fn label(&self) -> &'static str {
        match self {
            IdentityClash::NodeExists(_) => "node_exists",
            IdentityClash::IpHeld { .. } => "ip_taken",
            IdentityClash::NotCurrent(_) => "not_current_certificate",
        }
    }
}

impl Identities {
    /// Drop entries whose every certificate has expired at `now`.
    pub fn prune(&mut self, now: u64) -> bool {
        let before = self.nodes.len();
        self.nodes.retain(|_, e| e.expires_unix > now);
        self.nodes.len() != before
    }

    /// Whether a join of `node` with `ips` at `now` would take a live entry's name or IPs;
    /// allowed only for entries named in the token's `reprovision` list.
    pub fn check_join(
        &self,
        node: &NodeName,
        ips: &[IpAddr],
        reprovision: &[String],
        now: u64,
    ) -> Result<(), IdentityClash> {
        let allowed = |name: &str| reprovision.iter().any(|r| r == name);
        if let Some(entry) = self.nodes.get(node.as_str()) {
            if entry.expires_unix > now && !allowed(node.as_str()) {
                return Err(IdentityClash::NodeExists(node.as_str().to_owned()));
            }
        }
        for (owner, entry) in &self.nodes {
            if owner == node.as_str() || entry.expires_unix <= now || allowed(owner) {
                continue;
            }
            if let Some(ip) = ips.iter().find(|ip| entry.ips.contains(ip)) {
                return Err(IdentityClash::IpHeld {
                    ip: *ip,
                    owner: owner.clone(),
                });
            }
        }
        Ok(())
    }

    /// The live entries a join of `node` with `ips` takes over (its own name, or any of the
    /// IPs): what the audit line of a re-provisioning names.
    pub fn taken_by(&self, node: &NodeName, ips: &[IpAddr], now: u64) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(name, e)| {
                e.expires_unix > now
                    && (name.as_str() == node.as_str() || e.ips.iter().any(|ip| ips.contains(ip)))
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Record a join already checked with [`Identities::check_join`]: the node's entry is
    /// replaced, and re-provisioned nodes give up the IPs it takes (an entry left without
    /// IPs and named differently is removed).
    pub fn record_join(&mut self, node: &NodeName, identity: IssuedIdentity) {
        for (owner, entry) in self.nodes.iter_mut() {
            if owner != node.as_str() {
                entry.ips.retain(|ip| !identity.ips.contains(ip));
            }
        }
        self.nodes
            .retain(|owner, e| owner == node.as_str() || !e.ips.is_empty());
        self.nodes.insert(node.as_str().to_owned(), identity);
    }

    /// Whether a renewal presenting `presented` may renew `node`: its current or previous
    /// certificate, or any certificate of a node the registry has never seen (issued
    /// before the registry existed) as long as its IPs are not another node's.
    pub fn check_renewal(
        &self,
        node: &NodeName,
        ips: &[IpAddr],
        presented: &CertificateRef,
        now: u64,
    ) -> Result<(), IdentityClash> {
        match self.nodes.get(node.as_str()) {
            Some(entry) => {
                let current = entry.serial == presented.serial;
                let previous = entry.previous_serial.as_deref() == Some(&presented.serial);
                if current || previous {
                    Ok(())
                } else {
                    Err(IdentityClash::NotCurrent(presented.serial.clone()))
                }
            }
            None => self.check_join(node, ips, &[], now),
        }
    }

    /// Record a renewal: same name and IPs, the new certificate becomes current.
    pub fn record_renewal(
        &mut self,
        node: &NodeName,
        presented: &CertificateRef,
        mut issued: IssuedIdentity,
    ) {
        if let Some(old) = self.nodes.get(node.as_str()) {
            issued.previous_serial = if old.serial == presented.serial {
                Some(old.serial.clone())
            } else {
                old.previous_serial.clone()
            };
            issued.pool = old.pool.clone();
            issued.token_id = old.token_id.clone();
            issued.expires_unix = issued.expires_unix.max(old.expires_unix);
        }
        self.nodes.insert(node.as_str().to_owned(), issued);
    }

    /// Whether `cert` is `node`'s current certificate: `None` when the registry does not
    /// know the node (a certificate issued outside the registration API).
    pub fn is_current(&self, node: &NodeName, cert: &CertificateRef) -> Option<bool> {
        self.nodes
            .get(node.as_str())
            .map(|e| e.serial == cert.serial && e.key_sha256 == cert.key_sha256)
    }
}

/// Where the registry lives. The file backend below; a shared store later (issue 14).
pub trait IdentityStore: Send + Sync {
    /// `node`'s identity, as of now.
    fn get(&self, node: &NodeName) -> Option<IssuedIdentity>;
    /// Apply `change` to the registry as of now and persist it if `change` returns true.
    /// Callers serialise check-then-record sequences themselves.
    fn update(&self, change: &mut dyn FnMut(&mut Identities) -> bool) -> Result<(), StoreError>;
    /// Every identity, as of now (the admin API's node list).
    fn all(&self) -> Identities;
}

/// `<token file>.identities.json`.
pub fn identities_path(token_file: &Path) -> PathBuf {
    let mut name = token_file.as_os_str().to_owned();
    name.push(".identities.json");
    PathBuf::from(name)
}

/// The registry in a JSON file beside the token file.
pub struct FileIdentityStore {
    path: PathBuf,
    state: Mutex<(Option<FileStamp>, Identities)>,
}

impl FileIdentityStore {
    /// Load the file (missing = no identities yet).
    pub fn open(path: &Path) -> Result<FileIdentityStore, StoreError> {
        let identities = read_json(path)?;
        Ok(FileIdentityStore {
            path: path.to_owned(),
            state: Mutex::new((stamp(path), identities)),
        })
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, (Option<FileStamp>, Identities)> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.path);
        if now != state.0 {
            match read_json::<Identities>(&self.path) {
                Ok(fresh) => *state = (now, fresh),
                // Keep the last good version: a broken file must not free every identity.
                Err(error) => {
                    tracing::warn!(%error, "identity registry unreadable; keeping the previous version")
                }
            }
        }
        state
    }
}

impl IdentityStore for FileIdentityStore {
    fn get(&self, node: &NodeName) -> Option<IssuedIdentity> {
        self.locked().1.nodes.get(node.as_str()).cloned()
    }

    fn all(&self) -> Identities {
        self.locked().1.clone()
    }

    fn update(&self, change: &mut dyn FnMut(&mut Identities) -> bool) -> Result<(), StoreError> {
        let mut state = self.locked();
        let pruned = state.1.prune(unix_now());
        if change(&mut state.1) || pruned {
            write_json(&self.path, &state.1)?;
            state.0 = stamp(&self.path);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeName {
        NodeName::parse(name).unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn issued(ips: &[&str], serial: &str, expires: u64) -> IssuedIdentity {
        IssuedIdentity {
            ips: ips.iter().map(|s| ip(s)).collect(),
            serial: serial.into(),
            key_sha256: format!("key-{serial}"),
            previous_serial: None,
            pool: "idc".into(),
            token_id: "abcdef".into(),
            issued_unix: 100,
            expires_unix: expires,
        }
    }
    fn cert(serial: &str) -> CertificateRef {
        CertificateRef {
            serial: serial.into(),
            key_sha256: format!("key-{serial}"),
        }
    }

    #[test]
    fn a_joined_name_or_ip_is_refused_unless_reprovisioned() {
        let mut r = Identities::default();
        r.record_join(&node("node-a"), issued(&["10.0.0.1"], "01", 1000));
        let again = r.check_join(&node("node-a"), &[ip("10.0.0.1")], &[], 500);
        assert_eq!(again, Err(IdentityClash::NodeExists("node-a".into())));
        let squat = r.check_join(&node("node-z"), &[ip("10.0.0.1")], &[], 500);
        assert_eq!(squat.unwrap_err().label(), "ip_taken");
        assert!(r
            .check_join(&node("node-b"), &[ip("10.0.0.2")], &[], 500)
            .is_ok());
        // Re-provisioning node-a as a new name takes its IP; node-a is gone.
        let reprovision = ["node-a".to_string()];
        assert!(r
            .check_join(&node("node-z"), &[ip("10.0.0.1")], &reprovision, 500)
            .is_ok());
        r.record_join(&node("node-z"), issued(&["10.0.0.1"], "02", 1000));
        assert!(!r.nodes.contains_key("node-a"));
        // Once every certificate of an entry has expired, its name and IPs are free.
        assert!(r
            .check_join(&node("node-y"), &[ip("10.0.0.1")], &[], 1000)
            .is_ok());
        assert!(r.prune(1000));
        assert!(r.nodes.is_empty());
    }

    #[test]
    fn renewal_needs_the_current_or_previous_certificate_and_keeps_the_identity() {
        let mut r = Identities::default();
        let a = node("node-a");
        r.record_join(&a, issued(&["10.0.0.1"], "01", 1000));
        assert_eq!(r.is_current(&a, &cert("01")), Some(true));
        assert_eq!(r.is_current(&node("node-x"), &cert("01")), None);
        r.check_renewal(&a, &[ip("10.0.0.1")], &cert("01"), 500)
            .unwrap();
        r.record_renewal(&a, &cert("01"), issued(&["10.0.0.1"], "02", 2000));
        assert_eq!(r.is_current(&a, &cert("01")), Some(false));
        assert_eq!(r.is_current(&a, &cert("02")), Some(true));
        // The answer may have been lost: the previous certificate renews once more.
        r.check_renewal(&a, &[ip("10.0.0.1")], &cert("01"), 500)
            .unwrap();
        let old = r.check_renewal(&a, &[ip("10.0.0.1")], &cert("00"), 500);
        assert_eq!(old.unwrap_err().label(), "not_current_certificate");
        let entry = &r.nodes["node-a"];
        assert_eq!((entry.pool.as_str(), entry.expires_unix), ("idc", 2000));
    }

    #[test]
    fn the_file_survives_a_restart_and_sees_another_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = identities_path(&dir.path().join("tokens.json"));
        let one = FileIdentityStore::open(&path).unwrap();
        let two = FileIdentityStore::open(&path).unwrap();
        let far = unix_now() + 3600;
        one.update(&mut |r| {
            r.record_join(&node("node-a"), issued(&["10.0.0.1"], "01", far));
            true
        })
        .unwrap();
        assert_eq!(two.get(&node("node-a")).unwrap().serial, "01");
        let reopened = FileIdentityStore::open(&path).unwrap();
        assert!(reopened.get(&node("node-a")).is_some());
        // Expired entries leave the file at the next write.
        one.update(&mut |r| {
            r.record_join(&node("node-b"), issued(&["10.0.0.2"], "02", 1));
            true
        })
        .unwrap();
        one.update(&mut |_| false).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("node-b") && text.contains("node-a"),
            "{text}"
        );
    }
}
