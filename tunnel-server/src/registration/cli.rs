//! `tunnel-server token create|list|revoke` and `tunnel-server node revoke`: the operator's
//! side of the token and revocation files. The files are found through the server config's
//! `[registration]` section (`--config`) or named directly (`--file`); with `[state] backend =
//! "etcd"` in that config they go to etcd instead ([`super::cli_state`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::cli_state::{etcd_store, runtime};
use crate::config::ServerConfig;
use crate::registration::state::{self as tokens, NodePool, DEFAULT_TOKEN_TTL};

/// Which file to work on.
#[derive(Args, Debug)]
pub struct FileArgs {
    /// The server config; its `[registration]` section names the file.
    #[arg(long, short, env = "TETHER_CONFIG", conflicts_with = "file")]
    pub config: Option<PathBuf>,
    /// The file itself.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

/// Bootstrap tokens.
// Parsed once per process from argv: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print it (the only time the secret is shown).
    Create {
        #[command(flatten)]
        files: FileArgs,
        /// Node pool name.
        #[arg(long, default_value = "default")]
        pool: String,
        /// Kubelet label for nodes of the pool, `key=value`; repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Kubelet taint for nodes of the pool, `key=value:Effect`; repeatable.
        #[arg(long = "taint")]
        taints: Vec<String>,
        /// Extra local port the pool's nodes are expected to expose; an edge dials it only if
        /// its own `[allow] ports` lists it; repeatable.
        #[arg(long = "extra-port")]
        extra_ports: Vec<u16>,
        /// A network the joining node's IPs must lie in, e.g. 10.8.0.0/16; repeatable
        /// (default: any routable address).
        #[arg(long = "node-ip-cidr", value_name = "CIDR")]
        node_ip_cidrs: Vec<ipnet::IpNet>,
        /// Lifetime of the token.
        #[arg(long, value_parser = humantime, default_value = "24h")]
        ttl: Duration,
        /// Joins allowed (default: unlimited until expiry).
        #[arg(long)]
        usage_limit: Option<u32>,
        /// Node names allowed, glob with `*` (default: any).
        #[arg(long)]
        node_name_pattern: Option<String>,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// A joined node this token may re-provision: the join may take its name and IPs,
        /// which a join otherwise never can; repeatable.
        #[arg(long = "reprovision", value_name = "NODE")]
        reprovision: Vec<String>,
        /// After the token, print the command a node runs to join: the installer's and the
        /// bare `tunnel-edge join`, with the pin of the registration certificate's CA.
        /// Needs --config.
        #[arg(long)]
        print_join_command: bool,
        /// The registration API's address as nodes reach it (the load balancer's port 443),
        /// for --print-join-command.
        #[arg(long, value_name = "HOST:PORT", requires = "print_join_command")]
        server_address: Option<String>,
        /// The name nodes verify in the registration certificate when the host of
        /// --server-address is not one of its names.
        #[arg(long, requires = "print_join_command")]
        server_name: Option<String>,
    },
    /// List tokens (IDs, pools, expiry, uses; never secrets).
    List {
        #[command(flatten)]
        files: FileArgs,
    },
    /// Revoke a token by ID.
    Revoke {
        #[command(flatten)]
        files: FileArgs,
        /// The token ID (the part before the dot).
        id: String,
    },
}

/// Nodes.
#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List joined, connected and revoked nodes, with IPs, pool, certificate expiry and
    /// revocation time, from a running replica's admin API, or from etcd with --config.
    List(crate::admin::fleet::NodeListArgs),
    /// Remove a node: close its sessions and upstream streams, refuse every certificate
    /// issued to it until now and its re-joins; its edge is told "node revoked at …; re-join
    /// with a new token" and retries only at its maximum backoff.
    ///
    /// There is no "unrevoke": lifting the revocation would trust again every certificate
    /// issued before it, including a stolen one. To re-admit the node, create a token after
    /// the revocation that may re-provision it (`tunnel-server token create --reprovision
    /// NAME`) and run `tunnel-edge join --force` with it on the node: it gets a new key and a
    /// certificate issued after the revocation, and its old certificates stay refused. Its
    /// IPs stay taken until its certificates expire or it is re-admitted.
    Revoke {
        #[command(flatten)]
        files: FileArgs,
        /// The node name.
        name: String,
    },
}

fn humantime(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn registration(files: &FileArgs) -> anyhow::Result<crate::registration::RegistrationConfig> {
    let config = files
        .config
        .as_ref()
        .context("give --config SERVER.toml or --file FILE")?;
    let config = ServerConfig::load(config)?;
    config
        .registration
        .context("the server config has no [registration] section")
}

fn token_file(files: &FileArgs) -> anyhow::Result<PathBuf> {
    match &files.file {
        Some(f) => Ok(f.clone()),
        None => Ok(registration(files)?.token_file),
    }
}

fn revocation_file(files: &FileArgs) -> anyhow::Result<PathBuf> {
    match &files.file {
        Some(f) => Ok(f.clone()),
        None => Ok(registration(files)?.revocation_path()),
    }
}

/// Run a `token` command.
pub fn run_token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            files,
            pool,
            labels,
            taints,
            extra_ports,
            node_ip_cidrs,
            ttl,
            usage_limit,
            node_name_pattern,
            description,
            reprovision,
            print_join_command,
            server_address,
            server_name,
        } => {
            // Checked before the token exists: a printed command must work on the node.
            let join_target = if print_join_command {
                let config = files
                    .config
                    .as_ref()
                    .context("--print-join-command needs --config SERVER.toml (for the CA)")?;
                Some(super::join_command::join_target(
                    &ServerConfig::load(config)?,
                    server_address.as_deref(),
                    server_name.as_deref(),
                )?)
            } else {
                None
            };
            let mut label_map = BTreeMap::new();
            for label in labels {
                let (k, v) = label
                    .split_once('=')
                    .with_context(|| format!("--label {label:?}: want key=value"))?;
                label_map.insert(k.to_owned(), v.to_owned());
            }
            if let Some(port) = extra_ports.iter().find(|p| **p == 0) {
                anyhow::bail!("--extra-port {port}: not a port");
            }
            let pool = NodePool {
                name: pool,
                labels: label_map,
                taints,
                extra_ports,
                node_ip_cidrs,
            };
            let ttl = if ttl.is_zero() {
                DEFAULT_TOKEN_TTL
            } else {
                ttl
            };
            let spec = tokens::TokenSpec {
                pool,
                ttl,
                usage_limit,
                node_name_pattern,
                description,
                reprovision: reprovision
                    .iter()
                    .map(|n| {
                        protocol::NodeName::parse(n)
                            .map_err(|e| anyhow::anyhow!("--reprovision {n:?}: {e}"))
                    })
                    .collect::<anyhow::Result<_>>()?,
            };
            let rt = runtime()?;
            let (token, record, place) = match etcd_store(&rt, files.config.as_ref())? {
                Some((state, _)) => {
                    let (token, record) = rt.block_on(state.create_token(&spec))?;
                    (token, record, "etcd".to_owned())
                }
                None => {
                    let path = token_file(&files)?;
                    let (token, record) = tokens::create(
                        &path,
                        spec.pool,
                        spec.ttl,
                        spec.usage_limit,
                        spec.node_name_pattern,
                        spec.description,
                        spec.reprovision,
                    )?;
                    (token, record, path.display().to_string())
                }
            };
            eprintln!(
                "token {} for pool {:?} in {place} (expires at {})",
                record.id,
                record.pool.name,
                rfc3339(record.expires_unix)
            );
            // The one place a secret is printed: stdout, for the operator to hand to the node.
            println!("{}", token.expose());
            if let Some(target) = join_target {
                for line in super::join_command::join_command_lines(&target, &token.expose()) {
                    println!("{line}");
                }
            }
            Ok(())
        }
        TokenCommand::List { files } => {
            let rt = runtime()?;
            let listed = match etcd_store(&rt, files.config.as_ref())? {
                Some((state, _)) => rt.block_on(state.list_tokens())?,
                None => tokens::list(&token_file(&files)?)?,
            };
            let now = tokens::unix_now();
            println!(
                "ID      POOL            USES  LIMIT  EXPIRES               STATE    PATTERN  NETWORKS"
            );
            for (r, uses) in listed {
                let state = if r.revoked {
                    "revoked"
                } else if now >= r.expires_unix {
                    "expired"
                } else if r.usage_limit.is_some_and(|l| uses >= l) {
                    "used-up"
                } else {
                    "active"
                };
                println!(
                    "{:<7} {:<15} {:<5} {:<6} {:<21} {:<8} {:<8} {}",
                    r.id,
                    r.pool.name,
                    uses,
                    r.usage_limit
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "-".into()),
                    rfc3339(r.expires_unix),
                    state,
                    r.node_name_pattern.as_deref().unwrap_or("*"),
                    if r.pool.node_ip_cidrs.is_empty() {
                        "any".to_owned()
                    } else {
                        r.pool
                            .node_ip_cidrs
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { files, id } => {
            let rt = runtime()?;
            match etcd_store(&rt, files.config.as_ref())? {
                Some((state, _)) => rt.block_on(state.revoke_token(&id))?,
                None => tokens::revoke(&token_file(&files)?, &id)?,
            }
            println!("token {id} revoked");
            Ok(())
        }
    }
}

/// Run a `node` command.
pub fn run_node(command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::List(args) => match args.config.clone() {
            Some(config) => super::cli_state::run_node_list_from_store(&config, args.output),
            None => Ok(crate::admin::fleet::run_node_list(args)?),
        },
        NodeCommand::Revoke { files, name } => {
            let node = protocol::NodeName::parse(&name)
                .map_err(|e| anyhow::anyhow!("node name {name:?}: {e}"))?;
            let rt = runtime()?;
            let (at, place) = match etcd_store(&rt, files.config.as_ref())? {
                // Every replica watches etcd: its sessions close within milliseconds.
                Some((state, _)) => (rt.block_on(state.revoke_node(&node))?, "etcd".to_owned()),
                None => {
                    let path = revocation_file(&files)?;
                    let at = crate::revocation::revoke_node(&path, &node)?;
                    (at, path.display().to_string())
                }
            };
            println!(
                "node {node} revoked at {} ({place}); servers close its sessions within {:?}",
                rfc3339(at),
                crate::revocation::POLL_INTERVAL * 2
            );
            Ok(())
        }
    }
}

/// Unix seconds as RFC 3339: operators read these, not epoch seconds.
fn rfc3339(unix: u64) -> String {
    tunnel_io::check::rfc3339(i64::try_from(unix).unwrap_or(i64::MAX))
}
