//! Certificate authorities and identities: generating and loading the tunnel and frontend CAs,
//! issuing server/edge/client certificates, and reading an edge's node identity back out of a
//! verified client certificate. It does no TLS itself and never trusts a name from anywhere else.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::NodeName;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::prelude::{ParsedExtension, X509Name};

pub use tunnel_io::identity::{edge_identity_from_der, EdgeIdentity, IdentityError};

/// Default lifetime of a CA created by `ca init`: 10 years. Rotating a CA means re-joining every
/// edge, so it is long-lived; its key never leaves the server's secret.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of the tunnel server's certificate: 1 year, renewed with the deployment.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default lifetime of an edge client certificate: 30 days. Short, because revocation is by
/// refusing sessions and the edge renews over its authenticated session well before expiry.
pub const EDGE_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default lifetime of the frontend client certificate kube-apiserver presents: 1 year.
pub const FRONTEND_CLIENT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far `notBefore` is backdated: 5 minutes, so a peer whose clock is slightly behind ours
/// does not reject a certificate we have just issued.
const CLOCK_SKEW_ALLOWANCE: time::Duration = time::Duration::minutes(5);
/// Upper bound of an X.520 common name, in characters (`ub-common-name`).
const MAX_COMMON_NAME_LEN: usize = 64;

/// Errors creating, loading, issuing or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A name cannot be put into a certificate.
    #[error("invalid certificate name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// A server certificate was requested with neither DNS names nor IP addresses.
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoSubjectAltNames,
    /// The requested validity is zero or too large to represent.
    #[error("invalid certificate validity {0:?}")]
    InvalidValidity(Duration),
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file or directory could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file exists and overwriting was not asked for.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file holds no usable PEM certificate or private key.
    #[error("{}: {reason}", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate is not a CA certificate (no `basicConstraints CA:TRUE`).
    #[error("{} is not a CA certificate", path.display())]
    NotCa {
        /// The certificate file.
        path: PathBuf,
    },
    /// The private key does not belong to the CA certificate.
    #[error("{} is not the private key of {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The CA's subject cannot be reproduced byte for byte, so certificates signed with it would
    /// not chain to it.
    #[error("{}: unsupported CA certificate: {reason}", path.display())]
    UnsupportedCa {
        /// The certificate file.
        path: PathBuf,
        /// What could not be reproduced.
        reason: String,
    },
}

/// A freshly issued certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    /// The certificate, PEM (`CERTIFICATE`).
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8 `PRIVATE KEY`).
    pub key_pem: String,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is a secret: never let it reach a log line.
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate authority that can issue certificates: its certificate and signing key.
pub struct Ca {
    /// rcgen's view of the CA, used only as the issuer when signing. For a loaded CA this is a
    /// re-signed copy whose subject and key identifier equal the original's; it is never shown.
    issuer: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    /// Issued certificates never outlive the CA.
    not_after: OffsetDateTime,
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
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(node.as_str());
        params.subject_alt_names = subject_alt_names(&[node.as_str().to_owned()], ips)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, validity)
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
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(node.as_str());
        params.subject_alt_names = subject_alt_names(&[node.as_str().to_owned()], ips)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
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

/// Write a PEM file atomically (temporary file in the same directory, then rename): mode 0600
/// if `secret`, else 0644. Refuses to replace an existing file unless `overwrite`.
pub fn write_pem(path: &Path, pem: &str, secret: bool, overwrite: bool) -> Result<(), PkiError> {
    let write_err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    // tempfile creates the file 0600, so a key is never readable by others, not even briefly.
    let mut tmp = tempfile::Builder::new()
        .prefix(".tether-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(write_err)?;
    #[cfg(unix)]
    if !secret {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(write_err)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    tmp.write_all(pem.as_bytes()).map_err(write_err)?;
    // Data on disk before the rename makes it visible: a crash must not leave an empty key file.
    tmp.as_file().sync_all().map_err(write_err)?;
    let persisted = if overwrite {
        tmp.persist(path)
    } else {
        // No-clobber rename: the existence check and the rename are one atomic step.
        tmp.persist_noclobber(path)
    };
    if let Err(e) = persisted {
        return Err(if e.error.kind() == io::ErrorKind::AlreadyExists {
            PkiError::Exists {
                path: path.to_owned(),
            }
        } else {
            write_err(e.error)
        });
    }
    // Make the rename itself durable.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)
}

/// The files `tunnel-server ca init --dir DIR` creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaLayout {
    /// The directory holding them.
    pub dir: PathBuf,
}

impl CaLayout {
    /// Tunnel CA certificate (`ca.pem`): edges trust it; it signs the server and edge certs.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// Tunnel CA private key (`ca-key.pem`).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    /// Tunnel server certificate (`server.pem`).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// Tunnel server private key (`server-key.pem`).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    /// Frontend CA certificate (`frontend-ca.pem`): the mTLS CONNECT frontend trusts only it.
    pub fn frontend_ca_cert(&self) -> PathBuf {
        self.dir.join("frontend-ca.pem")
    }
    /// Frontend CA private key (`frontend-ca-key.pem`).
    pub fn frontend_ca_key(&self) -> PathBuf {
        self.dir.join("frontend-ca-key.pem")
    }
    /// Client certificate kube-apiserver presents to the frontend (`apiserver-client.pem`).
    pub fn frontend_client_cert(&self) -> PathBuf {
        self.dir.join("apiserver-client.pem")
    }
    /// Private key of the frontend client certificate (`apiserver-client-key.pem`).
    pub fn frontend_client_key(&self) -> PathBuf {
        self.dir.join("apiserver-client-key.pem")
    }

    /// Every file with whether it is secret, keys first.
    fn files(&self) -> [(PathBuf, bool); 8] {
        [
            (self.ca_key(), true),
            (self.server_key(), true),
            (self.frontend_ca_key(), true),
            (self.frontend_client_key(), true),
            (self.ca_cert(), false),
            (self.server_cert(), false),
            (self.frontend_ca_cert(), false),
            (self.frontend_client_cert(), false),
        ]
    }
}

/// Create `dir` (mode 0700 if new) holding: the tunnel CA; a server certificate it signs for
/// "localhost", 127.0.0.1, ::1 plus `server_dns`/`server_ips`; a *separate* frontend CA, so an
/// edge certificate can never authenticate at the apiserver-facing frontend; and a frontend
/// client certificate with CN "kube-apiserver". Both CAs last [`CA_VALIDITY`]; `validity` is the
/// lifetime of the server and frontend client certificates. Without `overwrite`, nothing is
/// written if any of the files already exists.
pub fn init_ca_dir(
    dir: &Path,
    server_dns: &[String],
    server_ips: &[IpAddr],
    validity: Duration,
    overwrite: bool,
) -> Result<CaLayout, PkiError> {
    let layout = CaLayout {
        dir: dir.to_owned(),
    };
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| PkiError::Write {
        path: dir.to_owned(),
        source,
    })?;
    if !overwrite {
        // Check all first so a refusal leaves no half-initialised directory behind.
        if let Some((path, _)) = layout.files().into_iter().find(|(p, _)| p.exists()) {
            return Err(PkiError::Exists { path });
        }
    }

    let mut dns = vec!["localhost".to_owned()];
    for name in server_dns {
        if !dns.contains(name) {
            dns.push(name.clone());
        }
    }
    let mut ips: Vec<IpAddr> = vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
    for ip in server_ips {
        if !ips.contains(ip) {
            ips.push(*ip);
        }
    }

    let tunnel_ca = Ca::generate("tether-tunnel-ca", CA_VALIDITY)?;
    let server = tunnel_ca.issue_server(&dns, &ips, validity)?;
    let frontend_ca = Ca::generate("tether-frontend-ca", CA_VALIDITY)?;
    let client = frontend_ca.issue_client("kube-apiserver", validity)?;

    let contents = [
        tunnel_ca.key_pem(),
        &server.key_pem,
        frontend_ca.key_pem(),
        &client.key_pem,
        tunnel_ca.cert_pem(),
        &server.cert_pem,
        frontend_ca.cert_pem(),
        &client.cert_pem,
    ];
    for ((path, secret), pem) in layout.files().into_iter().zip(contents) {
        write_pem(&path, pem, secret, overwrite)?;
    }
    Ok(layout)
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn check_common_name(cn: &str) -> Result<(), PkiError> {
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

fn common_name_dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn subject_alt_names(dns_names: &[String], ips: &[IpAddr]) -> Result<Vec<SanType>, PkiError> {
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
fn validity_window(
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
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Rebuild an rcgen name from a parsed one, keeping each attribute's string type so that the
/// re-encoding can match the original bytes.
fn distinguished_name_of(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::server::danger::ClientCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use std::sync::Arc;

    fn node(name: &str) -> NodeName {
        NodeName::parse(name).expect("valid node name")
    }

    fn der_of(pem: &str) -> CertificateDer<'static> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .expect("one certificate")
            .expect("valid PEM")
    }

    fn roots(ca_pem: &str) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(der_of(ca_pem)).expect("CA accepted as root");
        Arc::new(roots)
    }

    fn client_verifier(ca_pem: &str) -> Arc<dyn ClientCertVerifier> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        WebPkiClientVerifier::builder_with_provider(roots(ca_pem), provider)
            .build()
            .expect("verifier")
    }

    fn client_cert_verifies(ca_pem: &str, cert_pem: &str) -> bool {
        client_verifier(ca_pem)
            .verify_client_cert(&der_of(cert_pem), &[], UnixTime::now())
            .is_ok()
    }

    /// Sign arbitrary parameters with `ca`, to build certificates `issue_edge` would never make.
    fn custom_cert(ca: &Ca, cn: &[&str], sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        for (i, name) in cn.iter().enumerate() {
            // rcgen keeps one value per `DnType`; a custom type with the CN OID adds a second.
            let ty = match i {
                0 => DnType::CommonName,
                _ => DnType::CustomDnType(vec![2, 5, 4, 3]),
            };
            params.distinguished_name.push(ty, *name);
        }
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("key");
        params
            .signed_by(&key, &ca.issuer, &ca.key)
            .expect("signed")
            .der()
            .clone()
    }

    fn dns(name: &str) -> SanType {
        SanType::DnsName(name.try_into().expect("ia5"))
    }

    #[test]
    fn ca_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Ca>();
    }

    #[test]
    fn edge_certificate_identity_round_trips() {
        let ca = Ca::generate("test-ca", CA_VALIDITY).expect("ca");
        let ips: Vec<IpAddr> = vec![
            "10.0.0.9".parse().expect("ip"),
            "fd00::1".parse().expect("ip"),
            "10.0.0.5".parse().expect("ip"),
            // The same address as 10.0.0.5, IPv4-mapped: must collapse into it.
            "::ffff:10.0.0.5".parse().expect("ip"),
        ];
        let issued = ca
            .issue_edge(&node("edge-1"), &ips, EDGE_VALIDITY)
            .expect("issued");
        let id = edge_identity_from_der(&der_of(&issued.cert_pem)).expect("identity");
        assert_eq!(id.node, node("edge-1"));
        let want: Vec<IpAddr> = ["10.0.0.5", "10.0.0.9", "fd00::1"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        assert_eq!(id.ips, want);
    }

    #[test]
    fn dns_san_differing_from_cn_is_ambiguous() {
        let ca = Ca::generate("test-ca", CA_VALIDITY).expect("ca");
        let der = custom_cert(&ca, &["node-a"], vec![dns("node-a"), dns("node-b")]);
        assert!(matches!(
            edge_identity_from_der(&der),
            Err(IdentityError::Ambiguous { cn, other }) if cn == "node-a" && other == "node-b"
        ));
    }

    #[test]
    fn two_common_names_are_ambiguous() {
        let ca = Ca::generate("test-ca", CA_VALIDITY).expect("ca");
        let der = custom_cert(&ca, &["node-a", "node-b"], vec![]);
        assert!(matches!(
            edge_identity_from_der(&der),
            Err(IdentityError::Ambiguous { .. })
        ));
    }

    #[test]
    fn invalid_or_missing_common_name_is_refused() {
        let ca = Ca::generate("test-ca", CA_VALIDITY).expect("ca");
        let der = custom_cert(&ca, &["Not_A/Node"], vec![]);
        assert!(matches!(
            edge_identity_from_der(&der),
            Err(IdentityError::InvalidNodeName { .. })
        ));
        let der = custom_cert(&ca, &[], vec![dns("node-a")]);
        assert!(matches!(
            edge_identity_from_der(&der),
            Err(IdentityError::MissingCommonName)
        ));
        assert!(matches!(
            edge_identity_from_der(b"not a certificate"),
            Err(IdentityError::Malformed(_))
        ));
    }

    #[test]
    fn uri_and_email_sans_are_ignored() {
        let ca = Ca::generate("test-ca", CA_VALIDITY).expect("ca");
        let sans = vec![
            SanType::URI("spiffe://cluster/node-a".try_into().expect("ia5")),
            SanType::Rfc822Name("ops@example.com".try_into().expect("ia5")),
            SanType::IpAddress("192.168.1.2".parse().expect("ip")),
        ];
        let id = edge_identity_from_der(&custom_cert(&ca, &["node-a"], sans)).expect("identity");
        assert_eq!(id.node, node("node-a"));
        assert_eq!(id.ips, vec!["192.168.1.2".parse::<IpAddr>().expect("ip")]);
    }

    #[test]
    fn rustls_accepts_only_edge_certs_of_its_ca() {
        let ca = Ca::generate("test-ca", CA_VALIDITY).expect("ca");
        let other = Ca::generate("other-ca", CA_VALIDITY).expect("ca");
        let edge = ca
            .issue_edge(&node("edge-1"), &[], EDGE_VALIDITY)
            .expect("edge");
        let foreign = other
            .issue_edge(&node("edge-1"), &[], EDGE_VALIDITY)
            .expect("edge");
        assert!(client_cert_verifies(ca.cert_pem(), &edge.cert_pem));
        assert!(!client_cert_verifies(ca.cert_pem(), &foreign.cert_pem));
        // A server certificate lacks the clientAuth EKU, so it cannot pose as an edge.
        let server = ca
            .issue_server(&["localhost".into()], &[], SERVER_VALIDITY)
            .expect("server");
        assert!(!client_cert_verifies(ca.cert_pem(), &server.cert_pem));
    }

    #[test]
    fn load_round_trips_and_issues_verifiable_certs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate("test-ca", CA_VALIDITY).expect("ca");
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
        write_pem(&cert, ca.cert_pem(), false, false).expect("cert written");
        write_pem(&key, ca.key_pem(), true, false).expect("key written");
        let loaded = Ca::load(&cert, &key).expect("loaded");
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.key_pem(), ca.key_pem());
        let edge = loaded
            .issue_edge(&node("edge-2"), &[], EDGE_VALIDITY)
            .expect("edge");
        // Verified against the *original* CA certificate, not the re-signed copy.
        assert!(client_cert_verifies(ca.cert_pem(), &edge.cert_pem));
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate("test-ca", CA_VALIDITY).expect("ca");
        let other = Ca::generate("other-ca", CA_VALIDITY).expect("ca");
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("other-key.pem"));
        let missing = dir.path().join("missing.pem");
        write_pem(&cert, ca.cert_pem(), false, false).expect("written");
        write_pem(&key, other.key_pem(), true, false).expect("written");

        let err = Ca::load(&missing, &key).expect_err("missing file");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let err = Ca::load(&cert, &key).expect_err("wrong key");
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("other-key.pem"), "{err}");
        let err = Ca::load(&key, &key).expect_err("key is no certificate");
        assert!(matches!(err, PkiError::BadPem { .. }), "{err}");

        let leaf = ca
            .issue_server(&["localhost".into()], &[], SERVER_VALIDITY)
            .expect("leaf");
        let (leaf_cert, leaf_key) = (dir.path().join("leaf.pem"), dir.path().join("leaf-key.pem"));
        write_pem(&leaf_cert, &leaf.cert_pem, false, false).expect("written");
        write_pem(&leaf_key, &leaf.key_pem, true, false).expect("written");
        let err = Ca::load(&leaf_cert, &leaf_key).expect_err("not a CA");
        assert!(matches!(err, PkiError::NotCa { .. }), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn init_writes_keys_private_and_certs_public() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        let layout = init_ca_dir(&dir, &[], &[], SERVER_VALIDITY, false).expect("init");
        let mode = |p: &Path| fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for (path, secret) in layout.files() {
            assert_eq!(mode(&path), if secret { 0o600 } else { 0o644 }, "{path:?}");
        }
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&dir).expect("dir").count(), 8);
    }

    #[test]
    fn init_refuses_to_overwrite_unless_asked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = init_ca_dir(tmp.path(), &[], &[], SERVER_VALIDITY, false).expect("init");
        let first = fs::read_to_string(layout.ca_cert()).expect("read");
        let err = init_ca_dir(tmp.path(), &[], &[], SERVER_VALIDITY, false).expect_err("exists");
        assert!(matches!(err, PkiError::Exists { .. }), "{err}");
        assert_eq!(fs::read_to_string(layout.ca_cert()).expect("read"), first);
        init_ca_dir(tmp.path(), &[], &[], SERVER_VALIDITY, true).expect("overwrite");
        assert_ne!(fs::read_to_string(layout.ca_cert()).expect("read"), first);

        let err = write_pem(&layout.ca_key(), "x", true, false).expect_err("exists");
        assert!(matches!(err, PkiError::Exists { .. }), "{err}");
    }

    #[test]
    fn init_separates_tunnel_and_frontend_trust() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let extra_ip: IpAddr = "10.1.2.3".parse().expect("ip");
        let layout = init_ca_dir(
            tmp.path(),
            &["tunnel.example.com".into()],
            &[extra_ip],
            SERVER_VALIDITY,
            false,
        )
        .expect("init");
        let read = |p: PathBuf| fs::read_to_string(p).expect("read");
        let tunnel = Ca::load(&layout.ca_cert(), &layout.ca_key()).expect("tunnel ca");
        let frontend_pem = read(layout.frontend_ca_cert());
        let edge = tunnel
            .issue_edge(&node("edge-1"), &[], EDGE_VALIDITY)
            .expect("edge");

        // The apiserver client cert works at the frontend; an edge cert never does.
        assert!(client_cert_verifies(
            &frontend_pem,
            &read(layout.frontend_client_cert())
        ));
        assert!(!client_cert_verifies(&frontend_pem, &edge.cert_pem));
        assert!(!client_cert_verifies(
            tunnel.cert_pem(),
            &read(layout.frontend_client_cert())
        ));

        // The server certificate is valid for the default and the extra names.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiServerVerifier::builder_with_provider(roots(tunnel.cert_pem()), provider)
                .build()
                .expect("verifier");
        let server = der_of(&read(layout.server_cert()));
        for name in [
            "localhost",
            "tunnel.example.com",
            "127.0.0.1",
            "::1",
            "10.1.2.3",
        ] {
            let name = ServerName::try_from(name).expect("server name");
            verifier
                .verify_server_cert(&server, &[], &name, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{name:?}: {e}"));
        }
        let stranger = ServerName::try_from("evil.example.com").expect("server name");
        assert!(verifier
            .verify_server_cert(&server, &[], &stranger, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn bad_names_and_validities_are_refused() {
        let ca = Ca::generate("test-ca", CA_VALIDITY).expect("ca");
        assert!(matches!(
            ca.issue_server(&[], &[], SERVER_VALIDITY),
            Err(PkiError::NoSubjectAltNames)
        ));
        assert!(matches!(
            ca.issue_server(&["bad name".into()], &[], SERVER_VALIDITY),
            Err(PkiError::InvalidName { .. })
        ));
        assert!(matches!(
            ca.issue_client("", SERVER_VALIDITY),
            Err(PkiError::InvalidName { .. })
        ));
        assert!(matches!(
            ca.issue_client("kube-apiserver", Duration::ZERO),
            Err(PkiError::InvalidValidity(_))
        ));
        // Issued certificates never outlive their CA.
        let short = Ca::generate("short-ca", Duration::from_secs(3600)).expect("ca");
        let leaf = short
            .issue_client("kube-apiserver", CA_VALIDITY)
            .expect("leaf");
        let der = der_of(&leaf.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        assert!(cert.validity().not_after.to_datetime() <= short.not_after);
    }
}
