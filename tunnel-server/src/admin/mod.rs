//! The admin endpoint: `/healthz` (the process serves), `/readyz` (listeners up and not
//! draining), `/metrics` (OpenMetrics when the `Accept` header asks for it, as Prometheus
//! does; the Prometheus 0.0.4 text format otherwise), and the operators' read-only JSON views
//! `/api/v1/edges` and `/api/v1/nodes` ([`api`]), which `tunnel-server edges` and `node list`
//! read ([`fleet`]). Plain HTTP/1.1 on a separate, usually loopback, address; it carries no
//! tunnel traffic.

pub mod api;
pub mod fleet;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
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
use tracing::{debug, warn};

use crate::metrics::text;
use crate::Shared;

/// Serve admin requests until `cancel`.
pub async fn serve_admin(
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(respond(&shared, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = conn => if let Err(error) = r { debug!(%error, "admin connection"); },
            }
        });
    }
}

fn json(value: &impl serde::Serialize) -> (StatusCode, &'static str, String) {
    match serde_json::to_string_pretty(value) {
        Ok(body) => (StatusCode::OK, "application/json", body + "\n"),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{error}\n"),
        ),
    }
}

fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => {
            if shared.ready.load(Ordering::Acquire) && !shared.draining.load(Ordering::Acquire) {
                (StatusCode::OK, "text/plain", "ready\n".to_string())
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\n".to_string(),
                )
            }
        }
        "/metrics" => {
            let accept = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let (content_type, body) = text::negotiate(accept, shared.metrics.render());
            (StatusCode::OK, content_type, body)
        }
        crate::admin::api::EDGES_PATH => json(&crate::admin::api::edges(shared)),
        crate::admin::api::NODES_PATH => json(&crate::admin::api::nodes(shared)),
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
