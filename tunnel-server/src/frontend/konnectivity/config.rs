//! The `[konnectivity]` section: where the gRPC frontend listens and its limits. Same
//! fail-closed rules as `[connect]`: the TCP form needs a server certificate *and* a client
//! CA, and the Unix socket is never accessible to other users. Dial, write and idle timeouts
//! are shared with the CONNECT frontend (`connect.dial_timeout`, `connect.write_timeout`).

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
}

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
        if self.unix_socket.is_none() && self.tcp_listen.is_none() {
            return Err(
                "section `konnectivity`: set `unix_socket` or `tcp_listen` (or remove the section)"
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
}
