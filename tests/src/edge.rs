//! `tunnel-edge run` as a child process, configured with short reconnect and liveness
//! timings and a node IP that it maps to 127.0.0.1.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

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

/// Timings of a test edge that some tests change.
#[derive(Debug, Clone)]
pub struct EdgeTuning {
    /// `reconnect.min`.
    pub reconnect_min: Duration,
    /// `reconnect.max`: the reconnect bound.
    pub reconnect_max: Duration,
    /// `liveness.ping_interval`.
    pub ping_interval: Duration,
    /// `liveness.ping_misses`.
    pub ping_misses: u32,
    /// `dial.timeout`.
    pub dial_timeout: Duration,
    /// `dial.idle_timeout` (`None`: the edge's default).
    pub idle_timeout: Option<Duration>,
    /// `shutdown_grace`: how long in-flight streams may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// `dial.self_host`: 127.0.0.1 by default, so the documentation node IPs of the tests
    /// reach targets on this machine; `None` tests the edge's own default (name targets
    /// go to the certificate's IP).
    pub self_host: Option<IpAddr>,
    /// Open the admin listener on a kernel-chosen loopback port ([`EdgeProc::admin_addr`]).
    pub admin: bool,
    /// `log.format = "json"`.
    pub log_json: bool,
    /// `server.transport`: the harness pins `tcp` unless a test asks for another, so the
    /// fault relays (TCP) sit on the session's path.
    pub transport: Transport,
    /// `server.quic_retry_interval` (`None`: the edge's default).
    pub quic_retry_interval: Option<Duration>,
    /// `server.lane` (on by default, as in the edge).
    pub lane: bool,
}

/// The session transport of a test edge; tests that run over both take it as a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TLS + HTTP/2 over TCP.
    Tcp,
    /// QUIC only.
    Quic,
    /// QUIC, falling back to TCP.
    Auto,
}

impl Transport {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
            Transport::Auto => "auto",
        }
    }

    /// The tuning a test edge of this transport starts with.
    pub fn tuning(self) -> EdgeTuning {
        EdgeTuning {
            transport: self,
            ..EdgeTuning::default()
        }
    }
}

impl Default for EdgeTuning {
    fn default() -> Self {
        EdgeTuning {
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(500),
            ping_interval: Duration::from_millis(500),
            ping_misses: 3,
            dial_timeout: Duration::from_secs(2),
            idle_timeout: None,
            shutdown_grace: Duration::from_secs(2),
            self_host: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            admin: false,
            log_json: false,
            transport: Transport::Tcp,
            quic_retry_interval: None,
            lane: true,
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// A `tunnel-edge run` process. Whether it holds a session is observed on the server.
pub struct EdgeProc {
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl EdgeProc {
    /// Write the config and start the edge, pointed at `server`'s edge listener.
    pub fn start(pki: &Pki, server: SocketAddr, options: &EdgeOptions) -> EdgeProc {
        Self::start_tuned(pki, &[server], options, &EdgeTuning::default())
    }

    /// Start an edge that keeps sessions with every address in `servers` (one, usually: a
    /// server or a load balancer), with `tuning`.
    pub fn start_tuned(
        pki: &Pki,
        servers: &[SocketAddr],
        options: &EdgeOptions,
        tuning: &EdgeTuning,
    ) -> EdgeProc {
        Self::start_tuned_with_extra(pki, servers, options, tuning, "")
    }

    /// [`EdgeProc::start_tuned`] with `extra` TOML appended to the config (for example an
    /// `[[allow.extra]]` rule).
    pub fn start_tuned_with_extra(
        pki: &Pki,
        servers: &[SocketAddr],
        options: &EdgeOptions,
        tuning: &EdgeTuning,
        extra: &str,
    ) -> EdgeProc {
        let (server, more) = servers.split_first().expect("at least one server address");
        let more = more
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
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
shutdown_grace = "{shutdown_grace}"

[server]
address = "{server}"
addresses = [{more}]
server_name = "127.0.0.1"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
connect_timeout = "5s"
transport = "{transport}"
lane = {lane}
{quic_retry}

[reconnect]
min = "{reconnect_min}"
max = "{reconnect_max}"
stable_after = "2s"

[liveness]
ping_interval = "{ping_interval}"
ping_misses = {ping_misses}

[dial]
timeout = "{dial_timeout}"
write_timeout = "30s"
{self_host}
{idle_timeout}

[allow]
ports = [{ports}]

{admin}
[log]
filter = "info"
format = "{log_format}"

{extra}
"#,
            ca = pki.layout.ca_cert().display(),
            cert = options.files.cert.display(),
            key = options.files.key.display(),
            admin = if tuning.admin {
                "[admin]\nlisten = \"127.0.0.1:0\"\n"
            } else {
                ""
            },
            log_format = if tuning.log_json { "json" } else { "text" },
            transport = tuning.transport.as_str(),
            lane = tuning.lane,
            quic_retry = tuning
                .quic_retry_interval
                .map(|d| format!("quic_retry_interval = \"{}\"", ms(d)))
                .unwrap_or_default(),
            reconnect_min = ms(tuning.reconnect_min),
            reconnect_max = ms(tuning.reconnect_max),
            ping_interval = ms(tuning.ping_interval),
            ping_misses = tuning.ping_misses,
            dial_timeout = ms(tuning.dial_timeout),
            shutdown_grace = ms(tuning.shutdown_grace),
            self_host = tuning
                .self_host
                .map(|ip| format!("self_host = \"{ip}\""))
                .unwrap_or_default(),
            idle_timeout = tuning
                .idle_timeout
                .map(|d| format!("idle_timeout = \"{}\"", ms(d)))
                .unwrap_or_default(),
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

    /// The admin listener's address, from the edge's `admin listening` line (text or JSON
    /// logs); waits for it up to 10 s and fails with the log tail if the edge exits first.
    pub async fn admin_addr(&mut self) -> SocketAddr {
        crate::poll_until(
            "the edge's admin listener",
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                if let Some(status) = self.child.exited() {
                    panic!(
                        "tunnel-edge exited early ({status})\n{}",
                        self.child.log_tail(40)
                    );
                }
                let found = self
                    .child
                    .log()
                    .lines()
                    .find(|l| l.contains("admin listening"))
                    .and_then(|l| crate::server::log_field(l, "listen"))
                    .and_then(|a| a.parse().ok());
                std::future::ready(found)
            },
        )
        .await
    }

    /// Whether the edge process is still running.
    pub fn running(&mut self) -> bool {
        self.child.exited().is_none()
    }

    /// The edge's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait up to `timeout` for the process to exit; how long it took, or `None`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        while started.elapsed() < timeout {
            if self.child.exited().is_some() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Send `signal` (`TERM`, ...) to the edge process.
    pub fn signal(&self, signal: &str) {
        crate::process::send_signal(self.child.id(), signal);
    }

    /// The local ports of the edge's TCP connections to `remote`, from /proc: which source
    /// ports a server behind a load balancer should see.
    pub fn local_ports_to(&self, remote: SocketAddr) -> Vec<u16> {
        crate::process::tcp_local_ports(self.child.id(), remote)
    }
}
