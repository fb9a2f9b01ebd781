//! Registered-cluster mode: the cloud reaches an IDC cluster's own kube-apiserver through an
//! edge, with nothing opened on the edge but deploy/examples/registered-cluster.toml's
//! `[[allow.extra]]` rule. A real TLS server stands in for that apiserver on one of this
//! machine's non-loopback addresses (the server's policy never dials loopback), with a
//! certificate from the IDC cluster's own CA; the client verifies it end to end through the
//! CONNECT, so the tunnel demonstrably never terminates it. The Dockerfile's paths are
//! checked here too: it cannot be built on these machines.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tether_tests::server::{ServerOptions, ServerProc};
use tether_tests::{within, EdgeOptions, EdgeProc, EdgeTuning, Pki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_server::pki::{self, Ca};

const NODE: &str = "idc-master-1";
/// The name kube-apiserver's serving certificate always holds (kubeadm adds it).
const APISERVER_NAME: &str = "kubernetes.default.svc";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// This machine's address on its default route (no packet is sent: a UDP socket only picks
/// its source address on connect). `None` on a machine without one.
fn local_non_loopback_ip() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A TLS server answering one line per connection, standing in for kube-apiserver.
async fn fake_apiserver(ip: IpAddr, cert_pem: &str, key_pem: &str) -> SocketAddr {
    let certs: Vec<CertificateDer<'static>> = tunnel_io::tls::certs_from_pem(cert_pem.as_bytes());
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(tunnel_io::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .expect("bind the apiserver stand-in");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = [0u8; 14];
                if tls.read_exact(&mut request).await.is_ok() && &request == b"GET /version\r\n" {
                    let _ = tls.write_all(b"{\"gitVersion\":\"v1.28.0\"}").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn cloud_reaches_the_idc_apiserver_through_allow_extra_with_end_to_end_tls() {
    let Some(ip) = local_non_loopback_ip() else {
        eprintln!("skipped: this machine has no non-loopback address to serve the stand-in on");
        return;
    };
    let pki = Pki::new();
    let idc_ca = Ca::generate("IDC cluster CA", pki::CA_VALIDITY).expect("IDC CA");
    let serving = idc_ca
        .issue_server(
            &["kubernetes".into(), APISERVER_NAME.into()],
            &[ip],
            pki::SERVER_VALIDITY,
        )
        .expect("apiserver certificate");
    let apiserver = fake_apiserver(ip, &serving.cert_pem, &serving.key_pem).await;
    let port = apiserver.port();

    let server = ServerProc::start(
        &pki,
        &ServerOptions {
            allowed_ports: vec![10250, port],
            ..Default::default()
        },
    )
    .await;
    // The edge: kubelet only, plus the shipped recipe with this machine's address and port.
    let recipe = std::fs::read_to_string(repo().join("deploy/examples/registered-cluster.toml"))
        .expect("recipe");
    assert!(recipe.contains("cidr = \"10.8.0.21/32\"") && recipe.contains("ports = [6443]"));
    let extra = recipe
        .replace("10.8.0.21/32", &format!("{ip}/32"))
        .replace("[6443]", &format!("[{port}]"));
    let files = pki.issue_edge(NODE, &[ip]);
    let edge = EdgeProc::start_tuned_with_extra(
        &pki,
        &[server.addrs.edge],
        &EdgeOptions {
            files,
            allow_ports: vec![10250],
        },
        &EdgeTuning {
            self_host: None,
            ..Default::default()
        },
        &extra,
    );
    server.wait_for_edge_session(NODE).await;

    let tunnel = tunnel_server::client::connect_tls(
        server.addrs.connect_tcp,
        pki.frontend_client_tls(),
        &format!("{ip}:{port}"),
    )
    .await
    .unwrap_or_else(|e| panic!("CONNECT to the IDC apiserver: {e}\n{}", edge.log()));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(idc_ca.cert_der().clone()).expect("IDC CA");
    let client = rustls::ClientConfig::builder_with_provider(tunnel_io::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = tunnel_io::tls::server_name(APISERVER_NAME).expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tunnel)
        .await
        .expect("the apiserver's own certificate verifies through the tunnel");
    tls.write_all(b"GET /version\r\n").await.expect("request");
    let mut answer = String::new();
    within(
        "the apiserver's answer",
        Duration::from_secs(5),
        tls.read_to_string(&mut answer),
    )
    .await
    .expect("read");
    assert_eq!(answer, "{\"gitVersion\":\"v1.28.0\"}");
}

#[test]
fn dockerfile_copies_what_exists_and_runs_a_workspace_binary() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let mut stages = 0;
    let mut copied_binaries = Vec::new();
    let mut user = None;
    let mut entrypoint = None;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().copied() {
            Some("FROM") => stages += 1,
            Some("COPY") if words.get(1).is_some_and(|w| w.starts_with("--from=")) => {
                let source = words[2];
                copied_binaries.push(
                    source
                        .strip_prefix("/src/target/release/")
                        .unwrap_or_else(|| panic!("copies {source}, not a built binary"))
                        .to_owned(),
                );
            }
            Some("COPY") => {
                for source in &words[1..words.len() - 1] {
                    assert!(
                        repo().join(source).exists(),
                        "Dockerfile copies {source}, which is not in the repository"
                    );
                }
            }
            Some("USER") => user = Some(words[1].to_owned()),
            Some("ENTRYPOINT") => entrypoint = Some(line.to_owned()),
            _ => {}
        }
    }
    assert!(stages >= 2, "not a multi-stage build");
    let user = user.expect("no USER: the runtime would run as root");
    assert!(
        !user.starts_with("0") && !user.starts_with("root"),
        "runtime user {user}"
    );
    for binary in ["tunnel-server", "tunnel-edge"] {
        assert!(
            copied_binaries.iter().any(|b| b == binary),
            "{binary} not in the image"
        );
        // Built by this workspace: the test harness finds it beside the tests.
        assert!(tether_tests::binary(binary).is_file());
    }
    let entrypoint = entrypoint.expect("ENTRYPOINT");
    let named = entrypoint
        .split('"')
        .nth(1)
        .and_then(|p| p.rsplit('/').next())
        .expect("ENTRYPOINT [\"/path/binary\"]");
    assert!(
        copied_binaries.iter().any(|b| b == named),
        "ENTRYPOINT runs {named}, which the image does not hold"
    );
    assert!(tether_tests::binary(named).is_file());
}
