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

/// Unsent bytes the kernel keeps queued on a session socket before a write returns EAGAIN
/// (`TCP_NOTSENT_LOWAT`), in bytes. Linux's `tcp_sendmsg` stops accepting once the unsent
/// part of the send queue passes it, so a bulk stream's backlog stays in h2's per-stream
/// queues, which h2 serves round robin (a small frame waits for at most one bulk frame
/// there), instead of in the send buffer, where nothing can reorder them: up to 3.8 MB
/// unsent was sampled there beside a bulk stream (docs/BENCHMARKS.md), which would be 3 s
/// ahead of a `kubectl exec` keystroke on a 10 Mbit/s uplink; 128 KiB is ~0.1 s. The mark
/// bounds unsent bytes only, not bytes in flight, so a long path keeps its throughput.
/// On loopback the queue that grows is the receiver's (64, 128 and 256 KiB measured alike
/// there); over a 40 ms emulated link (`loadtest/longlink.sh`) the small requests' p99
/// beside a bulk stream fell by a third (145/128 → 105/83 ms) for 6–11 % less bulk, with
/// a higher median (docs/BENCHMARKS.md, "The notsent mark over a 40 ms link").
pub const SESSION_NOTSENT_LOWAT: u32 = 128 << 10;

/// Options of a session socket (edge ⇄ server): TCP_NODELAY and [`SESSION_NOTSENT_LOWAT`].
/// A failure is logged and ignored: the session works without them, only with longer
/// queues beside bulk.
pub fn set_session_socket_options(stream: &tokio::net::TcpStream) {
    set_nodelay(stream);
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(SESSION_NOTSENT_LOWAT)
    {
        tracing::debug!(%error, "TCP_NOTSENT_LOWAT not set");
    }
}
