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

/// The `hol` scenario: half the duration idle, half with one bulk stream on the same path.
pub async fn hol(path: Arc<Path>, opts: Opts, label: &str) -> anyhow::Result<Report> {
    let half = opts.duration / 2;
    let idle = phase(&path, opts.connections, opts.size, half).await?;
    // The bulk stream starts first and outlives the busy phase (connection setup included).
    let bulk_deadline = Instant::now() + half + Duration::from_millis(300);
    let bulk_path = path.clone();
    // The bulk client runs on its own thread, like a separate client process, so it does not
    // starve the request connections of this thread's runtime.
    let (done, bulk) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bulk-client".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let moved = match rt {
                Ok(rt) => rt.block_on(bulk::one_stream(&bulk_path, bulk_deadline)),
                Err(e) => Err(e.into()),
            };
            let _ = done.send(moved);
        })?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let busy = phase(&path, opts.connections, opts.size, half).await?;
    let limit = tokio::time::Instant::from_std(bulk_deadline + GRACE);
    let moved = tokio::time::timeout_at(limit, bulk)
        .await
        .map_err(|_| anyhow::anyhow!("bulk stream stalled"))???;
    anyhow::ensure!(moved.bad == 0, "bulk download corrupted");
    anyhow::ensure!(moved.down > 0, "bulk stream moved nothing");
    let bulk_secs = half.as_secs_f64() + 0.3;
    let mut report = Report::new("hol", label);
    report.add("connections", opts.connections.max(1) as f64, "");
    report.add("idle_rps", idle.rps(), "req/s");
    report.add("busy_rps", busy.rps(), "req/s");
    report.add("rps_ratio", busy.rps() / idle.rps(), "busy/idle");
    report.add(
        "idle_p99_us",
        idle.hist.value_at_quantile(0.99) as f64,
        "µs",
    );
    report.add(
        "busy_p99_us",
        busy.hist.value_at_quantile(0.99) as f64,
        "µs",
    );
    report.add(
        "bulk_mb_s",
        (moved.up + moved.down) as f64 / 1e6 / bulk_secs,
        "MB/s",
    );
    report.notes.push(
        "one bulk stream (both ways) shares the edge session with the request connections; \
         all of them also share 2 cores with the load generator"
            .into(),
    );
    Ok(report)
}
