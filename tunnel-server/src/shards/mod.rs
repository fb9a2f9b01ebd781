//! Per-core shards: single-threaded runtimes, each on a thread of its own, that TCP edge
//! sessions are spread over, and that the CONNECT streams to a session are moved onto.
//!
//! Why not one multi-threaded runtime: a session's HTTP/2 connection task and the pipes of
//! its streams wake each other for every frame. On tokio's work-stealing runtime those tasks
//! land on different workers, so each wake-up crosses threads and the tasks' state moves
//! between caches. On the 2-vCPU VM two workers cost 43 % more server CPU per GB and 24 %
//! more per request than one thread, and cut the small requests' rate beside a bulk stream
//! to a third; two shards cost +2 % per GB and −7 % per request (docs/ARCHITECTURE.md,
//! "Threads: per-core shards"). A shard keeps one session and its streams on one thread,
//! as the single-threaded mode does, while the sessions of many nodes use every core.
//!
//! What runs where: the accept loops, QUIC sessions, the Konnectivity frontend and agents,
//! registration and admin stay on the server's own runtime. An accepted edge connection
//! goes to the next shard, round robin, before its first byte is read; a CONNECT stream is
//! moved to its session's shard once its dial succeeded (`frontend::connect`). Sockets are
//! re-registered with the shard's reactor there, so their readiness is also reported on the
//! shard's thread.
//!
//! Nothing here knows sessions or frontends; every module may depend on it.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod rehome;
pub use rehome::{MovableTcp, Rehome};

thread_local! {
    /// The shard this thread runs, if it is a shard's: its set and its index in the set.
    static CURRENT: Cell<Option<(u64, usize)>> = const { Cell::new(None) };
}

/// Numbers each [`Shards`] set, so a thread of one set (one server) is never taken for the
/// same index of another (two servers in one process, as in tests).
static NEXT_SET: AtomicU64 = AtomicU64::new(1);

/// The index of the shard the calling thread runs (`None` on any other thread).
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get).map(|(_, index)| index)
}

/// One shard: where to spawn onto it, and its index.
#[derive(Clone, Debug)]
pub struct Shard {
    set: u64,
    index: usize,
    handle: Handle,
}

impl Shard {
    /// The shard's index (0-based), as in its thread's name.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether the calling thread is this shard's.
    pub fn is_current(&self) -> bool {
        CURRENT.with(Cell::get) == Some((self.set, self.index))
    }

    /// Run `task` on this shard. Sockets it was given must be re-registered there (taken
    /// out with `into_std`, back with `from_std` inside `task`).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }
}

/// The server's shards (none: everything runs on the server's own runtime).
#[derive(Debug, Default)]
pub struct Shards {
    set: u64,
    shards: Vec<Shard>,
    next: AtomicUsize,
    stop: CancellationToken,
}

impl Shards {
    /// No shards.
    pub fn none() -> Shards {
        Shards::default()
    }

    /// Start `count` shard threads (`tether-shard-N`), each running a single-threaded
    /// runtime until [`Shards::stop`].
    pub fn start(count: usize) -> std::io::Result<Shards> {
        let set = NEXT_SET.fetch_add(1, Ordering::Relaxed);
        let stop = CancellationToken::new();
        let mut shards = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("tether-shard-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some((set, index))));
                    runtime.block_on(stop.cancelled());
                    // Dropping the runtime here ends whatever still runs on it: the
                    // server's shutdown has waited for its tracked tasks before stopping.
                })?;
            shards.push(Shard { set, index, handle });
        }
        Ok(Shards {
            set,
            shards,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    /// How many shards run.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The shard for a new edge connection: the next one, round robin (`None` without
    /// shards). Sessions are long-lived and alike in cost at the start, and a node's load
    /// is not known when it connects, so the count is what is balanced.
    pub fn next(&self) -> Option<Shard> {
        if self.shards.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        Some(self.shards[i].clone())
    }

    /// The shard the calling thread runs, as a [`Shard`] to move work back to.
    pub fn here(&self) -> Option<Shard> {
        match CURRENT.with(Cell::get) {
            Some((set, index)) if set == self.set => self.shards.get(index).cloned(),
            _ => None,
        }
    }

    /// Stop every shard thread; tasks still on them are dropped.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_on_the_shard_they_were_given_round_robin() {
        let shards = Shards::start(2).unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let shard = shards.next().unwrap();
            let on = shard
                .spawn(async { (current(), std::thread::current().name().map(str::to_owned)) })
                .await
                .unwrap();
            assert_eq!(on.0, Some(shard.index()));
            assert_eq!(
                on.1.as_deref(),
                Some(&*format!("tether-shard-{}", shard.index()))
            );
            seen.push(shard.index());
        }
        assert_eq!(seen, [0, 1, 0, 1]);
        assert_eq!(current(), None, "the test's own thread is no shard");
        shards.stop();
    }

    #[tokio::test]
    async fn a_shard_of_one_server_is_not_taken_for_another_servers_shard() {
        let (a, b) = (Shards::start(1).unwrap(), Shards::start(1).unwrap());
        let (a0, b0) = (a.next().unwrap(), b.next().unwrap());
        let b = std::sync::Arc::new(b);
        let seen = {
            let (a0, b0, b) = (a0.clone(), b0.clone(), b.clone());
            a0.clone()
                .spawn(async move {
                    let here_in_b = b.here().map(|s| s.index());
                    (a0.is_current(), b0.is_current(), here_in_b)
                })
                .await
                .unwrap()
        };
        assert_eq!(
            seen,
            (true, false, None),
            "on a's shard 0: is b's shard 0 here?"
        );
        a.stop();
        b.stop();
    }

    #[test]
    fn no_shards_means_nothing_moves() {
        let shards = Shards::none();
        assert!(shards.next().is_none());
        assert!(shards.here().is_none());
    }
}
