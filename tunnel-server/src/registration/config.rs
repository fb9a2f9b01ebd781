//! The `[registration]` section: where the registration API listens, the files it reads
//! (token store, tunnel CA, revocation list), certificate lifetime and join rate limits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The registration API's default port: the load balancer's HTTPS port.
pub const DEFAULT_REGISTRATION_PORT: u16 = 443;

/// `[registration]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Server certificate (PEM); defaults to `edge.cert`.
    pub cert: Option<PathBuf>,
    /// Server key (PEM); defaults to `edge.key`.
    pub key: Option<PathBuf>,
    /// The token file managed with `tunnel-server token create|list|revoke`.
    pub token_file: PathBuf,
    /// The tunnel CA certificate (`ca init`'s `ca.pem`): signs node certificates.
    pub ca_cert: PathBuf,
    /// The tunnel CA key (`ca-key.pem`), for example from a Kubernetes Secret shared by
    /// every replica.
    pub ca_key: PathBuf,
    /// The revocation file written by `tunnel-server node revoke`; absent = `revoked.json`
    /// beside the token file.
    pub revocation_file: Option<PathBuf>,
    /// Lifetime of node certificates; edges renew at about two thirds of it.
    #[serde(default = "default_cert_lifetime", with = "humantime_serde")]
    pub cert_lifetime: Duration,
    /// Tunnel endpoints told to joining nodes (`host:port`, the load balancer's port 9000).
    #[serde(default)]
    pub tunnel_endpoints: Vec<String>,
    /// Time from accept to a finished TLS handshake (PROXY header included).
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time from accept to the first byte: a connection that sends nothing goes early.
    #[serde(default = "default_first_byte_timeout", with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// A connection that receives nothing for this long is closed, request in flight or not
    /// (a Join or Renew call finishes in milliseconds; clients open a connection per call).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections in their TLS handshake at once; beyond, new connections are closed.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Connections without a client certificate (joins) served at once. When full, the
    /// longest-silent one (silent ≥ 1 s) is closed to make room.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections with a valid node certificate (renewals) served at once: a separate pool,
    /// so a join flood cannot keep nodes from renewing.
    #[serde(default = "default_max_renewal_connections")]
    pub max_renewal_connections: usize,
    /// Unauthenticated connections (handshaking or joining) from one source address (IPv6:
    /// one /64) at once. The source is the PROXY header's with `proxy_protocol`.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Expect a PROXY protocol v1 or v2 header on every connection (the load balancer sends
    /// it) and take the client's address from it: the per-source rate limit and lockout then
    /// see each node's own address instead of the balancer's. Connections without a valid
    /// header are refused.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Networks of the load balancers whose PROXY headers are believed (required with
    /// `proxy_protocol`). A header from elsewhere refuses the connection; a direct TLS
    /// connection from elsewhere is served under its own address.
    #[serde(default)]
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Join throttling.
    #[serde(default)]
    pub rate: RateConfig,
}

/// `[registration.rate]`: join attempts allowed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Attempts per minute from one source address.
    #[serde(default = "default_per_source")]
    pub per_source_per_minute: u32,
    /// Attempts per minute at one token ID, from anywhere.
    #[serde(default = "default_per_token")]
    pub per_token_per_minute: u32,
    /// Attempts allowed at once before the per-minute rates apply.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Failed attempts from one source (within `lockout`) after which it is locked out.
    #[serde(default = "default_lockout_after")]
    pub lockout_after: u32,
    /// How long a lockout lasts.
    #[serde(default = "default_lockout", with = "humantime_serde")]
    pub lockout: Duration,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_REGISTRATION_PORT))
}
fn default_cert_lifetime() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_first_byte_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_renewal_connections() -> usize {
    1024
}
fn default_max_connections_per_source() -> usize {
    16
}
fn default_per_source() -> u32 {
    30
}
fn default_per_token() -> u32 {
    30
}
fn default_burst() -> u32 {
    10
}
fn default_lockout_after() -> u32 {
    5
}
fn default_lockout() -> Duration {
    Duration::from_secs(300)
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            per_source_per_minute: default_per_source(),
            per_token_per_minute: default_per_token(),
            burst: default_burst(),
            lockout_after: default_lockout_after(),
            lockout: default_lockout(),
        }
    }
}

impl RegistrationConfig {
    /// Anchor relative paths at `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.token_file);
        fix(&mut self.ca_cert);
        fix(&mut self.ca_key);
        for p in [&mut self.cert, &mut self.key, &mut self.revocation_file]
            .into_iter()
            .flatten()
        {
            fix(p);
        }
    }

    /// The revocation file in effect.
    pub fn revocation_path(&self) -> PathBuf {
        self.revocation_file.clone().unwrap_or_else(|| {
            self.token_file
                .parent()
                .unwrap_or(Path::new("."))
                .join("revoked.json")
        })
    }

    /// Check the section; messages name the key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, path) in [
            ("registration.ca_cert", &self.ca_cert),
            ("registration.ca_key", &self.ca_key),
        ] {
            if !path.is_file() {
                return Err(format!("key `{key}`: file {} not found", path.display()));
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err("keys `registration.cert` and `registration.key` go together".into());
        }
        if self.cert_lifetime < Duration::from_secs(2) {
            return Err("key `registration.cert_lifetime` must be at least 2s".into());
        }
        for (key, zero) in [
            ("handshake_timeout", self.handshake_timeout.is_zero()),
            ("first_byte_timeout", self.first_byte_timeout.is_zero()),
            ("idle_timeout", self.idle_timeout.is_zero()),
            ("max_handshakes", self.max_handshakes == 0),
            ("max_connections", self.max_connections == 0),
            ("max_renewal_connections", self.max_renewal_connections == 0),
            (
                "max_connections_per_source",
                self.max_connections_per_source == 0,
            ),
        ] {
            if zero {
                return Err(format!("key `registration.{key}` must be > 0"));
            }
        }
        if self.first_byte_timeout > self.handshake_timeout {
            return Err(
                "key `registration.first_byte_timeout` must not exceed `handshake_timeout`".into(),
            );
        }
        check_proxy_from(
            "registration",
            self.proxy_protocol,
            &self.proxy_protocol_from,
        )?;
        let r = &self.rate;
        if r.per_source_per_minute == 0
            || r.per_token_per_minute == 0
            || r.burst == 0
            || r.lockout_after == 0
        {
            return Err("keys in `registration.rate` must be > 0".into());
        }
        Ok(())
    }
}

/// `proxy_protocol = true` needs the balancers' networks, and the networks mean nothing
/// without it: fail closed rather than believe PROXY headers from anyone.
pub fn check_proxy_from(section: &str, enabled: bool, from: &[ipnet::IpNet]) -> Result<(), String> {
    match (enabled, from.is_empty()) {
        (true, true) => Err(format!(
            "key `{section}.proxy_protocol_from` is required with `{section}.proxy_protocol = true`: \
             list the load balancers' networks (PROXY headers from anywhere else are refused)"
        )),
        (false, false) => Err(format!(
            "key `{section}.proxy_protocol_from` is set but `{section}.proxy_protocol` is not"
        )),
        _ => Ok(()),
    }
}
