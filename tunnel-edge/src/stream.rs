//! One tunneled stream on the edge: check the target against the edge's own allowlist,
//! dial it locally (racing the server's cancel, so a late socket is dropped), answer 200 or
//! an error with a one-line reason, then pipe bytes until both directions end.

use std::future::poll_fn;
use std::time::Instant;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use protocol::stream::{sanitize_reason, DialFailure, CLIENT_HEADER, REASON_HEADER};
use protocol::Target;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tunnel_io::pipe::{pipe_metered, PipeConfig, PipeEnd};

use crate::allow::EdgeAllowlist;
use crate::config::EdgeConfig;
use crate::metrics::EdgeMetrics;

/// Answer a stream with an error status and a one-line reason header.
pub(crate) fn refuse(mut respond: SendResponse<Bytes>, failure: DialFailure, reason: &str) {
    let mut builder = Response::builder().status(failure.status());
    builder = builder.header(REASON_HEADER, sanitize_reason(reason));
    if let Ok(response) = builder.body(()) {
        let _ = respond.send_response(response, true);
    }
}

pub(crate) async fn serve_stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    allow: &EdgeAllowlist,
    config: &EdgeConfig,
    metrics: &EdgeMetrics,
    cancel: &CancellationToken,
) {
    let started = Instant::now();
    let client = request
        .headers()
        .get(CLIENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(sanitize_reason)
        .unwrap_or_default();
    if request.method() != Method::CONNECT {
        metrics.dial("bad_request");
        refuse(
            respond,
            DialFailure::PolicyDenied,
            "only CONNECT streams are served",
        );
        return;
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let target = match Target::parse(&authority) {
        Ok(t) => t,
        Err(e) => {
            metrics.dial("bad_request");
            refuse(
                respond,
                DialFailure::PolicyDenied,
                &format!("bad target: {e}"),
            );
            return;
        }
    };
    let address = match allow.resolve(&target) {
        Ok(a) => a,
        Err(refusal) => {
            metrics.dial(DialFailure::PolicyDenied.label());
            warn!(target: "audit", %client, dest = %target, reason = %refusal, "edge refused dial");
            refuse(respond, DialFailure::PolicyDenied, &refusal.to_string());
            return;
        }
    };
    // Race the dial against the server cancelling the stream (client gone, dial timeout):
    // a socket that connects after the cancel is dropped at once, never used.
    let dialed = tokio::select! {
        biased;
        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
            metrics.dial("cancelled");
            debug!(dest = %target, "dial cancelled by the server");
            return;
        }
        r = tokio::time::timeout(config.dial.timeout, TcpStream::connect(address)) => r,
    };
    let tcp = match dialed {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let failure = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => DialFailure::Refused,
                std::io::ErrorKind::TimedOut => DialFailure::Timeout,
                _ => DialFailure::Unreachable,
            };
            metrics.dial(failure.label());
            let reason = format!("connect {address}: {e}");
            info!(target: "audit", %client, dest = %target, result = failure.label(), reason, "edge dial failed");
            refuse(respond, failure, &reason);
            return;
        }
        Err(_) => {
            metrics.dial(DialFailure::Timeout.label());
            let reason = format!(
                "connect {address}: timed out after {:?}",
                config.dial.timeout
            );
            info!(target: "audit", %client, dest = %target, result = "timeout", reason, "edge dial failed");
            refuse(respond, DialFailure::Timeout, &reason);
            return;
        }
    };
    tunnel_io::set_nodelay(&tcp);
    metrics.dial("ok");
    let send = match Response::builder().status(StatusCode::OK).body(()) {
        Ok(ok) => match respond.send_response(ok, false) {
            Ok(send) => send,
            Err(e) => {
                debug!(dest = %target, error = %e, "stream gone before the dial completed");
                return;
            }
        },
        Err(_) => return,
    };
    let mut tcp = tcp;
    let report = pipe_metered(
        &mut tcp,
        send,
        request.into_body(),
        Bytes::new(),
        PipeConfig {
            write_timeout: config.dial.write_timeout,
            idle_timeout: config.dial.idle_timeout,
        },
        &metrics.tunneled,
        cancel,
    )
    .await;
    if report.result.is_err() {
        // A failed stream must look like a failure to the target as well: a RST, not the FIN
        // of a clean half-close that would pass a truncated request off as complete.
        let _ = tcp.set_zero_linger();
    }
    let result = match &report.result {
        Ok(PipeEnd::Complete) => "ok".to_string(),
        Ok(PipeEnd::SocketLeft) => "ok: target closed".to_string(),
        Err(e) => e.to_string(),
    };
    info!(
        target: "audit",
        %client,
        dest = %target,
        dialed = %address,
        result,
        bytes_to_target = report.stream_to_socket,
        bytes_from_target = report.socket_to_stream,
        duration_ms = started.elapsed().as_millis() as u64,
        "edge stream closed"
    );
}
