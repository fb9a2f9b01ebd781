//! `hold`: open N idle connections and report RSS growth per connection: of this process
//! (`rss_per_conn_kib`: load generator and target, plus server and edge when Tether runs
//! in-process; subtract the `--direct` figure for the tunnel's share) and of every watched
//! process (`server_rss_per_conn_kib`... with `--processes` or `--attach NAME=PID`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{bounded, open_echo, round_trip, Opts};
use crate::procs::{self, Watched};
use crate::report::Report;
use crate::setup::{Path, Tunnel};

/// Connections opened and closed before the baseline, so one-time allocations (pools,
/// session buffers) are not charged to the held connections.
const WARMUP: usize = 64;
/// Openers at once.
const OPENERS: usize = 32;

/// Resident set size of this process in bytes.
fn rss_bytes() -> anyhow::Result<u64> {
    procs::rss_bytes(std::process::id())
}

/// RSS of each watched process.
fn rss_all(watched: &[Watched]) -> anyhow::Result<Vec<u64>> {
    watched.iter().map(Watched::rss).collect()
}

/// The `hold` scenario.
pub async fn run(
    path: Arc<Path>,
    opts: Opts,
    label: &str,
    watched: &[Watched],
) -> anyhow::Result<Report> {
    let mut reply = [0u8; 1];
    for _ in 0..WARMUP {
        let mut s = open_echo(&path).await?;
        round_trip(&mut s, b"w", &mut reply).await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes()?;
    let before_watched = rss_all(watched)?;
    let started = Instant::now();
    let deadline = started + opts.duration;
    let share = opts.hold.div_ceil(OPENERS);
    let openers: Vec<_> = (0..OPENERS)
        .map(|i| {
            let path = path.clone();
            let n = share.min(opts.hold.saturating_sub(i * share));
            tokio::spawn(async move {
                let mut held: Vec<Box<dyn Tunnel>> = Vec::with_capacity(n);
                let mut reply = [0u8; 1];
                while held.len() < n && Instant::now() < deadline {
                    let mut s = open_echo(&path).await?;
                    round_trip(&mut s, b"h", &mut reply).await?;
                    held.push(s);
                }
                anyhow::Ok(held)
            })
        })
        .collect();
    let mut held = Vec::new();
    for o in openers {
        held.extend(bounded(deadline, o).await?);
    }
    let open_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(!held.is_empty(), "no connection opened");
    // Let buffers of the opening round trips be freed, then measure while all sit idle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_bytes()?;
    let after_watched = rss_all(watched)?;
    // Every held connection must still work.
    for s in held.iter_mut() {
        round_trip(s, b"c", &mut reply).await?;
    }
    let n = held.len();
    drop(held);
    let mut report = Report::new("hold", label);
    report.add("connections", n as f64, "");
    report.add("open_per_s", n as f64 / open_secs, "conn/s");
    report.add("rss_before_mib", before as f64 / (1 << 20) as f64, "MiB");
    report.add("rss_after_mib", after as f64 / (1 << 20) as f64, "MiB");
    report.add(
        "rss_per_conn_kib",
        after.saturating_sub(before) as f64 / 1024.0 / n as f64,
        "KiB",
    );
    for ((w, before), after) in watched.iter().zip(before_watched).zip(after_watched) {
        report.add(
            format!("{}_rss_after_mib", w.name),
            after as f64 / (1 << 20) as f64,
            "MiB",
        );
        report.add(
            format!("{}_rss_per_conn_kib", w.name),
            after.saturating_sub(before) as f64 / 1024.0 / n as f64,
            "KiB",
        );
    }
    report.notes.push(if watched.is_empty() {
        "rss_per_conn_kib is this process: client + target (+ server + edge when in-process)".into()
    } else {
        "rss_per_conn_kib is this process (client + target); the others are per process".into()
    });
    Ok(report)
}
