//! `rr`: request/response over kept-alive connections (closed loop: each connection sends its
//! next request when the reply arrives). `hol`: the same small-request load on the same edge,
//! first idle, then while a bulk stream runs; the ratio shows head-of-line blocking.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::{bounded, bulk, micros, open_echo, round_trip, Opts, GRACE};
use crate::report::Report;
use crate::setup::Path;

/// Requests answered and their latency over one phase.
pub struct Phase {
    /// Latency histogram (µs).
    pub hist: Histogram<u64>,
    /// Wall time of the phase.
    pub secs: f64,
}

impl Phase {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.hist.len() as f64 / self.secs
    }
}

/// Run `connections` closed-loop connections until `duration` has passed. Connections are
/// opened before the clock starts.
pub async fn phase(
    path: &Arc<Path>,
    connections: usize,
    size: usize,
    duration: Duration,
) -> anyhow::Result<Phase> {
    let mut streams = Vec::new();
    for _ in 0..connections.max(1) {
        streams.push(open_echo(path).await?);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut stream)| {
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3)?;
                let request: Vec<u8> = (0..size).map(|b| (b + i) as u8).collect();
                let mut reply = vec![0u8; size];
                while Instant::now() < deadline {
                    let t = Instant::now();
                    round_trip(&mut stream, &request, &mut reply).await?;
                    hist.record(micros(t))?;
                }
                anyhow::Ok(hist)
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new(3)?;
    for w in workers {
        hist.add(bounded(deadline, w).await?)?;
    }
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(!hist.is_empty(), "no request completed");
    Ok(Phase { hist, secs })
}

/// The `rr` scenario.
pub async fn run(path: Arc<Path>, opts: Opts, label: &str) -> anyhow::Result<Report> {
    let p = phase(&path, opts.connections, opts.size, opts.duration).await?;
    let mut report = Report::new("rr", label);
    report.add("connections", opts.connections.max(1) as f64, "");
    report.add("size_bytes", opts.size as f64, "B");
    report.add("requests", p.hist.len() as f64, "");
    report.add("rps", p.rps(), "req/s");
    report.latency("latency", &p.hist);
    Ok(report)
}

/// How long the bulk stream runs past the measured phase: it starts this much earlier, so
/// its connection setup and window growth are not inside the phase (milliseconds).
const BULK_LEAD: Duration = Duration::from_millis(300);

/// Run one bulk stream (both ways) for `length` on a thread of its own, as a separate client
/// process would, so it does not starve the request connections of this thread's runtime.
fn spawn_bulk(
    path: Arc<Path>,
    length: Duration,
) -> anyhow::Result<(
    Instant,
    tokio::sync::oneshot::Receiver<anyhow::Result<bulk::Moved>>,
)> {
    let deadline = Instant::now() + length;
    let (done, moved) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bulk-client".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let moved = match rt {
                Ok(rt) => rt.block_on(async {
                    bulk::stream_until(path.open_bulk().await?, deadline).await
                }),
                Err(e) => Err(e.into()),
            };
            // Before answering: this may be the last reference to a Tether run as processes,
            // whose children are killed when it drops. Dropped after the answer, it raced
            // the process's exit and left the server and edge running.
            drop(path);
            let _ = done.send(moved);
        })?;
    Ok((deadline, moved))
}

/// Wait for a bulk stream and return its throughput in MB/s (both directions) over `length`.
async fn bulk_mb_s(
    deadline: Instant,
    moved: tokio::sync::oneshot::Receiver<anyhow::Result<bulk::Moved>>,
    length: Duration,
) -> anyhow::Result<f64> {
    let limit = tokio::time::Instant::from_std(deadline + GRACE);
    let moved = tokio::time::timeout_at(limit, moved)
        .await
        .map_err(|_| anyhow::anyhow!("bulk stream stalled"))???;
    anyhow::ensure!(moved.bad == 0, "bulk download corrupted");
    anyhow::ensure!(moved.down > 0, "bulk stream moved nothing");
    Ok((moved.up + moved.down) as f64 / 1e6 / length.as_secs_f64())
}

/// The `hol` scenario, three phases of half the duration each: the small requests alone
/// (idle), one bulk stream alone, then both on the same path (busy). Reports how the small
/// requests fare during the bulk transfer (rate ratio, p50/p99/p999) and how much of its
/// lone throughput the bulk stream keeps, so a fix that starves bulk shows.
pub async fn hol(path: Arc<Path>, opts: Opts, label: &str) -> anyhow::Result<Report> {
    let half = opts.duration / 2;
    let bulk_length = half + BULK_LEAD;
    let idle = phase(&path, opts.connections, opts.size, half).await?;
    let (deadline, moved) = spawn_bulk(path.clone(), bulk_length)?;
    let alone = bulk_mb_s(deadline, moved, bulk_length).await?;
    // The bulk stream starts first and outlives the busy phase (connection setup included).
    let (deadline, moved) = spawn_bulk(path.clone(), bulk_length)?;
    tokio::time::sleep(BULK_LEAD / 3).await;
    let busy = phase(&path, opts.connections, opts.size, half).await?;
    let beside = bulk_mb_s(deadline, moved, bulk_length).await?;
    let mut report = Report::new("hol", label);
    report.add("connections", opts.connections.max(1) as f64, "");
    report.add("idle_rps", idle.rps(), "req/s");
    report.add("busy_rps", busy.rps(), "req/s");
    report.add("rps_ratio", busy.rps() / idle.rps(), "busy/idle");
    for (name, phase) in [("idle", &idle), ("busy", &busy)] {
        for (q, label) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p999")] {
            report.add(
                format!("{name}_{label}_us"),
                phase.hist.value_at_quantile(q) as f64,
                "µs",
            );
        }
    }
    report.add(
        "busy_p99_over_idle",
        busy.hist.value_at_quantile(0.99) as f64 / idle.hist.value_at_quantile(0.99) as f64,
        "x",
    );
    report.add("bulk_alone_mb_s", alone, "MB/s");
    report.add("bulk_mb_s", beside, "MB/s");
    report.add("bulk_ratio", beside / alone, "beside/alone");
    report.notes.push(
        "one bulk stream (both ways) shares the edge session with the request connections; \
         all of them also share the machine's cores with the load generator"
            .into(),
    );
    Ok(report)
}
