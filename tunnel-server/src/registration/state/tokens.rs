//! Bootstrap tokens: the Kubernetes format (`[a-z0-9]{6}.[a-z0-9]{16}`) and the token file
//! the operator manages (`tunnel-server token create|list|revoke`). Only a SHA-256 of each
//! secret is stored; the secret itself lives in a redacting [`Secret`] and is printed once,
//! by `token create`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tunnel_io::secret::Secret;

use super::files::{read_json, unix_now, write_json, StoreError};
use super::usage::{usage_path, Usage};

/// Length of a token ID (public: it names the token in files and logs).
pub const TOKEN_ID_LEN: usize = 6;
/// Length of a token secret.
pub const TOKEN_SECRET_LEN: usize = 16;
/// Default token lifetime: 24 hours, as kubeadm's.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest node-name pattern accepted, in bytes.
const MAX_PATTERN_LEN: usize = 253;
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A token in clear, as the node presents it: `<id>.<secret>`.
#[derive(Clone)]
pub struct BootstrapToken {
    /// The public half.
    pub id: String,
    /// The secret half.
    pub secret: Secret,
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootstrapToken({}.<redacted>)", self.id)
    }
}

/// The token text is not `<6 of [a-z0-9]>.<16 of [a-z0-9]>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed bootstrap token (want [a-z0-9]{{6}}.[a-z0-9]{{16}})")]
pub struct MalformedToken;

fn is_token_part(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| ALPHABET.contains(&b))
}

impl BootstrapToken {
    /// Parse `<id>.<secret>`. The error never echoes the input.
    pub fn parse(text: &str) -> Result<BootstrapToken, MalformedToken> {
        let (id, secret) = text.trim().split_once('.').ok_or(MalformedToken)?;
        if !is_token_part(id, TOKEN_ID_LEN) || !is_token_part(secret, TOKEN_SECRET_LEN) {
            return Err(MalformedToken);
        }
        Ok(BootstrapToken {
            id: id.to_owned(),
            secret: Secret::new(secret),
        })
    }

    /// A fresh random token.
    pub fn generate() -> BootstrapToken {
        let mut rng = rand::rngs::OsRng;
        let mut part = |len| -> String {
            (0..len)
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
                .collect()
        };
        BootstrapToken {
            id: part(TOKEN_ID_LEN),
            secret: Secret::new(part(TOKEN_SECRET_LEN)),
        }
    }

    /// `<id>.<secret>` in clear, to hand to the operator once.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret.expose())
    }
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a joined node gets from its token: kubelet labels and taints, and the extra local
/// ports its edge may dial on itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePool {
    /// Pool name, for humans and audit lines.
    pub name: String,
    /// Kubelet node labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Kubelet taints, `key=value:Effect`.
    #[serde(default)]
    pub taints: Vec<String>,
    /// Extra ports the pool's nodes are expected to expose besides the kubelet's; sent to the
    /// edge, which dials them only if its own allowlist lists them.
    #[serde(default)]
    pub extra_ports: Vec<u16>,
    /// Networks the node IPs of a joining node must lie in; empty allows any (node IPs are
    /// still refused when loopback, link-local, multicast or unspecified). Keeps a token for
    /// one site from claiming another site's addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_ip_cidrs: Vec<ipnet::IpNet>,
}

/// One token as stored: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// The token ID.
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Creation time, Unix seconds. Re-admits a revoked node only if later than its revocation.
    pub created_unix: u64,
    /// Expiry, Unix seconds.
    pub expires_unix: u64,
    /// Joins allowed; `None` is unlimited (until expiry).
    #[serde(default)]
    pub usage_limit: Option<u32>,
    /// Node names this token may join, glob with `*`; `None` allows any.
    #[serde(default)]
    pub node_name_pattern: Option<String>,
    /// What nodes joined with this token get.
    pub pool: NodePool,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Revoked by the operator.
    #[serde(default)]
    pub revoked: bool,
    /// Joined nodes this token may re-provision: a join may take their name or IPs (and
    /// they lose them). Empty: a join never takes a joined node's name or addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reprovision: Vec<String>,
}

/// The token file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// Every token, revoked and expired ones included until removed.
    #[serde(default)]
    pub tokens: Vec<TokenRecord>,
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Operator command: add a token; returns it in clear (to print once) and its record.
pub fn create(
    path: &Path,
    pool: NodePool,
    ttl: Duration,
    usage_limit: Option<u32>,
    node_name_pattern: Option<String>,
    description: String,
    reprovision: Vec<protocol::NodeName>,
) -> Result<(BootstrapToken, TokenRecord), StoreError> {
    let spec = TokenSpec {
        pool,
        ttl,
        usage_limit,
        node_name_pattern,
        description,
        reprovision,
    };
    spec.validate()?;
    let mut file: TokenFile = read_json(path)?;
    let (token, record) = spec.new_token(&|id| file.tokens.iter().any(|r| r.id == id));
    file.tokens.push(record.clone());
    write_json(path, &file)?;
    Ok((token, record))
}

/// What `token create` asks for, the same for every backend.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// What nodes joined with it get.
    pub pool: NodePool,
    /// Lifetime.
    pub ttl: Duration,
    /// Joins allowed; `None` is unlimited.
    pub usage_limit: Option<u32>,
    /// Node names allowed, glob with `*`.
    pub node_name_pattern: Option<String>,
    /// Free text.
    pub description: String,
    /// Joined nodes it may re-provision.
    pub reprovision: Vec<protocol::NodeName>,
}

impl TokenSpec {
    /// Refuse bad arguments before anything is written.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.ttl.is_zero() {
            return Err(StoreError::Invalid("token lifetime must be > 0".into()));
        }
        if self.usage_limit == Some(0) {
            return Err(StoreError::Invalid("usage limit must be >= 1".into()));
        }
        if let Some(p) = &self.node_name_pattern {
            let ok = !p.is_empty()
                && p.len() <= MAX_PATTERN_LEN
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.*".contains(&b));
            if !ok {
                return Err(StoreError::Invalid(format!(
                    "node name pattern {p:?}: lowercase letters, digits, '-', '.' and '*' only"
                )));
            }
        }
        if self.pool.name.is_empty() {
            return Err(StoreError::Invalid("pool name must not be empty".into()));
        }
        Ok(())
    }

    /// A fresh token whose ID `taken` does not know, and its record (hash only).
    pub fn new_token(&self, taken: &dyn Fn(&str) -> bool) -> (BootstrapToken, TokenRecord) {
        let token = loop {
            let t = BootstrapToken::generate();
            if !taken(&t.id) {
                break t;
            }
        };
        let now = unix_now();
        let record = TokenRecord {
            id: token.id.clone(),
            secret_sha256: sha256_hex(token.secret.expose().as_bytes()),
            created_unix: now,
            expires_unix: now.saturating_add(self.ttl.as_secs().max(1)),
            usage_limit: self.usage_limit,
            node_name_pattern: self.node_name_pattern.clone(),
            pool: self.pool.clone(),
            description: self.description.clone(),
            revoked: false,
            reprovision: self
                .reprovision
                .iter()
                .map(|n| n.as_str().to_owned())
                .collect(),
        };
        (token, record)
    }
}

/// Operator command: every token with its use count. Never a secret: the file has none.
pub fn list(path: &Path) -> Result<Vec<(TokenRecord, u32)>, StoreError> {
    let file: TokenFile = read_json(path)?;
    let usage: Usage = read_json(&usage_path(path))?;
    Ok(file
        .tokens
        .into_iter()
        .map(|r| {
            let uses = usage.uses.get(&r.id).copied().unwrap_or(0);
            (r, uses)
        })
        .collect())
}

/// Operator command: revoke a token by ID (it stays listed, refused).
pub fn revoke(path: &Path, id: &str) -> Result<(), StoreError> {
    let mut file: TokenFile = read_json(path)?;
    let record = file
        .tokens
        .iter_mut()
        .find(|r| r.id == id)
        .ok_or_else(|| StoreError::NoSuchToken(id.to_owned()))?;
    record.revoked = true;
    write_json(path, &file)
}

pub(crate) fn hex_decode(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> NodePool {
        NodePool {
            name: "idc".into(),
            labels: [("tether.io/pool".to_string(), "idc".to_string())].into(),
            taints: vec!["tether.io/edge=true:NoSchedule".into()],
            extra_ports: vec![10255],
            node_ip_cidrs: vec![],
        }
    }

    #[test]
    fn token_format_is_kubernetes_bootstrap_format() {
        let t = BootstrapToken::parse("abcdef.0123456789abcdef").unwrap();
        assert_eq!(t.id, "abcdef");
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "abcde.0123456789abcdef",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789abcde",
            "abcdef.0123456789abcdefg",
            "abcdef:0123456789abcdef",
            "abc-ef.0123456789abcdef",
            "abcdef.0123456789abcdef.x",
        ] {
            assert_eq!(
                BootstrapToken::parse(bad).unwrap_err(),
                MalformedToken,
                "{bad}"
            );
        }
        let g = BootstrapToken::generate();
        assert!(BootstrapToken::parse(&g.expose()).is_ok());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = BootstrapToken::parse("abcdef.0123456789abcdef").unwrap();
        let shown = format!("{t:?} {:?}", t.secret);
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(shown.contains("abcdef"), "{shown}");
    }

    #[test]
    fn glob_patterns() {
        assert!(glob_match("idc-*", "idc-node-1"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("idc-*", "cloud-node"));
        assert!(!glob_match("node-1", "node-10"));
    }

    #[test]
    fn bad_create_arguments_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let p = pool();
        assert!(create(
            &path,
            p.clone(),
            Duration::ZERO,
            None,
            None,
            String::new(),
            vec![]
        )
        .is_err());
        assert!(create(
            &path,
            p.clone(),
            DEFAULT_TOKEN_TTL,
            Some(0),
            None,
            String::new(),
            vec![],
        )
        .is_err());
        assert!(create(
            &path,
            p,
            DEFAULT_TOKEN_TTL,
            None,
            Some("A/B".into()),
            String::new(),
            vec![]
        )
        .is_err());
    }
}
