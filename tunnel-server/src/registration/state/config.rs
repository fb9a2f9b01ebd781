//! The `[state]` section: where the control state lives. `file` (the default) keeps it in
//! files beside the token file, for one replica; `etcd` keeps it in an etcd cluster so every
//! replica decides joins against one truth. Validated once here; the message names the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default key prefix in etcd: every key the server writes starts with it, so one etcd can
/// serve several Tether installations (and an operator can grant a role on exactly this).
pub const DEFAULT_PREFIX: &str = "/tether/";

/// Which backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Files beside the token file: one replica.
    #[default]
    File,
    /// An etcd v3 cluster: any number of replicas.
    Etcd,
}

/// `[state]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `file` or `etcd`.
    #[serde(default)]
    pub backend: Backend,
    /// etcd client URLs (`https://host:2379`; `http://` only on loopback).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// CA that signs the etcd servers' certificates (PEM).
    pub ca: Option<PathBuf>,
    /// Client certificate for etcd (PEM).
    pub cert: Option<PathBuf>,
    /// Client key for etcd (PEM).
    pub key: Option<PathBuf>,
    /// Key prefix; ends with `/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Time to connect to an etcd member.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time for one store operation (a join's transaction, a token change); past it the
    /// operation fails closed with `state store unavailable`.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Lease of this replica's live-session records: they vanish this long after the
    /// replica dies.
    #[serde(default = "default_session_ttl", with = "humantime_serde")]
    pub session_ttl: Duration,
    /// How often one replica deletes expired certified-key records and expired tokens' use
    /// counts (see `etcd::prune`).
    #[serde(default = "default_prune_interval", with = "humantime_serde")]
    pub prune_interval: Duration,
}

impl Default for StateConfig {
    fn default() -> StateConfig {
        StateConfig {
            backend: Backend::File,
            endpoints: Vec::new(),
            ca: None,
            cert: None,
            key: None,
            prefix: default_prefix(),
            connect_timeout: default_connect_timeout(),
            request_timeout: default_request_timeout(),
            session_ttl: default_session_ttl(),
            prune_interval: default_prune_interval(),
        }
    }
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}
/// 2 s: a loopback or in-cluster etcd answers a connect in milliseconds; a member that takes
/// longer is treated as down and the client tries the next.
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
/// 3 s: an etcd transaction commits in a few milliseconds with a healthy quorum, and a
/// leader election takes about 1 s with etcd's defaults; a join waits no longer than the
/// edge's own RPC patience would allow.
fn default_request_timeout() -> Duration {
    Duration::from_secs(3)
}
/// 10 s: the live-session view may show a dead replica's sessions for at most this long.
fn default_session_ttl() -> Duration {
    Duration::from_secs(10)
}

/// 60 s: expired records cost only space, and a minute keeps the pruning's reads (a range
/// over `keys/`) negligible next to the joins; a shorter interval is for tests.
fn default_prune_interval() -> Duration {
    Duration::from_secs(60)
}

impl StateConfig {
    /// Anchor relative paths at `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Check the section; `registration` says whether `[registration]` is configured.
    pub fn validate(&self, registration: bool) -> Result<(), String> {
        if self.backend == Backend::File {
            let etcd_keys = !self.endpoints.is_empty()
                || self.ca.is_some()
                || self.cert.is_some()
                || self.key.is_some();
            return match etcd_keys {
                true => Err(
                    "keys `state.endpoints`, `state.ca`, `state.cert` and `state.key` need `state.backend = \"etcd\"`"
                        .into(),
                ),
                false => Ok(()),
            };
        }
        if !registration {
            return Err("key `state.backend = \"etcd\"` needs a `[registration]` section".into());
        }
        if self.endpoints.is_empty() {
            return Err("key `state.endpoints`: list the etcd client URLs".into());
        }
        let tls = self.ca.is_some();
        for endpoint in &self.endpoints {
            check_endpoint(endpoint, tls)?;
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err("keys `state.cert` and `state.key` go together".into());
        }
        if self.cert.is_some() && !tls {
            return Err(
                "key `state.cert` needs `state.ca` (a client certificate means TLS)".into(),
            );
        }
        for (key, path) in [
            ("state.ca", &self.ca),
            ("state.cert", &self.cert),
            ("state.key", &self.key),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err(format!("key `{key}`: file {} not found", path.display()));
                }
            }
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(format!(
                "key `state.prefix`: {:?} must start and end with `/` (e.g. {DEFAULT_PREFIX:?})",
                self.prefix
            ));
        }
        for (key, value) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("key `state.{key}` must be > 0"));
            }
        }
        if self.prune_interval < Duration::from_secs(1) {
            return Err(
                "key `state.prune_interval` must be at least 1s (etcd leases are whole seconds)"
                    .into(),
            );
        }
        if self.session_ttl < Duration::from_secs(2) {
            return Err(
                "key `state.session_ttl` must be at least 2s (etcd leases are whole seconds)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// An endpoint is `https://host:port`, or `http://` on loopback only: control state (token
/// hashes, certified keys) must not cross a network in clear.
fn check_endpoint(endpoint: &str, tls: bool) -> Result<(), String> {
    let bad = |why: &str| Err(format!("key `state.endpoints`: {endpoint:?}: {why}"));
    let (scheme, rest) = match endpoint.split_once("://") {
        Some(parts) => parts,
        None => return bad("want http(s)://host:port"),
    };
    let host = rest
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or("");
    if host.is_empty() || rest.contains('/') {
        return bad("want http(s)://host:port");
    }
    match scheme {
        "https" if tls => Ok(()),
        "https" => bad("https needs `state.ca`"),
        "http" if tls => bad("use https with `state.ca`"),
        "http" => {
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            match loopback {
                true => Ok(()),
                false => bad("plain http only to a loopback etcd; set `state.ca` and use https"),
            }
        }
        _ => bad("want http(s)://host:port"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd(endpoints: &[&str]) -> StateConfig {
        StateConfig {
            backend: Backend::Etcd,
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            ..StateConfig::default()
        }
    }

    #[test]
    fn file_is_the_default_and_takes_no_etcd_keys() {
        let config: StateConfig = toml::from_str("").unwrap();
        assert_eq!(config.backend, Backend::File);
        assert!(config.validate(false).is_ok());
        let stray: StateConfig = toml::from_str("endpoints = [\"http://127.0.0.1:2379\"]").unwrap();
        assert!(stray.validate(true).unwrap_err().contains("state.backend"));
    }

    #[test]
    fn etcd_needs_endpoints_registration_and_tls_off_loopback() {
        assert!(etcd(&["http://127.0.0.1:2379"]).validate(true).is_ok());
        assert!(etcd(&["http://[::1]:2379"]).validate(true).is_ok());
        assert!(etcd(&[])
            .validate(true)
            .unwrap_err()
            .contains("state.endpoints"));
        assert!(etcd(&["http://127.0.0.1:2379"])
            .validate(false)
            .unwrap_err()
            .contains("[registration]"));
        let clear = etcd(&["http://10.0.0.5:2379"]).validate(true).unwrap_err();
        assert!(clear.contains("loopback"), "{clear}");
        let no_ca = etcd(&["https://10.0.0.5:2379"]).validate(true).unwrap_err();
        assert!(no_ca.contains("state.ca"), "{no_ca}");
        let mut prefix = etcd(&["http://127.0.0.1:2379"]);
        prefix.prefix = "tether".into();
        assert!(prefix.validate(true).unwrap_err().contains("state.prefix"));
    }

    #[test]
    fn prune_interval_defaults_to_a_minute_and_takes_whole_seconds() {
        let config = etcd(&["http://127.0.0.1:2379"]);
        assert_eq!(config.prune_interval, Duration::from_secs(60));
        assert!(config.validate(true).is_ok());
        let short = StateConfig {
            prune_interval: Duration::from_millis(500),
            ..config
        };
        let error = short.validate(true).expect_err("under 1s");
        assert!(error.contains("state.prune_interval"), "{error}");
    }
}
