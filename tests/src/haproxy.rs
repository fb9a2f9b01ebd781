//! haproxy (the Debian package) in TCP mode in front of tunnel-server replicas, as the cloud L4
//! load balancer would be: a generated config on free loopback ports, run in the foreground
//! (`-db`) as a child process that dies with its guard. Replicas are health-checked on their
//! admin `/readyz`, so a draining or dead replica stops receiving new edge connections.
//!
//! Tests that need haproxy call [`binary_or_skip`]: without haproxy they are skipped with a
//! message on the terminal, unless `CI` is set, where a missing haproxy is a failure.

use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::process::ChildGuard;

/// Attempts at finding free ports before giving up (another process may take a port
/// between our probe and haproxy's bind).
const BIND_ATTEMPTS: usize = 5;
/// How long haproxy may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Health-check interval: a dead or draining replica leaves rotation within about this.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// The haproxy executable, or `None` after telling the terminal why `test` is skipped.
/// Panics when haproxy is missing and the `CI` environment variable is set: CI installs it.
pub fn binary_or_skip(test: &str) -> Option<PathBuf> {
    // PATH first; Debian installs it in /usr/sbin, which a non-root PATH may lack.
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from));
    let found = dirs
        .into_iter()
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: haproxy is not installed, and CI is set (.ci/run installs it)"
        );
        // Written past libtest's capture, so the skip is visible in a normal run.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: haproxy is not installed (apt-get install haproxy)"
        );
    }
    found
}

/// One backend server.
#[derive(Debug, Clone, Copy)]
pub struct Backend {
    /// Where edge connections go (the replica's edge listener).
    pub addr: SocketAddr,
    /// The replica's admin endpoint, health-checked with `GET /readyz`.
    pub admin: SocketAddr,
}

/// A running haproxy.
pub struct Haproxy {
    /// The edge-facing frontend (what edges dial); the first of `addrs`.
    pub addr: SocketAddr,
    /// Every frontend, in the order they were asked for.
    pub addrs: Vec<SocketAddr>,
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Start haproxy in front of `backends` (round robin), sending a PROXY v2 header to each
    /// when `send_proxy_v2`.
    pub async fn start(binary: PathBuf, backends: &[Backend], send_proxy_v2: bool) -> Haproxy {
        let backends = backends.to_vec();
        Haproxy::launch(binary, 1, move |ports, monitor| {
            render(ports[0], monitor, &backends, send_proxy_v2)
        })
        .await
    }

    /// One frontend per entry of `sources`, each forwarding to `backend` with a PROXY v2
    /// header that names that source as the client (`tcp-request connection set-src`): one
    /// balancer, as many distinct client addresses as the test needs. The frontends are
    /// `addrs[i]`.
    pub async fn start_with_sources(
        binary: PathBuf,
        backend: SocketAddr,
        sources: &[std::net::Ipv4Addr],
    ) -> Haproxy {
        let sources = sources.to_vec();
        Haproxy::launch(binary, sources.len(), move |ports, monitor| {
            render_sources(ports, monitor, backend, &sources)
        })
        .await
    }

    /// Write the config `render(ports, monitor_port)` makes and start haproxy on it,
    /// retrying with fresh ports when one was taken meanwhile.
    async fn launch(
        binary: PathBuf,
        frontends: usize,
        render: impl Fn(&[u16], u16) -> String,
    ) -> Haproxy {
        let dir = tempfile::Builder::new()
            .prefix("tether-haproxy-")
            .tempdir()
            .expect("haproxy temporary directory");
        let log = dir.path().join("haproxy.log");
        let mut last_log = String::new();
        for _ in 0..BIND_ATTEMPTS {
            let ports: Vec<u16> = (0..frontends).map(|_| free_port()).collect();
            let monitor = free_port();
            let config = dir.path().join("haproxy.cfg");
            std::fs::write(&config, render(&ports, monitor)).expect("write haproxy.cfg");
            let mut command = Command::new(&binary);
            command.arg("-db").arg("-f").arg(&config);
            let mut child = ChildGuard::spawn("haproxy", command, &log);
            match wait_listening(&mut child, monitor).await {
                Ok(()) => {
                    let addrs: Vec<SocketAddr> = ports
                        .iter()
                        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                        .collect();
                    return Haproxy {
                        addr: addrs[0],
                        addrs,
                        child,
                        _dir: dir,
                    };
                }
                Err(log)
                    if log.contains("ddress already in use") || log.contains("cannot bind") =>
                {
                    last_log = log;
                    child.kill();
                }
                Err(log) => panic!("haproxy did not start:\n{log}"),
            }
        }
        panic!("haproxy found no free port in {BIND_ATTEMPTS} attempts:\n{last_log}");
    }

    /// Everything haproxy logged.
    pub fn log(&self) -> String {
        self.child.log()
    }
}

/// A port that was free a moment ago: bind port 0, read it, close.
pub(crate) fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

fn render(port: u16, monitor: u16, backends: &[Backend], send_proxy_v2: bool) -> String {
    let check_ms = CHECK_INTERVAL.as_millis();
    let mut servers = String::new();
    for (i, b) in backends.iter().enumerate() {
        servers.push_str(&format!(
            "    server replica{i} {addr} check port {admin}{proxy}\n",
            addr = b.addr,
            admin = b.admin.port(),
            proxy = if send_proxy_v2 { " send-proxy-v2" } else { "" },
        ));
    }
    // Client and server timeouts must exceed the tunnel's PING interval, or haproxy cuts
    // healthy idle sessions; connect failures are retried on another replica.
    format!(
        r#"global
    maxconn 1000
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch 1

frontend monitor
    mode http
    bind 127.0.0.1:{monitor}
    monitor-uri /ready

frontend edges
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /readyz
    default-server inter {check_ms}ms fastinter {check_ms}ms downinter {check_ms}ms fall 1 rise 1
{servers}"#
    )
}

fn render_sources(
    ports: &[u16],
    monitor: u16,
    backend: SocketAddr,
    sources: &[std::net::Ipv4Addr],
) -> String {
    let mut frontends = String::new();
    for (i, (port, source)) in ports.iter().zip(sources).enumerate() {
        frontends.push_str(&format!(
            "listen source{i}\n    bind 127.0.0.1:{port}\n    tcp-request connection set-src ipv4({source})\n    server backend {backend} send-proxy-v2\n\n"
        ));
    }
    format!(
        r#"global
    maxconn 1000
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 1s
    timeout client 60s
    timeout server 60s

frontend monitor
    mode http
    bind 127.0.0.1:{monitor}
    monitor-uri /ready

{frontends}"#
    )
}

/// Wait until haproxy answers on its monitor port (so every listener is bound), or return
/// its log if it exited.
async fn wait_listening(child: &mut ChildGuard, monitor: u16) -> Result<(), String> {
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    loop {
        if child.exited().is_some() {
            return Err(child.log());
        }
        let answer =
            crate::frontend::admin_get(SocketAddr::from(([127, 0, 0, 1], monitor)), "/ready").await;
        if matches!(answer, Ok((200, _))) {
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
