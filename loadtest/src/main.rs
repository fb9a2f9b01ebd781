//! `tunnel-loadtest`: runs a target in-process, then drives a workload at it along one path
//! (straight, through a TCP relay, through a CONNECT proxy, or through Tether: started
//! in-process, each side on its own single-threaded runtime like two processes, or as the
//! real binaries in child processes) and prints figures. `edges` runs many edges against a
//! server process instead. Benchmarks report numbers; tests assert behaviour.

#![forbid(unsafe_code)]

mod procs;
mod progress;
mod report;
mod scenario;
mod setup;
mod target;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

use procs::Watched;
use scenario::Opts;
use setup::{Mode, Path};

/// Drive traffic through Tether (or a baseline) and report throughput and latency.
#[derive(Parser)]
#[command(name = "tunnel-loadtest", version, about)]
struct Cli {
    /// Workload.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Seconds the measured phase runs (hol: three phases of half of it: requests alone, bulk
    /// alone, both).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Which Tether CONNECT frontend to use.
    #[arg(long, value_enum, default_value_t = Frontend::Unix)]
    frontend: Frontend,
    /// The edge session's transport (Tether started here, in-process or as processes).
    #[arg(long, value_enum, default_value_t = setup::SessionTransport::Tcp)]
    transport: setup::SessionTransport,
    /// Run Tether as the `tunnel-server` and `tunnel-edge` binaries beside this one, in
    /// child processes, and report their RSS (hold) instead of running them in-process.
    #[arg(long)]
    processes: bool,
    /// hol: send the bulk stream over a session of its own, to a second node whose edge
    /// runs on the first edge's thread (in-process) or as a second edge process (with
    /// --processes). Measures what a second connection for bulk streams could give the
    /// small requests at most: on one thread, and with a thread of its own at the edge.
    #[arg(long, conflicts_with_all = ["direct", "proxy", "relay", "unix_socket"])]
    bulk_session: bool,
    /// Start the edges with `server.lane = false`: bulk streams stay on the session (the
    /// baseline lanes are measured against).
    #[arg(long, conflicts_with_all = ["direct", "proxy", "relay", "unix_socket"])]
    no_lane: bool,
    /// No tunnel: connect straight to the target.
    #[arg(long, conflicts_with_all = ["proxy", "relay", "unix_socket", "processes"])]
    direct: bool,
    /// An external plain-HTTP CONNECT proxy to go through instead of Tether.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["relay", "processes"])]
    proxy: Option<SocketAddr>,
    /// A running Tether's CONNECT Unix socket (or any CONNECT proxy's) to go through; ask it
    /// for `--proxy-target`, which its edge must be allowed to dial.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["proxy", "relay", "processes"])]
    unix_socket: Option<std::path::PathBuf>,
    /// The target to ask the proxy for (default: the in-process target on 127.0.0.1).
    #[arg(long, value_name = "HOST:PORT")]
    proxy_target: Option<String>,
    /// A running process to report RSS growth of in `hold` (repeatable), e.g.
    /// `--attach server=$(pidof tunnel-server)`.
    #[arg(long, value_name = "NAME=PID", value_parser = Watched::parse)]
    attach: Vec<Watched>,
    /// A plain TCP relay in front of the target (haproxy, rathole): connect here instead.
    #[arg(long, value_name = "ADDR")]
    relay: Option<SocketAddr>,
    /// Port of the in-process target on 127.0.0.1 (0: any; relays need a fixed one).
    #[arg(long, default_value_t = 0)]
    target_port: u16,
    /// Port of the started Tether server's edge listener on 127.0.0.1, TCP and (for QUIC) UDP
    /// alike (0: any). A fixed port lets `lossy.sh` drop the session's packets and no others.
    #[arg(long, default_value_t = 0)]
    edge_port: u16,
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
    /// edges: edges to run against one server (one descriptor each here and in the server).
    #[arg(long, default_value_t = 1000)]
    edges: usize,
    /// edges: bound in seconds on each phase (all joined; all reconnected after the restart).
    #[arg(long, default_value_t = 120.0)]
    limit: f64,
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
    /// K edges on one server process: server RSS per edge, reconnect storm after a restart.
    Edges,
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
    anyhow::ensure!(
        cli.limit > 0.0 && cli.limit <= 3600.0,
        "--limit must be in (0, 3600] seconds"
    );
    // Thousands of held connections or edges need descriptors: raise the soft limit to the
    // hard one (children inherit it).
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("warning: could not raise the open-file limit: {e}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    setup::set_transport(cli.transport);
    setup::set_bulk_session(cli.bulk_session);
    setup::set_no_lane(cli.no_lane);
    let report = if let Scenario::Edges = cli.scenario {
        let opts = scenario::edges::EdgesOpts {
            edges: cli.edges,
            limit: Duration::from_secs_f64(cli.limit),
        };
        let label = cli.label.as_deref().unwrap_or("tether-processes");
        scenario::edges::run(opts, label).await?
    } else {
        run_path_scenario(cli).await?
    };
    if json {
        report.print_json();
    } else {
        report.print_table();
    }
    Ok(())
}

/// A scenario that drives load along a path to the in-process target.
async fn run_path_scenario(cli: Cli) -> anyhow::Result<report::Report> {
    anyhow::ensure!(
        cli.proxy_target.is_none() || cli.proxy.is_some() || cli.unix_socket.is_some(),
        "--proxy-target needs --proxy or --unix-socket"
    );
    anyhow::ensure!(
        cli.attach.is_empty() || matches!(cli.scenario, Scenario::Hold),
        "--attach is read by the hold scenario only"
    );
    let target = target::spawn(cli.target_port).context("start the target")?;
    let proxy_target = cli.proxy_target.unwrap_or_else(|| target.to_string());
    let mut watched = cli.attach;
    let (path, label) = if cli.direct {
        (Path::Tcp(target), "direct".to_owned())
    } else if let Some(relay) = cli.relay {
        (Path::Tcp(relay), format!("relay {relay}"))
    } else if let Some(proxy) = cli.proxy {
        let path = Path::Proxy {
            proxy,
            target: proxy_target,
        };
        (path, format!("proxy {proxy}"))
    } else if let Some(socket) = cli.unix_socket {
        let label = format!("proxy {}", socket.display());
        let path = Path::UnixProxy {
            socket,
            target: proxy_target,
        };
        (path, label)
    } else {
        let mode = if cli.processes {
            Mode::Processes
        } else {
            Mode::InProcess
        };
        let tether = setup::Tether::start(target.port(), cli.edge_port, cli.frontend, mode)
            .await
            .context("start Tether")?;
        watched.extend(tether.processes());
        let name = match (cli.frontend, mode) {
            (Frontend::Unix, Mode::InProcess) => "tether-unix",
            (Frontend::Tls, Mode::InProcess) => "tether-tls",
            (Frontend::Unix, Mode::Processes) => "tether-unix-procs",
            (Frontend::Tls, Mode::Processes) => "tether-tls-procs",
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
    let _progress = progress::Progress::timed(scenario_name(cli.scenario), opts.duration);
    let cpu_before: Vec<Option<f64>> = watched
        .iter()
        .map(|w| procs::cpu_seconds(w.pid).ok())
        .collect();
    // Keeps Tether's child processes alive until their CPU time is read.
    let _running = path.clone();
    let mut report = match cli.scenario {
        Scenario::Bulk => scenario::bulk::run(path, opts, &label).await,
        Scenario::Rr => scenario::rr::run(path, opts, &label).await,
        Scenario::Hol => scenario::rr::hol(path, opts, &label).await,
        Scenario::Connect => scenario::connect::run(path, opts, &label).await,
        Scenario::Hold => scenario::hold::run(path, opts, &label, &watched).await,
        Scenario::Edges => unreachable!("edges has no path"),
    }?;
    for (w, before) in watched.iter().zip(cpu_before) {
        if let (Some(before), Ok(after)) = (before, procs::cpu_seconds(w.pid)) {
            add_cpu_figures(&mut report, &w.name, after - before);
        }
    }
    Ok(report)
}

/// CPU a watched process used over the scenario (connection set-up included), and per unit
/// of work where the scenario counts one: per GB moved (`bulk`, both directions) and per
/// request (`rr`). How the thread default was held to issue 16's 10 % bound.
fn add_cpu_figures(report: &mut report::Report, name: &str, cpu_s: f64) {
    report.add(format!("{name}_cpu_ms"), cpu_s * 1e3, "ms");
    if let Some(requests) = report.get("requests").filter(|r| *r > 0.0) {
        report.add(
            format!("{name}_cpu_us_per_request"),
            cpu_s * 1e6 / requests,
            "µs",
        );
    }
    if let (Some(up), Some(down), Some(secs)) = (
        report.get("up_mb_s"),
        report.get("down_mb_s"),
        report.get("seconds"),
    ) {
        let gb = (up + down) * secs / 1e3;
        if gb > 0.0 {
            report.add(format!("{name}_cpu_ms_per_gb"), cpu_s * 1e3 / gb, "ms");
        }
    }
}

fn scenario_name(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Bulk => "bulk",
        Scenario::Rr => "rr",
        Scenario::Hol => "hol",
        Scenario::Connect => "connect",
        Scenario::Hold => "hold",
        Scenario::Edges => "edges",
    }
}
