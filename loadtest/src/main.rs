//! `tunnel-loadtest`: runs a target in-process, then drives a workload at it along one path
//! (straight, through a TCP relay, through a CONNECT proxy, or through Tether started
//! in-process: server and edge each on its own single-threaded runtime, like two processes)
//! and prints figures. Benchmarks report numbers; tests assert behaviour.

#![forbid(unsafe_code)]

mod report;
mod scenario;
mod setup;
mod target;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

use scenario::Opts;
use setup::Path;

/// Drive traffic through Tether (or a baseline) and report throughput and latency.
#[derive(Parser)]
#[command(name = "tunnel-loadtest", version, about)]
struct Cli {
    /// Workload.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Seconds the measured phase runs (hol: half idle, half busy).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Which Tether CONNECT frontend to use.
    #[arg(long, value_enum, default_value_t = Frontend::Unix)]
    frontend: Frontend,
    /// No tunnel: connect straight to the target.
    #[arg(long, conflicts_with_all = ["proxy", "relay"])]
    direct: bool,
    /// An external plain-HTTP CONNECT proxy to go through instead of Tether.
    #[arg(long, value_name = "ADDR", conflicts_with = "relay")]
    proxy: Option<SocketAddr>,
    /// The target to ask the `--proxy` for (default: the in-process target).
    #[arg(long, value_name = "HOST:PORT", requires = "proxy")]
    proxy_target: Option<String>,
    /// A plain TCP relay in front of the target (haproxy, rathole): connect here instead.
    #[arg(long, value_name = "ADDR")]
    relay: Option<SocketAddr>,
    /// Port of the in-process target on 127.0.0.1 (0: any; relays need a fixed one).
    #[arg(long, default_value_t = 0)]
    target_port: u16,
    /// Name of the path in the output (default: derived from the options).
    #[arg(long)]
    label: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// bulk: streams at once.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// rr/hol: kept-alive connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// rr/hol/connect: request (and reply) size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// connect: connections in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// connect: upper bound on connections opened.
    #[arg(long, default_value_t = 10_000_000)]
    requests: u64,
    /// hold: idle connections to open (each uses 2-4 descriptors in this process).
    #[arg(long, default_value_t = 2000)]
    hold: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scenario {
    /// Streams moving a checked pattern both ways at once: MB/s.
    Bulk,
    /// Request/response over kept-alive connections: rps, p50..p999.
    Rr,
    /// Small requests idle vs during a bulk stream on the same edge: the ratio.
    Hol,
    /// A new connection per request: conn/s and latency.
    Connect,
    /// N idle connections: RSS growth per connection.
    Hold,
}

/// The Tether frontend the load goes through.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Frontend {
    /// HTTP CONNECT on the Unix socket.
    Unix,
    /// HTTP CONNECT on TCP with mutual TLS.
    Tls,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.duration > 0.0 && cli.duration <= 3600.0,
        "--duration must be in (0, 3600] seconds"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let target = target::spawn(cli.target_port).context("start the target")?;
    let (path, label) = if cli.direct {
        (Path::Tcp(target), "direct".to_owned())
    } else if let Some(relay) = cli.relay {
        (Path::Tcp(relay), format!("relay {relay}"))
    } else if let Some(proxy) = cli.proxy {
        let target = cli.proxy_target.unwrap_or_else(|| target.to_string());
        (Path::Proxy { proxy, target }, format!("proxy {proxy}"))
    } else {
        let tether = setup::Tether::start(target.port(), cli.frontend).context("start Tether")?;
        let name = match cli.frontend {
            Frontend::Unix => "tether-unix",
            Frontend::Tls => "tether-tls",
        };
        (Path::Tether(Box::new(tether)), name.to_owned())
    };
    let label = cli.label.unwrap_or(label);
    let path = Arc::new(path);
    let opts = Opts {
        duration: Duration::from_secs_f64(cli.duration),
        streams: cli.streams,
        connections: cli.connections,
        size: cli.size.max(1),
        concurrency: cli.concurrency,
        requests: cli.requests,
        hold: cli.hold,
    };
    let report = match cli.scenario {
        Scenario::Bulk => scenario::bulk::run(path, opts, &label).await?,
        Scenario::Rr => scenario::rr::run(path, opts, &label).await?,
        Scenario::Hol => scenario::rr::hol(path, opts, &label).await?,
        Scenario::Connect => scenario::connect::run(path, opts, &label).await?,
        Scenario::Hold => scenario::hold::run(path, opts, &label).await?,
    };
    if cli.json {
        report.print_json();
    } else {
        report.print_table();
    }
    Ok(())
}
