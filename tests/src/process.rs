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
