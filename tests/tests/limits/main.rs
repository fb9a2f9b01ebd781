//! Resource limits under attack, end to end (issue 11, TESTPLAN 11 and 13): listeners that
//! cannot be starved by connections that never speak, sessions that cannot exhaust memory with
//! huge headers or burn CPU with control-frame floods, PROXY headers trusted only from the
//! balancer. Real `tunnel-server` processes, real TLS, attack clients from 127.0.0.x sources.
//!
//! Its own test binary: the floods hold hundreds of sockets, so they do not share a process
//! (or its descriptor limit) with the other end-to-end tests.

mod edge_flood;
mod proxy_trust;
mod registration_flood;
mod session_abuse;
mod upstream_reset;
