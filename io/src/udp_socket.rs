//! The UDP socket under a QUIC endpoint, bound here with large receive and send buffers.
//!
//! Why: with the kernel's default socket buffer (`net.core.rmem_default`, about 208 KiB) a
//! QUIC receiver on a 40 ms link overflowed its socket: `UdpRcvbufErrors` in /proc/net/snmp
//! counted about 0.5 % of the packets of a bulk run at 0 % link loss (290k–390k per run), and
//! a loss-based congestion controller reads every such drop as congestion (QUIC bulk was 10–16
//! MB/s beside TCP's 43–47 over the same link; docs/BENCHMARKS.md). TCP sizes its socket
//! buffers itself (tcp_rmem autotuning); UDP does not, so the endpoint asks.
//!
//! The kernel caps the ask at `net.core.rmem_max` / `net.core.wmem_max`; below the ask the
//! endpoint still starts (a smaller buffer only costs throughput) and logs one warning naming
//! the sysctl and what was granted.

use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

/// Bytes of UDP receive and send buffer each QUIC endpoint asks for: 7 MiB. A burst of one
/// 40 ms round trip at 1 Gbit/s is 5 MB (1e9 / 8 × 0.040), which must fit while the reading
/// task is off the CPU; 7 MiB leaves 40 % over that and is what quic-go asks for the same
/// reason. On Linux the kernel books twice the granted size (the other half covers its
/// per-packet overhead) and reads back that double.
pub const QUIC_SOCKET_BUFFER: usize = 7 * 1024 * 1024;

/// What a bound socket asked for and what the kernel granted, in bytes of payload (on Linux,
/// half of what `SO_RCVBUF` / `SO_SNDBUF` read back: see [`QUIC_SOCKET_BUFFER`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    /// The size asked for, both directions.
    pub asked: usize,
    /// Receive buffer granted.
    pub recv: usize,
    /// Send buffer granted.
    pub send: usize,
}

impl SocketBuffers {
    /// The warning to log when the kernel granted less than asked, naming the sysctl to raise.
    pub fn shortfall(&self) -> Option<String> {
        let mut short = Vec::new();
        if self.recv < self.asked {
            short.push(format!("receive {} (net.core.rmem_max)", self.recv));
        }
        if self.send < self.asked {
            short.push(format!("send {} (net.core.wmem_max)", self.send));
        }
        if short.is_empty() {
            return None;
        }
        Some(format!(
            "QUIC UDP socket buffers below the {} bytes asked: granted {}; raise the sysctl \
             named to at least {} (e.g. sysctl -w net.core.rmem_max={} net.core.wmem_max={}), \
             else a long or fast link overflows the socket and QUIC reads the drops as \
             congestion",
            self.asked,
            short.join(", "),
            self.asked,
            self.asked,
            self.asked
        ))
    }
}

/// A QUIC endpoint's UDP socket could not be made.
#[derive(Debug, thiserror::Error)]
pub enum UdpBindError {
    /// Creating, configuring or binding the socket failed.
    #[error("UDP socket on {addr}: {what}: {source}")]
    Socket {
        /// The address asked for.
        addr: SocketAddr,
        /// The step that failed.
        what: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// quinn refused the socket.
    #[error("QUIC endpoint on {addr}: {source}")]
    Endpoint {
        /// The address asked for.
        addr: SocketAddr,
        /// quinn's error.
        source: std::io::Error,
    },
}

/// Bind a non-blocking UDP socket on `addr` with `asked` bytes of receive and send buffer,
/// logging what was granted (and one warning when it is less than asked). Failing to set a
/// buffer is part of that warning, not an error: the socket works with the default.
pub fn bind_udp(
    addr: SocketAddr,
    asked: usize,
) -> Result<(std::net::UdpSocket, SocketBuffers), UdpBindError> {
    let fail = |what| move |source| UdpBindError::Socket { addr, what, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(fail("create"))?;
    // A failed set leaves the default, which the read-back below reports.
    let _ = socket.set_recv_buffer_size(asked);
    let _ = socket.set_send_buffer_size(asked);
    let buffers = SocketBuffers {
        asked,
        recv: payload(socket.recv_buffer_size().unwrap_or(0)),
        send: payload(socket.send_buffer_size().unwrap_or(0)),
    };
    socket.set_nonblocking(true).map_err(fail("non-blocking"))?;
    socket.bind(&addr.into()).map_err(fail("bind"))?;
    match buffers.shortfall() {
        Some(warning) => warn!(%addr, "{warning}"),
        None => info!(%addr, recv = buffers.recv, send = buffers.send, "QUIC UDP socket buffers"),
    }
    Ok((socket.into(), buffers))
}

/// A quinn endpoint on a socket from [`bind_udp`]: a server when `server` is given (it also
/// connects out), else a client only.
pub fn quic_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    asked: usize,
) -> Result<(quinn::Endpoint, SocketBuffers), UdpBindError> {
    let (socket, buffers) = bind_udp(addr, asked)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| UdpBindError::Endpoint { addr, source })?;
    Ok((endpoint, buffers))
}

/// The payload bytes a read-back buffer size stands for: Linux reports twice what it grants.
fn payload(read_back: usize) -> usize {
    if cfg!(target_os = "linux") {
        read_back / 2
    } else {
        read_back
    }
}

#[cfg(test)]
#[path = "udp_socket_tests.rs"]
mod tests;
