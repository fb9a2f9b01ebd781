//! A Konnectivity agent's self-declared routing claims, the `agentidentifiers` metadata
//! (`host=..&ipv4=..&ipv6=..&cidr=..&default-route=true`, URL query syntax), parsed strictly
//! and checked against what its verified certificate allows. Pure functions: no I/O, no
//! route table. A claim the certificate does not cover refuses the agent; it is never
//! trimmed away silently, so a misconfigured agent is visible at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tunnel_io::identity::EdgeIdentity;

/// Longest `agentidentifiers` value accepted, in bytes.
pub const MAX_IDENTIFIERS_LEN: usize = 4096;
/// Most `key=value` pairs accepted in one `agentidentifiers` value.
pub const MAX_IDENTIFIERS: usize = 64;

/// The claims of one agent, as declared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identifiers {
    /// `host=` values (node names, lowercased).
    pub hosts: Vec<String>,
    /// `ipv4=` and `ipv6=` values (IPv4-mapped IPv6 as IPv4).
    pub ips: Vec<IpAddr>,
    /// `cidr=` values, as written.
    pub cidrs: Vec<String>,
    /// `default-route=true`.
    pub default_route: bool,
}

/// Why an agent's identifiers are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    /// Longer than [`MAX_IDENTIFIERS_LEN`] or more than [`MAX_IDENTIFIERS`] pairs.
    #[error("agentidentifiers too long")]
    TooLong,
    /// Not `key=value` pairs separated by `&`, or bad percent-encoding.
    #[error("malformed agentidentifiers: {0}")]
    Malformed(String),
    /// A key Konnectivity does not define.
    #[error("unknown identifier type {0:?}")]
    UnknownKey(String),
    /// An `ipv4=`/`ipv6=` value that is not an address of that family.
    #[error("{key}={value:?} is not an {key} address")]
    BadAddress {
        /// `ipv4` or `ipv6`.
        key: &'static str,
        /// The value as decoded.
        value: String,
    },
    /// A claim the certificate does not cover.
    #[error("{key}={value} is not covered by the agent's certificate (node {node}, IPs [{ips}])")]
    NotCovered {
        /// Identifier type.
        key: &'static str,
        /// The claimed value.
        value: String,
        /// The certificate's node name.
        node: String,
        /// The certificate's IPs, comma-separated.
        ips: String,
    },
    /// `cidr=`: a certificate names addresses, never ranges, so no range can be bound.
    #[error("cidr={0} refused: routes are bound to the node name and IPs in the certificate, never to ranges")]
    Cidr(String),
    /// `default-route=true` would send every address nobody owns to this agent.
    #[error(
        "default-route=true refused: only addresses in the agent's certificate are routed to it"
    )]
    DefaultRoute,
}

/// Parse an `agentidentifiers` value. Empty means no claims.
pub fn parse(text: &str) -> Result<Identifiers, IdentifierError> {
    if text.len() > MAX_IDENTIFIERS_LEN {
        return Err(IdentifierError::TooLong);
    }
    let mut ids = Identifiers::default();
    let pairs = text.split('&').filter(|p| !p.is_empty());
    for (n, pair) in pairs.enumerate() {
        if n >= MAX_IDENTIFIERS {
            return Err(IdentifierError::TooLong);
        }
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| IdentifierError::Malformed(format!("{pair:?} is not key=value")))?;
        let key = percent_decode(key)?;
        let value = percent_decode(value)?;
        match key.as_str() {
            "host" => ids.hosts.push(value.to_ascii_lowercase()),
            "ipv4" => ids.ips.push(IpAddr::V4(
                value
                    .parse::<Ipv4Addr>()
                    .map_err(|_| IdentifierError::BadAddress { key: "ipv4", value })?,
            )),
            "ipv6" => ids.ips.push(
                IpAddr::V6(
                    value
                        .parse::<Ipv6Addr>()
                        .map_err(|_| IdentifierError::BadAddress { key: "ipv6", value })?,
                )
                .to_canonical(),
            ),
            "cidr" => ids.cidrs.push(value),
            "default-route" => match value.as_str() {
                "true" => ids.default_route = true,
                "false" => {}
                _ => {
                    return Err(IdentifierError::Malformed(format!(
                        "default-route={value:?}: expected true or false"
                    )))
                }
            },
            _ => return Err(IdentifierError::UnknownKey(key)),
        }
    }
    Ok(ids)
}

/// Check every claim against the certificate's identity: `host=` must be its node name (or
/// one of its IPs), `ipv4=`/`ipv6=` one of its IPs; `cidr=` and `default-route=true` are
/// never covered.
pub fn check(ids: &Identifiers, identity: &EdgeIdentity) -> Result<(), IdentifierError> {
    let not_covered = |key: &'static str, value: String| IdentifierError::NotCovered {
        key,
        value,
        node: identity.node.to_string(),
        ips: identity
            .ips
            .iter()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(","),
    };
    for host in &ids.hosts {
        let covered = host == identity.node.as_str()
            || host
                .parse::<IpAddr>()
                .is_ok_and(|ip| identity.ips.contains(&ip.to_canonical()));
        if !covered {
            return Err(not_covered("host", host.clone()));
        }
    }
    for ip in &ids.ips {
        if !identity.ips.contains(ip) {
            let key = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
            return Err(not_covered(key, ip.to_string()));
        }
    }
    if let Some(cidr) = ids.cidrs.first() {
        return Err(IdentifierError::Cidr(cidr.clone()));
    }
    if ids.default_route {
        return Err(IdentifierError::DefaultRoute);
    }
    Ok(())
}

/// `%XX` and `+` decoding of one query component, as Go's `url.ParseQuery` does.
fn percent_decode(text: &str) -> Result<String, IdentifierError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let byte = text
                    .get(i + 1..i + 3)
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| IdentifierError::Malformed(format!("bad escape in {text:?}")))?;
                out.push(byte);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| IdentifierError::Malformed(format!("{text:?} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::NodeName;

    fn identity() -> EdgeIdentity {
        EdgeIdentity {
            node: NodeName::parse("node-a").unwrap(),
            ips: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        }
    }

    #[test]
    fn parses_every_konnectivity_key() {
        let ids =
            parse("host=Node-A&ipv4=10.0.0.1&ipv6=fd00%3A%3A1&cidr=10.0.0.0/24&default-route=true")
                .unwrap();
        assert_eq!(ids.hosts, ["node-a"]);
        assert_eq!(
            ids.ips,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(ids.cidrs, ["10.0.0.0/24"]);
        assert!(ids.default_route);
        assert_eq!(parse("").unwrap(), Identifiers::default());
    }

    #[test]
    fn malformed_values_are_refused() {
        for (text, want) in [
            ("host", "not key=value"),
            ("zone=a", "unknown identifier"),
            ("ipv4=010.0.0.1", "not an ipv4"),
            ("ipv4=fd00::1", "not an ipv4"),
            ("ipv6=10.0.0.1", "not an ipv6"),
            ("host=%zz", "bad escape"),
            ("default-route=yes", "expected true"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        assert_eq!(
            parse(&"host=a&".repeat(MAX_IDENTIFIERS + 1)),
            Err(IdentifierError::TooLong)
        );
        assert_eq!(
            parse(&"x".repeat(MAX_IDENTIFIERS_LEN + 1)),
            Err(IdentifierError::TooLong)
        );
    }

    #[test]
    fn claims_inside_the_certificate_pass() {
        let ids = parse("host=node-a&ipv4=10.0.0.1&ipv6=fd00::1&default-route=false").unwrap();
        check(&ids, &identity()).unwrap();
        // An IPv4-mapped spelling of a certificate IP is the same address.
        check(&parse("ipv6=::ffff:10.0.0.1").unwrap(), &identity()).unwrap();
        check(&Identifiers::default(), &identity()).unwrap();
    }

    #[test]
    fn another_nodes_address_is_not_covered() {
        for text in [
            "ipv4=10.0.0.2",
            "host=node-b",
            "ipv6=fd00::2",
            "host=10.0.0.2",
        ] {
            let err = check(&parse(text).unwrap(), &identity()).unwrap_err();
            assert!(
                matches!(err, IdentifierError::NotCovered { .. }),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn ranges_and_default_route_are_never_covered() {
        let err = check(&parse("cidr=10.0.0.1/32").unwrap(), &identity()).unwrap_err();
        assert!(matches!(err, IdentifierError::Cidr(_)));
        let err = check(&parse("default-route=true").unwrap(), &identity()).unwrap_err();
        assert_eq!(err, IdentifierError::DefaultRoute);
    }
}
