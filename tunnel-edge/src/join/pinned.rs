//! How `join` trusts the registration API: a CA file, or a pin of the CA the server
//! presents (`--ca-hash`, [`tunnel_io::ca_pin`]). A pinned join keeps the CA it found, so
//! sessions and renewals afterwards trust exactly what the pin admitted.

use std::path::PathBuf;
use std::sync::Arc;

use tunnel_io::ca_pin::{CaPin, PinOutcome, PinnedCaVerifier};
use tunnel_io::registration::ALPN_REGISTRATION;

use super::tls_config;

/// How `join` trusts the registration API.
#[derive(Debug, Clone)]
pub enum JoinTrust {
    /// Verify it with this CA bundle (`--ca`).
    CaFile(PathBuf),
    /// Take the CA from the chain it presents, only if that CA has this pin (`--ca-hash`),
    /// and verify the server with it; the CA is then kept in the state directory.
    Pin(CaPin),
}

/// A join's TLS configuration, and for a pinned join the slot the verifier reports into.
pub(super) type PinSlot = Arc<std::sync::Mutex<Option<PinOutcome>>>;

pub(super) fn join_tls_config(
    trust: &JoinTrust,
) -> anyhow::Result<(rustls::ClientConfig, Option<PinSlot>)> {
    match trust {
        JoinTrust::CaFile(ca) => Ok((tls_config(ca, None)?, None)),
        JoinTrust::Pin(pin) => {
            let (verifier, slot) = PinnedCaVerifier::new(*pin);
            let mut config =
                rustls::ClientConfig::builder_with_provider(tunnel_io::tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])?
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth();
            config.alpn_protocols = vec![ALPN_REGISTRATION.to_vec()];
            config.resumption = rustls::client::Resumption::disabled();
            Ok((config, Some(slot)))
        }
    }
}

/// The CA bundle to keep after a pinned join: the server's answer (it came over a channel
/// verified under the pinned CA), with the pinned CA added if the answer lacks it, so the
/// renewals that reach the registration API again can verify it.
pub(super) fn bundle_with_pinned(
    bundle_pem: &str,
    pinned: &rustls::pki_types::CertificateDer<'_>,
) -> String {
    if tunnel_io::tls::certs_from_pem(bundle_pem.as_bytes())
        .iter()
        .any(|c| c.as_ref() == pinned.as_ref())
    {
        return bundle_pem.to_owned();
    }
    let block = pem::encode_config(
        &pem::Pem::new("CERTIFICATE", pinned.as_ref().to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    );
    format!("{}\n{block}", bundle_pem.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_ca_joins_a_bundle_that_lacks_it_once() {
        let cert = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.self_signed(&key).unwrap()
        };
        let (tunnel, pinned) = (cert("tunnel-ca"), cert("registration-ca"));
        let kept = bundle_with_pinned(&tunnel.pem(), pinned.der());
        let certs = tunnel_io::tls::certs_from_pem(kept.as_bytes());
        assert_eq!(certs, vec![tunnel.der().clone(), pinned.der().clone()]);
        assert_eq!(bundle_with_pinned(&kept, pinned.der()), kept);
    }
}
