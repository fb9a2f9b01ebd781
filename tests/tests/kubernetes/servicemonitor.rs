//! deploy/kubernetes/components/servicemonitor, through overlays/monitored: the ServiceMonitor
//! selects the headless Service, whose `admin` port leads to the admin listener of every
//! replica.

use crate::in_cluster::{service, service_port};
use crate::objects::Object;
use crate::{render, server_config};

#[test]
fn servicemonitor_scrapes_every_replicas_admin_port() {
    let objects = render::render("overlays/monitored");
    let monitor = objects
        .iter()
        .find_map(|o| match o {
            Object::ServiceMonitor(m) => Some(m),
            _ => None,
        })
        .expect("a ServiceMonitor");
    let headless = service(&objects, "tether-headless");
    let wanted = monitor.spec.selector.match_labels.clone().unwrap();
    let labels = headless.metadata.labels.clone().unwrap();
    assert!(
        wanted.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "{wanted:?} does not select the headless Service ({labels:?})"
    );
    assert_eq!(monitor.spec.endpoints[0].port, "admin");
    assert_eq!(monitor.spec.endpoints[0].path.as_deref(), Some("/metrics"));
    // The port named `admin` leads to the container port of the same name, which is the
    // config's admin listener (checked in in_cluster.rs).
    let config = objects
        .iter()
        .find_map(|o| match o {
            Object::ConfigMap(c) => c.data.as_ref()?.get("server.toml").cloned(),
            _ => None,
        })
        .expect("the server.toml ConfigMap");
    let admin = server_config(&config, "server.toml")
        .admin
        .listen
        .expect("admin.listen");
    service_port(headless, admin.port(), "admin");
}
