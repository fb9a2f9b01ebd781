//! A real etcd (Debian's `etcd-server`, `/usr/bin/etcd`) for the state-store tests: one or
//! three members on free loopback ports, plain HTTP (loopback only, as `[state]` allows),
//! each with a data directory in a temp dir, killed with its guard. Members can be killed
//! and restarted on the same ports and data, for the fault tests.
//!
//! Tests that need etcd call [`binary_or_skip`]: without it they are skipped with a message,
//! unless `CI` is set (`.ci/run` installs `etcd-server`), where a missing etcd is a failure.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::haproxy::free_port;
use crate::process::ChildGuard;

/// How long a cluster may take to elect a leader and report healthy: etcd 3.4 here takes
/// about 1 s for one member and 2 s for three (election timeout 1 s by default).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Time for one health probe (connect, request, answer) on loopback.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The etcd executable, or `None` after telling the terminal why `test` is skipped.
pub fn binary_or_skip(test: &str) -> Option<PathBuf> {
    let found = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .map(PathBuf::from)
        .into_iter()
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: etcd is not installed, and CI is set (.ci/run installs etcd-server)"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: etcd is not installed (apt-get install etcd-server)"
        );
    }
    found
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<ChildGuard>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    binary: PathBuf,
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Start `size` members and wait until every one reports healthy.
    pub async fn start(binary: PathBuf, size: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("etcd temp dir");
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            binary,
            dir,
            members,
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_healthy(i).await;
        }
        cluster
    }

    /// The client URLs, for `[state] endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let member = &self.members[i];
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new(&self.binary);
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.dir.path().join(&member.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "tether-test"]);
        let log = self.dir.path().join(format!("{}.log", member.name));
        let child = ChildGuard::spawn(&format!("etcd {}", member.name), command, &log);
        self.members[i].child = Some(child);
    }

    /// Kill member `i` (SIGKILL, as a crash).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            child.kill();
        }
    }

    /// Start member `i` again on its ports and data, and wait until it is healthy.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy(i).await;
    }

    /// Start every member in `members` again, then wait until each is healthy: members
    /// restarted one at a time would wait for a quorum that only the others bring.
    pub async fn restart_all(&mut self, members: &[usize]) {
        for &i in members {
            self.spawn(i);
        }
        for &i in members {
            self.wait_healthy(i).await;
        }
    }

    /// Whether member `i` answers `/health` with `"health":"true"` (it has a leader).
    pub async fn healthy(&self, i: usize) -> bool {
        let port = self.members[i].client_port;
        let probe = async {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            tcp.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                .await?;
            let mut answer = String::new();
            tcp.read_to_string(&mut answer).await?;
            std::io::Result::Ok(answer)
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, probe).await,
            Ok(Ok(answer)) if answer.contains("\"health\":\"true\"")
        )
    }

    async fn wait_healthy(&self, i: usize) {
        let what = format!("etcd member {i} healthy");
        let log = || {
            self.members[i]
                .child
                .as_ref()
                .map(|c| c.log_tail(40))
                .unwrap_or_default()
        };
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while !self.healthy(i).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {START_TIMEOUT:?}\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
