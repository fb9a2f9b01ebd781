//! The `[konnectivity]` section: where the gRPC frontend listens and its limits, and where
//! stock Konnectivity agents attach (`agent_*`). Same fail-closed rules as `[connect]`: the
//! TCP forms need a server certificate *and* a client CA (the agent listener defaults to the
//! edge listener's, so it is never without one), and the Unix socket is never accessible to
//! other users. Dial, write and idle timeouts are shared with the CONNECT frontend
//! (`connect.dial_timeout`, `connect.write_timeout`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The Konnectivity gRPC frontend (kube-apiserver's `GRPC` egress).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KonnectivityConfig {
    /// Unix socket path (the apiserver-sidecar form, what kube-apiserver's `GRPC` egress
    /// supports); absent = disabled.
    pub unix_socket: Option<PathBuf>,
    /// Permission bits of the Unix socket (0600 or 0660).
    #[serde(default = "default_socket_mode")]
    pub unix_socket_mode: u32,
    /// TCP address for the mTLS form; absent = disabled.
    pub tcp_listen: Option<SocketAddr>,
    /// Server certificate for the mTLS form.
    pub tcp_cert: Option<PathBuf>,
    /// Server key for the mTLS form.
    pub tcp_key: Option<PathBuf>,
    /// CA of the clients' certificates (required with `tcp_listen`).
    pub tcp_client_ca: Option<PathBuf>,
    /// Time allowed for the TLS handshake of the TCP form.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time allowed between a `Proxy` stream's start and its `DIAL_REQ`.
    #[serde(default = "default_first_packet_timeout", with = "humantime_serde")]
    pub first_packet_timeout: Duration,
    /// gRPC connections served at once (each carries many streams).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Concurrent `Proxy` streams on one gRPC connection (HTTP/2 `MAX_CONCURRENT_STREAMS`).
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// TCP address where stock Konnectivity `proxy-agent`s connect
    /// (`/AgentService/Connect`, TLS with a mandatory client certificate); absent = disabled.
    pub agent_listen: Option<SocketAddr>,
    /// Server certificate of the agent listener (default: `edge.cert`).
    pub agent_cert: Option<PathBuf>,
    /// Server key of the agent listener (default: `edge.key`).
    pub agent_key: Option<PathBuf>,
    /// CA of the agents' client certificates (default: `edge.client_ca`, the tunnel CA that
    /// issues edge certificates). The certificate is the agent's identity.
    pub agent_client_ca: Option<PathBuf>,
    /// Bytes an agent may have sent for one connection that its frontend has not taken yet;
    /// beyond, the server stops reading the agent's stream until the frontend takes some
    /// (and resets the connection if it takes nothing for `connect.write_timeout`).
    #[serde(default = "default_agent_connection_buffer")]
    pub agent_connection_buffer: usize,
}

/// Smallest `agent_connection_buffer`: 64 KiB, two of a stock agent's 32 KiB reads.
pub const MIN_AGENT_CONNECTION_BUFFER: usize = 64 << 10;
/// Largest `agent_connection_buffer`: 64 MiB.
pub const MAX_AGENT_CONNECTION_BUFFER: usize = 64 << 20;

fn default_socket_mode() -> u32 {
    0o600
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_first_packet_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    1024
}
fn default_agent_connection_buffer() -> usize {
    // A reader may lag this far behind before the agent's stream pauses: plenty for
    // bursts, small enough that a few thousand connections of one agent stay bounded.
    4 << 20
}
fn default_max_streams_per_connection() -> u32 {
    // Above what a busy kube-apiserver keeps open on its one connection (TESTPLAN 13: 500
    // concurrent streams must not be cut), low enough to bound per-connection state.
    2000
}

impl KonnectivityConfig {
    /// Anchor relative paths at `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.unix_socket,
            &mut self.tcp_cert,
            &mut self.tcp_key,
            &mut self.tcp_client_ca,
            &mut self.agent_cert,
            &mut self.agent_key,
            &mut self.agent_client_ca,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Check the section's rules; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.serves_frontend() && self.agent_listen.is_none() {
            return Err(
                "section `konnectivity`: set `unix_socket`, `tcp_listen` or `agent_listen` (or remove the section)"
                    .into(),
            );
        }
        let mode = self.unix_socket_mode;
        if mode & 0o077 & !0o060 != 0 || mode > 0o777 {
            return Err(format!(
                "key `konnectivity.unix_socket_mode`: {mode:o} gives access to other users; use 0600 or 0660"
            ));
        }
        if self.tcp_listen.is_some() {
            // Without client authentication the TCP form is an open proxy: fail closed.
            for (key, value) in [
                ("konnectivity.tcp_cert", &self.tcp_cert),
                ("konnectivity.tcp_key", &self.tcp_key),
                ("konnectivity.tcp_client_ca", &self.tcp_client_ca),
            ] {
                match value {
                    None => {
                        return Err(format!(
                            "key `{key}` is required with `konnectivity.tcp_listen` (mTLS is mandatory)"
                        ))
                    }
                    Some(p) if !p.is_file() => {
                        return Err(format!("key `{key}`: file {} not found", p.display()))
                    }
                    Some(_) => {}
                }
            }
        }
        self.validate_agent()?;
        for (key, d) in [
            ("konnectivity.handshake_timeout", self.handshake_timeout),
            (
                "konnectivity.first_packet_timeout",
                self.first_packet_timeout,
            ),
        ] {
            if d.is_zero() {
                return Err(format!("key `{key}` must be > 0"));
            }
        }
        if self.max_connections == 0 || self.max_streams_per_connection == 0 {
            return Err(
                "keys `konnectivity.max_connections` and `konnectivity.max_streams_per_connection` must be > 0"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether the `/ProxyService` frontend is enabled (Unix socket or mTLS TCP).
    pub fn serves_frontend(&self) -> bool {
        self.unix_socket.is_some() || self.tcp_listen.is_some()
    }

    fn validate_agent(&self) -> Result<(), String> {
        let keys_without_listener = [
            ("konnectivity.agent_cert", self.agent_cert.is_some()),
            ("konnectivity.agent_key", self.agent_key.is_some()),
            (
                "konnectivity.agent_client_ca",
                self.agent_client_ca.is_some(),
            ),
        ];
        if self.agent_listen.is_none() {
            if let Some((key, _)) = keys_without_listener.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "key `{key}` is set but `konnectivity.agent_listen` is not"
                ));
            }
        }
        if self.agent_cert.is_some() != self.agent_key.is_some() {
            return Err(
                "keys `konnectivity.agent_cert` and `konnectivity.agent_key` go together".into(),
            );
        }
        for (key, value) in [
            ("konnectivity.agent_cert", &self.agent_cert),
            ("konnectivity.agent_key", &self.agent_key),
            ("konnectivity.agent_client_ca", &self.agent_client_ca),
        ] {
            if let Some(p) = value {
                if !p.is_file() {
                    return Err(format!("key `{key}`: file {} not found", p.display()));
                }
            }
        }
        let buffer = self.agent_connection_buffer;
        if !(MIN_AGENT_CONNECTION_BUFFER..=MAX_AGENT_CONNECTION_BUFFER).contains(&buffer) {
            return Err(format!(
                "key `konnectivity.agent_connection_buffer` must be {MIN_AGENT_CONNECTION_BUFFER}..={MAX_AGENT_CONNECTION_BUFFER} bytes"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<KonnectivityConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        for f in ["agent.pem", "agent-key.pem", "agent-ca.pem"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let mut config: KonnectivityConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.resolve_paths(dir.path());
        config.validate().map(|()| config)
    }

    #[test]
    fn agent_listener_alone_is_valid_and_serves_no_frontend() {
        let c = parse("agent_listen = \"127.0.0.1:0\"").unwrap();
        assert!(!c.serves_frontend());
        assert_eq!(c.agent_connection_buffer, 4 << 20);
        let c = parse(
            "agent_listen = \"127.0.0.1:0\"\nagent_cert = \"agent.pem\"\nagent_key = \"agent-key.pem\"\nagent_client_ca = \"agent-ca.pem\"",
        )
        .unwrap();
        assert!(c.agent_client_ca.unwrap().is_absolute());
    }

    #[test]
    fn agent_keys_fail_closed() {
        for (text, key) in [
            (
                "unix_socket = \"k.sock\"\nagent_client_ca = \"agent-ca.pem\"",
                "konnectivity.agent_client_ca",
            ),
            (
                "agent_listen = \"127.0.0.1:0\"\nagent_cert = \"agent.pem\"",
                "agent_key",
            ),
            (
                "agent_listen = \"127.0.0.1:0\"\nagent_client_ca = \"missing.pem\"",
                "konnectivity.agent_client_ca",
            ),
            (
                "agent_listen = \"127.0.0.1:0\"\nagent_connection_buffer = 1024",
                "konnectivity.agent_connection_buffer",
            ),
            ("agent_lisen = \"127.0.0.1:0\"", "agent_lisen"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
