//! Read-only JSON views for operators on the admin listener: `GET /api/v1/edges` (the
//! sessions this replica holds) and `GET /api/v1/nodes` (joined, connected and revoked
//! nodes). `tunnel-server edges` and `tunnel-server node list` read them ([`crate::admin::fleet`]).
//! Nothing here changes state: each answer is a copy of the route table, the session
//! counters (atomics the data path keeps anyway) and the registration files, taken when
//! asked. The admin listener is plain HTTP on a loopback address; it shows node names, IPs
//! and certificate serials, never keys or tokens.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::edge::routing::Routable;
use crate::registration::state::identities::IssuedIdentity;
use crate::Shared;

/// Path of the edges view.
pub const EDGES_PATH: &str = "/api/v1/edges";
/// Path of the nodes view.
pub const NODES_PATH: &str = "/api/v1/nodes";

/// One edge session this replica holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeView {
    /// Node name (from its verified certificate).
    pub node: String,
    /// Node IPs bound in its certificate.
    pub ips: Vec<IpAddr>,
    /// The replica (server ID) holding the session.
    pub replica: String,
    /// The edge's address as this replica saw it (behind a PROXY-protocol balancer, the
    /// edge's own).
    pub peer: String,
    /// `tether` (a `tunnel-edge`) or `agent` (a stock Konnectivity agent).
    pub kind: String,
    /// `tcp` (TLS + HTTP/2 over TCP) or `konnectivity` (an agent's gRPC stream).
    pub transport: String,
    /// When the session was established, RFC 3339.
    pub since: String,
    /// Streams open on it now.
    pub streams_open: u64,
    /// Bytes tunneled from frontend clients to the node on this session.
    pub bytes_to_edge: u64,
    /// Bytes tunneled from the node to frontend clients on this session.
    pub bytes_from_edge: u64,
    /// Serial of its certificate, lowercase hex (null when it has none or it is unreadable).
    pub certificate_serial: Option<String>,
    /// When its certificate expires, RFC 3339 (null when unknown).
    pub certificate_expires: Option<String>,
}

/// `GET /api/v1/edges`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgesResponse {
    /// This replica's server ID.
    pub replica: String,
    /// Its sessions, by node name.
    pub edges: Vec<EdgeView>,
}

/// One node as the registration state and this replica's route table know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node name.
    pub node: String,
    /// Its node IPs (from the identity registry, else from its live session).
    pub ips: Vec<IpAddr>,
    /// The pool it joined (null when it was not joined through the registration API).
    pub pool: Option<String>,
    /// Whether the identity registry holds it (joined, certificates not all expired).
    pub joined: bool,
    /// Serial of its current certificate (registry, else live session).
    pub certificate_serial: Option<String>,
    /// When its certificate expires, RFC 3339 (registry: the last one issued for it).
    pub certificate_expires: Option<String>,
    /// Whether it holds a session with this replica now (read from etcd by `node list
    /// --config`: with any replica).
    pub connected: bool,
    /// Whether its certificate is refused as revoked (false again once re-admitted with a
    /// certificate issued after the revocation).
    pub revoked: bool,
    /// When it was last revoked, RFC 3339 (null if never).
    pub revoked_at: Option<String>,
}

/// `GET /api/v1/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesResponse {
    /// This replica's server ID.
    pub replica: String,
    /// Whether `[registration]` is on (without it only connected nodes are known).
    pub registration: bool,
    /// Every known node, by name.
    pub nodes: Vec<NodeView>,
}

fn rfc3339(unix: u64) -> String {
    tunnel_io::check::rfc3339(i64::try_from(unix).unwrap_or(i64::MAX))
}

fn known_serial(serial: &str) -> Option<String> {
    (serial != "?").then(|| serial.to_owned())
}

/// The edges view of this replica now.
pub fn edges(shared: &Shared) -> EdgesResponse {
    let mut edges: Vec<EdgeView> = shared
        .routes
        .sessions()
        .iter()
        .map(|routed| {
            let session = routed.edge_session();
            let certificate = session.certificate();
            EdgeView {
                node: routed.node().to_string(),
                ips: routed.ips().to_vec(),
                replica: shared.replica.id.to_string(),
                peer: routed.peer().to_string(),
                kind: routed.kind().to_owned(),
                transport: routed.transport().to_owned(),
                since: rfc3339(session.since_unix()),
                streams_open: routed.open_streams() as u64,
                bytes_to_edge: session.bytes().to_edge(),
                bytes_from_edge: session.bytes().from_edge(),
                certificate_serial: known_serial(&certificate.serial),
                certificate_expires: certificate.expires_unix.map(rfc3339),
            }
        })
        .collect();
    edges.sort_by(|a, b| a.node.cmp(&b.node));
    EdgesResponse {
        replica: shared.replica.id.to_string(),
        edges,
    }
}

/// What a live session tells about its node, where the registry does not.
#[derive(Debug, Clone, Default)]
pub struct LiveNode {
    /// The session's node IPs.
    pub ips: Vec<IpAddr>,
    /// Its certificate's serial, when known.
    pub certificate_serial: Option<String>,
    /// When its certificate expires, Unix seconds, when known.
    pub certificate_expires: Option<u64>,
}

/// The nodes view: the identity registry, the revocation list and the live sessions.
pub fn nodes(shared: &Shared) -> NodesResponse {
    let identities = shared
        .identities
        .as_ref()
        .map(|store| store.all().nodes)
        .unwrap_or_default();
    let revoked: BTreeMap<String, u64> = match &shared.revocations {
        Some(list) => {
            list.refresh();
            list.snapshot()
        }
        None => BTreeMap::new(),
    };
    let live: BTreeMap<String, LiveNode> = shared
        .routes
        .sessions()
        .into_iter()
        .map(|s| {
            let certificate = s.edge_session().certificate();
            let node = LiveNode {
                ips: s.ips().to_vec(),
                certificate_serial: known_serial(&certificate.serial),
                certificate_expires: certificate.expires_unix,
            };
            (s.node().to_string(), node)
        })
        .collect();
    NodesResponse {
        replica: shared.replica.id.to_string(),
        registration: shared.identities.is_some(),
        nodes: node_views(&identities, &revoked, &live),
    }
}

/// One row per node named by the registry, the revocations or a live session, by name: the
/// same rows whether read from one replica or from the shared store (`node list --config`).
pub fn node_views(
    identities: &BTreeMap<String, IssuedIdentity>,
    revoked: &BTreeMap<String, u64>,
    live: &BTreeMap<String, LiveNode>,
) -> Vec<NodeView> {
    let names: BTreeSet<&String> = identities
        .keys()
        .chain(revoked.keys())
        .chain(live.keys())
        .collect();
    names
        .into_iter()
        .map(|name| {
            let entry = identities.get(name);
            let session = live.get(name);
            let revoked_at = revoked.get(name).copied();
            NodeView {
                node: name.clone(),
                ips: entry
                    .map(|e| e.ips.clone())
                    .or_else(|| session.map(|s| s.ips.clone()))
                    .unwrap_or_default(),
                pool: entry.map(|e| e.pool.clone()),
                joined: entry.is_some(),
                certificate_serial: entry
                    .map(|e| e.serial.clone())
                    .or_else(|| session.and_then(|s| s.certificate_serial.clone())),
                certificate_expires: entry
                    .map(|e| e.expires_unix)
                    .or_else(|| session.and_then(|s| s.certificate_expires))
                    .map(rfc3339),
                connected: session.is_some(),
                // Re-admitted when its current certificate was issued after the revocation.
                revoked: revoked_at.is_some_and(|at| entry.is_none_or(|e| e.issued_unix <= at)),
                revoked_at: revoked_at.map(rfc3339),
            }
        })
        .collect()
}
