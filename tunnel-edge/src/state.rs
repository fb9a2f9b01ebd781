//! The node's state directory, as `join` writes it and `run --state-dir` reads it (0700):
//! `key.pem` (0600), `cert.pem`, `ca.pem`, `node.json` (node name, IPs, pool, labels,
//! taints, extra ports, endpoints, registration server) and `kubelet.env`
//! (`KUBELET_EXTRA_ARGS` with the pool's `--node-labels` and `--register-with-taints`).

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
        self.dir.join("key.pem")
    }
    /// The node's certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    /// The tunnel CA bundle.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
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
    write_file(&state.ca(), credentials.ca_bundle_pem.as_bytes(), 0o644)?;
    // Key first, then certificate: a reader between the two renames sees a new key with the
    // old certificate and fails the TLS setup, then retries; never a silent mix-up.
    write_file(&state.key(), key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&state.cert(), credentials.certificate_pem.as_bytes(), 0o644)?;
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
