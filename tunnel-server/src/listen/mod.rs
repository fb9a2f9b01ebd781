//! What an unauthenticated listener does before TLS, shared by the edge listener, the
//! registration API and the frontends: the short first-byte deadline and the PROXY header
//! ([`prelude`], [`proxy_protocol`]), and the per-source connection caps ([`source_limit`]).
//! Depends on no other part of the server.

pub mod prelude;
pub mod proxy_protocol;
pub mod source_limit;
