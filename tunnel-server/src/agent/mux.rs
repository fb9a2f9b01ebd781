//! The multiplexer of one agent stream. A Konnectivity agent carries every connection on one
//! gRPC stream, so this owns the dial IDs and connect IDs, turns the agent's packets into
//! per-connection events, and queues packets to the agent.
//!
//! The rules it exists for: no byte the agent sent is ever dropped from a live connection,
//! and memory stays bounded, although the protocol has no per-connection flow control.
//! Bytes wait in a per-connection backlog (`backlog.rs`) of at most `buffer_limit`; DATA
//! for a full backlog is held by the reader, which then reads nothing more from the agent
//! until that connection's frontend takes bytes ([`Mux::deliver`]). That pauses the agent's
//! whole stream (HTTP/2 flow control then stops the agent), as konnectivity-server does: the
//! other connections of that agent wait too, those of other agents never. A connection whose
//! frontend takes nothing for `write_timeout` while the stream waits on it is reset alone
//! (CLOSE_REQ to the agent), and the stream resumes. No sockets and no HTTP/2 here:
//! `conn.rs` moves the bytes, `edge/session.rs` feeds packets in, `endpoint.rs` sends the queues.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use protocol::konnectivity::{DialResponse, Packet};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

use super::backlog::Backlog;
use crate::frontend::konnectivity::PacketStream;

/// Packets queued in order towards the agent (DATA, and the CLOSE_REQ that must follow a
/// connection's last DATA). Bounded: when the agent reads slowly, senders wait here.
const ORDERED_QUEUE: usize = 16;

/// What happened to a connection on the agent's side.
#[derive(Debug)]
pub(super) enum Event {
    /// Bytes from the target.
    Data(Bytes),
    /// The agent closed the connection (CLOSE_RSP, or its own CLOSE_REQ); an error text if it
    /// failed.
    Closed(Option<String>),
    /// The server dropped the connection (its frontend stalled, agent gone).
    Reset(String),
}

/// A dial the agent accepted.
pub(super) struct Opened {
    /// The agent's connect ID.
    pub connect_id: i64,
    /// The connection's events, in the order the agent sent them.
    pub events: mpsc::UnboundedReceiver<Event>,
    /// Bytes queued in `events` and not yet taken by the frontend side; the taker reports
    /// what it takes ([`Backlog::took`]).
    pub backlog: Arc<Backlog>,
}

/// The agent's answer to a dial: the connection, or its error text.
pub(super) type DialAnswer = Result<Opened, String>;

/// What the reader of the agent's stream must do after a packet.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Dispatch {
    /// Nothing more.
    Continue,
    /// The agent sent DRAIN: route no new dial to it.
    Drain,
    /// DATA for a connection whose backlog is full: pass it to [`Mux::deliver`] before
    /// reading the agent's next packet.
    Full(Held),
}

/// DATA the reader holds until its connection's backlog has room.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Held {
    connect_id: i64,
    data: Bytes,
}

/// The receiving ends of the queues towards the agent; see [`outbound`].
pub(super) struct Queues {
    control: mpsc::UnboundedReceiver<Packet>,
    ordered: mpsc::Receiver<Packet>,
}

/// One agent stream's connections and queues.
pub(super) struct Mux {
    state: Mutex<State>,
    /// DIAL_REQ, DIAL_CLS, CLOSE_RSP, DRAIN and resets: at most a few per connection, so
    /// unbounded is bounded by the connection limit. Sent before `ordered` packets.
    control: mpsc::UnboundedSender<Packet>,
    ordered: mpsc::Sender<Packet>,
    closed: CancellationToken,
    buffer_limit: usize,
    write_timeout: Duration,
    stalled_resets: Counter,
}

#[derive(Default)]
struct State {
    /// Dial ID → who waits for the DIAL_RSP.
    pending: HashMap<i64, oneshot::Sender<DialAnswer>>,
    /// Connect ID → the connection's event queue.
    conns: HashMap<i64, ConnQueue>,
}

struct ConnQueue {
    events: mpsc::UnboundedSender<Event>,
    backlog: Arc<Backlog>,
}

impl Mux {
    /// A multiplexer buffering up to `buffer_limit` bytes per connection, resetting a
    /// connection whose frontend takes nothing for `write_timeout` while the agent's stream
    /// waits on it (counted in `stalled_resets`), and failing a send the agent does not take
    /// within `write_timeout`.
    pub fn new(
        buffer_limit: usize,
        write_timeout: Duration,
        stalled_resets: Counter,
    ) -> (Arc<Mux>, Queues) {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (ordered, ordered_rx) = mpsc::channel(ORDERED_QUEUE);
        let mux = Mux {
            state: Mutex::new(State::default()),
            control,
            ordered,
            closed: CancellationToken::new(),
            buffer_limit,
            write_timeout,
            stalled_resets,
        };
        let queues = Queues {
            control: control_rx,
            ordered: ordered_rx,
        };
        (Arc::new(mux), queues)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a packet ahead of the ordered ones.
    pub fn control(&self, packet: Packet) {
        let _ = self.control.send(packet);
    }

    /// Queue a packet after every ordered one before it, waiting up to `write_timeout` for
    /// the agent to take packets.
    pub async fn send_ordered(&self, packet: Packet) -> Result<(), String> {
        tokio::select! {
            biased;
            _ = self.closed.cancelled() => Err("agent disconnected".into()),
            sent = tokio::time::timeout(self.write_timeout, self.ordered.send(packet)) => match sent {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err("agent disconnected".into()),
                Err(_) => Err(format!("agent took no packet for {:?}", self.write_timeout)),
            },
        }
    }

    /// A fresh dial ID (non-zero, not pending) and where its answer will arrive.
    pub fn begin_dial(&self) -> Result<(i64, oneshot::Receiver<DialAnswer>), String> {
        if self.closed.is_cancelled() {
            return Err("agent disconnected".into());
        }
        let mut state = self.state();
        let random = loop {
            let r = rand::random::<i64>();
            if r != 0 && !state.pending.contains_key(&r) {
                break r;
            }
        };
        let (tx, rx) = oneshot::channel();
        state.pending.insert(random, tx);
        Ok((random, rx))
    }

    /// The frontend gave up on dial `random`: tell the agent (DIAL_CLS), and close the
    /// connection if its DIAL_RSP won the race.
    pub fn cancel_dial(&self, random: i64, mut answer: oneshot::Receiver<DialAnswer>) {
        if self.state().pending.remove(&random).is_some() {
            self.control(Packet::CloseDial { random });
        } else if let Ok(Ok(opened)) = answer.try_recv() {
            self.forget(opened.connect_id);
            self.control(Packet::CloseRequest {
                connect_id: opened.connect_id,
            });
        }
    }

    /// Stop routing the agent's packets for `connect_id` to anyone.
    pub fn forget(&self, connect_id: i64) {
        self.state().conns.remove(&connect_id);
    }

    /// Apply one packet from the agent. Never waits: DATA that does not fit comes back as
    /// [`Dispatch::Full`].
    pub fn dispatch(&self, packet: Packet) -> Dispatch {
        match packet {
            Packet::DialResponse(DialResponse { random, result }) => {
                self.dial_answered(random, result)
            }
            Packet::Data {
                connect_id, data, ..
            } => return self.data(connect_id, data),
            Packet::CloseResponse { connect_id, error } => {
                match self.state().conns.remove(&connect_id) {
                    Some(conn) => {
                        let _ = conn.events.send(Event::Closed(error));
                    }
                    // The answer to a CLOSE_REQ of a connection that is already gone.
                    None => debug!(connect_id, "CLOSE_RSP for no open connection"),
                }
            }
            Packet::CloseRequest { connect_id } => {
                if let Some(conn) = self.state().conns.remove(&connect_id) {
                    let _ = conn.events.send(Event::Closed(None));
                }
                self.control(Packet::CloseResponse {
                    connect_id,
                    error: None,
                });
            }
            Packet::Drain => return Dispatch::Drain,
            // Agents never dial through the server; ignore rather than drop every connection.
            other @ (Packet::DialRequest(_) | Packet::CloseDial { .. }) => {
                warn!(
                    packet = other.type_name(),
                    "agent sent a packet only frontends send; ignored"
                )
            }
        }
        Dispatch::Continue
    }

    fn dial_answered(&self, random: i64, result: Result<i64, String>) {
        let mut state = self.state();
        let waiter = state.pending.remove(&random);
        match (waiter, result) {
            (Some(waiter), Err(text)) => {
                let _ = waiter.send(Err(text));
            }
            (Some(waiter), Ok(connect_id)) if state.conns.contains_key(&connect_id) => {
                warn!(
                    connect_id,
                    "agent answered a dial with a connectID already in use"
                );
                let _ = waiter.send(Err(format!("agent reused connectID {connect_id}")));
            }
            (Some(waiter), Ok(connect_id)) => {
                let (events, events_rx) = mpsc::unbounded_channel();
                let backlog = Arc::new(Backlog::default());
                state.conns.insert(
                    connect_id,
                    ConnQueue {
                        events,
                        backlog: backlog.clone(),
                    },
                );
                let opened = Opened {
                    connect_id,
                    events: events_rx,
                    backlog,
                };
                if waiter.send(Ok(opened)).is_err() {
                    // The frontend left between our check and now.
                    state.conns.remove(&connect_id);
                    self.control(Packet::CloseRequest { connect_id });
                }
            }
            // A late answer to a dial that was cancelled or timed out: close what it opened.
            (None, Ok(connect_id)) if !state.conns.contains_key(&connect_id) => {
                debug!(random, connect_id, "late DIAL_RSP; closing its connection");
                self.control(Packet::CloseRequest { connect_id });
            }
            (None, _) => debug!(random, "DIAL_RSP for no pending dial"),
        }
    }

    fn data(&self, connect_id: i64, data: Bytes) -> Dispatch {
        if data.is_empty() {
            return Dispatch::Continue;
        }
        let mut state = self.state();
        let Some(conn) = state.conns.get(&connect_id) else {
            // Sent before the agent saw our CLOSE_REQ; nobody wants it.
            debug!(connect_id, "DATA for no open connection");
            return Dispatch::Continue;
        };
        if !conn.backlog.fits(data.len(), self.buffer_limit) {
            return Dispatch::Full(Held { connect_id, data });
        }
        self.queue(&mut state, connect_id, data);
        Dispatch::Continue
    }

    /// Queue `data` for `connect_id`, which is open and has room.
    fn queue(&self, state: &mut State, connect_id: i64, data: Bytes) {
        let Some(conn) = state.conns.get(&connect_id) else {
            return;
        };
        conn.backlog.add(data.len());
        if conn.events.send(Event::Data(data)).is_err() {
            // The connection's task is gone: close the agent's side.
            state.conns.remove(&connect_id);
            self.control(Packet::CloseRequest { connect_id });
        }
    }

    /// Queue `held` once its connection's backlog has room, waiting as long as the
    /// connection's frontend keeps taking bytes; the reader of the agent's stream (and so
    /// every other connection of the agent) waits here meanwhile. A frontend that takes
    /// nothing for `write_timeout` gets its connection reset and `held` is dropped with it;
    /// so is `held` when its connection ends while we wait.
    pub async fn deliver(&self, held: Held) {
        let Held { connect_id, data } = held;
        let started = Instant::now();
        let mut deadline = started + self.write_timeout;
        let mut seen = usize::MAX;
        loop {
            let (backlog, events) = {
                let mut state = self.state();
                let Some(conn) = state.conns.get(&connect_id) else {
                    return self.ended_while_held(connect_id, started);
                };
                if conn.backlog.fits(data.len(), self.buffer_limit) {
                    self.queue(&mut state, connect_id, data);
                    return;
                }
                // Any byte taken is progress and restarts the clock.
                let buffered = conn.backlog.buffered();
                if buffered < seen {
                    seen = buffered;
                    deadline = Instant::now() + self.write_timeout;
                }
                (conn.backlog.clone(), conn.events.clone())
            };
            tokio::select! {
                biased;
                _ = self.closed.cancelled() => return,
                _ = backlog.taken() => {}
                _ = events.closed() => return self.ended_while_held(connect_id, started),
                _ = tokio::time::sleep_until(deadline) => return self.reset_stalled(connect_id, started),
            }
        }
    }

    /// The frontend took nothing for `write_timeout` while the agent's stream waited on
    /// this connection: reset it alone, so the stream resumes.
    fn reset_stalled(&self, connect_id: i64, waiting_since: Instant) {
        let Some(conn) = self.state().conns.remove(&connect_id) else {
            return;
        };
        self.stalled_resets.inc();
        warn!(
            connect_id,
            buffered = conn.backlog.buffered(),
            waited = ?waiting_since.elapsed(),
            "agent connection reset: its frontend took no bytes for {:?} while the agent's stream waited on it",
            self.write_timeout
        );
        conn.backlog.reset();
        let _ = conn.events.send(Event::Reset(format!(
            "frontend took no bytes for {:?} while the agent's stream waited on it",
            self.write_timeout
        )));
        self.control(Packet::CloseRequest { connect_id });
    }

    /// The connection the agent's stream waited on ended meanwhile (its frontend stalled
    /// and was reset, or went away): its held bytes have nowhere to go.
    fn ended_while_held(&self, connect_id: i64, waiting_since: Instant) {
        if self.closed.is_cancelled() {
            return;
        }
        // Later DATA for it is dropped, not waited on again. Its task sends the CLOSE_REQ.
        self.state().conns.remove(&connect_id);
        self.stalled_resets.inc();
        info!(
            connect_id,
            waited = ?waiting_since.elapsed(),
            "agent stream resumes: the connection it waited on was reset"
        );
    }

    /// The agent's stream is gone: fail pending dials and reset every connection.
    pub fn shutdown(&self, reason: &str) {
        self.closed.cancel();
        let (pending, conns) = {
            let mut state = self.state();
            (
                std::mem::take(&mut state.pending),
                std::mem::take(&mut state.conns),
            )
        };
        for (_, waiter) in pending {
            let _ = waiter.send(Err(reason.to_string()));
        }
        for (_, conn) in conns {
            let _ = conn.events.send(Event::Reset(reason.to_string()));
        }
    }

    /// Connections open now (for tests and logs).
    pub fn open_connections(&self) -> usize {
        self.state().conns.len()
    }
}

/// The response stream of an agent's `Connect` call: control packets first, then ordered
/// ones, until `end` fires (`Some(status)`: end with that error at once; `None` or dropped:
/// end OK once the packets already queued are out, such as the DRAIN of an agent that was
/// idle when the server drained).
pub(super) fn outbound(queues: Queues, mut end: oneshot::Receiver<Option<Status>>) -> PacketStream {
    let Queues {
        mut control,
        mut ordered,
    } = queues;
    let (mut done, mut finishing) = (false, false);
    Box::pin(futures_util::stream::poll_fn(move |cx| {
        if done {
            return Poll::Ready(None);
        }
        if !finishing {
            match Pin::new(&mut end).poll(cx) {
                Poll::Ready(Ok(Some(status))) => {
                    done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(_) => finishing = true,
                Poll::Pending => {}
            }
        }
        if let Poll::Ready(Some(packet)) = control.poll_recv(cx) {
            return Poll::Ready(Some(Ok(packet)));
        }
        if let Poll::Ready(Some(packet)) = ordered.poll_recv(cx) {
            return Poll::Ready(Some(Ok(packet)));
        }
        if finishing {
            done = true;
            return Poll::Ready(None);
        }
        // The mux (which holds both senders) outlives the stream's useful life; `end`
        // decides when it is over.
        Poll::Pending
    }))
}

#[cfg(test)]
mod tests;
