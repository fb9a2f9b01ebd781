//! A send scheduler for the frames of one HTTP/2 session, between h2 and the TLS stream.
//!
//! h2 serves its streams round robin one frame at a time and writes each frame whole, up to
//! 256 KiB of a bulk stream (one pipe chunk); whatever the socket takes is then beyond
//! reordering. So a small response queued behind a bulk stream waits for every bulk byte
//! already written. This layer keeps a bounded queue of frames per stream just above the
//! socket (which `TCP_NOTSENT_LOWAT` keeps short, see [`crate::set_session_socket_options`])
//! and writes them out sparse-flow first, as fq_codel does: connection frames, then streams
//! with little queued, then the rest by deficit round robin, bulk DATA cut into frames of one
//! quantum. The rules and why: [`queue`]. The state machine is sans-io; [`ScheduledWriter`]
//! drives it as an `AsyncWrite`. TCP sessions only: QUIC gives every stream its own.

pub mod frames;
pub mod queue;
mod writer;

#[cfg(test)]
mod tests;

pub use queue::{FrameScheduler, SchedConfig};
pub use writer::ScheduledWriter;

/// Largest DATA frame the scheduler cuts from a bulk frame, and its round-robin quantum, in
/// bytes. A small frame waits for at most one quantum of another stream already committed
/// to the socket: 64 KiB is ~0.25 ms at the 250 MB/s per direction measured here, and is
/// also what rustls encrypts per write (its 64 KiB send buffer), so bulk costs no extra
/// write calls.
pub const QUANTUM: usize = 64 << 10;

/// Bytes staged for one vectored write: one quantum, for the same reason.
pub const STAGE: usize = 64 << 10;

/// Bytes the scheduler queues before h2's writes wait (h2 keeps the rest in its per-stream
/// buffers). Enough for one bulk frame (a 256 KiB pipe chunk) plus the next, so a small
/// frame is handed over at most one bulk frame after it was queued in h2.
pub const QUEUE_LIMIT: usize = 512 << 10;

/// The scheduler's default tuning.
pub const CONFIG: SchedConfig = SchedConfig {
    quantum: QUANTUM,
    stage: STAGE,
};

/// Which end of the HTTP/2 connection a transport carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The HTTP/2 client (tunnel-server on an edge session): writes the preface first.
    Client,
    /// The HTTP/2 server (tunnel-edge on an edge session).
    Server,
}

/// A TCP session's transport with the scheduler on its write side, boxed as both ends'
/// session loops take it.
pub fn session_io<T: crate::quic_bridge::Io + 'static>(
    io: T,
    role: Role,
) -> Box<dyn crate::quic_bridge::Io> {
    let config = CONFIG;
    let limit = QUEUE_LIMIT;
    match role {
        Role::Client => Box::new(ScheduledWriter::h2_client(io, config, limit)),
        Role::Server => Box::new(ScheduledWriter::h2_server(io, config, limit)),
    }
}
