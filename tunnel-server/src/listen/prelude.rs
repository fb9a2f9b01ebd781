//! What a TLS listener reads before TLS: the first byte within a short deadline (a connection
//! that never speaks is dropped in seconds, not after the whole handshake timeout), then the
//! PROXY header where the listener takes one. Returns the client's address, which the
//! per-source caps and the audit log use. Owns no slot and no TLS state.
//!
//! A PROXY header is believed only from the balancer networks (`proxy_protocol_from`): from
//! there it is required; from anywhere else a connection that starts with one is refused,
//! and a connection that starts with TLS is served under its own TCP address (it cannot
//! choose an apparent address, and direct access from inside the cluster keeps working).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::listen::proxy_protocol::ProxyHeaderError;

/// Why a connection was refused before TLS.
#[derive(Debug, thiserror::Error)]
pub enum PreludeError {
    /// Not one byte arrived within the first-byte deadline.
    #[error("sent nothing within {0:?}")]
    Silent(Duration),
    /// The peer closed before sending anything.
    #[error("closed before sending anything")]
    Closed,
    /// Reading the first byte failed.
    #[error("reading the first byte: {0}")]
    Io(#[from] std::io::Error),
    /// The PROXY header was missing or malformed.
    #[error(transparent)]
    Proxy(#[from] ProxyHeaderError),
    /// A PROXY header from outside the balancer networks.
    #[error("PROXY header from {0}, which is not in `proxy_protocol_from`")]
    UntrustedProxy(std::net::IpAddr),
}

/// A listener's pre-TLS rules.
#[derive(Debug, Clone)]
pub struct Prelude {
    /// Time for the first byte after accept.
    pub first_byte_timeout: Duration,
    /// Expect a PROXY header from the load balancer.
    pub proxy_protocol: bool,
    /// Where PROXY headers may come from (the balancers' networks).
    pub proxy_from: Vec<ipnet::IpNet>,
}

impl Prelude {
    /// Wait for the first byte, then read the PROXY header if expected; the caller bounds
    /// the whole step with its handshake deadline.
    pub async fn read(
        &self,
        tcp: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<SocketAddr, PreludeError> {
        let first = first_byte_within(tcp, self.first_byte_timeout).await?;
        if !self.proxy_protocol {
            return Ok(peer);
        }
        if self.trusts(peer.ip()) {
            return Ok(crate::listen::proxy_protocol::client_address(tcp, peer).await?);
        }
        // `PROXY ` (v1) and `\r\n\r\n…` (v2) cannot start a TLS record (0x16).
        if first == b'P' || first == b'\r' {
            return Err(PreludeError::UntrustedProxy(peer.ip()));
        }
        Ok(peer)
    }

    /// Whether `ip` is a balancer whose PROXY headers are taken (and required).
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.proxy_protocol && self.proxy_from.iter().any(|net| net.contains(&ip))
    }
}

/// Wait until the peer has sent at least one byte (peeked, not consumed).
pub async fn first_byte_within(tcp: &TcpStream, limit: Duration) -> Result<u8, PreludeError> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(limit, tcp.peek(&mut byte)).await {
        Err(_) => Err(PreludeError::Silent(limit)),
        Ok(Ok(0)) => Err(PreludeError::Closed),
        Ok(Ok(_)) => Ok(byte[0]),
        Ok(Err(error)) => Err(PreludeError::Io(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        (client, server, peer)
    }

    #[tokio::test]
    async fn a_silent_connection_is_refused_at_the_first_byte_deadline() {
        let (_client, mut server, peer) = pair().await;
        let prelude = Prelude {
            first_byte_timeout: Duration::from_millis(50),
            proxy_protocol: false,
            proxy_from: Vec::new(),
        };
        let started = std::time::Instant::now();
        let r = prelude.read(&mut server, peer).await;
        assert!(matches!(r, Err(PreludeError::Silent(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn the_first_byte_is_left_for_tls() {
        let (mut client, mut server, peer) = pair().await;
        client.write_all(b"\x16\x03\x01").await.unwrap();
        let prelude = Prelude {
            first_byte_timeout: Duration::from_secs(1),
            proxy_protocol: false,
            proxy_from: Vec::new(),
        };
        assert_eq!(prelude.read(&mut server, peer).await.unwrap(), peer);
        let mut buf = [0u8; 3];
        server.peek(&mut buf).await.unwrap();
        assert_eq!(&buf, b"\x16\x03\x01");
    }

    fn behind(net: &str) -> Prelude {
        Prelude {
            first_byte_timeout: Duration::from_secs(1),
            proxy_protocol: true,
            proxy_from: vec![net.parse().unwrap()],
        }
    }

    #[tokio::test]
    async fn a_proxy_header_from_the_balancer_gives_the_client_address() {
        let (mut client, mut server, peer) = pair().await;
        client
            .write_all(b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 9000\r\n\x16")
            .await
            .unwrap();
        let got = behind("127.0.0.0/8").read(&mut server, peer).await.unwrap();
        assert_eq!(got, "198.51.100.7:40000".parse().unwrap());
    }

    #[tokio::test]
    async fn a_proxy_header_from_elsewhere_is_refused() {
        let (mut client, mut server, peer) = pair().await;
        client
            .write_all(b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 9000\r\n\x16")
            .await
            .unwrap();
        let r = behind("10.0.0.0/8").read(&mut server, peer).await;
        assert!(matches!(r, Err(PreludeError::UntrustedProxy(_))), "{r:?}");
    }

    #[tokio::test]
    async fn tls_from_elsewhere_is_served_under_its_own_address() {
        let (mut client, mut server, peer) = pair().await;
        client.write_all(b"\x16\x03\x01").await.unwrap();
        let got = behind("10.0.0.0/8").read(&mut server, peer).await.unwrap();
        assert_eq!(got, peer);
    }

    #[tokio::test]
    async fn tls_from_the_balancer_without_a_header_is_refused() {
        let (mut client, mut server, peer) = pair().await;
        client
            .write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00")
            .await
            .unwrap();
        let r = behind("127.0.0.0/8").read(&mut server, peer).await;
        assert!(matches!(r, Err(PreludeError::Proxy(_))), "{r:?}");
    }
}
