//! Turns on the runtime for a session connection: its task gives way to the other tasks of
//! its thread after it has moved [`SESSION_TURN_BYTES`], as a pipe does every
//! [`crate::pipe::YIELD_EVERY`]. The HTTP/2 connection task of a session reads and writes
//! for every stream at once, and tokio's cooperative budget counts operations, not bytes: one
//! poll of it could encrypt or decrypt several MiB of a bulk stream (a full socket buffer)
//! while every small exchange on the same thread waited. [`Turns`] is the rule, without
//! I/O; [`TakeTurns`] applies it to an `AsyncRead + AsyncWrite` below h2. It never buffers,
//! reorders or drops bytes: it only returns `Pending` (having woken itself) between calls.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one poll of a session connection task may move (reads and writes together) before
/// it gives way. Values measured: none, 64, 128 and 256 KiB in alternating `hol` runs
/// (docs/BENCHMARKS.md): 64 KiB raised the small requests' busy/idle rate by half but cost
/// ~20 % of bulk throughput; 256 KiB left bulk unchanged, so it bounds a poll's work (a full
/// socket buffer, several MiB, before) without taxing bulk.
pub const SESSION_TURN_BYTES: usize = 256 << 10;

/// When a task that moves bytes should give way: after `budget` bytes within one turn. A
/// turn ends when the task gives way or when its I/O would block (the task sleeps anyway).
#[derive(Debug, Clone)]
pub struct Turns {
    budget: usize,
    used: usize,
}

impl Turns {
    /// A rule giving way after `budget` bytes per turn (0: never).
    pub fn new(budget: usize) -> Turns {
        Turns { budget, used: 0 }
    }

    /// Before an I/O call: `true` if the turn is spent and the caller must give way now
    /// (the next turn then starts).
    pub fn must_yield(&mut self) -> bool {
        if self.budget > 0 && self.used >= self.budget {
            self.used = 0;
            true
        } else {
            false
        }
    }

    /// An I/O call moved `n` bytes.
    pub fn moved(&mut self, n: usize) {
        self.used = self.used.saturating_add(n);
    }

    /// An I/O call would block: the task sleeps until woken, which ends its turn.
    pub fn blocked(&mut self) {
        self.used = 0;
    }
}

/// An I/O object whose reads and writes share one [`Turns`] budget.
#[derive(Debug)]
pub struct TakeTurns<T> {
    inner: T,
    turns: Turns,
}

impl<T> TakeTurns<T> {
    /// Wrap `inner`, giving way after `budget` bytes per turn.
    pub fn new(inner: T, budget: usize) -> TakeTurns<T> {
        TakeTurns {
            inner,
            turns: Turns::new(budget),
        }
    }

    /// The wrapped I/O object.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Give way if the turn is spent: wake this task again (it goes to the back of the run
    /// queue) and return `Pending`.
    fn give_way(&mut self, cx: &mut Context<'_>) -> bool {
        if self.turns.must_yield() {
            cx.waker().wake_by_ref();
            true
        } else {
            false
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TakeTurns<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.give_way(cx) {
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(_) => this.turns.moved(buf.filled().len() - before),
            Poll::Pending => this.turns.blocked(),
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TakeTurns<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.give_way(cx) {
            return Poll::Pending;
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        match &polled {
            Poll::Ready(Ok(n)) => this.turns.moved(*n),
            Poll::Ready(Err(_)) => {}
            Poll::Pending => this.turns.blocked(),
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.give_way(cx) {
            return Poll::Pending;
        }
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        match &polled {
            Poll::Ready(Ok(n)) => this.turns.moved(*n),
            Poll::Ready(Err(_)) => {}
            Poll::Pending => this.turns.blocked(),
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_turn_under_its_budget_never_gives_way() {
        let mut t = Turns::new(100);
        for _ in 0..9 {
            assert!(!t.must_yield());
            t.moved(10);
        }
        assert!(!t.must_yield(), "90 of 100 bytes used");
    }

    #[test]
    fn the_call_after_a_spent_budget_gives_way_once_then_a_new_turn_starts() {
        let mut t = Turns::new(100);
        assert!(!t.must_yield());
        t.moved(150);
        assert!(t.must_yield(), "budget spent: give way");
        assert!(!t.must_yield(), "the next call starts a fresh turn");
        t.moved(99);
        assert!(!t.must_yield());
    }

    #[test]
    fn blocking_ends_the_turn() {
        let mut t = Turns::new(100);
        t.moved(99);
        t.blocked();
        t.moved(99);
        assert!(
            !t.must_yield(),
            "the task slept between: 99 bytes in this turn"
        );
    }

    #[test]
    fn reads_and_writes_share_one_budget() {
        // The connection task does both in one poll; either direction spends the turn.
        let mut t = Turns::new(100);
        t.moved(60); // a read
        assert!(!t.must_yield());
        t.moved(60); // a write
        assert!(t.must_yield());
    }

    #[test]
    fn a_zero_budget_never_gives_way() {
        let mut t = Turns::new(0);
        t.moved(usize::MAX);
        t.moved(1);
        assert!(!t.must_yield());
    }

    #[tokio::test]
    async fn take_turns_moves_every_byte_in_order_while_giving_way() {
        let (a, b) = tokio::io::duplex(64 << 10);
        let mut writer = TakeTurns::new(a, 1000);
        let mut reader = TakeTurns::new(b, 700);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let write = tokio::spawn(async move {
            writer.write_all(&sent).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            reader.read_to_end(&mut got),
        )
        .await
        .expect("transfer finished")
        .unwrap();
        write.await.unwrap();
        assert_eq!(got, data);
    }
}
