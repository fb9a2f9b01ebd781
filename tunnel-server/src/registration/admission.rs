//! Who gets a registration connection, and for how long. Joins need no credential, so the
//! registration listener is the one place anyone on the internet can hold server resources;
//! these budgets keep joins and renewals possible while someone tries to hold them all:
//!
//! - **handshakes**: connections before TLS has finished (global cap; a connection that sends
//!   nothing within `first_byte_timeout` or finishes nothing within `handshake_timeout` goes);
//! - **per source**: unauthenticated connections (handshaking or joining) from one address;
//! - **joins**: finished TLS connections without a client certificate. When the pool is full,
//!   the connection that has been silent longest (at least [`EVICTABLE_AFTER`]) is closed to
//!   make room: idle connections give their slot to one that wants to talk;
//! - **renewals**: connections presenting a valid node certificate have their own pool, so a
//!   join flood cannot keep nodes from renewing, and no per-source cap (they are
//!   authenticated, and many nodes may share one NAT address);
//!
//! and every connection is closed after `idle_timeout` without a byte received.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::RegistrationConfig;
use crate::listen::source_limit::{SourceLimit, SourceSlot};

/// A join connection silent for less than this is never evicted: a client in the middle of
/// its handshake-to-request round trip (a few RTTs, well under a second on the internet)
/// keeps its slot even when the pool is full.
pub const EVICTABLE_AFTER: Duration = Duration::from_secs(1);

/// The registration listener's budgets.
pub struct Admission {
    /// Time from accept to a finished TLS handshake.
    pub handshake_timeout: Duration,
    handshakes: Arc<Semaphore>,
    sources: SourceLimit,
    joins: JoinPool,
    renewals: Arc<Semaphore>,
    idle_timeout: Duration,
}

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Every handshake slot is taken.
    #[error("too many registration handshakes in progress")]
    Handshakes,
    /// Its source already holds its share.
    #[error("too many unauthenticated connections from this source")]
    Source,
    /// The join pool is full and no connection in it has been idle long enough to evict.
    #[error("join connection pool full")]
    Joins,
    /// The renewal pool is full.
    #[error("renewal connection pool full")]
    Renewals,
}

impl Admission {
    /// Budgets from `[registration]`.
    pub fn new(config: &RegistrationConfig) -> Admission {
        Admission {
            handshake_timeout: config.handshake_timeout,
            handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
            sources: SourceLimit::new(config.max_connections_per_source),
            joins: JoinPool::new(config.max_connections),
            renewals: Arc::new(Semaphore::new(config.max_renewal_connections)),
            idle_timeout: config.idle_timeout,
        }
    }

    /// A slot for a connection about to handshake.
    pub fn handshake(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        self.handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Handshakes)
    }

    /// Count an unauthenticated connection against its source.
    pub fn source(&self, ip: IpAddr) -> Result<SourceSlot, Refusal> {
        self.sources.try_acquire(ip).ok_or(Refusal::Source)
    }

    /// The slot of a connection that finished TLS: the renewal pool with a client
    /// certificate (its per-source slot is released), the join pool without.
    pub fn admit<T>(
        &self,
        io: T,
        authenticated: bool,
        source: SourceSlot,
    ) -> Result<Watched<T>, Refusal> {
        if authenticated {
            let permit = self
                .renewals
                .clone()
                .try_acquire_owned()
                .map_err(|_| Refusal::Renewals)?;
            drop(source);
            let activity = Arc::new(Activity::new());
            return Ok(Watched::new(
                io,
                self.idle_timeout,
                activity,
                CancellationToken::new(),
                Slot::Renewal { _permit: permit },
            ));
        }
        let (slot, activity, evict) = self.joins.admit().ok_or(Refusal::Joins)?;
        Ok(Watched::new(
            io,
            self.idle_timeout,
            activity,
            evict,
            Slot::Join {
                _place: slot,
                _source: source,
            },
        ))
    }
}

/// When a connection last received a byte, in milliseconds since the pool's epoch.
pub struct Activity {
    epoch: std::time::Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: std::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

type Members = Arc<Mutex<(u64, HashMap<u64, (Arc<Activity>, CancellationToken)>)>>;

/// Unauthenticated connections after TLS, evicting the longest-idle when full.
struct JoinPool {
    capacity: usize,
    members: Members,
}

/// A place in the join pool; leaves it when dropped.
pub struct JoinSlot {
    id: u64,
    members: Members,
}

impl JoinPool {
    fn new(capacity: usize) -> JoinPool {
        JoinPool {
            capacity,
            members: Arc::default(),
        }
    }

    fn admit(&self) -> Option<(JoinSlot, Arc<Activity>, CancellationToken)> {
        let mut guard = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let (next, members) = &mut *guard;
        if members.len() >= self.capacity {
            let (victim, idle) = members
                .iter()
                .map(|(id, (activity, _))| (*id, activity.idle()))
                .max_by_key(|(_, idle)| *idle)?;
            if idle < EVICTABLE_AFTER {
                return None;
            }
            if let Some((_, evict)) = members.remove(&victim) {
                tracing::debug!(
                    ?idle,
                    "registration join pool full: closing its longest-idle connection"
                );
                evict.cancel();
            }
        }
        let id = *next;
        *next += 1;
        let activity = Arc::new(Activity::new());
        let evict = CancellationToken::new();
        members.insert(id, (activity.clone(), evict.clone()));
        Some((
            JoinSlot {
                id,
                members: self.members.clone(),
            },
            activity,
            evict,
        ))
    }
}

impl Drop for JoinSlot {
    fn drop(&mut self) {
        let mut guard = self.members.lock().unwrap_or_else(|p| p.into_inner());
        guard.1.remove(&self.id);
    }
}

/// The budget a connection holds while it lives.
enum Slot {
    Join {
        _place: JoinSlot,
        _source: SourceSlot,
    },
    Renewal {
        _permit: OwnedSemaphorePermit,
    },
}

/// A registration connection that closes itself (its next read fails) once it has received
/// nothing for `idle_timeout`, or when evicted from the join pool. Writes pass through.
pub struct Watched<T> {
    io: T,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    evicted: Pin<Box<WaitForCancellationFutureOwned>>,
    activity: Arc<Activity>,
    _slot: Slot,
}

impl<T> Watched<T> {
    fn new(
        io: T,
        idle_timeout: Duration,
        activity: Arc<Activity>,
        evict: CancellationToken,
        slot: Slot,
    ) -> Watched<T> {
        Watched {
            io,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            evicted: Box::pin(evict.cancelled_owned()),
            activity,
            _slot: slot,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.evicted.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "idle while the join pool was full",
            )));
        }
        if this.idle.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nothing received for {:?}", this.idle_timeout),
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.activity.touch();
            this.idle.as_mut().reset(Instant::now() + this.idle_timeout);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Make member `id` look silent for `silent`.
    fn silence(pool: &JoinPool, id: u64, silent: Duration) {
        let mut guard = pool.members.lock().unwrap();
        let entry = guard.1.get_mut(&id).unwrap();
        entry.0 = Arc::new(Activity {
            epoch: std::time::Instant::now() - silent,
            last: AtomicU64::new(0),
        });
    }

    #[test]
    fn a_full_pool_of_fresh_connections_refuses() {
        let pool = JoinPool::new(2);
        let _a = pool.admit().unwrap();
        let _b = pool.admit().unwrap();
        assert!(pool.admit().is_none());
    }

    #[test]
    fn a_full_pool_evicts_its_longest_idle_member_and_frees_its_place() {
        let pool = JoinPool::new(2);
        let (a, _, evict_a) = pool.admit().unwrap();
        let (b, _, evict_b) = pool.admit().unwrap();
        silence(&pool, a.id, Duration::from_secs(5));
        silence(&pool, b.id, Duration::from_secs(2));
        let (_c, _, _) = pool.admit().expect("a was idle long enough");
        assert!(evict_a.is_cancelled());
        assert!(!evict_b.is_cancelled());
        assert_eq!(pool.members.lock().unwrap().1.len(), 2);
        // The evicted connection's slot leaving later does not remove anyone else.
        drop(a);
        assert_eq!(pool.members.lock().unwrap().1.len(), 2);
    }

    #[test]
    fn a_member_silent_for_less_than_a_second_is_not_evicted() {
        let pool = JoinPool::new(1);
        let (a, _, evict_a) = pool.admit().unwrap();
        silence(&pool, a.id, EVICTABLE_AFTER / 2);
        assert!(pool.admit().is_none());
        assert!(!evict_a.is_cancelled());
    }

    #[tokio::test]
    async fn a_silent_connection_fails_its_read_at_the_idle_deadline() {
        use tokio::io::AsyncReadExt;
        let (client, server) = tokio::io::duplex(64);
        let (slot, activity, evict) = JoinPool::new(1).admit().unwrap();
        let source = SourceLimit::new(1)
            .try_acquire(IpAddr::from([192, 0, 2, 1]))
            .unwrap();
        let mut watched = Watched::new(
            server,
            Duration::from_millis(300),
            activity,
            evict,
            Slot::Join {
                _place: slot,
                _source: source,
            },
        );
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let error = watched.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        drop(client);
    }
}
