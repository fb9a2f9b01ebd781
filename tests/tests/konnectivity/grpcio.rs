//! grpcio, the gRPC library from PyPI, unmodified and with its default settings, as a
//! Konnectivity frontend client on the Unix socket: dial, a 64 MiB checksummed echo, close,
//! and a dial error. Stubs are generated from the project's .proto by grpcio-tools at test
//! time. `.ci/run` installs both into a venv and exports `TETHER_PYTHON`; without them the
//! test fails under CI and is skipped (loudly) elsewhere.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::setup::Rig;

/// How long the Python client may take for everything: 64 MiB each way plus start-up.
const CLIENT_DEADLINE: Duration = Duration::from_secs(180);
/// The echo's size.
const ECHO_MIB: u32 = 64;

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TETHER_PYTHON") {
        return Some(p.into());
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/grpcio-venv/bin/python3");
    if venv.exists() {
        return Some(venv);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "grpcio is missing under CI: .ci/run installs it and sets TETHER_PYTHON"
    );
    eprintln!("SKIPPED: no grpcio venv (run .ci/run, or set TETHER_PYTHON)");
    None
}

async fn stubs(python: &Path, dir: &Path) {
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/proto");
    let out = tokio::process::Command::new(python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .arg("konnectivity.proto")
        .output()
        .await
        .expect("run grpc_tools.protoc");
    assert!(
        out.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn run_client(rig: &Rig, python: &Path, authority: Option<&str>) -> serde_json::Value {
    let stubs_dir = tempfile::tempdir().unwrap();
    stubs(python, stubs_dir.path()).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("grpcio/konnectivity_client.py");
    let socket = rig.unix_socket().canonicalize().unwrap();
    let mut command = tokio::process::Command::new(python);
    command
        .arg(script)
        .arg(stubs_dir.path())
        .arg(&socket)
        .arg(rig.target(rig.echo.port()))
        // An allowed port on an address no edge owns.
        .arg(format!("192.0.2.99:{}", rig.echo.port()))
        .arg(ECHO_MIB.to_string())
        .args(authority)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(CLIENT_DEADLINE, command.output())
        .await
        .expect("grpcio client finished in time")
        .expect("run the grpcio client");
    assert!(
        out.status.success(),
        "grpcio client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn check(report: &serde_json::Value) {
    assert_eq!(report["dial_type"], "DIAL_RSP", "{report}");
    assert_eq!(report["dial_error"], "", "{report}");
    assert_eq!(report["dial_random"], 42, "{report}");
    assert_ne!(report["connect_id"], 0, "{report}");
    assert_eq!(report["echo_bytes"], u64::from(ECHO_MIB) << 20, "{report}");
    assert_eq!(report["sent_sha256"], report["received_sha256"], "{report}");
    assert_eq!(report["close_type"], "CLOSE_RSP", "{report}");
    assert_eq!(report["close_connect_id"], report["connect_id"], "{report}");
    assert_eq!(report["stream_end"], "ok", "{report}");
    assert_eq!(report["unrouted_type"], "DIAL_RSP", "{report}");
    let error = report["unrouted_error"].as_str().unwrap();
    assert!(
        error.contains("no edge") && error.contains("192.0.2.99"),
        "{report}"
    );
    assert_eq!(report["unrouted_end"], "ok", "{report}");
    eprintln!("grpcio report: {report}");
}

#[tokio::test]
async fn grpcio_with_default_settings_over_the_unix_socket() {
    let Some(python) = python() else { return };
    let rig = Rig::start().await;
    let report = run_client(&rig, &python, None).await;
    check(&report);
}

#[tokio::test]
async fn grpcio_sending_the_socket_path_as_authority_like_kube_apiserver() {
    let Some(python) = python() else { return };
    let rig = Rig::start().await;
    let path = rig.unix_socket().canonicalize().unwrap();
    let report = run_client(&rig, &python, Some(path.to_str().unwrap())).await;
    check(&report);
    let metrics = rig.server.shared.metrics.render();
    assert!(
        !metrics.contains("tether_konnectivity_authority_rewrites_total 0"),
        "the socket path was not seen as an authority: {metrics}"
    );
}
