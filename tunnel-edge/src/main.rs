//! `tunnel-edge`: keep this node's tunnel session with tunnel-server and dial the local
//! kubelet for the streams it carries.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tunnel_edge::proxy::Egress;
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
    /// Join the cluster: exchange a bootstrap token for this node's certificate and write it,
    /// the CA and the node pool's labels and taints into the state directory.
    Join(JoinArgs),
    /// Validate a config file and every file it names (CA, certificate, key: parsed, matched,
    /// within validity), print what was found, and exit.
    CheckConfig {
        /// The config file.
        file: PathBuf,
        /// State directory written by `tunnel-edge join` (overrides the file's `state_dir`).
        #[arg(long, env = "TETHER_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Print shell completions to stdout (`completions bash > /etc/bash_completion.d/tunnel-edge`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout (`man > /usr/share/man/man1/tunnel-edge.1`).
    Man,
}

#[derive(clap::Args)]
struct JoinArgs {
    /// Registration API of the load balancer, `https://host[:443]`.
    #[arg(long, env = "TETHER_JOIN_SERVER")]
    server: String,
    /// Name to verify in its certificate (default: the host of --server).
    #[arg(long, env = "TETHER_SERVER_NAME")]
    server_name: Option<String>,
    /// CA bundle to verify the registration API with.
    #[arg(long, env = "TETHER_CA", required_unless_present = "ca_hash")]
    ca: Option<PathBuf>,
    /// Instead of --ca: pin of the CA that issued the registration API's certificate,
    /// `sha256:<hex of its SubjectPublicKeyInfo>` (as kubeadm's discovery hash), printed by
    /// `tunnel-server token create --print-join-command`. The CA is taken from the server's
    /// chain only if it has this pin, and kept in the state directory.
    #[arg(long, env = "TETHER_CA_HASH", conflicts_with = "ca")]
    ca_hash: Option<String>,
    /// Bootstrap token `<id>.<secret>` (prefer --token-file or the env var: argv is visible
    /// to other users).
    #[arg(
        long,
        env = "TETHER_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// File holding the bootstrap token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// This node's Kubernetes name.
    #[arg(long)]
    node_name: String,
    /// This node's IP (what kube-apiserver dials); repeatable.
    #[arg(long = "node-ip")]
    node_ips: Vec<IpAddr>,
    /// Where to keep the key, certificate, CA and pool settings.
    #[arg(long, default_value = tunnel_edge::join::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Join again even if the state directory holds a valid certificate for this identity.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    egress: EgressArgs,
}

/// The egress proxy, for `join` and `run`.
#[derive(clap::Args, Default)]
struct EgressArgs {
    /// HTTP CONNECT proxy to reach the load balancer through,
    /// `http://[user:password@]host:port` (percent-encoded user and password). Default:
    /// `https_proxy`, `HTTPS_PROXY`, `all_proxy`, `ALL_PROXY`, as curl reads them; `''`
    /// connects directly whatever the environment says.
    #[arg(long)]
    proxy: Option<String>,
    /// Hosts to reach directly although a proxy is set: comma-separated names (and the names
    /// below them), IP addresses and CIDRs, or `*`. Default: `no_proxy`, `NO_PROXY`.
    #[arg(long)]
    no_proxy: Option<String>,
}

#[derive(clap::Args)]
struct Overrides {
    /// State directory written by `tunnel-edge join`: supplies the CA, certificate and key
    /// (unless given), the pool's extra ports, and enables certificate renewal.
    #[arg(long, env = "TETHER_STATE_DIR")]
    state_dir: Option<PathBuf>,
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
    /// Dial targets naming this node at this address (e.g. 127.0.0.1), instead of the
    /// node's certificate IP (name targets) and the node IP itself (IP targets).
    #[arg(long, env = "TETHER_SELF_HOST")]
    self_host: Option<IpAddr>,
    /// Ports allowed on this node (replaces `allow.ports`; repeatable).
    #[arg(long = "allow-port")]
    allow_ports: Vec<u16>,
    /// Log format (text or json).
    #[arg(long, env = "TETHER_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Session transport: auto (QUIC, TCP when UDP is blocked), quic or tcp.
    #[arg(long, env = "TETHER_TRANSPORT")]
    transport: Option<tunnel_edge::config::Transport>,
    #[command(flatten)]
    egress: EgressArgs,
}

fn load(o: Overrides) -> anyhow::Result<EdgeConfig> {
    let mut config = match &o.config {
        Some(path) => EdgeConfig::load(path)?,
        None => EdgeConfig::default(),
    };
    // The flag wins over the file's `state_dir`; either way the rest of the run (renewal
    // included) uses the one that was applied.
    if o.state_dir.is_some() {
        config.state_dir = o.state_dir.clone();
    }
    if let Some(dir) = config.state_dir.clone() {
        tunnel_edge::join::apply_state(&mut config, &tunnel_edge::join::StateDir::new(&dir))
            .map_err(|e| {
                anyhow::anyhow!(
                    "state_dir {}: {e:#} (run `tunnel-edge join --state-dir {}` first)",
                    dir.display(),
                    dir.display()
                )
            })?;
    }
    let s = &mut config.server;
    s.address = o.server.or(s.address.take());
    s.server_name = o.server_name.or(s.server_name.take());
    s.ca = o.ca.or(s.ca.take());
    s.cert = o.cert.or(s.cert.take());
    s.key = o.key.or(s.key.take());
    s.proxy = o.egress.proxy.or(s.proxy.take());
    s.no_proxy = o.egress.no_proxy.or(s.no_proxy.take());
    if let Some(transport) = o.transport {
        s.transport = transport;
    }
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
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "tunnel-edge",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => Ok(clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?),
        Command::CheckConfig { file, state_dir } => {
            let config = load(Overrides {
                state_dir,
                config: Some(file.clone()),
                server: None,
                server_name: None,
                ca: None,
                cert: None,
                key: None,
                self_host: None,
                allow_ports: vec![],
                log_format: None,
                transport: None,
                egress: EgressArgs::default(),
            })?;
            let lines = tunnel_edge::check::check_files(&config, tunnel_io::check::unix_now())?;
            let egress = egress_from_env(&config)?;
            let edge = Edge::with_egress(config, egress)?;
            println!("{}: ok (node {})", file.display(), edge.node());
            println!("  servers reached: {}", edge.egress());
            for line in lines {
                println!("  {line}");
            }
            Ok(())
        }
        Command::Join(args) => join(args),
        Command::Run(overrides) => {
            let config = load(overrides)?;
            let state_dir = config.state_dir.clone();
            tunnel_io::logging::init(config.log.format, &config.log.filter);
            if let Some(dir) = &state_dir {
                let state = tunnel_edge::join::StateDir::new(dir);
                let ignored =
                    tunnel_edge::join::cloud_ports_not_allowed(&config.allow.ports, &state);
                if !ignored.is_empty() {
                    tracing::warn!(
                        ports = ?ignored,
                        "ports sent by the server at join are not in this edge's [allow] ports and will not be dialed; list them there to expose them"
                    );
                }
            }
            let egress = egress_from_env(&config)?;
            tracing::info!(egress = %egress, "how servers are reached");
            let edge = Arc::new(Edge::with_egress(config, egress)?);
            match edge.self_dial().name_host() {
                Some(host) => {
                    tracing::info!(node = %edge.node(), name_targets = %host, "tunnel-edge starting")
                }
                None => tracing::warn!(
                    node = %edge.node(),
                    "tunnel-edge starting; targets naming this node will be refused: its \
                     certificate has no IP address and dial.self_host is unset"
                ),
            }
            // One thread: an edge carries one node's traffic, and a single-threaded runtime
            // measured fastest per core for TLS + HTTP/2.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let cancel = CancellationToken::new();
                let status = Arc::new(EdgeStatus::default());
                if let Some(dir) = state_dir {
                    let state = tunnel_edge::join::StateDir::new(dir);
                    tokio::spawn(tunnel_edge::renew::renew_loop(
                        edge.clone(),
                        state,
                        Arc::default(),
                        cancel.clone(),
                    ));
                }
                let forwards = tokio_util::task::TaskTracker::new();
                if let Some(listen) = edge.config().admin.listen {
                    tunnel_edge::admin::start(edge.clone(), listen, &forwards, cancel.clone())
                        .await?;
                }
                let rules = edge.config().forward.clone();
                tunnel_edge::forward::Forwarder::new(edge.clone())
                    .start(&rules, &forwards, cancel.clone())
                    .await?;
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

fn join(args: JoinArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    tunnel_io::logging::init(LogFormat::Text, "warn");
    // A malformed pin is refused before anything else is read or sent.
    let trust = match (&args.ca_hash, &args.ca) {
        (Some(hash), _) => tunnel_edge::join::JoinTrust::Pin(
            tunnel_io::ca_pin::CaPin::parse(hash.trim())
                .map_err(|e| anyhow::anyhow!("--ca-hash: {e}; nothing was sent"))?,
        ),
        (None, Some(ca)) => tunnel_edge::join::JoinTrust::CaFile(ca.clone()),
        (None, None) => anyhow::bail!("give --ca FILE or --ca-hash sha256:..."),
    };
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("read {}", f.display()))?
            .trim()
            .to_owned(),
        (None, None) => anyhow::bail!("give --token, --token-file or TETHER_JOIN_TOKEN"),
    };
    if args.node_ips.is_empty() {
        eprintln!(
            "warning: no --node-ip given: node {} is reachable by name only; kube-apiserver \
             dials node IPs by default, so give --node-ip for each InternalIP of this node",
            args.node_name
        );
    }
    let options = tunnel_edge::join::JoinOptions {
        server: args.server,
        server_name: args.server_name,
        trust,
        token: tunnel_io::secret::Secret::new(token),
        node_name: args.node_name,
        node_ips: args.node_ips,
        state: tunnel_edge::join::StateDir::new(&args.state_dir),
        force: args.force,
        egress: Egress::resolve(
            args.egress.proxy.as_deref(),
            args.egress.no_proxy.as_deref(),
            |name| std::env::var(name).ok(),
        )?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match runtime.block_on(tunnel_edge::join::join(&options))? {
        tunnel_edge::join::Joined::Joined => println!(
            "joined as {}; certificate valid until {}; credentials in {}",
            options.node_name,
            valid_until(&options.state),
            args.state_dir.display()
        ),
        tunnel_edge::join::Joined::AlreadyJoined => println!(
            "already joined as {} ({} holds a certificate valid until {}); --force joins again",
            options.node_name,
            args.state_dir.display(),
            valid_until(&options.state)
        ),
    }
    Ok(())
}

/// The expiry of the state directory's certificate, RFC 3339.
fn valid_until(state: &tunnel_edge::join::StateDir) -> String {
    match tunnel_edge::join::certificate_window(&state.cert()) {
        Ok((_, not_after)) => tunnel_io::check::rfc3339(not_after),
        Err(e) => format!("<unreadable: {e}>"),
    }
}

/// The config's proxy settings, completed from the process environment as curl does.
fn egress_from_env(config: &EdgeConfig) -> anyhow::Result<Egress> {
    let s = &config.server;
    Ok(Egress::resolve(
        s.proxy.as_deref(),
        s.no_proxy.as_deref(),
        |name| std::env::var(name).ok(),
    )?)
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
