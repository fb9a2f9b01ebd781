//! Keeps `src/registration/pb.rs` (prost messages, tonic server and client of the
//! registration API) in step with `protocol/proto/registration.proto`, with a pure-Rust
//! protobuf compiler (protox), so no system `protoc` is needed.
//!
//! Regenerate after editing the .proto:
//! `cargo test -p tunnel-io --test registration_codegen -- --ignored`

use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate(out_dir: &Path) -> String {
    let proto_dir = crate_dir().join("../protocol/proto");
    let fds = protox::compile(["registration.proto"], [&proto_dir]).expect("compile .proto");
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        // JoinRequest carries the bootstrap token: its Debug is written by hand (redacted).
        .skip_debug(".tether.registration.v1.JoinRequest")
        .out_dir(out_dir)
        .compile_fds(fds)
        .expect("generate Rust");
    let code = std::fs::read_to_string(out_dir.join("tether.registration.v1.rs"))
        .expect("read generated code");
    format!(
        "// @generated from protocol/proto/registration.proto by tests/registration_codegen.rs;\n\
         // do not edit. Regenerate:\n\
         // cargo test -p tunnel-io --test registration_codegen -- --ignored\n{code}"
    )
}

fn checked_in() -> PathBuf {
    crate_dir().join("src/registration/pb.rs")
}

#[test]
#[ignore = "writes src/registration/pb.rs; run after editing the .proto"]
fn regenerate_registration_pb() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(checked_in(), generate(dir.path())).unwrap();
}

#[test]
fn generated_code_matches_the_proto() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = generate(dir.path());
    let current = std::fs::read_to_string(checked_in()).unwrap_or_default();
    assert!(
        fresh == current,
        "src/registration/pb.rs is stale; run: \
         cargo test -p tunnel-io --test registration_codegen -- --ignored"
    );
}
