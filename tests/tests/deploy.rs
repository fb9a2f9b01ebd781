//! The shipped deployment files as a node runs them: `tunnel-edge join`, then exactly the
//! `ExecStart` line of deploy/systemd/tunnel-edge.service with deploy/examples/edge.toml,
//! changing only what a real install changes (the load balancer's address, where the binary and
//! the files live). If the unit, the example and what `join` writes drift apart, this fails.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tether_tests::process::ChildGuard;
use tether_tests::registration::{JoinedEdge, RegistrationOptions, RegistrationServer};
use tether_tests::targets::EchoServer;
use tether_tests::Pki;

const NODE: &str = "idc-node-7";
/// How long the edge may take to hold a session (reconnect backoff starts at 200 ms).
const UP: Duration = Duration::from_secs(15);

/// The words of the unit's `ExecStart=` line.
fn exec_start(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart line");
    line.split_whitespace().map(str::to_owned).collect()
}

#[tokio::test]
async fn joined_node_runs_from_the_shipped_unit_and_example_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("deploy/systemd/tunnel-edge.service"))
        .expect("read the unit");
    let example =
        std::fs::read_to_string(root.join("deploy/examples/edge.toml")).expect("read the example");

    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let port = echo.addr.port();
    let server = RegistrationServer::start(
        &pki,
        &RegistrationOptions {
            allowed_ports: vec![port],
            ..Default::default()
        },
    )
    .await;
    let token = server.create_token(&["--pool", "idc"]);
    let node = JoinedEdge::new();
    let (ok, output) = node.join(&pki, &server, &token, NODE, &[], &[]);
    assert!(ok, "join failed: {output}");
    assert!(output.contains("reachable by name only"), "{output}");

    // A real install edits the server address; the state directory is the one join wrote. The
    // node's owner opens the test's target port beside the kubelet's (ports the cloud sends
    // are never dialed without that local consent), and, the node having joined without an
    // IP, points its name at loopback as the example shows.
    let dir = tempfile::tempdir().expect("config directory");
    let config = dir.path().join("edge.toml");
    let shipped_state = "/var/lib/tether";
    assert!(example.contains(&format!("state_dir = \"{shipped_state}\"")));
    let text = example
        .replace("tether.example.com:9000", &server.edge.to_string())
        .replace(shipped_state, &node.state.display().to_string())
        .replace("ports = [10250]", &format!("ports = [10250, {port}]"))
        .replace("# self_host = \"127.0.0.1\"", "self_host = \"127.0.0.1\"");
    std::fs::write(&config, text).expect("write edge.toml");

    // README: check the config before enabling the unit; it loads what join wrote.
    let checked = Command::new(tether_tests::binary("tunnel-edge"))
        .arg("check-config")
        .arg(&config)
        .output()
        .expect("run check-config");
    let report = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        report.contains(&format!("ok (node {NODE})")) && report.contains("renewal on"),
        "{report}"
    );
    // `--state-dir` overrides the file's: an empty directory is named as not joined.
    let empty = dir.path().join("not-joined");
    std::fs::create_dir(&empty).expect("mkdir");
    let refused = Command::new(tether_tests::binary("tunnel-edge"))
        .arg("check-config")
        .arg(&config)
        .arg("--state-dir")
        .arg(&empty)
        .output()
        .expect("run check-config");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("tunnel-edge join --state-dir"),
        "{stderr}"
    );

    let words = exec_start(&unit);
    assert_eq!(words[0], "/usr/local/bin/tunnel-edge", "{words:?}");
    let mut command = Command::new(tether_tests::binary("tunnel-edge"));
    for word in &words[1..] {
        if word == "/etc/tether/edge.toml" {
            command.arg(&config);
        } else if word == shipped_state {
            command.arg(&node.state);
        } else {
            command.arg(word);
        }
    }
    let _edge = ChildGuard::spawn("tunnel-edge (unit)", command, &dir.path().join("edge.log"));
    server
        .wait_log(&["edge session established", NODE], 1, UP)
        .await;

    server
        .echo_through(&pki, &format!("{NODE}:{port}"), b"through the shipped unit")
        .await;
}
