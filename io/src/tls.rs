//! TLS configuration from PEM files. TLS 1.3 only, ring as the one crypto provider, client
//! certificates verified against an explicit CA (never the system roots), no session tickets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// ALPN protocol of an edge session (TLS + HTTP/2 in reverse roles, version 1).
pub const ALPN_EDGE_SESSION: &[u8] = b"tether-h2/1";
/// ALPN protocol of an edge's upstream connection (edge → cloud, HTTP/2 in the usual roles).
pub const ALPN_UPSTREAM: &[u8] = b"tether-up/1";
/// ALPN protocol of an edge session's lane: a second TLS + HTTP/2 connection (reverse roles,
/// like the session) that streams shown to be bulk move to, so the session's own connection
/// and threads stay free for the small exchanges.
pub const ALPN_LANE: &[u8] = b"tether-lane/1";
/// ALPN protocol of an edge session over QUIC (UDP; every tunneled connection its own QUIC
/// stream, edge → cloud upstreams on the same connection).
pub const ALPN_QUIC_SESSION: &[u8] = b"tether-quic/1";

/// Why a TLS configuration could not be built; every variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no PEM item of the expected kind.
    #[error("{path}: no {what} found in PEM file")]
    Empty {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
    },
    /// A PEM block in the file is malformed (bad base64, a missing END line).
    #[error("{path}: malformed PEM: {source}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What the PEM reader found wrong.
        source: pem::Error,
    },
    /// rustls refused the material.
    #[error("{context}: {source}")]
    Rustls {
        /// Which configuration was being built.
        context: String,
        /// The rustls error.
        source: rustls::Error,
    },
    /// The CA bundle could not be turned into a client verifier.
    #[error("{path}: {message}")]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// What the verifier builder said.
        message: String,
    },
}

/// The crypto provider every TLS configuration in Tether uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Parse the certificates in PEM text, up to the first malformed block; other PEM kinds
/// are skipped. For material that arrived in a message; files go through [`load_certs`],
/// which refuses a malformed block instead.
pub fn certs_from_pem(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .map_while(Result::ok)
        .collect()
}

/// Load a certificate chain (leaf first) from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Load the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::Empty {
            path: path.to_owned(),
            what: "private key",
        },
        source => TlsError::BadPem {
            path: path.to_owned(),
            source,
        },
    })
}

/// Load a CA bundle into a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            context: format!("CA bundle {}", path.display()),
            source,
        })?;
    }
    Ok(roots)
}

/// A TLS 1.3 server configuration that requires a client certificate issued by `client_ca`.
pub fn server_config_mtls(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(load_roots(client_ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier {
            path: client_ca.to_owned(),
            message: e.to_string(),
        })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            context: "TLS versions".into(),
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|source| TlsError::Rustls {
            context: format!("server certificate {}", cert.display()),
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // An unread TLS 1.3 ticket turns the peer's close() into an RST; resumption buys nothing
    // on long-lived sessions.
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A TLS 1.3 client configuration trusting only `ca`, presenting `cert`/`key`.
pub fn client_config_mtls(
    ca: &Path,
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            context: "TLS versions".into(),
            source,
        })?
        .with_root_certificates(load_roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|source| TlsError::Rustls {
            context: format!("client certificate {}", cert.display()),
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Parse a server name for SNI and certificate verification (a DNS name or an IP address).
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_owned()).map_err(|e| format!("invalid server name `{name}`: {e}"))
}

/// Why an inbound TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer failed verification or spoke something else.
    #[error("TLS handshake refused: {0}")]
    Refused(std::io::Error),
    /// The deadline passed first.
    #[error("TLS handshake timed out")]
    TimedOut,
    /// The listener is stopping.
    #[error("TLS handshake cancelled: shutting down")]
    Cancelled,
}

/// Accept one TLS connection, giving up at `deadline` or when `cancel` fires: the one
/// handshake step every TLS listener shares.
pub async fn accept_within<IO>(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: IO,
    deadline: tokio::time::Instant,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<tokio_rustls::server::TlsStream<IO>, HandshakeError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(HandshakeError::Cancelled),
        r = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => match r {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(error)) => Err(HandshakeError::Refused(error)),
            Err(_) => Err(HandshakeError::TimedOut),
        },
    }
}

/// The verified leaf certificate the client presented, if any.
pub fn peer_certificate<T>(
    tls: &tokio_rustls::server::TlsStream<T>,
) -> Option<CertificateDer<'static>> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|der| der.clone().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PEM CERTIFICATE block; the PEM layer does not look inside the DER.
    const CERT: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBNjCB3aADAgECAhQ=\n-----END CERTIFICATE-----\n";

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn pem_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let certs = file(&dir, "certs.pem", CERT);
        assert_eq!(load_certs(&certs).unwrap().len(), 1);

        let truncated = file(&dir, "truncated.pem", &CERT[..CERT.len() - 30]);
        let err = load_certs(&truncated).unwrap_err();
        assert!(matches!(err, TlsError::BadPem { .. }), "{err}");
        assert!(err.to_string().contains("truncated.pem"), "{err}");

        let empty = file(&dir, "empty.pem", "no PEM here\n");
        let err = load_certs(&empty).unwrap_err();
        assert!(matches!(err, TlsError::Empty { .. }), "{err}");
        let err = load_key(&certs).unwrap_err();
        assert!(matches!(err, TlsError::Empty { .. }), "{err}");
        assert!(err.to_string().contains("certs.pem"), "{err}");

        let bad_key = file(
            &dir,
            "bad-key.pem",
            "-----BEGIN PRIVATE KEY-----\n!!!not base64!!!\n-----END PRIVATE KEY-----\n",
        );
        let err = load_key(&bad_key).unwrap_err();
        assert!(matches!(err, TlsError::BadPem { .. }), "{err}");
        assert!(err.to_string().contains("bad-key.pem"), "{err}");

        let missing = dir.path().join("missing.pem");
        assert!(matches!(load_key(&missing), Err(TlsError::Read { .. })));
    }

    #[test]
    fn certs_from_pem_stops_at_a_malformed_block() {
        let text =
            format!("{CERT}-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n{CERT}");
        assert_eq!(certs_from_pem(text.as_bytes()).len(), 1);
        assert!(certs_from_pem(b"").is_empty());
    }
}
