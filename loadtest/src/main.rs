//! `tunnel-loadtest`: starts Tether on loopback (server and edge each on its own
//! single-threaded runtime, like two processes), then drives a workload through the CONNECT
//! frontend and prints figures. Benchmarks report numbers; tests assert behaviour.

mod setup;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// Drive traffic through Tether and report throughput and latency.
#[derive(Parser)]
#[command(name = "tunnel-loadtest", version, about)]
struct Cli {
    /// Workload.
    #[arg(value_enum)]
    scenario: Scenario,
    /// bulk: MiB each way through one stream.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// connect: tunneled connections to open (one 1 KiB request/response each).
    #[arg(long, default_value_t = 1000)]
    requests: u64,
    /// connect: connections in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: u64,
    /// Which CONNECT frontend to use.
    #[arg(long, value_enum, default_value_t = Frontend::Unix)]
    frontend: Frontend,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scenario {
    /// One stream, N MiB each way at once, SHA-256 checked.
    Bulk,
    /// A new tunneled connection per request.
    Connect,
}

/// The frontend the load goes through.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Frontend {
    /// HTTP CONNECT on the Unix socket.
    Unix,
    /// HTTP CONNECT on TCP with mutual TLS.
    Tls,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let target = TcpListener::bind("127.0.0.1:0").await?;
        let port = target.local_addr()?.port();
        let tether = setup::Tether::start(port, cli.frontend).context("start Tether")?;
        match cli.scenario {
            Scenario::Bulk => {
                spawn_target(target.into_std()?, move |l| {
                    serve_bulk_target(l, cli.mib << 20)
                });
                bulk(&tether, cli.mib << 20).await
            }
            Scenario::Connect => {
                spawn_target(target.into_std()?, serve_echo_target);
                connect(Arc::new(tether), cli.requests, cli.concurrency).await
            }
        }
    })
}

/// Run a target on its own thread and single-threaded runtime, like a separate process.
fn spawn_target<F, Fut>(listener: std::net::TcpListener, serve: F)
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("target runtime");
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener).await,
                Err(e) => eprintln!("target listener: {e}"),
            }
        });
    });
}

/// Deterministic payload: the same seed gives the same bytes at both ends.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
    data
}

async fn serve_bulk_target(listener: TcpListener, bytes: u64) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let (r, w) = tcp.into_split();
            let _ = tokio::join!(drain_hash(r), send_seeded(w, 2, bytes));
        });
    }
}

async fn serve_echo_target(listener: TcpListener) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tcp.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// Read to EOF, returning the byte count and CRC-32 (hardware-accelerated, so the load
/// generator is not the bottleneck; the end-to-end tests use SHA-256).
async fn drain_hash<R: AsyncRead + Unpin>(mut r: R) -> (u64, u32) {
    let mut hash = crc32fast::Hasher::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                total += n as u64;
            }
        }
    }
    (total, hash.finalize())
}

async fn send_seeded<W: AsyncWrite + Unpin>(mut w: W, seed: u64, bytes: u64) -> u32 {
    let chunk = payload(seed, 1 << 20);
    let mut hash = crc32fast::Hasher::new();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if w.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        hash.update(&chunk[..n]);
        left -= n as u64;
    }
    let _ = w.shutdown().await;
    hash.finalize()
}

/// The checksum of `bytes` bytes of the seeded stream `send_seeded` writes.
fn expected_checksum(seed: u64, bytes: u64) -> u32 {
    let chunk = payload(seed, 1 << 20);
    let mut hash = crc32fast::Hasher::new();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        hash.update(&chunk[..n]);
        left -= n as u64;
    }
    hash.finalize()
}

async fn bulk(tether: &setup::Tether, bytes: u64) -> anyhow::Result<()> {
    let stream = tether.open().await?;
    let (r, w) = tokio::io::split(stream);
    let started = Instant::now();
    let ((got, got_hash), _sent_hash) = tokio::join!(drain_hash(r), send_seeded(w, 1, bytes));
    let elapsed = started.elapsed().as_secs_f64();
    let expected = expected_checksum(2, bytes);
    anyhow::ensure!(got == bytes, "received {got} of {bytes} bytes");
    anyhow::ensure!(got_hash == expected, "download checksum mismatch");
    let mb = bytes as f64 / 1e6;
    println!(
        "bulk: {} MiB each way in {:.2} s: {:.0} MB/s each way, {:.0} MB/s total ({:.2} Gb/s)",
        bytes >> 20,
        elapsed,
        mb / elapsed,
        2.0 * mb / elapsed,
        2.0 * mb * 8.0 / 1000.0 / elapsed
    );
    Ok(())
}

async fn connect(
    tether: Arc<setup::Tether>,
    requests: u64,
    concurrency: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut workers = Vec::new();
    let per_worker = requests / concurrency.max(1);
    for _ in 0..concurrency.max(1) {
        let tether = tether.clone();
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let request = payload(3, 1024);
            let mut reply = vec![0u8; 1024];
            for _ in 0..per_worker {
                let t = Instant::now();
                let mut stream = tether.open().await?;
                stream.write_all(&request).await?;
                stream.read_exact(&mut reply).await?;
                anyhow::ensure!(reply == request, "echo mismatch");
                drop(stream);
                hist.record(t.elapsed().as_micros() as u64)?;
            }
            anyhow::Ok(hist)
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    for w in workers {
        hist.add(w.await??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "connect: {} tunneled connections (CONNECT + 1 KiB echo), concurrency {}: {:.0} conn/s, latency p50 {} µs, p99 {} µs, max {} µs",
        hist.len(),
        concurrency,
        hist.len() as f64 / elapsed,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    Ok(())
}
