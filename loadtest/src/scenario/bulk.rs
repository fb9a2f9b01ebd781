//! `bulk`: N streams, each sending the seeded pattern both ways at once until the deadline;
//! the client checks the download byte for byte, the target checks the upload.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{bounded, Opts};
use crate::report::Report;
use crate::setup::{Path, Tunnel};
use crate::target::{self, BULK, DOWNLOAD_SEED, UPLOAD_SEED};

/// What one bulk stream moved.
pub struct Moved {
    /// Bytes sent (upload).
    pub up: u64,
    /// Bytes received (download).
    pub down: u64,
    /// Download bytes that did not match the pattern.
    pub bad: u64,
}

/// Run one bulk stream until `deadline`.
pub async fn one_stream(path: &Path, deadline: Instant) -> anyhow::Result<Moved> {
    stream_until(path.open().await?, deadline).await
}

/// Move bulk data both ways on `stream` (just opened) until `deadline`.
pub async fn stream_until(mut stream: Box<dyn Tunnel>, deadline: Instant) -> anyhow::Result<Moved> {
    stream.write_all(&[BULK]).await?;
    let (mut r, mut w) = tokio::io::split(stream);
    let upload = target::pattern(UPLOAD_SEED);
    let download = target::pattern(DOWNLOAD_SEED);
    let send = async move {
        let mut up = 0u64;
        while Instant::now() < deadline {
            if w.write_all(&upload).await.is_err() {
                break;
            }
            up += upload.len() as u64;
        }
        let _ = w.shutdown().await;
        up
    };
    let recv = async move {
        let mut buf = vec![0u8; 256 << 10];
        let (mut down, mut bad) = (0u64, 0u64);
        while let Ok(n @ 1..) = r.read(&mut buf).await {
            bad += target::mismatches(&download, down, &buf[..n]);
            down += n as u64;
        }
        (down, bad)
    };
    let (up, (down, bad)) = tokio::join!(send, recv);
    Ok(Moved { up, down, bad })
}

/// The `bulk` scenario.
pub async fn run(path: Arc<Path>, opts: Opts, label: &str) -> anyhow::Result<Report> {
    let checked_before = target::UPLOAD_CHECKED.load(Ordering::SeqCst);
    let started = Instant::now();
    let deadline = started + opts.duration;
    let workers: Vec<_> = (0..opts.streams.max(1))
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move { one_stream(&path, deadline).await })
        })
        .collect();
    let (mut up, mut down, mut bad) = (0, 0, 0);
    for w in workers {
        let m = bounded(deadline, w).await?;
        up += m.up;
        down += m.down;
        bad += m.bad;
    }
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(bad == 0, "{bad} download bytes differ from the pattern");
    anyhow::ensure!(
        target::UPLOAD_BAD.load(Ordering::SeqCst) == 0,
        "upload bytes differ from the pattern at the target"
    );
    let checked = target::UPLOAD_CHECKED.load(Ordering::SeqCst) - checked_before;
    anyhow::ensure!(checked == up, "target checked {checked} of {up} bytes sent");
    let mut report = Report::new("bulk", label);
    report.add("streams", opts.streams.max(1) as f64, "");
    report.add("seconds", secs, "s");
    report.add("up_mb_s", up as f64 / 1e6 / secs, "MB/s");
    report.add("down_mb_s", down as f64 / 1e6 / secs, "MB/s");
    report.add(
        "total_gbit_s",
        (up + down) as f64 * 8.0 / 1e9 / secs,
        "Gb/s",
    );
    report
        .notes
        .push("both directions at once; every byte checked against the seeded pattern".into());
    Ok(report)
}
