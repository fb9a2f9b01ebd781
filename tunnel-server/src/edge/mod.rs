//! Edge sessions and what they are routed by: the server's side of each edge's session
//! (TLS + HTTP/2 over TCP, or QUIC), the route table from node name and IP to the one live
//! session, the session-info exchange, the certificate facts a session carries, and the edge
//! → cloud upstreams that ride the same edges. Frontends reach nodes only through
//! [`node_session::NodeSession`] and the [`routing`] table.

pub mod lane;
pub mod node_session;
pub mod routing;
pub mod session;
pub mod session_certificate;
pub(crate) mod session_info;
pub mod upstream;
