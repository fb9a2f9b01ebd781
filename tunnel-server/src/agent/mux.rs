//! The multiplexer of one agent stream. A Konnectivity agent carries every connection on one
//! gRPC stream, so this owns the dial IDs and connect IDs, turns the agent's packets into
//! per-connection events, and queues packets to the agent. The rule it exists for: reading
//! the agent's stream never waits on any one connection. Bytes wait in a per-connection
//! buffer; a connection whose frontend falls more than `buffer_limit` bytes behind is reset
//! alone (CLOSE_REQ to the agent). No sockets and no HTTP/2 here: `conn.rs` moves the bytes,
//! `endpoint.rs` feeds packets in and sends the queues out.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use protocol::konnectivity::{DialResponse, Packet};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, warn};

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
    /// The server dropped the connection (buffer bound exceeded, agent gone).
    Reset(String),
}

/// A dial the agent accepted.
pub(super) struct Opened {
    /// The agent's connect ID.
    pub connect_id: i64,
    /// The connection's events, in the order the agent sent them.
    pub events: mpsc::UnboundedReceiver<Event>,
    /// Bytes queued in `events` and not yet taken by the frontend side; the taker subtracts.
    pub buffered: Arc<AtomicUsize>,
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
    overflow_resets: Counter,
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
    buffered: Arc<AtomicUsize>,
}

impl Mux {
    /// A multiplexer resetting connections that lag more than `buffer_limit` bytes, and
    /// failing a send the agent does not take within `write_timeout`.
    pub fn new(
        buffer_limit: usize,
        write_timeout: Duration,
        overflow_resets: Counter,
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
            overflow_resets,
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

    /// Apply one packet from the agent. Never waits.
    pub fn dispatch(&self, packet: Packet) -> Dispatch {
        match packet {
            Packet::DialResponse(DialResponse { random, result }) => {
                self.dial_answered(random, result)
            }
            Packet::Data {
                connect_id, data, ..
            } => self.data(connect_id, data),
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
                let buffered = Arc::new(AtomicUsize::new(0));
                state.conns.insert(
                    connect_id,
                    ConnQueue {
                        events,
                        buffered: buffered.clone(),
                    },
                );
                let opened = Opened {
                    connect_id,
                    events: events_rx,
                    buffered,
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

    fn data(&self, connect_id: i64, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let mut state = self.state();
        let Some(conn) = state.conns.get(&connect_id) else {
            // Sent before the agent saw our CLOSE_REQ; nobody wants it.
            debug!(connect_id, "DATA for no open connection");
            return;
        };
        let len = data.len();
        let before = conn.buffered.load(Ordering::Acquire);
        // An empty buffer always takes one packet, so a packet larger than the bound still
        // gets through to a reader that keeps up.
        let overflow = before > 0 && before + len > self.buffer_limit;
        if !overflow {
            conn.buffered.fetch_add(len, Ordering::AcqRel);
            if conn.events.send(Event::Data(data)).is_ok() {
                return;
            }
        }
        let Some(conn) = state.conns.remove(&connect_id) else {
            return;
        };
        if overflow {
            self.overflow_resets.inc();
            warn!(
                connect_id,
                buffered = before,
                limit = self.buffer_limit,
                "agent connection reset: its frontend reads too slowly"
            );
            let _ = conn.events.send(Event::Reset(format!(
                "frontend fell more than {} bytes behind the agent",
                self.buffer_limit
            )));
        }
        self.control(Packet::CloseRequest { connect_id });
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
/// ones, until `end` fires (`Some(status)`: end with that error; `None` or dropped: end OK).
pub(super) fn outbound(queues: Queues, mut end: oneshot::Receiver<Option<Status>>) -> PacketStream {
    let Queues {
        mut control,
        mut ordered,
    } = queues;
    let mut done = false;
    Box::pin(futures_util::stream::poll_fn(move |cx| {
        if done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut end).poll(cx) {
            Poll::Ready(Ok(Some(status))) => {
                done = true;
                return Poll::Ready(Some(Err(status)));
            }
            Poll::Ready(_) => {
                done = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if let Poll::Ready(Some(packet)) = control.poll_recv(cx) {
            return Poll::Ready(Some(Ok(packet)));
        }
        if let Poll::Ready(Some(packet)) = ordered.poll_recv(cx) {
            return Poll::Ready(Some(Ok(packet)));
        }
        // The mux (which holds both senders) outlives the stream's useful life; `end`
        // decides when it is over.
        Poll::Pending
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn mux(limit: usize) -> (Arc<Mux>, Queues) {
        Mux::new(limit, Duration::from_secs(1), Counter::default())
    }

    fn next_control(queues: &mut Queues) -> Option<Packet> {
        queues.control.try_recv().ok()
    }

    fn open(mux: &Mux, connect_id: i64) -> Opened {
        let (random, mut rx) = mux.begin_dial().unwrap();
        mux.dispatch(Packet::DialResponse(DialResponse {
            random,
            result: Ok(connect_id),
        }));
        rx.try_recv().unwrap().unwrap()
    }

    #[test]
    fn data_goes_to_its_connection_in_order() {
        let (mux, _queues) = mux(1 << 20);
        let mut a = open(&mux, 1);
        let mut b = open(&mux, 2);
        for (id, text) in [(1, "a1"), (2, "b1"), (1, "a2")] {
            mux.dispatch(Packet::Data {
                connect_id: id,
                data: Bytes::from(text),
                error: None,
            });
        }
        let text = |e: Event| match e {
            Event::Data(d) => String::from_utf8(d.to_vec()).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(text(a.events.try_recv().unwrap()), "a1");
        assert_eq!(text(a.events.try_recv().unwrap()), "a2");
        assert_eq!(text(b.events.try_recv().unwrap()), "b1");
        assert_eq!(a.buffered.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_lagging_connection_is_reset_alone() {
        let (mux, mut queues) = mux(10);
        let mut slow = open(&mux, 1);
        let mut other = open(&mux, 2);
        let packet = |id| Packet::Data {
            connect_id: id,
            data: Bytes::from_static(b"123456"),
            error: None,
        };
        // The first packet always fits; the second would exceed the 10-byte bound.
        mux.dispatch(packet(1));
        mux.dispatch(packet(1));
        assert!(matches!(slow.events.try_recv(), Ok(Event::Data(_))));
        assert!(matches!(slow.events.try_recv(), Ok(Event::Reset(_))));
        assert_eq!(
            next_control(&mut queues),
            Some(Packet::CloseRequest { connect_id: 1 })
        );
        assert_eq!(mux.overflow_resets.get(), 1);
        // Later DATA for the reset connection is dropped; the other one is unaffected.
        mux.dispatch(packet(1));
        mux.dispatch(packet(2));
        assert!(matches!(other.events.try_recv(), Ok(Event::Data(_))));
        assert_eq!(mux.open_connections(), 1);
    }

    #[test]
    fn a_reader_that_keeps_up_is_never_reset() {
        let (mux, _queues) = mux(10);
        let mut conn = open(&mux, 1);
        for _ in 0..100 {
            mux.dispatch(Packet::Data {
                connect_id: 1,
                data: Bytes::from_static(b"12345678"),
                error: None,
            });
            let Ok(Event::Data(d)) = conn.events.try_recv() else {
                panic!("reset")
            };
            conn.buffered.fetch_sub(d.len(), Ordering::AcqRel);
        }
    }

    #[test]
    fn late_dial_answer_closes_what_it_opened() {
        let (mux, mut queues) = mux(1 << 20);
        let (random, rx) = mux.begin_dial().unwrap();
        mux.cancel_dial(random, rx);
        assert_eq!(
            next_control(&mut queues),
            Some(Packet::CloseDial { random })
        );
        mux.dispatch(Packet::DialResponse(DialResponse {
            random,
            result: Ok(7),
        }));
        assert_eq!(
            next_control(&mut queues),
            Some(Packet::CloseRequest { connect_id: 7 })
        );
        assert_eq!(mux.open_connections(), 0);
    }

    #[test]
    fn agent_close_request_is_answered_and_ends_the_connection() {
        let (mux, mut queues) = mux(1 << 20);
        let mut conn = open(&mux, 3);
        mux.dispatch(Packet::CloseRequest { connect_id: 3 });
        assert!(matches!(conn.events.try_recv(), Ok(Event::Closed(None))));
        assert_eq!(
            next_control(&mut queues),
            Some(Packet::CloseResponse {
                connect_id: 3,
                error: None
            })
        );
    }

    #[test]
    fn shutdown_fails_pending_dials_and_resets_connections() {
        let (mux, _queues) = mux(1 << 20);
        let mut conn = open(&mux, 1);
        let (_, mut pending) = mux.begin_dial().unwrap();
        mux.shutdown("agent gone");
        assert!(matches!(pending.try_recv(), Ok(Err(e)) if e == "agent gone"));
        assert!(matches!(conn.events.try_recv(), Ok(Event::Reset(_))));
        assert!(mux.begin_dial().is_err());
    }

    #[tokio::test]
    async fn control_packets_overtake_ordered_ones_and_end_stops_the_stream() {
        let (mux, queues) = mux(1 << 20);
        let (end, end_rx) = oneshot::channel();
        let mut stream = outbound(queues, end_rx);
        mux.send_ordered(Packet::CloseRequest { connect_id: 1 })
            .await
            .unwrap();
        mux.control(Packet::Drain);
        assert_eq!(stream.next().await.unwrap().unwrap(), Packet::Drain);
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            Packet::CloseRequest { connect_id: 1 }
        );
        end.send(Some(Status::unavailable("bye"))).unwrap();
        assert_eq!(
            stream.next().await.unwrap().unwrap_err().code(),
            tonic::Code::Unavailable
        );
        assert!(stream.next().await.is_none());
    }
}
