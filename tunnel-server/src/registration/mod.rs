//! The registration API (`Join`, `Renew`; tonic gRPC) on its own TLS listener, port 443 behind
//! the load balancer. Client certificates are optional at the TLS layer: a joining node has
//! none yet, and `Renew` demands one (verified against the tunnel CA by rustls; an invalid one
//! fails the handshake). The service logic is in [`service`]; throttling in [`limits`].

pub mod cli;
pub mod config;
pub mod limits;
mod request;
pub mod service;
pub mod state;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tracing::{info, warn, Instrument};
use tunnel_io::registration::pb::registration_server::RegistrationServer;
use tunnel_io::registration::{ALPN_REGISTRATION, MAX_MESSAGE};

pub use config::RegistrationConfig;

use crate::revocation::RevocationList;
use crate::server::Stop;
use crate::Shared;

/// Finished TLS connections waiting for tonic to pick them up.
const HANDOFF_QUEUE: usize = 64;

/// Who called: the source address and the verified client certificate, if one was presented.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The caller's address.
    pub addr: SocketAddr,
    /// Its certificate (leaf, DER), verified against the tunnel CA.
    pub cert: Option<CertificateDer<'static>>,
}

/// The bound listener and everything loaded at startup (so a bad CA or token file stops the
/// server before it serves anything).
pub struct Registration {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    api: service::RegistrationApi,
    /// The revocation list, shared with the edge listener's handshake check.
    pub revocations: Arc<RevocationList>,
    /// Issued identities, shared with the edge listener (current certificate per node).
    pub identities: Arc<dyn state::identities::IdentityStore>,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Load the CA, tokens and revocations and bind the listener.
pub async fn bind(
    config: &RegistrationConfig,
    edge: &crate::config::EdgeListenerConfig,
) -> anyhow::Result<Registration> {
    let cert = config.cert.as_ref().unwrap_or(&edge.cert);
    let key = config.key.as_ref().unwrap_or(&edge.key);
    let provider = tunnel_io::tls::provider();
    let roots = Arc::new(tunnel_io::tls::load_roots(&config.ca_cert)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.ca_cert.display()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            tunnel_io::tls::load_certs(cert)?,
            tunnel_io::tls::load_key(key)?,
        )
        .with_context(|| format!("registration certificate {}", cert.display()))?;
    tls.alpn_protocols = vec![ALPN_REGISTRATION.to_vec()];
    tls.send_tls13_tickets = 0;
    let revocations = Arc::new(RevocationList::open(&config.revocation_path())?);
    let identities: Arc<dyn state::identities::IdentityStore> =
        Arc::new(state::identities::FileIdentityStore::open(
            &state::identities::identities_path(&config.token_file),
        )?);
    let api = service::RegistrationApi::load(config, revocations.clone(), identities.clone())?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind registration listener {}", config.listen))?;
    Ok(Registration {
        addr: listener.local_addr()?,
        listener,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
        api,
        revocations,
        identities,
    })
}

/// Serve until `stop.drain`; watch the revocation file until `stop.hard`.
pub fn spawn(registration: Registration, shared: Arc<Shared>, stop: Stop, tracker: &TaskTracker) {
    let Some(config) = shared.config.registration.clone() else {
        return;
    };
    // Not in `tracker`: the watcher is no tunnel work a drain waits for. It keeps applying
    // revocations during the drain and stops with everything else on `stop.hard`.
    tokio::spawn(crate::revocation::watch(
        registration.revocations.clone(),
        shared.clone(),
        stop.hard.clone(),
    ));
    let (handoff, mut incoming) = mpsc::channel::<io::Result<RegistrationConn>>(HANDOFF_QUEUE);
    tracker.spawn(accept(
        registration.listener,
        registration.acceptor,
        Before {
            handshake_timeout: config.handshake_timeout,
            proxy_protocol: config.proxy_protocol,
        },
        Arc::new(Semaphore::new(config.max_connections)),
        handoff,
        stop.clone(),
        tracker.clone(),
    ));
    let api = RegistrationServer::new(registration.api)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let incoming = futures_util::stream::poll_fn(move |cx| incoming.poll_recv(cx));
    let drain = stop.drain.clone();
    tracker.spawn(
        async move {
            let served = tonic::transport::Server::builder()
                .timeout(Duration::from_secs(30))
                .serve_with_incoming_shutdown(api, incoming, drain.cancelled_owned())
                .await;
            if let Err(error) = served {
                warn!(%error, "registration API stopped");
            }
        }
        .instrument(tracing::info_span!("registration")),
    );
    info!(addr = %registration.addr, "registration API listening");
}

/// What happens on a connection before it is handed to the API.
#[derive(Clone, Copy)]
struct Before {
    /// Time for the PROXY header (if expected) and the TLS handshake together.
    handshake_timeout: Duration,
    /// Read a PROXY protocol header first and take the client's address from it.
    proxy_protocol: bool,
}

async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    before: Before,
    slots: Arc<Semaphore>,
    handoff: mpsc::Sender<io::Result<RegistrationConn>>,
    stop: Stop,
    tracker: TaskTracker,
) {
    let mut retry = tunnel_io::accept::AcceptRetry::new("registration");
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some((tcp, peer)) = retry.next(&stop.drain, || listener.accept()).await else {
            return;
        };
        tunnel_io::set_nodelay(&tcp);
        let acceptor = acceptor.clone();
        let handoff = handoff.clone();
        let drain = stop.drain.clone();
        tracker.spawn(async move {
            let deadline = tokio::time::Instant::now() + before.handshake_timeout;
            let (mut tcp, mut peer) = (tcp, peer);
            if before.proxy_protocol {
                let header = tokio::select! {
                    _ = drain.cancelled() => return,
                    h = tokio::time::timeout_at(deadline, crate::proxy_protocol::client_address(&mut tcp, peer)) => h,
                };
                match header {
                    Ok(Ok(client)) => peer = client,
                    Ok(Err(error)) => {
                        warn!(target: "audit", event = "registration_refused", %peer, reason = %error, "registration refused: bad PROXY protocol header");
                        return;
                    }
                    Err(_) => {
                        warn!(%peer, "registration PROXY protocol header timed out");
                        return;
                    }
                }
            }
            let tls = match tunnel_io::tls::accept_within(&acceptor, tcp, deadline, &drain).await {
                Ok(tls) => tls,
                Err(tunnel_io::tls::HandshakeError::Cancelled) => return,
                Err(tunnel_io::tls::HandshakeError::TimedOut) => {
                    warn!(%peer, "registration TLS handshake timed out");
                    return;
                }
                Err(error) => {
                    // Expired, revoked-CA or foreign certificates end here.
                    warn!(target: "audit", event = "registration_refused", %peer, reason = %error, "registration TLS handshake refused");
                    return;
                }
            };
            let cert = tunnel_io::tls::peer_certificate(&tls);
            let conn = RegistrationConn {
                io: Box::new(tls),
                info: PeerInfo { addr: peer, cert },
                _slot: slot,
            };
            let _ = handoff.send(Ok(conn)).await;
        });
    }
}

/// One accepted connection as tonic sees it; holds a connection slot until dropped.
struct RegistrationConn {
    io: Box<TlsStream<TcpStream>>,
    info: PeerInfo,
    _slot: OwnedSemaphorePermit,
}

impl Connected for RegistrationConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for RegistrationConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for RegistrationConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().io.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io.as_mut()).poll_shutdown(cx)
    }
}
