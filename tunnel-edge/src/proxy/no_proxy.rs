//! `NO_PROXY`: which servers the edge dials directly although a proxy is set, matched as
//! curl (7.86 and later) matches them, against the host as configured (never a DNS answer):
//!
//! - entries are separated by commas and/or white space, compared case-insensitively;
//! - `*` as the whole value bypasses the proxy for every host;
//! - a name matches itself and every name below it: `example.com` and `.example.com` both
//!   match `example.com` and `lb.example.com`, never `badexample.com`;
//! - an IP address matches that address, a CIDR (`10.0.0.0/8`, `fd00::/8`) every address in
//!   it; only hosts written as IP addresses match them (`localhost` is not `127.0.0.1`).
//!
//! Entries with a port (`lb:9000`) match nothing, as in curl. A malformed CIDR is an error
//! rather than a silently ignored entry.

use std::net::IpAddr;

use ipnet::IpNet;

/// One `NO_PROXY` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A name and everything below it, lowercase, without leading or trailing dots.
    Domain(String),
    /// An address range (a single address is a /32 or /128).
    Net(IpNet),
}

/// A parsed `NO_PROXY` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    all: bool,
    entries: Vec<Entry>,
}

/// A `NO_PROXY` entry that looks like a CIDR but is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no_proxy entry `{0}` is not a valid CIDR (address/prefix length)")]
pub struct NoProxyError(pub String);

impl NoProxy {
    /// Parse a list as curl reads `NO_PROXY`.
    pub fn parse(list: &str) -> Result<NoProxy, NoProxyError> {
        let list = list.trim();
        if list == "*" {
            return Ok(NoProxy {
                all: true,
                entries: Vec::new(),
            });
        }
        let mut entries = Vec::new();
        for token in list.split(|c: char| c == ',' || c.is_whitespace()) {
            if token.is_empty() {
                continue;
            }
            let bare = token
                .strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .unwrap_or(token);
            if let Ok(ip) = bare.parse::<IpAddr>() {
                entries.push(Entry::Net(IpNet::from(ip)));
            } else if token.contains('/') {
                let net = token
                    .parse::<IpNet>()
                    .map_err(|_| NoProxyError(token.to_owned()))?;
                entries.push(Entry::Net(net.trunc()));
            } else {
                let name = token.trim_matches('.').to_ascii_lowercase();
                if !name.is_empty() {
                    entries.push(Entry::Domain(name));
                }
            }
        }
        Ok(NoProxy {
            all: false,
            entries,
        })
    }

    /// Whether `host` (a name, or an IP address, IPv6 with or without brackets) is dialed
    /// directly.
    pub fn matches(&self, host: &str) -> bool {
        if self.all {
            return true;
        }
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.entries.iter().any(|e| match e {
                Entry::Net(net) => net.contains(&ip),
                Entry::Domain(_) => false,
            });
        }
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        self.entries.iter().any(|e| match e {
            Entry::Domain(d) => {
                name == *d
                    || name
                        .strip_suffix(d.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }
            Entry::Net(_) => false,
        })
    }

    /// Whether the list is empty (no host bypasses the proxy).
    pub fn is_empty(&self) -> bool {
        !self.all && self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(list: &str) -> NoProxy {
        NoProxy::parse(list).unwrap()
    }

    #[test]
    fn star_alone_bypasses_everything() {
        assert!(np("*").matches("lb.example"));
        assert!(np(" * ").matches("10.0.0.1"));
        // Like curl, `*` among other entries is no wildcard.
        assert!(!np("*, other").matches("lb.example"));
    }

    #[test]
    fn domains_match_themselves_and_below_on_label_boundaries() {
        let list = np("example.com, .corp.internal ,LB.Test");
        for yes in [
            "example.com",
            "lb.example.com",
            "EXAMPLE.COM.",
            "x.corp.internal",
            "corp.internal",
            "lb.test",
        ] {
            assert!(list.matches(yes), "{yes}");
        }
        for no in [
            "badexample.com",
            "example.com.evil",
            "internal",
            "test",
            "10.0.0.1",
        ] {
            assert!(!list.matches(no), "{no}");
        }
    }

    #[test]
    fn addresses_and_cidrs_match_ip_hosts_only() {
        let list = np("127.0.0.1 10.0.0.0/8,fd00::/8 [::1] 192.168.1.77/24");
        for yes in [
            "127.0.0.1",
            "10.200.3.4",
            "fd00::9",
            "[fd00::9]",
            "::1",
            "192.168.1.3",
        ] {
            assert!(list.matches(yes), "{yes}");
        }
        for no in [
            "127.0.0.2",
            "11.0.0.1",
            "fe80::1",
            "localhost",
            "192.168.2.1",
        ] {
            assert!(!list.matches(no), "{no}");
        }
    }

    #[test]
    fn entries_with_ports_match_nothing_and_bad_cidrs_are_errors() {
        assert!(!np("lb.example:9000").matches("lb.example"));
        assert_eq!(
            NoProxy::parse("10.0.0.0/33"),
            Err(NoProxyError("10.0.0.0/33".into()))
        );
        assert!(NoProxy::parse("lb/8").is_err());
        assert!(np("").is_empty() && np(" , ,").is_empty());
        assert!(!np("*").is_empty());
    }
}
