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
use tunnel_io::pipe::{
    pipe_resume, pipe_stream, PipeConfig, PipeEnd, PipeError, PipeReport, Piped, Stream,
};

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

/// A stream the server opened: its request, where to answer, and how it may move to a lane.
pub(crate) type Opened = (Request<RecvStream>, SendResponse<Bytes>, Option<LaneSide>);

/// A stream's way to its lane: the lane's offer, its place in the registry (held until the
/// pipe ends: a lane stream may name it until then) and the lane thread, where the pipe
/// continues once moved.
pub(crate) struct LaneSide {
    pub(crate) lane: tunnel_io::pipe::lane::Lane,
    pub(crate) registered: crate::lane::Registered,
    pub(crate) thread: tokio::runtime::Handle,
}

pub(crate) async fn serve_stream(
    (request, mut respond, lane): Opened,
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
    let pipe_config = PipeConfig {
        write_timeout: config.dial.write_timeout,
        idle_timeout: config.dial.idle_timeout,
    };
    let body = request.into_body();
    let (report, tcp) = pipe(tcp, send, body, lane, pipe_config, metrics, cancel).await;
    if let (Err(_), Some(tcp)) = (&report.result, &tcp) {
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
        moved_to_lane = report.moved,
        duration_ms = started.elapsed().as_millis() as u64,
        "edge stream closed"
    );
}

/// Pipe the stream; once it moves to its lane, continue on the lane thread, so the bulk
/// stream's bytes no longer take turns on the session's thread.
async fn pipe(
    tcp: TcpStream,
    send: h2::SendStream<Bytes>,
    recv: RecvStream,
    lane: Option<LaneSide>,
    config: PipeConfig,
    metrics: &EdgeMetrics,
    cancel: &CancellationToken,
) -> (PipeReport, Option<TcpStream>) {
    let (lane, _registered, thread) = match lane {
        Some(side) => (Some(side.lane), Some(side.registered), Some(side.thread)),
        None => (None, None, None),
    };
    let stream = Stream {
        send: send.into(),
        recv: recv.into(),
        lane,
        handover: thread.is_some(),
    };
    let resume =
        match pipe_stream(tcp, stream, Bytes::new(), config, &metrics.tunneled, cancel).await {
            Piped::Ended(report, tcp) => return (report, Some(tcp)),
            Piped::Moving(resume) => resume,
        };
    let thread = thread.unwrap_or_else(|| unreachable!("only a pipe with a lane thread moves"));
    let (meter, cancel) = (metrics.tunneled.clone(), cancel.clone());
    // Out of this thread's reactor, into the lane thread's.
    let resume = resume.map_socket(|tcp| tcp.into_std());
    let moved = thread.spawn(async move {
        let resume = resume?.map_socket(TcpStream::from_std)?;
        Ok::<_, std::io::Error>(pipe_resume(resume, config, &meter, &cancel).await)
    });
    let error = match moved.await {
        Ok(Ok((report, tcp))) => return (report, Some(tcp)),
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    // The socket is gone with the error; its streams' halves were dropped, which resets them.
    let report = PipeReport {
        socket_to_stream: 0,
        stream_to_socket: 0,
        result: Err(PipeError::Socket(format!(
            "lost moving to the lane thread: {error}"
        ))),
        moved: true,
    };
    (report, None)
}
