//! Tether's wire types and codecs: pure functions on bytes, no sockets, no async.
//!
//! The I/O crates buffer bytes and call in here; everything a peer sends is
//! bounded and validated before it becomes one of these types.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod connect;
pub mod h2_authority;
pub mod konnectivity;
pub mod node;
pub mod quic_head;
pub mod stream;
pub mod target;

pub use node::{NameError, NodeName};
pub use target::{Host, Target, TargetError};
