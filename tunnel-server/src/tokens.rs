//! Bootstrap tokens: the Kubernetes format (`[a-z0-9]{6}.[a-z0-9]{16}`), the token file the
//! operator manages (`tunnel-server token create|list|revoke`), and admission of one join.
//! Only a SHA-256 of each secret is stored and compared in constant time; the secret itself
//! lives in a redacting [`Secret`] and is printed once, by `token create`.
//!
//! Two files: the token file (operator-owned, reloaded when its mtime/size/inode changes) and,
//! beside it, `<file>.usage.json` (server-owned): how often each token was used and the public
//! keys already certified, so a replayed join (same CSR key) is refused even for a token with
//! uses left. Both are written atomically (temporary file + rename), mode 0600.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocol::NodeName;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tunnel_io::secret::Secret;

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

fn sha256_hex(data: &[u8]) -> String {
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
    /// Extra ports the edge may dial on itself besides the kubelet's.
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
}

/// The token file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// Every token, revoked and expired ones included until removed.
    #[serde(default)]
    pub tokens: Vec<TokenRecord>,
}

/// The server's record of token use.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Successful joins per token ID.
    #[serde(default)]
    pub uses: BTreeMap<String, u32>,
    /// SHA-256 (hex) of every public key certified by a join: a replayed request is refused.
    #[serde(default)]
    pub keys: BTreeSet<String>,
}

/// Why a join was refused. Only audit logs see this; the node always gets one generic error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The token text is not in bootstrap-token format.
    #[error("malformed token")]
    Malformed,
    /// No token has this ID.
    #[error("unknown token id")]
    Unknown,
    /// The secret does not match.
    #[error("wrong secret")]
    WrongSecret,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
    /// Revoked by the operator.
    #[error("token revoked")]
    Revoked,
    /// Its usage limit is reached.
    #[error("token usage limit reached")]
    Exhausted,
    /// The node name does not match the token's pattern.
    #[error("node name not allowed by the token")]
    NodeNameNotAllowed,
    /// A node IP lies outside the token pool's networks.
    #[error("node IP outside the token's networks")]
    NodeIpNotAllowed,
    /// This public key was certified before: a replayed request.
    #[error("CSR key already used (replay)")]
    KeyReused,
}

impl Refusal {
    /// Label for metrics and audit lines.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Unknown => "unknown",
            Refusal::WrongSecret => "wrong_secret",
            Refusal::Expired => "expired",
            Refusal::Revoked => "revoked",
            Refusal::Exhausted => "exhausted",
            Refusal::NodeNameNotAllowed => "node_name",
            Refusal::NodeIpNotAllowed => "node_ip",
            Refusal::KeyReused => "replay",
        }
    }
}

/// A join the token allows.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The token ID used.
    pub token_id: String,
    /// When the token was created (Unix seconds).
    pub token_created_unix: u64,
    /// The pool the node joins.
    pub pool: NodePool,
}

/// Errors reading or writing the token or usage file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O on a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not valid JSON of the expected shape.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A token with this ID does not exist.
    #[error("no token with id {0:?}")]
    NoSuchToken(String),
    /// An argument is invalid.
    #[error("{0}")]
    Invalid(String),
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

/// Read a JSON file; a missing file is the default value.
fn read_json<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Write JSON atomically, mode 0600.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    std::io::Write::write_all(&mut tmp, &bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Where a file's usage record lives.
fn usage_path(token_file: &Path) -> PathBuf {
    let mut name = token_file.as_os_str().to_owned();
    name.push(".usage.json");
    PathBuf::from(name)
}

/// Identifies one version of a file: modification time, size and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp(i64, i64, u64, u64);

pub(crate) fn stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp(m.mtime(), m.mtime_nsec(), m.len(), m.ino()))
}

/// Operator command: add a token; returns it in clear (to print once) and its record.
pub fn create(
    path: &Path,
    pool: NodePool,
    ttl: Duration,
    usage_limit: Option<u32>,
    node_name_pattern: Option<String>,
    description: String,
) -> Result<(BootstrapToken, TokenRecord), StoreError> {
    if ttl.is_zero() {
        return Err(StoreError::Invalid("token lifetime must be > 0".into()));
    }
    if usage_limit == Some(0) {
        return Err(StoreError::Invalid("usage limit must be >= 1".into()));
    }
    if let Some(p) = &node_name_pattern {
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
    if pool.name.is_empty() {
        return Err(StoreError::Invalid("pool name must not be empty".into()));
    }
    let mut file: TokenFile = read_json(path)?;
    let token = loop {
        let t = BootstrapToken::generate();
        if !file.tokens.iter().any(|r| r.id == t.id) {
            break t;
        }
    };
    let now = unix_now();
    let record = TokenRecord {
        id: token.id.clone(),
        secret_sha256: sha256_hex(token.secret.expose().as_bytes()),
        created_unix: now,
        expires_unix: now.saturating_add(ttl.as_secs().max(1)),
        usage_limit,
        node_name_pattern,
        pool,
        description,
        revoked: false,
    };
    file.tokens.push(record.clone());
    write_json(path, &file)?;
    Ok((token, record))
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

/// The server's view of the token file, reloaded when the file changes.
pub struct TokenStore {
    path: PathBuf,
    usage_path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: TokenFile,
    stamp: Option<FileStamp>,
    usage: Usage,
}

impl TokenStore {
    /// Load the token file (missing = no tokens yet) and its usage record.
    pub fn open(path: &Path) -> Result<TokenStore, StoreError> {
        let usage_path = usage_path(path);
        let stamp = stamp(path);
        let file = read_json(path)?;
        let usage = read_json(&usage_path)?;
        Ok(TokenStore {
            path: path.to_owned(),
            usage_path,
            inner: Mutex::new(Inner { file, stamp, usage }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-read the token file if it changed. A file that no longer parses is logged and the
    /// last good version kept (a half-edited file must not admit or lock out everyone).
    pub fn refresh(&self) {
        let mut inner = self.lock();
        self.refresh_locked(&mut inner);
    }

    fn refresh_locked(&self, inner: &mut Inner) {
        let now = stamp(&self.path);
        if now == inner.stamp {
            return;
        }
        match read_json::<TokenFile>(&self.path) {
            Ok(file) => {
                tracing::info!(file = %self.path.display(), tokens = file.tokens.len(), "token file reloaded");
                inner.file = file;
                inner.stamp = now;
            }
            Err(error) => {
                tracing::warn!(%error, "token file unreadable; keeping the previous version");
            }
        }
    }

    /// When token `id` was created, if it exists (reloading the file first).
    pub fn created_unix(&self, id: &str) -> Option<u64> {
        let mut inner = self.lock();
        self.refresh_locked(&mut inner);
        inner
            .file
            .tokens
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.created_unix)
    }

    /// Check `token` for a join of `node` with a CSR whose public key is `public_key`, at
    /// `now` (Unix seconds). On success the use is counted and the key remembered before
    /// returning, so two concurrent replays cannot both pass.
    pub fn admit(
        &self,
        token: &BootstrapToken,
        node: &NodeName,
        ips: &[std::net::IpAddr],
        public_key: &[u8],
        now: u64,
    ) -> Result<Admission, Refusal> {
        let presented = Sha256::digest(token.secret.expose().as_bytes());
        let mut inner = self.lock();
        self.refresh_locked(&mut inner);
        let record = inner.file.tokens.iter().find(|r| r.id == token.id);
        // Compare even for an unknown ID, so timing does not tell known IDs apart.
        let stored = record
            .and_then(|r| hex_decode(&r.secret_sha256))
            .unwrap_or([0u8; 32]);
        let secret_ok: bool = presented.as_slice().ct_eq(&stored).into();
        let record = record.ok_or(Refusal::Unknown)?;
        if !secret_ok {
            return Err(Refusal::WrongSecret);
        }
        if record.revoked {
            return Err(Refusal::Revoked);
        }
        if now >= record.expires_unix {
            return Err(Refusal::Expired);
        }
        let uses = inner.usage.uses.get(&record.id).copied().unwrap_or(0);
        if record.usage_limit.is_some_and(|limit| uses >= limit) {
            return Err(Refusal::Exhausted);
        }
        if let Some(pattern) = &record.node_name_pattern {
            if !glob_match(pattern, node.as_str()) {
                return Err(Refusal::NodeNameNotAllowed);
            }
        }
        let networks = &record.pool.node_ip_cidrs;
        if !networks.is_empty() && !ips.iter().all(|ip| networks.iter().any(|n| n.contains(ip))) {
            return Err(Refusal::NodeIpNotAllowed);
        }
        let key = sha256_hex(public_key);
        if inner.usage.keys.contains(&key) {
            return Err(Refusal::KeyReused);
        }
        let admission = Admission {
            token_id: record.id.clone(),
            token_created_unix: record.created_unix,
            pool: record.pool.clone(),
        };
        inner.usage.keys.insert(key);
        *inner
            .usage
            .uses
            .entry(admission.token_id.clone())
            .or_default() += 1;
        if let Err(error) = write_json(&self.usage_path, &inner.usage) {
            // The in-memory record still holds: this replica keeps enforcing the limit.
            tracing::warn!(%error, "could not persist token usage");
        }
        Ok(admission)
    }

    /// Remember a public key certified by a renewal, so the same CSR cannot be replayed into
    /// a join. Returns false if it was certified before.
    pub fn remember_key(&self, public_key: &[u8]) -> bool {
        let mut inner = self.lock();
        let fresh = inner.usage.keys.insert(sha256_hex(public_key));
        if fresh {
            if let Err(error) = write_json(&self.usage_path, &inner.usage) {
                tracing::warn!(%error, "could not persist token usage");
            }
        }
        fresh
    }
}

fn hex_decode(hex: &str) -> Option<[u8; 32]> {
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

    fn node(name: &str) -> NodeName {
        NodeName::parse(name).unwrap()
    }

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
    fn file_holds_only_the_hash_and_admission_checks_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let (token, record) = create(
            &path,
            pool(),
            Duration::from_secs(3600),
            Some(2),
            Some("idc-*".into()),
            "test".into(),
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(token.secret.expose()),
            "secret stored in clear"
        );
        assert!(text.contains(&record.secret_sha256));

        let store = TokenStore::open(&path).unwrap();
        let now = unix_now();
        let a = store
            .admit(&token, &node("idc-1"), &[], b"key-1", now)
            .unwrap();
        assert_eq!(a.pool, pool());
        // Replay: the same key again.
        assert_eq!(
            store
                .admit(&token, &node("idc-2"), &[], b"key-1", now)
                .unwrap_err(),
            Refusal::KeyReused
        );
        assert_eq!(
            store
                .admit(&token, &node("cloud-1"), &[], b"key-2", now)
                .unwrap_err(),
            Refusal::NodeNameNotAllowed
        );
        let wrong = BootstrapToken {
            id: token.id.clone(),
            secret: Secret::new("0000000000000000"),
        };
        assert_eq!(
            store
                .admit(&wrong, &node("idc-2"), &[], b"key-2", now)
                .unwrap_err(),
            Refusal::WrongSecret
        );
        let unknown = BootstrapToken::parse("zzzzzz.0123456789abcdef").unwrap();
        assert_eq!(
            store
                .admit(&unknown, &node("idc-2"), &[], b"key-2", now)
                .unwrap_err(),
            Refusal::Unknown
        );
        assert_eq!(
            store
                .admit(&token, &node("idc-2"), &[], b"key-2", record.expires_unix)
                .unwrap_err(),
            Refusal::Expired
        );
        store
            .admit(&token, &node("idc-2"), &[], b"key-2", now)
            .unwrap();
        assert_eq!(
            store
                .admit(&token, &node("idc-3"), &[], b"key-3", now)
                .unwrap_err(),
            Refusal::Exhausted
        );
        // Usage survives a restart.
        let reopened = TokenStore::open(&path).unwrap();
        assert_eq!(
            reopened
                .admit(&token, &node("idc-3"), &[], b"key-3", now)
                .unwrap_err(),
            Refusal::Exhausted
        );
        assert_eq!(list(&path).unwrap()[0].1, 2);
    }

    #[test]
    fn revocation_and_new_tokens_are_picked_up_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = TokenStore::open(&path).unwrap();
        let (token, _) =
            create(&path, pool(), DEFAULT_TOKEN_TTL, None, None, String::new()).unwrap();
        let now = unix_now();
        store.admit(&token, &node("n1"), &[], b"k1", now).unwrap();
        revoke(&path, &token.id).unwrap();
        assert_eq!(
            store
                .admit(&token, &node("n2"), &[], b"k2", now)
                .unwrap_err(),
            Refusal::Revoked
        );
        assert!(matches!(
            revoke(&path, "nosuch"),
            Err(StoreError::NoSuchToken(_))
        ));
    }

    #[test]
    fn node_ips_must_lie_in_the_pools_networks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let site = NodePool {
            node_ip_cidrs: vec![
                "10.8.0.0/16".parse().unwrap(),
                "fd00:8::/32".parse().unwrap(),
            ],
            ..pool()
        };
        let (token, _) = create(&path, site, DEFAULT_TOKEN_TTL, None, None, String::new()).unwrap();
        let store = TokenStore::open(&path).unwrap();
        let now = unix_now();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        // One address outside is enough to refuse, and the refusal uses nothing up.
        assert_eq!(
            store
                .admit(
                    &token,
                    &node("n1"),
                    &[ip("10.8.1.2"), ip("10.9.0.1")],
                    b"k1",
                    now
                )
                .unwrap_err(),
            Refusal::NodeIpNotAllowed
        );
        store
            .admit(
                &token,
                &node("n1"),
                &[ip("10.8.1.2"), ip("fd00:8::5")],
                b"k1",
                now,
            )
            .unwrap();
        assert_eq!(list(&path).unwrap()[0].1, 1);
        // The networks survive the file round trip.
        assert_eq!(list(&path).unwrap()[0].0.pool.node_ip_cidrs.len(), 2);
    }

    #[test]
    fn a_broken_file_keeps_the_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let (token, _) =
            create(&path, pool(), DEFAULT_TOKEN_TTL, None, None, String::new()).unwrap();
        let store = TokenStore::open(&path).unwrap();
        std::fs::write(&path, "{ not json").unwrap();
        store
            .admit(&token, &node("n1"), &[], b"k1", unix_now())
            .unwrap();
    }

    #[test]
    fn bad_create_arguments_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let p = pool();
        assert!(create(&path, p.clone(), Duration::ZERO, None, None, String::new()).is_err());
        assert!(create(
            &path,
            p.clone(),
            DEFAULT_TOKEN_TTL,
            Some(0),
            None,
            String::new()
        )
        .is_err());
        assert!(create(
            &path,
            p,
            DEFAULT_TOKEN_TTL,
            None,
            Some("A/B".into()),
            String::new()
        )
        .is_err());
    }
}
