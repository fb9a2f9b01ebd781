//! Unit tests of the PKI: identities round-trip, rustls accepts exactly what it should,
//! loading and `ca init` files.

use super::*;
use protocol::NodeName;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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
    // Where the edge dials its own name: the first IP as issued, not the lowest.
    assert_eq!(
        tunnel_io::identity::first_ip_san(&der_of(&issued.cert_pem)).expect("parsed"),
        Some(ips[0])
    );
    let bare = ca
        .issue_edge(&node("edge-2"), &[], EDGE_VALIDITY)
        .expect("issued");
    assert_eq!(
        tunnel_io::identity::first_ip_san(&der_of(&bare.cert_pem)).expect("parsed"),
        None
    );
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
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(tunnel.cert_pem()), provider)
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
