//! The server's record of token use (`<token file>.usage.json`): joins per token and the
//! public keys already certified, each kept only until the certificate it went into (and
//! the token that admitted it) has expired, so the file stays bounded by the live fleet
//! instead of growing by one key per join and renewal forever.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// How long a key recorded by an older version (a bare list, without expiry) is kept after
/// the first load: 30 days, the default edge certificate lifetime, by which any certificate
/// it went into has expired unless the operator configured longer lifetimes.
pub const LEGACY_KEY_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The server's record of token use.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Successful joins per token ID.
    #[serde(default)]
    pub uses: BTreeMap<String, u32>,
    /// SHA-256 (hex) of every public key certified by a join or renewal → until when it is
    /// kept (Unix seconds): a replayed request is refused meanwhile.
    #[serde(default, deserialize_with = "keys_with_expiry")]
    pub keys: BTreeMap<String, u64>,
}

impl Usage {
    /// Forget keys whose certificates have expired at `now`, and the use counts of tokens no
    /// longer in the token file (`listed`). Returns whether anything went.
    pub fn prune(&mut self, now: u64, listed: &dyn Fn(&str) -> bool) -> bool {
        let before = (self.keys.len(), self.uses.len());
        self.keys.retain(|_, until| *until > now);
        self.uses.retain(|id, _| listed(id));
        before != (self.keys.len(), self.uses.len())
    }
}

/// Keys as a map to their expiry, or the older bare list (kept [`LEGACY_KEY_RETENTION`]).
fn keys_with_expiry<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Keys {
        WithExpiry(BTreeMap<String, u64>),
        Legacy(Vec<String>),
    }
    Ok(match Keys::deserialize(d)? {
        Keys::WithExpiry(map) => map,
        Keys::Legacy(list) => {
            let until = super::files::unix_now().saturating_add(LEGACY_KEY_RETENTION.as_secs());
            list.into_iter().map(|k| (k, until)).collect()
        }
    })
}

/// Where a file's usage record lives.
pub(crate) fn usage_path(token_file: &Path) -> PathBuf {
    let mut name = token_file.as_os_str().to_owned();
    name.push(".usage.json");
    PathBuf::from(name)
}
