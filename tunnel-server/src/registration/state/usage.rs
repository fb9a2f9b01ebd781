//! The server's record of token use (`<token file>.usage.json`): joins per token and the
//! public keys already certified.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

/// Where a file's usage record lives.
pub(crate) fn usage_path(token_file: &Path) -> PathBuf {
    let mut name = token_file.as_os_str().to_owned();
    name.push(".usage.json");
    PathBuf::from(name)
}
