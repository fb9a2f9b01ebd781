//! The apiserver's side in tests: raw HTTP answers from the CONNECT frontends (status, head
//! and reason body, so refusals can be checked exactly), the admin endpoint, Prometheus text,
//! and curl.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Largest response head read.
const MAX_HEAD: usize = 16 << 10;
/// Largest response body read.
const MAX_BODY: usize = 1 << 20;

/// An HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// The head, status line included, without the blank line.
    pub head: String,
    /// The body (by `Content-Length`, or to EOF without one; empty after `200` to CONNECT).
    pub body: String,
}

impl Answer {
    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Read one response head (byte by byte, so no tunneled byte is consumed) and, unless it
/// switches protocols (101, or 200 to a CONNECT), its body.
pub async fn read_answer<S: AsyncRead + Unpin>(
    stream: &mut S,
    connect: bool,
) -> anyhow::Result<Answer> {
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(head.len() < MAX_HEAD, "response head over {MAX_HEAD} bytes");
        match stream.read_u8().await {
            Ok(b) => head.push(b),
            Err(e) if head.is_empty() => {
                return Err(e).context("connection closed before any answer")
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("truncated head: {:?}", String::from_utf8_lossy(&head))
                })
            }
        }
    }
    head.truncate(head.len() - 4);
    let head = String::from_utf8(head).context("non-UTF-8 head")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let mut answer = Answer {
        status,
        head,
        body: String::new(),
    };
    // After 101 or a successful CONNECT the bytes that follow belong to the new protocol.
    if status == 101 || connect && status == 200 {
        return Ok(answer);
    }
    let mut body = Vec::new();
    match answer.header("content-length") {
        Some(len) => {
            let len: usize = len.parse().context("bad Content-Length")?;
            anyhow::ensure!(len <= MAX_BODY, "body of {len} bytes");
            body.resize(len, 0);
            stream
                .read_exact(&mut body)
                .await
                .context("truncated body")?;
        }
        None => {
            stream.take(MAX_BODY as u64).read_to_end(&mut body).await?;
        }
    }
    answer.body = String::from_utf8_lossy(&body).into_owned();
    Ok(answer)
}

/// Send `CONNECT target` and read the answer.
pub async fn connect_answer<S>(stream: &mut S, target: &str) -> anyhow::Result<Answer>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    read_answer(stream, true).await
}

/// TCP and TLS to the mTLS frontend, nothing sent yet.
pub async fn tls_to(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    Ok(tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?)
}

/// `GET path` on the admin endpoint: status and body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(admin).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let answer = read_answer(&mut tcp, false).await?;
    Ok((answer.status, answer.body))
}

/// A sample's value in Prometheus text: `series` is the name with its labels exactly as
/// rendered, e.g. `tether_dials_total{frontend="connect",result="ok"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// What curl did.
#[derive(Debug)]
pub struct CurlOutput {
    /// Exit code (0 on success).
    pub code: i32,
    /// Response body.
    pub stdout: String,
    /// Error messages.
    pub stderr: String,
}

/// Run curl with `args` (silent, errors shown, proxy environment cleared), killed after 20 s.
pub async fn curl(args: &[&str]) -> CurlOutput {
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["--silent", "--show-error", "--max-time", "15"])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for var in ["http_proxy", "https_proxy", "all_proxy", "no_proxy"] {
        command.env_remove(var).env_remove(var.to_uppercase());
    }
    let output = crate::within("curl", Duration::from_secs(20), command.output())
        .await
        .expect("run curl (is it installed?)");
    CurlOutput {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The curl arguments that make the mTLS frontend curl's HTTPS proxy, as kube-apiserver is
/// configured, and verify the kubelet against its own CA.
pub fn curl_proxy_args(proxy: SocketAddr, pki: &crate::Pki) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        "--proxy".into(),
        format!("https://{proxy}"),
        "--proxy-cacert".into(),
        path(&pki.layout.ca_cert()),
        "--proxy-cert".into(),
        path(&pki.layout.frontend_client_cert()),
        "--proxy-key".into(),
        path(&pki.layout.frontend_client_key()),
        "--cacert".into(),
        path(&pki.kubelet_ca_file),
    ]
}

/// The sum of every sample of metric `name`, whatever its labels (`name 3` and
/// `name{frontend="connect"} 2` both count); 0 when absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.split_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}
