//! The `tunnel-edge` binary's command line. (Also makes `cargo test --workspace` build the
//! binary that the end-to-end tests in `tests/` run.)

use std::process::{Command, Output};

fn edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tunnel-edge"))
        .args(args)
        .output()
        .expect("run tunnel-edge")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_lists_the_connection_flags() {
    let o = edge(&["run", "--help"]);
    assert!(o.status.success());
    let t = text(&o);
    for flag in ["--server", "--ca", "--cert", "--key", "--allow-port"] {
        assert!(t.contains(flag), "{flag} missing:\n{t}");
    }
}

#[test]
fn run_without_a_server_names_the_missing_key() {
    let o = edge(&["run"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("server.address"), "{}", text(&o));
}

#[test]
fn unknown_config_key_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, "[allow]\nport = [10250]\n").unwrap();
    let o = edge(&["check-config", path.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("port"), "{}", text(&o));
}

#[test]
fn missing_certificate_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let o = edge(&[
        "run",
        "--server",
        "127.0.0.1:9",
        "--ca",
        dir.path().join("nope.pem").to_str().unwrap(),
        "--cert",
        "x",
        "--key",
        "y",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("server.ca"), "{}", text(&o));
}
