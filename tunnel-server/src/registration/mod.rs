//! The registration API (`Join`, `Renew`; tonic gRPC) on its own TLS listener, port 443 behind
//! the load balancer. Client certificates are optional at the TLS layer: a joining node has
//! none yet, and `Renew` demands one (verified against the tunnel CA by rustls; an invalid one
//! fails the handshake). The service logic is in [`service`]; throttling in [`limits`].

pub mod admission;
pub mod chain;
pub mod cli;
pub mod cli_state;
pub mod config;
pub mod join_command;
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
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tracing::{debug, info, warn, Instrument};
use tunnel_io::registration::pb::registration_server::RegistrationServer;
use tunnel_io::registration::{ALPN_REGISTRATION, MAX_MESSAGE};

use admission::{Admission, Watched};
pub use config::RegistrationConfig;

use crate::lifecycle::Stop;
use crate::listen::prelude::{Prelude, PreludeError};
use crate::revocation::RevocationList;
use crate::Shared;

/// Finished TLS connections waiting for tonic to pick them up.
const HANDOFF_QUEUE: usize = 64;
/// Largest header list (bytes, as HTTP/2 counts them) a registration request may carry: a
/// gRPC call sends a few hundred; h2's default would let one connection buffer 16 MiB.
const MAX_HEADER_LIST: u32 = 16 << 10;
/// Longest life of a registration connection; then it is closed once its call is done.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

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
    /// The control state behind both.
    pub state: Arc<state::StateStore>,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Load the CA, tokens and revocations and bind the listener.
pub async fn bind(
    config: &RegistrationConfig,
    edge: &crate::config::EdgeListenerConfig,
    state_config: &state::StateConfig,
) -> anyhow::Result<Registration> {
    let cert = chain::certificate_path(config, edge);
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
        // The issuing CA goes with the leaf: a node joining with a CA pin finds it there.
        .with_single_cert(
            chain::served_chain(cert, &config.ca_cert)?,
            tunnel_io::tls::load_key(key)?,
        )
        .with_context(|| format!("registration certificate {}", cert.display()))?;
    tls.alpn_protocols = vec![ALPN_REGISTRATION.to_vec()];
    tls.send_tls13_tickets = 0;
    let state = Arc::new(state::StateStore::open(config, state_config).await?);
    let api = service::RegistrationApi::load(config, state.clone())?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind registration listener {}", config.listen))?;
    Ok(Registration {
        addr: listener.local_addr()?,
        listener,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
        api,
        revocations: state.revocations(),
        identities: state.identities(),
        state,
    })
}

/// Serve until `stop.drain`; watch the revocation file until `stop.hard`.
pub fn spawn(registration: Registration, shared: Arc<Shared>, stop: Stop, tracker: &TaskTracker) {
    let Some(config) = shared.config.registration.clone() else {
        return;
    };
    // Not in `tracker`: the watcher is no tunnel work a drain waits for. It keeps applying
    // revocations during the drain and stops with everything else on `stop.hard`.
    let state = registration.state.clone();
    state.count_in(&shared.metrics.state);
    let (watched, cancel) = (shared.clone(), stop.hard.clone());
    tokio::spawn(async move { state.watch_revocations(watched, cancel).await });
    let (handoff, mut incoming) = mpsc::channel::<io::Result<RegistrationConn>>(HANDOFF_QUEUE);
    let prelude = Prelude {
        first_byte_timeout: config.first_byte_timeout,
        proxy_protocol: config.proxy_protocol,
        proxy_from: config.proxy_protocol_from.clone(),
    };
    tracker.spawn(accept(
        registration.listener,
        registration.acceptor,
        prelude,
        Arc::new(Admission::new(&config)),
        handoff,
        stop.clone(),
        tracker.clone(),
    ));
    let mut api = registration.api;
    api.count_in(&shared.metrics.registration);
    let api = RegistrationServer::new(api)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let incoming = futures_util::stream::poll_fn(move |cx| incoming.poll_recv(cx));
    let drain = stop.drain.clone();
    tracker.spawn(
        async move {
            let served = tonic::transport::Server::builder()
                .timeout(Duration::from_secs(30))
                // A Join or Renew call needs a few hundred bytes of headers.
                .http2_max_header_list_size(MAX_HEADER_LIST)
                // Clients open a connection per call; none needs to outlive this.
                .max_connection_age(MAX_CONNECTION_AGE)
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

/// Accept until draining; each connection gets its own task through the prelude (first
/// byte, PROXY header), TLS and admission (see [`admission`]).
async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    prelude: Prelude,
    admission: Arc<Admission>,
    handoff: mpsc::Sender<io::Result<RegistrationConn>>,
    stop: Stop,
    tracker: TaskTracker,
) {
    let mut retry = tunnel_io::accept::AcceptRetry::new("registration");
    loop {
        let Some((tcp, peer)) = retry.next(&stop.drain, || listener.accept()).await else {
            return;
        };
        let handshake = match admission.handshake() {
            Ok(slot) => slot,
            Err(refusal) => {
                // At debug: under a flood this is every connection.
                debug!(%peer, %refusal, "registration connection closed");
                continue;
            }
        };
        tunnel_io::set_nodelay(&tcp);
        let acceptor = acceptor.clone();
        let handoff = handoff.clone();
        let drain = stop.drain.clone();
        let admission = admission.clone();
        let prelude = prelude.clone();
        tracker.spawn(async move {
            let deadline = tokio::time::Instant::now() + admission.handshake_timeout;
            let (mut tcp, mut peer) = (tcp, peer);
            // Unless the peer is a trusted balancer, the source is known now: count it before
            // waiting on anything.
            let early = match prelude.trusts(peer.ip()) {
                false => match admission.source(peer.ip()) {
                    Ok(slot) => Some(slot),
                    Err(refusal) => {
                        debug!(%peer, %refusal, "registration connection closed");
                        return;
                    }
                },
                true => None,
            };
            let before_tls = tokio::select! {
                _ = drain.cancelled() => return,
                r = tokio::time::timeout_at(deadline, prelude.read(&mut tcp, peer)) => r,
            };
            match before_tls {
                Ok(Ok(client)) => peer = client,
                Ok(Err(error @ (PreludeError::Proxy(_) | PreludeError::UntrustedProxy(_)))) => {
                    warn!(target: "audit", event = "registration_refused", %peer, reason = %error, "registration refused: bad PROXY protocol header");
                    return;
                }
                Ok(Err(error)) => {
                    debug!(%peer, %error, "registration connection closed before TLS");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "registration PROXY protocol header timed out");
                    return;
                }
            }
            let source = match early.map_or_else(|| admission.source(peer.ip()), Ok) {
                Ok(slot) => slot,
                Err(refusal) => {
                    debug!(%peer, %refusal, "registration connection closed");
                    return;
                }
            };
            let tls = match tunnel_io::tls::accept_within(&acceptor, tcp, deadline, &drain).await {
                Ok(tls) => tls,
                Err(tunnel_io::tls::HandshakeError::Cancelled) => return,
                Err(tunnel_io::tls::HandshakeError::TimedOut) => {
                    debug!(%peer, "registration TLS handshake timed out");
                    return;
                }
                Err(error) => {
                    // Expired, revoked-CA or foreign certificates end here.
                    warn!(target: "audit", event = "registration_refused", %peer, reason = %error, "registration TLS handshake refused");
                    return;
                }
            };
            drop(handshake);
            let cert = tunnel_io::tls::peer_certificate(&tls);
            let io = match admission.admit(Box::new(tls), cert.is_some(), source) {
                Ok(io) => io,
                Err(refusal) => {
                    debug!(%peer, %refusal, "registration connection closed");
                    return;
                }
            };
            let conn = RegistrationConn {
                io,
                info: PeerInfo { addr: peer, cert },
            };
            let _ = handoff.send(Ok(conn)).await;
        });
    }
}

/// One accepted connection as tonic sees it; holds its admission slot until dropped and
/// closes itself when idle (see [`admission::Watched`]).
struct RegistrationConn {
    io: Watched<Box<TlsStream<TcpStream>>>,
    info: PeerInfo,
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
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for RegistrationConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
