//! The server's destination policy: which targets kube-apiserver may reach through the tunnel
//! at all, before any route lookup. Default-deny by port; loopback, link-local, cloud metadata
//! and other non-unicast addresses are never allowed. The edge applies its own, independent
//! allowlist on top.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use protocol::{Host, Target};

use crate::config::PolicyConfig;

/// Well-known cloud instance-metadata endpoints that are not link-local and so need naming.
const METADATA_ADDRESSES: &[IpAddr] = &[
    // Alibaba Cloud ECS metadata.
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    // AWS IMDS over IPv6.
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// Why the policy refused a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The port is not in `policy.allowed_ports`.
    #[error("port {0} is not allowed by the server policy")]
    Port(u16),
    /// A loopback, link-local, unspecified, multicast, broadcast or metadata address.
    #[error("address {0} is never reachable through the tunnel ({1})")]
    Address(IpAddr, &'static str),
    /// `node-name:port` targets are disabled.
    #[error("node-name targets are disabled by the server policy")]
    NodeName,
}

/// The validated server policy.
#[derive(Debug, Clone)]
pub struct DialPolicy {
    allowed_ports: BTreeSet<u16>,
    allow_node_names: bool,
}

impl DialPolicy {
    /// Build from validated config.
    pub fn new(config: &PolicyConfig) -> DialPolicy {
        DialPolicy {
            allowed_ports: config.allowed_ports.iter().copied().collect(),
            allow_node_names: config.allow_node_names,
        }
    }

    /// Allow or refuse a target. Route lookup happens after this and is a separate refusal.
    pub fn check(&self, target: &Target) -> Result<(), Denial> {
        match &target.host {
            Host::Ip(ip) => {
                if let Some(kind) = forbidden_kind(*ip) {
                    return Err(Denial::Address(*ip, kind));
                }
            }
            Host::Name(_) if !self.allow_node_names => return Err(Denial::NodeName),
            Host::Name(_) => {}
        }
        if !self.allowed_ports.contains(&target.port) {
            return Err(Denial::Port(target.port));
        }
        Ok(())
    }
}

/// Classify addresses that must never be a tunnel destination, whatever the config says.
pub fn forbidden_kind(ip: IpAddr) -> Option<&'static str> {
    if METADATA_ADDRESSES.contains(&ip) {
        return Some("cloud metadata");
    }
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.octets()[0] == 0 {
                Some("unspecified")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_kind(IpAddr::V4(v4));
            }
            // The deprecated IPv4-compatible spelling (`::a.b.c.d`) is an odd way to write an
            // IPv4 address: judge it as one so `[::127.0.0.1]` cannot slip through.
            let s = v6.segments();
            if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                if let Some(kind) = forbidden_kind(IpAddr::V4(Ipv4Addr::new(a, b, c, d))) {
                    return Some(kind);
                }
            }
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> DialPolicy {
        DialPolicy::new(&PolicyConfig::default())
    }

    fn check(t: &str) -> Result<(), Denial> {
        policy().check(&Target::parse(t).unwrap())
    }

    #[test]
    fn kubelet_port_on_node_ip_and_name_is_allowed() {
        assert_eq!(check("10.0.0.5:10250"), Ok(()));
        assert_eq!(check("node-a:10250"), Ok(()));
        assert_eq!(check("[2001:db8::5]:10250"), Ok(()));
    }

    #[test]
    fn other_ports_are_denied_by_default() {
        assert_eq!(check("10.0.0.5:22"), Err(Denial::Port(22)));
        assert_eq!(check("node-a:10255"), Err(Denial::Port(10255)));
    }

    #[test]
    fn testplan_16_ssrf_addresses_are_denied_even_on_allowed_ports() {
        for t in [
            "127.0.0.1:10250",
            "127.9.9.9:10250",
            "169.254.169.254:10250",
            "0.0.0.0:10250",
            "224.0.0.1:10250",
            "255.255.255.255:10250",
            "100.100.100.200:10250",
            "[::1]:10250",
            "[::]:10250",
            "[fe80::1]:10250",
            "[fd00:ec2::254]:10250",
            "[ff02::1]:10250",
            "[::ffff:127.0.0.1]:10250",
            "[::127.0.0.1]:10250",
            "[::169.254.169.254]:10250",
        ] {
            assert!(matches!(check(t), Err(Denial::Address(..))), "{t}");
        }
    }

    #[test]
    fn node_names_can_be_disabled() {
        let p = DialPolicy::new(&PolicyConfig {
            allowed_ports: vec![10250],
            allow_node_names: false,
        });
        assert_eq!(
            p.check(&Target::parse("node-a:10250").unwrap()),
            Err(Denial::NodeName)
        );
    }
}
