//! End-to-end test harness: real `tunnel-server` and `tunnel-edge` processes, real TLS, real
//! clients (curl and a small Rust CONNECT client), everything on 127.0.0.1 with kernel-chosen
//! ports. It owns spawning, readiness, teardown (children die with their guard) and the test
//! targets; the tests themselves live in `tests/e2e/`.
//!
//! The edge's node IP is a documentation address ([`NODE_IP`]) that the edge maps to
//! 127.0.0.1 (`[dial] self_host`), so no packet ever leaves the machine.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod data;
pub mod edge;
pub mod etcd;
pub mod fake_edge;
pub mod flood;
pub mod frontend;
pub mod ha;
pub mod haproxy;
pub mod monitoring;
pub mod pki;
pub mod process;
pub mod raw_edge;
pub mod registration;
pub mod relay;
pub mod server;
pub mod targets;
pub mod tinyproxy;
pub mod udp_relay;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use cluster::{Cluster, ClusterOptions};
pub use edge::{EdgeOptions, EdgeProc, EdgeTuning};
pub use pki::{EdgeFiles, Pki};
pub use server::{ServerOptions, ServerProc};

/// The test node's name (the edge certificate's identity).
pub const NODE: &str = "edge-a";
/// The test node's IP as kube-apiserver would dial it: TEST-NET-1, never routed; the edge
/// maps it to 127.0.0.1.
pub const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
/// An address no edge owns.
pub const UNKNOWN_NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));

/// Path of a workspace binary next to the running test: the test executable lives in
/// `target/<profile>/deps/`, the binaries in `target/<profile>/`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable is not under target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build the binaries first with `cargo test --workspace` \
         (or `cargo build -p tunnel-server -p tunnel-edge`)",
        path.display()
    );
    path
}

/// Poll `check` every `interval` until it returns `Some`, or panic naming `what` once
/// `timeout` has passed. Bounded in time and (through the interval) in count.
pub async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(interval).await;
    }
}

/// Run `future` with a deadline; panic naming `what` when it passes.
pub async fn within<T>(what: &str, timeout: Duration, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}
