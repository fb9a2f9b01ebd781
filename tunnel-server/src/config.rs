//! Server configuration: the TOML schema (unknown keys are errors), CLI overrides, and one
//! validation pass that turns it into [`ServerConfig`], the only form the rest of the server
//! sees. Relative paths are resolved against the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tunnel_io::h2tune::H2Tuning;
pub use tunnel_io::logging::LogFormat;

/// The edge listener's default port: the load balancer's tunnel port.
pub const DEFAULT_EDGE_PORT: u16 = 9000;

/// A configuration error; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The config file (or `<flags>` for command-line values).
    pub file: String,
    /// What is wrong, naming the key.
    pub message: String,
}

/// The whole server configuration, validated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Edge sessions (TLS + reverse HTTP/2).
    pub edge: EdgeListenerConfig,
    /// apiserver-facing HTTP CONNECT frontend.
    #[serde(default)]
    pub connect: ConnectConfig,
    /// apiserver-facing Konnectivity gRPC frontend; absent = disabled.
    #[serde(default)]
    pub konnectivity: Option<crate::frontend::konnectivity::KonnectivityConfig>,
    /// Which targets the apiserver may reach.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Registration API (join, renewal, revocation); absent = disabled.
    #[serde(default)]
    pub registration: Option<crate::registration::RegistrationConfig>,
    /// Where the control state lives (`file` or `etcd`).
    #[serde(default)]
    pub state: crate::registration::state::StateConfig,
    /// Upstreams edges may reach (edge → cloud), by name: `kube-apiserver = "10.0.0.1:6443"`.
    #[serde(default)]
    pub upstreams: crate::upstream::UpstreamMap,
    /// HTTP/2 settings of edge sessions.
    #[serde(default)]
    pub h2: H2Tuning,
    /// This replica's ID and the replica count told to edges.
    #[serde(default)]
    pub replica: crate::replicas::ReplicaConfig,
    /// Health, readiness and metrics.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// The listener edges dial.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeListenerConfig {
    /// Address to listen on.
    #[serde(default = "default_edge_listen")]
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that issues edge certificates (PEM).
    pub client_ca: PathBuf,
    /// Time from TCP accept to a confirmed session (PROXY header, TLS, HTTP/2, session info).
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time from TCP accept to the first byte: a connection that never speaks goes early
    /// instead of holding a handshake slot for the whole `handshake_timeout`.
    #[serde(default = "default_first_byte_timeout", with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Interval between liveness PINGs on each session.
    #[serde(default = "default_ping_interval", with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Unanswered PING intervals after which a session is declared dead.
    #[serde(default = "default_ping_misses")]
    pub ping_misses: u32,
    /// Streams the server opens at once on one edge session.
    #[serde(default = "default_max_streams_per_edge")]
    pub max_streams_per_edge: usize,
    /// Dials waiting for one edge's answer at once; beyond, new dials get 503 at once.
    #[serde(default = "default_max_pending_dials")]
    pub max_pending_dials: usize,
    /// Expect a PROXY protocol v1/v2 header from the load balancer on every connection and
    /// take the edge's address from it (connections without one are refused).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Networks of the load balancers whose PROXY headers are believed (required with
    /// `proxy_protocol`). A header from elsewhere refuses the connection; a direct TLS
    /// connection from elsewhere is served under its own address.
    #[serde(default)]
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Concurrent edge handshakes in progress (TLS exhaustion guard); beyond, new
    /// connections are closed at once.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Concurrent handshakes from one source address (IPv6: one /64; the PROXY header's
    /// source with `proxy_protocol`), so one machine cannot hold every handshake slot. Many
    /// nodes of one site may share a NAT address, so this is not tiny.
    #[serde(default = "default_max_handshakes_per_source")]
    pub max_handshakes_per_source: usize,
    /// PING and SETTINGS frames per second an edge may send on one connection (session or
    /// upstream). Legitimate traffic is one PING and one PING ACK per `ping_interval`; a peer
    /// above the rate has its connection closed.
    #[serde(default = "default_control_frames_per_second")]
    pub control_frames_per_second: u32,
    /// Control frames allowed at once before `control_frames_per_second` applies.
    #[serde(default = "default_control_frames_burst")]
    pub control_frames_burst: u32,
    /// Edge → cloud upstream streams one node may have open on this server (each holds a
    /// server descriptor); beyond, new streams are refused with 503.
    #[serde(default = "default_max_upstream_streams_per_node")]
    pub max_upstream_streams_per_node: usize,
    /// Upstream dials of one node in progress at once; beyond, refused with 503.
    #[serde(default = "default_max_upstream_dials_per_node")]
    pub max_upstream_dials_per_node: usize,
    /// Upstream streams of all nodes together; absent = a quarter of the process's open-file
    /// limit, so the rest stays available to the listeners, sessions and frontends.
    #[serde(default)]
    pub max_upstream_streams: Option<usize>,
}

impl EdgeListenerConfig {
    /// The control-frame limit of every edge connection.
    pub fn control_frame_quota(&self) -> tunnel_io::control_frames::ControlFrameQuota {
        tunnel_io::control_frames::ControlFrameQuota {
            per_second: self.control_frames_per_second,
            burst: self.control_frames_burst,
        }
    }
}

/// The HTTP CONNECT frontend (kube-apiserver's `HTTPConnect` egress).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectConfig {
    /// Unix socket path (the apiserver-sidecar form); absent = disabled.
    pub unix_socket: Option<PathBuf>,
    /// Permission bits of the Unix socket.
    #[serde(default = "default_socket_mode")]
    pub unix_socket_mode: u32,
    /// TCP address for the mTLS form; absent = disabled.
    pub tcp_listen: Option<SocketAddr>,
    /// Server certificate for the mTLS form.
    pub tcp_cert: Option<PathBuf>,
    /// Server key for the mTLS form.
    pub tcp_key: Option<PathBuf>,
    /// CA of the apiserver's client certificate (required with `tcp_listen`).
    pub tcp_client_ca: Option<PathBuf>,
    /// Time allowed to receive the whole CONNECT head (and the TLS handshake before it).
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Largest CONNECT head accepted, in bytes (431 beyond).
    #[serde(default = "default_max_head_bytes")]
    pub max_head_bytes: usize,
    /// Time allowed for the edge to answer a dial (504 beyond).
    #[serde(default = "default_dial_timeout", with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// A stream that cannot write for this long is reset (stalled reader).
    #[serde(default = "default_write_timeout", with = "humantime_serde")]
    pub write_timeout: Duration,
    /// A tunneled connection with no byte moving either way for this long is closed
    /// (default 4h, kubelet's own streaming idle timeout; `0s` disables).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Frontend connections served at once; beyond, new ones wait in the accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

/// The server's own destination policy, default-deny.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Destination ports the apiserver may reach on edges.
    #[serde(default = "default_allowed_ports")]
    pub allowed_ports: Vec<u16>,
    /// Whether `node-name:port` targets are accepted (node IP targets always are).
    #[serde(default = "yes")]
    pub allow_node_names: bool,
}

/// Admin HTTP endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address for `/healthz`, `/readyz`, `/metrics`; absent = disabled.
    #[serde(default = "default_admin_listen")]
    pub listen: Option<SocketAddr>,
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// tracing env-filter directives (overridden by `RUST_LOG`).
    #[serde(default = "default_log_filter")]
    pub filter: String,
}

fn default_edge_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_EDGE_PORT))
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_ping_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_ping_misses() -> u32 {
    3
}
fn default_max_streams_per_edge() -> usize {
    10_000
}
fn default_max_pending_dials() -> usize {
    1000
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_first_byte_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_max_handshakes_per_source() -> usize {
    64
}
fn default_control_frames_per_second() -> u32 {
    10
}
fn default_control_frames_burst() -> u32 {
    50
}
fn default_max_upstream_streams_per_node() -> usize {
    256
}
fn default_max_upstream_dials_per_node() -> usize {
    32
}
fn default_socket_mode() -> u32 {
    0o600
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_head_bytes() -> usize {
    16 << 10
}
fn default_dial_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_write_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_idle_timeout() -> Option<Duration> {
    Some(Duration::from_secs(4 * 3600))
}
fn default_max_connections() -> usize {
    50_000
}
fn default_allowed_ports() -> Vec<u16> {
    vec![10250]
}
fn yes() -> bool {
    true
}
fn default_admin_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9090)))
}
fn default_log_filter() -> String {
    "info".into()
}

impl Default for ConnectConfig {
    fn default() -> Self {
        ConnectConfig {
            unix_socket: None,
            unix_socket_mode: default_socket_mode(),
            tcp_listen: None,
            tcp_cert: None,
            tcp_key: None,
            tcp_client_ca: None,
            header_timeout: default_header_timeout(),
            max_head_bytes: default_max_head_bytes(),
            dial_timeout: default_dial_timeout(),
            write_timeout: default_write_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            allowed_ports: default_allowed_ports(),
            allow_node_names: true,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: default_log_filter(),
        }
    }
}

impl ServerConfig {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            message: format!("cannot read: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base)
    }

    /// Parse and validate config text; `origin` names it in errors, `base` anchors relative paths.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<ServerConfig, ConfigError> {
        let mut config: ServerConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: origin.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.resolve_paths(base);
        // `0s` means "no idle timeout".
        config.connect.idle_timeout = config.connect.idle_timeout.filter(|d| !d.is_zero());
        config.validate().map_err(|message| ConfigError {
            file: origin.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.edge.cert);
        fix(&mut self.edge.key);
        fix(&mut self.edge.client_ca);
        for p in [
            &mut self.connect.unix_socket,
            &mut self.connect.tcp_cert,
            &mut self.connect.tcp_key,
            &mut self.connect.tcp_client_ca,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if let Some(k) = &mut self.konnectivity {
            k.resolve_paths(base);
        }
        if let Some(r) = &mut self.registration {
            r.resolve_paths(base);
        }
        self.state.resolve_paths(base);
    }

    /// Check every cross-field rule; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let e = &self.edge;
        for (key, path) in [
            ("edge.cert", &e.cert),
            ("edge.key", &e.key),
            ("edge.client_ca", &e.client_ca),
        ] {
            if !path.is_file() {
                return Err(format!("key `{key}`: file {} not found", path.display()));
            }
        }
        if e.ping_interval.is_zero() {
            return Err("key `edge.ping_interval` must be > 0".into());
        }
        if e.ping_misses == 0 {
            return Err("key `edge.ping_misses` must be >= 1".into());
        }
        if e.handshake_timeout.is_zero() || e.first_byte_timeout.is_zero() {
            return Err(
                "keys `edge.handshake_timeout` and `edge.first_byte_timeout` must be > 0".into(),
            );
        }
        if e.first_byte_timeout > e.handshake_timeout {
            return Err(
                "key `edge.first_byte_timeout` must not exceed `edge.handshake_timeout`".into(),
            );
        }
        if e.max_streams_per_edge == 0 || e.max_handshakes == 0 || e.max_handshakes_per_source == 0
        {
            return Err(
                "keys `edge.max_streams_per_edge`, `edge.max_handshakes` and `edge.max_handshakes_per_source` must be > 0".into(),
            );
        }
        crate::registration::config::check_proxy_from(
            "edge",
            e.proxy_protocol,
            &e.proxy_protocol_from,
        )?;
        if e.max_upstream_streams_per_node == 0
            || e.max_upstream_dials_per_node == 0
            || e.max_upstream_streams == Some(0)
        {
            return Err("keys `edge.max_upstream_streams_per_node`, `edge.max_upstream_dials_per_node` and `edge.max_upstream_streams` must be > 0".into());
        }
        if e.control_frames_per_second == 0 || e.control_frames_burst == 0 {
            return Err(
                "keys `edge.control_frames_per_second` and `edge.control_frames_burst` must be > 0"
                    .into(),
            );
        }
        self.h2.validate().map_err(|m| format!("key `h2.{m}`"))?;
        self.replica.validate()?;
        crate::upstream::validate(&self.upstreams)?;

        if let Some(k) = &self.konnectivity {
            k.validate()?;
        }
        if let Some(r) = &self.registration {
            r.validate()?;
        }
        self.state.validate(self.registration.is_some())?;
        let c = &self.connect;
        let konnectivity_frontend = self
            .konnectivity
            .as_ref()
            .is_some_and(|k| k.serves_frontend());
        if c.unix_socket.is_none() && c.tcp_listen.is_none() && !konnectivity_frontend {
            return Err(
                "section `connect`: set `unix_socket` or `tcp_listen`, or configure `[konnectivity]` (no frontend configured)"
                    .into(),
            );
        }
        if c.unix_socket_mode & 0o077 & !0o060 != 0 || c.unix_socket_mode > 0o777 {
            return Err(format!(
                "key `connect.unix_socket_mode`: {:o} gives access to other users; use 0600 or 0660",
                c.unix_socket_mode
            ));
        }
        if c.tcp_listen.is_some() {
            // The TCP form is an open proxy without client authentication: fail closed.
            for (key, value) in [
                ("connect.tcp_cert", &c.tcp_cert),
                ("connect.tcp_key", &c.tcp_key),
                ("connect.tcp_client_ca", &c.tcp_client_ca),
            ] {
                match value {
                    None => {
                        return Err(format!(
                            "key `{key}` is required with `connect.tcp_listen` (mTLS is mandatory)"
                        ))
                    }
                    Some(p) if !p.is_file() => {
                        return Err(format!("key `{key}`: file {} not found", p.display()))
                    }
                    Some(_) => {}
                }
            }
        }
        for (key, d) in [
            ("connect.header_timeout", c.header_timeout),
            ("connect.dial_timeout", c.dial_timeout),
            ("connect.write_timeout", c.write_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("key `{key}` must be > 0"));
            }
        }
        if c.max_head_bytes < 256 || c.max_head_bytes > 1 << 20 {
            return Err("key `connect.max_head_bytes` must be 256..=1048576".into());
        }
        if c.max_connections == 0 {
            return Err("key `connect.max_connections` must be > 0".into());
        }
        if self.policy.allowed_ports.is_empty() {
            return Err("key `policy.allowed_ports` is empty: nothing could be reached".into());
        }
        if self.policy.allowed_ports.contains(&0) {
            return Err("key `policy.allowed_ports`: port 0 is not a port".into());
        }
        crate::trust::check_separate_frontend_ca(self)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_pems() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in ["server.pem", "server-key.pem", "ca.pem", "fca.pem"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        dir
    }

    const MINIMAL: &str = r#"
        [edge]
        cert = "server.pem"
        key = "server-key.pem"
        client_ca = "ca.pem"
        [connect]
        unix_socket = "connect.sock"
    "#;

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let dir = dir_with_pems();
        let c = ServerConfig::parse(MINIMAL, "t.toml", dir.path()).unwrap();
        assert_eq!(c.edge.listen.port(), DEFAULT_EDGE_PORT);
        assert_eq!(c.policy.allowed_ports, vec![10250]);
        assert_eq!(c.connect.unix_socket_mode, 0o600);
        assert_eq!(c.edge.cert, dir.path().join("server.pem"));
        assert_eq!(
            c.connect.unix_socket.unwrap(),
            dir.path().join("connect.sock")
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = dir_with_pems();
        let text = format!("{MINIMAL}\n[policy]\nallowed_port = [1]\n");
        let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("allowed_port"), "{err}");
        assert!(err.to_string().starts_with("t.toml:"), "{err}");
    }

    #[test]
    fn tcp_frontend_without_client_ca_fails_closed() {
        let dir = dir_with_pems();
        let text = r#"
            [edge]
            cert = "server.pem"
            key = "server-key.pem"
            client_ca = "ca.pem"
            [connect]
            tcp_listen = "127.0.0.1:0"
            tcp_cert = "server.pem"
            tcp_key = "server-key.pem"
        "#;
        let err = ServerConfig::parse(text, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("connect.tcp_client_ca"), "{err}");
    }

    #[test]
    fn misspelled_frontend_key_stops_startup() {
        let dir = dir_with_pems();
        let text = MINIMAL.replace("[connect]", "[connect]\ntcp_client_cert = \"ca.pem\"");
        let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("tcp_client_cert"), "{err}");
    }

    #[test]
    fn no_frontend_is_an_error() {
        let dir = dir_with_pems();
        let text = MINIMAL.replace("unix_socket = \"connect.sock\"", "");
        let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("no frontend"), "{err}");
    }

    #[test]
    fn konnectivity_alone_is_a_frontend() {
        let dir = dir_with_pems();
        let text = MINIMAL.replace("[connect]", "[konnectivity]");
        let c = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap();
        let k = c.konnectivity.unwrap();
        assert_eq!(k.unix_socket.unwrap(), dir.path().join("connect.sock"));
        assert_eq!(k.unix_socket_mode, 0o600);
        assert!(c.connect.unix_socket.is_none());
    }

    #[test]
    fn konnectivity_tcp_without_client_ca_fails_closed() {
        let dir = dir_with_pems();
        let text = format!(
            "{MINIMAL}\n[konnectivity]\ntcp_listen = \"127.0.0.1:0\"\ntcp_cert = \"server.pem\"\ntcp_key = \"server-key.pem\"\n"
        );
        let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("konnectivity.tcp_client_ca"),
            "{err}"
        );
    }

    #[test]
    fn empty_konnectivity_section_and_misspelled_key_are_errors() {
        let dir = dir_with_pems();
        let err = ServerConfig::parse(
            &format!("{MINIMAL}\n[konnectivity]\n"),
            "t.toml",
            dir.path(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("section `konnectivity`"), "{err}");
        let text = format!("{MINIMAL}\n[konnectivity]\nunix_sock = \"k.sock\"\n");
        let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("unix_sock"), "{err}");
        let text = format!(
            "{MINIMAL}\n[konnectivity]\nunix_socket = \"k.sock\"\nunix_socket_mode = 0o606\n"
        );
        let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("konnectivity.unix_socket_mode"),
            "{err}"
        );
    }

    #[test]
    fn konnectivity_agents_alone_are_not_a_frontend() {
        let dir = dir_with_pems();
        let text = MINIMAL.replace(
            "[connect]\n        unix_socket = \"connect.sock\"",
            "[konnectivity]\nagent_listen = \"127.0.0.1:0\"",
        );
        let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("no frontend"), "{err}");
        let both = format!("{MINIMAL}\n[konnectivity]\nagent_listen = \"127.0.0.1:0\"\n");
        let c = ServerConfig::parse(&both, "t.toml", dir.path()).unwrap();
        assert!(c.konnectivity.unwrap().agent_listen.is_some());
    }

    #[test]
    fn world_accessible_socket_is_refused() {
        let dir = dir_with_pems();
        let text = MINIMAL.replace("[connect]", "[connect]\nunix_socket_mode = 0o666");
        let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("unix_socket_mode"), "{err}");
    }

    #[test]
    fn missing_cert_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = ServerConfig::parse(MINIMAL, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("edge.cert"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let dir = dir_with_pems();
        let text = MINIMAL.replace("[connect]", "[connect]\ndial_timeout = \"ten\"");
        let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("dial_timeout"), "{err}");
    }

    #[test]
    fn zero_ping_misses_refused() {
        let dir = dir_with_pems();
        let text = MINIMAL.replace(
            "client_ca = \"ca.pem\"",
            "client_ca = \"ca.pem\"\nping_misses = 0",
        );
        let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("edge.ping_misses"), "{err}");
    }

    #[test]
    fn proxy_protocol_without_balancer_networks_fails_closed() {
        let dir = dir_with_pems();
        let with = |extra: &str| {
            MINIMAL.replace(
                "client_ca = \"ca.pem\"",
                &format!("client_ca = \"ca.pem\"\n{extra}"),
            )
        };
        let err =
            ServerConfig::parse(&with("proxy_protocol = true"), "t.toml", dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("edge.proxy_protocol_from"),
            "{err}"
        );
        let err = ServerConfig::parse(
            &with("proxy_protocol_from = [\"10.0.0.0/8\"]"),
            "t.toml",
            dir.path(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("edge.proxy_protocol"), "{err}");
        let c = ServerConfig::parse(
            &with("proxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/8\"]"),
            "t.toml",
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.edge.proxy_protocol_from.len(), 1);
    }

    #[test]
    fn first_byte_deadline_beyond_the_handshake_deadline_is_refused() {
        let dir = dir_with_pems();
        let text = MINIMAL.replace(
            "client_ca = \"ca.pem\"",
            "client_ca = \"ca.pem\"\nfirst_byte_timeout = \"20s\"",
        );
        let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
        assert!(err.to_string().contains("edge.first_byte_timeout"), "{err}");
    }

    #[test]
    fn shipped_example_uses_only_known_keys() {
        let text = include_str!("../../deploy/examples/server.toml");
        let parsed: Result<ServerConfig, _> = toml::from_str(text);
        assert!(parsed.is_ok(), "{:?}", parsed.err());
    }
}
