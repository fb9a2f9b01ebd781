//! Attack clients for listener-starvation tests: TCP connections from a chosen 127.0.0.x
//! source (all of 127/8 is local, so one machine can play many attackers), TLS handshakes
//! that then never send a byte, and a watch on when the server closes each one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// The loopback address 127.0.0.`last`: a distinct source for per-source caps.
pub fn source(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A TCP connection to `server` from `from` (kernel-chosen port).
pub async fn connect_from(from: IpAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(server).await
}

/// A TLS connection from `from` that completed its handshake with `tls`, or `None` when the
/// server closed it first (within `limit`).
pub async fn tls_from(
    from: IpAddr,
    server: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    limit: Duration,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
    let attempt = async {
        let tcp = connect_from(from, server).await.ok()?;
        tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .ok()
    };
    tokio::time::timeout(limit, attempt).await.ok().flatten()
}

/// Read (and discard) whatever the server sends until it closes the connection or `limit`
/// passes; returns when it closed, measured from the call, or `None` if still open.
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// Watch `stream` in its own task; the handle yields how long after the call the server
/// closed it (`None`: still open after `limit`). The stream is dropped at the end.
pub fn watch_close<S>(mut stream: S, limit: Duration) -> JoinHandle<Option<Duration>>
where
    S: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move { closed_within(&mut stream, limit).await })
}
