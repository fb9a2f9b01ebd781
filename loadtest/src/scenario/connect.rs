//! `connect`: a new connection per request (CONNECT + one echo of `size` bytes + close), with
//! `concurrency` in flight, until the deadline or `requests` connections.

use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;

use super::{bounded, micros, open_echo, round_trip, Opts};
use crate::report::Report;
use crate::setup::Path;

/// The `connect` scenario.
pub async fn run(path: Arc<Path>, opts: Opts, label: &str) -> anyhow::Result<Report> {
    let concurrency = opts.concurrency.max(1);
    let per_worker = (opts.requests / concurrency as u64).max(1);
    let started = Instant::now();
    let deadline = started + opts.duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3)?;
                let request = vec![7u8; opts.size];
                let mut reply = vec![0u8; opts.size];
                for _ in 0..per_worker {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let t = Instant::now();
                    let mut stream = open_echo(&path).await?;
                    round_trip(&mut stream, &request, &mut reply).await?;
                    drop(stream);
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
    anyhow::ensure!(!hist.is_empty(), "no connection completed");
    let mut report = Report::new("connect", label);
    report.add("concurrency", concurrency as f64, "");
    report.add("connections", hist.len() as f64, "");
    report.add("conn_per_s", hist.len() as f64 / secs, "conn/s");
    report.latency("latency", &hist);
    report
        .notes
        .push("latency = connect + CONNECT answer + one echo round trip".into());
    Ok(report)
}
