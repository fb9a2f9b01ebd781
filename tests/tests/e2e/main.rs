//! End-to-end tests: the real `tunnel-server` and `tunnel-edge` binaries as processes, real
//! TLS, curl and a Rust CONNECT client, all on 127.0.0.1. One test binary (one link) with a
//! module per theme; each test starts its own server and edge.
//!
//! Run with `cargo test --workspace` (which builds the binaries) or, after
//! `cargo build -p tunnel-server -p tunnel-edge`, `cargo test -p tether-tests`.

mod admin;
mod backpressure;
mod counting;
mod fallback;
mod frontends;
mod idle;
mod integrity;
mod interactive;
mod isolation;
mod lanes;
mod liveness;
mod node_name;
mod pending;
mod refusals;
mod restart;
mod shards;
mod ssrf;
