//! `Join` and `Renew`. Every refusal, whatever its cause (malformed, unknown, wrong, expired,
//! revoked or exhausted token; throttled source; bad CSR; revoked node), answers the same
//! `PERMISSION_DENIED "registration refused"`: the cause goes only to the audit log, so the API
//! is no oracle. The identity of an issued certificate comes from the validated request
//! (Join) or from the caller's verified certificate (Renew), never from the CSR, and a CSR that
//! claims anything else is refused.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::NodeName;
use rcgen::PublicKeyData;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use tunnel_io::registration::pb::registration_server::Registration;
use tunnel_io::registration::pb::{Credentials, JoinRequest, RenewRequest};
use tunnel_io::registration::REFUSED;

use super::config::RegistrationConfig;
use tunnel_io::logging::JsonList;

use super::limits::{JoinLimits, Throttled};
use super::request::{check_csr_claims, parse_csr, parse_node_ips};
use super::state::identities::{CertificateRef, IdentityClash, IdentityStore, IssuedIdentity};
use super::state::{unix_now, BootstrapToken, NodePool, Refusal, TokenStore};
use super::PeerInfo;
use crate::pki::{certificate_facts, certificate_facts_pem, Ca, CertificateFacts};
use crate::revocation::RevocationList;

/// Why a request was refused: for the audit log only.
#[derive(Debug, Clone)]
enum Denied {
    Throttled(Throttled),
    Token(Refusal),
    BadRequest(&'static str),
    NodeRevoked,
    /// The name or an IP belongs to another issued identity, or the certificate is stale.
    Identity(IdentityClash),
}

impl Denied {
    fn label(&self) -> &'static str {
        match self {
            Denied::Throttled(t) => t.label(),
            Denied::Token(r) => r.label(),
            Denied::BadRequest(what) => what,
            Denied::NodeRevoked => "node_revoked",
            Denied::Identity(clash) => clash.label(),
        }
    }

    /// More for the audit line than the label says (whose name or address), if anything.
    fn detail(&self) -> String {
        match self {
            Denied::Identity(clash) => clash.to_string(),
            _ => String::new(),
        }
    }
}

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
    tokens: TokenStore,
    revocations: Arc<RevocationList>,
    limits: JoinLimits,
    lifetime: Duration,
    endpoints: Vec<String>,
    identities: Arc<dyn IdentityStore>,
    /// Held from the identity check to the identity record of one join or renewal, so two
    /// concurrent joins cannot both claim a free name or address.
    issuing: Mutex<()>,
    /// Joins, refusals and lockouts (unregistered until [`RegistrationApi::count_in`]).
    metrics: crate::metrics::registration::RegistrationMetrics,
}

impl RegistrationApi {
    /// Load the CA and the token store named by `config`.
    pub fn load(
        config: &RegistrationConfig,
        revocations: Arc<RevocationList>,
        identities: Arc<dyn IdentityStore>,
    ) -> anyhow::Result<RegistrationApi> {
        Ok(RegistrationApi {
            ca: Ca::load(&config.ca_cert, &config.ca_key)?,
            tokens: TokenStore::open(&config.token_file)?,
            revocations,
            limits: JoinLimits::new(&config.rate),
            lifetime: config.cert_lifetime,
            endpoints: config.tunnel_endpoints.clone(),
            identities,
            issuing: Mutex::new(()),
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

    fn try_join(&self, request: &JoinRequest) -> Result<Joined, Denied> {
        let token =
            BootstrapToken::parse(&request.token).map_err(|_| Denied::Token(Refusal::Malformed))?;
        self.limits
            .check_token(&token.id)
            .map_err(Denied::Throttled)?;
        let node =
            NodeName::parse(&request.node_name).map_err(|_| Denied::BadRequest("bad_node_name"))?;
        let ips = parse_node_ips(&request.node_ips).map_err(Denied::BadRequest)?;
        let csr = parse_csr(&request.csr_der).map_err(Denied::BadRequest)?;
        check_csr_claims(&csr, &node, &ips).map_err(Denied::BadRequest)?;
        if let Some(created) = self.tokens.created_unix(&token.id) {
            if self.revocations.join_refused(&node, created) {
                return Err(Denied::NodeRevoked);
            }
        }
        let key = csr.public_key.der_bytes().to_vec();
        let now = unix_now();
        let _issuing = self.issuing.lock().unwrap_or_else(|p| p.into_inner());
        // Token first (nothing used up yet), then the registry, then the use counts.
        let admission = self
            .tokens
            .check(&token, &node, &ips, &key, now)
            .map_err(Denied::Token)?;
        let mut clash = None;
        let mut reprovisioned = Vec::new();
        self.identities
            .update(&mut |registry| {
                match registry.check_join(&node, &ips, &admission.reprovision, now) {
                    Ok(()) => {
                        reprovisioned = registry
                            .nodes
                            .iter()
                            .filter(|(name, e)| {
                                e.expires_unix > now
                                    && (name.as_str() == node.as_str()
                                        || e.ips.iter().any(|ip| ips.contains(ip)))
                            })
                            .map(|(name, _)| name.clone())
                            .collect();
                    }
                    Err(c) => clash = Some(c),
                }
                false
            })
            .map_err(|_| Denied::BadRequest("identity_registry"))?;
        if let Some(clash) = clash {
            return Err(Denied::Identity(clash));
        }
        let certificate_expires = now.saturating_add(self.lifetime.as_secs());
        let admission = self
            .tokens
            .admit(&token, &node, &ips, &key, now, certificate_expires)
            .map_err(Denied::Token)?;
        let pem = self
            .ca
            .issue_edge_for_key(csr.public_key, &node, &ips, self.lifetime)
            .map_err(|_| Denied::BadRequest("issue_failed"))?;
        let facts = certificate_facts_pem(&pem).ok_or(Denied::BadRequest("issue_failed"))?;
        let serial = facts.serial.clone();
        let issued = issued_identity(&ips, facts, &admission.pool.name, &admission.token_id);
        let recorded = self.identities.update(&mut |registry| {
            registry.record_join(&node, issued.clone());
            true
        });
        if let Err(error) = recorded {
            // The in-memory registry holds the join; this replica keeps enforcing it.
            warn!(%error, "could not persist the identity registry");
        }
        let credentials = self.credentials(pem, Some(&admission.pool));
        Ok(Joined {
            node,
            ips,
            token_id: admission.token_id,
            serial,
            reprovisioned,
            credentials,
        })
    }

    fn try_renew(
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
        if self.revocations.der_revoked(&identity.node, der.as_ref()) {
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
        let _issuing = self.issuing.lock().unwrap_or_else(|p| p.into_inner());
        let mut clash = None;
        self.identities
            .update(&mut |registry| {
                clash = registry
                    .check_renewal(&identity.node, &identity.ips, &presented, now)
                    .err();
                false
            })
            .map_err(|_| Denied::BadRequest("identity_registry"))?;
        if let Some(clash) = clash {
            return Err(Denied::Identity(clash));
        }
        let certificate_expires = now.saturating_add(self.lifetime.as_secs());
        if !self
            .tokens
            .remember_key(csr.public_key.der_bytes(), now, certificate_expires)
        {
            return Err(Denied::Token(Refusal::KeyReused));
        }
        let pem = self
            .ca
            .issue_edge_for_key(csr.public_key, &identity.node, &identity.ips, self.lifetime)
            .map_err(|_| Denied::BadRequest("issue_failed"))?;
        let facts = certificate_facts_pem(&pem).ok_or(Denied::BadRequest("issue_failed"))?;
        // Renewal keeps the identity: same name and IPs, the new certificate is current.
        let issued = issued_identity(&identity.ips, facts, "", "");
        let recorded = self.identities.update(&mut |registry| {
            registry.record_renewal(&identity.node, &presented, issued.clone());
            true
        });
        if let Err(error) = recorded {
            warn!(%error, "could not persist the identity registry");
        }
        let credentials = self.credentials(pem, None);
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
        match self.try_join(&request) {
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
                let locked =
                    !matches!(denied, Denied::Throttled(_)) && self.limits.failed(source, now);
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
                Err(refused())
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
        match self.try_renew(&peer, request.get_ref()) {
            Ok((node, ips, credentials)) => {
                self.metrics.issued("renew");
                info!(target: "audit", event = "node_renewed", %node, ips = ?JsonList(&ips), peer = %peer.addr, "node certificate renewed");
                Ok(Response::new(credentials))
            }
            Err(denied) => {
                if self.limits.failed(source, now) {
                    self.metrics.lockouts.inc();
                }
                self.metrics.refused("renew", denied.label());
                warn!(target: "audit", event = "renew_refused", peer = %peer.addr, reason = denied.label(), detail = denied.detail(), "renewal refused");
                Err(refused())
            }
        }
    }
}
