//! `/AgentService/Connect`: admitting an agent (metadata, certificate identity, claims, an
//! address already owned by another node) and answering `serverid`/`servercount` before any
//! packet. The attached agent's life is `edge/session.rs`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use protocol::konnectivity::Packet;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};
use tracing::{warn, Instrument};
use tunnel_io::identity::{edge_identity_from_der, EdgeIdentity};

use super::identifiers::{self, IdentifierError};
use super::mux::{self, Mux};
use super::session::{memory_session, run, Attached};
use super::AgentSession;
use crate::edge::node_session::NodeSession;
use crate::edge::routing::{Routable, RouteConflict};
use crate::edge::session::EdgeSession;
use crate::frontend::konnectivity::service::agent_service_server::AgentService;
use crate::frontend::konnectivity::{ConnInfo, PacketStream};
use crate::lifecycle::Stop;
use crate::Shared;

/// Request metadata: the agent's self-chosen ID.
const AGENT_ID: &str = "agentid";
/// Request metadata: the agent's routing claims.
const AGENT_IDENTIFIERS: &str = "agentidentifiers";
/// Response header: this replica's ID.
const SERVER_ID: &str = "serverid";
/// Response header: how many replicas there are (the agent connects until it has seen
/// that many distinct server IDs).
const SERVER_COUNT: &str = "servercount";
/// Longest `agentid` accepted, in bytes.
const MAX_AGENT_ID_LEN: usize = 256;
/// The `AgentService` implementation: one task per attached agent.
pub(crate) struct AgentEndpoint {
    shared: Arc<Shared>,
    stop: Stop,
    tracker: TaskTracker,
    /// Only the attached agents' tasks: the listener shuts down when it is empty.
    sessions: TaskTracker,
}

impl AgentEndpoint {
    /// An endpoint whose agents run in `tracker` (and `sessions`) until `stop`.
    pub(crate) fn new(
        shared: Arc<Shared>,
        stop: Stop,
        tracker: TaskTracker,
        sessions: TaskTracker,
    ) -> Self {
        AgentEndpoint {
            shared,
            stop,
            tracker,
            sessions,
        }
    }
}

/// An agent turned away: the metric label, the gRPC code and text it is told, and its
/// `agentid` (for the audit line).
struct Refusal {
    result: &'static str,
    code: tonic::Code,
    message: String,
    agent_id: String,
}

/// What admission established about an agent.
struct Admitted {
    agent_id: String,
    identity: EdgeIdentity,
    /// Serial and registry standing of its certificate.
    certificate: crate::edge::session_certificate::SessionCertificate,
    /// When its certificate was issued (Unix seconds), for revocation.
    issued: Option<u64>,
}

#[tonic::async_trait]
impl AgentService for AgentEndpoint {
    type ConnectStream = PacketStream;

    async fn connect(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<PacketStream>, Status> {
        let shared = &self.shared;
        let info = request.extensions().get::<ConnInfo>().cloned();
        let peer = info
            .as_ref()
            .and_then(|i| i.peer_addr)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let refuse = |refusal: Refusal, node: Option<&str>| {
            shared.metrics.agent_session(refusal.result);
            warn!(target: "audit", event = "agent_refused", %peer, node, agent_id = refusal.agent_id, result = refusal.result, reason = refusal.message, "konnectivity agent refused");
            Status::new(refusal.code, refusal.message)
        };
        let admitted = match admit(shared, request.metadata(), info.as_ref(), &self.stop) {
            Ok(a) => a,
            Err(refusal) => return Err(refuse(refusal, None)),
        };
        let node = admitted.identity.node.to_string();
        // Refused before any header: an address already owned by another node. (The route
        // table checks again when the agent is routed.)
        if let Some(conflict) = owner_conflict(shared, &admitted.identity) {
            let refusal = Refusal {
                result: "conflict",
                code: tonic::Code::PermissionDenied,
                message: format!("{conflict}; not routed to this agent"),
                agent_id: admitted.agent_id,
            };
            return Err(refuse(refusal, Some(&node)));
        }
        let settle = shared.routes.get(&admitted.identity.node).is_some();

        let headers = server_headers(shared)
            .map_err(|_| Status::internal("replica ID is not a header value"))?;
        let (send_request, client_side, edge_side) = memory_session()
            .await
            .map_err(|e| Status::internal(format!("in-memory session: {e}")))?;
        let tunnel = EdgeSession::new(
            shared,
            admitted.identity.node,
            admitted.identity.ips,
            peer,
            send_request,
        );
        tunnel.set_certificate(admitted.certificate);
        if let Some(issued) = admitted.issued {
            tunnel.set_certificate_issued(issued);
        }
        let konnectivity = shared.config.konnectivity.as_ref();
        let buffer_limit = konnectivity.map_or(4 << 20, |k| k.agent_connection_buffer);
        let (mux, queues) = Mux::new(
            buffer_limit,
            shared.config.connect.write_timeout,
            shared.metrics.agent_stalled_resets.clone(),
        );
        let agent = Arc::new(AgentSession {
            tunnel,
            agent_id: admitted.agent_id,
            mux,
            drained: AtomicBool::new(false),
        });
        let routed = Arc::new(NodeSession::Agent(agent.clone()));
        let (end, end_rx) = oneshot::channel();
        let mut response = Response::new(mux::outbound(queues, end_rx));
        *response.metadata_mut() = headers;
        let span = tracing::info_span!("agent", %node, %peer);
        self.tracker.spawn(
            self.sessions.track_future(
                run(
                    Attached {
                        agent,
                        routed,
                        incoming: request.into_inner(),
                        client_side,
                        edge_side,
                        end,
                        settle,
                    },
                    self.shared.clone(),
                    self.stop.clone(),
                    self.tracker.clone(),
                )
                .instrument(span),
            ),
        );
        // Headers go out when this returns, before the first packet of the stream.
        Ok(response)
    }
}

/// The first of `identity`'s IPs that another node owns now, if any.
fn owner_conflict(shared: &Shared, identity: &EdgeIdentity) -> Option<RouteConflict> {
    identity.ips.iter().find_map(|ip| {
        let owner = shared.routes.lookup(&protocol::Host::Ip(*ip))?;
        (owner.node() != &identity.node).then(|| RouteConflict::AddressOwned {
            ip: *ip,
            owner: owner.node().clone(),
            owner_serial: owner.certificate_serial().to_owned(),
            serial: "?".to_owned(),
        })
    })
}

/// Check the metadata and the certificate.
fn admit(
    shared: &Shared,
    metadata: &MetadataMap,
    info: Option<&ConnInfo>,
    stop: &Stop,
) -> Result<Admitted, Refusal> {
    use tonic::Code;
    let text = |key: &str| metadata.get(key).map(|v| v.to_str().map(str::to_owned));
    let agent_id = match text(AGENT_ID) {
        Some(Ok(id)) if !id.is_empty() && id.len() <= MAX_AGENT_ID_LEN => id,
        _ => String::new(),
    };
    let fail = |result, code, message: String| {
        Err(Refusal {
            result,
            code,
            message,
            agent_id: agent_id.clone(),
        })
    };
    if agent_id.is_empty() {
        let message = format!(
            "metadata {AGENT_ID} missing or invalid (1..={MAX_AGENT_ID_LEN} printable bytes)"
        );
        return fail("metadata", Code::InvalidArgument, message);
    }
    if stop.drain.is_cancelled() {
        let message = "server draining; connect to another replica".to_string();
        return fail("draining", Code::Unavailable, message);
    }
    let claims = match text(AGENT_IDENTIFIERS) {
        None => identifiers::Identifiers::default(),
        Some(Ok(value)) => match identifiers::parse(&value) {
            Ok(ids) => ids,
            Err(e) => return fail("identifiers", Code::InvalidArgument, e.to_string()),
        },
        Some(Err(_)) => {
            let message = format!("metadata {AGENT_IDENTIFIERS} is not text");
            return fail("identifiers", Code::InvalidArgument, message);
        }
    };
    let Some(cert) = info.and_then(|i| i.peer_cert.as_ref()) else {
        let message = "a client certificate is required".to_string();
        return fail("identity", Code::Unauthenticated, message);
    };
    let identity = match edge_identity_from_der(cert.as_ref()) {
        Ok(identity) => identity,
        Err(e) => {
            let message = format!("certificate identity refused: {e}");
            return fail("identity", Code::PermissionDenied, message);
        }
    };
    // A removed node cannot come back as an agent either.
    if let Err((_, reason)) =
        crate::revocation::check_handshake(shared, &identity.node, cert.as_ref())
    {
        return fail("revoked", Code::PermissionDenied, reason);
    }
    if let Err(e) = identifiers::check(&claims, &identity) {
        let code = match e {
            IdentifierError::NotCovered { .. }
            | IdentifierError::Cidr(_)
            | IdentifierError::DefaultRoute => Code::PermissionDenied,
            _ => Code::InvalidArgument,
        };
        return fail("identifiers", code, e.to_string());
    }
    let certificate = crate::edge::session_certificate::SessionCertificate::of(
        shared,
        &identity.node,
        cert.as_ref(),
    );
    let issued = crate::pki::issued_unix(cert.as_ref());
    Ok(Admitted {
        agent_id,
        identity,
        certificate,
        issued,
    })
}

/// `serverid` and `servercount`.
fn server_headers(
    shared: &Shared,
) -> Result<MetadataMap, tonic::metadata::errors::InvalidMetadataValue> {
    let mut headers = MetadataMap::new();
    headers.insert(
        SERVER_ID,
        MetadataValue::try_from(shared.replica.id.as_str())?,
    );
    headers.insert(SERVER_COUNT, MetadataValue::from(shared.replica.count()));
    Ok(headers)
}
