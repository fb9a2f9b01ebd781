//! Tether as separate processes: the real `tunnel-server` and `tunnel-edge` binaries started
//! as children (killed when dropped), and the resident set size and CPU time of any process,
//! read from `/proc/<pid>/status` and `/proc/<pid>/stat`, for the memory and CPU figures.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A process this run reads RSS from: a child it started or one named with `--attach`.
#[derive(Clone, Debug)]
pub struct Watched {
    /// Label in the figures (`server`, `edge`, or the `--attach` name).
    pub name: String,
    /// Process ID.
    pub pid: u32,
}

impl Watched {
    /// Parse `NAME=PID` (the `--attach` syntax).
    pub fn parse(text: &str) -> Result<Watched, String> {
        let (name, pid) = text
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=PID, got {text:?}"))?;
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(format!("name {name:?}: use letters, digits, - and _"));
        }
        let pid = pid.parse().map_err(|e| format!("pid {pid:?}: {e}"))?;
        rss_bytes(pid).map_err(|e| format!("process {pid}: {e:#}"))?;
        Ok(Watched {
            name: name.to_owned(),
            pid,
        })
    }

    /// This process's RSS now.
    pub fn rss(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid).with_context(|| format!("RSS of {} (pid {})", self.name, self.pid))
    }
}

/// Resident set size of process `pid` in bytes (VmRSS of /proc/<pid>/status).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no VmRSS in {path} (a zombie?)"))?;
    Ok(kb * 1024)
}

/// Clock ticks per second of `/proc/<pid>/stat`'s times: USER_HZ, which Linux fixes at 100
/// for userspace on x86 and Arm whatever the kernel's own tick rate.
const USER_HZ: f64 = 100.0;

/// CPU time (user + system, every thread) process `pid` has used, in seconds, at the
/// kernel's 10 ms resolution: over a 3 s run that moves a server ~1 s, under 2 %.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("no command name in {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        let field = fields.get(i).with_context(|| format!("short {path}"))?;
        Ok(field
            .parse::<u64>()
            .with_context(|| format!("{path}: {field:?}"))? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// A child process, stopped and reaped when dropped.
pub struct ChildGuard {
    child: Child,
    /// What it is, for errors.
    pub name: String,
}

impl ChildGuard {
    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kill it now (SIGKILL, as a crash would) and wait until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fail if it has already exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => anyhow::bail!("{} exited: {status}", self.name),
            None => Ok(()),
        }
    }
}

impl Drop for ChildGuard {
    /// SIGTERM first, so a profiler wrapping it (see [`SERVER_WRAPPER_ENV`]) writes its
    /// output; SIGKILL if it has not exited within 5 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

/// A workspace binary beside this one (`target/<profile>/`), or an error saying how to build it.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("path of tunnel-loadtest")?;
    let dir = exe.parent().context("tunnel-loadtest has no directory")?;
    // Test executables live one level down, in target/<profile>/deps.
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "{name} not found beside {}: build it with `cargo build --release -p {name}`",
        exe.display()
    )
}

/// Environment variable: a command to run the server under, split on spaces, for profiling
/// (`perf record -g -o server.perf`, `valgrind --tool=massif`). The RSS figures are then the
/// wrapper's.
pub const SERVER_WRAPPER_ENV: &str = "TETHER_LOADTEST_SERVER_WRAPPER";

/// Start `tunnel-server run --config <config>` and wait (bounded) for its ready file; return
/// the child and the ready file's JSON (the bound addresses). Its log goes to `log`.
pub fn spawn_server(
    config: &Path,
    ready: &Path,
    log: &Path,
) -> anyhow::Result<(ChildGuard, serde_json::Value)> {
    let _ = std::fs::remove_file(ready);
    let binary = sibling_binary("tunnel-server")?;
    let wrapper = std::env::var(SERVER_WRAPPER_ENV).unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let wait = if wrapper.trim().is_empty() { 15 } else { 120 };
    command
        .args(["run", "--config"])
        .arg(config)
        .arg("--ready-file")
        .arg(ready);
    let mut child = spawn(command, "tunnel-server", log)?;
    let deadline = Instant::now() + Duration::from_secs(wait);
    loop {
        if let Ok(text) = std::fs::read_to_string(ready) {
            let addrs = serde_json::from_str(&text).context("parse the server's ready file")?;
            return Ok((child, addrs));
        }
        child
            .check_running()
            .with_context(|| format!("see {}", log.display()))?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "tunnel-server wrote no ready file within {wait} s (log: {})",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start `tunnel-edge run --config <config>`, logging to `log`.
pub fn spawn_edge(config: &Path, log: &Path) -> anyhow::Result<ChildGuard> {
    let mut command = Command::new(sibling_binary("tunnel-edge")?);
    command.args(["run", "--config"]).arg(config);
    spawn(command, "tunnel-edge", log)
}

fn spawn(mut command: Command, name: &str, log: &Path) -> anyhow::Result<ChildGuard> {
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = command
        .spawn()
        .with_context(|| format!("start {}", command.get_program().to_string_lossy()))?;
    Ok(ChildGuard {
        child,
        name: name.to_owned(),
    })
}

/// A socket address field of the server's ready file.
pub fn ready_addr(ready: &serde_json::Value, field: &str) -> anyhow::Result<std::net::SocketAddr> {
    ready[field]
        .as_str()
        .with_context(|| format!("no {field} in the ready file"))?
        .parse()
        .with_context(|| format!("{field} in the ready file"))
}
