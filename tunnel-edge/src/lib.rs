//! Tether edge agent: keeps a TLS + HTTP/2 session with tunnel-server (the edge plays the
//! HTTP/2 server), dials the local kubelet for each stream within its own default-deny
//! allowlist, and reconnects with jittered exponential backoff.
#![forbid(unsafe_code)]

pub mod admin;
pub mod allow;
pub mod backoff;
pub mod check;
pub mod config;
pub mod forward;
pub mod join;
mod lane;
pub mod metrics;
pub mod proxy;
pub mod quic;
mod refusal;
pub mod renew;
pub mod replicas;
pub mod session;
pub mod state;
mod status;
mod stream;
pub mod token;
mod wrong_port;

pub use config::EdgeConfig;
pub use session::{Edge, EdgeStatus};
