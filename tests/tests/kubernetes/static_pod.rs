//! deploy/kubernetes/static-pod: the static pod, the server.toml it reads from the host, the
//! kubeadm patch that gives kube-apiserver its flag and volume, and the egress config, agreeing
//! on the socket and every path; then the container run for real with QUICKSTART's PKI and a
//! CONNECT through the socket the egress config names.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tether_tests::frontend::{admin_get, connect_answer};
use tether_tests::within;
use tunnel_server::config::ServerConfig;

use crate::objects::{ClusterConfiguration, EgressSelectorConfiguration, Object};
use crate::{docs, flag, live, render, server_container};

/// QUICKSTART's section for this shape.
const SECTION: &str = "Static pod: tunnel-server beside kube-apiserver";
/// The shipped files of this shape.
const SERVER_TOML: &str = "deploy/kubernetes/static-pod/server.toml";
const EGRESS: &str = "deploy/kubernetes/static-pod/egress-selector.yaml";
const KUBEADM: &str = "deploy/kubernetes/static-pod/kubeadm-patch.yaml";
/// How long the live checks may take (the server binds within a second here).
const LIVE: Duration = Duration::from_secs(10);

struct Shape {
    pod: Pod,
    container: Container,
    config_text: String,
    config: ServerConfig,
    socket: String,
}

fn shape() -> Shape {
    let objects = render::render("static-pod");
    let pod = objects
        .iter()
        .find_map(|o| match o {
            Object::Pod(p) => Some((**p).clone()),
            _ => None,
        })
        .expect("a Pod");
    let container = server_container(&objects);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config_text = std::fs::read_to_string(root.join(SERVER_TOML)).expect("read server.toml");
    let config = crate::server_config(&config_text, SERVER_TOML);
    let egress: EgressSelectorConfiguration = render::read_file(EGRESS);
    let socket = egress.egress_selections[0]
        .connection
        .transport
        .uds
        .as_ref()
        .expect("a uds transport")
        .uds_name
        .clone();
    Shape {
        pod,
        container,
        config_text,
        config,
        socket,
    }
}

#[test]
fn static_pod_shares_the_socket_directory_with_kube_apiserver() {
    let s = shape();
    let spec = s.pod.spec.as_ref().unwrap();
    assert_eq!(spec.host_network, Some(true));

    // The egress config names the socket tunnel-server creates.
    assert_eq!(
        s.config.connect.unix_socket.as_deref(),
        Some(Path::new(&s.socket)),
        "egress udsName vs connect.unix_socket"
    );

    // kube-apiserver: the flag names the egress config, and one extra volume holds both it
    // and the socket, from the same host directory the pod mounts, writable in both.
    let kubeadm: ClusterConfiguration = render::read_file(KUBEADM);
    assert_eq!(kubeadm.api_version, "kubeadm.k8s.io/v1beta4");
    let flag_value = kubeadm
        .api_server
        .extra_args
        .iter()
        .find(|a| a.name == "egress-selector-config-file")
        .expect("the egress selector flag")
        .value
        .clone();
    let volume = kubeadm
        .api_server
        .extra_volumes
        .iter()
        .find(|v| Path::new(&s.socket).starts_with(&v.mount_path))
        .expect("an apiserver volume holding the socket");
    assert!(Path::new(&flag_value).starts_with(&volume.mount_path));
    assert_eq!(volume.read_only, Some(false));
    assert_eq!(
        volume.host_path, volume.mount_path,
        "same path on host and in pod"
    );
    let mount = s
        .container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&s.socket).starts_with(&m.mount_path))
        .expect("a pod mount holding the socket");
    assert_ne!(mount.read_only, Some(true), "the socket is created there");
    let host = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.host_path.as_ref())
        .expect("a hostPath volume")
        .path
        .clone();
    assert_eq!(
        host, volume.host_path,
        "pod and apiserver share one host directory"
    );
    assert_eq!(mount.mount_path, volume.mount_path);
    // QUICKSTART puts the egress config where the flag points.
    let copies = docs::commands(SECTION, &["cp"]);
    let copied = |from: &str, to: &str| {
        copies
            .iter()
            .any(|c| c.len() == 3 && c[1] == from && c[2] == to)
    };
    assert!(
        copied(EGRESS, &flag_value),
        "QUICKSTART copies {EGRESS} to {flag_value}: {copies:?}"
    );

    // Ports and probes.
    let c = &s.container;
    let port = |name: &str| {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .unwrap_or_else(|| panic!("no port {name}"))
    };
    assert_eq!(port("edge"), i32::from(s.config.edge.listen.port()));
    let registration = s.config.registration.as_ref().expect("[registration]");
    assert_eq!(port("registration"), i32::from(registration.listen.port()));
    let admin = s.config.admin.listen.expect("admin.listen");
    for (probe, path) in [
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(i32::from(admin.port())));
        assert_eq!(get.host.as_deref(), Some(&*admin.ip().to_string()));
    }
    let grace: i64 = flag(c, "--shutdown-grace")
        .trim_end_matches('s')
        .parse()
        .expect("whole seconds");
    assert!(spec.termination_grace_period_seconds.expect("set") > grace);
    // QUICKSTART installs this server.toml where --config points.
    let config = flag(c, "--config");
    assert!(
        copied(SERVER_TOML, &config),
        "QUICKSTART copies {SERVER_TOML} to {config}: {copies:?}"
    );
}

#[tokio::test]
async fn static_pod_container_runs_with_the_documented_pki_and_socket() {
    let s = shape();
    let root = live::PodRoot::new(&s.container);
    std::fs::write(
        root.path(&flag(&s.container, "--config")),
        root.map_config(&s.config_text),
    )
    .expect("write server.toml");
    let init = docs::command(SECTION, &["tunnel-server", "ca", "init"]);
    let dir = init
        .iter()
        .position(|w| w == "--dir")
        .map(|i| init[i + 1].clone())
        .expect("ca init --dir");
    assert_eq!(
        Path::new(&dir),
        s.config.edge.cert.parent().unwrap(),
        "ca init writes where server.toml reads"
    );
    live::ca_init(&init, &root.path(&dir));

    let running = root.run(&s.container).await;
    for path in ["/readyz", "/healthz"] {
        let (status, body) = within("probe", LIVE, admin_get(running.addr("admin"), path))
            .await
            .expect("admin answers");
        assert_eq!(status, 200, "{path}: {body}");
    }
    let mut socket = tokio::net::UnixStream::connect(root.path(&s.socket))
        .await
        .expect("the socket the egress config names");
    let answer = within(
        "CONNECT",
        LIVE,
        connect_answer(&mut socket, "no-such-node:10250"),
    )
    .await
    .expect("an HTTP answer on the socket");
    assert!((400..600).contains(&answer.status), "{}", answer.head);

    let registration = s.config.registration.as_ref().unwrap();
    for endpoint in &registration.tunnel_endpoints {
        let lb = endpoint.rsplit_once(':').unwrap().0;
        live::certificate_valid_for(
            &root.path(&dir).join("ca.pem"),
            &root.path(&dir).join("server.pem"),
            lb,
        )
        .unwrap_or_else(|e| panic!("tunnel endpoint: {e}"));
    }
}
