//! `Join` and `Renew`. Every refusal, whatever its cause (malformed, unknown, wrong, expired,
//! revoked or exhausted token; throttled source; bad CSR; revoked node), answers the same
//! `PERMISSION_DENIED "registration refused"`: the cause goes only to the audit log, so the API
//! is no oracle. The identity of an issued certificate comes from the validated request
//! (Join) or from the caller's verified certificate (Renew), never from the CSR, and a CSR that
//! claims anything else is refused.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::NodeName;
use rcgen::PublicKeyData;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use tunnel_io::logging::JsonList;
use tunnel_io::registration::pb::registration_server::Registration;
use tunnel_io::registration::pb::{Credentials, JoinRequest, RenewRequest};
use tunnel_io::registration::REFUSED;

use super::config::RegistrationConfig;
use super::limits::{JoinLimits, Throttled};
use super::request::{check_csr_claims, parse_csr, parse_node_ips};
use super::state::identities::{CertificateRef, IssuedIdentity};
use super::state::{
    unix_now, BootstrapToken, Declined, Issued, JoinClaim, NodePool, Refusal, RenewClaim,
    StateError, StateStore,
};
use super::PeerInfo;
use crate::pki::{certificate_facts, certificate_facts_pem, Ca, CertificateFacts};

/// Why a request was refused: for the audit log only.
#[derive(Debug)]
enum Denied {
    Throttled(Throttled),
    BadRequest(&'static str),
    NodeRevoked,
    /// The state backend's decision: token, identity registry, issuing, or the store
    /// itself being unavailable.
    Declined(Declined),
}

impl Denied {
    fn label(&self) -> &'static str {
        match self {
            Denied::Throttled(t) => t.label(),
            Denied::BadRequest(what) => what,
            Denied::NodeRevoked => "node_revoked",
            Denied::Declined(Declined::Token(r)) => r.label(),
            Denied::Declined(Declined::Identity(clash)) => clash.label(),
            Denied::Declined(Declined::Issue(what)) => what,
            Denied::Declined(Declined::State(_)) => "state_store_unavailable",
        }
    }

    /// More for the audit line than the label says (whose name or address), if anything.
    fn detail(&self) -> String {
        match self {
            Denied::Declined(Declined::Identity(clash)) => clash.to_string(),
            Denied::Declined(Declined::State(error)) => error.to_string(),
            _ => String::new(),
        }
    }

    /// Whether this is no fault of the caller's (throttled already, or the store down): it
    /// does not count towards a lockout.
    fn store_fault(&self) -> bool {
        matches!(
            self,
            Denied::Throttled(_) | Denied::Declined(Declined::State(_))
        )
    }

    /// What the caller is told: the generic refusal, except when the store is unavailable
    /// (that says nothing about the token, and tells the node to retry later).
    fn status(&self) -> Status {
        match self {
            Denied::Declined(Declined::State(_)) => Status::unavailable(STATE_UNAVAILABLE),
            _ => refused(),
        }
    }
}

impl From<StateError> for Denied {
    fn from(error: StateError) -> Denied {
        Denied::Declined(Declined::State(error))
    }
}

/// The answer to a join or renewal while the state store cannot be reached.
pub const STATE_UNAVAILABLE: &str = "state store unavailable";

/// A successful join, for the audit line.
struct Joined {
    node: NodeName,
    ips: Vec<IpAddr>,
    token_id: String,
    serial: String,
    /// Nodes whose name or IPs this join took over (the token allowed it).
    reprovisioned: Vec<String>,
    credentials: Credentials,
}

/// The registration service of one replica.
pub struct RegistrationApi {
    ca: Ca,
    state: Arc<StateStore>,
    limits: JoinLimits,
    lifetime: Duration,
    endpoints: Vec<String>,
    /// Joins, refusals and lockouts (unregistered until [`RegistrationApi::count_in`]).
    metrics: crate::metrics::registration::RegistrationMetrics,
}

impl RegistrationApi {
    /// Load the CA named by `config`; decisions go to `state`.
    pub fn load(
        config: &RegistrationConfig,
        state: Arc<StateStore>,
    ) -> anyhow::Result<RegistrationApi> {
        Ok(RegistrationApi {
            ca: Ca::load(&config.ca_cert, &config.ca_key)?,
            state,
            limits: JoinLimits::new(&config.rate),
            lifetime: config.cert_lifetime,
            endpoints: config.tunnel_endpoints.clone(),
            metrics: Default::default(),
        })
    }

    /// Count calls in the server's registry.
    pub fn count_in(&mut self, metrics: &crate::metrics::registration::RegistrationMetrics) {
        self.metrics = metrics.clone();
    }

    fn credentials(&self, certificate_pem: String, pool: Option<&NodePool>) -> Credentials {
        let pool = pool.cloned().unwrap_or_default();
        Credentials {
            certificate_pem,
            ca_bundle_pem: self.ca.cert_pem().to_owned(),
            tunnel_endpoints: self.endpoints.clone(),
            labels: pool.labels.into_iter().collect(),
            taints: pool.taints,
            extra_ports: pool.extra_ports.into_iter().map(u32::from).collect(),
            pool: pool.name,
        }
    }

    /// Issue a certificate for the key of `csr_der` (checked already; parsed again because a
    /// backend may decide more than once, after losing a race) and describe it for the
    /// identity registry.
    fn issue(
        &self,
        csr_der: &[u8],
        node: &NodeName,
        ips: &[IpAddr],
        pool: &str,
        token_id: &str,
    ) -> Result<Issued, &'static str> {
        let csr = parse_csr(csr_der)?;
        let pem = self
            .ca
            .issue_edge_for_key(csr.public_key, node, ips, self.lifetime)
            .map_err(|_| "issue_failed")?;
        let facts = certificate_facts_pem(&pem).ok_or("issue_failed")?;
        Ok(Issued {
            identity: issued_identity(ips, facts, pool, token_id),
            pem,
        })
    }

    async fn try_join(&self, request: &JoinRequest) -> Result<Joined, Denied> {
        let token = BootstrapToken::parse(&request.token)
            .map_err(|_| Denied::Declined(Declined::Token(Refusal::Malformed)))?;
        self.limits
            .check_token(&token.id)
            .map_err(Denied::Throttled)?;
        let node =
            NodeName::parse(&request.node_name).map_err(|_| Denied::BadRequest("bad_node_name"))?;
        let ips = parse_node_ips(&request.node_ips).map_err(Denied::BadRequest)?;
        let csr = parse_csr(&request.csr_der).map_err(Denied::BadRequest)?;
        check_csr_claims(&csr, &node, &ips).map_err(Denied::BadRequest)?;
        if let Some(created) = self.state.token_created(&token.id).await? {
            if self.state.revocations().join_refused(&node, created) {
                return Err(Denied::NodeRevoked);
            }
        }
        let key = csr.public_key.der_bytes().to_vec();
        let now = unix_now();
        let claim = JoinClaim {
            token: &token,
            node: &node,
            ips: &ips,
            public_key: &key,
            now,
            certificate_expires: now.saturating_add(self.lifetime.as_secs()),
        };
        let mut issue = |admission: &super::state::Admission| {
            self.issue(
                &request.csr_der,
                &node,
                &ips,
                &admission.pool.name,
                &admission.token_id,
            )
        };
        let joined = self
            .state
            .join(claim, &mut issue)
            .await
            .map_err(Denied::Declined)?;
        let credentials = self.credentials(joined.issued.pem, Some(&joined.admission.pool));
        Ok(Joined {
            node,
            ips,
            token_id: joined.admission.token_id,
            serial: joined.issued.identity.serial,
            reprovisioned: joined.reprovisioned,
            credentials,
        })
    }

    async fn try_renew(
        &self,
        peer: &PeerInfo,
        request: &RenewRequest,
    ) -> Result<(NodeName, Vec<IpAddr>, Credentials), Denied> {
        let der = peer
            .cert
            .as_ref()
            .ok_or(Denied::BadRequest("no_client_certificate"))?;
        let identity = tunnel_io::identity::edge_identity_from_der(der.as_ref())
            .map_err(|_| Denied::BadRequest("bad_identity"))?;
        if self
            .state
            .revocations()
            .der_revoked(&identity.node, der.as_ref())
        {
            return Err(Denied::NodeRevoked);
        }
        let csr = parse_csr(&request.csr_der).map_err(Denied::BadRequest)?;
        check_csr_claims(&csr, &identity.node, &identity.ips).map_err(Denied::BadRequest)?;
        let presented = certificate_facts(der.as_ref())
            .map(|f| CertificateRef {
                serial: f.serial,
                key_sha256: f.key_sha256,
            })
            .ok_or(Denied::BadRequest("bad_identity"))?;
        let now = unix_now();
        let claim = RenewClaim {
            node: &identity.node,
            ips: &identity.ips,
            presented: &presented,
            public_key: csr.public_key.der_bytes(),
            now,
            certificate_expires: now.saturating_add(self.lifetime.as_secs()),
        };
        // Renewal keeps the identity: same name and IPs, the new certificate is current.
        let mut issue = || self.issue(&request.csr_der, &identity.node, &identity.ips, "", "");
        let issued = self
            .state
            .renew(claim, &mut issue)
            .await
            .map_err(Denied::Declined)?;
        let credentials = self.credentials(issued.pem, None);
        Ok((identity.node, identity.ips, credentials))
    }
}

fn issued_identity(
    ips: &[IpAddr],
    facts: CertificateFacts,
    pool: &str,
    token_id: &str,
) -> IssuedIdentity {
    IssuedIdentity {
        ips: ips.to_vec(),
        serial: facts.serial,
        key_sha256: facts.key_sha256,
        previous_serial: None,
        pool: pool.to_owned(),
        token_id: token_id.to_owned(),
        issued_unix: facts.issued_unix,
        expires_unix: facts.expires_unix,
    }
}

fn refused() -> Status {
    Status::permission_denied(REFUSED)
}

/// The answer to a locked-out source: still the generic refusal (nothing about the token),
/// plus when the lockout ends, so an operator who mistyped a token knows how long to wait
/// instead of retrying into a longer wait.
fn locked_out(remaining: Duration) -> Status {
    let ends = std::time::SystemTime::now() + remaining + Duration::from_secs(1);
    let unix = ends
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Status::permission_denied(format!(
        "{REFUSED}: too many failed attempts from this address; locked out until {}",
        tunnel_io::check::rfc3339(unix)
    ))
}

// tonic handlers answer `Status`; it is large, but this is one per request.
#[allow(clippy::result_large_err)]
fn peer_of<T>(request: &Request<T>) -> Result<PeerInfo, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::internal("no peer information"))
}

#[tonic::async_trait]
impl Registration for RegistrationApi {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<Credentials>, Status> {
        let peer = peer_of(&request)?;
        let source = peer.addr.ip();
        let now = Instant::now();
        // Throttled sources are refused before anything is parsed or hashed.
        if let Err(throttled) = self.limits.check_source(source, now) {
            self.metrics.refused("join", throttled.label());
            warn!(target: "audit", event = "join_refused", peer = %peer.addr, reason = throttled.label(), "join refused");
            return Err(match self.limits.lockout_remaining(source, now) {
                Some(remaining) if throttled == Throttled::LockedOut => locked_out(remaining),
                _ => refused(),
            });
        }
        let request = request.into_inner();
        match self.try_join(&request).await {
            Ok(joined) => {
                self.limits.succeeded(source);
                self.metrics.issued("join");
                let Joined {
                    node,
                    ips,
                    token_id,
                    serial,
                    reprovisioned,
                    credentials,
                } = joined;
                info!(target: "audit", event = "node_joined", %node, ips = ?JsonList(&ips), token = %token_id, pool = %credentials.pool, serial, peer = %peer.addr, "node joined");
                if !reprovisioned.is_empty() {
                    warn!(target: "audit", event = "node_reprovisioned", %node, ips = ?JsonList(&ips), token = %token_id, replaced = ?JsonList(&reprovisioned), serial, "node re-provisioned: the token allowed taking these identities");
                }
                Ok(Response::new(credentials))
            }
            Err(denied) => {
                let locked = !denied.store_fault() && self.limits.failed(source, now);
                self.metrics.refused("join", denied.label());
                if locked {
                    self.metrics.lockouts.inc();
                }
                // The node name is the caller's claim; the token appears only by its public ID.
                let token_id = request
                    .token
                    .split_once('.')
                    .map(|(id, _)| id)
                    .filter(|id| id.len() <= 6 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
                    .unwrap_or("?");
                warn!(target: "audit", event = "join_refused", peer = %peer.addr, node = %request.node_name.escape_default(), token = token_id, reason = denied.label(), detail = denied.detail(), locked_out = locked, "join refused");
                Err(denied.status())
            }
        }
    }

    async fn renew(&self, request: Request<RenewRequest>) -> Result<Response<Credentials>, Status> {
        let peer = peer_of(&request)?;
        let source = peer.addr.ip();
        let now = Instant::now();
        if let Err(throttled) = self.limits.check_source(source, now) {
            self.metrics.refused("renew", throttled.label());
            warn!(target: "audit", event = "renew_refused", peer = %peer.addr, reason = throttled.label(), "renewal refused");
            return Err(refused());
        }
        match self.try_renew(&peer, request.get_ref()).await {
            Ok((node, ips, credentials)) => {
                self.metrics.issued("renew");
                info!(target: "audit", event = "node_renewed", %node, ips = ?JsonList(&ips), peer = %peer.addr, "node certificate renewed");
                Ok(Response::new(credentials))
            }
            Err(denied) => {
                if !denied.store_fault() && self.limits.failed(source, now) {
                    self.metrics.lockouts.inc();
                }
                self.metrics.refused("renew", denied.label());
                warn!(target: "audit", event = "renew_refused", peer = %peer.addr, reason = denied.label(), detail = denied.detail(), "renewal refused");
                Err(denied.status())
            }
        }
    }
}
