//! CA pins in kubeadm's format (`sha256:<hex>` over a CA certificate's DER
//! SubjectPublicKeyInfo) and the TLS verifier that trusts a server only through the pinned CA.
//!
//! A node joining with nothing but a token and a pin has no CA file yet. The pin lets it take
//! the CA from the server's own chain without trusting the chain: a CA certificate is public,
//! so finding it in the chain proves nothing by itself, and the server certificate is then
//! verified against that CA as a root, in full (signature, validity, name). One function
//! computes the pin for both `tunnel-server token create` and `tunnel-edge join`.

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;

/// The pin's algorithm prefix, as kubeadm's `--discovery-token-ca-cert-hash` spells it.
const PIN_PREFIX: &str = "sha256:";
/// Length of a SHA-256 digest in lowercase hex: 32 bytes, two characters each.
const PIN_HEX_LEN: usize = 64;

/// A malformed pin or an unreadable certificate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PinError {
    /// The text is not `sha256:` and 64 hex characters.
    #[error(
        "malformed CA pin {0:?}: expected sha256: followed by 64 hex characters, as printed by \
         `tunnel-server token create --print-join-command`"
    )]
    Malformed(String),
    /// The certificate's DER does not parse.
    #[error("not an X.509 certificate: {0}")]
    BadCertificate(String),
}

/// SHA-256 of a CA certificate's DER SubjectPublicKeyInfo.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaPin([u8; 32]);

impl CaPin {
    /// Parse `sha256:<64 hex>`. Upper-case hex is accepted (people copy from tools that print
    /// it) and normalised; nothing else is.
    pub fn parse(text: &str) -> Result<CaPin, PinError> {
        let malformed = || PinError::Malformed(text.chars().take(80).collect());
        let hex = text.strip_prefix(PIN_PREFIX).ok_or_else(malformed)?;
        if hex.len() != PIN_HEX_LEN || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| malformed())?;
        }
        Ok(CaPin(bytes))
    }

    /// The pin of a certificate (DER): SHA-256 over its SubjectPublicKeyInfo, as kubeadm.
    pub fn of_certificate(der: &[u8]) -> Result<CaPin, PinError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PinError::BadCertificate(e.to_string()))?;
        Ok(CaPin(
            sha2::Sha256::digest(cert.tbs_certificate.subject_pki.raw).into(),
        ))
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PIN_PREFIX)?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Among `candidates`, the certificate that issued `leaf` (its subject is the leaf's issuer
/// name), if any. Name matching is what path building does; the signature is checked by
/// whoever verifies the chain.
pub fn issuer_of<'a>(
    leaf: &[u8],
    candidates: &'a [CertificateDer<'static>],
) -> Option<&'a CertificateDer<'static>> {
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf).ok()?;
    candidates.iter().find(|c| {
        x509_parser::parse_x509_certificate(c.as_ref())
            .is_ok_and(|(_, ca)| ca.is_ca() && ca.subject().as_raw() == leaf.issuer().as_raw())
    })
}

/// What a pinned handshake found: the pinned CA certificate, or why the server was refused.
pub type PinOutcome = Result<CertificateDer<'static>, String>;

/// A server certificate verifier that trusts only a chain leading to the pinned CA: it looks
/// for a presented certificate (not the leaf) whose SPKI has the pin, then verifies the
/// server certificate with that one certificate as the only root (webpki: signature,
/// validity, name). The last outcome is kept for the caller: the error a TLS library
/// surfaces is buried in layers, and the operator needs the expected and presented hashes.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: CaPin,
    provider: Arc<CryptoProvider>,
    outcome: Arc<Mutex<Option<PinOutcome>>>,
}

impl PinnedCaVerifier {
    /// A verifier for `pin`, and the slot where each handshake's outcome lands.
    pub fn new(pin: CaPin) -> (Arc<PinnedCaVerifier>, Arc<Mutex<Option<PinOutcome>>>) {
        let outcome = Arc::new(Mutex::new(None));
        let verifier = PinnedCaVerifier {
            pin,
            provider: crate::tls::provider(),
            outcome: outcome.clone(),
        };
        (Arc::new(verifier), outcome)
    }

    /// Check a presented chain (leaf, then the rest) for `server_name`: the pinned CA
    /// certificate, or why a node would refuse this server. The handshake calls it; so does
    /// `token create --print-join-command`, to refuse printing a command that cannot work.
    pub fn verify_presented(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> PinOutcome {
        let presented: Vec<(usize, Option<CaPin>)> = intermediates
            .iter()
            .enumerate()
            .map(|(i, c)| (i, CaPin::of_certificate(c.as_ref()).ok()))
            .collect();
        let Some(&(index, _)) = presented.iter().find(|(_, p)| *p == Some(self.pin)) else {
            let shown: Vec<String> = presented
                .iter()
                .map(|(_, p)| p.map_or_else(|| "<unparsable>".to_owned(), |p| p.to_string()))
                .collect();
            return Err(if shown.is_empty() {
                format!(
                    "CA pin mismatch: expected {}, but the server presented no CA certificate \
                     (only its own)",
                    self.pin
                )
            } else {
                format!(
                    "CA pin mismatch: expected {}, the server presented {}",
                    self.pin,
                    shown.join(", ")
                )
            });
        };
        let ca = intermediates[index].clone().into_owned();
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| format!("the pinned CA certificate is unusable as a root: {e}"))?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, c)| c.clone())
            .collect();
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| format!("verifier: {e}"))?
            .verify_server_cert(end_entity, &others, server_name, ocsp, now)
            .map_err(|e| {
                format!(
                    "the server presented the pinned CA {} but its certificate is not valid \
                     under it: {e}",
                    self.pin
                )
            })?;
        Ok(ca)
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let outcome =
            self.verify_presented(end_entity, intermediates, server_name, ocsp_response, now);
        let result = match &outcome {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(message) => Err(rustls::Error::General(message.clone())),
        };
        if let Ok(mut slot) = self.outcome.lock() {
            *slot = Some(outcome);
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-256 CA made with `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256`.
    const FIXTURE_CA: &str = include_str!("ca_pin/fixture-ca.pem");
    /// `openssl x509 -in fixture-ca.pem -pubkey -noout | openssl pkey -pubin -outform der |
    /// sha256sum`: computed by openssl, not by this code.
    const FIXTURE_PIN: &str =
        "sha256:a156e6af5ebdc21e90f0a0a50de1ed2547a42926f4eeba50dc4f28b6eb1029db";

    #[test]
    fn pin_matches_openssl_over_the_spki() {
        let der = &crate::tls::certs_from_pem(FIXTURE_CA.as_bytes())[0];
        let pin = CaPin::of_certificate(der.as_ref()).unwrap();
        assert_eq!(pin.to_string(), FIXTURE_PIN);
        assert_eq!(CaPin::parse(FIXTURE_PIN).unwrap(), pin);
        assert_eq!(
            CaPin::parse(&FIXTURE_PIN.to_uppercase().replace("SHA256", "sha256")),
            Ok(pin)
        );
    }

    #[test]
    fn malformed_pins_are_refused() {
        for bad in [
            "",
            "a156e6af5ebdc21e90f0a0a50de1ed2547a42926f4eeba50dc4f28b6eb1029db",
            "sha1:a156e6af5ebdc21e90f0a0a50de1ed2547a42926",
            "sha256:a156e6af5ebdc21e90f0a0a50de1ed2547a42926f4eeba50dc4f28b6eb1029d",
            "sha256:a156e6af5ebdc21e90f0a0a50de1ed2547a42926f4eeba50dc4f28b6eb1029dbb",
            "sha256:g156e6af5ebdc21e90f0a0a50de1ed2547a42926f4eeba50dc4f28b6eb1029db",
            "sha256: 156e6af5ebdc21e90f0a0a50de1ed2547a42926f4eeba50dc4f28b6eb1029db",
            "sha256:é56e6af5ebdc21e90f0a0a50de1ed2547a42926f4eeba50dc4f28b6eb1029d",
        ] {
            let err = CaPin::parse(bad).unwrap_err();
            assert!(err.to_string().starts_with("malformed CA pin"), "{err}");
        }
    }
}
