//! One tunneled connection through an agent, seen from the edge side of the agent's
//! in-memory HTTP/2 session: a CONNECT stream opened by `EdgeSession::open` becomes a
//! DIAL_REQ, its answer a status (200, or 502/504 with the agent's error in `tether-reason`),
//! then DATA both ways and CLOSE_REQ/CLOSE_RSP. This side behaves like `tunnel-edge` does, so
//! the frontends and the dialer cannot tell the two kinds of node apart.
//!
//! Towards the agent, a connection sends only what h2 flow control lets the frontend give it,
//! through the mux's bounded queue; from the agent, it takes bytes from its backlog only as
//! fast as its frontend reads (`send_all` honours the stream window) and reports each take,
//! which is what lets the mux resume reading the agent's stream when the backlog was full.
//! Konnectivity has no half-close: the frontend's END_STREAM becomes CLOSE_REQ (after the
//! last DATA), the agent's CLOSE_RSP becomes END_STREAM.

use std::future::poll_fn;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{Request, Response, StatusCode};
use protocol::konnectivity::{DialRequest, Packet};
use protocol::stream::{sanitize_reason, CLIENT_HEADER, REASON_HEADER};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use tunnel_io::pipe::{send_all, PipeConfig};

use super::backlog::Backlog;
use super::mux::{Event, Mux, Opened};

/// Largest DATA payload sent to an agent: 64 KiB, so one connection's bulk upload delays
/// another connection's packets on the shared stream by little.
pub(super) const MAX_DATA_TO_AGENT: usize = 64 << 10;
/// Largest piece of the agent's bytes handed to the frontend before the take is reported:
/// 64 KiB, so a frontend that reads slowly but steadily shows progress within a large
/// packet (agents may send up to 4 MiB in one).
const TAKE_STEP: usize = 64 << 10;

/// How one side of a connection ended.
enum End {
    /// The agent closed it (CLOSE_RSP / CLOSE_REQ), with its error text if it failed.
    AgentClosed(Option<String>),
    /// The server dropped it on the agent side (frontend stalled, agent gone).
    Reset(String),
    /// The frontend closed its side (END_STREAM).
    FrontendClosed,
    /// The frontend reset or the in-memory stream failed.
    FrontendGone(String),
    /// Sending to the agent or to the frontend made no progress.
    Stalled(String),
}

impl End {
    /// One line for the log.
    fn describe(&self) -> String {
        match self {
            End::AgentClosed(None) => "agent closed".into(),
            End::AgentClosed(Some(error)) => format!("agent closed with error: {error}"),
            End::Reset(reason) => format!("reset: {reason}"),
            End::FrontendClosed => "frontend closed".into(),
            End::FrontendGone(reason) => format!("frontend gone: {reason}"),
            End::Stalled(reason) => format!("stalled: {reason}"),
        }
    }
}

/// Serve one CONNECT stream of the in-memory session until the connection is over.
pub(super) async fn serve(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    mux: Arc<Mux>,
    config: PipeConfig,
) {
    let Some(address) = request.uri().authority().map(|a| a.to_string()) else {
        answer_error(&mut respond, StatusCode::BAD_REQUEST, "no target");
        return;
    };
    let client = request
        .headers()
        .get(CLIENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    let body = request.into_body();
    let (random, mut answer) = match mux.begin_dial() {
        Ok(d) => d,
        Err(reason) => {
            answer_error(&mut respond, StatusCode::BAD_GATEWAY, &reason);
            return;
        }
    };
    mux.control(Packet::DialRequest(DialRequest {
        protocol: "tcp".into(),
        address: address.clone(),
        random,
    }));

    // The dialer gives up (timeout, client left) by resetting the stream: tell the agent.
    let answered = tokio::select! {
        biased;
        _ = poll_fn(|cx| respond.poll_reset(cx)) => None,
        a = &mut answer => Some(a.unwrap_or_else(|_| Err("agent disconnected".into()))),
    };
    let opened = match answered {
        None => {
            debug!(%address, random, "dial cancelled by the server side");
            mux.cancel_dial(random, answer);
            return;
        }
        Some(Err(text)) => {
            // The agent's own words (Go dial errors); a timeout keeps its 504.
            let status = if text.contains("timeout") || text.contains("timed out") {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            answer_error(&mut respond, status, &format!("agent: {text}"));
            return;
        }
        Some(Ok(opened)) => opened,
    };
    let connect_id = opened.connect_id;
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(_) => {
            mux.forget(connect_id);
            mux.control(Packet::CloseRequest { connect_id });
            return;
        }
    };
    let (up, down) = bridge(body, send, opened, &mux, config).await;
    debug!(%client, %address, connect_id, upload = up.describe(), download = down.describe(), "agent connection ended");
}

fn answer_error(respond: &mut SendResponse<Bytes>, status: StatusCode, reason: &str) {
    let response = Response::builder()
        .status(status)
        .header(REASON_HEADER, sanitize_reason(reason))
        .body(())
        .unwrap_or_else(|_| Response::new(()));
    let _ = respond.send_response(response, true);
}

/// Carry both directions until both ended; then make sure the agent closes its side.
async fn bridge(
    body: RecvStream,
    send: SendStream<Bytes>,
    opened: Opened,
    mux: &Mux,
    config: PipeConfig,
) -> (End, End) {
    let connect_id = opened.connect_id;
    let signals = Signals::default();
    let ends = tokio::join!(
        upload(body, mux, connect_id, &signals),
        download(send, opened, config, &signals),
    );
    if !signals.agent_done.is_cancelled() && !signals.close_sent.is_cancelled() {
        // After the last DATA, so the target gets every byte before its socket closes.
        if mux
            .send_ordered(Packet::CloseRequest { connect_id })
            .await
            .is_err()
        {
            mux.control(Packet::CloseRequest { connect_id });
        }
    }
    mux.forget(connect_id);
    if let (End::Reset(reason), _) | (_, End::Reset(reason)) = &ends {
        info!(connect_id, reason, "agent connection reset");
    }
    ends
}

/// What the two directions tell each other.
#[derive(Default)]
struct Signals {
    /// The agent's side is closed: send it nothing more.
    agent_done: CancellationToken,
    /// The frontend's side failed: stop delivering.
    frontend_gone: CancellationToken,
    /// CLOSE_REQ went to the agent: its CLOSE_RSP is due.
    close_sent: CancellationToken,
    /// Sending to the agent stalled: reset the frontend's stream.
    abort: CancellationToken,
}

/// Frontend → agent: request body chunks become DATA packets; END_STREAM becomes CLOSE_REQ.
async fn upload(mut body: RecvStream, mux: &Mux, connect_id: i64, signals: &Signals) -> End {
    loop {
        let Some(chunk) = body.data().await else {
            if signals.agent_done.is_cancelled() {
                return End::FrontendClosed;
            }
            return match mux.send_ordered(Packet::CloseRequest { connect_id }).await {
                Ok(()) => {
                    signals.close_sent.cancel();
                    End::FrontendClosed
                }
                Err(reason) => {
                    signals.abort.cancel();
                    End::Stalled(reason)
                }
            };
        };
        let mut chunk = match chunk {
            Ok(chunk) => chunk,
            // After a reset `data()` keeps failing: end here, never loop on it.
            Err(e) => {
                signals.frontend_gone.cancel();
                return End::FrontendGone(e.to_string());
            }
        };
        let n = chunk.len();
        // Once the agent has closed, what the frontend still sends has nowhere to go.
        while !chunk.is_empty() && !signals.agent_done.is_cancelled() {
            let data = chunk.split_to(chunk.len().min(MAX_DATA_TO_AGENT));
            let packet = Packet::Data {
                connect_id,
                data,
                error: None,
            };
            let sent = tokio::select! {
                biased;
                _ = signals.agent_done.cancelled() => Ok(()),
                r = mux.send_ordered(packet) => r,
            };
            if let Err(reason) = sent {
                signals.abort.cancel();
                return End::Stalled(reason);
            }
        }
        // The bytes are queued for the agent (bounded): the frontend may send more.
        if body.flow_control().release_capacity(n).is_err() {
            signals.frontend_gone.cancel();
            return End::FrontendGone("stream closed".into());
        }
    }
}

/// Agent → frontend: the connection's events become response DATA, END_STREAM or a reset.
async fn download(
    mut send: SendStream<Bytes>,
    opened: Opened,
    config: PipeConfig,
    signals: &Signals,
) -> End {
    let Opened {
        mut events,
        backlog,
        ..
    } = opened;
    let close_deadline = async {
        signals.close_sent.cancelled().await;
        tokio::time::sleep(config.write_timeout).await;
    };
    tokio::pin!(close_deadline);
    loop {
        let event = tokio::select! {
            biased;
            _ = signals.abort.cancelled() => {
                send.send_reset(Reason::CANCEL);
                return End::Stalled("agent stopped reading".into());
            }
            _ = signals.frontend_gone.cancelled() => {
                return End::FrontendGone("frontend reset".into());
            }
            r = poll_fn(|cx| send.poll_reset(cx)) => {
                signals.frontend_gone.cancel();
                return End::FrontendGone(match r {
                    Ok(reason) => format!("frontend reset ({reason})"),
                    Err(e) => e.to_string(),
                });
            }
            _ = &mut close_deadline => {
                send.send_reset(Reason::CANCEL);
                return End::Stalled(format!("no CLOSE_RSP within {:?}", config.write_timeout));
            }
            e = events.recv() => e,
        };
        match event {
            Some(Event::Data(data)) => {
                if let Err(end) = take(&mut send, data, &backlog, config).await {
                    send.send_reset(Reason::CANCEL);
                    match &end {
                        // The mux already told the agent (CLOSE_REQ).
                        End::Reset(_) => signals.agent_done.cancel(),
                        _ => signals.frontend_gone.cancel(),
                    }
                    return end;
                }
            }
            Some(Event::Closed(None)) => {
                signals.agent_done.cancel();
                let _ = send.send_data(Bytes::new(), true);
                return End::AgentClosed(None);
            }
            Some(Event::Closed(Some(error))) => {
                signals.agent_done.cancel();
                send.send_reset(Reason::CONNECT_ERROR);
                return End::AgentClosed(Some(error));
            }
            Some(Event::Reset(reason)) => {
                signals.agent_done.cancel();
                send.send_reset(Reason::CANCEL);
                return End::Reset(reason);
            }
            None => {
                signals.agent_done.cancel();
                send.send_reset(Reason::CANCEL);
                return End::Reset("agent disconnected".into());
            }
        }
    }
}

/// Hand `data` from the backlog to the frontend in pieces of at most [`TAKE_STEP`], reporting
/// each piece taken. Stops at once when the mux resets the connection.
async fn take(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    backlog: &Backlog,
    config: PipeConfig,
) -> Result<(), End> {
    while !data.is_empty() {
        let piece = data.split_to(data.len().min(TAKE_STEP));
        let n = piece.len();
        tokio::select! {
            biased;
            _ = backlog.was_reset() => {
                return Err(End::Reset("the frontend took no bytes while the agent's stream waited".into()));
            }
            sent = send_all(send, piece, config) => sent.map_err(|e| End::Stalled(e.to_string()))?,
        }
        backlog.took(n);
    }
    Ok(())
}
