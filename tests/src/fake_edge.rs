//! An edge that never answers: a real TLS session with a real edge certificate that
//! acknowledges the server's session info (so it is routed) but holds every CONNECT stream
//! unanswered, handing it to the test. For pending-dial tests: timeouts, edge loss mid-dial,
//! cancellation reaching the edge, the per-node pending cap.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pki::Pki;

/// A routed session that never answers a dial.
pub struct FakeEdge {
    /// CONNECT streams as they arrive, unanswered (drop one to reset it).
    pub dials: mpsc::UnboundedReceiver<SendResponse<Bytes>>,
    /// Cancel to drop the whole session at once (the edge is lost).
    pub kill: CancellationToken,
}

impl FakeEdge {
    /// Connect to the edge listener `server` as `node` with `ips`, with a certificate from
    /// `pki`'s tunnel CA. Returns after the TLS and HTTP/2 handshakes; the server routes the
    /// session once it has its session-info answer (poll the server to know when).
    pub async fn connect(pki: &Pki, server: SocketAddr, node: &str, ips: &[IpAddr]) -> FakeEdge {
        let files = pki.issue_edge(node, ips);
        let tls = tunnel_io::tls::client_config_mtls(
            &pki.layout.ca_cert(),
            &files.cert,
            &files.key,
            &[tunnel_io::tls::ALPN_EDGE_SESSION],
        )
        .expect("fake edge TLS config");
        let tcp = TcpStream::connect(server)
            .await
            .expect("fake edge connects");
        let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .expect("fake edge TLS handshake");
        let mut connection = h2::server::handshake(tls)
            .await
            .expect("fake edge HTTP/2 handshake");
        let (tx, dials) = mpsc::unbounded_channel();
        let kill = CancellationToken::new();
        let stop = kill.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    n = connection.accept() => n,
                };
                let Some(Ok((request, mut respond))) = next else {
                    return;
                };
                if request.method() == http::Method::CONNECT {
                    let _ = tx.send(respond);
                } else {
                    // Session info: acknowledge, so the server routes this session.
                    let _ = respond.send_response(http::Response::new(()), true);
                }
            }
        });
        FakeEdge { dials, kill }
    }
}
