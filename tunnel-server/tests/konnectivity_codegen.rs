//! Keeps `src/frontend/konnectivity/service.rs` (tonic server code for `/ProxyService` and
//! `/AgentService`) in step with `protocol/proto/konnectivity.proto`, with a pure-Rust
//! protobuf compiler (protox), so no system `protoc` is needed. The messages are not
//! generated here: they map to the validated `protocol::konnectivity::Packet` through our
//! own codec, so the generated prost structs stay private to `protocol`.
//!
//! Regenerate after editing the .proto:
//! `cargo test -p tunnel-server --test konnectivity_codegen -- --ignored`

use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate(out_dir: &Path) -> String {
    let proto_dir = crate_dir().join("../protocol/proto");
    let fds = protox::compile(["konnectivity.proto"], [&proto_dir]).expect("compile .proto");
    let mut builder = tonic_build::configure()
        .build_client(false)
        .build_server(true)
        .build_transport(false)
        .codec_path("crate::frontend::konnectivity::codec::PacketCodec")
        .out_dir(out_dir);
    for message in [
        "Packet",
        "PacketType",
        "DialRequest",
        "DialResponse",
        "CloseRequest",
        "CloseResponse",
        "CloseDial",
        "Drain",
        "Data",
    ] {
        builder = builder.extern_path(
            format!(".{message}"),
            format!("::protocol::konnectivity::{message}"),
        );
    }
    builder.compile_fds(fds).expect("generate Rust");
    let code = std::fs::read_to_string(out_dir.join("_.rs")).expect("read generated code");
    format!(
        "// @generated from protocol/proto/konnectivity.proto by tests/konnectivity_codegen.rs;\n\
         // do not edit. Regenerate:\n\
         // cargo test -p tunnel-server --test konnectivity_codegen -- --ignored\n{code}"
    )
}

fn checked_in() -> PathBuf {
    crate_dir().join("src/frontend/konnectivity/service.rs")
}

#[test]
#[ignore = "writes src/frontend/konnectivity/service.rs; run after editing the .proto"]
fn regenerate_konnectivity_service() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(checked_in(), generate(dir.path())).unwrap();
}

#[test]
fn generated_service_matches_the_proto() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = generate(dir.path());
    let current = std::fs::read_to_string(checked_in()).unwrap_or_default();
    assert!(
        fresh == current,
        "src/frontend/konnectivity/service.rs is stale; run: \
         cargo test -p tunnel-server --test konnectivity_codegen -- --ignored"
    );
}
