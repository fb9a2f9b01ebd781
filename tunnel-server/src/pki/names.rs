//! Names, serials and validity windows as they go into certificates: checked before rcgen
//! sees them, and a loaded CA's subject rebuilt attribute by attribute.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{DistinguishedName, DnType, DnValue, SanType, SerialNumber};
use time::OffsetDateTime;
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::prelude::X509Name;

use super::{PkiError, CLOCK_SKEW_ALLOWANCE, MAX_COMMON_NAME_LEN};

pub(crate) fn check_common_name(cn: &str) -> Result<(), PkiError> {
    let reason = if cn.is_empty() {
        "empty"
    } else if cn.chars().count() > MAX_COMMON_NAME_LEN {
        "longer than 64 characters"
    } else if cn.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(PkiError::InvalidName {
        name: cn.to_owned(),
        reason: reason.into(),
    })
}

pub(crate) fn common_name_dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

pub(crate) fn subject_alt_names(
    dns_names: &[String],
    ips: &[IpAddr],
) -> Result<Vec<SanType>, PkiError> {
    let mut sans = Vec::with_capacity(dns_names.len() + ips.len());
    for name in dns_names {
        let invalid = |reason: String| PkiError::InvalidName {
            name: name.clone(),
            reason,
        };
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(invalid("not a DNS name".into()));
        }
        let ia5 = name
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| invalid(e.to_string()))?;
        sans.push(SanType::DnsName(ia5));
    }
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    Ok(sans)
}

/// `notBefore` (backdated for clock skew) and `notAfter`, clamped to `cap` (the issuer's expiry).
pub(crate) fn validity_window(
    validity: Duration,
    cap: Option<OffsetDateTime>,
) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    let invalid = || PkiError::InvalidValidity(validity);
    if validity.is_zero() {
        return Err(invalid());
    }
    let now = OffsetDateTime::now_utc();
    let span = time::Duration::try_from(validity).map_err(|_| invalid())?;
    let mut not_after = now.checked_add(span).ok_or_else(invalid)?;
    if let Some(cap) = cap {
        not_after = not_after.min(cap);
    }
    // X.509 GeneralizedTime stops at year 9999.
    if not_after.year() > 9999 {
        return Err(invalid());
    }
    Ok((now - CLOCK_SKEW_ALLOWANCE, not_after))
}

/// 128 random bits, positive and without a leading zero byte: unique per certificate, unlike
/// rcgen's default serial, which is derived from the public key.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Rebuild an rcgen name from a parsed one, keeping each attribute's string type so that the
/// re-encoding can match the original bytes.
pub(crate) fn distinguished_name_of(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        if rdn.iter().count() != 1 {
            return Err("multi-valued RDNs are not supported".into());
        }
        for attr in rdn.iter() {
            let oid: Vec<u64> = attr
                .attr_type()
                .iter()
                .ok_or("attribute OID out of range")?
                .collect();
            let text = attr
                .as_str()
                .map_err(|e| format!("attribute {oid:?} is not a string: {e}"))?;
            let value = match attr.attr_value().tag() {
                Tag::PrintableString => DnValue::PrintableString(
                    text.try_into().map_err(|e: rcgen::Error| e.to_string())?,
                ),
                Tag::Ia5String => {
                    DnValue::Ia5String(text.try_into().map_err(|e: rcgen::Error| e.to_string())?)
                }
                Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
                tag => return Err(format!("attribute string type {tag} is not supported")),
            };
            dn.push(DnType::from_oid(&oid), value);
        }
    }
    Ok(dn)
}
