//! The Kubernetes manifests under deploy/kubernetes, checked as the cluster and the binaries
//! would see them: every base and component rendered by the machine's `kubectl kustomize`,
//! every object read into the typed API structs refusing unknown fields, every flag in the
//! real binary's `--help`, every config through the real server with the PKI that
//! docs/QUICKSTART.md makes, every port, path and name matched across objects and files.

#[path = "docs.rs"]
mod docs;
#[path = "in_cluster.rs"]
mod in_cluster;
#[path = "live.rs"]
mod live;
#[path = "objects.rs"]
mod objects;
#[path = "render.rs"]
mod render;
#[path = "servicemonitor.rs"]
mod servicemonitor;
#[path = "static_pod.rs"]
mod static_pod;

use std::collections::BTreeSet;
use std::process::Command;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use objects::{EgressSelectorConfiguration, Object};

/// Every Kustomize root shipped: the two bases and the overlay that adds the component.
const ROOTS: [&str; 3] = ["static-pod", "in-cluster", "overlays/monitored"];
/// Where both shapes run: the namespace the egress config's service name and the
/// system-cluster-critical priority class (allowed there by default) assume.
const NAMESPACE: &str = "kube-system";

/// The pod specs of a rendered root (Pods and Deployment templates).
fn pod_specs(objects: &[Object]) -> Vec<&PodSpec> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::Pod(p) => p.spec.as_ref(),
            Object::Deployment(d) => d.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
            _ => None,
        })
        .collect()
}

/// The tunnel-server container of a rendered root.
fn server_container(objects: &[Object]) -> Container {
    let specs = pod_specs(objects);
    assert_eq!(specs.len(), 1, "expected one pod spec");
    let container = specs[0]
        .containers
        .iter()
        .find(|c| c.name == "tunnel-server")
        .expect("a tunnel-server container");
    container.clone()
}

/// The value of `--flag=value` in a container's command.
fn flag(container: &Container, name: &str) -> String {
    container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{} has no {name}=VALUE", container.name))
        .to_owned()
}

/// A server.toml read with the server's own types but without its file checks: the files it
/// names exist only in the pod. The live tests run the binary, which checks everything.
fn server_config(text: &str, origin: &str) -> tunnel_server::config::ServerConfig {
    toml::from_str(text).unwrap_or_else(|e| panic!("{origin}: {e}"))
}

#[test]
fn every_base_and_component_renders_into_typed_objects() {
    let mut kinds = BTreeSet::new();
    for root in ROOTS {
        for object in render::render(root) {
            kinds.insert(object.kind());
            let meta = object.metadata();
            assert_eq!(
                meta.namespace.as_deref(),
                Some(NAMESPACE),
                "{root}: {:?} is not in {NAMESPACE}",
                meta.name
            );
        }
    }
    let expected = [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "Pod",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
    ];
    assert_eq!(kinds, expected.into(), "kinds rendered");
}

#[test]
fn a_misspelt_field_is_refused() {
    let yaml = render::kustomize(&render::kubernetes_dir().join("overlays/monitored"));
    let docs = render::documents(&yaml);
    let mut checked = 0;
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let mut bad = doc.clone();
        match kind.as_str() {
            "Deployment" => {
                bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
                    ["paht"] = "/readyz".into()
            }
            "Service" => bad["spec"]["ports"][0]["tragetPort"] = 9000.into(),
            "ServiceMonitor" => bad["spec"]["endpoints"][0]["intreval"] = "30s".into(),
            _ => continue,
        }
        let error = Object::from_value(&bad).expect_err("a misspelt field must be refused");
        assert!(
            ["paht", "tragetPort", "intreval"]
                .iter()
                .any(|f| error.contains(f)),
            "{error}"
        );
        Object::from_value(&doc).expect("the shipped object itself is accepted");
        checked += 1;
    }
    assert!(checked >= 3, "checked {checked} objects");
}

#[test]
fn every_flag_in_a_command_is_in_the_binarys_help() {
    for root in ["static-pod", "in-cluster"] {
        let objects = render::render(root);
        let container = server_container(&objects);
        let words: Vec<String> = container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten())
            .cloned()
            .collect();
        assert_eq!(words[0], "tunnel-server", "{root}: {words:?}");
        let subcommand = &words[1];
        let help = Command::new(tether_tests::binary("tunnel-server"))
            .args([subcommand.as_str(), "--help"])
            .output()
            .expect("run --help");
        assert!(
            help.status.success(),
            "{root}: `{subcommand} --help` failed"
        );
        let help = String::from_utf8_lossy(&help.stdout);
        for word in words.iter().filter(|w| w.starts_with('-')) {
            let name = word.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{name} ")) || help.contains(&format!("{name}=")),
                "{root}: {name} is not in `tunnel-server {subcommand} --help`:\n{help}"
            );
        }
    }
}

#[test]
fn the_shipped_egress_configs_are_the_ones_in_deploy_egress() {
    for (copy, original) in [
        (
            "deploy/kubernetes/static-pod/egress-selector.yaml",
            "deploy/egress/httpconnect-uds.yaml",
        ),
        (
            "deploy/kubernetes/in-cluster/egress-selector.yaml",
            "deploy/egress/httpconnect-mtls.yaml",
        ),
    ] {
        let a: EgressSelectorConfiguration = render::read_file(copy);
        let b: EgressSelectorConfiguration = render::read_file(original);
        assert_eq!(a, b, "{copy} differs from {original}");
    }
    // The other shipped ones parse strictly too.
    let _: EgressSelectorConfiguration = render::read_file("deploy/egress/grpc-uds.yaml");
}
