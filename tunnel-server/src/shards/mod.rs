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
    /// Edge connections placed on each shard and still there ([`Placed`]).
    load: std::sync::Arc<Vec<AtomicUsize>>,
    stop: CancellationToken,
}

/// An edge connection's place on a shard, counted until dropped: when the connection ends,
/// or turns out to be a lane, which runs elsewhere and must not count as a session here.
#[derive(Debug)]
pub struct Placed {
    shard: Shard,
    load: std::sync::Arc<Vec<AtomicUsize>>,
}

impl Placed {
    /// The shard the connection was placed on.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.load[self.shard.index].fetch_sub(1, Ordering::Relaxed);
    }
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
            load: std::sync::Arc::new((0..count).map(|_| AtomicUsize::new(0)).collect()),
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

    /// The shard for a new edge connection (`None` without shards): the one with the fewest
    /// edge connections placed, ties taken round robin. Sessions are long-lived and alike in
    /// cost at the start, and a node's load is not known when it connects, so the count is
    /// what is balanced. Counted at accept, so a reconnect storm spreads before any session
    /// is up; a lane gives its place back once it is known to be one (it runs beside its
    /// session's shard), or plain round robin would put every session on one shard of two.
    pub fn next(&self) -> Option<Placed> {
        let n = self.shards.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let index = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| self.load[i].load(Ordering::Relaxed))
            .unwrap_or(start);
        self.load[index].fetch_add(1, Ordering::Relaxed);
        Some(Placed {
            shard: self.shards[index].clone(),
            load: self.load.clone(),
        })
    }

    /// The shard after `shard` (`None` with fewer than two): where a session's lane runs,
    /// so the two never wait for each other's thread.
    pub fn other_than(&self, shard: &Shard) -> Option<Shard> {
        if self.shards.len() < 2 || shard.set != self.set {
            return None;
        }
        Some(self.shards[(shard.index + 1) % self.shards.len()].clone())
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

    #[test]
    fn a_place_given_back_goes_to_the_next_connection_so_sessions_stay_spread() {
        let shards = Shards::start(2).unwrap();
        let mut sessions = Vec::new();
        // Each session's lane is accepted right after it, placed, then found to be a lane.
        for _ in 0..4 {
            sessions.push(shards.next().unwrap());
            drop(shards.next().unwrap());
        }
        let on: Vec<usize> = sessions.iter().map(|p| p.shard().index()).collect();
        assert_eq!(on.iter().filter(|&&i| i == 0).count(), 2, "{on:?}");
        assert_eq!(on.iter().filter(|&&i| i == 1).count(), 2, "{on:?}");
        drop(sessions);
        assert!(shards.load.iter().all(|l| l.load(Ordering::Relaxed) == 0));
        shards.stop();
    }

    #[tokio::test]
    async fn tasks_run_on_the_shard_they_were_given_round_robin() {
        let shards = Shards::start(2).unwrap();
        let mut seen = Vec::new();
        let mut held = Vec::new();
        for _ in 0..4 {
            let placed = shards.next().unwrap();
            let shard = placed.shard().clone();
            held.push(placed);
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
        let (a0, b0) = (a0.shard().clone(), b0.shard().clone());
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
