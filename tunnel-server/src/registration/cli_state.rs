//! The operator commands against the etcd backend: when the server config (`--config`) says
//! `[state] backend = "etcd"`, `token create|list|revoke` and `node revoke` write to etcd (every
//! replica sees the change), and `tunnel-server state import` moves a file store there.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::state::config::Backend;
use super::state::etcd::{import, EtcdState};
use super::RegistrationConfig;
use crate::config::ServerConfig;

/// `tunnel-server state`.
#[derive(Subcommand, Debug)]
pub enum StateCommand {
    /// Copy the file store named by `[registration]` (token file, usage, identities,
    /// revocations) into the etcd `[state]` names. Keys already in etcd with another value
    /// stop the import unless --overwrite.
    Import(ImportArgs),
}

/// `tunnel-server state import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The server config: `[registration]` names the files, `[state]` the etcd cluster.
    #[arg(long, short, env = "TETHER_CONFIG")]
    pub config: PathBuf,
    /// Replace keys that exist in etcd with a different value.
    #[arg(long)]
    pub overwrite: bool,
}

/// A runtime for one command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The etcd store and `[registration]` the config at `path` names, if its backend is etcd.
pub fn etcd_store(
    rt: &tokio::runtime::Runtime,
    path: Option<&PathBuf>,
) -> anyhow::Result<Option<(EtcdState, RegistrationConfig)>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let config = ServerConfig::load(path)?;
    if config.state.backend != Backend::Etcd {
        return Ok(None);
    }
    let registration = config
        .registration
        .context("the server config has no [registration] section")?;
    let state = rt.block_on(EtcdState::open(&config.state))?;
    Ok(Some((state, registration)))
}

/// Run a `state` command.
pub fn run_state(command: StateCommand) -> anyhow::Result<()> {
    match command {
        StateCommand::Import(args) => {
            let rt = runtime()?;
            let (state, registration) =
                etcd_store(&rt, Some(&args.config))?.with_context(|| {
                    format!(
                        "{}: `[state] backend` is not \"etcd\": nothing to import into",
                        args.config.display()
                    )
                })?;
            let records = import::file_records(&state, &registration)?;
            let report = rt.block_on(state.import(records, args.overwrite))?;
            if !report.conflicts.is_empty() {
                for key in &report.conflicts {
                    eprintln!("differs in etcd: {key}");
                }
                anyhow::bail!(
                    "{} keys already hold other values in etcd; nothing written (--overwrite replaces them)",
                    report.conflicts.len()
                );
            }
            println!(
                "imported into etcd: {} keys written, {} already equal",
                report.written, report.unchanged
            );
            Ok(())
        }
    }
}

/// `tunnel-server edges --config SERVER.toml`: every live session of the fleet as the
/// replicas published them in etcd (a dead replica's vanish with its lease).
pub fn run_edges_from_store(
    config: &PathBuf,
    output: crate::admin::fleet::Output,
) -> anyhow::Result<()> {
    let rt = runtime()?;
    let (state, _) = etcd_store(&rt, Some(config))?.with_context(|| {
        format!(
            "{}: `[state] backend` is not \"etcd\"; ask the replicas' admin APIs (--admin)",
            config.display()
        )
    })?;
    let sessions = rt.block_on(state.list_sessions())?;
    match output {
        crate::admin::fleet::Output::Json => crate::admin::fleet::print_json(&sessions)?,
        crate::admin::fleet::Output::Table => {
            let rows: Vec<Vec<String>> = sessions
                .iter()
                .map(|s| {
                    let ips: Vec<String> = s.addresses.iter().map(ToString::to_string).collect();
                    vec![
                        s.node.clone(),
                        if ips.is_empty() {
                            "-".into()
                        } else {
                            ips.join(",")
                        },
                        s.replica.clone(),
                        tunnel_io::check::rfc3339(i64::try_from(s.since_unix).unwrap_or(i64::MAX)),
                        s.transport.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                crate::admin::fleet::table(
                    &["NODE", "IPS", "REPLICA", "SINCE", "TRANSPORT"],
                    &rows
                )
            );
        }
    }
    Ok(())
}

/// `tunnel-server node list --config SERVER.toml`: the nodes view the admin API gives, read
/// from etcd: identities (expired ones left out, as a replica does), revocations, and
/// "connected" when any replica publishes a session for the node.
pub fn run_node_list_from_store(
    config: &PathBuf,
    output: crate::admin::fleet::Output,
) -> anyhow::Result<()> {
    let rt = runtime()?;
    let (state, _) = etcd_store(&rt, Some(config))?.with_context(|| {
        format!(
            "{}: `[state] backend` is not \"etcd\"; ask a replica's admin API (--admin)",
            config.display()
        )
    })?;
    let ((revoked, mut identities, _), sessions) =
        rt.block_on(async { tokio::try_join!(state.read_views(), state.list_sessions()) })?;
    identities.prune(super::state::unix_now());
    let mut live = std::collections::BTreeMap::new();
    for session in sessions {
        live.entry(session.node)
            .or_insert_with(|| crate::admin::api::LiveNode {
                ips: session.addresses,
                ..Default::default()
            });
    }
    let response = crate::admin::api::NodesResponse {
        replica: String::new(),
        registration: true,
        nodes: crate::admin::api::node_views(&identities.nodes, &revoked, &live),
    };
    Ok(crate::admin::fleet::print_nodes(&response, output)?)
}
