//! apiserver-facing frontends. Each one turns a client request into a [`Target`], asks the
//! shared [`Dialer`](dial) for a stream to the right edge, and pipes bytes.

pub mod connect;
pub mod dial;
pub mod konnectivity;
