//! deploy/kubernetes/in-cluster: the Deployment, its Services, the ConfigMap's server.toml,
//! the Secret QUICKSTART makes and the mTLS egress config kube-apiserver uses, agreeing on
//! every port, path and name; then the container run for real with that PKI, reached under
//! the name the egress config dials.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tether_tests::frontend::{admin_get, connect_answer};
use tether_tests::within;
use tunnel_server::config::ServerConfig;

use crate::objects::{EgressSelectorConfiguration, Object};
use crate::{docs, flag, live, render, server_container, NAMESPACE};

/// QUICKSTART's section for this shape.
const SECTION: &str = "In-cluster: a Deployment behind a load balancer";
/// How long the live checks may take (the server binds within a second here).
const LIVE: Duration = Duration::from_secs(10);
/// How QUICKSTART's Secret line starts.
const SECRET_LINE: &[&str] = &[
    "kubectl",
    "-n",
    "kube-system",
    "create",
    "secret",
    "generic",
];

struct Rendered {
    objects: Vec<Object>,
    deployment: Deployment,
    container: Container,
    config_text: String,
    config: ServerConfig,
    egress: EgressSelectorConfiguration,
}

fn rendered() -> Rendered {
    let objects = render::render("in-cluster");
    let deployment = objects
        .iter()
        .find_map(|o| match o {
            Object::Deployment(d) => Some((**d).clone()),
            _ => None,
        })
        .expect("a Deployment");
    let container = server_container(&objects);
    // The config file is the ConfigMap volume mounted where --config points.
    let config_path = flag(&container, "--config");
    let (dir, file) = config_path.rsplit_once('/').expect("absolute --config");
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mount's volume");
    let map_name = &volume.config_map.as_ref().expect("a ConfigMap volume").name;
    let config_text = objects
        .iter()
        .find_map(|o| match o {
            Object::ConfigMap(c) if &c.metadata.name.clone().unwrap_or_default() == map_name => {
                c.data.as_ref().and_then(|d| d.get(file)).cloned()
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("ConfigMap {map_name} has no key {file}"));
    let config = crate::server_config(&config_text, "server.toml");
    let egress = render::read_file("deploy/kubernetes/in-cluster/egress-selector.yaml");
    Rendered {
        objects,
        deployment,
        container,
        config_text,
        config,
        egress,
    }
}

pub(crate) fn service<'a>(objects: &'a [Object], name: &str) -> &'a Service {
    objects
        .iter()
        .find_map(|o| match o {
            Object::Service(s) if s.metadata.name.as_deref() == Some(name) => Some(&**s),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Service {name}"))
}

/// The container port named `name`, and its protocol (Kubernetes' default: TCP).
fn container_port_on(container: &Container, name: &str) -> (u16, String) {
    let found = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no containerPort named {name}"));
    let protocol = found.protocol.clone().unwrap_or_else(|| "TCP".into());
    (
        u16::try_from(found.container_port).expect("port in range"),
        protocol,
    )
}

fn container_port(container: &Container, name: &str) -> u16 {
    let (port, protocol) = container_port_on(container, name);
    assert_eq!(protocol, "TCP", "containerPort {name}");
    port
}

/// The Service's TCP port `port`, checked to lead to the container port named `target`.
pub(crate) fn service_port(service: &Service, port: u16, target: &str) {
    service_port_on(service, "TCP", port, target);
}

/// The Service's `protocol` port `port`, checked to lead to the container port named `target`.
fn service_port_on(service: &Service, protocol: &str, port: u16, target: &str) {
    let spec = service.spec.as_ref().expect("spec");
    let found = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == i32::from(port) && p.protocol.as_deref().unwrap_or("TCP") == protocol)
        .unwrap_or_else(|| panic!("{:?} has no {protocol} port {port}", service.metadata.name));
    assert_eq!(
        found.target_port,
        Some(IntOrString::String(target.into())),
        "{:?} port {port}",
        service.metadata.name
    );
}

/// The egress config's `https://HOST:PORT`.
fn egress_url(egress: &EgressSelectorConfiguration) -> (String, u16) {
    let tcp = egress.egress_selections[0]
        .connection
        .transport
        .tcp
        .as_ref()
        .expect("a tcp transport");
    let rest = tcp.url.strip_prefix("https://").expect("an https URL");
    let (host, port) = rest.rsplit_once(':').expect("HOST:PORT");
    (host.to_owned(), port.parse().expect("a port"))
}

#[test]
fn in_cluster_ports_names_and_paths_agree() {
    let r = rendered();
    let c = &r.container;
    let registration = r.config.registration.as_ref().expect("[registration]");
    let admin = r.config.admin.listen.expect("[admin] listen");
    assert_eq!(container_port(c, "edge"), r.config.edge.listen.port());
    assert_eq!(
        container_port(c, "registration"),
        registration.listen.port()
    );
    let frontend = r.config.connect.tcp_listen.expect("connect.tcp_listen");
    assert_eq!(container_port(c, "frontend"), frontend.port());
    assert_eq!(container_port(c, "admin"), admin.port());
    assert!(admin.ip().is_unspecified(), "probes need the pod address");
    // QUIC sessions: on by default, on UDP at the edge port unless `quic_listen` says otherwise.
    assert!(r.config.edge.quic, "[edge] quic");
    let quic = r.config.edge.quic_listen.unwrap_or(r.config.edge.listen);
    assert_eq!(
        container_port_on(c, "edge-quic"),
        (quic.port(), "UDP".to_owned())
    );

    // Edges: the load balancer's 443 (join) and 9000 (sessions), with the annotations slot.
    let lb = service(&r.objects, "tether-edge");
    assert_eq!(
        lb.spec.as_ref().unwrap().type_.as_deref(),
        Some("LoadBalancer")
    );
    // The annotations slot is an empty map in the source (rendering drops it) for the operator
    // to fill.
    let source = std::fs::read_to_string(render::kubernetes_dir().join("in-cluster/services.yaml"))
        .expect("read services.yaml");
    let slot = render::documents(&source)
        .into_iter()
        .find(|d| d["metadata"]["name"] == "tether-edge")
        .expect("tether-edge in services.yaml");
    assert!(
        slot["metadata"]["annotations"].is_object(),
        "tether-edge has no annotations slot"
    );
    service_port(lb, 443, "registration");
    service_port(lb, 9000, "edge");
    service_port_on(lb, "UDP", 9000, "edge-quic");

    // kube-apiserver: the egress URL is the tether-server Service by its DNS name.
    let (host, port) = egress_url(&r.egress);
    let svc = service(&r.objects, "tether-server");
    assert_eq!(host, format!("tether-server.{NAMESPACE}.svc"));
    service_port(svc, port, "frontend");

    // Replicas count each other through the headless Service.
    let headless = service(&r.objects, "tether-headless");
    assert_eq!(
        headless.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("None")
    );
    service_port(headless, r.config.edge.listen.port(), "edge");
    assert_eq!(
        r.config.replica.dns.as_deref(),
        Some(&*format!(
            "tether-headless.{NAMESPACE}.svc.cluster.local:{}",
            r.config.edge.listen.port()
        ))
    );

    // Every Service and the budget select the Deployment's pods.
    let spec = r.deployment.spec.as_ref().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let selects = |selector: &std::collections::BTreeMap<String, String>| {
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    for name in ["tether-edge", "tether-server", "tether-headless"] {
        let selector = service(&r.objects, name)
            .spec
            .as_ref()
            .unwrap()
            .selector
            .clone();
        assert!(
            selects(&selector.unwrap_or_default()),
            "{name} selects no pod"
        );
    }
    let pdb = r
        .objects
        .iter()
        .find_map(|o| match o {
            Object::PodDisruptionBudget(p) => Some(p.clone()),
            _ => None,
        })
        .expect("a PodDisruptionBudget");
    let selector = pdb.spec.unwrap().selector.unwrap().match_labels.unwrap();
    assert!(selects(&selector), "the budget selects no pod");

    // Rollouts: never below `replicas`, probes on the admin port, grace above the drain's.
    let rolling = spec
        .strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    let pod = spec.template.spec.as_ref().unwrap();
    assert!(pod.affinity.as_ref().unwrap().pod_anti_affinity.is_some());
    for (probe, path) in [
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("admin".into()));
    }
    let grace = humantime_grace(&flag(c, "--shutdown-grace"));
    let termination = pod.termination_grace_period_seconds.expect("set");
    assert!(
        termination > grace,
        "terminationGracePeriodSeconds {termination} must exceed --shutdown-grace {grace}s"
    );
    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert!(requests.contains_key("memory") && requests.contains_key("cpu"));

    // The Secret is the one QUICKSTART creates, in the same namespace.
    let secret_line = docs::command(SECTION, SECRET_LINE);
    let (secret, namespace, _) = docs::secret_files(&secret_line);
    assert_eq!(namespace, NAMESPACE);
    assert!(
        pod.volumes.iter().flatten().any(|v| v
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref())
            == Some(&*secret)),
        "no volume of Secret {secret}"
    );
}

/// Whole seconds of a `--shutdown-grace` value such as `30s`.
fn humantime_grace(value: &str) -> i64 {
    value
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("--shutdown-grace {value:?}: expected whole seconds"))
}

#[tokio::test]
async fn in_cluster_container_runs_with_the_documented_pki_and_names() {
    let r = rendered();
    let root = live::PodRoot::new(&r.container);
    let config_path = flag(&r.container, "--config");
    std::fs::write(root.path(&config_path), root.map_config(&r.config_text))
        .expect("write server.toml");

    // QUICKSTART's `ca init`, then only the files its `kubectl create secret` line takes.
    let scratch = tempfile::tempdir().expect("scratch directory");
    let pki = scratch.path().join("pki");
    let printed = live::ca_init(
        &docs::command(SECTION, &["tunnel-server", "ca", "init"]),
        &pki,
    );
    let (_, _, files) = docs::secret_files(&docs::command(SECTION, SECRET_LINE));
    let secret_mount = Path::new(&r.config.edge.cert)
        .parent()
        .unwrap()
        .display()
        .to_string();
    assert_eq!(root.mount_of(&secret_mount).mount_path, secret_mount);
    for file in &files {
        std::fs::copy(pki.join(file), root.path(&secret_mount).join(file)).expect("copy");
    }

    let running = root.run(&r.container).await;
    for (probe, path) in [
        (&r.container.readiness_probe, "/readyz"),
        (&r.container.liveness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        let (status, body) = within("probe", LIVE, admin_get(running.addr("admin"), path))
            .await
            .expect("admin answers");
        assert_eq!(status, 200, "{path}: {body}");
    }

    // kube-apiserver's side: the egress config's files are `ca init`'s, and its URL's name is
    // in the server certificate.
    let (host, _) = egress_url(&r.egress);
    let names = printed
        .lines()
        .find(|l| l.starts_with("server certificate:"))
        .unwrap_or_else(|| panic!("ca init names no server certificate:\n{printed}"));
    assert!(names.contains(&host), "ca init printed {names}");
    let tls = r.egress.egress_selections[0]
        .connection
        .transport
        .tcp
        .as_ref()
        .unwrap()
        .tls_config
        .as_ref()
        .expect("tlsConfig");
    let local = |p: &str| pki.join(Path::new(p).file_name().unwrap());
    let client = tunnel_io::tls::client_config_mtls(
        &local(&tls.ca_bundle),
        &local(&tls.client_cert),
        &local(&tls.client_key),
        &[],
    )
    .expect("the egress config's client files");
    let tcp = tokio::net::TcpStream::connect(running.addr("connect_tcp"))
        .await
        .expect("connect");
    let name = tunnel_io::tls::server_name(&host).expect("a server name");
    let mut stream = within(
        "TLS to the frontend",
        LIVE,
        tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp),
    )
    .await
    .unwrap_or_else(|e| panic!("TLS as {host}: {e}"));
    let answer = within(
        "CONNECT",
        LIVE,
        connect_answer(&mut stream, "no-such-node:10250"),
    )
    .await
    .expect("an HTTP answer through mTLS");
    assert!(
        (400..600).contains(&answer.status),
        "CONNECT to an unknown node: {}",
        answer.head
    );

    // The edges' side: the name they are told to dial is in the certificate too.
    let registration = r.config.registration.as_ref().unwrap();
    for endpoint in &registration.tunnel_endpoints {
        let lb = endpoint.rsplit_once(':').unwrap().0;
        live::certificate_valid_for(&pki.join("ca.pem"), &pki.join("server.pem"), lb)
            .unwrap_or_else(|e| panic!("tunnel endpoint: {e}"));
    }
}
