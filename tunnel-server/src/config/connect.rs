//! The HTTP CONNECT frontend's settings (`[connect]`): the apiserver-facing socket, whose
//! TCP form must never run without client authentication, and the per-connection deadlines
//! and sizes that bound what a frontend client can hold.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

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

impl ConnectConfig {
    /// The CONNECT frontend's own rules (socket permissions, mTLS fail-closed, deadlines,
    /// head size); whether any frontend exists at all is the caller's cross-section rule.
    pub(super) fn validate(&self) -> Result<(), String> {
        let c = self;
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
        Ok(())
    }
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
