//! A certificate authority that can issue: generated (`ca init`) or loaded from PEM files,
//! and the server/edge/client certificates it signs.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use protocol::NodeName;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::ParsedExtension;

use super::files::read_to_string;
use super::names::{
    check_common_name, common_name_dn, distinguished_name_of, random_serial, subject_alt_names,
    validity_window,
};
use super::{CertifiedKey, PkiError, CLOCK_SKEW_ALLOWANCE};

/// A certificate authority that can issue certificates: its certificate and signing key.
pub struct Ca {
    /// rcgen's view of the CA, used only as the issuer when signing. For a loaded CA this is a
    /// re-signed copy whose subject and key identifier equal the original's; it is never shown.
    pub(super) issuer: rcgen::Certificate,
    pub(super) key: KeyPair,
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    /// Issued certificates never outlive the CA.
    pub(super) not_after: OffsetDateTime,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("subject", &self.issuer.params().distinguished_name)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Generate a new self-signed CA (ECDSA P-256) named `common_name`, valid for `validity`.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Ca, PkiError> {
        check_common_name(common_name)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        // Path length 0: this CA signs end-entity certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let (not_before, not_after) = validity_window(validity, None)?;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            issuer: cert,
            key,
            not_after,
        })
    }

    /// Load a CA from a PEM certificate (the first one in the file) and its PEM private key.
    /// Errors name the offending file.
    pub fn load(cert_pem_path: &Path, key_pem_path: &Path) -> Result<Ca, PkiError> {
        let cert_pem = read_to_string(cert_pem_path)?;
        let key_pem = read_to_string(key_pem_path)?;
        let bad_cert = |reason: String| PkiError::BadPem {
            path: cert_pem_path.to_owned(),
            reason,
        };
        let cert_der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .next()
            .ok_or_else(|| bad_cert("no PEM CERTIFICATE block".into()))?
            .map_err(|e| bad_cert(format!("unreadable PEM: {e}")))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadPem {
            path: key_pem_path.to_owned(),
            reason: format!("not a usable private key: {e}"),
        })?;
        let (rest, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| bad_cert(format!("not an X.509 certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(bad_cert("trailing bytes after the certificate".into()));
        }
        if !x509.is_ca() {
            return Err(PkiError::NotCa {
                path: cert_pem_path.to_owned(),
            });
        }
        if x509.public_key().raw != key.public_key_der().as_slice() {
            return Err(PkiError::KeyMismatch {
                cert: cert_pem_path.to_owned(),
                key: key_pem_path.to_owned(),
            });
        }
        let unsupported = |reason: String| PkiError::UnsupportedCa {
            path: cert_pem_path.to_owned(),
            reason,
        };

        // rcgen 0.13 signs only with an rcgen `Certificate` as issuer, and builds that only by
        // signing. So rebuild the CA's parameters and self-sign them again with its own key:
        // issued certificates take the issuer name and key identifier from this copy, which
        // therefore must match the original exactly (checked below).
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name_of(x509.subject()).map_err(unsupported)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        if let Some(ski) = x509
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
        {
            params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
        }
        let not_after = x509.validity().not_after.to_datetime();
        params.not_before = x509.validity().not_before.to_datetime();
        params.not_after = not_after;
        let issuer = params.self_signed(&key)?;
        let (_, rebuilt) = x509_parser::parse_x509_certificate(issuer.der())
            .map_err(|e| unsupported(format!("re-encoding failed: {e}")))?;
        if rebuilt.subject().as_raw() != x509.subject().as_raw() {
            return Err(unsupported(
                "its subject name cannot be re-encoded byte for byte".into(),
            ));
        }
        Ok(Ca {
            issuer,
            key,
            cert_pem,
            key_pem,
            cert_der: cert_der.into_owned(),
            not_after,
        })
    }

    /// The CA certificate, PEM, exactly as generated or loaded.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM. A secret: write it only with [`write_pem`] and `secret = true`.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate, DER, for building a rustls root store.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issue a TLS server certificate (EKU serverAuth) for `dns_names` and `ips`; used for the
    /// tunnel server and for serving certificates of demo kubelets and test targets. The common
    /// name is the first DNS name (or IP) for the benefit of humans; clients check the SANs.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<CertifiedKey, PkiError> {
        let cn = match (dns_names.first(), ips.first()) {
            (Some(name), _) => name.clone(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => return Err(PkiError::NoSubjectAltNames),
        };
        check_common_name(&cn)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(&cn);
        params.subject_alt_names = subject_alt_names(dns_names, ips)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, validity)
    }

    /// Issue an edge client certificate (EKU clientAuth): common name and the only DNS SAN are
    /// the node name; the IP SANs are the node's IPs. [`edge_identity_from_der`] reads it back.
    pub fn issue_edge(
        &self,
        node: &NodeName,
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<CertifiedKey, PkiError> {
        self.issue(edge_params(node, ips)?, validity)
    }

    /// Issue an edge client certificate for a key the node keeps: the public key comes from
    /// its CSR (already parsed and signature-checked), the identity only from `node` and
    /// `ips`, never from the CSR's own subject or SANs. Returns the certificate, PEM.
    pub fn issue_edge_for_key(
        &self,
        public_key: rcgen::PublicKey,
        node: &NodeName,
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<String, PkiError> {
        let mut params = edge_params(node, ips)?;
        let (not_before, not_after) = validity_window(validity, Some(self.not_after))?;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let csr = rcgen::CertificateSigningRequestParams { params, public_key };
        Ok(csr.signed_by(&self.issuer, &self.key)?.pem())
    }

    /// Issue a frontend client certificate (EKU clientAuth, no SANs) with common name
    /// `common_name`, for kube-apiserver calling the mTLS CONNECT frontend.
    pub fn issue_client(
        &self,
        common_name: &str,
        validity: Duration,
    ) -> Result<CertifiedKey, PkiError> {
        check_common_name(common_name)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, validity)
    }

    /// Sign an end-entity certificate with a fresh key pair.
    fn issue(
        &self,
        mut params: CertificateParams,
        validity: Duration,
    ) -> Result<CertifiedKey, PkiError> {
        let (not_before, not_after) = validity_window(validity, Some(self.not_after))?;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Lets verifiers pick the right CA when several are trusted (rotation).
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// When a certificate was issued, Unix seconds: its `notBefore` plus the backdating every
/// certificate issued here gets. Revocation compares it with the node's revocation time.
pub fn issued_unix(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let issued = cert.validity().not_before.to_datetime() + CLOCK_SKEW_ALLOWANCE;
    u64::try_from(issued.unix_timestamp()).ok()
}

/// What the identity registry records of a certificate: serial and public key (to tell a
/// node's current certificate from older ones), issue time and expiry (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// Serial, lowercase hex.
    pub serial: String,
    /// SHA-256 (hex) of the subject public key.
    pub key_sha256: String,
    /// `notBefore` plus the backdating, as [`issued_unix`].
    pub issued_unix: u64,
    /// `notAfter`.
    pub expires_unix: u64,
}

/// Read [`CertificateFacts`] from a DER certificate; `None` if it does not parse.
pub fn certificate_facts(der: &[u8]) -> Option<CertificateFacts> {
    use sha2::Digest;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    let issued = cert.validity().not_before.to_datetime() + CLOCK_SKEW_ALLOWANCE;
    Some(CertificateFacts {
        serial: hex(cert.tbs_certificate.raw_serial()),
        key_sha256: hex(&sha2::Sha256::digest(
            cert.public_key().subject_public_key.data.as_ref(),
        )),
        issued_unix: u64::try_from(issued.unix_timestamp()).ok()?,
        expires_unix: u64::try_from(cert.validity().not_after.timestamp()).ok()?,
    })
}

/// [`certificate_facts`] of the first certificate in a PEM text.
pub fn certificate_facts_pem(pem: &str) -> Option<CertificateFacts> {
    let der = tunnel_io::tls::certs_from_pem(pem.as_bytes())
        .into_iter()
        .next()?;
    certificate_facts(der.as_ref())
}

/// What every edge certificate says, whoever holds its key: CN and the only DNS SAN are the
/// node name, the IP SANs its IPs, EKU clientAuth.
fn edge_params(node: &NodeName, ips: &[IpAddr]) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_dn(node.as_str());
    params.subject_alt_names = subject_alt_names(&[node.as_str().to_owned()], ips)?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}
