//! The edge's optional admin listener (`[admin] listen`, off by default): `/healthz` (the
//! process serves), `/readyz` (a session is up to every replica the servers announce) and
//! `/metrics` (negotiated like tunnel-server's: OpenMetrics when asked for, text 0.0.4
//! otherwise). Plain HTTP/1.1, meant for loopback or a node-local scraper; it carries no
//! tunnel traffic and exposes nothing but these three read-only paths.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::session::Edge;

/// How long the listener waits for a request's headers: a scraper sends them at once; this
/// only bounds a connection that never does.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Bind `listen` (failing fast on a taken port, like the forward listeners) and serve until
/// `cancel`. Returns the bound address (port 0 picks one; it is logged).
pub async fn start(
    edge: Arc<Edge>,
    listen: SocketAddr,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("admin listener {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    info!(listen = %addr, "admin listening");
    tracker.spawn(serve(listener, edge, tracker.clone(), cancel));
    Ok(addr)
}

async fn serve(
    listener: TcpListener,
    edge: Arc<Edge>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let mut retry = tunnel_io::accept::AcceptRetry::new("admin");
    while let Some((tcp, _)) = retry.next(&cancel, || listener.accept()).await {
        let edge = edge.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let service = service_fn(move |req| {
                let edge = edge.clone();
                async move { Ok::<_, Infallible>(respond(&edge, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = conn => if let Err(error) = r { debug!(%error, "admin connection"); },
            }
        });
    }
}

fn respond(edge: &Edge, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => {
            let readiness = edge.readiness();
            let status = if readiness.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "text/plain", format!("{readiness}\n"))
        }
        "/metrics" => {
            let accept = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let (content_type, body) =
                tunnel_io::metrics_text::negotiate(accept, edge.metrics().render());
            (StatusCode::OK, content_type, body)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    response
}
