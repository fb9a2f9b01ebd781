//! Feeds arbitrary `agentidentifiers` metadata to the Konnectivity agent identifier parser
//! (`tunnel_server::agent::identifiers`): whatever it accepts stays within its bounds, prints
//! back (percent-encoded) to text that parses to the same claims, and passes the certificate
//! check only if every claim is the certificate's node name or one of its IPs.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use protocol::NodeName;
use tunnel_io::identity::EdgeIdentity;
use tunnel_server::agent::identifiers::{
    check, parse, Identifiers, MAX_IDENTIFIERS, MAX_IDENTIFIERS_LEN,
};

/// Percent-encode every byte outside the query-safe set, so the parser must decode it back.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print(ids: &Identifiers) -> String {
    let mut pairs = Vec::new();
    pairs.extend(ids.hosts.iter().map(|h| format!("host={}", encode(h))));
    for ip in &ids.ips {
        let key = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
        pairs.push(format!("{key}={}", encode(&ip.to_string())));
    }
    pairs.extend(ids.cidrs.iter().map(|c| format!("cidr={}", encode(c))));
    if ids.default_route {
        pairs.push("default-route=true".into());
    }
    pairs.join("&")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(ids) = parse(text) else {
        return;
    };
    assert!(text.len() <= MAX_IDENTIFIERS_LEN);
    let claims = ids.hosts.len() + ids.ips.len() + ids.cidrs.len();
    assert!(claims <= MAX_IDENTIFIERS);
    assert!(ids.hosts.iter().all(|h| *h == h.to_ascii_lowercase()));
    assert!(ids.ips.iter().all(|ip| *ip == ip.to_canonical()));

    // Parsed claims print back to text with the same meaning (the printed form may be longer
    // than the limit only through escaping, so check the round trip where it fits).
    let printed = print(&ids);
    if printed.len() <= MAX_IDENTIFIERS_LEN {
        assert_eq!(parse(&printed).as_ref(), Ok(&ids), "{printed}");
    }

    let identity = EdgeIdentity {
        node: NodeName::parse("node-a").unwrap(),
        ips: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
    };
    if check(&ids, &identity).is_ok() {
        assert!(ids.cidrs.is_empty() && !ids.default_route);
        assert!(ids.ips.iter().all(|ip| identity.ips.contains(ip)));
        for host in &ids.hosts {
            let ip = host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
            assert!(
                host == "node-a" || ip.is_some_and(|ip| identity.ips.contains(&ip)),
                "{host}"
            );
        }
    }
});
