//! I/O building blocks shared by `tunnel-server` and `tunnel-edge`: moving bytes between an
//! HTTP/2 stream and a socket with flow control and half-close ([`pipe`]), TLS configuration
//! from PEM files ([`tls`]) and the HTTP/2 tuning both ends of a session apply ([`h2tune`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod h2tune;
pub mod identity;
pub mod liveness;
pub mod logging;
pub mod pipe;
pub mod registration;
pub mod secret;
pub mod tls;

/// Set TCP_NODELAY, ignoring failure (a socket that already failed will report it on first use).
///
/// Every leg of a tunnel needs it: Nagle's algorithm meeting delayed ACKs adds ~40 ms to small
/// request/response exchanges (see docs/ARCHITECTURE.md).
pub fn set_nodelay(stream: &tokio::net::TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "TCP_NODELAY not set");
    }
}

/// Unsent bytes the kernel may queue on a session socket (TCP_NOTSENT_LOWAT). Past it the
/// socket reports unwritable, so data waits in h2's per-stream queues, where small frames of
/// other streams can still go first, instead of behind megabytes of one bulk stream.
pub const SESSION_NOTSENT_LOWAT: u32 = 128 << 10;

/// Options of a session socket (edge ⇄ server): TCP_NODELAY, and a low unsent-data mark
/// so one bulk stream cannot queue tens of milliseconds of data ahead of every other stream.
pub fn set_session_socket_options(stream: &tokio::net::TcpStream) {
    set_nodelay(stream);
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(SESSION_NOTSENT_LOWAT)
    {
        tracing::debug!(%error, "TCP_NOTSENT_LOWAT not set");
    }
}
