//! Tether server: edge sessions (TLS + HTTP/2 in reverse roles), the apiserver-facing HTTP
//! CONNECT frontend, routing by certificate identity, destination policy, admin and metrics.
//!
//! One folder per concern: `edge` (edge sessions, the route table, edge → cloud upstreams),
//! `frontend` (CONNECT and Konnectivity gRPC), `agent` (stock Konnectivity agents),
//! `registration` (join, renewal, tokens and their state), `pki`, `admin` (admin endpoint and
//! the fleet views), `metrics`, `config` and `demo`. `listen` (what a listener reads before
//! TLS, per-source caps) and `lifecycle` (stop and socket binding) sit at the bottom: they
//! depend on no other part, and `server` at the top starts them all.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod check;
pub mod client;
pub mod config;
pub mod demo;
pub mod edge;
pub mod frontend;
pub mod lifecycle;
pub mod listen;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod registration;
pub mod replicas;
/// Node removal; lives with the rest of the shared control state, re-exported here for the
/// edge listener and frontends that check it on every handshake and stream.
pub use registration::state::revocation;
pub mod server;
pub mod shards;
pub mod trust;

pub use server::{BoundAddrs, RunningServer, Shared};
