//! Workloads. Each takes a [`Path`] and [`Opts`] and returns a [`Report`]; each is bounded by
//! `opts.duration` (plus [`GRACE`] for in-flight work) and by its counts.

pub mod bulk;
pub mod connect;
pub mod edges;
pub mod hold;
pub mod rr;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::setup::{Path, Tunnel};
use crate::target::ECHO;

/// How long in-flight work may run past the deadline before the run fails as stalled.
pub const GRACE: Duration = Duration::from_secs(10);

/// Knobs shared by the scenarios.
#[derive(Clone, Copy)]
pub struct Opts {
    /// Wall-clock bound of the measured phase (hol runs three phases of half of it each).
    pub duration: Duration,
    /// bulk: streams at once.
    pub streams: usize,
    /// rr/hol: kept-alive connections.
    pub connections: usize,
    /// rr/hol/connect: request (= reply) size in bytes.
    pub size: usize,
    /// connect: connections in flight at once.
    pub concurrency: usize,
    /// connect: upper bound on connections opened.
    pub requests: u64,
    /// hold: idle connections to open.
    pub hold: usize,
}

/// Open a connection in echo mode.
pub async fn open_echo(path: &Path) -> anyhow::Result<Box<dyn Tunnel>> {
    let mut stream = path.open().await?;
    stream.write_all(&[ECHO]).await?;
    Ok(stream)
}

/// One request/response of `request.len()` bytes; checks the echo.
pub async fn round_trip(
    stream: &mut Box<dyn Tunnel>,
    request: &[u8],
    reply: &mut [u8],
) -> anyhow::Result<()> {
    stream.write_all(request).await?;
    stream.read_exact(reply).await?;
    anyhow::ensure!(reply == request, "echo mismatch");
    Ok(())
}

/// Microseconds since `t`, at least 1 (histograms reject 0).
pub fn micros(t: Instant) -> u64 {
    (t.elapsed().as_micros() as u64).max(1)
}

/// Await a worker, failing if it runs past `deadline + GRACE`.
pub async fn bounded<T>(
    deadline: Instant,
    work: tokio::task::JoinHandle<anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let limit = tokio::time::Instant::from_std(deadline + GRACE);
    match tokio::time::timeout_at(limit, work).await {
        Ok(joined) => joined?,
        Err(_) => anyhow::bail!("worker still running {GRACE:?} after the deadline (stalled)"),
    }
}
