//! tinyproxy (the Debian package) as the HTTP CONNECT egress proxy an IDC puts between its
//! nodes and the internet: a generated config on a free loopback port, run in the foreground
//! (`-d`) as a child process that dies with its guard, logging every CONNECT it is asked for.
//!
//! Tests that need tinyproxy call [`binary_or_skip`]: without it they are skipped with a
//! message on the terminal, unless `CI` is set, where a missing tinyproxy is a failure.

use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::process::ChildGuard;

/// Attempts at finding a free port before giving up (another process may take it between
/// our probe and tinyproxy's bind).
const BIND_ATTEMPTS: usize = 5;
/// How long tinyproxy may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The tinyproxy executable, or `None` after telling the terminal why `test` is skipped.
/// Panics when it is missing and the `CI` environment variable is set: CI installs it.
pub fn binary_or_skip(test: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/bin", "/usr/sbin"].map(PathBuf::from));
    let found = dirs
        .into_iter()
        .map(|dir| dir.join("tinyproxy"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: tinyproxy is not installed, and CI is set (.ci/run installs it)"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: tinyproxy is not installed (apt-get install tinyproxy)"
        );
    }
    found
}

/// What the proxy allows.
#[derive(Debug, Clone, Default)]
pub struct ProxyRules {
    /// `ConnectPort` lines: the only ports CONNECT may reach (403 otherwise). Empty: every
    /// port (tinyproxy's rule when no `ConnectPort` line is given).
    pub connect_ports: Vec<u16>,
    /// `BasicAuth user password`: clients without these credentials get 407 (none sent) or
    /// 401 (wrong ones; tinyproxy 1.11's answer). tinyproxy's config grammar allows only
    /// `[-a-z0-9._]` in both.
    pub basic_auth: Option<(String, String)>,
}

/// A running tinyproxy.
pub struct Tinyproxy {
    /// Where clients send CONNECT.
    pub addr: SocketAddr,
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Start tinyproxy on a free loopback port with `rules`.
    pub async fn start(binary: PathBuf, rules: &ProxyRules) -> Tinyproxy {
        let dir = tempfile::Builder::new()
            .prefix("tether-tinyproxy-")
            .tempdir()
            .expect("tinyproxy temporary directory");
        let log = dir.path().join("tinyproxy.log");
        let mut last_log = String::new();
        for _ in 0..BIND_ATTEMPTS {
            let port = free_port();
            let config = dir.path().join("tinyproxy.conf");
            std::fs::write(&config, render(port, rules)).expect("write tinyproxy.conf");
            let mut command = Command::new(&binary);
            command.arg("-d").arg("-c").arg(&config);
            let mut child = ChildGuard::spawn("tinyproxy", command, &log);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match wait_listening(&mut child, addr).await {
                Ok(()) => {
                    return Tinyproxy {
                        addr,
                        child,
                        _dir: dir,
                    }
                }
                Err(log) if log.contains("in use") || log.contains("Could not create") => {
                    last_log = log;
                    child.kill();
                }
                Err(log) => panic!("tinyproxy did not start:\n{log}"),
            }
        }
        panic!("tinyproxy found no free port in {BIND_ATTEMPTS} attempts:\n{last_log}");
    }

    /// Everything tinyproxy logged (one `Request ... CONNECT host:port` line per CONNECT).
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// How many CONNECT requests for `target` (`host:port`) tinyproxy has logged.
    pub fn connects_to(&self, target: &str) -> usize {
        let needle = format!("CONNECT {target} ");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// Stop tinyproxy (SIGKILL), as a proxy that goes down would.
    pub fn kill(&mut self) {
        self.child.kill();
    }
}

/// A port that was free a moment ago: bind port 0, read it, close.
fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

fn render(port: u16, rules: &ProxyRules) -> String {
    let mut config = format!(
        "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 100\nLogLevel Info\n\
         Allow 127.0.0.1\nDisableViaHeader Yes\n"
    );
    for p in &rules.connect_ports {
        config.push_str(&format!("ConnectPort {p}\n"));
    }
    if let Some((user, password)) = &rules.basic_auth {
        config.push_str(&format!("BasicAuth {user} {password}\n"));
    }
    config
}

/// Wait until tinyproxy accepts connections, or return its log if it exited.
async fn wait_listening(child: &mut ChildGuard, addr: SocketAddr) -> Result<(), String> {
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    loop {
        if child.exited().is_some() {
            return Err(child.log());
        }
        if child.log().contains("Starting main loop")
            && tokio::net::TcpStream::connect(addr).await.is_ok()
        {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "not listening after {START_TIMEOUT:?}\n{}",
                child.log()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
