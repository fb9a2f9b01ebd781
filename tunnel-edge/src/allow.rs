//! The edge's own destination allowlist, default-deny and independent of the server's
//! policy: a compromised cloud side must not turn the edge into a pivot into the IDC network.
//! By default only the kubelet port on loopback, on this node's name and on its node IPs.
//! It also decides where a target naming this node is dialed ([`SelfDial`]): never a guess.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use protocol::{Host, NodeName, Target};
use serde::Deserialize;

/// An extra destination range the IDC operator opened.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraRule {
    /// Addresses (for example `10.20.0.0/16`).
    pub cidr: IpNet,
    /// Ports allowed on them.
    pub ports: Vec<u16>,
}

/// Why the edge refused a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A name that is not this node's.
    #[error("{0} is not this node ({1}); the edge only dials itself by name")]
    OtherName(NodeName, NodeName),
    /// An address outside this node's addresses and the operator's extra ranges.
    #[error("address {0} is not allowed by the edge allowlist")]
    Address(IpAddr),
    /// A port not allowed for that address.
    #[error("port {0} on {1} is not allowed by the edge allowlist")]
    Port(u16, String),
    /// A target naming this node, which has no address to dial it at.
    #[error(
        "{0} has no IP address in its certificate and dial.self_host is unset; \
         name targets are refused rather than guessed (dial the node IP instead)"
    )]
    NoSelfAddress(NodeName),
}

/// Where targets naming this node by name are dialed.
///
/// A node-name target used to go to 127.0.0.1: a kubelet bound only to the node IP was
/// missed, and whatever listened on loopback got the connection. The node's own certificate
/// IP is what the cluster knows the node by, so it is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfDial {
    /// `dial.self_host`: every target naming this node (by name or by node IP) goes here.
    Override(IpAddr),
    /// Name targets go to this node IP (the certificate's first IP SAN); IP targets as given.
    CertificateIp(IpAddr),
    /// No IP in the certificate and no override: name targets are refused.
    Unknown,
}

impl SelfDial {
    /// `self_host` (the `dial.self_host` setting) wins over `first_ip_san` (the first IP SAN
    /// of this node's certificate).
    pub fn new(self_host: Option<IpAddr>, first_ip_san: Option<IpAddr>) -> SelfDial {
        match (self_host, first_ip_san) {
            (Some(host), _) => SelfDial::Override(host),
            (None, Some(ip)) => SelfDial::CertificateIp(ip),
            (None, None) => SelfDial::Unknown,
        }
    }

    /// The address name targets are dialed at, if any.
    pub fn name_host(self) -> Option<IpAddr> {
        match self {
            SelfDial::Override(ip) | SelfDial::CertificateIp(ip) => Some(ip),
            SelfDial::Unknown => None,
        }
    }
}

/// The validated allowlist plus this node's identity.
#[derive(Debug, Clone)]
pub struct EdgeAllowlist {
    node: NodeName,
    node_ips: Vec<IpAddr>,
    self_ports: Vec<u16>,
    extra: Vec<ExtraRule>,
    self_dial: SelfDial,
}

impl EdgeAllowlist {
    /// `self_ports` apply to this node's own addresses; `self_dial` says where targets
    /// naming this node are dialed.
    pub fn new(
        node: NodeName,
        node_ips: Vec<IpAddr>,
        self_ports: Vec<u16>,
        extra: Vec<ExtraRule>,
        self_dial: SelfDial,
    ) -> EdgeAllowlist {
        EdgeAllowlist {
            node,
            node_ips,
            self_ports,
            extra,
            self_dial,
        }
    }

    /// Where targets naming this node are dialed.
    pub fn self_dial(&self) -> SelfDial {
        self.self_dial
    }

    /// This node's name.
    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// Decide, and if allowed return the socket address to dial.
    pub fn resolve(&self, target: &Target) -> Result<SocketAddr, Refusal> {
        let port = target.port;
        match &target.host {
            Host::Name(name) => {
                if *name != self.node {
                    return Err(Refusal::OtherName(name.clone(), self.node.clone()));
                }
                self.check_self_port(port, name.as_str())?;
                let host = self
                    .self_dial
                    .name_host()
                    .ok_or_else(|| Refusal::NoSelfAddress(name.clone()))?;
                Ok(SocketAddr::new(host, port))
            }
            Host::Ip(ip) => {
                let is_self = self.node_ips.contains(ip) || ip.is_loopback() && is_localhost(ip);
                if is_self && self.self_ports.contains(&port) {
                    let host = match self.self_dial {
                        SelfDial::Override(host) if !ip.is_loopback() => host,
                        _ => *ip,
                    };
                    return Ok(SocketAddr::new(host, port));
                }
                let in_extra: Vec<_> = self.extra.iter().filter(|r| r.cidr.contains(ip)).collect();
                if in_extra.iter().any(|r| r.ports.contains(&port)) {
                    return Ok(SocketAddr::new(*ip, port));
                }
                if is_self || !in_extra.is_empty() {
                    Err(Refusal::Port(port, ip.to_string()))
                } else {
                    Err(Refusal::Address(*ip))
                }
            }
        }
    }

    fn check_self_port(&self, port: u16, host: &str) -> Result<(), Refusal> {
        if self.self_ports.contains(&port) {
            Ok(())
        } else {
            Err(Refusal::Port(port, host.to_owned()))
        }
    }
}

/// Only the canonical loopback addresses count as "this node": 127.0.0.1 and ::1.
fn is_localhost(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => *v4 == std::net::Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE_IP: &str = "192.0.2.10";

    fn allow(extra: Vec<ExtraRule>) -> EdgeAllowlist {
        allow_dialing(extra, SelfDial::new(None, Some(NODE_IP.parse().unwrap())))
    }

    fn allow_dialing(extra: Vec<ExtraRule>, self_dial: SelfDial) -> EdgeAllowlist {
        EdgeAllowlist::new(
            NodeName::parse("node-a").unwrap(),
            vec![NODE_IP.parse().unwrap()],
            vec![10250],
            extra,
            self_dial,
        )
    }
    fn t(s: &str) -> Target {
        Target::parse(s).unwrap()
    }

    #[test]
    fn default_allows_only_the_kubelet_on_itself() {
        let a = allow(vec![]);
        // The node's name means its certificate IP, never whatever listens on loopback.
        assert_eq!(
            a.resolve(&t("node-a:10250")).unwrap(),
            "192.0.2.10:10250".parse().unwrap()
        );
        assert_eq!(
            a.resolve(&t("192.0.2.10:10250")).unwrap(),
            "192.0.2.10:10250".parse().unwrap()
        );
        assert_eq!(
            a.resolve(&t("127.0.0.1:10250")).unwrap(),
            "127.0.0.1:10250".parse().unwrap()
        );
    }

    #[test]
    fn testplan_16_ssrf_other_loopback_ports_and_addresses_are_refused_by_the_edge() {
        let a = allow(vec![]);
        assert!(matches!(
            a.resolve(&t("127.0.0.1:22")),
            Err(Refusal::Port(22, _))
        ));
        assert!(matches!(
            a.resolve(&t("node-a:2379")),
            Err(Refusal::Port(2379, _))
        ));
        assert!(matches!(
            a.resolve(&t("127.0.0.2:10250")),
            Err(Refusal::Address(_))
        ));
        assert!(matches!(
            a.resolve(&t("10.0.0.7:10250")),
            Err(Refusal::Address(_))
        ));
        assert!(matches!(
            a.resolve(&t("169.254.169.254:80")),
            Err(Refusal::Address(_))
        ));
    }

    #[test]
    fn testplan_16_another_nodes_name_is_refused_by_the_edge() {
        let a = allow(vec![]);
        assert!(matches!(
            a.resolve(&t("node-b:10250")),
            Err(Refusal::OtherName(..))
        ));
    }

    #[test]
    fn extra_ranges_open_only_their_ports() {
        let a = allow(vec![ExtraRule {
            cidr: "10.20.0.0/16".parse().unwrap(),
            ports: vec![9100],
        }]);
        assert!(a.resolve(&t("10.20.3.4:9100")).is_ok());
        assert!(matches!(
            a.resolve(&t("10.20.3.4:22")),
            Err(Refusal::Port(22, _))
        ));
        assert!(matches!(
            a.resolve(&t("10.21.0.1:9100")),
            Err(Refusal::Address(_))
        ));
    }

    #[test]
    fn self_dial_host_redirects_self_targets() {
        let self_dial = SelfDial::new(
            Some("127.0.0.1".parse().unwrap()),
            Some(NODE_IP.parse().unwrap()),
        );
        assert_eq!(self_dial, SelfDial::Override("127.0.0.1".parse().unwrap()));
        let a = allow_dialing(vec![], self_dial);
        for target in ["192.0.2.10:10250", "node-a:10250"] {
            assert_eq!(
                a.resolve(&t(target)).unwrap(),
                "127.0.0.1:10250".parse().unwrap(),
                "{target}"
            );
        }
    }

    #[test]
    fn name_target_without_a_certificate_ip_is_refused_not_guessed() {
        let a = allow_dialing(vec![], SelfDial::new(None, None));
        let refusal = a.resolve(&t("node-a:10250")).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::NoSelfAddress(NodeName::parse("node-a").unwrap())
        );
        assert!(refusal.to_string().contains("dial.self_host"), "{refusal}");
        // The port check still comes first, and loopback IP targets are unaffected.
        assert!(matches!(
            a.resolve(&t("node-a:22")),
            Err(Refusal::Port(22, _))
        ));
        assert_eq!(
            a.resolve(&t("127.0.0.1:10250")).unwrap(),
            "127.0.0.1:10250".parse().unwrap()
        );
    }
}
