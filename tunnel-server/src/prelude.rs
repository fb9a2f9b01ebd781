//! What a TLS listener reads before TLS: the first byte within a short deadline (a connection
//! that never speaks is dropped in seconds, not after the whole handshake timeout), then the
//! PROXY header where the listener takes one. Returns the client's address, which the
//! per-source caps and the audit log use. Owns no slot and no TLS state.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::proxy_protocol::ProxyHeaderError;

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
}

/// A listener's pre-TLS rules.
#[derive(Debug, Clone)]
pub struct Prelude {
    /// Time for the first byte after accept.
    pub first_byte_timeout: Duration,
    /// Expect a PROXY header from the load balancer.
    pub proxy_protocol: bool,
}

impl Prelude {
    /// Wait for the first byte, then read the PROXY header if expected; the caller bounds
    /// the whole step with its handshake deadline.
    pub async fn read(
        &self,
        tcp: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<SocketAddr, PreludeError> {
        first_byte_within(tcp, self.first_byte_timeout).await?;
        if !self.proxy_protocol {
            return Ok(peer);
        }
        Ok(crate::proxy_protocol::client_address(tcp, peer).await?)
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
        };
        assert_eq!(prelude.read(&mut server, peer).await.unwrap(), peer);
        let mut buf = [0u8; 3];
        server.peek(&mut buf).await.unwrap();
        assert_eq!(&buf, b"\x16\x03\x01");
    }
}
