//! What the operator sees (`[admin]`, `[log]`): the health, readiness and metrics endpoint
//! and the log format. Kept apart from the listener settings: nothing here bounds what an
//! edge or a frontend client can hold.

use std::net::SocketAddr;

use serde::Deserialize;
pub use tunnel_io::logging::LogFormat;

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

fn default_admin_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9090)))
}
fn default_log_filter() -> String {
    "info".into()
}
