//! The certificate chain the registration listener serves, and the CA a joining node pins.
//!
//! A node that joins with `--ca-hash` has no CA file: it finds the CA in the chain the
//! server presents. So the chain must carry the CA that issued the registration certificate,
//! and `token create --print-join-command` must pin exactly that CA, whichever file it
//! came from (the certificate file's own chain, or `registration.ca_cert`).

use std::path::Path;

use rustls::pki_types::CertificateDer;
use tunnel_io::ca_pin::{issuer_of, CaPin};

use super::RegistrationConfig;

/// The registration certificate file in effect (`registration.cert`, else the edge
/// listener's).
pub fn certificate_path<'a>(
    config: &'a RegistrationConfig,
    edge: &'a crate::config::EdgeListenerConfig,
) -> &'a Path {
    config.cert.as_deref().unwrap_or(&edge.cert)
}

/// The chain to serve: the certificate file as written, plus the tunnel CA
/// (`registration.ca_cert`) when that CA issued the leaf and the file does not carry it
/// (`ca init`'s `server.pem` is the leaf alone).
pub fn served_chain(cert: &Path, ca_cert: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let mut chain = tunnel_io::tls::load_certs(cert)?;
    let ca = tunnel_io::tls::load_certs(ca_cert)?;
    let carried = issuer_of(chain[0].as_ref(), &chain[1..]).is_some();
    if !carried {
        if let Some(issuer) = issuer_of(chain[0].as_ref(), &ca) {
            chain.push(issuer.clone());
        }
    }
    Ok(chain)
}

/// The pin of the CA that issued the registration certificate, as served; an error naming
/// the files when no served certificate issued it (a node could not find its pin then).
pub fn join_pin(cert: &Path, ca_cert: &Path) -> anyhow::Result<CaPin> {
    let chain = served_chain(cert, ca_cert)?;
    let issuer = issuer_of(chain[0].as_ref(), &chain[1..]).ok_or_else(|| {
        anyhow::anyhow!(
            "the registration certificate {} was not issued by {} and its file carries no \
             issuing CA: append the issuing CA certificate to {} so nodes can pin it",
            cert.display(),
            ca_cert.display(),
            cert.display()
        )
    })?;
    Ok(CaPin::of_certificate(issuer.as_ref())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, Ca};

    #[test]
    fn the_tunnel_ca_is_served_after_a_bare_leaf_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let layout = pki::init_ca_dir(dir.path(), &[], &[], pki::SERVER_VALIDITY, false).unwrap();
        let chain = served_chain(&layout.server_cert(), &layout.ca_cert()).unwrap();
        assert_eq!(chain.len(), 2);
        let ca = tunnel_io::tls::load_certs(&layout.ca_cert()).unwrap();
        assert_eq!(chain[1], ca[0]);
        let pin = join_pin(&layout.server_cert(), &layout.ca_cert()).unwrap();
        assert_eq!(pin, CaPin::of_certificate(ca[0].as_ref()).unwrap());

        // A certificate from another CA, its CA appended: that CA is served and pinned.
        let other = Ca::generate("other CA", pki::CA_VALIDITY).unwrap();
        let leaf = other
            .issue_server(&["lb.example".into()], &[], pki::SERVER_VALIDITY)
            .unwrap();
        let with_ca = dir.path().join("other.pem");
        std::fs::write(&with_ca, format!("{}{}", leaf.cert_pem, other.cert_pem())).unwrap();
        assert_eq!(served_chain(&with_ca, &layout.ca_cert()).unwrap().len(), 2);
        assert_eq!(
            join_pin(&with_ca, &layout.ca_cert()).unwrap(),
            CaPin::of_certificate(other.cert_der().as_ref()).unwrap()
        );
        // Without its CA: nothing to pin, and the message says what to do.
        let bare = dir.path().join("bare.pem");
        std::fs::write(&bare, &leaf.cert_pem).unwrap();
        assert_eq!(served_chain(&bare, &layout.ca_cert()).unwrap().len(), 1);
        let err = join_pin(&bare, &layout.ca_cert()).unwrap_err().to_string();
        assert!(err.contains("append the issuing CA"), "{err}");
    }
}
