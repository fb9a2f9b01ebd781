//! What the route table holds for a node: the one live way to reach it, a Tether edge session
//! or a stock Konnectivity agent's stream. Frontends and the dialer see only this type, so
//! both kinds are dialed, retired and closed through one code path; what differs lives in
//! `session.rs` and `agent/`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use protocol::{NodeName, Target};

use crate::agent::AgentSession;
use crate::edge::routing::Routable;
use crate::edge::session::{EdgeSession, OpenError, OpenStream};

/// A node's live session, of either kind.
#[derive(Clone)]
pub enum NodeSession {
    /// A `tunnel-edge` session (TLS + reverse HTTP/2).
    Tether(Arc<EdgeSession>),
    /// A stock Konnectivity `proxy-agent` on `/AgentService/Connect`.
    Agent(Arc<AgentSession>),
}

impl NodeSession {
    /// The HTTP/2 session streams are opened on: the edge's own, or the agent's in-memory
    /// one (see `agent/`).
    fn tunnel(&self) -> &EdgeSession {
        match self {
            NodeSession::Tether(session) => session,
            NodeSession::Agent(agent) => agent.tunnel(),
        }
    }

    /// `tether` or `agent`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            NodeSession::Tether(_) => "tether",
            NodeSession::Agent(_) => "agent",
        }
    }

    /// Ask the node to dial `target`; see [`EdgeSession::open`]. The stream is the same
    /// for both kinds, so every frontend pipes it the same way.
    pub async fn open(
        &self,
        target: &Target,
        client: &str,
        dial_timeout: Duration,
    ) -> Result<OpenStream, OpenError> {
        self.tunnel().open(target, client, dial_timeout).await
    }

    /// The shard the session runs on (`crate::shards`): a frontend moves a stream's pipe
    /// there. Agents and QUIC sessions run on the server's own runtime (`None`).
    pub fn shard(&self) -> Option<&crate::shards::Shard> {
        self.tunnel().shard()
    }

    /// Take no new streams; the session ends once its open ones have. An agent is also
    /// told DRAIN.
    pub fn retire(&self) {
        match self {
            NodeSession::Tether(session) => session.retire(),
            NodeSession::Agent(agent) => agent.retire(),
        }
    }

    /// End the session now (revocation, shutdown): its streams fail.
    pub fn close(&self) {
        self.tunnel().close();
    }

    /// The peer's address as the server saw it.
    pub fn peer(&self) -> SocketAddr {
        self.tunnel().peer()
    }

    /// When the peer's certificate was issued (Unix seconds), if known.
    pub fn certificate_issued(&self) -> Option<u64> {
        self.tunnel().certificate_issued()
    }

    /// Streams open on this session now.
    pub fn open_streams(&self) -> usize {
        self.tunnel().open_streams()
    }

    /// The session streams are opened on, for read-only views (the admin API).
    pub fn edge_session(&self) -> &EdgeSession {
        self.tunnel()
    }

    /// How the node reaches this replica, for operators: `tcp` (TLS + HTTP/2 over TCP, a
    /// Tether edge), `quic` (a Tether edge over QUIC) or `konnectivity` (a stock agent's
    /// gRPC stream).
    pub fn transport(&self) -> &'static str {
        match self {
            NodeSession::Tether(session) => session.transport(),
            NodeSession::Agent(_) => "konnectivity",
        }
    }
}

impl Routable for NodeSession {
    fn session_id(&self) -> u64 {
        self.tunnel().session_id()
    }
    fn node(&self) -> &NodeName {
        self.tunnel().node()
    }
    fn ips(&self) -> &[IpAddr] {
        self.tunnel().ips()
    }
    fn certificate_serial(&self) -> &str {
        self.tunnel().certificate_serial()
    }
    fn certificate_current(&self) -> bool {
        self.tunnel().certificate_current()
    }
}
