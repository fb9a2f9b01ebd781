//! I/O building blocks shared by `tunnel-server` and `tunnel-edge`: moving bytes between an
//! HTTP/2 stream and a socket with flow control and half-close ([`pipe`]), TLS configuration
//! from PEM files ([`tls`]) and the HTTP/2 tuning both ends of a session apply ([`h2tune`]), and the metrics exposition formats
//! both admin endpoints negotiate ([`metrics_text`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accept;
pub mod ca_pin;
pub mod check;
pub mod control_frames;
pub mod h2tune;
pub mod identity;
pub mod liveness;
pub mod logging;
pub mod metrics_text;
pub mod pipe;
pub mod quic_bridge;
pub mod registration;
pub mod secret;
pub mod tls;
pub mod udp_socket;

/// Set TCP_NODELAY, ignoring failure (a socket that already failed will report it on first use).
///
/// Every leg of a tunnel needs it: Nagle's algorithm meeting delayed ACKs adds ~40 ms to small
/// request/response exchanges (see docs/ARCHITECTURE.md).
pub fn set_nodelay(stream: &tokio::net::TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "TCP_NODELAY not set");
    }
}

/// Options of a session socket (edge ⇄ server). Only TCP_NODELAY for now: a low
/// TCP_NOTSENT_LOWAT mark was measured (docs/BENCHMARKS.md) and did not help head-of-line
/// latency, so it is not worth its risk of missed write wake-ups on some kernels.
pub fn set_session_socket_options(stream: &tokio::net::TcpStream) {
    set_nodelay(stream);
}
