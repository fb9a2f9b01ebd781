//! Server configuration: the TOML schema (unknown keys are errors), CLI overrides, and one
//! validation pass that turns it into [`ServerConfig`], the only form the rest of the server
//! sees. Relative paths are resolved against the config file's directory.
//!
//! One file per section that has its own concern (`edge`: the unauthenticated listener and
//! its limits; `connect`: the apiserver frontend; `konnectivity`: the gRPC frontend and agents; `policy`; `observe`: admin and logs); this
//! file holds the whole and the rules that span sections (a frontend must exist, frontend
//! CAs differ from the edge CA). Every type is re-exported here, so `crate::config::X` is the
//! one path callers use.

mod connect;
mod edge;
mod konnectivity;
mod observe;
mod policy;
#[cfg(test)]
mod tests;

pub use connect::ConnectConfig;
pub use edge::{EdgeListenerConfig, DEFAULT_EDGE_PORT};
pub use konnectivity::KonnectivityConfig;
pub use observe::{AdminConfig, LogConfig, LogFormat};
pub use policy::PolicyConfig;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tunnel_io::h2tune::H2Tuning;

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
    pub konnectivity: Option<KonnectivityConfig>,
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
    pub upstreams: crate::edge::upstream::UpstreamMap,
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
        self.edge.validate()?;
        self.h2.validate().map_err(|m| format!("key `h2.{m}`"))?;
        self.replica.validate()?;
        crate::edge::upstream::validate(&self.upstreams)?;

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
        c.validate()?;
        self.policy.validate()?;
        crate::trust::check_separate_frontend_ca(self)?;
        Ok(())
    }
}
