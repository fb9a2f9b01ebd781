//! The etcd state backend end to end: a real three-member etcd on loopback, three real
//! `tunnel-server` replicas sharing it, real `tunnel-edge join`/`run` processes and the
//! operator's commands. Skipped with a message when etcd is not installed, except under CI.
//!
//! Its own test binary: these topologies (3 etcd members, 3 servers, edges) would crowd the
//! two cores shared with the other end-to-end tests.

mod fixture;
mod import;
mod joins;
mod prune;
mod revocation;
