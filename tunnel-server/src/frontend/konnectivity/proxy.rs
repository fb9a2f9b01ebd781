//! `/ProxyService/Proxy`: one tunneled connection per gRPC stream, as kube-apiserver's
//! konnectivity-client uses it. DIAL_REQ → the shared dialer (same route table and policy as
//! CONNECT) → DIAL_RSP; then DATA both ways between the gRPC stream and the edge's h2 stream;
//! CLOSE_REQ → CLOSE_RSP, and CLOSE_RSP unasked when the target closes first.
//!
//! Isolation: each stream has its own task and a small bounded outbox. A slow reader fills
//! its outbox, so its task stops reading the edge stream, whose own h2 window then stops the
//! edge: no other stream waits. The other way, a stream is read only as fast as the edge
//! grants window, and the gRPC connection's per-stream window holds the client back.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use futures_util::Stream;
use protocol::konnectivity::{DialRequest, DialResponse, Packet};
use protocol::Target;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, Instrument};
use tunnel_io::pipe::{PipeConfig, PipeError, StreamRecv, StreamSend};

use super::service::proxy_service_server::ProxyService;
use super::ConnInfo;
use crate::edge::routing::Routable;
use crate::edge::session::OpenStream;
use crate::edge::session::StreamMeter;
use crate::frontend::dial::dial;
use crate::Shared;

/// Metric label and audit name of this frontend.
pub const FRONTEND: &str = "konnectivity";
/// Packets queued towards one client before its task stops reading the edge: small, because
/// each may hold up to [`MAX_DATA_OUT`] bytes.
const OUTBOX_PACKETS: usize = 8;
/// Largest DATA payload sent to a client: 1 MiB, far below the 4 MiB gRPC default limit
/// every Konnectivity client decodes with.
const MAX_DATA_OUT: usize = 1 << 20;

/// The response stream of one `Proxy` call.
pub type PacketStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

/// The `ProxyService` implementation: spawns one task per stream.
pub struct ProxyFrontend {
    shared: Arc<Shared>,
    /// Ends every stream at once (grace period over).
    hard: CancellationToken,
    tracker: TaskTracker,
    next_connect_id: AtomicI64,
}

impl ProxyFrontend {
    /// A frontend whose streams run in `tracker` and end when `hard` is cancelled.
    pub fn new(shared: Arc<Shared>, hard: CancellationToken, tracker: TaskTracker) -> Self {
        ProxyFrontend {
            shared,
            hard,
            tracker,
            next_connect_id: AtomicI64::new(1),
        }
    }
}

#[tonic::async_trait]
impl ProxyService for ProxyFrontend {
    type ProxyStream = PacketStream;

    async fn proxy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<PacketStream>, Status> {
        let client = request
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.client.0.to_string())
            .unwrap_or_else(|| "konnectivity".into());
        let incoming = request.into_inner();
        let (outbox, stream) = outbox();
        let connect_id = self.next_connect_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("konnectivity", %client, connect_id);
        let shared = self.shared.clone();
        let hard = self.hard.clone();
        self.tracker.spawn(
            async move {
                tokio::select! {
                    biased;
                    _ = hard.cancelled() => {
                        outbox.fail(Status::unavailable("server shutting down"));
                    }
                    _ = serve_stream(incoming, &outbox, &client, connect_id, &shared) => {}
                }
            }
            .instrument(span),
        );
        Ok(Response::new(stream))
    }
}

/// The sending half of a response stream: packets in order, or one terminal error that
/// overtakes whatever is still queued (as a reset would).
struct Outbox {
    packets: mpsc::Sender<Packet>,
    failure: std::sync::Mutex<Option<oneshot::Sender<Status>>>,
}

fn outbox() -> (Outbox, PacketStream) {
    let (packets, mut rx) = mpsc::channel(OUTBOX_PACKETS);
    let (failure, mut failed) = oneshot::channel::<Status>();
    let mut failed_open = true;
    let mut done = false;
    let stream = futures_util::stream::poll_fn(move |cx| {
        if done {
            return Poll::Ready(None);
        }
        if failed_open {
            match Pin::new(&mut failed).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Err(_)) => failed_open = false,
                Poll::Pending => {}
            }
        }
        rx.poll_recv(cx).map(|p| p.map(Ok))
    });
    (
        Outbox {
            packets,
            failure: std::sync::Mutex::new(Some(failure)),
        },
        Box::pin(stream),
    )
}

impl Outbox {
    /// Queue `packet`, waiting at most `config.write_timeout` for the client to make room.
    async fn send(&self, packet: Packet, config: PipeConfig) -> Result<(), PipeError> {
        match tokio::time::timeout(config.write_timeout, self.packets.send(packet)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(PipeError::Socket("client went away".into())),
            Err(_) => Err(PipeError::WriteTimeout(config.write_timeout)),
        }
    }

    /// End the stream with `status`, dropping what is still queued.
    fn fail(&self, status: Status) {
        let sender = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(sender) = sender {
            let _ = sender.send(status);
        }
    }
}

/// How the bridged connection ended.
enum Ended {
    /// The client sent CLOSE_REQ: answer CLOSE_RSP.
    CloseRequested,
    /// The target closed (END_STREAM from the edge): CLOSE_RSP unasked.
    TargetClosed,
    /// The client broke the protocol: end its stream with this error.
    Protocol(String),
    /// The client's stream ended or broke without CLOSE_REQ: nobody to answer.
    ClientGone(String),
    /// The edge side failed or stalled: CLOSE_RSP carrying the reason.
    Failed(PipeError),
}

async fn serve_stream(
    mut incoming: Streaming<Packet>,
    out: &Outbox,
    client: &str,
    connect_id: i64,
    shared: &Shared,
) {
    let started = Instant::now();
    let limits = shared.config.konnectivity.as_ref();
    let first_timeout = limits.map_or(std::time::Duration::from_secs(10), |k| {
        k.first_packet_timeout
    });
    let request = match tokio::time::timeout(first_timeout, incoming.message()).await {
        Ok(Ok(Some(Packet::DialRequest(d)))) => d,
        Ok(Ok(None)) => return,
        Ok(Ok(Some(other))) => {
            return refuse_stream(
                out,
                shared,
                client,
                format!("expected DIAL_REQ, got {}", other.type_name()),
            )
        }
        Ok(Err(status)) if is_protocol_error(&status) => {
            return refuse_stream(out, shared, client, status.message().into())
        }
        Ok(Err(_)) => return,
        Err(_) => {
            shared.metrics.dial(FRONTEND, "head_timeout");
            out.fail(Status::deadline_exceeded(format!(
                "no DIAL_REQ within {first_timeout:?}"
            )));
            return;
        }
    };
    let DialRequest {
        protocol,
        address,
        random,
        ..
    } = request;
    let answer =
        |result: Result<i64, String>| Packet::DialResponse(DialResponse { random, result });
    let config = PipeConfig {
        write_timeout: shared.config.connect.write_timeout,
        idle_timeout: shared.config.connect.idle_timeout,
    };
    let target = match (protocol.as_str(), Target::parse(&address)) {
        ("tcp", Ok(target)) => target,
        (_, parsed) => {
            let reason = match parsed {
                Err(e) if protocol == "tcp" => format!("bad address {address:?}: {e}"),
                _ => format!("unsupported protocol {protocol:?}; only \"tcp\""),
            };
            shared.metrics.dial(FRONTEND, "bad_request");
            info!(target: "audit", frontend = FRONTEND, %client, %address, result = "bad_request", reason, "dial refused");
            let _ = out.send(answer(Err(reason)), config).await;
            return;
        }
    };

    // While the edge dials, keep reading: DIAL_CLS (or the client leaving) drops the dial,
    // which resets its edge stream; the edge then closes any socket that connects late.
    let dialed = tokio::select! {
        biased;
        d = dial(shared, FRONTEND, &target, client) => d,
        m = incoming.message() => match m {
            Ok(Some(Packet::CloseDial { random: r })) if r == random => {
                shared.metrics.dial(FRONTEND, "client_cancelled");
                info!(target: "audit", frontend = FRONTEND, %client, dest = %target, result = "client_cancelled", duration_ms = started.elapsed().as_millis() as u64, "dial cancelled by DIAL_CLS");
                return;
            }
            Ok(Some(other)) => {
                let reason = format!("unexpected {} while dial {random} is pending", other.type_name());
                return refuse_stream(out, shared, client, reason);
            }
            Err(status) if is_protocol_error(&status) => {
                return refuse_stream(out, shared, client, status.message().into());
            }
            Ok(None) | Err(_) => {
                shared.metrics.dial(FRONTEND, "client_cancelled");
                info!(target: "audit", frontend = FRONTEND, %client, dest = %target, result = "client_cancelled", "client left during dial");
                return;
            }
        },
    };
    let dialed = match dialed {
        Ok(d) => d,
        Err(error) => {
            info!(target: "audit", frontend = FRONTEND, %client, dest = %target, result = error.failure.label(), reason = error.reason, duration_ms = started.elapsed().as_millis() as u64, "dial refused");
            let _ = out.send(answer(Err(error.reason)), config).await;
            return;
        }
    };
    let node = dialed.session.node().clone();
    if out.send(answer(Ok(connect_id)), config).await.is_err() {
        return;
    }

    let open = shared.metrics.stream_open(FRONTEND);
    let OpenStream {
        send,
        recv,
        slot,
        meter,
        // Konnectivity streams stay on their session: its DATA packets are not a socket
        // the lane's pipe could read (docs/ARCHITECTURE.md, "Lanes").
        lane: _,
    } = dialed.stream;
    let mut up_bytes = 0u64;
    let mut down_bytes = 0u64;
    let ended = bridge(
        &mut incoming,
        (send, recv),
        out,
        connect_id,
        config,
        (&mut up_bytes, &mut down_bytes),
        &meter,
    )
    .await;
    drop(open);
    drop(slot);
    let result = match &ended {
        Ended::CloseRequested => "ok: CLOSE_REQ".to_string(),
        Ended::TargetClosed => "ok: target closed".to_string(),
        Ended::Protocol(reason) => format!("protocol error: {reason}"),
        Ended::ClientGone(reason) => format!("client gone: {reason}"),
        Ended::Failed(error) => error.to_string(),
    };
    match ended {
        Ended::CloseRequested | Ended::TargetClosed => {
            let close = Packet::CloseResponse {
                connect_id,
                error: None,
            };
            let _ = out.send(close, config).await;
        }
        Ended::Failed(error) => {
            let close = Packet::CloseResponse {
                connect_id,
                error: Some(error.to_string()),
            };
            let _ = out.send(close, config).await;
        }
        Ended::Protocol(reason) => out.fail(Status::invalid_argument(reason)),
        Ended::ClientGone(_) => {}
    }
    info!(
        target: "audit",
        frontend = FRONTEND,
        %client,
        dest = %target,
        %node,
        connect_id,
        result,
        bytes_to_edge = up_bytes,
        bytes_from_edge = down_bytes,
        duration_ms = started.elapsed().as_millis() as u64,
        "stream closed"
    );
}

/// End a stream that broke the protocol before its connection existed.
fn refuse_stream(out: &Outbox, shared: &Shared, client: &str, reason: String) {
    shared.metrics.dial(FRONTEND, "bad_request");
    info!(target: "audit", frontend = FRONTEND, %client, result = "bad_request", reason, "stream refused");
    out.fail(Status::invalid_argument(reason));
}

/// Whether a receive error is the client's fault (a packet our codec refused, or one over
/// the size limit) rather than the stream breaking (reset, connection lost).
fn is_protocol_error(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    )
}

/// Carry DATA both ways until either side ends. Konnectivity has no half-close, so the first
/// end of either direction ends the connection. Bytes are added to `meter` as they move.
async fn bridge(
    incoming: &mut Streaming<Packet>,
    (mut send, recv): (StreamSend, StreamRecv),
    out: &Outbox,
    connect_id: i64,
    config: PipeConfig,
    (up_bytes, down_bytes): (&mut u64, &mut u64),
    meter: &StreamMeter,
) -> Ended {
    let up = client_to_edge(incoming, &mut send, connect_id, config, (up_bytes, meter));
    let down = edge_to_client(recv, out, connect_id, config, (down_bytes, meter));
    let ended = tokio::select! {
        e = up => e,
        e = down => e,
    };
    match &ended {
        // Let the target see an orderly EOF after everything the client sent.
        Ended::CloseRequested => {
            let _ = send.finish();
        }
        // The target ended its side: ours ends with the connection (a reset when dropped).
        Ended::TargetClosed => {}
        _ => send.reset(),
    }
    ended
}

async fn client_to_edge(
    incoming: &mut Streaming<Packet>,
    send: &mut StreamSend,
    connect_id: i64,
    config: PipeConfig,
    (total, meter): (&mut u64, &StreamMeter),
) -> Ended {
    loop {
        let packet = match incoming.message().await {
            Ok(Some(p)) => p,
            Ok(None) => return Ended::ClientGone("stream ended without CLOSE_REQ".into()),
            Err(status) if is_protocol_error(&status) => {
                return Ended::Protocol(status.message().into())
            }
            Err(status) => return Ended::ClientGone(status.message().into()),
        };
        match packet {
            Packet::Data {
                connect_id: id,
                data,
                ..
            } if id == connect_id => {
                let n = data.len() as u64;
                if data.is_empty() {
                    continue;
                }
                if let Err(error) = send.send_all(data, config).await {
                    return Ended::Failed(error);
                }
                *total += n;
                meter.add_to_edge(n);
            }
            Packet::CloseRequest { connect_id: id } if id == connect_id => {
                return Ended::CloseRequested
            }
            Packet::Data { connect_id: id, .. } | Packet::CloseRequest { connect_id: id } => {
                return Ended::Protocol(format!(
                    "unknown connectID {id} (this stream's is {connect_id})"
                ))
            }
            other => {
                return Ended::Protocol(format!(
                    "unexpected {} on an established connection",
                    other.type_name()
                ))
            }
        }
    }
}

async fn edge_to_client(
    mut recv: StreamRecv,
    out: &Outbox,
    connect_id: i64,
    config: PipeConfig,
    (total, meter): (&mut u64, &StreamMeter),
) -> Ended {
    loop {
        let mut chunk = match recv.data().await {
            None => return Ended::TargetClosed,
            // After a reset `data()` keeps failing: end here, never loop on it.
            Some(Err(e)) => return Ended::Failed(e),
            Some(Ok(chunk)) => chunk,
        };
        let n = chunk.len();
        while !chunk.is_empty() {
            let data = chunk.split_to(chunk.len().min(MAX_DATA_OUT));
            let packet = Packet::Data {
                connect_id,
                data,
                error: None,
            };
            if let Err(error) = out.send(packet, config).await {
                return Ended::Failed(error);
            }
        }
        *total += n as u64;
        meter.add_from_edge(n as u64);
        // The bytes are in the client's outbox (bounded): the edge may send more.
        if let Err(e) = recv.release(n) {
            return Ended::Failed(e);
        }
    }
}
