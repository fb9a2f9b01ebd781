//! The `tunnel-server` binary's command line: help, config checking that fails closed, and
//! certificate commands. (Also makes `cargo test --workspace` build the binary that the
//! end-to-end tests in `tests/` run.)

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn server(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tunnel-server"))
        .args(args)
        .output()
        .expect("run tunnel-server")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_explains_every_command() {
    let o = server(&["--help"]);
    assert!(o.status.success());
    let t = text(&o);
    for word in ["run", "check-config", "ca", "demo"] {
        assert!(t.contains(word), "{word} missing from help:\n{t}");
    }
}

#[test]
fn ca_init_writes_private_keys_0600_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("pki");
    let d = ca_dir.to_str().unwrap();
    let o = server(&["ca", "init", "--dir", d, "--dns", "tether.example"]);
    assert!(o.status.success(), "{}", text(&o));
    for key in [
        "ca-key.pem",
        "server-key.pem",
        "frontend-ca-key.pem",
        "apiserver-client-key.pem",
    ] {
        let mode = std::fs::metadata(ca_dir.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let again = server(&["ca", "init", "--dir", d]);
    assert!(
        !again.status.success(),
        "second init must refuse to overwrite"
    );

    let out = dir.path().join("edge");
    let o = server(&[
        "ca",
        "issue-edge",
        "--ca-dir",
        d,
        "--node-name",
        "node-a",
        "--ip",
        "192.0.2.10",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("node-a.pem").is_file());

    let o = server(&[
        "ca",
        "issue-edge",
        "--ca-dir",
        d,
        "--node-name",
        "Node_A",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--node-name"), "{}", text(&o));
}

#[test]
fn check_config_names_the_bad_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(server(&["ca", "init", "--dir", d.to_str().unwrap()])
        .status
        .success());
    let good = "[edge]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\nclient_ca = \"ca.pem\"\n[connect]\nunix_socket = \"c.sock\"\n";
    std::fs::write(d.join("good.toml"), good).unwrap();
    let o = server(&["check-config", d.join("good.toml").to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));

    let bad = good.replace("[connect]", "[connect]\nheader_timout = \"1s\"");
    std::fs::write(d.join("bad.toml"), bad).unwrap();
    let o = server(&["check-config", d.join("bad.toml").to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("header_timout") && t.contains("bad.toml"), "{t}");
}

#[test]
fn tcp_frontend_without_client_ca_refuses_to_start() {
    // TESTPLAN 18: the gateway is never an open proxy.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(server(&["ca", "init", "--dir", d.to_str().unwrap()])
        .status
        .success());
    let config = "[edge]\nlisten = \"127.0.0.1:0\"\ncert = \"server.pem\"\nkey = \"server-key.pem\"\nclient_ca = \"ca.pem\"\n[connect]\ntcp_listen = \"127.0.0.1:0\"\ntcp_cert = \"server.pem\"\ntcp_key = \"server-key.pem\"\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(d.join("open.toml"), config).unwrap();
    let o = server(&["run", "--config", d.join("open.toml").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("tcp_client_ca"), "{}", text(&o));
}
