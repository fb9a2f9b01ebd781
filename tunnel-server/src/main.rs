//! `tunnel-server`: run the server, check a config, manage certificates, or run the demo.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tunnel_io::logging::LogFormat;
use tunnel_server::config::ServerConfig;
use tunnel_server::pki;
use tunnel_server::RunningServer;

/// Tether's cloud side: accepts edge sessions (TLS + HTTP/2) and carries kube-apiserver's
/// egress connections (HTTP CONNECT) to the right node's kubelet.
#[derive(Parser)]
#[command(name = "tunnel-server", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server from a TOML config file.
    Run(RunArgs),
    /// Parse and validate a config file, print what would run, and exit.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Certificate authority tasks (until the join flow replaces manual issuance).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Bootstrap tokens for joining nodes (the `[registration]` token file).
    #[command(subcommand)]
    Token(tunnel_server::registration::cli::TokenCommand),
    /// Nodes: list them (live, from the admin API) and remove them (the `[registration]`
    /// revocation file).
    #[command(subcommand)]
    Node(tunnel_server::registration::cli::NodeCommand),
    /// List the edge sessions of one or more running replicas (their admin API): node, IPs,
    /// replica, since, streams, bytes each way, transport, certificate serial and expiry.
    Edges(tunnel_server::admin::fleet::EdgesArgs),
    /// The shared control state: `import` copies a file store into etcd.
    #[command(subcommand)]
    State(tunnel_server::registration::cli_state::StateCommand),
    /// Start a server, an edge named `demo-node` and a demo kubelet on loopback, make one
    /// request through the tunnel, print ready-to-paste curl commands, run until Ctrl-C.
    Demo {
        /// Keep certificates and the Unix socket here (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Make the request and exit instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Print shell completions to stdout (`completions bash > /etc/bash_completion.d/tunnel-server`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout (`man > /usr/share/man/man1/tunnel-server.1`).
    Man,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Config file (TOML).
    #[arg(long, short, env = "TETHER_CONFIG")]
    config: PathBuf,
    /// Override `edge.listen`.
    #[arg(long, env = "TETHER_EDGE_LISTEN")]
    edge_listen: Option<SocketAddr>,
    /// Override `admin.listen`.
    #[arg(long, env = "TETHER_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Override `connect.tcp_listen`.
    #[arg(long, env = "TETHER_CONNECT_LISTEN")]
    connect_listen: Option<SocketAddr>,
    /// Override `log.format` (text or json).
    #[arg(long, env = "TETHER_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Once every listener is bound, write their addresses here as JSON.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Threads [default: the cores this process may use]. One replica carries every node's
    /// traffic, so by default it uses every core it is given: N shards (one thread and
    /// single-threaded runtime each) that TCP edge sessions are spread over, each session's
    /// CONNECT streams running on its shard, plus a pool of N threads for the rest (accepts,
    /// QUIC sessions, Konnectivity, registration, admin). 1 runs everything on one thread:
    /// the cheapest where cores are few and shared.
    #[arg(long, env = "TETHER_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// How long in-flight streams may run after SIGTERM before the process exits.
    #[arg(long, value_parser = humantime_parse, default_value = "30s")]
    shutdown_grace: Duration,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the tunnel CA, the server certificate, the frontend CA and an apiserver client
    /// certificate in DIR.
    Init {
        /// Directory to create the files in.
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS name for the server certificate; repeatable. Every name a client dials
        /// must be here: the load balancer's (edges) and, for the mTLS frontend, the one in
        /// kube-apiserver's egress config (docs/QUICKSTART.md, "Choosing the server
        /// certificate's names").
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Extra IP address for the server certificate; repeatable.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue an edge client certificate: its identity is the node name and node IPs.
    IssueEdge {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The Kubernetes node name.
        #[arg(long)]
        node_name: String,
        /// The node's IPs (what kube-apiserver dials); repeatable.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Where to write NODE.pem and NODE-key.pem.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime.
        #[arg(long, value_parser = humantime_parse, default_value = "30days")]
        validity: Duration,
    },
    /// Issue another client certificate for the mTLS CONNECT frontend (from the frontend CA).
    IssueClient {
        /// Directory holding frontend-ca.pem and frontend-ca-key.pem.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Common name of the client.
        #[arg(long)]
        name: String,
        /// Where to write NAME.pem and NAME-key.pem.
        #[arg(long)]
        out: PathBuf,
    },
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "tunnel-server",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => Ok(clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?),
        Command::Run(args) => run(args),
        Command::CheckConfig { file } => {
            let config = ServerConfig::load(&file)?;
            let report = tunnel_server::check::check_files(&config, tunnel_io::check::unix_now())
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!("{}: ok", file.display());
            for line in report {
                println!("{line}");
            }
            Ok(())
        }
        Command::Ca(ca) => run_ca(ca),
        Command::Token(t) => tunnel_server::registration::cli::run_token(t),
        Command::Node(n) => tunnel_server::registration::cli::run_node(n),
        Command::Edges(args) => match args.config.clone() {
            Some(config) => {
                tunnel_server::registration::cli_state::run_edges_from_store(&config, args.output)
            }
            None => Ok(tunnel_server::admin::fleet::run_edges(args)?),
        },
        Command::State(s) => tunnel_server::registration::cli_state::run_state(s),
        Command::Demo { dir, once } => {
            tunnel_io::logging::init(LogFormat::Text, "warn");
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(tunnel_server::demo::run(dir, once))
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = ServerConfig::load(&args.config)?;
    if let Some(a) = args.edge_listen {
        config.edge.listen = a;
    }
    if let Some(a) = args.admin_listen {
        config.admin.listen = Some(a);
    }
    if let Some(a) = args.connect_listen {
        config.connect.tcp_listen = Some(a);
    }
    if let Some(f) = args.log_format {
        config.log.format = f;
    }
    config
        .validate()
        .map_err(|m| anyhow::anyhow!("{}: {m}", args.config.display()))?;
    tunnel_io::logging::init(config.log.format, &config.log.filter);
    let threads = args.worker_threads.unwrap_or_else(available_cores);
    tracing::info!(
        worker_threads = threads,
        shards = if threads > 1 { threads } else { 0 },
        "starting runtime"
    );
    let (runtime, shards) = if threads <= 1 {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        (runtime, tunnel_server::shards::Shards::none())
    } else {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?;
        let shards =
            tunnel_server::shards::Shards::start(threads).context("start shard threads")?;
        (runtime, shards)
    };
    runtime.block_on(async move {
        let server = RunningServer::start_sharded(config, shards).await?;
        if let Some(path) = &args.ready_file {
            write_ready_file(path, &server.addrs)?;
        }
        wait_for_signal().await?;
        tracing::info!(
            grace_ms = args.shutdown_grace.as_millis() as u64,
            "shutting down; a second signal exits at once"
        );
        tokio::select! {
            _ = server.shutdown(args.shutdown_grace) => {}
            _ = wait_for_signal() => tracing::warn!("second signal: exiting now"),
        }
        Ok(())
    })
}

/// Cores this process may run on (its CPU affinity and cgroup quota), 1 if unknown.
fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn write_ready_file(path: &Path, addrs: &tunnel_server::BoundAddrs) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(addrs)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn run_ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init {
            dir,
            dns,
            ips,
            force,
        } => {
            let layout = pki::init_ca_dir(&dir, &dns, &ips, pki::SERVER_VALIDITY, force)?;
            println!("created in {}:", layout.dir.display());
            for p in [
                layout.ca_cert(),
                layout.ca_key(),
                layout.server_cert(),
                layout.server_key(),
                layout.frontend_ca_cert(),
                layout.frontend_ca_key(),
                layout.frontend_client_cert(),
                layout.frontend_client_key(),
            ] {
                println!("  {}", p.display());
            }
            // Which names the server answers to is what a first deployment gets wrong.
            let server = tunnel_io::check::cert_and_key(
                "server",
                &layout.server_cert(),
                "server key",
                &layout.server_key(),
                tunnel_io::check::unix_now(),
            )?;
            println!("server certificate: {}", server.describe());
            Ok(())
        }
        CaCommand::IssueEdge {
            ca_dir,
            node_name,
            ips,
            out,
            validity,
        } => {
            let layout = pki::CaLayout { dir: ca_dir };
            let ca = pki::Ca::load(&layout.ca_cert(), &layout.ca_key())?;
            let node = protocol::NodeName::parse(&node_name)
                .map_err(|e| anyhow::anyhow!("--node-name {node_name:?}: {e}"))?;
            let issued = ca.issue_edge(&node, &ips, validity)?;
            std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
            let cert = out.join(format!("{node}.pem"));
            let key = out.join(format!("{node}-key.pem"));
            pki::write_pem(&cert, &issued.cert_pem, false, true)?;
            pki::write_pem(&key, &issued.key_pem, true, true)?;
            println!("{}\n{}", cert.display(), key.display());
            Ok(())
        }
        CaCommand::IssueClient { ca_dir, name, out } => {
            let layout = pki::CaLayout { dir: ca_dir };
            let ca = pki::Ca::load(&layout.frontend_ca_cert(), &layout.frontend_ca_key())?;
            let issued = ca.issue_client(&name, pki::FRONTEND_CLIENT_VALIDITY)?;
            std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
            let cert = out.join(format!("{name}.pem"));
            let key = out.join(format!("{name}-key.pem"));
            pki::write_pem(&cert, &issued.cert_pem, false, true)?;
            pki::write_pem(&key, &issued.key_pem, true, true)?;
            println!("{}\n{}", cert.display(), key.display());
            Ok(())
        }
    }
}
