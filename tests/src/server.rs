//! `tunnel-server run` as a child process: its config written into a temporary directory,
//! readiness from its ready file, its audit log read for edge sessions, crash and restart on
//! the same edge port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::pki::Pki;
use crate::poll_until;
use crate::process::ChildGuard;

/// How long a server may take to bind its listeners and write the ready file.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an edge may take to establish its session.
pub const EDGE_UP_TIMEOUT: Duration = Duration::from_secs(15);
/// Written into the server log between two runs.
const RESTART_MARKER: &str = "===== restarted by the test =====\n";
/// The server's audit message for a new edge session.
pub const EDGE_ESTABLISHED: &str = "edge session established";
/// The server's audit message for an edge session's end.
pub const EDGE_ENDED: &str = "edge session ended";

/// Settings of a test server that differ between tests.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `policy.allowed_ports`.
    pub allowed_ports: Vec<u16>,
    /// Log as JSON lines instead of text.
    pub log_json: bool,
    /// `connect.max_head_bytes`.
    pub max_head_bytes: usize,
    /// `[replica] id` and `count`; unset: the server's defaults (one replica).
    pub replica: Option<(String, usize)>,
    /// `edge.proxy_protocol`: expect a PROXY header from a load balancer.
    pub proxy_protocol: bool,
    /// `edge.ping_interval`.
    pub ping_interval: Duration,
    /// `edge.ping_misses`.
    pub ping_misses: u32,
    /// `connect.dial_timeout`.
    pub dial_timeout: Duration,
    /// `connect.idle_timeout` (`None`: the server's default).
    pub idle_timeout: Option<Duration>,
    /// `edge.max_pending_dials` (`None`: the server's default).
    pub max_pending_dials: Option<usize>,
    /// `--shutdown-grace`.
    pub shutdown_grace: Duration,
    /// More `[edge]` lines (limits, timeouts), verbatim.
    pub edge_extra: String,
    /// More sections (`[upstreams]`, say) at the end of the file, verbatim.
    pub extra_sections: String,
    /// `--worker-threads` (`None`: the server's default, the cores it may use).
    pub worker_threads: Option<usize>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            allowed_ports: vec![10250],
            log_json: false,
            max_head_bytes: 16 << 10,
            replica: None,
            proxy_protocol: false,
            ping_interval: Duration::from_millis(500),
            ping_misses: 3,
            dial_timeout: Duration::from_secs(5),
            idle_timeout: None,
            max_pending_dials: None,
            shutdown_grace: Duration::from_secs(1),
            edge_extra: String::new(),
            extra_sections: String::new(),
            worker_threads: None,
        }
    }
}

/// A duration as the config files spell it (`humantime`), to the millisecond.
fn toml_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// Where a server listens, from its ready file.
#[derive(Debug, Clone)]
pub struct ServerAddrs {
    /// Edge listener.
    pub edge: SocketAddr,
    /// Edge listener on UDP (QUIC), when enabled.
    pub edge_quic: Option<SocketAddr>,
    /// mTLS CONNECT frontend.
    pub connect_tcp: SocketAddr,
    /// CONNECT frontend Unix socket.
    pub connect_unix: PathBuf,
    /// Admin endpoint.
    pub admin: SocketAddr,
}

/// A `tunnel-server run` process with both CONNECT frontends and the admin endpoint.
pub struct ServerProc {
    /// Where it listens now.
    pub addrs: ServerAddrs,
    config: PathBuf,
    ready_file: PathBuf,
    launch: Launch,
    child: ChildGuard,
    dir: tempfile::TempDir,
}

impl ServerProc {
    /// Write the config, start the server and wait until every listener is bound.
    pub async fn start(pki: &Pki, options: &ServerOptions) -> ServerProc {
        let dir = tempfile::Builder::new()
            .prefix("tether-server-")
            .tempdir()
            .expect("server temporary directory");
        let layout = &pki.layout;
        let ports = options
            .allowed_ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let toml = format!(
            r#"
[edge]
listen = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
handshake_timeout = "5s"
ping_interval = "{ping_interval}"
ping_misses = {ping_misses}
proxy_protocol = {proxy_protocol}
{proxy_from}
{max_pending}
{edge_extra}

[connect]
unix_socket = "{socket}"
tcp_listen = "127.0.0.1:0"
tcp_cert = "{cert}"
tcp_key = "{key}"
tcp_client_ca = "{frontend_ca}"
header_timeout = "5s"
max_head_bytes = {max_head}
dial_timeout = "{dial_timeout}"
write_timeout = "30s"
{idle_timeout}

[policy]
allowed_ports = [{ports}]

[admin]
listen = "127.0.0.1:0"

[log]
format = "{format}"
filter = "info"
{replica}
{extra_sections}
"#,
            cert = layout.server_cert().display(),
            key = layout.server_key().display(),
            ca = layout.ca_cert().display(),
            frontend_ca = layout.frontend_ca_cert().display(),
            socket = dir.path().join("connect.sock").display(),
            max_head = options.max_head_bytes,
            format = if options.log_json { "json" } else { "text" },
            ping_interval = toml_duration(options.ping_interval),
            ping_misses = options.ping_misses,
            proxy_protocol = options.proxy_protocol,
            // haproxy connects from 127.0.0.1; other 127/8 sources play direct clients.
            proxy_from = if options.proxy_protocol {
                "proxy_protocol_from = [\"127.0.0.1/32\"]"
            } else {
                ""
            },
            edge_extra = options.edge_extra,
            extra_sections = options.extra_sections,
            max_pending = options
                .max_pending_dials
                .map(|n| format!("max_pending_dials = {n}"))
                .unwrap_or_default(),
            dial_timeout = toml_duration(options.dial_timeout),
            idle_timeout = options
                .idle_timeout
                .map(|d| format!("idle_timeout = \"{}\"", toml_duration(d)))
                .unwrap_or_default(),
            replica = options
                .replica
                .as_ref()
                .map(|(id, count)| format!("[replica]\nid = \"{id}\"\ncount = {count}\n"))
                .unwrap_or_default(),
        );
        let config = dir.path().join("server.toml");
        std::fs::write(&config, toml).expect("write server.toml");
        let ready_file = dir.path().join("ready.json");
        let launch = Launch {
            grace: options.shutdown_grace,
            worker_threads: options.worker_threads,
        };
        let child = spawn_server(
            &config,
            &ready_file,
            None,
            launch,
            &dir.path().join("server.log"),
        );
        let mut server = ServerProc {
            addrs: ServerAddrs {
                edge: SocketAddr::from(([127, 0, 0, 1], 0)),
                edge_quic: None,
                connect_tcp: SocketAddr::from(([127, 0, 0, 1], 0)),
                connect_unix: PathBuf::new(),
                admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            },
            config,
            ready_file,
            launch,
            child,
            dir,
        };
        server.addrs = server.wait_ready().await;
        server
    }

    async fn wait_ready(&mut self) -> ServerAddrs {
        let ready_file = self.ready_file.clone();
        let addrs = read_ready_file(&mut self.child, &ready_file).await;
        let addr = |key: &str| -> SocketAddr {
            addrs[key]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("ready file: no `{key}` address in {addrs}"))
        };
        ServerAddrs {
            edge: addr("edge"),
            edge_quic: addrs["edge_quic"].as_str().and_then(|s| s.parse().ok()),
            connect_tcp: addr("connect_tcp"),
            connect_unix: PathBuf::from(
                addrs["connect_unix"]
                    .as_str()
                    .unwrap_or_else(|| panic!("ready file: no `connect_unix` in {addrs}")),
            ),
            admin: addr("admin"),
        }
    }

    /// Kill the server (SIGKILL, like a crash) and wait until it is gone.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Kill the server if it runs, then start it again with the same config, the same edge
    /// port and the same admin port (a load balancer's health check keeps finding it); the
    /// frontends get new ports (see [`ServerProc::addrs`]).
    pub async fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.ready_file);
        let log = self.dir.path().join("server.log");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, RESTART_MARKER.as_bytes()))
            .expect("mark restart in the server log");
        let (edge, admin) = (self.addrs.edge, self.addrs.admin);
        self.child = spawn_server(
            &self.config,
            &self.ready_file,
            Some((edge, admin)),
            self.launch,
            &log,
        );
        self.addrs = self.wait_ready().await;
        assert_eq!(
            self.addrs.edge, edge,
            "restarted server must keep its edge port"
        );
    }

    /// Send `signal` (`TERM`, `INT`, ...) to the server process.
    pub fn signal(&self, signal: &str) {
        crate::process::send_signal(self.child.id(), signal);
    }

    /// How the server exited, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.exited()
    }

    /// Wait up to `timeout` for the server to exit; how long that took, or `None`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        while started.elapsed() < timeout {
            if self.child.exited().is_some() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Every `edge session established` line of the running server.
    pub fn established_lines(&self) -> Vec<String> {
        self.log_since_start()
            .lines()
            .filter(|l| l.contains(EDGE_ESTABLISHED))
            .map(str::to_owned)
            .collect()
    }

    /// Everything the server logged so far (all runs).
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// What the server logged since it was last (re)started.
    pub fn log_since_start(&self) -> String {
        let log = self.child.log();
        match log.rfind(RESTART_MARKER) {
            Some(i) => log[i + RESTART_MARKER.len()..].to_owned(),
            None => log,
        }
    }

    /// Whether the running server's audit log shows a live session of `node`: a session
    /// (told apart by its peer address) that was established and has not ended. A replaced
    /// session may end after its successor was established.
    pub fn has_edge_session(&self, node: &str) -> bool {
        let mut live = std::collections::HashSet::new();
        for line in self.log_since_start().lines().filter(|l| l.contains(node)) {
            let peer = log_field(line, "peer").unwrap_or_default();
            if line.contains(EDGE_ESTABLISHED) {
                live.insert(peer);
            } else if line.contains(EDGE_ENDED) {
                live.remove(&peer);
            }
        }
        !live.is_empty()
    }

    /// The transport (`tcp`, `quic`) of `node`'s most recently established session.
    pub fn edge_transport(&self, node: &str) -> Option<String> {
        self.log_since_start()
            .lines()
            .rfind(|l| l.contains(node) && l.contains(EDGE_ESTABLISHED))
            .and_then(|l| log_field(l, "transport"))
    }

    /// Wait until the running server holds a session of `node`'s edge.
    pub async fn wait_for_edge_session(&self, node: &str) {
        let what = format!("a live session of {node} on the server");
        poll_until(&what, EDGE_UP_TIMEOUT, Duration::from_millis(20), || {
            std::future::ready(self.has_edge_session(node).then_some(()))
        })
        .await
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Command-line settings of a server process, kept for its restarts.
#[derive(Debug, Clone, Copy)]
struct Launch {
    grace: Duration,
    worker_threads: Option<usize>,
}

fn spawn_server(
    config: &Path,
    ready: &Path,
    keep: Option<(SocketAddr, SocketAddr)>,
    launch: Launch,
    log: &Path,
) -> ChildGuard {
    let mut command = Command::new(crate::binary("tunnel-server"));
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--ready-file")
        .arg(ready)
        .arg("--shutdown-grace")
        .arg(toml_duration(launch.grace));
    if let Some(threads) = launch.worker_threads {
        command.arg("--worker-threads").arg(threads.to_string());
    }
    if let Some((edge, admin)) = keep {
        command.arg("--edge-listen").arg(edge.to_string());
        command.arg("--admin-listen").arg(admin.to_string());
    }
    ChildGuard::spawn("tunnel-server", command, log)
}

/// A field of a log line, text (` key=value`, quotes removed) or JSON (`"key":"value"`).
pub fn log_field(line: &str, key: &str) -> Option<String> {
    if let Some(start) = line.find(&format!(" {key}=")) {
        let value = line[start + key.len() + 2..].split_whitespace().next()?;
        return Some(value.trim_matches('"').to_owned());
    }
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let value = line[start..].split('"').next()?;
    Some(value.to_owned())
}

/// Wait for a `tunnel-server --ready-file` to appear and parse it; fails at once, with the
/// log tail, if the server exits first.
pub async fn read_ready_file(
    child: &mut crate::process::ChildGuard,
    ready_file: &std::path::Path,
) -> serde_json::Value {
    poll_until(
        "the server's ready file",
        READY_TIMEOUT,
        Duration::from_millis(20),
        || {
            if let Some(status) = child.exited() {
                panic!(
                    "tunnel-server exited early ({status})\n{}",
                    child.log_tail(40)
                );
            }
            let parsed = std::fs::read(ready_file)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
            std::future::ready(parsed)
        },
    )
    .await
}
