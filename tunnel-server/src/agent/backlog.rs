//! The bytes an agent sent for one connection that the connection's frontend has not taken
//! yet. Two parties share it: the reader of the agent's stream adds to it (and, when it is
//! full, waits before reading the agent's next packet), and the connection's task takes from
//! it as its frontend accepts bytes. Every take wakes a waiting reader, so a full backlog
//! pauses the agent's stream exactly until the frontend makes progress. No sockets here.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One connection's backlog.
#[derive(Debug, Default)]
pub(super) struct Backlog {
    /// Bytes queued for the connection and not taken yet.
    buffered: AtomicUsize,
    /// Signalled after every take. `notify_one` keeps a permit when nobody waits, so a take
    /// between the reader's check and its wait is never lost.
    taken: Notify,
    /// The mux reset the connection (its frontend took nothing for `write_timeout`): the
    /// connection's task stops sending at once.
    reset: CancellationToken,
}

impl Backlog {
    /// Bytes queued and not yet taken.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }

    /// Whether `len` more bytes fit under `limit`. An empty backlog always takes one packet,
    /// so a packet larger than the limit still reaches a frontend that keeps up.
    pub fn fits(&self, len: usize, limit: usize) -> bool {
        let buffered = self.buffered();
        buffered == 0 || buffered + len <= limit
    }

    /// `n` bytes were queued for the connection (only the reader of the agent's stream adds).
    pub fn add(&self, n: usize) {
        self.buffered.fetch_add(n, Ordering::AcqRel);
    }

    /// The frontend side took `n` bytes: wake the reader if it waits for room.
    pub fn took(&self, n: usize) {
        self.buffered.fetch_sub(n, Ordering::AcqRel);
        self.taken.notify_one();
    }

    /// Resolves after the next take (or at once if one happened since the last wait).
    pub async fn taken(&self) {
        self.taken.notified().await
    }

    /// Mark the connection reset by the mux.
    pub fn reset(&self) {
        self.reset.cancel();
    }

    /// Resolves once the mux reset the connection.
    pub async fn was_reset(&self) {
        self.reset.cancelled().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_empty_backlog_takes_any_packet_a_full_one_takes_none() {
        let backlog = Backlog::default();
        assert!(backlog.fits(100, 10), "an empty backlog takes one packet");
        backlog.add(8);
        assert!(backlog.fits(2, 10));
        assert!(!backlog.fits(3, 10));
        backlog.took(8);
        assert_eq!(backlog.buffered(), 0);
    }

    #[tokio::test]
    async fn a_take_before_the_wait_is_not_lost() {
        let backlog = Backlog::default();
        backlog.add(4);
        backlog.took(4);
        tokio::time::timeout(Duration::from_secs(1), backlog.taken())
            .await
            .expect("the stored wakeup");
    }
}
