//! What a `Join` or `Renew` request carries, checked before anything is issued: the node IPs
//! (count, forbidden ranges, canonical form), the CSR (parsed, self-signature verified) and
//! its claims, which may repeat the requested identity but never name another. Errors are
//! audit labels; the caller answers the one generic refusal.

use std::net::IpAddr;

use protocol::NodeName;
use rcgen::{CertificateSigningRequestParams, SanType};

/// Node IPs one certificate may carry.
const MAX_NODE_IPS: usize = 16;

/// The requested node IPs: at most [`MAX_NODE_IPS`], canonical (IPv4-mapped as IPv4),
/// deduplicated and sorted; never loopback, unspecified, multicast, link-local or broadcast.
pub(super) fn parse_node_ips(texts: &[String]) -> Result<Vec<IpAddr>, &'static str> {
    if texts.len() > MAX_NODE_IPS {
        return Err("too_many_ips");
    }
    let mut ips = Vec::with_capacity(texts.len());
    for text in texts {
        let ip: IpAddr = text.parse().map_err(|_| "bad_ip")?;
        let ip = ip.to_canonical();
        // Never addresses that would route the tunnel to the server's own or shared networks.
        let forbidden = ip.is_loopback()
            || ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_link_local() || v4.is_broadcast())
            || matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if forbidden {
            return Err("forbidden_ip");
        }
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips.sort();
    Ok(ips)
}

/// Parse a DER CSR and verify its self-signature, within the message size limit.
pub(super) fn parse_csr(der: &[u8]) -> Result<CertificateSigningRequestParams, &'static str> {
    if der.is_empty() || der.len() > tunnel_io::registration::MAX_MESSAGE {
        return Err("bad_csr");
    }
    // Parses and checks the CSR's self-signature: the caller holds the private key.
    CertificateSigningRequestParams::from_der(&der.to_vec().into()).map_err(|_| "bad_csr")
}

/// The CSR may repeat the identity (CN = node name, DNS SAN = node name, IP SANs among the
/// node IPs) but claim nothing else: a CSR naming another node is an attack, not a typo.
pub(super) fn check_csr_claims(
    csr: &CertificateSigningRequestParams,
    node: &NodeName,
    ips: &[IpAddr],
) -> Result<(), &'static str> {
    let mismatch = "csr_claims_other_identity";
    for (ty, value) in csr.params.distinguished_name.iter() {
        let text = match value {
            rcgen::DnValue::Utf8String(s) => s.clone(),
            rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
            rcgen::DnValue::Ia5String(s) => s.as_str().to_owned(),
            _ => return Err(mismatch),
        };
        if *ty != rcgen::DnType::CommonName || text != node.as_str() {
            return Err(mismatch);
        }
    }
    for san in &csr.params.subject_alt_names {
        let ok = match san {
            SanType::DnsName(name) => name.as_str() == node.as_str(),
            SanType::IpAddress(ip) => ips.contains(&ip.to_canonical()),
            _ => false,
        };
        if !ok {
            return Err(mismatch);
        }
    }
    Ok(())
}
