//! A child process of a test: stdout and stderr appended to a log file, killed and reaped
//! when its guard drops, with the log's tail printed if the test is failing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Lines of a child's log printed when a test fails (`TETHER_E2E_LOG_TAIL` overrides).
const LOG_TAIL_LINES: usize = 60;

/// A running child process, killed and reaped on drop.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawn `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> ChildGuard {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open child log");
        let stdout = file.try_clone().expect("clone log handle");
        command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        // Let a developer raise the children's log level without touching the tests.
        if let Ok(filter) = std::env::var("TETHER_E2E_LOG") {
            command.env("RUST_LOG", filter);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        ChildGuard {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Whether the process has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log, with a header naming the process.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "----- last {} lines of {} ({}) -----\n{}\n-----",
            all.len() - start,
            self.name,
            self.log.display(),
            all[start..].join("\n")
        )
    }

    /// Kill (SIGKILL) and reap the process, as a crash would end it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let lines = std::env::var("TETHER_E2E_LOG_TAIL")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(LOG_TAIL_LINES);
            eprintln!("{}", self.log_tail(lines));
        }
        self.kill();
    }
}

/// Send `signal` (a name such as `TERM`) to process `pid` with kill(1): the harness has no
/// unsafe code, and this is no hot path.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

/// Local ports of process `pid`'s established IPv4 TCP connections to `remote`, read from
/// `/proc/PID/fd` (socket inodes) and `/proc/net/tcp`.
pub fn tcp_local_ports(pid: u32, remote: std::net::SocketAddr) -> Vec<u16> {
    let inodes: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|entry| {
                let link = std::fs::read_link(entry.ok()?.path()).ok()?;
                let link = link.to_str()?;
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    // `/proc/net/tcp` prints each IPv4 address as the hex of its in-memory (network order)
    // u32 read in host order; the port is plain hex.
    let parse = |field: &str| -> Option<std::net::SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let ip = std::net::Ipv4Addr::from(ip.to_ne_bytes());
        Some(std::net::SocketAddr::from((ip, port)))
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, rem, state, inode) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(9)?);
            let established = *state == "01";
            let mine = inodes.contains(&inode.parse().ok()?);
            (established && mine && parse(rem)? == remote)
                .then(|| parse(local).map(|a| a.port()))?
        })
        .collect()
}

/// How many file descriptors process `pid` has open (sockets included).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
