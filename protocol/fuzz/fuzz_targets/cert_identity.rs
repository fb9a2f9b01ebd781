//! Certificate identity extraction (`tunnel_io::identity`). Two halves, picked by the first
//! byte: (1) certificates built from fuzzed names and addresses, which must give exactly the
//! identity they were built with, or be refused when the common name is not a node name or a
//! DNS SAN names another node; (2) raw and mutated DER, which must never panic and, when
//! accepted, agree with `common_name` on the node.
#![no_main]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use protocol::NodeName;
use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use tunnel_io::identity::{common_name, edge_identity_from_der};

/// Most SANs per built certificate: enough for every branch, cheap to sign.
const MAX_SANS: usize = 8;

/// Signing key generated once: key generation would dominate each run.
fn key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| KeyPair::generate().unwrap())
}

enum San {
    Dns(String),
    Ip(IpAddr),
}

/// Fields are separated by 0xff; the first is the common name, then SANs: `4` + 4 bytes is an
/// IPv4 SAN, `6` + 16 bytes an IPv6 one, anything else ASCII is a DNS SAN.
fn build(data: &[u8]) -> Option<(String, Vec<San>, Vec<u8>)> {
    let mut fields = data.split(|&b| b == 0xff);
    let cn = std::str::from_utf8(fields.next()?).ok()?.to_owned();
    let mut sans = Vec::new();
    for field in fields.take(MAX_SANS) {
        let san = match field {
            [b'4', ip @ ..] if ip.len() == 4 => {
                San::Ip(IpAddr::from(<[u8; 4]>::try_from(ip).ok()?))
            }
            [b'6', ip @ ..] if ip.len() == 16 => {
                San::Ip(IpAddr::from(<[u8; 16]>::try_from(ip).ok()?))
            }
            _ if field.is_ascii() && !field.is_empty() => {
                San::Dns(String::from_utf8(field.to_vec()).ok()?)
            }
            _ => return None,
        };
        sans.push(san);
    }
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, cn.as_str());
    for san in &sans {
        params.subject_alt_names.push(match san {
            San::Dns(name) => SanType::DnsName(name.clone().try_into().ok()?),
            San::Ip(ip) => SanType::IpAddress(*ip),
        });
    }
    let der = params.self_signed(key()).ok()?.der().to_vec();
    Some((cn, sans, der))
}

fn raw(der: &[u8]) {
    let identity = edge_identity_from_der(der);
    let cn = common_name(der);
    if let Ok(identity) = identity {
        assert_eq!(cn.as_deref(), Some(identity.node.as_str()));
        let sorted: BTreeSet<_> = identity.ips.iter().copied().collect();
        assert_eq!(sorted.into_iter().collect::<Vec<_>>(), identity.ips);
        assert!(identity.ips.iter().all(|ip| *ip == ip.to_canonical()));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => raw(rest),
        1 => {
            // A valid certificate with a few bytes overwritten: reaches deep into the parser.
            let Some((_, _, mut der)) = build(b"node-a\xff4\x0a\x00\x00\x01") else {
                return;
            };
            for pair in rest.chunks_exact(3) {
                let at = u16::from_be_bytes([pair[0], pair[1]]) as usize % der.len();
                der[at] = pair[2];
            }
            raw(&der);
        }
        _ => {
            let Some((cn, sans, der)) = build(rest) else {
                return;
            };
            raw(&der);
            let result = edge_identity_from_der(&der);
            let node_ok = NodeName::parse(&cn).is_ok();
            let dns_ok = sans.iter().all(|s| match s {
                San::Dns(name) => *name == cn,
                San::Ip(_) => true,
            });
            assert_eq!(result.is_ok(), node_ok && dns_ok, "{cn:?}: {result:?}");
            if let Ok(identity) = result {
                assert_eq!(identity.node.as_str(), cn);
                let want: BTreeSet<IpAddr> = sans
                    .iter()
                    .filter_map(|s| match s {
                        San::Ip(ip) => Some(ip.to_canonical()),
                        San::Dns(_) => None,
                    })
                    .collect();
                assert_eq!(identity.ips, want.into_iter().collect::<Vec<_>>());
            }
        }
    }
});
