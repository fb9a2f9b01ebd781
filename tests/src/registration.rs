//! A server with the registration API enabled, and edges that join it: `tunnel-server run`
//! with a `[registration]` section, `tunnel-server token create` / `node revoke` as the
//! operator runs them, `tunnel-edge join` and `tunnel-edge run --state-dir` as a node runs
//! them. Everything on 127.0.0.1 with kernel-chosen ports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::pki::Pki;
use crate::poll_until;
use crate::process::ChildGuard;

/// What differs between registration tests.
#[derive(Debug, Clone)]
pub struct RegistrationOptions {
    /// `registration.cert_lifetime`.
    pub cert_lifetime: &'static str,
    /// `registration.rate.lockout_after`.
    pub lockout_after: u32,
    /// `policy.allowed_ports`.
    pub allowed_ports: Vec<u16>,
    /// `log.filter`.
    pub log_filter: &'static str,
    /// `registration.proxy_protocol`.
    pub proxy_protocol: bool,
    /// `--shutdown-grace`.
    pub shutdown_grace: &'static str,
    /// More `[registration]` lines (limits, timeouts), verbatim.
    pub registration_extra: String,
}

impl Default for RegistrationOptions {
    fn default() -> Self {
        RegistrationOptions {
            cert_lifetime: "1h",
            lockout_after: 100,
            allowed_ports: vec![10250],
            log_filter: "info",
            proxy_protocol: false,
            shutdown_grace: "1s",
            registration_extra: String::new(),
        }
    }
}

/// A `tunnel-server run` process with the registration API.
pub struct RegistrationServer {
    /// Edge listener.
    pub edge: SocketAddr,
    /// mTLS CONNECT frontend.
    pub connect_tcp: SocketAddr,
    /// Registration API.
    pub registration: SocketAddr,
    /// Admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin: SocketAddr,
    /// The config file (for `token`/`node` commands).
    pub config: PathBuf,
    child: ChildGuard,
    dir: tempfile::TempDir,
}

impl RegistrationServer {
    /// CONNECT through the mTLS frontend to `target` (`ip:port` or `node:port`) and echo
    /// `message` once, as kube-apiserver reaching a node's kubelet would.
    pub async fn echo_through(&self, pki: &Pki, target: &str, message: &[u8]) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream =
            tunnel_server::client::connect_tls(self.connect_tcp, pki.frontend_client_tls(), target)
                .await
                .unwrap_or_else(|e| panic!("CONNECT to {target}: {e}"));
        stream.write_all(message).await.expect("write");
        let mut back = vec![0u8; message.len()];
        crate::within("echo", Duration::from_secs(5), stream.read_exact(&mut back))
            .await
            .expect("read echo");
        assert_eq!(back, message, "echo through {target}");
    }

    /// Write the config, start the server, wait for its listeners.
    pub async fn start(pki: &Pki, options: &RegistrationOptions) -> RegistrationServer {
        let dir = tempfile::Builder::new()
            .prefix("tether-reg-")
            .tempdir()
            .expect("server directory");
        let l = &pki.layout;
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
ping_interval = "500ms"
ping_misses = 3

[connect]
tcp_listen = "127.0.0.1:0"
tcp_cert = "{cert}"
tcp_key = "{key}"
tcp_client_ca = "{frontend_ca}"

[policy]
allowed_ports = [{ports}]

[admin]
listen = "127.0.0.1:0"

[registration]
listen = "127.0.0.1:0"
token_file = "tokens.json"
ca_cert = "{ca}"
ca_key = "{ca_key}"
cert_lifetime = "{lifetime}"
proxy_protocol = {proxy_protocol}
{proxy_from}
{registration_extra}

[registration.rate]
per_source_per_minute = 600
per_token_per_minute = 600
burst = 100
lockout_after = {lockout_after}
lockout = "5m"

[log]
filter = "{filter}"
"#,
            cert = l.server_cert().display(),
            key = l.server_key().display(),
            ca = l.ca_cert().display(),
            ca_key = l.ca_key().display(),
            proxy_protocol = options.proxy_protocol,
            // haproxy connects from 127.0.0.1; other 127/8 sources play direct clients.
            proxy_from = if options.proxy_protocol {
                "proxy_protocol_from = [\"127.0.0.1/32\"]"
            } else {
                ""
            },
            registration_extra = options.registration_extra,
            frontend_ca = l.frontend_ca_cert().display(),
            lifetime = options.cert_lifetime,
            lockout_after = options.lockout_after,
            filter = options.log_filter,
        );
        let config = dir.path().join("server.toml");
        std::fs::write(&config, toml).expect("write server.toml");
        let ready = dir.path().join("ready.json");
        let mut command = Command::new(crate::binary("tunnel-server"));
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--shutdown-grace")
            .arg(options.shutdown_grace);
        let mut child = ChildGuard::spawn(
            "tunnel-server (registration)",
            command,
            &dir.path().join("server.log"),
        );
        let addrs = crate::server::read_ready_file(&mut child, &ready).await;
        let addr = |key: &str| -> SocketAddr {
            addrs[key]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("ready file: no `{key}` in {addrs}"))
        };
        RegistrationServer {
            edge: addr("edge"),
            connect_tcp: addr("connect_tcp"),
            registration: addr("registration"),
            admin: addr("admin"),
            config,
            child,
            dir,
        }
    }

    /// Send `signal` (`TERM`, ...) to the server process.
    pub fn signal(&self, signal: &str) {
        crate::process::send_signal(self.child.id(), signal);
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

    /// The server's directory (token and revocation files live here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the server logged.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Run `tunnel-server ARGS --config <config>` as the operator; returns stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let output = Command::new(crate::binary("tunnel-server"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .output()
            .expect("run tunnel-server");
        assert!(
            output.status.success(),
            "tunnel-server {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// `tunnel-server token create` with `extra` arguments; returns the token.
    pub fn create_token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        self.admin(&args).trim().to_owned()
    }

    /// Count of lines in the log containing all of `needles`.
    pub fn log_lines_with(&self, needles: &[&str]) -> usize {
        self.log()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Wait until the log has at least `n` lines containing all of `needles`.
    pub async fn wait_log(&self, needles: &[&str], n: usize, timeout: Duration) {
        let what = format!("{n} server log lines with {needles:?}");
        poll_until(&what, timeout, Duration::from_millis(25), || {
            std::future::ready((self.log_lines_with(needles) >= n).then_some(()))
        })
        .await
    }
}

/// A node's state directory and its `tunnel-edge run` process.
pub struct JoinedEdge {
    /// The state directory.
    pub state: PathBuf,
    child: Option<ChildGuard>,
    dir: tempfile::TempDir,
}

impl JoinedEdge {
    /// A fresh (empty) state directory for a node.
    pub fn new() -> JoinedEdge {
        let dir = tempfile::Builder::new()
            .prefix("tether-node-")
            .tempdir()
            .expect("node directory");
        JoinedEdge {
            state: dir.path().join("state"),
            child: None,
            dir,
        }
    }

    /// `tunnel-edge join` with the token in a file; returns (success, stdout + stderr).
    pub fn join(
        &self,
        pki: &Pki,
        server: &RegistrationServer,
        token: &str,
        node: &str,
        ips: &[&str],
        extra: &[&str],
    ) -> (bool, String) {
        self.join_with_env(pki, server, token, node, ips, extra, &[])
    }

    /// [`JoinedEdge::join`] with environment variables; the egress proxy variables are
    /// cleared first, so only those in `env` reach the command.
    #[allow(clippy::too_many_arguments)]
    pub fn join_with_env(
        &self,
        pki: &Pki,
        server: &RegistrationServer,
        token: &str,
        node: &str,
        ips: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (bool, String) {
        let ca = pki.layout.ca_cert();
        self.join_trusting(
            server.registration,
            token,
            node,
            ips,
            &["--ca".as_ref(), ca.as_os_str()],
            extra,
            env,
        )
    }

    /// [`JoinedEdge::join`] to the registration API at `registration` trusting `ca`, without
    /// borrowing a server (for joins run on other threads).
    pub fn join_at(
        &self,
        registration: SocketAddr,
        ca: &Path,
        token: &str,
        node: &str,
        ips: &[&str],
        extra: &[&str],
    ) -> (bool, String) {
        self.join_trusting(
            registration,
            token,
            node,
            ips,
            &["--ca".as_ref(), ca.as_os_str()],
            extra,
            &[],
        )
    }

    /// `tunnel-edge join --ca-hash PIN` (no CA file), as a node imported with the printed
    /// join command runs it; returns (success, stdout + stderr).
    pub fn join_pinned(
        &self,
        server: &RegistrationServer,
        token: &str,
        node: &str,
        ips: &[&str],
        pin: &str,
    ) -> (bool, String) {
        self.join_trusting(
            server.registration,
            token,
            node,
            ips,
            &["--ca-hash".as_ref(), pin.as_ref()],
            &[],
            &[],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn join_trusting(
        &self,
        registration: SocketAddr,
        token: &str,
        node: &str,
        ips: &[&str],
        trust: &[&std::ffi::OsStr],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (bool, String) {
        let token_file = self.dir.path().join("token");
        std::fs::write(&token_file, token).expect("write token file");
        let mut command = Command::new(crate::binary("tunnel-edge"));
        command
            .arg("join")
            .arg("--server")
            .arg(format!("https://{registration}"))
            .arg("--server-name")
            .arg("127.0.0.1")
            .args(trust)
            .arg("--token-file")
            .arg(&token_file)
            .arg("--node-name")
            .arg(node)
            .arg("--state-dir")
            .arg(&self.state)
            .args(extra)
            .env_remove("RUST_LOG")
            .env("RUST_BACKTRACE", "0");
        clear_proxy_env(&mut command);
        command.envs(env.iter().copied());
        for ip in ips {
            command.arg("--node-ip").arg(ip);
        }
        let output = command.output().expect("run tunnel-edge join");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// Start `tunnel-edge run --state-dir` against `server`'s edge listener, allowing `ports`
    /// on itself, logging at `filter`.
    pub fn run(&mut self, server: &RegistrationServer, ports: &[u16], filter: &str) {
        self.spawn_edge(server, ports, filter, "300ms", "", &[]);
    }

    /// [`JoinedEdge::run`] with `reconnect.max` set to `max_backoff` (a humantime string).
    pub fn run_with_max_backoff(
        &mut self,
        server: &RegistrationServer,
        ports: &[u16],
        filter: &str,
        max_backoff: &str,
    ) {
        self.spawn_edge(server, ports, filter, max_backoff, "", &[]);
    }

    /// [`JoinedEdge::run_with_max_backoff`] with the session on `transport` (`tcp`, `quic`).
    pub fn run_over(
        &mut self,
        server: &RegistrationServer,
        ports: &[u16],
        filter: &str,
        max_backoff: &str,
        transport: &str,
    ) {
        let extra = format!("transport = \"{transport}\"");
        self.spawn_edge(server, ports, filter, max_backoff, &extra, &[]);
    }

    /// [`JoinedEdge::run`] with more `[server]` lines (verbatim) and environment variables.
    /// The egress proxy variables (`HTTPS_PROXY` and the like) are cleared first, so only
    /// those in `env` reach the edge.
    pub fn run_with(
        &mut self,
        server: &RegistrationServer,
        ports: &[u16],
        filter: &str,
        server_extra: &str,
        env: &[(&str, &str)],
    ) {
        self.spawn_edge(server, ports, filter, "300ms", server_extra, env);
    }

    fn spawn_edge(
        &mut self,
        server: &RegistrationServer,
        ports: &[u16],
        filter: &str,
        max_backoff: &str,
        server_extra: &str,
        env: &[(&str, &str)],
    ) {
        let ports = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let config = self.dir.path().join("edge.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
address = "{edge}"
connect_timeout = "5s"
{transport}
{server_extra}
[reconnect]
min = "50ms"
max = "{max_backoff}"
stable_after = "2s"
[liveness]
ping_interval = "500ms"
ping_misses = 3
[dial]
self_host = "127.0.0.1"
[allow]
ports = [{ports}]
[log]
filter = "{filter}"
"#,
                // TCP unless the test chose: the harness's relays and balancers are TCP.
                transport = if server_extra.contains("transport") {
                    ""
                } else {
                    "transport = \"tcp\""
                },
                edge = server.edge,
            ),
        )
        .expect("write edge.toml");
        let mut command = Command::new(crate::binary("tunnel-edge"));
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&self.state);
        clear_proxy_env(&mut command);
        command.envs(env.iter().copied());
        self.child = Some(ChildGuard::spawn(
            "tunnel-edge (joined)",
            command,
            &self.dir.path().join("edge.log"),
        ));
    }

    /// Everything the running edge logged.
    pub fn log(&self) -> String {
        self.child.as_ref().map(ChildGuard::log).unwrap_or_default()
    }

    /// Stop the edge process.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }
}

/// Remove every variable curl (and so the edge) reads a proxy setting from.
pub fn clear_proxy_env(command: &mut Command) {
    for name in tunnel_edge::proxy::PROXY_ENV
        .iter()
        .chain(&tunnel_edge::proxy::NO_PROXY_ENV)
    {
        command.env_remove(name);
    }
}

impl Default for JoinedEdge {
    fn default() -> Self {
        JoinedEdge::new()
    }
}
