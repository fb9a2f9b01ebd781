//! The one-command node import, as an operator runs it: `tunnel-server token create
//! --print-join-command` on the cloud side, then the printed `sh install.sh ...` line on the
//! node, against a real registration API with a real token, in a temporary root with
//! `--no-systemd`. The test then runs the installed unit's `ExecStart` line itself (rooted)
//! and CONNECTs through the session. A second run changes nothing, a wrong `--ca-hash` fails
//! before any file is written, and `uninstall` leaves the root as it was. The script itself
//! is `shellcheck` clean and installs the shipped unit byte for byte.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::Digest;
use tether_tests::process::ChildGuard;
use tether_tests::registration::{RegistrationOptions, RegistrationServer};
use tether_tests::targets::EchoServer;
use tether_tests::Pki;

const NODE: &str = "idc-node-9";
const NODE_IP: &str = "192.0.2.10";
/// How long the edge may take to hold a session (reconnect backoff starts at 200 ms).
const UP: Duration = Duration::from_secs(15);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn installer() -> PathBuf {
    repo().join("deploy/edge/install.sh")
}

/// Every entry under `root`: path, mode, and for files size and SHA-256, sorted.
fn listing(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        use std::os::unix::fs::PermissionsExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let rel = path.strip_prefix(root).expect("under root").display();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.push(format!("{rel}/ {mode:o}"));
                walk(root, &path, out);
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("link");
                out.push(format!("{rel} -> {}", target.display()));
            } else {
                let bytes = std::fs::read(&path).expect("read");
                let digest = sha2::Sha256::digest(&bytes);
                let mtime = meta.modified().expect("mtime");
                out.push(format!(
                    "{rel} {mode:o} {} {digest:x} {mtime:?}",
                    bytes.len()
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Run the installer with `args`; (success, stdout + stderr).
fn install(args: &[String]) -> (bool, String) {
    let output = Command::new("sh")
        .arg(installer())
        .args(args)
        .env_remove("TETHER_JOIN_TOKEN")
        .env_remove("RUST_LOG")
        .output()
        .expect("run install.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// The words after `sh install.sh` on the line `token create --print-join-command` printed.
fn printed_install_args(server: &RegistrationServer) -> Vec<String> {
    let out = server.admin(&[
        "token",
        "create",
        "--print-join-command",
        "--server-address",
        &server.registration.to_string(),
    ]);
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("sh install.sh "))
        .unwrap_or_else(|| panic!("no installer line in {out}"));
    line.split_whitespace().map(str::to_owned).collect()
}

/// The unit's `ExecStart=` words with every absolute path moved under `root`.
fn rooted_exec_start(root: &Path) -> Command {
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/tunnel-edge.service"))
        .expect("the installed unit");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let rooted: Vec<String> = line
        .split_whitespace()
        .map(|w| match w.strip_prefix('/') {
            Some(rel) => root.join(rel).display().to_string(),
            None => w.to_owned(),
        })
        .collect();
    let mut command = Command::new(&rooted[0]);
    command.args(&rooted[1..]);
    command
}

#[tokio::test]
async fn printed_command_installs_a_node_that_carries_a_connect_and_uninstalls_cleanly() {
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let port = echo.addr.port();
    let options = RegistrationOptions {
        allowed_ports: vec![port],
        ..Default::default()
    };
    let server = RegistrationServer::start(&pki, &options).await;
    let printed = printed_install_args(&server);

    // A root that already holds some of the machine's own files: uninstall must keep them.
    let dir = tempfile::tempdir().expect("dir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("usr/local/bin")).expect("mkdir");
    std::fs::write(root.join("usr/local/bin/kubelet"), "#!/bin/sh\n").expect("kubelet");
    std::fs::create_dir_all(root.join("etc/default")).expect("mkdir");
    std::fs::write(
        root.join("etc/default/kubelet"),
        "KUBELET_EXTRA_ARGS=--v=2\n",
    )
    .expect("kubelet defaults");
    let before = listing(&root);
    let script = dir.path().join("custom-data.sh");
    std::fs::write(&script, "echo custom data ran\n").expect("user script");

    // The node side: the printed line, plus what this machine needs (its IP, the edge port
    // of this test's server, the echo port opened, loopback standing in for the node IP).
    let mut args = printed.clone();
    for extra in [
        "--node-name",
        NODE,
        "--node-ip",
        NODE_IP,
        "--tunnel-address",
        &server.edge.to_string(),
        "--allow-port",
        &port.to_string(),
        "--self-host",
        "127.0.0.1",
        "--apiserver-forward",
        "none",
        "--user-script",
        &script.display().to_string(),
        "--binary",
        &tether_tests::binary("tunnel-edge").display().to_string(),
        "--root",
        &root.display().to_string(),
        "--no-systemd",
    ] {
        args.push(extra.to_owned());
    }

    // A wrong pin first: refused before anything is written.
    let mut wrong = args.clone();
    let at = wrong
        .iter()
        .position(|a| a == "--ca-hash")
        .expect("--ca-hash")
        + 1;
    wrong[at] = format!("sha256:{}", "ab".repeat(32));
    let (ok, output) = install(&wrong);
    assert!(!ok, "installed with a wrong pin: {output}");
    assert!(
        output.contains("CA pin mismatch") && output.contains("nothing was changed"),
        "{output}"
    );
    assert_eq!(listing(&root), before, "a refused install wrote files");

    let (ok, output) = install(&args);
    assert!(ok, "install failed: {output}");
    assert!(
        output.contains(&format!("node {NODE} installed")),
        "{output}"
    );
    assert!(
        output.contains("KUBELET_EXTRA_ARGS"),
        "no warning about /etc/default/kubelet: {output}"
    );
    let log = std::fs::read_to_string(root.join("var/log/tether/user-script.log")).expect("log");
    assert!(log.contains("custom data ran"), "{log}");
    let dropin =
        std::fs::read_to_string(root.join("etc/systemd/system/kubelet.service.d/20-tether.conf"))
            .expect("kubelet drop-in");
    assert!(
        dropin.contains("EnvironmentFile=-/var/lib/tether/kubelet.env"),
        "{dropin}"
    );
    assert!(root.join("var/lib/tether/kubelet.env").is_file());

    let mut edge = ChildGuard::spawn(
        "tunnel-edge (installed unit)",
        rooted_exec_start(&root),
        &dir.path().join("edge.log"),
    );
    server
        .wait_log(&["edge session established", NODE], 1, UP)
        .await;
    server
        .echo_through(
            &pki,
            &format!("{NODE_IP}:{port}"),
            b"through the installed node",
        )
        .await;

    // Second run: nothing changes, and it says so (the user script is not run again).
    let installed = listing(&root);
    let (ok, output) = install(&args);
    assert!(ok, "second run failed: {output}");
    assert!(output.contains("nothing to do"), "{output}");
    assert_eq!(listing(&root), installed, "a second run changed files");

    edge.kill();
    let (ok, output) = install(&[
        "uninstall".into(),
        "--root".into(),
        root.display().to_string(),
        "--no-systemd".into(),
    ]);
    assert!(ok, "uninstall failed: {output}");
    assert_eq!(listing(&root), before, "uninstall left the root changed");
}

#[test]
fn install_script_is_shellcheck_clean() {
    let output = Command::new("shellcheck")
        .arg("--shell=sh")
        .arg(installer())
        .output()
        .unwrap_or_else(|e| {
            panic!("shellcheck not found ({e}): .ci/run installs it (apt-get install shellcheck)")
        });
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn install_script_carries_the_shipped_unit_byte_for_byte() {
    let script = std::fs::read_to_string(installer()).expect("install.sh");
    let unit =
        std::fs::read_to_string(repo().join("deploy/systemd/tunnel-edge.service")).expect("unit");
    let start = script.find("<<'UNIT'\n").expect("unit heredoc") + "<<'UNIT'\n".len();
    let end = start + script[start..].find("\nUNIT\n").expect("heredoc end") + 1;
    assert_eq!(&script[start..end], unit, "install.sh and the unit differ");
}
