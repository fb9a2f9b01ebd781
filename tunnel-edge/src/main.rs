//! `tunnel-edge`: keep this node's tunnel session with tunnel-server and dial the local
//! kubelet for the streams it carries.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tunnel_edge::{Edge, EdgeConfig, EdgeStatus};
use tunnel_io::logging::LogFormat;

/// Tether's node side: dials out to tunnel-server through the load balancer and carries
/// kube-apiserver's connections to this node's kubelet, within a default-deny allowlist.
#[derive(Parser)]
#[command(name = "tunnel-edge", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge. Settings come from --config and/or the flags (flags win).
    Run(Overrides),
    /// Validate a config file and exit.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct Overrides {
    /// Config file (TOML).
    #[arg(long, short, env = "TETHER_EDGE_CONFIG")]
    config: Option<PathBuf>,
    /// tunnel-server address, host:port (port defaults to 9000).
    #[arg(long, env = "TETHER_SERVER")]
    server: Option<String>,
    /// Name to verify in the server certificate (default: the host of --server).
    #[arg(long, env = "TETHER_SERVER_NAME")]
    server_name: Option<String>,
    /// CA bundle that issued the server certificate.
    #[arg(long, env = "TETHER_CA")]
    ca: Option<PathBuf>,
    /// This node's certificate.
    #[arg(long, env = "TETHER_CERT")]
    cert: Option<PathBuf>,
    /// This node's private key.
    #[arg(long, env = "TETHER_KEY")]
    key: Option<PathBuf>,
    /// Dial targets naming this node at this address (e.g. 127.0.0.1).
    #[arg(long, env = "TETHER_SELF_HOST")]
    self_host: Option<IpAddr>,
    /// Ports allowed on this node (replaces `allow.ports`; repeatable).
    #[arg(long = "allow-port")]
    allow_ports: Vec<u16>,
    /// Log format (text or json).
    #[arg(long, env = "TETHER_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

fn load(o: Overrides) -> anyhow::Result<EdgeConfig> {
    let mut config = match &o.config {
        Some(path) => EdgeConfig::load(path)?,
        None => EdgeConfig::default(),
    };
    let s = &mut config.server;
    s.address = o.server.or(s.address.take());
    s.server_name = o.server_name.or(s.server_name.take());
    s.ca = o.ca.or(s.ca.take());
    s.cert = o.cert.or(s.cert.take());
    s.key = o.key.or(s.key.take());
    if o.self_host.is_some() {
        config.dial.self_host = o.self_host;
    }
    if !o.allow_ports.is_empty() {
        config.allow.ports = o.allow_ports;
    }
    if let Some(f) = o.log_format {
        config.log.format = f;
    }
    let origin = o
        .config
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<flags>".into());
    config
        .validate()
        .map_err(|m| anyhow::anyhow!("{origin}: {m}"))?;
    Ok(config)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::CheckConfig { file } => {
            let config = load(Overrides {
                config: Some(file.clone()),
                server: None,
                server_name: None,
                ca: None,
                cert: None,
                key: None,
                self_host: None,
                allow_ports: vec![],
                log_format: None,
            })?;
            let edge = Edge::new(config)?;
            println!("{}: ok (node {})", file.display(), edge.node());
            Ok(())
        }
        Command::Run(overrides) => {
            let config = load(overrides)?;
            tunnel_io::logging::init(config.log.format, &config.log.filter);
            let edge = Arc::new(Edge::new(config)?);
            tracing::info!(node = %edge.node(), "tunnel-edge starting");
            // One thread: an edge carries one node's traffic, and a single-threaded runtime
            // measured fastest per core for TLS + HTTP/2.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let cancel = CancellationToken::new();
                let status = Arc::new(EdgeStatus::default());
                let run = tokio::spawn(edge.run(status, cancel.clone()));
                wait_for_signal().await?;
                tracing::info!(
                    "shutting down: finishing in-flight streams; a second signal exits at once"
                );
                cancel.cancel();
                tokio::select! {
                    _ = run => {}
                    _ = wait_for_signal() => tracing::warn!("second signal: exiting now"),
                }
                anyhow::Ok(())
            })
        }
    }
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
