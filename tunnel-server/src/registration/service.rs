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
use rcgen::{CertificateSigningRequestParams, PublicKeyData, SanType};
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use tunnel_io::registration::pb::registration_server::Registration;
use tunnel_io::registration::pb::{Credentials, JoinRequest, RenewRequest};
use tunnel_io::registration::REFUSED;

use super::config::RegistrationConfig;
use super::limits::{JoinLimits, Throttled};
use super::PeerInfo;
use crate::pki::Ca;
use crate::revocation::RevocationList;
use crate::tokens::{unix_now, BootstrapToken, NodePool, Refusal, TokenStore};

/// Node IPs one certificate may carry.
const MAX_NODE_IPS: usize = 16;

/// Why a request was refused: for the audit log only.
#[derive(Debug, Clone, Copy)]
enum Denied {
    Throttled(Throttled),
    Token(Refusal),
    BadRequest(&'static str),
    NodeRevoked,
}

impl Denied {
    fn label(self) -> &'static str {
        match self {
            Denied::Throttled(t) => t.label(),
            Denied::Token(r) => r.label(),
            Denied::BadRequest(what) => what,
            Denied::NodeRevoked => "node_revoked",
        }
    }
}

/// The registration service of one replica.
pub struct RegistrationApi {
    ca: Ca,
    tokens: TokenStore,
    revocations: Arc<RevocationList>,
    limits: JoinLimits,
    lifetime: Duration,
    endpoints: Vec<String>,
}

impl RegistrationApi {
    /// Load the CA and the token store named by `config`.
    pub fn load(
        config: &RegistrationConfig,
        revocations: Arc<RevocationList>,
    ) -> anyhow::Result<RegistrationApi> {
        Ok(RegistrationApi {
            ca: Ca::load(&config.ca_cert, &config.ca_key)?,
            tokens: TokenStore::open(&config.token_file)?,
            revocations,
            limits: JoinLimits::new(&config.rate),
            lifetime: config.cert_lifetime,
            endpoints: config.tunnel_endpoints.clone(),
        })
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

    fn try_join(
        &self,
        request: &JoinRequest,
    ) -> Result<(NodeName, Vec<IpAddr>, String, Credentials), Denied> {
        let token =
            BootstrapToken::parse(&request.token).map_err(|_| Denied::Token(Refusal::Malformed))?;
        self.limits
            .check_token(&token.id)
            .map_err(Denied::Throttled)?;
        let node =
            NodeName::parse(&request.node_name).map_err(|_| Denied::BadRequest("bad_node_name"))?;
        let ips = parse_node_ips(&request.node_ips)?;
        let csr = parse_csr(&request.csr_der)?;
        check_csr_claims(&csr, &node, &ips)?;
        if let Some(created) = self.tokens.created_unix(&token.id) {
            if self.revocations.join_refused(&node, created) {
                return Err(Denied::NodeRevoked);
            }
        }
        let admission = self
            .tokens
            .admit(&token, &node, &ips, csr.public_key.der_bytes(), unix_now())
            .map_err(Denied::Token)?;
        let pem = self
            .ca
            .issue_edge_for_key(csr.public_key, &node, &ips, self.lifetime)
            .map_err(|_| Denied::BadRequest("issue_failed"))?;
        let credentials = self.credentials(pem, Some(&admission.pool));
        Ok((node, ips, admission.token_id, credentials))
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
        let csr = parse_csr(&request.csr_der)?;
        check_csr_claims(&csr, &identity.node, &identity.ips)?;
        if !self.tokens.remember_key(csr.public_key.der_bytes()) {
            return Err(Denied::Token(Refusal::KeyReused));
        }
        let pem = self
            .ca
            .issue_edge_for_key(csr.public_key, &identity.node, &identity.ips, self.lifetime)
            .map_err(|_| Denied::BadRequest("issue_failed"))?;
        let credentials = self.credentials(pem, None);
        Ok((identity.node, identity.ips, credentials))
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

fn parse_node_ips(texts: &[String]) -> Result<Vec<IpAddr>, Denied> {
    if texts.len() > MAX_NODE_IPS {
        return Err(Denied::BadRequest("too_many_ips"));
    }
    let mut ips = Vec::with_capacity(texts.len());
    for text in texts {
        let ip: IpAddr = text.parse().map_err(|_| Denied::BadRequest("bad_ip"))?;
        let ip = ip.to_canonical();
        // Never addresses that would route the tunnel to the server's own or shared networks.
        let forbidden = ip.is_loopback()
            || ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_link_local() || v4.is_broadcast())
            || matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if forbidden {
            return Err(Denied::BadRequest("forbidden_ip"));
        }
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips.sort();
    Ok(ips)
}

fn parse_csr(der: &[u8]) -> Result<CertificateSigningRequestParams, Denied> {
    if der.is_empty() || der.len() > tunnel_io::registration::MAX_MESSAGE {
        return Err(Denied::BadRequest("bad_csr"));
    }
    // Parses and checks the CSR's self-signature: the caller holds the private key.
    CertificateSigningRequestParams::from_der(&der.to_vec().into())
        .map_err(|_| Denied::BadRequest("bad_csr"))
}

/// The CSR may repeat the identity (CN = node name, DNS SAN = node name, IP SANs among the
/// node IPs) but claim nothing else: a CSR naming another node is an attack, not a typo.
fn check_csr_claims(
    csr: &CertificateSigningRequestParams,
    node: &NodeName,
    ips: &[IpAddr],
) -> Result<(), Denied> {
    let mismatch = Denied::BadRequest("csr_claims_other_identity");
    for (ty, value) in csr.params.distinguished_name.iter() {
        let text = match value {
            rcgen::DnValue::Utf8String(s) => s.clone(),
            rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
            rcgen::DnValue::Ia5String(s) => s.as_str().to_owned(),
            _ => return Err(mismatch),
        };
        if *ty != rcgen::DnType::CommonName || text != node.as_str() {
            return Err(mismatch);
        }
    }
    for san in &csr.params.subject_alt_names {
        let ok = match san {
            SanType::DnsName(name) => name.as_str() == node.as_str(),
            SanType::IpAddress(ip) => ips.contains(&ip.to_canonical()),
            _ => false,
        };
        if !ok {
            return Err(mismatch);
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl Registration for RegistrationApi {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<Credentials>, Status> {
        let peer = peer_of(&request)?;
        let source = peer.addr.ip();
        let now = Instant::now();
        // Throttled sources are refused before anything is parsed or hashed.
        if let Err(throttled) = self.limits.check_source(source, now) {
            warn!(target: "audit", event = "join_refused", peer = %peer.addr, reason = throttled.label(), "join refused");
            return Err(match self.limits.lockout_remaining(source, now) {
                Some(remaining) if throttled == Throttled::LockedOut => locked_out(remaining),
                _ => refused(),
            });
        }
        let request = request.into_inner();
        match self.try_join(&request) {
            Ok((node, ips, token_id, credentials)) => {
                self.limits.succeeded(source);
                info!(target: "audit", event = "node_joined", %node, ?ips, token = %token_id, pool = %credentials.pool, peer = %peer.addr, "node joined");
                Ok(Response::new(credentials))
            }
            Err(denied) => {
                let locked =
                    !matches!(denied, Denied::Throttled(_)) && self.limits.failed(source, now);
                // The node name is the caller's claim; the token appears only by its public ID.
                let token_id = request
                    .token
                    .split_once('.')
                    .map(|(id, _)| id)
                    .filter(|id| id.len() <= 6 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
                    .unwrap_or("?");
                warn!(target: "audit", event = "join_refused", peer = %peer.addr, node = %request.node_name.escape_default(), token = token_id, reason = denied.label(), locked_out = locked, "join refused");
                Err(refused())
            }
        }
    }

    async fn renew(&self, request: Request<RenewRequest>) -> Result<Response<Credentials>, Status> {
        let peer = peer_of(&request)?;
        let source = peer.addr.ip();
        let now = Instant::now();
        if let Err(throttled) = self.limits.check_source(source, now) {
            warn!(target: "audit", event = "renew_refused", peer = %peer.addr, reason = throttled.label(), "renewal refused");
            return Err(refused());
        }
        match self.try_renew(&peer, request.get_ref()) {
            Ok((node, ips, credentials)) => {
                info!(target: "audit", event = "node_renewed", %node, ?ips, peer = %peer.addr, "node certificate renewed");
                Ok(Response::new(credentials))
            }
            Err(denied) => {
                self.limits.failed(source, now);
                warn!(target: "audit", event = "renew_refused", peer = %peer.addr, reason = denied.label(), "renewal refused");
                Err(refused())
            }
        }
    }
}
