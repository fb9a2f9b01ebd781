//! Tether server: edge sessions (TLS + HTTP/2 in reverse roles), the apiserver-facing HTTP
//! CONNECT frontend, routing by certificate identity, destination policy, admin and metrics.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod check;
pub mod client;
pub mod config;
pub mod demo;
pub mod frontend;
pub mod lifecycle;
pub mod metrics;
pub mod node_session;
pub mod pki;
pub mod policy;
pub mod prelude;
pub mod proxy_protocol;
pub mod registration;
pub mod replicas;
/// Node removal; lives with the rest of the shared control state, re-exported here for the
/// edge listener and frontends that check it on every handshake and stream.
pub use registration::state::revocation;
pub mod routing;
pub mod server;
pub mod session;
pub mod session_certificate;
mod session_info;
pub mod source_limit;
pub mod trust;
pub mod upstream;

pub use server::{BoundAddrs, RunningServer, Shared};
