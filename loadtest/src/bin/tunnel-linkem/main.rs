//! `tunnel-linkem`: a link emulator for one port on loopback, so that the edge session can be
//! measured over a long, lossy link (this kernel has no netem). The benchmarks run it in a
//! network namespace of their own with the session's port; everything else in that
//! namespace (the frontend, the edge's leg to its target) stays a fast, lossless loopback.

// One `unsafe` block: borrowing the queue's socket descriptor to grow its receive buffer
// (rcvbuf.rs), which the `nfq` crate does not expose; measured need in that module.
#![deny(unsafe_code)]

mod link;
mod probe;
mod queue;
#[allow(unsafe_code)]
mod rcvbuf;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Delay and drop one port's packets on loopback (TCP and UDP, both ways) through NFQUEUE.
///
/// `run` adds iptables rules in the INPUT chain that send every packet on `lo` to or from
/// PORT to a netfilter queue, holds each for a fixed one-way delay and drops a seeded
/// fraction, releasing the rest in order. A round trip through the port thus takes twice the
/// delay. Packets are judged one MTU at a time: the kernel splits segmentation-offloaded
/// packets before queueing them, so set the namespace's `lo` MTU to a real link's (1500) to
/// lose what a real link loses. When the hold is full, new packets are dropped (tail drop)
/// and counted as `overflow`, apart from the loss. On SIGINT or SIGTERM it removes its rules,
/// lets every held packet go, and prints its counters as JSON on stdout.
///
/// Run it as root inside a network namespace made for the measurement, e.g.
///   ip netns add lnk && ip netns exec lnk ip link set lo up mtu 1500
///   ip netns exec lnk tunnel-linkem run --port 47001 --delay-ms 20 --loss-percent 1 &
///   ip netns exec lnk tunnel-loadtest hol --edge-port 47001 --transport quic
/// It refuses any namespace but a named one (`ip netns`) unless told otherwise: in the
/// host's, its rules would delay every program that uses the port, and stop them if it
/// died without removing them.
#[derive(Parser)]
#[command(name = "tunnel-linkem", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Emulate the link on PORT until SIGINT or SIGTERM.
    Run {
        /// The port whose packets cross the link (as destination or source, TCP and UDP).
        #[arg(long)]
        port: u16,
        /// One-way delay in milliseconds (the round trip is twice this).
        #[arg(long, default_value_t = 20)]
        delay_ms: u64,
        /// Percentage of packets dropped, in each direction, drawn at random from the seed.
        #[arg(long, default_value_t = 0.0, value_parser = loss_percent)]
        loss_percent: f64,
        /// Seed of the loss draws: the same seed drops the same packets of a given sequence.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Netfilter queue number (queues are per network namespace).
        #[arg(long, default_value_t = 0)]
        queue_num: u16,
        /// Packets held at once, both directions together; beyond, tail drop. The default
        /// holds 20 ms of 600 MB/s in 1500-byte packets; each held packet keeps a few KB of
        /// this program's memory (its copied header in a page-sized read buffer).
        #[arg(long, default_value_t = 8192)]
        max_held: usize,
        /// Run in the host's own network namespace all the same.
        #[arg(long)]
        allow_host_namespace: bool,
    },
    /// Traffic on 127.0.0.1:PORT to check the link; prints figures as JSON.
    Probe {
        #[command(subcommand)]
        kind: Probe,
    },
}

#[derive(Subcommand)]
enum Probe {
    /// COUNT connects to an echo server on PORT, each with a one-byte echo: both timed.
    Tcp {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 5)]
        count: u32,
    },
    /// COUNT numbered datagrams to PORT; reports which arrived.
    Udp {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1000)]
        count: u32,
        /// Microseconds between two datagrams.
        #[arg(long, default_value_t = 100)]
        gap_us: u64,
        /// The link's one-way delay, so the receiver knows how long to wait for stragglers.
        #[arg(long, default_value_t = 20)]
        delay_ms: u64,
    },
}

fn loss_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a percentage in [0, 100]"))
    }
}

/// Whether this process runs in a named network namespace (`ip netns add`, bind-mounted in
/// /run/netns): one made for a measurement. Anything else, the host's own namespace or one
/// that cannot be told apart from it (PID 1's may not be readable), counts as the host's.
fn in_named_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(own) = std::fs::metadata("/proc/self/ns/net") else {
        return false;
    };
    let Ok(named) = std::fs::read_dir("/run/netns") else {
        return false;
    };
    named
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .any(|m| m.dev() == own.dev() && m.ino() == own.ino())
}

/// A flag set by SIGINT or SIGTERM, watched by the queue loop between reads.
fn stop_on_signal() -> anyhow::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut int, mut term) = {
        let _guard = rt.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    let flag = stop.clone();
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
        flag.store(true, Ordering::Relaxed);
    });
    Ok(stop)
}

fn main() -> anyhow::Result<()> {
    let report = match Cli::parse().command {
        Cmd::Run {
            port,
            delay_ms,
            loss_percent,
            seed,
            queue_num,
            max_held,
            allow_host_namespace,
        } => {
            anyhow::ensure!(
                allow_host_namespace || in_named_namespace(),
                "refusing to add rules outside a named network namespace (this may be the \
                 host's): run inside `ip netns exec` (or pass --allow-host-namespace)"
            );
            anyhow::ensure!(max_held > 0, "--max-held must be at least 1");
            let stop = stop_on_signal()?;
            let settings = queue::Settings {
                port,
                queue_num,
                delay: Duration::from_millis(delay_ms),
                loss: loss_percent / 100.0,
                seed,
                max_held,
            };
            queue::run(&settings, &stop)?
        }
        Cmd::Probe {
            kind: Probe::Tcp { port, count },
        } => probe::tcp(port, count)?,
        Cmd::Probe {
            kind:
                Probe::Udp {
                    port,
                    count,
                    gap_us,
                    delay_ms,
                },
        } => probe::udp(port, count, Duration::from_micros(gap_us), delay_ms)?,
    };
    println!("{report}");
    Ok(())
}
