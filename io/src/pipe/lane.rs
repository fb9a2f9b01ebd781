//! Moving a stream to its session's lane while it runs. A lane is a second connection
//! between the same edge and server that runs on other threads at both ends: a stream that
//! has shown itself to be bulk moves there, so the session's own connection and threads
//! stay free for the small exchanges (docs/ARCHITECTURE.md, "Lanes").
//!
//! The move keeps every byte in order without stopping either direction:
//! - the server opens a *lane stream* naming the stream; the edge answers it 200 once it has
//!   handed the lane stream's halves to the stream's pipe;
//! - each end then ends its sending direction on the old stream with a trailer
//!   ([`protocol::stream::MOVED_TRAILER`]) instead of END_STREAM, after its last byte there,
//!   and sends the rest on the lane stream;
//! - each end reads the old stream to its end; a MOVED trailer there says the rest comes on
//!   the lane stream, read from then on. A direction that had already ended on the old
//!   stream ends the lane stream's at once, and nothing is read from it.
//!
//! Only the server decides to move (it sees both directions' rates); the edge's side is
//! [`Lane::Offered`], its lane stream handed to the pipe by whoever accepts it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{StreamRecv, StreamSend};

/// A stream that moves more than this many bytes (both directions together) within
/// [`BULK_WINDOW`] is bulk and moves to its lane. What a stream costs its session's thread
/// grows with its bytes: at the server's ~0.65 ms of CPU per MB (docs/BENCHMARKS.md), 8 MiB/s
/// is ~0.5 % of a core, so a stream below it cannot crowd the small exchanges out. An
/// interactive `kubectl exec`, an API call or a health check moves a few KiB per second;
/// a synthetic request loop of 2 000 small exchanges per second on one connection moved
/// ~1.8 MB/s in `tunnel-loadtest hol` and must stay (a 1 MiB bound moved it, and then the
/// small requests shared the lane with the bulk stream). `kubectl cp` or a log download
/// passes 8 MiB within a second at any rate that matters. A stream moved by mistake costs
/// one lane stream (a round trip during which it keeps flowing on the session).
pub const BULK_BYTES: u64 = 8 << 20;
/// The window [`BULK_BYTES`] is counted over.
pub const BULK_WINDOW: Duration = Duration::from_secs(1);

/// The lane stream's halves, in the pipe's roles: `send` carries what the old stream's send
/// half carried, `recv` what its receive half did.
pub struct Moved {
    /// The lane stream's sending half.
    pub send: StreamSend,
    /// The lane stream's receiving half.
    pub recv: StreamRecv,
}

/// Opens a lane stream and resolves with its halves once the far end agreed (`None`: the
/// stream stays where it is).
pub type OpenLane = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = Option<Moved>> + Send>> + Send>;

/// How one pipe may move to a lane.
pub enum Lane {
    /// This end moves the stream once it has moved [`BULK_BYTES`] within [`BULK_WINDOW`].
    Open(OpenLane),
    /// The far end moves it: its lane stream's halves are handed to the pipe through the
    /// [`Handoff`] made with these [`Takers`] ([`handoff`]).
    Offered(Takers),
}

/// Counts a pipe's bytes against [`BULK_BYTES`] per [`BULK_WINDOW`]; once they pass it, opens
/// the lane stream on a task of its own and hands it to the pipe. No future waits for it
/// inside the pipe: every pipe carries this, idle ones too (memory per idle tunnel).
/// Atomics and a lock taken once, so the pipe's future stays `Send`.
pub(super) struct BulkWatch {
    started: Instant,
    window_start_ms: AtomicU64,
    bytes: AtomicU64,
    fired: AtomicBool,
    open: std::sync::Mutex<Option<(OpenLane, Handoff)>>,
}

impl BulkWatch {
    pub(super) fn new(open: OpenLane, handoff: Handoff) -> BulkWatch {
        BulkWatch {
            started: Instant::now(),
            window_start_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            fired: AtomicBool::new(false),
            open: std::sync::Mutex::new(Some((open, handoff))),
        }
    }

    /// `n` more bytes moved, in either direction.
    pub(super) fn add(&self, n: u64) {
        if self.fired.load(Ordering::Relaxed) {
            return;
        }
        let now = self.started.elapsed().as_millis() as u64;
        let start = self.window_start_ms.load(Ordering::Relaxed);
        let total = if now.saturating_sub(start) > BULK_WINDOW.as_millis() as u64 {
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.bytes.store(n, Ordering::Relaxed);
            n
        } else {
            self.bytes.fetch_add(n, Ordering::Relaxed) + n
        };
        if total >= BULK_BYTES {
            self.fired.store(true, Ordering::Relaxed);
            self.fire();
        }
    }

    /// Open the lane stream beside the pipe, which keeps flowing on the session meanwhile.
    fn fire(&self) {
        let taken = self.open.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((open, handoff)) = taken {
            tokio::spawn(async move {
                if let Some(moved) = open().await {
                    handoff.deliver(moved);
                }
            });
        }
    }
}

/// Where each half of a lane stream goes to the pipe direction that uses it.
pub struct Handoff {
    send: oneshot::Sender<StreamSend>,
    recv: oneshot::Sender<StreamRecv>,
}

/// The receiving ends of a [`Handoff`], one per pipe direction.
pub struct Takers {
    pub(super) send: oneshot::Receiver<StreamSend>,
    pub(super) recv: oneshot::Receiver<StreamRecv>,
}

/// A handoff and its takers: the takers go to the pipe ([`Lane::Offered`]), the handoff to
/// whoever receives the lane stream.
pub fn handoff() -> (Handoff, Takers) {
    let (send_tx, send_rx) = oneshot::channel();
    let (recv_tx, recv_rx) = oneshot::channel();
    (
        Handoff {
            send: send_tx,
            recv: recv_tx,
        },
        Takers {
            send: send_rx,
            recv: recv_rx,
        },
    )
}

impl Handoff {
    /// Give each pipe direction its half of the lane stream. A sending direction that has
    /// already ended on the old stream ends the lane stream's at once: the far end may be
    /// sending on the lane stream, which a reset would cut (if that direction failed, the
    /// old stream's reset fails the far end anyway). A receiving direction that has ended
    /// never reads the lane stream: its half is dropped.
    pub fn deliver(self, moved: Moved) {
        if let Err(mut send) = self.send.send(moved.send) {
            let _ = send.finish();
        }
        let _ = self.recv.send(moved.recv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watch whose opener counts its calls and declines (the stream stays).
    fn watch(opened: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> BulkWatch {
        let opened = opened.clone();
        let open: OpenLane = Box::new(move || {
            opened.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { None })
        });
        BulkWatch::new(open, handoff().0)
    }

    #[tokio::test(start_paused = true)]
    async fn bulk_opens_the_lane_once_the_bytes_within_one_window_pass_the_bound() {
        let opened = std::sync::Arc::default();
        let watch = watch(&opened);
        watch.add(BULK_BYTES / 2);
        watch.add(BULK_BYTES / 2 - 1);
        assert!(!watch.fired.load(Ordering::Relaxed));
        watch.add(1);
        assert!(watch.fired.load(Ordering::Relaxed));
        watch.add(BULK_BYTES);
        tokio::task::yield_now().await;
        assert_eq!(opened.load(Ordering::Relaxed), 1, "opened once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_stream_never_counts_as_bulk() {
        let opened = std::sync::Arc::default();
        let watch = watch(&opened);
        // 3/4 of the bound per window, for ten windows: never the bound within one.
        for _ in 0..10 {
            watch.add(BULK_BYTES / 4 * 3);
            tokio::time::advance(BULK_WINDOW + Duration::from_millis(2)).await;
        }
        assert!(!watch.fired.load(Ordering::Relaxed));
        tokio::task::yield_now().await;
        assert_eq!(opened.load(Ordering::Relaxed), 0);
    }
}
