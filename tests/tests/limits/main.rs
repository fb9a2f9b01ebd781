//! Resource limits under attack, end to end (issue 11, TESTPLAN 11, 12, 13 and 20):
//! listeners that cannot be starved by connections that never speak, accept loops that
//! survive garbage, resets and descriptor exhaustion, sessions that cannot exhaust memory
//! with huge headers, burn CPU with control-frame floods or confuse streams, PROXY headers
//! trusted only from the balancer. Real `tunnel-server` processes, real TLS, attack clients
//! from 127.0.0.x sources.
//!
//! Its own test binary: the floods hold hundreds of sockets, so they do not share a process
//! (or its descriptor limit) with the other end-to-end tests.

mod accept_loop;
mod edge_flood;
mod frontend_slowloris;
mod proxy_trust;
mod quic_flood;
mod registration_flood;
mod session_abuse;
mod stream_confusion;
mod upstream_reset;
