//! Running a manifest's container for real: its exact `command`, with the pod's filesystem
//! mirrored under a temporary root (every absolute path the container and its config name is
//! moved below it) and every listener moved to 127.0.0.1:0. If a flag, a path or a mount is
//! wrong in the manifest, the binary says so here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::{Container, VolumeMount};
use tether_tests::process::ChildGuard;
use tether_tests::server::read_ready_file;

/// A temporary directory standing for the pod's root filesystem.
pub struct PodRoot {
    dir: tempfile::TempDir,
    mounts: Vec<VolumeMount>,
}

/// A running container and where it listens.
pub struct Running {
    /// Held, not read: dropping it ends the process.
    _child: ChildGuard,
    pub addrs: serde_json::Value,
}

impl Running {
    /// The address of listener `key` in the ready file (`admin`, `edge`, `connect_tcp`, ...).
    pub fn addr(&self, key: &str) -> SocketAddr {
        self.addrs[key]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no `{key}` listener in {}", self.addrs))
    }
}

impl PodRoot {
    /// A root for `container`, whose volume mounts become directories below it.
    pub fn new(container: &Container) -> PodRoot {
        let dir = tempfile::Builder::new()
            .prefix("tether-pod-")
            .tempdir()
            .expect("temporary pod root");
        let mounts = container.volume_mounts.clone().unwrap_or_default();
        for mount in &mounts {
            std::fs::create_dir_all(dir.path().join(mount.mount_path.trim_start_matches('/')))
                .expect("create mount directory");
        }
        PodRoot { dir, mounts }
    }

    /// Where the container's absolute `path` lives on this machine.
    pub fn path(&self, path: &str) -> PathBuf {
        assert!(path.starts_with('/'), "{path} is not absolute");
        self.dir.path().join(path.trim_start_matches('/'))
    }

    /// The volume mount holding `path`, or a panic naming the path: everything the container
    /// reads or writes outside its image must come from a volume.
    pub fn mount_of(&self, path: &str) -> &VolumeMount {
        self.mounts
            .iter()
            .filter(|m| Path::new(path).starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{path} is on no volume mount of the container"))
    }

    /// `text` (a server.toml) as it must read here: absolute paths moved below the root (each
    /// checked to be on a mount), listeners moved to 127.0.0.1:0, the replica DNS name, which
    /// resolves only in the cluster, dropped.
    pub fn map_config(&self, text: &str) -> String {
        let mut out = String::new();
        for line in text.lines() {
            let mut line = line.to_owned();
            if line.trim_start().starts_with("dns = ") {
                continue;
            }
            if let Some(start) = line.find("\"/") {
                let path_end = line[start + 1..].find('"').expect("closed string") + start + 1;
                let path = line[start + 1..path_end].to_owned();
                self.mount_of(&path);
                line.replace_range(start + 1..path_end, &self.path(&path).display().to_string());
            }
            for any in ["\"0.0.0.0:", "\"127.0.0.1:"] {
                if let Some(start) = line.find(any) {
                    let end = line[start + 1..].find('"').expect("closed string") + start + 1;
                    line.replace_range(start + 1..end, "127.0.0.1:0");
                }
            }
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// Run `container`'s command with the workspace's binary, paths mapped, and wait until
    /// every listener is bound.
    pub async fn run(&self, container: &Container) -> Running {
        let mut words = container.command.clone().unwrap_or_default();
        words.extend(container.args.clone().unwrap_or_default());
        assert!(
            !words.is_empty(),
            "container {} has no command",
            container.name
        );
        let mut command = Command::new(tether_tests::binary(&words[0]));
        for word in &words[1..] {
            match word.split_once("=/") {
                Some((flag, path)) => {
                    let path = format!("/{path}");
                    command.arg(format!("{flag}={}", self.path(&path).display()))
                }
                None if word.starts_with('/') => command.arg(self.path(word)),
                None => command.arg(word),
            };
        }
        let ready = self.dir.path().join("ready.json");
        command.arg("--ready-file").arg(&ready);
        let log = self.dir.path().join("container.log");
        let mut child = ChildGuard::spawn(&container.name, command, &log);
        let addrs = read_ready_file(&mut child, &ready).await;
        Running {
            _child: child,
            addrs,
        }
    }
}

/// Run `tunnel-server ca init` with `words` (from the docs), its `--dir` replaced by `dir`;
/// what it printed.
pub fn ca_init(words: &[String], dir: &Path) -> String {
    assert_eq!(&words[..3], ["tunnel-server", "ca", "init"], "{words:?}");
    let mut command = Command::new(tether_tests::binary("tunnel-server"));
    let mut rest = words[1..].iter();
    while let Some(word) = rest.next() {
        if word == "--dir" {
            rest.next().expect("--dir has a value");
            command.arg("--dir").arg(dir);
        } else if word.starts_with("--dir=") {
            command.arg(format!("--dir={}", dir.display()));
        } else {
            command.arg(word);
        }
    }
    let output = command.output().expect("run tunnel-server ca init");
    assert!(
        output.status.success(),
        "{words:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether `cert` (PEM file), verified against `ca` (PEM file), is valid for `name`.
pub fn certificate_valid_for(ca: &Path, cert: &Path, name: &str) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    let roots = tunnel_io::tls::load_roots(ca).map_err(|e| e.to_string())?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots.into(),
        tunnel_io::tls::provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let chain = tunnel_io::tls::load_certs(cert).map_err(|e| e.to_string())?;
    let server_name = tunnel_io::tls::server_name(name)?;
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &server_name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| format!("{} for {name}: {e}", cert.display()))
}
