//! Keeps `src/konnectivity/pb.rs` in step with `proto/konnectivity.proto`, with a pure-Rust
//! protobuf compiler (protox), so no system `protoc` is ever needed.
//!
//! Regenerate after editing the .proto:
//! `cargo test -p tether-protocol --test konnectivity_codegen -- --ignored`

use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The generated prost messages, as `prost-build` writes them.
fn generate(out_dir: &Path) -> String {
    let proto_dir = crate_dir().join("proto");
    let fds = protox::compile(["konnectivity.proto"], [&proto_dir]).expect("compile .proto");
    prost_build::Config::new()
        .out_dir(out_dir)
        // Zero-copy payloads: DATA carries up to 4 MiB.
        .bytes(["."])
        .compile_fds(fds)
        .expect("generate Rust");
    // No proto package: prost names the file `_.rs`.
    let code = std::fs::read_to_string(out_dir.join("_.rs")).expect("read generated code");
    format!(
        "// @generated from proto/konnectivity.proto by tests/konnectivity_codegen.rs; do not edit.\n\
         // Regenerate: cargo test -p tether-protocol --test konnectivity_codegen -- --ignored\n{code}"
    )
}

fn checked_in() -> PathBuf {
    crate_dir().join("src/konnectivity/pb.rs")
}

#[test]
#[ignore = "writes src/konnectivity/pb.rs; run after editing the .proto"]
fn regenerate_konnectivity_pb() {
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
        "src/konnectivity/pb.rs is stale; run: \
         cargo test -p tether-protocol --test konnectivity_codegen -- --ignored"
    );
}
