//! A tiny HTTPS server that stands in for a kubelet in the demo and in tests: health, streamed
//! container logs, and upgrade-and-echo for exec/attach/port-forward style requests.
//! It is a test double: no authentication, no real containers; never expose it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::stream;
use http::header::{CONNECTION, CONTENT_TYPE, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

/// Pause between two log lines of `/containerLogs`: 100 ms, slow enough to watch a stream
/// arrive line by line, fast enough for tests.
const LOG_LINE_INTERVAL: Duration = Duration::from_millis(100);
/// Lines a `/containerLogs` request without `follow=true` returns before ending.
const LOG_LINES_WITHOUT_FOLLOW: u64 = 10;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// Longest a client may take to finish the TLS handshake: 10 s, so a silent peer cannot pin a
/// task forever.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, Infallible>;

/// A running demo kubelet. Dropping it (or [`DemoKubelet::shutdown`]) stops the listener and
/// every connection it serves.
#[derive(Debug)]
pub struct DemoKubelet {
    /// The address it listens on (the real port when bound to port 0).
    pub addr: SocketAddr,
    cancel: CancellationToken,
}

impl DemoKubelet {
    /// Bind `bind` (e.g. `127.0.0.1:0`) and serve HTTPS with the given certificate chain and
    /// private key (PEM) until dropped or [`shutdown`](Self::shutdown) is called.
    pub async fn start(
        bind: SocketAddr,
        cert_pem: &str,
        key_pem: &str,
    ) -> anyhow::Result<DemoKubelet> {
        let acceptor = tls_acceptor(cert_pem, key_pem)?;
        let listener = TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding demo kubelet to {bind}"))?;
        let addr = listener
            .local_addr()
            .context("demo kubelet local address")?;
        let cancel = CancellationToken::new();
        tokio::spawn(
            accept_loop(listener, acceptor, cancel.clone())
                .instrument(tracing::debug_span!("demo_kubelet", %addr)),
        );
        Ok(DemoKubelet { addr, cancel })
    }

    /// Stop accepting and close every connection, including streams and upgraded ones.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for DemoKubelet {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn tls_acceptor(cert_pem: &str, key_pem: &str) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading demo kubelet certificate PEM")?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in demo kubelet cert PEM");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .context("reading demo kubelet key PEM")?;
    // Explicit provider: never depend on a process-wide default being installed.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("demo kubelet certificate and key")?;
    // HTTP/1.1 only: upgrades (exec, port-forward) are an HTTP/1.1 mechanism.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "demo kubelet accept failed");
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                }
            }
        };
        // Nagle plus delayed ACKs adds ~40 ms to every small response.
        if let Err(error) = tcp.set_nodelay(true) {
            debug!(%peer, %error, "demo kubelet set_nodelay failed");
        }
        let (acceptor, cancel) = (acceptor.clone(), cancel.clone());
        tokio::spawn(
            async move {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {}
                    served = serve_connection(tcp, acceptor, cancel.clone()) => {
                        if let Err(error) = served {
                            debug!(error = %format!("{error:#}"), "demo kubelet connection failed");
                        }
                    }
                }
            }
            .instrument(tracing::debug_span!("conn", %peer)),
        );
    }
}

async fn serve_connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let tls = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    let service = service_fn(move |req| {
        let cancel = cancel.clone();
        async move { Ok::<_, Infallible>(route(req, cancel)) }
    });
    http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades()
        .await
        .context("serving HTTP/1.1")
}

fn route(mut req: Request<Incoming>, cancel: CancellationToken) -> Response<Body> {
    if let Some(protocol) = upgrade_protocol(req.headers()) {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(
            async move {
                let upgraded = match on_upgrade.await {
                    Ok(upgraded) => upgraded,
                    Err(error) => return debug!(%error, "demo kubelet upgrade failed"),
                };
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {}
                    echoed = echo(TokioIo::new(upgraded)) => match echoed {
                        Ok(bytes) => debug!(bytes, "demo kubelet echo finished"),
                        Err(error) => debug!(%error, "demo kubelet echo failed"),
                    }
                }
            }
            .in_current_span(),
        );
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, protocol)
            .body(empty())
            .unwrap_or_else(|_| status_only(StatusCode::INTERNAL_SERVER_ERROR));
    }

    let path = req.uri().path();
    let method = req.method();
    if path == "/healthz" {
        return match *method {
            Method::GET | Method::HEAD => text(StatusCode::OK, "ok"),
            _ => status_only(StatusCode::METHOD_NOT_ALLOWED),
        };
    }
    if let Some(rest) = path.strip_prefix("/containerLogs/") {
        let parts: Vec<&str> = rest.split('/').collect();
        return match (method, parts.as_slice()) {
            (&Method::GET, [namespace, pod, container])
                if [namespace, pod, container].iter().all(|p| !p.is_empty()) =>
            {
                let follow = query_flag(req.uri().query(), "follow");
                log_response(pod, container, follow)
            }
            (&Method::GET, _) => status_only(StatusCode::NOT_FOUND),
            _ => status_only(StatusCode::METHOD_NOT_ALLOWED),
        };
    }
    // As a real kubelet does: these endpoints only make sense as upgrades.
    for prefix in ["/exec/", "/attach/", "/portForward/"] {
        if path.starts_with(prefix) {
            return text(StatusCode::BAD_REQUEST, "Upgrade request required");
        }
    }
    status_only(StatusCode::NOT_FOUND)
}

/// The protocol a request asks to switch to: `Connection` lists the `upgrade` token and
/// `Upgrade` is non-empty.
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants_upgrade = headers.get_all(CONNECTION).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    let protocol = headers.get(UPGRADE)?;
    (wants_upgrade && !protocol.is_empty()).then(|| protocol.clone())
}

/// Whether `name=true` (or `name=1`) appears in the query string.
fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| match pair.split_once('=') {
            Some((key, value)) => key == name && (value == "true" || value == "1"),
            None => false,
        })
    })
}

/// A chunked body of numbered log lines, one per [`LOG_LINE_INTERVAL`]; endless when
/// following (hyper drops it when the client goes away), else [`LOG_LINES_WITHOUT_FOLLOW`].
fn log_response(pod: &str, container: &str, follow: bool) -> Response<Body> {
    let source: Arc<str> = format!("{pod}/{container}").into();
    let lines = stream::unfold(1u64, move |n| {
        let source = Arc::clone(&source);
        async move {
            if !follow && n > LOG_LINES_WITHOUT_FOLLOW {
                return None;
            }
            if n > 1 {
                tokio::time::sleep(LOG_LINE_INTERVAL).await;
            }
            let line = format!("{} line {n} from {source}\n", rfc3339_now());
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), n + 1))
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "text/plain")
        .body(BodyExt::boxed(StreamBody::new(lines)))
        .unwrap_or_else(|_| status_only(StatusCode::INTERNAL_SERVER_ERROR))
}

/// The current UTC time as RFC 3339 with nanoseconds, like kubelet's `timestamps=true`.
fn rfc3339_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond()
    )
}

/// Echo every byte back until EOF, then shut down the write side (half-close, not reset).
async fn echo<T: AsyncRead + AsyncWrite>(io: T) -> std::io::Result<u64> {
    let (mut reader, mut writer) = tokio::io::split(io);
    let bytes = tokio::io::copy(&mut reader, &mut writer).await?;
    writer.shutdown().await?;
    Ok(bytes)
}

fn empty() -> Body {
    BodyExt::boxed(Full::new(Bytes::new()))
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(BodyExt::boxed(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn status_only(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, CA_VALIDITY, SERVER_VALIDITY};
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    use tokio_rustls::client::TlsStream;
    use tokio_rustls::TlsConnector;

    async fn start() -> (Ca, DemoKubelet) {
        let ca = Ca::generate("test-ca", CA_VALIDITY).expect("ca");
        let cert = ca
            .issue_server(
                &["localhost".into()],
                &["127.0.0.1".parse().expect("ip")],
                SERVER_VALIDITY,
            )
            .expect("server cert");
        let kubelet = DemoKubelet::start(
            "127.0.0.1:0".parse().expect("addr"),
            &cert.cert_pem,
            &cert.key_pem,
        )
        .await
        .expect("started");
        (ca, kubelet)
    }

    async fn connect(ca: &Ca, addr: SocketAddr) -> TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS handshake")
    }

    async fn get(ca: &Ca, addr: SocketAddr, path: &str) -> String {
        let mut tls = connect(ca, addr).await;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        tls.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn healthz_answers_ok() {
        let (ca, kubelet) = start().await;
        let response = get(&ca, kubelet.addr, "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nok"), "{response}");
        let response = get(&ca, kubelet.addr, "/nope").await;
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    }

    #[tokio::test]
    async fn upgrade_switches_protocols_and_echoes() {
        let (ca, kubelet) = start().await;
        let tls = connect(&ca, kubelet.addr).await;
        let mut tls = BufReader::new(tls);
        tls.write_all(
            b"POST /exec/default/pod/c?command=sh HTTP/1.1\r\nHost: localhost\r\n\
              Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n",
        )
        .await
        .expect("write");
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            tls.read_line(&mut line).await.expect("read head");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push(line.trim_end().to_ascii_lowercase());
        }
        assert_eq!(head[0], "http/1.1 101 switching protocols", "{head:?}");
        assert!(head.contains(&"upgrade: spdy/3.1".to_owned()), "{head:?}");

        tls.write_all(b"ping").await.expect("write");
        tls.flush().await.expect("flush");
        let mut echoed = [0u8; 4];
        tls.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(&echoed, b"ping");

        // Half-close: the kubelet finishes echoing, then closes its side.
        tls.get_mut().shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).await.expect("eof");
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[tokio::test]
    async fn logs_without_follow_end_after_ten_lines() {
        let (ca, kubelet) = start().await;
        let response = get(&ca, kubelet.addr, "/containerLogs/default/web/nginx").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{response}"
        );
        for n in 1..=10 {
            assert!(
                response.contains(&format!(" line {n} from web/nginx\n")),
                "line {n}: {response}"
            );
        }
        assert!(!response.contains(" line 11 "), "{response}");
    }

    #[tokio::test]
    async fn logs_with_follow_keep_streaming() {
        let (ca, kubelet) = start().await;
        let mut tls = connect(&ca, kubelet.addr).await;
        tls.write_all(
            b"GET /containerLogs/default/web/nginx?follow=true HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        .await
        .expect("write");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains(" line 12 from web/nginx\n") {
            let n = tls.read(&mut buf).await.expect("read");
            assert_ne!(n, 0, "stream ended: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn shutdown_stops_accepting() {
        let (_ca, kubelet) = start().await;
        let addr = kubelet.addr;
        kubelet.shutdown();
        // The listener closes once the accept loop sees the cancellation.
        let mut refused = false;
        for _ in 0..50 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "listener still open after shutdown");
    }
}
