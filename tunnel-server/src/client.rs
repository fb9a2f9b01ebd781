//! A minimal HTTP CONNECT client, the way kube-apiserver uses the frontend: one CONNECT per
//! connection, then raw bytes. The demo uses it for its self-check; tests use it where curl
//! cannot go (curl does not send CONNECT over a Unix socket).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Bytes of an answer head we read at most.
const MAX_ANSWER_HEAD: usize = 16 << 10;

/// Send `CONNECT target` on `stream` and wait for the answer. On 200 the stream is the
/// tunnel; otherwise the error holds the status line and the reason body.
pub async fn connect_on<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    target: &str,
) -> anyhow::Result<()> {
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // Read byte by byte up to the blank line so no tunneled byte is consumed here.
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_ANSWER_HEAD {
            bail!("CONNECT answer head larger than {MAX_ANSWER_HEAD} bytes");
        }
        let byte = stream
            .read_u8()
            .await
            .context("proxy closed during CONNECT")?;
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status_line = head.lines().next().unwrap_or_default().to_owned();
    if status_line.split_whitespace().nth(1) == Some("200") {
        return Ok(());
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body).await;
    bail!("{status_line}: {}", body.trim())
}

/// CONNECT through the mTLS TCP frontend.
pub async fn connect_tls(
    proxy: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    target: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::IpAddress(proxy.ip().into());
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS to the CONNECT frontend")?;
    connect_on(&mut stream, target).await?;
    Ok(stream)
}

/// CONNECT through the Unix socket frontend.
pub async fn connect_unix(socket: &Path, target: &str) -> anyhow::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect {}", socket.display()))?;
    connect_on(&mut stream, target).await?;
    Ok(stream)
}

/// A TLS client configuration trusting `ca_pem` only and presenting no certificate.
pub fn trust_only(ca_pem: &str) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in tunnel_io::tls::certs_from_pem(ca_pem.as_bytes()) {
        roots.add(cert)?;
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(tunnel_io::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Over an established tunnel, speak TLS to the kubelet (verifying it against `kubelet_ca`,
/// so the tunnel provably did not terminate TLS) and GET `path`. Returns status and body.
pub async fn https_get<S>(
    tunnel: S,
    kubelet_tls: Arc<rustls::ClientConfig>,
    server_name: &str,
    path: &str,
) -> anyhow::Result<(u16, String)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = tunnel_io::tls::server_name(server_name).map_err(anyhow::Error::msg)?;
    let mut tls = tokio_rustls::TlsConnector::from(kubelet_tls)
        .connect(name, tunnel)
        .await
        .context("TLS to the kubelet through the tunnel")?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status in the kubelet's answer")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
