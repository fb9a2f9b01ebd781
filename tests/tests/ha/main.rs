//! High availability end to end: real `tunnel-server` replicas behind a real haproxy in TCP
//! mode, one real edge that knows only haproxy's address (TESTPLAN 8), and graceful drain
//! (TESTPLAN 4). Skipped with a message when haproxy is not installed, except under CI.
//!
//! Its own test binary, so these multi-process topologies do not share the two cores with
//! the other end-to-end tests.

mod drain;
mod edge_drain;
mod instances;
mod replicas;
