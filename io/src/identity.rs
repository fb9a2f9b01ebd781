//! Reading identities out of a peer certificate that rustls has already verified: the node
//! name and node IPs of an edge, the common name of a frontend client. Checks no signature.

use std::collections::BTreeSet;
use std::net::IpAddr;

use protocol::{NameError, NodeName};
use x509_parser::prelude::GeneralName;

use x509_parser::prelude::{FromDer, X509Certificate};

/// The subject common name of a DER certificate, if it has a printable one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Errors reading an edge identity out of a client certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The bytes are not one well-formed X.509 certificate.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// The subject has no common name, so the certificate names no node.
    #[error("certificate subject has no common name")]
    MissingCommonName,
    /// The common name is not a valid Kubernetes node name.
    #[error("common name {cn:?} is not a valid node name: {source}")]
    InvalidNodeName {
        /// The common name as found.
        cn: String,
        /// Why the node name was refused.
        #[source]
        source: NameError,
    },
    /// The certificate names more than one node: several common names, or a DNS SAN that
    /// differs from the common name.
    #[error("certificate names both {cn:?} and {other:?}")]
    Ambiguous {
        /// The (first) common name.
        cn: String,
        /// The other name it carries.
        other: String,
    },
    /// An IP SAN is neither 4 nor 16 bytes long.
    #[error("IP address SAN of {0} bytes")]
    BadIpSan(usize),
}

/// The node identity carried by a verified edge client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeIdentity {
    /// The node, from the certificate's common name.
    pub node: NodeName,
    /// The node's IPs from the IP SANs: deduplicated, sorted, IPv4-mapped IPv6 as IPv4.
    pub ips: Vec<IpAddr>,
}

/// Parse a verified edge client certificate (DER, as rustls hands it over).
///
/// The common name must be a valid [`NodeName`]; every DNS SAN (if any) must equal it, else the
/// certificate names two nodes and is refused as [`IdentityError::Ambiguous`]. IP SANs become
/// `ips` (deduplicated, sorted, IPv4-mapped IPv6 normalised to IPv4); URI and email SANs are
/// ignored. Only call this after the chain has been verified: it checks no signature.
pub fn edge_identity_from_der(der: &[u8]) -> Result<EdgeIdentity, IdentityError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::Malformed(
            "trailing bytes after the certificate".into(),
        ));
    }
    let mut common_names = cert.subject().iter_common_name();
    let cn = common_names
        .next()
        .ok_or(IdentityError::MissingCommonName)?
        .as_str()
        .map_err(|e| IdentityError::Malformed(format!("common name is not a string: {e}")))?;
    if let Some(other) = common_names.next() {
        return Err(IdentityError::Ambiguous {
            cn: cn.to_owned(),
            other: String::from_utf8_lossy(other.as_slice()).into_owned(),
        });
    }
    let node = NodeName::parse(cn).map_err(|source| IdentityError::InvalidNodeName {
        cn: cn.to_owned(),
        source,
    })?;

    let mut ips = BTreeSet::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    for name in san.iter().flat_map(|san| san.value.general_names.iter()) {
        match name {
            // Exact comparison: a differently spelled name is a different claim, and node names
            // are lowercase by definition.
            GeneralName::DNSName(dns) if *dns != cn => {
                return Err(IdentityError::Ambiguous {
                    cn: cn.to_owned(),
                    other: (*dns).to_owned(),
                });
            }
            GeneralName::IPAddress(bytes) => {
                ips.insert(ip_from_san(bytes)?);
            }
            _ => {}
        }
    }
    Ok(EdgeIdentity {
        node,
        ips: ips.into_iter().collect(),
    })
}

/// The first IP SAN of a certificate in the certificate's own order (canonical form), or
/// `None` without one. [`EdgeIdentity::ips`] is sorted, so it cannot say which address the
/// issuer listed first: the node's primary address, where the edge dials targets that name
/// the node (`tunnel-server ca issue-edge --ip` keeps the operator's order; certificates
/// from `join` list their IPs sorted).
pub fn first_ip_san(der: &[u8]) -> Result<Option<IpAddr>, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    for name in san.iter().flat_map(|san| san.value.general_names.iter()) {
        if let GeneralName::IPAddress(bytes) = name {
            return ip_from_san(bytes).map(Some);
        }
    }
    Ok(None)
}

fn ip_from_san(bytes: &[u8]) -> Result<IpAddr, IdentityError> {
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).map_err(|_| IdentityError::BadIpSan(4))?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).map_err(|_| IdentityError::BadIpSan(16))?),
        n => return Err(IdentityError::BadIpSan(n)),
    };
    // kube-apiserver dials the IPv4 form; one address must not count as two.
    Ok(ip.to_canonical())
}
