//! Joining and renewing: the node's side of the registration API. `join` generates a key on
//! the node (it never leaves), sends a CSR with the bootstrap token, and writes what comes back
//! into the state directory; `renew` does the same authenticated by the current certificate.
//! The state directory ([`crate::state`]) is what `tunnel-edge run --state-dir` reads.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tunnel_io::registration::pb::registration_client::RegistrationClient;
use tunnel_io::registration::pb::{Credentials, JoinRequest, RenewRequest};
use tunnel_io::registration::ALPN_REGISTRATION;
use tunnel_io::secret::Secret;

use crate::proxy::Egress;
use crate::state::write_state;
pub use pinned::JoinTrust;
use pinned::{bundle_with_pinned, join_tls_config};

mod pinned;
pub use crate::state::{NodeState, StateDir};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tether";
/// The registration API's default port (the load balancer's HTTPS port).
pub const DEFAULT_REGISTRATION_PORT: u16 = 443;
/// Deadline of one registration call, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// What `tunnel-edge join` was asked.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Registration API, `https://host[:port]` or `host[:port]`.
    pub server: String,
    /// Name to verify in its certificate (default: the host).
    pub server_name: Option<String>,
    /// How to trust it: a CA bundle, or a pin of the CA it presents.
    pub trust: JoinTrust,
    /// The bootstrap token.
    pub token: Secret,
    /// This node's name.
    pub node_name: String,
    /// This node's IPs.
    pub node_ips: Vec<IpAddr>,
    /// Where to write the results.
    pub state: StateDir,
    /// Join again even if the state directory already holds a valid identity.
    pub force: bool,
    /// How the registration API is reached (directly or through the egress proxy).
    pub egress: Egress,
}

/// Result of a join.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// New credentials written.
    Joined,
    /// The state directory already holds a valid certificate for this identity.
    AlreadyJoined,
}

/// Split `https://host[:port]` or `host[:port]` (port 443 by default).
pub fn parse_registration_server(server: &str) -> anyhow::Result<(String, u16)> {
    let rest = server
        .strip_prefix("https://")
        .unwrap_or(server)
        .trim_end_matches('/');
    anyhow::ensure!(
        !rest.contains("://"),
        "--server {server:?}: only https:// is supported"
    );
    let with_port = if rest.starts_with('[') && !rest.contains("]:")
        || !rest.starts_with('[') && !rest.contains(':')
    {
        format!("{rest}:{DEFAULT_REGISTRATION_PORT}")
    } else {
        rest.to_owned()
    };
    crate::config::split_host_port(&with_port).map_err(anyhow::Error::msg)
}

/// A fresh ECDSA P-256 key and a CSR naming `node` and `ips` (the server ignores nothing but
/// also trusts nothing in it: it refuses a CSR that names anyone else).
fn key_and_csr(node: &str, ips: &[IpAddr]) -> anyhow::Result<(rcgen::KeyPair, Vec<u8>)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![node.to_owned()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node);
    for ip in ips {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(*ip));
    }
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// A gRPC client of the registration API over our own TLS (TLS 1.3, ALPN h2), optionally
/// presenting a client certificate.
async fn client(
    host: &str,
    port: u16,
    server_name: &str,
    tls: rustls::ClientConfig,
    egress: &Egress,
) -> anyhow::Result<RegistrationClient<tonic::transport::Channel>> {
    let name: ServerName<'static> =
        tunnel_io::tls::server_name(server_name).map_err(anyhow::Error::msg)?;
    let connector = TlsConnector::from(Arc::new(tls));
    let (host_owned, egress) = (host.to_owned(), egress.clone());
    let connect = tower::service_fn(move |_: http::Uri| {
        let (connector, name, host, egress) = (
            connector.clone(),
            name.clone(),
            host_owned.clone(),
            egress.clone(),
        );
        async move {
            let tcp = egress
                .dial(&host, port)
                .await
                .map_err(std::io::Error::other)?;
            tunnel_io::set_nodelay(&tcp);
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // The URI only names the authority for HTTP/2; the connector above does the dialing.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{server_name}:{port}"))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(connect)
        .await
        .with_context(|| format!("connect to the registration API at {host}:{port}"))?;
    Ok(RegistrationClient::new(channel)
        .max_decoding_message_size(tunnel_io::registration::MAX_MESSAGE))
}

pub(crate) fn tls_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut config = match identity {
        Some((cert, key)) => tunnel_io::tls::client_config_mtls(ca, cert, key, &[])?,
        None => rustls::ClientConfig::builder_with_provider(tunnel_io::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(tunnel_io::tls::load_roots(ca)?)
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_REGISTRATION.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Whether the state directory holds a currently valid certificate for exactly this identity.
fn already_joined(state: &StateDir, node: &str, ips: &[IpAddr]) -> bool {
    let Ok(s) = state.load() else {
        return false;
    };
    let mut want = ips.to_vec();
    want.sort();
    let mut have = s.node_ips.clone();
    have.sort();
    if s.node_name != node || have != want || !state.key().is_file() {
        return false;
    }
    match certificate_window(&state.cert()) {
        Ok((_, not_after)) => unix_now() < not_after,
        Err(_) => false,
    }
}

/// Join (or confirm an existing join). Errors say only what the node can know: a refused
/// join is "registration refused", whatever the server's reason was.
pub async fn join(options: &JoinOptions) -> anyhow::Result<Joined> {
    protocol::NodeName::parse(&options.node_name)
        .map_err(|e| anyhow::anyhow!("--node-name {:?}: {e}", options.node_name))?;
    crate::token::check_token_format(options.token.expose()).map_err(anyhow::Error::msg)?;
    if !options.force && already_joined(&options.state, &options.node_name, &options.node_ips) {
        return Ok(Joined::AlreadyJoined);
    }
    let (host, port) = parse_registration_server(&options.server)?;
    let server_name = options.server_name.clone().unwrap_or_else(|| host.clone());
    let (key, csr_der) = key_and_csr(&options.node_name, &options.node_ips)?;
    let (tls, pin_slot) = join_tls_config(&options.trust)?;
    let pin_failure = || {
        let slot = pin_slot.as_ref()?.lock().ok()?;
        match slot.as_ref()? {
            Err(message) => Some(anyhow::anyhow!(
                "registration API at {host}:{port}: {message}"
            )),
            Ok(_) => None,
        }
    };
    let mut client = match client(&host, port, &server_name, tls, &options.egress).await {
        Ok(client) => client,
        Err(error) => return Err(pin_failure().unwrap_or(error)),
    };
    let request = JoinRequest {
        token: options.token.expose().to_owned(),
        node_name: options.node_name.clone(),
        node_ips: options.node_ips.iter().map(IpAddr::to_string).collect(),
        csr_der,
    };
    let mut credentials = match client.join(request).await {
        Ok(answer) => answer.into_inner(),
        Err(status) => {
            return Err(pin_failure()
                .unwrap_or_else(|| anyhow::anyhow!("join refused: {}", status.message())))
        }
    };
    let pinned = pin_slot
        .as_ref()
        .and_then(|slot| slot.lock().ok()?.clone()?.ok());
    if let Some(ca) = pinned {
        credentials.ca_bundle_pem = bundle_with_pinned(&credentials.ca_bundle_pem, &ca);
    }
    let state = NodeState {
        node_name: options.node_name.clone(),
        node_ips: options.node_ips.clone(),
        pool: credentials.pool.clone(),
        labels: credentials.labels.clone().into_iter().collect(),
        taints: credentials.taints.clone(),
        extra_ports: credentials
            .extra_ports
            .iter()
            .filter_map(|p| u16::try_from(*p).ok().filter(|p| *p != 0))
            .collect(),
        tunnel_endpoints: credentials.tunnel_endpoints.clone(),
        registration_server: format!("{host}:{port}"),
        server_name,
    };
    write_state(&options.state, &key, &credentials, Some(&state))?;
    Ok(Joined::Joined)
}

/// One raw `Join` call (tests and tools): `server` is `host:port`, `ca` verifies it.
pub async fn call_join(
    server: &str,
    server_name: &str,
    ca: &Path,
    request: JoinRequest,
) -> anyhow::Result<Result<Credentials, tonic::Status>> {
    let (host, port) = parse_registration_server(server)?;
    let mut client = client(
        &host,
        port,
        server_name,
        tls_config(ca, None)?,
        &Egress::direct(),
    )
    .await?;
    Ok(client.join(request).await.map(tonic::Response::into_inner))
}

/// One raw `Renew` call presenting `cert`/`key` (tests and tools).
pub async fn call_renew(
    server: &str,
    server_name: &str,
    ca: &Path,
    identity: (&Path, &Path),
    request: RenewRequest,
) -> anyhow::Result<Result<Credentials, tonic::Status>> {
    let (host, port) = parse_registration_server(server)?;
    let mut client = client(
        &host,
        port,
        server_name,
        tls_config(ca, Some(identity))?,
        &Egress::direct(),
    )
    .await?;
    Ok(client.renew(request).await.map(tonic::Response::into_inner))
}

/// A fresh key and a CSR for `node` and `ips`, DER (tests and tools).
pub fn new_csr(node: &str, ips: &[IpAddr]) -> anyhow::Result<(rcgen::KeyPair, Vec<u8>)> {
    key_and_csr(node, ips)
}

/// Renew with the current certificate, reaching the registration API through `egress`;
/// writes the new key and certificate in place.
pub async fn renew(state_dir: &StateDir, egress: &Egress) -> anyhow::Result<()> {
    let state = state_dir.load()?;
    let (host, port) =
        crate::config::split_host_port(&state.registration_server).map_err(anyhow::Error::msg)?;
    let tls = tls_config(&state_dir.ca(), Some((&state_dir.cert(), &state_dir.key())))?;
    let (key, csr_der) = key_and_csr(&state.node_name, &state.node_ips)?;
    let mut client = client(&host, port, &state.server_name, tls, egress).await?;
    let credentials = client
        .renew(RenewRequest { csr_der })
        .await
        .map_err(|status| anyhow::anyhow!("renewal refused: {}", status.message()))?
        .into_inner();
    write_state(state_dir, &key, &credentials, None)
}

/// Fill `config` from a state directory: CA, certificate and key (where not set) and the
/// server address (first advertised endpoint, where not set). Never the allowlist: the pool's
/// extra ports come from the cloud, and what a node exposes is its owner's decision, so they
/// are dialed only if the edge's own `[allow] ports` lists them
/// ([`cloud_ports_not_allowed`] names the others, for the log).
pub fn apply_state(config: &mut crate::EdgeConfig, state: &StateDir) -> anyhow::Result<()> {
    let node = state.load()?;
    let s = &mut config.server;
    s.ca.get_or_insert_with(|| state.ca());
    s.cert.get_or_insert_with(|| state.cert());
    s.key.get_or_insert_with(|| state.key());
    if s.address.is_none() && s.addresses.is_empty() {
        s.address = node.tunnel_endpoints.first().cloned();
    }
    if s.server_name.is_none() {
        s.server_name = Some(node.server_name.clone());
    }
    Ok(())
}

/// The pool's extra ports (sent by the cloud at join) that `allow_ports`, the edge's own
/// allowlist, does not list: they stay closed. Empty when the state cannot be read.
pub fn cloud_ports_not_allowed(allow_ports: &[u16], state: &StateDir) -> Vec<u16> {
    state
        .load()
        .map(|node| {
            node.extra_ports
                .into_iter()
                .filter(|p| !allow_ports.contains(p))
                .collect()
        })
        .unwrap_or_default()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `(issued, not_after)` of the first certificate in a PEM file, Unix seconds. `issued` is
/// `notBefore` plus the server's 5-minute backdating (see tunnel-server's pki).
pub fn certificate_window(path: &Path) -> anyhow::Result<(i64, i64)> {
    let certs = tunnel_io::tls::load_certs(path)?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs[0].as_ref())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let validity = cert.validity();
    Ok((
        validity.not_before.timestamp() + 300,
        validity.not_after.timestamp(),
    ))
}

/// When to renew a certificate valid over `(issued, not_after)`: at two thirds of its lifetime,
/// moved by up to ±`jitter` (a fraction of the lifetime) so a fleet joined together does not
/// renew together.
pub fn renewal_due(issued: i64, not_after: i64, jitter: f64, unit: f64) -> i64 {
    let lifetime = (not_after - issued).max(1) as f64;
    let offset = lifetime * (2.0 / 3.0 + jitter * (2.0 * unit - 1.0));
    issued + offset.round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn registration_server_forms() {
        assert_eq!(
            parse_registration_server("https://lb.example").unwrap(),
            ("lb.example".into(), 443)
        );
        assert_eq!(
            parse_registration_server("https://lb.example:8443/").unwrap(),
            ("lb.example".into(), 8443)
        );
        assert_eq!(
            parse_registration_server("127.0.0.1:9443").unwrap(),
            ("127.0.0.1".into(), 9443)
        );
        assert_eq!(
            parse_registration_server("https://[::1]").unwrap(),
            ("::1".into(), 443)
        );
        assert!(parse_registration_server("http://lb").is_err());
    }

    #[test]
    fn renewal_at_two_thirds_with_bounded_jitter() {
        assert_eq!(renewal_due(0, 300, 0.0, 0.5), 200);
        assert_eq!(renewal_due(0, 300, 0.1, 0.0), 170);
        assert_eq!(renewal_due(0, 300, 0.1, 1.0), 230);
    }

    #[test]
    fn ports_sent_by_the_cloud_never_widen_the_edge_allowlist() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let node = NodeState {
            node_name: "node-a".into(),
            node_ips: vec![],
            pool: "idc".into(),
            labels: BTreeMap::new(),
            taints: vec![],
            extra_ports: vec![10255, 22],
            tunnel_endpoints: vec!["127.0.0.1:9000".into()],
            registration_server: "127.0.0.1:443".into(),
            server_name: "127.0.0.1".into(),
        };
        std::fs::write(state.node(), serde_json::to_vec(&node).unwrap()).unwrap();
        let mut config = crate::EdgeConfig::default();
        let before = config.allow.ports.clone();
        apply_state(&mut config, &state).unwrap();
        assert_eq!(config.allow.ports, before);
        assert_eq!(cloud_ports_not_allowed(&before, &state), vec![10255, 22]);
        // The node's owner lists one: only the other is reported.
        assert_eq!(cloud_ports_not_allowed(&[10250, 10255], &state), vec![22]);
    }

    #[test]
    fn csr_names_only_this_node() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let (_, der) = key_and_csr("node-a", &[ip]).unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_der(&der.into()).unwrap();
        assert_eq!(csr.params.subject_alt_names.len(), 2);
    }
}
