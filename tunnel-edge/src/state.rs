//! The node's state directory, as `join` writes it and `run --state-dir` reads it (0700):
//! `key.pem` (0600), `cert.pem`, `ca.pem`, `node.json` (node name, IPs, pool, labels,
//! taints, extra ports, endpoints, registration server) and `kubelet.env`
//! (`KUBELET_EXTRA_ARGS` with the pool's `--node-labels` and `--register-with-taints`).
//!
//! Key, certificate and CA bundle change together (join, renewal), and a crash between two
//! renames would leave a key that does not match its certificate: a node that can neither
//! connect nor renew. So they live in a generation directory (`gen-<n>/`) written in full
//! and made durable first, and one symlink, `current`, is switched to it with a single
//! rename. `key.pem`, `cert.pem` and `ca.pem` at the top are symlinks into `current/` for
//! tools that read them there; the edge itself reads through `current` when it exists, so
//! a directory caught half-way through migrating from the older flat layout (regular files
//! at the top, which still load) never mixes the two.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tunnel_io::registration::pb::Credentials;

/// What the node learned when it joined, kept in `node.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeState {
    /// The node name (the certificate's identity).
    pub node_name: String,
    /// The node IPs in the certificate.
    pub node_ips: Vec<IpAddr>,
    /// Node pool.
    pub pool: String,
    /// Kubelet labels of the pool.
    pub labels: BTreeMap<String, String>,
    /// Kubelet taints of the pool.
    pub taints: Vec<String>,
    /// Extra local ports the pool allows this edge to dial.
    pub extra_ports: Vec<u16>,
    /// Tunnel endpoints the server advertised.
    pub tunnel_endpoints: Vec<String>,
    /// The registration API (`host:port`), for renewal.
    pub registration_server: String,
    /// Name verified in the server certificate.
    pub server_name: String,
}

/// Files of a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// The directory.
    pub dir: PathBuf,
}

impl StateDir {
    /// The state directory at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }
    /// The node's private key.
    pub fn key(&self) -> PathBuf {
        self.credential(KEY)
    }
    /// The node's certificate.
    pub fn cert(&self) -> PathBuf {
        self.credential(CERT)
    }
    /// The tunnel CA bundle.
    pub fn ca(&self) -> PathBuf {
        self.credential(CA)
    }

    /// `current/<name>` once a generation exists, else `<name>` (the older flat layout).
    fn credential(&self, name: &str) -> PathBuf {
        let current = self.dir.join(CURRENT);
        if std::fs::symlink_metadata(&current).is_ok() {
            current.join(name)
        } else {
            self.dir.join(name)
        }
    }
    /// `node.json`.
    pub fn node(&self) -> PathBuf {
        self.dir.join("node.json")
    }
    /// `kubelet.env`.
    pub fn kubelet_env(&self) -> PathBuf {
        self.dir.join("kubelet.env")
    }

    /// Read `node.json`.
    pub fn load(&self) -> anyhow::Result<NodeState> {
        let path = self.node();
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
    }
}

/// File names of the credentials inside a generation (and of their links at the top).
const KEY: &str = "key.pem";
const CERT: &str = "cert.pem";
const CA: &str = "ca.pem";
/// The symlink naming the generation in use.
const CURRENT: &str = "current";
/// Prefix of generation directories.
const GENERATION_PREFIX: &str = "gen-";

/// Write `files` into a new generation directory, make it durable, switch `current` to it
/// with one rename, then point the top-level links into `current` and remove older
/// generations (and any left half-written by a crash).
fn switch_generation(state: &StateDir, files: &[(&str, &[u8], u32)]) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!("{GENERATION_PREFIX}{nanos}");
    let generation = state.dir.join(&name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&generation)
        .with_context(|| format!("create {}", generation.display()))?;
    for (file, bytes, mode) in files {
        write_file(&generation.join(file), bytes, *mode)?;
    }
    sync_dir(&generation)?;
    // The switch: one rename of a symlink over `current`.
    let link = state.dir.join(".current.tmp");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&name, &link)
        .with_context(|| format!("create {}", link.display()))?;
    std::fs::rename(&link, state.dir.join(CURRENT))
        .with_context(|| format!("switch {} to {name}", state.dir.join(CURRENT).display()))?;
    sync_dir(&state.dir)?;
    for (file, _, _) in files {
        point_into_current(&state.dir, file)?;
    }
    remove_other_generations(&state.dir, &name);
    Ok(())
}

/// Make `<dir>/<file>` a symlink to `current/<file>` (replacing a regular file of the older
/// layout with one rename).
fn point_into_current(dir: &Path, file: &str) -> anyhow::Result<()> {
    let target = Path::new(CURRENT).join(file);
    let path = dir.join(file);
    if std::fs::read_link(&path).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let tmp = dir.join(format!(".{file}.link.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("link {}", path.display()))
}

/// Best effort: a leftover generation costs a few KiB and is retried next time.
fn remove_other_generations(dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(GENERATION_PREFIX) && name != keep {
            if let Err(error) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(%error, dir = %entry.path().display(), "could not remove an old credential generation");
            }
        }
    }
}

/// Make renames and new entries in `dir` durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("sync {}", dir.display()))
}

pub(crate) fn write_state(
    state: &StateDir,
    key: &rcgen::KeyPair,
    credentials: &Credentials,
    node: Option<&NodeState>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&state.dir)
        .with_context(|| format!("create {}", state.dir.display()))?;
    std::fs::set_permissions(&state.dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", state.dir.display()))?;
    anyhow::ensure!(
        !tunnel_io::tls::certs_from_pem(credentials.certificate_pem.as_bytes()).is_empty()
            && !tunnel_io::tls::certs_from_pem(credentials.ca_bundle_pem.as_bytes()).is_empty(),
        "the server's answer holds no certificate"
    );
    switch_generation(
        state,
        &[
            (KEY, key.serialize_pem().as_bytes(), 0o600),
            (CERT, credentials.certificate_pem.as_bytes(), 0o644),
            (CA, credentials.ca_bundle_pem.as_bytes(), 0o644),
        ],
    )?;
    if let Some(node) = node {
        write_file(&state.node(), &serde_json::to_vec_pretty(node)?, 0o644)?;
        let labels: Vec<String> = node
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut args = Vec::new();
        if !labels.is_empty() {
            args.push(format!("--node-labels={}", labels.join(",")));
        }
        if !node.taints.is_empty() {
            args.push(format!("--register-with-taints={}", node.taints.join(",")));
        }
        let env = format!("KUBELET_EXTRA_ARGS=\"{}\"\n", args.join(" "));
        write_file(&state.kubelet_env(), env.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// Write a file atomically with `mode` (set before it appears at its path).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("create {}", tmp.display()))?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key and a certificate for it, as the server's answer would carry them.
    fn issued() -> (rcgen::KeyPair, Credentials) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["node-a".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let credentials = Credentials {
            certificate_pem: cert.pem(),
            ca_bundle_pem: cert.pem(),
            ..Default::default()
        };
        (key, credentials)
    }

    /// Whether the state directory's key and certificate belong together, as loaded.
    fn loads_a_matching_pair(state: &StateDir) -> bool {
        let key = std::fs::read_to_string(state.key()).unwrap();
        let key = rcgen::KeyPair::from_pem(&key).unwrap();
        let certs = tunnel_io::tls::load_certs(&state.cert()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(certs[0].as_ref()).unwrap();
        cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
    }

    #[test]
    fn a_crash_between_steps_of_a_renewal_still_loads_a_matching_pair() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let (key, credentials) = issued();
        write_state(&state, &key, &credentials, None).unwrap();
        assert!(loads_a_matching_pair(&state));
        let first = std::fs::read_to_string(state.cert()).unwrap();

        // A renewal that crashed after writing the new key into its generation, before the
        // certificate and before the switch, leaving the switch link half made too.
        let (new_key, _) = issued();
        let half = state.dir.join("gen-9");
        std::fs::create_dir(&half).unwrap();
        std::fs::write(half.join(KEY), new_key.serialize_pem()).unwrap();
        std::os::unix::fs::symlink("gen-9", state.dir.join(".current.tmp")).unwrap();
        assert!(loads_a_matching_pair(&state));
        assert_eq!(std::fs::read_to_string(state.cert()).unwrap(), first);

        // The next renewal completes and clears the leftovers.
        let (key, credentials) = issued();
        write_state(&state, &key, &credentials, None).unwrap();
        assert!(loads_a_matching_pair(&state));
        assert_ne!(std::fs::read_to_string(state.cert()).unwrap(), first);
        assert!(!half.exists());
        let generations = std::fs::read_dir(&state.dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with(GENERATION_PREFIX)
            })
            .count();
        assert_eq!(generations, 1);
        // The top-level names still lead to the pair, the key still private.
        let top = StateDir::new(&state.dir);
        let mode = std::fs::metadata(top.dir.join(KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read(top.dir.join(CERT)).unwrap(),
            std::fs::read(state.cert()).unwrap()
        );
    }

    #[test]
    fn the_flat_layout_of_older_joins_loads_and_migrates_without_a_mixed_pair() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let (old_key, old) = issued();
        std::fs::write(state.dir.join(KEY), old_key.serialize_pem()).unwrap();
        std::fs::write(state.dir.join(CERT), &old.certificate_pem).unwrap();
        std::fs::write(state.dir.join(CA), &old.ca_bundle_pem).unwrap();
        assert_eq!(state.key(), state.dir.join(KEY));
        assert!(loads_a_matching_pair(&state));

        // Half-way through migrating: the generation is current, the flat files still there
        // (a crash before the links replaced them). The pair comes from `current`.
        let (key, credentials) = issued();
        switch_generation(
            &state,
            &[
                (KEY, key.serialize_pem().as_bytes(), 0o600),
                (CERT, credentials.certificate_pem.as_bytes(), 0o644),
            ],
        )
        .unwrap();
        std::fs::remove_file(state.dir.join(CERT)).unwrap();
        std::fs::write(state.dir.join(CERT), &old.certificate_pem).unwrap();
        assert!(loads_a_matching_pair(&state));
        assert_eq!(
            std::fs::read_to_string(state.cert()).unwrap(),
            credentials.certificate_pem
        );
        write_state(&state, &key, &credentials, None).unwrap();
        assert!(std::fs::read_link(state.dir.join(CERT)).is_ok());
        assert!(loads_a_matching_pair(&state));
    }
}
