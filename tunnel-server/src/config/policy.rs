//! The server's destination policy (`[policy]`): which ports the apiserver may reach on
//! edges. Default-deny; the fixed refusals (loopback, link-local, metadata) are in
//! `crate::policy`, not configurable.

use serde::Deserialize;

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

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            allowed_ports: default_allowed_ports(),
            allow_node_names: true,
        }
    }
}

impl PolicyConfig {
    /// An empty or port-0 allowlist is a mistake, not a way to deny everything.
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.allowed_ports.is_empty() {
            return Err("key `policy.allowed_ports` is empty: nothing could be reached".into());
        }
        if self.allowed_ports.contains(&0) {
            return Err("key `policy.allowed_ports`: port 0 is not a port".into());
        }
        Ok(())
    }
}

fn default_allowed_ports() -> Vec<u16> {
    vec![10250]
}
fn yes() -> bool {
    true
}
