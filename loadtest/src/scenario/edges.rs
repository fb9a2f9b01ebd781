//! `edges`: K edges on one server. Each edge is the tunnel-edge library in this process with
//! its own certificate (own node name and IP), its own TLS 1.3 + HTTP/2 session and its own
//! reconnect backoff; the server is the real `tunnel-server` binary in a child process, so its
//! RSS is its own. Measures the server's RSS per idle edge, then kills the server (SIGKILL, as
//! a crash would), starts it again on the same port and measures the reconnect storm: the time
//! until the restarted server routes every edge again.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tunnel_edge::{Edge, EdgeConfig, EdgeStatus};
use tunnel_server::pki::{self, Ca};

use crate::procs::{self, ChildGuard};
use crate::progress::Progress;
use crate::report::Report;

/// Knobs of this scenario.
#[derive(Clone, Copy)]
pub struct EdgesOpts {
    /// Edges to run.
    pub edges: usize,
    /// Bound on each phase (all joined, all reconnected).
    pub limit: Duration,
}

/// How long a session must have lasted for its backoff to reset. The default is 10 s; the
/// scenario uses less so that it need not idle that long before the restart, which leaves
/// the edges in the state a long uptime would (first retry after `reconnect.min`).
const STABLE_AFTER: &str = "2s";
/// Idle time after every edge joined, before RSS is read and the server is killed.
const SETTLE: Duration = Duration::from_millis(2500);

/// The `edges` scenario.
pub async fn run(opts: EdgesOpts, label: &str) -> anyhow::Result<Report> {
    anyhow::ensure!(opts.edges > 0, "--edges must be at least 1");
    anyhow::ensure!(
        opts.edges < 1 << 24,
        "--edges: at most 16.7 M edges (one 10/8 address each)"
    );
    // One descriptor per edge here and one in the server, plus headroom for files, listeners
    // and the reconnect overlap: fail now rather than after `--limit` of EMFILE retries.
    let (soft, _) = rlimit::Resource::NOFILE.get()?;
    let needed = opts.edges as u64 + 256;
    anyhow::ensure!(
        soft >= needed,
        "--edges {} needs at least {needed} open files per process, the limit is {soft} \
         (raise it with `ulimit -n`)",
        opts.edges
    );
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_owned();
    let issued = Instant::now();
    let layout = pki::init_ca_dir(&d, &[], &[], pki::SERVER_VALIDITY, true)?;
    let configs = {
        let d = d.clone();
        let ca = (layout.ca_cert(), layout.ca_key());
        let edges = opts.edges;
        tokio::task::spawn_blocking(move || issue_edges(&d, &ca.0, &ca.1, edges)).await??
    };
    let issue_secs = issued.elapsed().as_secs_f64();

    let server_config = d.join("server.toml");
    write_server_config(&server_config, &d, 0)?;
    let (mut server, ready) = start_server(&d)?;
    let edge_addr = procs::ready_addr(&ready, "edge")?;
    let admin = procs::ready_addr(&ready, "admin")?;
    // The restart must come back on the same port: pin it in the config.
    write_server_config(&server_config, &d, edge_addr.port())?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = procs::rss_bytes(server.pid())?;

    let cancel = CancellationToken::new();
    let mut statuses = Vec::with_capacity(configs.len());
    let mut tasks = tokio::task::JoinSet::new();
    let joining = Instant::now();
    for config in configs {
        let config = edge_config(&config, edge_addr)?;
        let edge = Arc::new(Edge::new(config).context("edge config")?);
        let status = Arc::new(EdgeStatus::default());
        statuses.push(status.clone());
        tasks.spawn(edge.run(status, cancel.child_token()));
        // Let the runtime start handshakes while the rest are built.
        tokio::task::yield_now().await;
    }
    let none = vec![0; statuses.len()];
    let join_secs =
        wait_all_routed("join", &statuses, &none, admin, &mut server, joining, opts).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_edges = procs::rss_bytes(server.pid())?;
    let before: Vec<u64> = statuses
        .iter()
        .map(|s| s.sessions.load(Ordering::Relaxed))
        .collect();

    // The reconnect storm.
    let restarted = Instant::now();
    server.kill();
    let (mut server, ready) = start_server(&d)?;
    let admin = procs::ready_addr(&ready, "admin")?;
    anyhow::ensure!(
        procs::ready_addr(&ready, "edge")? == edge_addr,
        "the restarted server did not get the same edge port"
    );
    // Sessions of the killed server may still look up until the edge reads its EOF: count
    // an edge only once it has made a session after the restart.
    let storm_secs = wait_all_routed(
        "reconnect",
        &statuses,
        &before,
        admin,
        &mut server,
        restarted,
        opts,
    )
    .await?;
    let sessions_after: u64 = statuses
        .iter()
        .map(|s| s.sessions.load(Ordering::Relaxed))
        .sum();
    let duplicates: u64 = statuses
        .iter()
        .map(|s| s.duplicates.load(Ordering::Relaxed))
        .sum();

    cancel.cancel();
    tasks.abort_all();
    drop(server);

    let k = opts.edges as f64;
    let mut report = Report::new("edges", label);
    report.add("edges", k, "");
    report.add("issue_secs", issue_secs, "s");
    report.add("join_secs", join_secs, "s");
    report.add("join_per_s", k / join_secs, "edges/s");
    report.add(
        "server_rss_idle_mib",
        rss_idle as f64 / (1 << 20) as f64,
        "MiB",
    );
    report.add("server_rss_mib", rss_edges as f64 / (1 << 20) as f64, "MiB");
    report.add(
        "server_rss_per_edge_kib",
        rss_edges.saturating_sub(rss_idle) as f64 / 1024.0 / k,
        "KiB",
    );
    report.add("storm_secs", storm_secs, "s");
    report.add(
        "storm_sessions_per_edge",
        sessions_after.saturating_sub(before.iter().sum()) as f64 / k,
        "",
    );
    report.add("duplicates", duplicates as f64, "");
    report.notes.push(format!(
        "server: tunnel-server child process; edges: tunnel-edge library here, \
         reconnect.stable_after = {STABLE_AFTER}; storm = SIGKILL of the server to every edge routed by the new one"
    ));
    Ok(report)
}

/// Wait until every edge is up on a session made after the `after[i]` it had already made,
/// and the server's `edges_connected` gauge counts them all; returns the seconds since
/// `since`.
async fn wait_all_routed(
    phase: &str,
    statuses: &[Arc<EdgeStatus>],
    after: &[u64],
    admin: SocketAddr,
    server: &mut ChildGuard,
    since: Instant,
    opts: EdgesOpts,
) -> anyhow::Result<f64> {
    let deadline = since + opts.limit;
    let progress = Progress::count(phase, opts.edges as u64);
    let mut routed = 0;
    loop {
        let up = statuses
            .iter()
            .zip(after)
            .filter(|(s, after)| {
                s.sessions.load(Ordering::Relaxed) > **after && s.connected.load(Ordering::Acquire)
            })
            .count();
        if up == opts.edges {
            routed = edges_connected(admin).await.unwrap_or(0);
        }
        progress.set(up as u64);
        if routed == opts.edges {
            progress.finish();
            return Ok(since.elapsed().as_secs_f64());
        }
        server.check_running()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "{phase}: {up} of {} edges up, {routed} routed by the server within {:?}",
            opts.edges,
            opts.limit
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server's `edges_connected` gauge, from its admin `/metrics`.
async fn edges_connected(admin: SocketAddr) -> anyhow::Result<usize> {
    let mut tcp = tokio::net::TcpStream::connect(admin).await?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut body)).await??;
    body.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("tether_edges_connected")?;
            rest.split_whitespace().last()?.parse().ok()
        })
        .context("no tether_edges_connected in /metrics")
}

fn start_server(d: &Path) -> anyhow::Result<(ChildGuard, serde_json::Value)> {
    procs::spawn_server(
        &d.join("server.toml"),
        &d.join("ready.json"),
        &d.join("server.log"),
    )
}

fn write_server_config(path: &Path, d: &Path, edge_port: u16) -> anyhow::Result<()> {
    std::fs::write(
        path,
        format!(
            "[edge]\nlisten = \"127.0.0.1:{edge_port}\"\ncert = \"server.pem\"\nkey = \"server-key.pem\"\nclient_ca = \"ca.pem\"\n\
             [connect]\nunix_socket = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nfilter = \"warn\"\n",
            d.join("connect.sock").display()
        ),
    )
    .with_context(|| format!("write {}", path.display()))
}

/// Certificate and key files of one edge.
struct EdgeFiles {
    cert: PathBuf,
    key: PathBuf,
}

/// Issue `n` edge certificates, `edge-00001`.. with IPs 10.0.0.1.., into `d/edges/`.
fn issue_edges(
    d: &Path,
    ca_cert: &Path,
    ca_key: &Path,
    n: usize,
) -> anyhow::Result<Vec<EdgeFiles>> {
    let ca = Ca::load(ca_cert, ca_key)?;
    let dir = d.join("edges");
    std::fs::create_dir_all(&dir)?;
    (1..=n)
        .map(|i| {
            let node = protocol::NodeName::parse(&format!("edge-{i:05}"))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 | i as u32));
            let issued = ca.issue_edge(&node, &[ip], pki::EDGE_VALIDITY)?;
            let files = EdgeFiles {
                cert: dir.join(format!("{i}.pem")),
                key: dir.join(format!("{i}-key.pem")),
            };
            pki::write_pem(&files.cert, &issued.cert_pem, false, true)?;
            pki::write_pem(&files.key, &issued.key_pem, true, true)?;
            Ok(files)
        })
        .collect()
}

/// One edge's config: the server, its files, default backoff but a short `stable_after`.
fn edge_config(files: &EdgeFiles, server: SocketAddr) -> anyhow::Result<EdgeConfig> {
    let base = files
        .cert
        .parent()
        .and_then(Path::parent)
        .context("edge dir")?;
    let text = format!(
        "[server]\naddress = \"{server}\"\ntransport = \"tcp\"\nserver_name = \"127.0.0.1\"\nca = \"ca.pem\"\ncert = \"{}\"\nkey = \"{}\"\n\
         [reconnect]\nstable_after = \"{STABLE_AFTER}\"\n[allow]\nports = [10250]\n",
        files.cert.display(),
        files.key.display()
    );
    EdgeConfig::parse(&text, "edges scenario", base).map_err(|e| anyhow::anyhow!("{e}"))
}
