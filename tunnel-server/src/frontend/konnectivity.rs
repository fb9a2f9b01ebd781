//! The Konnectivity gRPC frontend (kube-apiserver's `GRPC` egress): `/ProxyService/Proxy`
//! served by tonic on a Unix socket and on TCP with mandatory mTLS. TLS is ours
//! (tokio-rustls); tonic gets finished connections through `serve_with_incoming`, so a slow
//! TLS handshake never holds up the accept loop. Stream logic lives in [`proxy`].

pub mod codec;
mod lenient;
mod proxy;
// Generated code (tests/konnectivity_codegen.rs keeps it in step with the .proto). The
// agent endpoint (`crate::agent`) serves its `AgentService` half.
#[allow(missing_docs, clippy::all)]
#[rustfmt::skip]
pub(crate) mod service;

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tracing::{info, warn, Instrument};

pub use crate::config::KonnectivityConfig;
pub use proxy::{PacketStream, ProxyFrontend, FRONTEND};

use crate::lifecycle::Stop;
use crate::Shared;
use service::proxy_service_server::ProxyServiceServer;

/// HTTP/2 stream window the gRPC server grants each `Proxy` stream: 8 MiB, enough for a
/// 4 MiB DATA packet in flight plus the next, small enough that a stalled stream holds little.
const STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 connection window of one gRPC connection: 64 MiB, the bound on bytes buffered from
/// one client across all its streams.
const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest HTTP/2 frame the server accepts: 1 MiB (larger frames gave nothing on TLS).
const MAX_FRAME: u32 = 1 << 20;
/// Finished connections waiting for tonic to pick them up.
pub(crate) const HANDOFF_QUEUE: usize = 64;
/// Largest header list (bytes, as HTTP/2 counts them) on the gRPC listeners (Konnectivity
/// frontend and agents). A call carries gRPC's own headers, agent metadata and perhaps a
/// service-account bearer token (1-2 KiB); h2's default of 16 MiB would let any client make
/// the server buffer 16 MiB per connection.
pub(crate) const GRPC_MAX_HEADER_LIST: u32 = 16 << 10;

/// Who is on the other end of a gRPC connection (`CN@addr` or `unix:uid=..`), for logs and
/// the edge's audit line.
#[derive(Clone, Debug)]
pub struct ClientName(pub Arc<str>);

/// What tonic inserts into the extensions of every request of one connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// For logs and audit lines.
    pub client: ClientName,
    /// The TCP peer (TLS forms only).
    pub peer_addr: Option<std::net::SocketAddr>,
    /// The client's leaf certificate (DER), already verified by rustls (TLS forms only).
    pub peer_cert: Option<rustls::pki_types::CertificateDer<'static>>,
}

/// The frontend's bound listeners.
pub struct Listeners {
    unix: Option<UnixListener>,
    tcp: Option<(TcpListener, TlsAcceptor)>,
    /// The Unix socket path, if enabled.
    pub unix_path: Option<PathBuf>,
    /// The mTLS TCP address actually bound, if enabled.
    pub tcp_addr: Option<std::net::SocketAddr>,
}

/// Bind the mTLS TCP listener `config` enables; the Unix socket comes later
/// ([`bind_unix`]), after every TCP listener of the server.
pub async fn bind(config: &KonnectivityConfig) -> anyhow::Result<Listeners> {
    let tcp = match config.tcp_listen {
        Some(addr) => {
            let (Some(cert), Some(key), Some(ca)) =
                (&config.tcp_cert, &config.tcp_key, &config.tcp_client_ca)
            else {
                anyhow::bail!("konnectivity.tcp_listen needs tcp_cert, tcp_key and tcp_client_ca");
            };
            // gRPC is HTTP/2 only: offer exactly `h2`.
            let tls = tunnel_io::tls::server_config_mtls(cert, key, ca, &[b"h2"])
                .context("konnectivity frontend TLS")?;
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind konnectivity frontend {addr}"))?;
            Some((listener, TlsAcceptor::from(Arc::new(tls))))
        }
        None => None,
    };
    Ok(Listeners {
        tcp_addr: tcp.as_ref().map(|(l, _)| l.local_addr()).transpose()?,
        unix_path: None,
        unix: None,
        tcp,
    })
}

/// Bind the Unix socket `config` enables (its mode set before it appears).
pub fn bind_unix(config: &KonnectivityConfig) -> anyhow::Result<Option<UnixListener>> {
    config
        .unix_socket
        .as_ref()
        .map(|path| crate::lifecycle::bind_unix(path, config.unix_socket_mode))
        .transpose()
}

impl Listeners {
    /// Add the Unix socket bound by [`bind_unix`] at `path`.
    pub fn set_unix(&mut self, listener: UnixListener, path: PathBuf) {
        self.unix_path = Some(path);
        self.unix = Some(listener);
    }
}

/// Serve `listeners` until `stop.drain` (no new connections; HTTP/2 GOAWAY), with streams
/// running until they end or `stop.hard`.
pub fn spawn(listeners: Listeners, shared: Arc<Shared>, stop: Stop, tracker: &TaskTracker) {
    let Some(config) = shared.config.konnectivity.clone() else {
        return;
    };
    let (handoff, incoming) = mpsc::channel::<io::Result<FrontendConn>>(HANDOFF_QUEUE);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    if let Some(listener) = listeners.unix {
        let counters = lenient::Counters {
            refusals: shared.metrics.frontend_refusals.clone(),
            rewrites: shared.metrics.authority_rewrites.clone(),
        };
        tracker.spawn(accept_unix(
            listener,
            counters,
            slots.clone(),
            handoff.clone(),
            stop.clone(),
        ));
    }
    if let Some((listener, acceptor)) = listeners.tcp {
        tracker.spawn(accept_tls(
            listener,
            acceptor,
            config.handshake_timeout,
            slots,
            handoff.clone(),
            stop.clone(),
            tracker.clone(),
        ));
    }
    drop(handoff);

    let proxy = ProxyServiceServer::new(ProxyFrontend::new(
        shared.clone(),
        stop.hard.clone(),
        tracker.clone(),
    ))
    .max_decoding_message_size(protocol::konnectivity::MAX_PACKET);
    let mut incoming = incoming;
    let incoming = futures_util::stream::poll_fn(move |cx| incoming.poll_recv(cx));
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(config.max_streams_per_connection)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .http2_max_header_list_size(GRPC_MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    let drain = stop.drain.clone();
    tracker.spawn(
        async move {
            let served = server
                .serve_with_incoming_shutdown(proxy, incoming, drain.cancelled_owned())
                .await;
            if let Err(error) = served {
                warn!(%error, "konnectivity frontend stopped");
            }
        }
        .instrument(tracing::info_span!("konnectivity")),
    );
    info!(
        unix = listeners
            .unix_path
            .as_ref()
            .map(|p| tracing::field::display(p.display())),
        tcp = listeners.tcp_addr.map(tracing::field::display),
        "konnectivity frontend listening"
    );
}

async fn accept_unix(
    listener: UnixListener,
    counters: lenient::Counters,
    slots: Arc<Semaphore>,
    handoff: mpsc::Sender<io::Result<FrontendConn>>,
    stop: Stop,
) {
    let mut retry = tunnel_io::accept::AcceptRetry::new("konnectivity (unix)");
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some((stream, _)) = retry.next(&stop.drain, || listener.accept()).await else {
            return;
        };
        let client = match stream.peer_cred() {
            Ok(cred) => format!("unix:uid={}:pid={}", cred.uid(), cred.pid().unwrap_or(0)),
            Err(_) => "unix".to_string(),
        };
        let client = ClientName(client.into());
        let conn = FrontendConn {
            // Any `:authority` is accepted here, and only here (`protocol::h2_authority`).
            io: Io::Unix(Box::new(lenient::LenientUnix::new(
                stream,
                client.clone(),
                counters.clone(),
            ))),
            info: ConnInfo {
                client,
                peer_addr: None,
                peer_cert: None,
            },
            _slot: slot,
        };
        if handoff.send(Ok(conn)).await.is_err() {
            return;
        }
    }
}

/// Accept TLS connections (handshakes on their own tasks, each within `handshake_timeout`)
/// and hand them to tonic through `handoff` until `stop.drain`. Shared with the agent
/// endpoint.
pub(crate) async fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    slots: Arc<Semaphore>,
    handoff: mpsc::Sender<io::Result<FrontendConn>>,
    stop: Stop,
    tracker: TaskTracker,
) {
    let mut retry = tunnel_io::accept::AcceptRetry::new("konnectivity (mTLS)");
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
        // Handshakes run on their own so a slow client cannot hold up the next accept.
        tracker.spawn(async move {
            let deadline = tokio::time::Instant::now() + handshake_timeout;
            let tls = match tunnel_io::tls::accept_within(&acceptor, tcp, deadline, &drain).await {
                Ok(tls) => tls,
                Err(tunnel_io::tls::HandshakeError::Cancelled) => return,
                Err(error) => {
                    warn!(%peer, "konnectivity frontend: {error}");
                    return;
                }
            };
            let peer_cert = tunnel_io::tls::peer_certificate(&tls);
            let subject = peer_cert
                .as_ref()
                .and_then(|der| tunnel_io::identity::common_name(der.as_ref()))
                .unwrap_or_else(|| "?".into());
            let conn = FrontendConn {
                io: Io::Tls(Box::new(tls)),
                info: ConnInfo {
                    client: ClientName(format!("{subject}@{peer}").into()),
                    peer_addr: Some(peer),
                    peer_cert,
                },
                _slot: slot,
            };
            let _ = handoff.send(Ok(conn)).await;
        });
    }
}

/// One accepted frontend connection as tonic sees it; holds a connection slot until tonic
/// drops it.
pub(crate) struct FrontendConn {
    io: Io,
    info: ConnInfo,
    _slot: OwnedSemaphorePermit,
}

enum Io {
    Unix(Box<lenient::LenientUnix>),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for FrontendConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for FrontendConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for FrontendConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Unix(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
