//! `tunnel-edge run` as a child process, configured with short reconnect and liveness
//! timings and a node IP that it maps to 127.0.0.1.

use std::net::SocketAddr;
use std::process::Command;

use crate::pki::{EdgeFiles, Pki};
use crate::process::ChildGuard;

/// Settings of a test edge.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    /// Identity files.
    pub files: EdgeFiles,
    /// `allow.ports` (ports on this node).
    pub allow_ports: Vec<u16>,
}

/// A `tunnel-edge run` process. Whether it holds a session is observed on the server.
pub struct EdgeProc {
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl EdgeProc {
    /// Write the config and start the edge, pointed at `server`'s edge listener.
    pub fn start(pki: &Pki, server: SocketAddr, options: &EdgeOptions) -> EdgeProc {
        let dir = tempfile::Builder::new()
            .prefix(&format!("tether-edge-{}-", options.files.node))
            .tempdir()
            .expect("edge temporary directory");
        let ports = options
            .allow_ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let toml = format!(
            r#"
[server]
address = "{server}"
server_name = "127.0.0.1"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
connect_timeout = "5s"

[reconnect]
min = "50ms"
max = "500ms"
stable_after = "2s"

[liveness]
ping_interval = "500ms"
ping_misses = 3

[dial]
timeout = "2s"
write_timeout = "30s"
self_host = "127.0.0.1"

[allow]
ports = [{ports}]

[log]
filter = "info"
"#,
            ca = pki.layout.ca_cert().display(),
            cert = options.files.cert.display(),
            key = options.files.key.display(),
        );
        let config = dir.path().join("edge.toml");
        std::fs::write(&config, toml).expect("write edge.toml");
        let mut command = Command::new(crate::binary("tunnel-edge"));
        command.arg("run").arg("--config").arg(&config);
        let name = format!("tunnel-edge {}", options.files.node);
        let child = ChildGuard::spawn(&name, command, &dir.path().join("edge.log"));
        EdgeProc { child, _dir: dir }
    }

    /// Everything the edge logged so far.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Whether the edge process is still running.
    pub fn running(&mut self) -> bool {
        self.child.exited().is_none()
    }

    /// The edge's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
