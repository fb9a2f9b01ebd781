//! The HTTP CONNECT frontend (kube-apiserver's `HTTPConnect` egress) on a Unix socket and on
//! TCP with mandatory mTLS. Reads one CONNECT head within a deadline and a size limit, answers
//! `200 Connection established` once the edge has dialed, then carries raw bytes both ways,
//! on the session's shard when the server has shards (`crate::shards`).

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use protocol::connect::{parse_connect_head, response_head, ConnectError, HeadLimits, ESTABLISHED};
use protocol::Target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};
use tunnel_io::pipe::{
    pipe_resume, pipe_stream, PipeConfig, PipeEnd, PipeError, PipeReport, Piped, Resume, Stream,
};

use crate::edge::session::OpenStream;
use crate::frontend::dial::dial;
use crate::shards::{MovableTcp, Rehome};
use crate::Shared;

/// Metric label of this frontend.
const FRONTEND: &str = "connect";

/// Serve the mTLS TCP form until `cancel`.
pub async fn serve_tcp(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    stop: crate::lifecycle::Stop,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(shared.config.connect.max_connections));
    let mut retry = tunnel_io::accept::AcceptRetry::new("connect (mTLS)");
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some((tcp, peer)) = retry.next(&stop.drain, || listener.accept()).await else {
            return;
        };
        tunnel_io::set_nodelay(&tcp);
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let cancel = stop.hard.clone();
        let span = tracing::debug_span!("connect", client = %peer);
        tracker.spawn(
            async move {
                let deadline = Instant::now() + shared.config.connect.header_timeout;
                // The handshake's state and the TLS stream are boxed: inline, this task's
                // state would be sized for both at once for as long as the tunnel lives
                // (~3.5 KiB more per idle connection; docs/BENCHMARKS.md, hold).
                let handshake = Box::pin(tunnel_io::tls::accept_within(
                    &acceptor,
                    MovableTcp::new(tcp),
                    deadline.into(),
                    &cancel,
                ));
                let tls = match handshake.await {
                    Ok(tls) => tls,
                    Err(error) => {
                        warn!(%peer, "connect frontend: {error}");
                        return;
                    }
                };
                let subject = tunnel_io::tls::peer_certificate(&tls)
                    .and_then(|der| tunnel_io::identity::common_name(der.as_ref()))
                    .unwrap_or_else(|| "?".into());
                let client = format!("{subject}@{peer}");
                serve_connection(Box::new(tls), client, deadline, &shared, &cancel).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}

/// Serve the Unix socket form until `cancel`. Access control is the socket's file mode.
pub async fn serve_unix(
    listener: UnixListener,
    shared: Arc<Shared>,
    stop: crate::lifecycle::Stop,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(shared.config.connect.max_connections));
    let mut retry = tunnel_io::accept::AcceptRetry::new("connect (unix)");
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some((stream, _)) = retry.next(&stop.drain, || listener.accept()).await else {
            return;
        };
        let client = match stream.peer_cred() {
            Ok(cred) => format!("unix:uid={}:pid={}", cred.uid(), cred.pid().unwrap_or(0)),
            Err(_) => "unix".to_string(),
        };
        let shared = shared.clone();
        let cancel = stop.hard.clone();
        let span = tracing::debug_span!("connect", client = %client);
        tracker.spawn(
            async move {
                let deadline = Instant::now() + shared.config.connect.header_timeout;
                serve_connection(stream, client, deadline, &shared, &cancel).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}

/// What went wrong before the tunnel was established, as an HTTP answer.
struct Refusal {
    status: u16,
    reason: String,
    result: &'static str,
}

/// Read the CONNECT head; bytes after it stay in `buf`.
async fn read_head<S: AsyncRead + Unpin>(
    socket: &mut S,
    buf: &mut BytesMut,
    limits: &HeadLimits,
    deadline: Instant,
) -> Result<(Target, usize), Refusal> {
    loop {
        match parse_connect_head(buf, limits) {
            Ok(Some(request)) => return Ok((request.target, request.head_len)),
            Ok(None) => {}
            Err(error) => {
                return Err(Refusal {
                    status: error.status(),
                    reason: error.to_string(),
                    result: match error {
                        ConnectError::MethodNotAllowed(_) => "bad_method",
                        _ if error.status() == 431 => "head_too_large",
                        _ => "bad_request",
                    },
                })
            }
        }
        buf.reserve(4096);
        let read = tokio::time::timeout_at(deadline.into(), socket.read_buf(buf)).await;
        match read {
            Ok(Ok(0)) => {
                return Err(Refusal {
                    status: 0,
                    reason: "client closed before sending a complete CONNECT head".into(),
                    result: "client_closed",
                })
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(Refusal {
                    status: 0,
                    reason: format!("read error: {e}"),
                    result: "client_closed",
                })
            }
            Err(_) => {
                return Err(Refusal {
                    status: 408,
                    reason: "timed out waiting for a complete CONNECT head".into(),
                    result: "head_timeout",
                })
            }
        }
    }
}

async fn serve_connection<S>(
    mut socket: S,
    client: String,
    deadline: Instant,
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Rehome,
{
    let started = Instant::now();
    let config = &shared.config.connect;
    let limits = HeadLimits {
        max_head_bytes: config.max_head_bytes,
        ..HeadLimits::default()
    };
    let mut buf = BytesMut::with_capacity(1024);
    let (target, head_len) = match read_head(&mut socket, &mut buf, &limits, deadline).await {
        Ok(t) => t,
        Err(refusal) => {
            shared.metrics.dial(FRONTEND, refusal.result);
            if refusal.status != 0 {
                let _ = socket
                    .write_all(&response_head(refusal.status, &refusal.reason))
                    .await;
                let _ = socket.shutdown().await;
            }
            info!(target: "audit", frontend = FRONTEND, %client, result = refusal.result, status = refusal.status, reason = refusal.reason, "connect refused");
            return;
        }
    };
    let mut early = buf.split_off(head_len);
    // The head's bytes are parsed; hold no part of their buffer for the tunnel's lifetime.
    drop(buf);

    // While the edge dials, keep reading: a client that leaves cancels the dial (dropping it
    // resets the stream, and the edge closes any late socket); bytes it sends early are kept.
    let dialed = {
        let dialing = dial(shared, FRONTEND, &target, &client);
        tokio::pin!(dialing);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                d = &mut dialing => break d,
                r = socket.read_buf(&mut early), if early.len() < limits.max_head_bytes => match r {
                    Ok(0) | Err(_) => {
                        shared.metrics.dial(FRONTEND, "client_cancelled");
                        info!(target: "audit", frontend = FRONTEND, %client, dest = %target, result = "client_cancelled", duration_ms = started.elapsed().as_millis() as u64, "client left during dial");
                        return;
                    }
                    Ok(_) => {}
                },
            }
        }
    };
    // Most clients wait for the 200 before sending: then free the read buffer now rather
    // than keep it for as long as the (possibly idle) tunnel lives.
    let early = if early.is_empty() {
        drop(early); // shadowing alone would keep it alive
        Bytes::new()
    } else {
        early.freeze()
    };
    let dialed = match dialed {
        Ok(d) => d,
        Err(error) => {
            let _ = socket
                .write_all(&response_head(error.status(), &error.reason))
                .await;
            let _ = socket.shutdown().await;
            info!(target: "audit", frontend = FRONTEND, %client, dest = %target, result = error.failure.label(), status = error.status(), reason = error.reason, duration_ms = started.elapsed().as_millis() as u64, "connect refused");
            return;
        }
    };
    let tunnel = Tunnel {
        client,
        target,
        started,
        early,
        dialed,
    };
    // On a sharded server the pipe runs on the session's shard, beside its HTTP/2
    // connection task, so a frame's wake-ups stay on one thread (`crate::shards`).
    let Some(shard) = tunnel
        .dialed
        .session
        .shard()
        .filter(|s| !s.is_current())
        .cloned()
    else {
        // Boxed, so this task is not sized for the pipe's state when the pipe runs on a
        // shard instead (an idle tunnel would hold it twice).
        return Box::pin(run_tunnel(socket, tunnel, shared, cancel)).await;
    };
    let (shared, cancel) = (shared.clone(), cancel.clone());
    let moved = shard.spawn(
        async move {
            match socket.rehome() {
                Ok(socket) => run_tunnel(socket, tunnel, &shared, &cancel).await,
                Err(error) => {
                    warn!(client = tunnel.client, %error, "connect frontend: socket lost moving to its shard");
                }
            }
        }
        .in_current_span(),
    );
    // This task keeps the connection's slot (and the tracker's count) until the pipe ends.
    let _ = moved.await;
}

/// A CONNECT whose dial succeeded: what its pipe and audit line need.
struct Tunnel {
    client: String,
    target: Target,
    started: Instant,
    early: Bytes,
    dialed: crate::frontend::dial::Dialed,
}

/// Answer 200 and pipe until the tunnel ends, then audit it.
async fn run_tunnel<S>(mut socket: S, tunnel: Tunnel, shared: &Shared, cancel: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Rehome,
{
    use crate::edge::routing::Routable;
    let Tunnel {
        client,
        target,
        started,
        early,
        dialed,
    } = tunnel;
    let config = &shared.config.connect;
    let node = dialed.session.node().clone();
    // Flushed: a TLS stream may keep the answer in its buffer when the socket is not yet
    // writable (always so just after a move to a shard, whose reactor has not reported the
    // socket yet), and the client sends nothing before it has the answer.
    let answered = async {
        socket.write_all(ESTABLISHED).await?;
        socket.flush().await
    };
    if let Err(error) = answered.await {
        debug!(%error, "client left before the tunnel was established");
        return;
    }
    let open = shared.metrics.stream_open(FRONTEND);
    let OpenStream {
        send,
        recv,
        slot,
        meter,
        lane,
    } = dialed.stream;
    let pipe_config = PipeConfig {
        write_timeout: config.write_timeout,
        idle_timeout: config.idle_timeout,
    };
    let lane_slot = dialed.session.edge_session().lane().clone();
    let stream = Stream {
        send,
        recv,
        handover: lane.is_some(),
        lane,
    };
    let report = match pipe_stream(socket, stream, early, pipe_config, &meter, cancel).await {
        Piped::Ended(report, _) => report,
        // Boxed: an idle tunnel's task is not sized for the moved pipe's state as well.
        Piped::Moving(resume) => {
            Box::pin(on_lane(
                resume,
                lane_slot.shard(),
                pipe_config,
                &meter,
                cancel,
            ))
            .await
        }
    };
    drop(open);
    drop(slot);
    let result = match &report.result {
        Ok(PipeEnd::Complete) => "ok".to_string(),
        // The client had sent everything and closed while the node still sent: how
        // kube-apiserver ends a follow stream (`logs -f`), not a failure.
        Ok(PipeEnd::SocketLeft) => "ok: client closed".to_string(),
        Err(e) => e.to_string(),
    };
    info!(
        target: "audit",
        frontend = FRONTEND,
        %client,
        dest = %target,
        %node,
        result,
        bytes_to_edge = report.socket_to_stream,
        bytes_from_edge = report.stream_to_socket,
        moved_to_lane = report.moved,
        duration_ms = started.elapsed().as_millis() as u64,
        "stream closed"
    );
}

/// Continue a pipe that moved to its lane on the lane's shard, so the bulk stream's bytes
/// no longer take turns on the session's thread (`crate::edge::lane`).
async fn on_lane<S>(
    resume: Resume<S>,
    shard: Option<crate::shards::Shard>,
    config: PipeConfig,
    meter: &crate::edge::session::StreamMeter,
    cancel: &CancellationToken,
) -> PipeReport
where
    S: AsyncRead + AsyncWrite + Unpin + Rehome,
{
    let Some(shard) = shard.filter(|s| !s.is_current()) else {
        return pipe_resume(resume, config, meter, cancel).await.0;
    };
    let (meter, cancel) = (meter.clone(), cancel.clone());
    let moved = shard.spawn(
        async move {
            let resume = resume.map_socket(Rehome::rehome)?;
            Ok::<_, std::io::Error>(pipe_resume(resume, config, &meter, &cancel).await.0)
        }
        .in_current_span(),
    );
    let error = match moved.await {
        Ok(Ok(report)) => return report,
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    PipeReport {
        socket_to_stream: 0,
        stream_to_socket: 0,
        result: Err(PipeError::Socket(format!(
            "lost moving to the lane's shard: {error}"
        ))),
        moved: true,
    }
}
