//! Edge configuration: a TOML file (unknown keys are errors) and/or command-line values,
//! validated once into [`EdgeConfig`]. Relative paths are resolved against the file's directory.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tunnel_io::h2tune::H2Tuning;
use tunnel_io::logging::LogFormat;

use crate::allow::ExtraRule;

/// The tunnel port of the load balancer.
pub const DEFAULT_SERVER_PORT: u16 = 9000;

/// A configuration error naming the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The file, or `<flags>`.
    pub file: String,
    /// What is wrong.
    pub message: String,
}

/// The edge's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// The directory `tunnel-edge join` wrote (`--state-dir` overrides it). When set, the CA,
    /// certificate and key default to its `ca.pem`, `cert.pem` and `key.pem`, the pool's extra
    /// ports are allowed, and the certificate is renewed before it expires. Without it a
    /// joined node stops connecting when its certificate runs out.
    pub state_dir: Option<PathBuf>,
    /// Where and how to reach tunnel-server.
    #[serde(default)]
    pub server: ServerSection,
    /// Reconnect backoff.
    #[serde(default)]
    pub reconnect: ReconnectSection,
    /// Session liveness.
    #[serde(default)]
    pub liveness: LivenessSection,
    /// Local dialing.
    #[serde(default)]
    pub dial: DialSection,
    /// What the edge may dial.
    #[serde(default)]
    pub allow: AllowSection,
    /// Loopback listeners carried to upstreams the server names (edge → cloud).
    #[serde(default)]
    pub forward: Vec<crate::forward::ForwardRule>,
    /// HTTP/2 settings (this end receives apiserver → kubelet data).
    #[serde(default)]
    pub h2: H2Tuning,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// The optional admin listener (`/healthz`, `/readyz`, `/metrics`).
    #[serde(default)]
    pub admin: AdminSection,
    /// How long in-flight streams may run after SIGTERM.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// The server and this edge's credentials.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// `host:port` of the load balancer or server (port defaults to 9000).
    pub address: Option<String>,
    /// Several server addresses instead of (or besides) `address`: one session is kept
    /// per address, more when the servers report more replicas.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Name to verify in the server certificate; defaults to the host part of `address`.
    pub server_name: Option<String>,
    /// CA bundle that issued the server certificate.
    pub ca: Option<PathBuf>,
    /// This edge's certificate (its identity: node name and node IPs).
    pub cert: Option<PathBuf>,
    /// This edge's private key.
    pub key: Option<PathBuf>,
    /// TCP + TLS + HTTP/2 handshake deadline.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// HTTP CONNECT egress proxy, `http://[user:password@]host:port`, for the sessions, the
    /// upstream connection and renewal. Unset: `HTTPS_PROXY` and the like, as curl reads
    /// them (`tunnel-edge run` only); `""`: direct, whatever the environment says.
    pub proxy: Option<String>,
    /// Hosts reached directly although a proxy is set, `NO_PROXY` syntax. Unset: the
    /// `NO_PROXY` environment variable (`tunnel-edge run` only).
    pub no_proxy: Option<String>,
    /// Session transport: `auto` (QUIC first, TCP when no QUIC handshake completes within
    /// `quic_handshake_timeout`), `quic` or `tcp`.
    #[serde(default)]
    pub transport: Transport,
    /// How long `auto` waits for a QUIC handshake before it uses TCP (default
    /// [`DEFAULT_QUIC_HANDSHAKE_TIMEOUT`]).
    #[serde(default, with = "humantime_serde")]
    pub quic_handshake_timeout: Option<Duration>,
    /// How often `auto`, while on TCP, tries QUIC again in the background (default
    /// [`DEFAULT_QUIC_RETRY_INTERVAL`]).
    #[serde(default, with = "humantime_serde")]
    pub quic_retry_interval: Option<Duration>,
    /// Open a lane beside each TCP session (default on): a second connection, run on a
    /// thread of its own, that the server moves streams shown to be bulk to, so small
    /// exchanges keep their pace beside a `kubectl logs` or `cp` (docs/ARCHITECTURE.md,
    /// "Lanes"). QUIC sessions need none: every stream is its own QUIC stream there.
    #[serde(default)]
    pub lane: Option<bool>,
}

impl ServerSection {
    /// Whether TCP sessions open a lane (`lane`, default on).
    pub fn lane(&self) -> bool {
        self.lane.unwrap_or(true)
    }

    /// `quic_handshake_timeout` or its default.
    pub fn quic_handshake_timeout(&self) -> Duration {
        self.quic_handshake_timeout
            .unwrap_or(DEFAULT_QUIC_HANDSHAKE_TIMEOUT)
    }

    /// `quic_retry_interval` or its default.
    pub fn quic_retry_interval(&self) -> Duration {
        self.quic_retry_interval
            .unwrap_or(DEFAULT_QUIC_RETRY_INTERVAL)
    }
}

/// How sessions reach the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC when a handshake completes within the bound, else TCP (and QUIC retried later).
    #[default]
    Auto,
    /// QUIC only (UDP, ALPN `tether-quic/1`).
    Quic,
    /// TLS + HTTP/2 over TCP only (the only one that goes through an egress proxy).
    Tcp,
}

impl Transport {
    /// `auto`, `quic` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

/// Default of `server.quic_handshake_timeout`: a QUIC handshake takes one or two round trips
/// (three with a Retry), and quinn resends a lost Initial after about 1 s, so 2 s lets one
/// loss pass while an edge whose UDP is blocked waits only 2 s for TCP.
pub const DEFAULT_QUIC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default of `server.quic_retry_interval`: a blocked UDP path is rarely opened within
/// minutes; one 2 s probe a minute costs nothing and picks it up soon enough.
pub const DEFAULT_QUIC_RETRY_INTERVAL: Duration = Duration::from_secs(60);

/// Reconnect backoff bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectSection {
    /// Shortest wait between attempts.
    #[serde(default = "default_min", with = "humantime_serde")]
    pub min: Duration,
    /// Longest wait between attempts.
    #[serde(default = "default_max", with = "humantime_serde")]
    pub max: Duration,
    /// A session that lasted this long resets the backoff.
    #[serde(default = "default_stable_after", with = "humantime_serde")]
    pub stable_after: Duration,
}

/// PING-based liveness.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LivenessSection {
    /// Interval between PINGs.
    #[serde(default = "default_ping_interval", with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Silent intervals before the session is declared dead.
    #[serde(default = "default_ping_misses")]
    pub ping_misses: u32,
}

/// Local dialing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialSection {
    /// Deadline of one local TCP connect.
    #[serde(default = "default_dial_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// A stream that cannot write for this long is reset.
    #[serde(default = "default_write_timeout", with = "humantime_serde")]
    pub write_timeout: Duration,
    /// A stream with no byte moving either way for this long is closed (default 4h; `0s`
    /// disables).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Where targets naming this node are dialed, by name or by node IP (for example
    /// `127.0.0.1` when the kubelet listens only there). Unset: node-name targets go to the
    /// first IP address of the node's certificate (refused when it has none), node-IP
    /// targets as given.
    pub self_host: Option<IpAddr>,
}

/// The edge's own allowlist.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowSection {
    /// Ports allowed on this node's own name and addresses (default: the kubelet's).
    #[serde(default = "default_self_ports")]
    pub ports: Vec<u16>,
    /// Further ranges the IDC operator opens, each with its ports.
    #[serde(default)]
    pub extra: Vec<ExtraRule>,
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// Env-filter directives (`RUST_LOG` wins).
    #[serde(default = "default_filter")]
    pub filter: String,
}

/// The admin listener; off unless `listen` is set, so a node opens no port it was not told to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Address of the plain-HTTP admin listener, e.g. `127.0.0.1:9101`.
    pub listen: Option<std::net::SocketAddr>,
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_min() -> Duration {
    Duration::from_millis(200)
}
fn default_max() -> Duration {
    Duration::from_secs(30)
}
fn default_stable_after() -> Duration {
    Duration::from_secs(10)
}
fn default_ping_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_ping_misses() -> u32 {
    3
}
fn default_dial_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_write_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_idle_timeout() -> Option<Duration> {
    Some(Duration::from_secs(4 * 3600))
}
fn default_self_ports() -> Vec<u16> {
    vec![10250]
}
fn default_filter() -> String {
    "info".into()
}

impl Default for ReconnectSection {
    fn default() -> Self {
        ReconnectSection {
            min: default_min(),
            max: default_max(),
            stable_after: default_stable_after(),
        }
    }
}
impl Default for LivenessSection {
    fn default() -> Self {
        LivenessSection {
            ping_interval: default_ping_interval(),
            ping_misses: default_ping_misses(),
        }
    }
}
impl Default for DialSection {
    fn default() -> Self {
        DialSection {
            timeout: default_dial_timeout(),
            write_timeout: default_write_timeout(),
            idle_timeout: default_idle_timeout(),
            self_host: None,
        }
    }
}
impl Default for AllowSection {
    fn default() -> Self {
        AllowSection {
            ports: default_self_ports(),
            extra: Vec::new(),
        }
    }
}
impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Text,
            filter: default_filter(),
        }
    }
}

impl EdgeConfig {
    /// Parse config text; `origin` names it in errors, `base` anchors relative paths. Call
    /// [`EdgeConfig::validate`] after applying command-line overrides.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<EdgeConfig, ConfigError> {
        let mut config: EdgeConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: origin.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        // `0s` means "no idle timeout".
        config.dial.idle_timeout = config.dial.idle_timeout.filter(|d| !d.is_zero());
        for p in [
            &mut config.state_dir,
            &mut config.server.ca,
            &mut config.server.cert,
            &mut config.server.key,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// Read and parse a file (not yet validated).
    pub fn load(path: &Path) -> Result<EdgeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(
            &text,
            &path.display().to_string(),
            path.parent().unwrap_or(Path::new(".")),
        )
    }

    /// Check every rule; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.server;
        if s.address.is_none() && s.addresses.is_empty() {
            return Err("key `server.address` is required (host:port of the load balancer)".into());
        }
        for address in s.address.iter().chain(&s.addresses) {
            split_host_port(address).map_err(|e| format!("key `server.address`: {e}"))?;
        }
        for (key, value) in [
            ("server.ca", &s.ca),
            ("server.cert", &s.cert),
            ("server.key", &s.key),
        ] {
            match value {
                None => return Err(format!("key `{key}` is required")),
                Some(p) if !p.is_file() => {
                    return Err(format!("key `{key}`: file {} not found", p.display()))
                }
                Some(_) => {}
            }
        }
        let r = &self.reconnect;
        if r.min.is_zero() || r.max < r.min {
            return Err("keys `reconnect.min`/`reconnect.max`: need 0 < min <= max".into());
        }
        if self.liveness.ping_interval.is_zero() || self.liveness.ping_misses == 0 {
            return Err(
                "keys `liveness.ping_interval` and `liveness.ping_misses` must be > 0".into(),
            );
        }
        if self.dial.timeout.is_zero() || self.dial.write_timeout.is_zero() {
            return Err("keys `dial.timeout` and `dial.write_timeout` must be > 0".into());
        }
        if self.allow.ports.contains(&0) {
            return Err("key `allow.ports`: port 0 is not a port".into());
        }
        self.h2.validate().map_err(|m| format!("key `h2.{m}`"))?;
        crate::proxy::Egress::resolve(s.proxy.as_deref(), s.no_proxy.as_deref(), |_| None)
            .map_err(|e| format!("key {e}"))?;
        crate::forward::validate(&self.forward)?;
        Ok(())
    }

    /// The first server address as `(host, port)`.
    pub fn server_host_port(&self) -> Result<(String, u16), String> {
        self.server_addresses()?
            .into_iter()
            .next()
            .ok_or_else(|| "no server address".to_string())
    }

    /// Every server address as `(host, port)`, `address` first.
    pub fn server_addresses(&self) -> Result<Vec<(String, u16)>, String> {
        let s = &self.server;
        s.address
            .iter()
            .chain(&s.addresses)
            .map(|a| split_host_port(a))
            .collect()
    }
}

/// Split `host[:port]` (IPv6 in brackets); the port defaults to 9000.
pub fn split_host_port(address: &str) -> Result<(String, u16), String> {
    if address.is_empty() {
        return Err("empty address".into());
    }
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed `[` in address")?;
        (host, after.strip_prefix(':'))
    } else {
        match address.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (address, None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("bad port in `{address}`"))?,
        None => DEFAULT_SERVER_PORT,
    };
    if host.is_empty() || port == 0 {
        return Err(format!("bad address `{address}`"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("lb.example:443").unwrap(),
            ("lb.example".into(), 443)
        );
        assert_eq!(
            split_host_port("lb.example").unwrap(),
            ("lb.example".into(), 9000)
        );
        assert_eq!(split_host_port("[::1]:9000").unwrap(), ("::1".into(), 9000));
        assert!(split_host_port("lb:0").is_err());
        assert!(split_host_port(":9000").is_err());
        assert!(split_host_port("lb:http").is_err());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = EdgeConfig::parse("[dial]\ntimout = \"1s\"\n", "edge.toml", Path::new("."))
            .unwrap_err();
        assert!(err.to_string().contains("timout"), "{err}");
    }

    #[test]
    fn missing_server_address_is_named() {
        let c = EdgeConfig::parse("", "edge.toml", Path::new(".")).unwrap();
        assert!(c.validate().unwrap_err().contains("server.address"));
    }

    #[test]
    fn backoff_bounds_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "e.pem", "e-key.pem"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let text = r#"
            [server]
            address = "127.0.0.1:9000"
            ca = "ca.pem"
            cert = "e.pem"
            key = "e-key.pem"
            [reconnect]
            min = "5s"
            max = "1s"
        "#;
        let c = EdgeConfig::parse(text, "edge.toml", dir.path()).unwrap();
        assert!(c.validate().unwrap_err().contains("reconnect"));
    }

    #[test]
    fn shipped_example_uses_only_known_keys() {
        let text = include_str!("../../deploy/examples/edge.toml");
        let c = EdgeConfig::parse(text, "edge.toml", Path::new("/")).unwrap();
        assert_eq!(c.server_host_port().unwrap().1, 9000);
    }
}
