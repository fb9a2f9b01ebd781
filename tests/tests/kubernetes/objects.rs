//! The typed objects the manifests may contain: Kubernetes API objects from `k8s-openapi`,
//! and small structs, refusing unknown fields, for what has no type there (the Prometheus
//! Operator's ServiceMonitor, kube-apiserver's EgressSelectorConfiguration, the kubeadm
//! ClusterConfiguration fragment). The structs cover the fields these files use, named as in
//! the upstream schemas; a field outside them is an error. Their fields exist to be checked
//! by name, so not every one is read.
#![allow(dead_code)]

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;
use serde_json::Value;

use crate::render::strict;

/// One rendered object.
#[derive(Debug)]
pub enum Object {
    Pod(Box<Pod>),
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    ConfigMap(Box<ConfigMap>),
    PersistentVolumeClaim(Box<PersistentVolumeClaim>),
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    ServiceMonitor(Box<ServiceMonitor>),
}

impl Object {
    /// Read one object by its `apiVersion` and `kind`; an unexpected kind is an error too.
    pub fn from_value(value: &Value) -> Result<Object, String> {
        let api_version = value["apiVersion"].as_str().unwrap_or_default();
        let kind = value["kind"].as_str().unwrap_or_default();
        let name = value["metadata"]["name"].as_str().unwrap_or_default();
        let what = format!("{kind} {name} ({api_version})");
        Ok(match (api_version, kind) {
            ("v1", "Pod") => Object::Pod(strict(value, &what)?),
            ("apps/v1", "Deployment") => Object::Deployment(strict(value, &what)?),
            ("v1", "Service") => Object::Service(strict(value, &what)?),
            ("v1", "ConfigMap") => Object::ConfigMap(strict(value, &what)?),
            ("v1", "PersistentVolumeClaim") => Object::PersistentVolumeClaim(strict(value, &what)?),
            ("policy/v1", "PodDisruptionBudget") => {
                Object::PodDisruptionBudget(strict(value, &what)?)
            }
            ("monitoring.coreos.com/v1", "ServiceMonitor") => {
                Object::ServiceMonitor(strict(value, &what)?)
            }
            _ => return Err(format!("{what}: no typed check for this kind")),
        })
    }

    /// The object's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Pod(_) => "Pod",
            Object::Deployment(_) => "Deployment",
            Object::Service(_) => "Service",
            Object::ConfigMap(_) => "ConfigMap",
            Object::PersistentVolumeClaim(_) => "PersistentVolumeClaim",
            Object::PodDisruptionBudget(_) => "PodDisruptionBudget",
            Object::ServiceMonitor(_) => "ServiceMonitor",
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Pod(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::PersistentVolumeClaim(o) => &o.metadata,
            Object::PodDisruptionBudget(o) => &o.metadata,
            Object::ServiceMonitor(o) => &o.metadata,
        }
    }
}

/// `monitoring.coreos.com/v1` ServiceMonitor, the fields of its CRD this project uses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceMonitor {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceMonitorSpec,
}

/// ServiceMonitor `spec`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    pub selector: LabelSelector,
    pub endpoints: Vec<ServiceMonitorEndpoint>,
    pub job_label: Option<String>,
    pub namespace_selector: Option<Value>,
}

/// ServiceMonitor `spec.endpoints[]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceMonitorEndpoint {
    pub port: String,
    pub path: Option<String>,
    pub interval: Option<String>,
    pub scrape_timeout: Option<String>,
    pub scheme: Option<String>,
}

/// `apiserver.k8s.io/v1beta1` EgressSelectorConfiguration.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressSelectorConfiguration {
    pub api_version: String,
    pub kind: String,
    pub egress_selections: Vec<EgressSelection>,
}

/// One `egressSelections[]` entry.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressSelection {
    pub name: String,
    pub connection: EgressConnection,
}

/// `connection`.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressConnection {
    pub proxy_protocol: String,
    pub transport: EgressTransport,
}

/// `transport`: one of `uds` and `tcp`.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressTransport {
    pub uds: Option<EgressUds>,
    pub tcp: Option<EgressTcp>,
}

/// `transport.uds`.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressUds {
    pub uds_name: String,
}

/// `transport.tcp`.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressTcp {
    pub url: String,
    pub tls_config: Option<EgressTls>,
}

/// `transport.tcp.tlsConfig`.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressTls {
    pub ca_bundle: String,
    pub client_cert: String,
    pub client_key: String,
}

/// `kubeadm.k8s.io/v1beta4` ClusterConfiguration, the `apiServer` part the patch sets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterConfiguration {
    pub api_version: String,
    pub kind: String,
    pub api_server: ApiServer,
}

/// `apiServer`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiServer {
    pub extra_args: Vec<Arg>,
    pub extra_volumes: Vec<HostPathMount>,
}

/// `extraArgs[]` (v1beta4 lists name/value pairs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arg {
    pub name: String,
    pub value: String,
}

/// `extraVolumes[]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostPathMount {
    pub name: String,
    pub host_path: String,
    pub mount_path: String,
    pub read_only: Option<bool>,
    pub path_type: Option<String>,
}
