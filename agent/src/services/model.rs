//! The service model: Kubernetes `v1 Service` and `discovery.k8s.io/v1 EndpointSlice`, as
//! `kubectl get -o yaml` / `-o json` prints them, parsed and validated.
//!
//! Why this shape:
//! - A hand-written serde subset, not `k8s-openapi`'s types, is the model: the agent needs ~30
//!   fields of two kinds, and both sources (etcd manifests and, through `crate::shared::kube`, the API
//!   server, whose objects are re-serialised and parsed here) must mean the same and be
//!   validated the same way. Every field a real object carries is listed, though: the fields twill
//!   uses are typed, the ones it ignores (`managedFields`, `uid`, `selector`, `ipFamilies`,
//!   `status.conditions`, ...) are accepted and dropped, and anything else is refused
//!   (`deny_unknown_fields`), so a typo such as `sesionAffinity` or `namepsace` is an error
//!   naming the field rather than a silently different service.
//! - Parsing goes YAML/JSON → `serde_json::Value` → typed, through `serde_path_to_error`, so a
//!   type error names its path (`spec.ports[1].port`). Numbers are read as `i64` and checked by
//!   [`Service::validate`] so messages say what is wrong (`70000 is not a valid port`).
//! - Standalone mode has no API server to default or allocate anything, so validation is
//!   stricter than the API server's where that matters: a non-headless Service needs its
//!   `clusterIP`, a `NodePort` Service its `nodePort`s, and an EndpointSlice its
//!   `kubernetes.io/service-name` label. Features twill does not implement and whose absence
//!   would change behaviour unsafely (`loadBalancerSourceRanges`, SCTP) are refused, not ignored.
//! - Addresses follow Kubernetes' rules ([`special_ip`]): no unspecified, loopback, link-local
//!   or multicast address (nor the IPv4 broadcast address, nor an IPv4-mapped IPv6 one) as a
//!   cluster, external, load-balancer or endpoint address. The agents validate what they read
//!   with the same code, so an object written to etcd by hand or by an old client is refused
//!   there too.
//! - Condition semantics follow kube-proxy: `ready` and `serving` default to true when absent,
//!   `terminating` to false; only an endpoint's first address is used.
//! - What is stored (in etcd) is the typed object re-serialised as JSON: ignored fields are
//!   dropped, the namespace is filled in, so every reader parses one canonical shape.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::de::{IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::services::lb::Proto;

/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when absent (3 h, as Kubernetes).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// Upper bound of the affinity timeout (1 day, as Kubernetes).
pub const MAX_AFFINITY_TIMEOUT_SECS: i64 = 86_400;

/// A field of an object is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field's path, as in the object (`spec.ports[1].port`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// A manifest (file or stdin) could not be turned into valid objects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The text is not YAML/JSON.
    #[error("document {index}: {message}")]
    Syntax {
        /// 1-based document number.
        index: usize,
        /// The parser's message (with line and column).
        message: String,
    },
    /// An object is invalid.
    #[error("{object}: {error}")]
    Invalid {
        /// Which object: `document 2 (Service default/web)`.
        object: String,
        /// The field and what is wrong with it.
        error: FieldError,
    },
}

// ---------------------------------------------------------------------------------------------
// Wire types.

/// A field twill accepts and drops: deserialises anything, compares equal, never serialises.
#[derive(Debug, Clone, Copy, Default)]
struct Ignored;

impl PartialEq for Ignored {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<'de> Deserialize<'de> for Ignored {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Ignored)
    }
}

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `metadata`: what twill uses is `name`, `namespace` and `labels`; the rest of Kubernetes'
/// ObjectMeta is accepted and dropped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace (`default` once validated).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Labels.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing)]
    annotations: Ignored,
    #[serde(default, skip_serializing)]
    generate_name: Ignored,
    #[serde(default, skip_serializing)]
    self_link: Ignored,
    #[serde(default, skip_serializing)]
    uid: Ignored,
    #[serde(default, skip_serializing)]
    resource_version: Ignored,
    #[serde(default, skip_serializing)]
    generation: Ignored,
    #[serde(default, skip_serializing)]
    creation_timestamp: Ignored,
    #[serde(default, skip_serializing)]
    deletion_timestamp: Ignored,
    #[serde(default, skip_serializing)]
    deletion_grace_period_seconds: Ignored,
    #[serde(default, skip_serializing)]
    owner_references: Ignored,
    #[serde(default, skip_serializing)]
    finalizers: Ignored,
    #[serde(default, skip_serializing)]
    managed_fields: Ignored,
}

/// `spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ServiceType {
    /// Virtual IP inside the cluster.
    #[default]
    ClusterIP,
    /// ClusterIP plus a port on every node.
    NodePort,
    /// NodePort plus the ingress IPs in `status.loadBalancer`.
    LoadBalancer,
    /// A DNS alias; no dataplane entry (kube-proxy ignores it too).
    ExternalName,
}

/// `spec.sessionAffinity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionAffinity {
    /// No affinity.
    None,
    /// One client address sticks to one backend for `timeoutSeconds`.
    ClientIP,
}

/// `spec.externalTrafficPolicy` / `spec.internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster.
    Cluster,
    /// Endpoints on this node only.
    Local,
}

/// A port protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    TCP,
    /// UDP.
    UDP,
    /// SCTP: refused by validation (no twill dataplane does SCTP).
    SCTP,
}

/// `targetPort`: a number or the name of a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntOrString {
    /// A number (validated to 1–65535).
    Int(i64),
    /// A port name.
    Str(String),
}

impl Serialize for IntOrString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrString::Int(i) => s.serialize_i64(*i),
            IntOrString::Str(v) => s.serialize_str(v),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::Str(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `spec.ports[]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Name (required when there are several ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Protocol (TCP when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// The service port.
    pub port: i64,
    /// The endpoint port, or the name of an EndpointSlice port (default: `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    /// The node port (types NodePort and LoadBalancer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i64>,
    #[serde(default, skip_serializing)]
    app_protocol: Ignored,
}

/// `spec.sessionAffinityConfig.clientIP`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientIpConfig {
    /// Affinity timeout in seconds (1–86400; default 10800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
}

/// `spec.sessionAffinityConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionAffinityConfig {
    /// ClientIP affinity settings.
    #[serde(rename = "clientIP", default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpConfig>,
}

/// `spec` of a Service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Type (ClusterIP when absent).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<ServiceType>,
    /// The primary cluster IP, or `None` for a headless service.
    #[serde(rename = "clusterIP", default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    /// Cluster IPs, one per family (the first equals `clusterIP`).
    #[serde(
        rename = "clusterIPs",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cluster_ips: Vec<String>,
    /// Ports.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<ServicePort>,
    /// Addresses routed to this node for which the service also answers.
    #[serde(
        rename = "externalIPs",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub external_ips: Vec<String>,
    /// Session affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    /// Session affinity settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    /// Policy for NodePort, ExternalIP and LoadBalancer traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<TrafficPolicy>,
    /// Policy for ClusterIP traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<TrafficPolicy>,
    /// Refused when non-empty: twill does not filter sources.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub load_balancer_source_ranges: Vec<String>,
    /// Target of an ExternalName service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    #[serde(default, skip_serializing)]
    selector: Ignored,
    #[serde(default, skip_serializing)]
    ip_families: Ignored,
    #[serde(default, skip_serializing)]
    ip_family_policy: Ignored,
    /// Deprecated in Kubernetes and not programmed by twill (the ingress IPs in
    /// `status.loadBalancer` are), but validated like every other service address.
    #[serde(rename = "loadBalancerIP", default, skip_serializing)]
    load_balancer_ip: Option<String>,
    #[serde(default, skip_serializing)]
    load_balancer_class: Ignored,
    #[serde(default, skip_serializing)]
    allocate_load_balancer_node_ports: Ignored,
    #[serde(default, skip_serializing)]
    health_check_node_port: Ignored,
    #[serde(default, skip_serializing)]
    publish_not_ready_addresses: Ignored,
    #[serde(default, skip_serializing)]
    traffic_distribution: Ignored,
}

/// `status.loadBalancer.ingress[].ipMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IpMode {
    /// Traffic arrives with the LB IP as destination: program a frontend (the default).
    VIP,
    /// The load balancer proxies to node ports: no LoadBalancer frontend (as kube-proxy).
    Proxy,
}

/// `status.loadBalancer.ingress[]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerIngress {
    /// The ingress IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// A hostname (no dataplane entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// How traffic arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_mode: Option<IpMode>,
    #[serde(default, skip_serializing)]
    ports: Ignored,
}

/// `status.loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancerStatus {
    /// Ingress points.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ingress: Vec<LoadBalancerIngress>,
}

/// `status` of a Service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceStatus {
    /// Load balancer state (in standalone mode: written by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerStatus>,
    #[serde(default, skip_serializing)]
    conditions: Ignored,
}

/// A `v1 Service`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// `v1`.
    pub api_version: String,
    /// `Service`.
    pub kind: String,
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: ServiceSpec,
    /// Status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceStatus>,
}

/// `addressType` of an EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressType {
    /// IPv4 addresses.
    IPv4,
    /// IPv6 addresses.
    IPv6,
    /// Names: ignored by the dataplane (as kube-proxy).
    FQDN,
}

/// `endpoints[].conditions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConditions {
    /// Ready for traffic (absent: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// Serving, even if terminating (absent: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    /// Terminating (absent: false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
}

/// `endpoints[]` of an EndpointSlice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// Addresses (only the first is used, as kube-proxy).
    #[serde(default, deserialize_with = "null_default")]
    pub addresses: Vec<String>,
    /// Conditions.
    #[serde(default)]
    pub conditions: EndpointConditions,
    /// The node hosting the endpoint (decides `node_local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Zone (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing)]
    hostname: Ignored,
    #[serde(default, skip_serializing)]
    hints: Ignored,
    #[serde(default, skip_serializing)]
    target_ref: Ignored,
    #[serde(default, skip_serializing)]
    deprecated_topology: Ignored,
}

/// `ports[]` of an EndpointSlice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPort {
    /// Name: matches the Service port's name (or a named `targetPort`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Protocol (TCP when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing)]
    app_protocol: Ignored,
}

/// A `discovery.k8s.io/v1 EndpointSlice`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSlice {
    /// `discovery.k8s.io/v1`.
    pub api_version: String,
    /// `EndpointSlice`.
    pub kind: String,
    /// Metadata (`labels` carries the service name).
    pub metadata: ObjectMeta,
    /// Address family.
    pub address_type: AddressType,
    /// Endpoints.
    #[serde(default, deserialize_with = "null_default")]
    pub endpoints: Vec<Endpoint>,
    /// Ports.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<EndpointPort>,
}

// ---------------------------------------------------------------------------------------------
// Objects and their identity.

/// The kinds twill stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1 Service`.
    Service,
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice,
}

impl Kind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

/// Kind, namespace and name of an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Kind.
    pub kind: Kind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// A change to the stored objects, as a source reports it.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "short-lived, moved not copied; boxing would cost an allocation per event"
)]
pub enum Change {
    /// Created or replaced.
    Put(Object),
    /// Deleted.
    Delete(ObjectKey),
}

/// A Service or an EndpointSlice.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A Service.
    Service(Service),
    /// An EndpointSlice.
    EndpointSlice(EndpointSlice),
}

impl Object {
    /// Kind, namespace, name (namespace `default` when unset).
    pub fn key(&self) -> ObjectKey {
        let (kind, m) = match self {
            Object::Service(s) => (Kind::Service, &s.metadata),
            Object::EndpointSlice(s) => (Kind::EndpointSlice, &s.metadata),
        };
        ObjectKey {
            kind,
            namespace: namespace_or_default(&m.namespace).to_string(),
            name: m.name.clone(),
        }
    }

    /// The canonical JSON stored for this object.
    pub fn to_json(&self) -> String {
        match self {
            Object::Service(s) => serde_json::to_string(s),
            Object::EndpointSlice(s) => serde_json::to_string(s),
        }
        .expect("model types serialise")
    }

    /// Validates and fills defaults (namespace).
    pub fn validate(&mut self) -> Result<(), FieldError> {
        match self {
            Object::Service(s) => s.validate(),
            Object::EndpointSlice(s) => s.validate(),
        }
    }
}

fn namespace_or_default(ns: &str) -> &str {
    if ns.is_empty() { "default" } else { ns }
}

// ---------------------------------------------------------------------------------------------
// Parsing.

/// Parses one object of `kind` from a JSON value, with field paths in errors; not validated.
fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        bad(
            if path == "." { String::new() } else { path },
            e.into_inner().to_string(),
        )
    })
}

fn describe(index: &str, v: &serde_json::Value) -> String {
    let kind = v.get("kind").and_then(serde_json::Value::as_str);
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(serde_json::Value::as_str);
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default");
    match (kind, name) {
        (Some(k), Some(n)) => format!("{index} ({k} {ns}/{n})"),
        (Some(k), None) => format!("{index} ({k})"),
        _ => index.to_string(),
    }
}

fn object_from_value(
    index: &str,
    v: serde_json::Value,
    out: &mut Vec<(String, Object)>,
) -> Result<(), ManifestError> {
    let who = describe(index, &v);
    let invalid = |error: FieldError| ManifestError::Invalid {
        object: who.clone(),
        error,
    };
    if !v.is_object() {
        return Err(invalid(bad(
            "",
            "not an object (want a Service or an EndpointSlice)",
        )));
    }
    let api = v
        .get("apiVersion")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kind = v
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind.is_empty() {
        return Err(invalid(bad("kind", "missing")));
    }
    if api.is_empty() {
        return Err(invalid(bad("apiVersion", "missing")));
    }
    let mut obj = match (api.as_str(), kind.as_str()) {
        ("v1", "Service") => Object::Service(typed(v).map_err(invalid)?),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            Object::EndpointSlice(typed(v).map_err(invalid)?)
        }
        (_, k) if k == "List" || k.ends_with("List") => {
            let items = match v.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                Some(serde_json::Value::Null) | None => Vec::new(),
                Some(_) => return Err(invalid(bad("items", "not a list"))),
            };
            for (i, item) in items.into_iter().enumerate() {
                object_from_value(&format!("{index} items[{i}]"), item, out)?;
            }
            return Ok(());
        }
        (_, "Service") => {
            return Err(invalid(bad(
                "apiVersion",
                format!("{api} is not supported for kind Service (want v1)"),
            )));
        }
        (_, "EndpointSlice") => {
            return Err(invalid(bad(
                "apiVersion",
                format!("{api} is not supported for kind EndpointSlice (want discovery.k8s.io/v1)"),
            )));
        }
        (_, "Endpoints") => {
            return Err(invalid(bad(
                "kind",
                "Endpoints is not supported; write a discovery.k8s.io/v1 EndpointSlice",
            )));
        }
        (_, k) => {
            return Err(invalid(bad(
                "kind",
                format!(
                    "{k} is not supported (want v1 Service or discovery.k8s.io/v1 EndpointSlice)"
                ),
            )));
        }
    };
    obj.validate().map_err(invalid)?;
    out.push((who, obj));
    Ok(())
}

/// Parses a manifest: YAML (several `---`-separated documents) or JSON (one or more values), as
/// `kubectl get -o yaml|json` prints them, `List`s included. All or nothing: the first invalid
/// document fails the whole manifest, naming the document and the field. Two documents for the
/// same object are refused (which one should win is a guess).
pub fn parse_manifest(text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut values = Vec::new();
    if text.trim_start().starts_with('{') {
        for (i, v) in serde_json::Deserializer::from_str(text)
            .into_iter::<serde_json::Value>()
            .enumerate()
        {
            values.push(v.map_err(|e| ManifestError::Syntax {
                index: i + 1,
                message: e.to_string(),
            })?);
        }
    } else {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            values.push(serde_json::Value::deserialize(doc).map_err(|e| {
                ManifestError::Syntax {
                    index: i + 1,
                    message: e.to_string(),
                }
            })?);
        }
    }
    let mut out = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        if v.is_null() {
            continue; // an empty document (`---` at the start or the end)
        }
        object_from_value(&format!("document {}", i + 1), v, &mut out)?;
    }
    let mut seen: BTreeMap<ObjectKey, String> = BTreeMap::new();
    for (who, obj) in &out {
        if let Some(first) = seen.insert(obj.key(), who.clone()) {
            return Err(ManifestError::Invalid {
                object: who.clone(),
                error: bad(
                    "metadata.name",
                    format!("{} is also defined by {first}", obj.key()),
                ),
            });
        }
    }
    Ok(out.into_iter().map(|(_, o)| o).collect())
}

/// Parses a stored Service (canonical JSON) and validates it.
pub fn service_from_json(bytes: &[u8]) -> Result<Service, FieldError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad("", format!("not JSON: {e}")))?;
    let mut s: Service = typed(v)?;
    s.validate()?;
    Ok(s)
}

/// Parses a stored EndpointSlice (canonical JSON) and validates it.
pub fn endpoint_slice_from_json(bytes: &[u8]) -> Result<EndpointSlice, FieldError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad("", format!("not JSON: {e}")))?;
    let mut s: EndpointSlice = typed(v)?;
    s.validate()?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Validation.

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// IANA service name: ≤ 15 characters, lower-case letters, digits and single hyphens, at least
/// one letter (Kubernetes' rule for port names).
fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn port_number(field: &str, v: i64) -> Result<u16, FieldError> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad(field, format!("{v} is not a valid port (1-65535)")))
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr, FieldError> {
    s.parse()
        .map_err(|_| bad(field, format!("{s:?} is not an IP address")))
}

/// Why `ip` cannot be a service address (a cluster IP, an external or load-balancer IP) or an
/// endpoint address, if it cannot.
///
/// Kubernetes refuses unspecified, loopback, link-local unicast and link-local multicast
/// addresses for endpoints and external IPs (`ValidateEndpointIP`, formerly
/// `ValidateNonSpecialIP`), and since 1.33 IPv4-mapped IPv6 addresses in every IP field
/// (`StrictIPCIDRValidation`: one address must not mean an IPv4 address to one program and an
/// IPv6 one to another; octets with leading zeros, the other half of that rule, never parse
/// here). twill applies this to every address it programs, and refuses all multicast and the
/// IPv4 broadcast address too: no frontend or backend can be one, and without an API server to
/// allocate cluster IPs from a service CIDR nothing else would stop `clusterIP: 224.0.0.1`.
pub fn special_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => Some("may not be unspecified (0.0.0.0, ::)"),
        IpAddr::V4(a) if a.is_loopback() => {
            Some("may not be in the loopback range (127.0.0.0/8, ::1/128)")
        }
        IpAddr::V4(a) if a.is_link_local() => {
            Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)")
        }
        IpAddr::V4(a) if a.is_multicast() => {
            Some("may not be a multicast address (224.0.0.0/4, ff00::/8)")
        }
        IpAddr::V4(a) if a.is_broadcast() => Some("may not be the broadcast address"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            Some("must not be an IPv4-mapped IPv6 address (write the IPv4 address)")
        }
        IpAddr::V6(a) if a.is_unspecified() => Some("may not be unspecified (0.0.0.0, ::)"),
        IpAddr::V6(a) if a.is_loopback() => {
            Some("may not be in the loopback range (127.0.0.0/8, ::1/128)")
        }
        IpAddr::V6(a) if a.is_unicast_link_local() => {
            Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)")
        }
        IpAddr::V6(a) if a.is_multicast() => {
            Some("may not be a multicast address (224.0.0.0/4, ff00::/8)")
        }
        _ => None,
    }
}

/// Parses a service or endpoint address and refuses the [`special_ip`]s, naming the field.
fn service_ip(field: &str, s: &str) -> Result<IpAddr, FieldError> {
    let ip = parse_ip(field, s)?;
    match special_ip(ip) {
        Some(why) => Err(bad(field, format!("{s} {why}"))),
        None => Ok(ip),
    }
}

fn validate_meta(m: &mut ObjectMeta, kind: Kind) -> Result<(), FieldError> {
    if m.name.is_empty() {
        return Err(bad("metadata.name", "required"));
    }
    let ok = match kind {
        Kind::Service => is_dns1035_label(&m.name),
        Kind::EndpointSlice => is_dns1123_subdomain(&m.name),
    };
    if !ok {
        let rule = match kind {
            Kind::Service => {
                "a DNS-1035 label: lower-case letters, digits and '-', starting with a letter, at most 63 characters"
            }
            Kind::EndpointSlice => "a DNS-1123 subdomain: lower-case letters, digits, '-' and '.'",
        };
        return Err(bad(
            "metadata.name",
            format!("{:?} is not valid: must be {rule}", m.name),
        ));
    }
    if m.namespace.is_empty() {
        m.namespace = "default".into();
    } else if !is_dns1123_label(&m.namespace) {
        return Err(bad(
            "metadata.namespace",
            format!(
                "{:?} is not a valid namespace (a DNS-1123 label)",
                m.namespace
            ),
        ));
    }
    Ok(())
}

fn protocol_of(field: &str, p: Option<Protocol>) -> Result<Proto, FieldError> {
    match p.unwrap_or_default() {
        Protocol::TCP => Ok(Proto::Tcp),
        Protocol::UDP => Ok(Proto::Udp),
        Protocol::SCTP => Err(bad(field, "SCTP is not supported by twill (TCP or UDP)")),
    }
}

/// A validated target port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    /// A number.
    Number(u16),
    /// A port name, looked up among the EndpointSlice's ports.
    Name(String),
}

impl ServicePort {
    /// The port's protocol (validated: TCP or UDP).
    pub fn proto(&self) -> Proto {
        if self.protocol == Some(Protocol::UDP) {
            Proto::Udp
        } else {
            Proto::Tcp
        }
    }

    /// The service port (validated).
    pub fn port(&self) -> u16 {
        u16::try_from(self.port).unwrap_or_default()
    }

    /// The node port, if any (validated).
    pub fn node_port(&self) -> Option<u16> {
        self.node_port.and_then(|p| u16::try_from(p).ok())
    }

    /// The name, `""` when unnamed.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    /// The target port (`port` when absent).
    pub fn target(&self) -> TargetPort {
        match &self.target_port {
            Some(IntOrString::Int(i)) => TargetPort::Number(u16::try_from(*i).unwrap_or_default()),
            Some(IntOrString::Str(s)) => match s.parse::<u16>() {
                Ok(n) => TargetPort::Number(n),
                Err(_) => TargetPort::Name(s.clone()),
            },
            None => TargetPort::Number(self.port()),
        }
    }
}

impl Service {
    /// Namespace and name.
    pub fn key(&self) -> (String, String) {
        (
            namespace_or_default(&self.metadata.namespace).to_string(),
            self.metadata.name.clone(),
        )
    }

    /// The type (ClusterIP when absent).
    pub fn type_(&self) -> ServiceType {
        self.spec.type_.unwrap_or_default()
    }

    /// `clusterIP: None`.
    pub fn is_headless(&self) -> bool {
        self.spec.cluster_ip.as_deref() == Some("None")
    }

    /// Whether the dataplane programs anything for it (not headless, not ExternalName).
    pub fn has_frontends(&self) -> bool {
        !self.is_headless() && self.type_() != ServiceType::ExternalName
    }

    /// Cluster IPs (validated; at most one per family).
    pub fn cluster_ips(&self) -> Vec<IpAddr> {
        if !self.has_frontends() {
            return Vec::new();
        }
        let list: Vec<&String> = if self.spec.cluster_ips.is_empty() {
            self.spec.cluster_ip.iter().collect()
        } else {
            self.spec.cluster_ips.iter().collect()
        };
        list.iter().filter_map(|s| s.parse().ok()).collect()
    }

    /// `spec.externalIPs` (validated).
    pub fn external_ips(&self) -> Vec<IpAddr> {
        self.spec
            .external_ips
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    /// Load-balancer ingress IPs that get a frontend: type LoadBalancer, `ip` set, `ipMode`
    /// not `Proxy`.
    pub fn lb_ingress_ips(&self) -> Vec<IpAddr> {
        if self.type_() != ServiceType::LoadBalancer {
            return Vec::new();
        }
        self.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .map(|lb| {
                lb.ingress
                    .iter()
                    .filter(|i| i.ip_mode != Some(IpMode::Proxy))
                    .filter_map(|i| i.ip.as_deref()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Reachable from outside the cluster (node ports, external IPs, LB IPs).
    pub fn externally_accessible(&self) -> bool {
        matches!(
            self.type_(),
            ServiceType::NodePort | ServiceType::LoadBalancer
        ) || !self.spec.external_ips.is_empty()
    }

    /// The ClientIP affinity timeout, if affinity is on.
    pub fn affinity_timeout_secs(&self) -> Option<u32> {
        if self.spec.session_affinity != Some(SessionAffinity::ClientIP) {
            return None;
        }
        let t = self
            .spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok());
        Some(t.unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS))
    }

    /// `externalTrafficPolicy: Local` on an externally accessible service.
    pub fn external_local(&self) -> bool {
        self.externally_accessible()
            && self.spec.external_traffic_policy == Some(TrafficPolicy::Local)
    }

    /// `internalTrafficPolicy: Local`.
    pub fn internal_local(&self) -> bool {
        self.spec.internal_traffic_policy == Some(TrafficPolicy::Local)
    }

    /// Checks every field twill uses and fills defaults (namespace). Errors name the field.
    pub fn validate(&mut self) -> Result<(), FieldError> {
        if self.api_version != "v1" || self.kind != "Service" {
            return Err(bad(
                "kind",
                format!("{} {} is not a v1 Service", self.api_version, self.kind),
            ));
        }
        validate_meta(&mut self.metadata, Kind::Service)?;
        let ty = self.type_();
        let spec = &self.spec;
        if ty == ServiceType::ExternalName {
            if spec.external_name.as_deref().unwrap_or_default().is_empty() {
                return Err(bad("spec.externalName", "required for type ExternalName"));
            }
            return Ok(()); // nothing else is programmed for it
        }
        if spec.external_name.is_some() {
            return Err(bad(
                "spec.externalName",
                format!("only valid for type ExternalName (type is {ty:?})"),
            ));
        }
        // Cluster IPs.
        let headless = self.is_headless();
        if headless {
            if ty != ServiceType::ClusterIP {
                return Err(bad(
                    "spec.clusterIP",
                    format!("None (headless) is only valid for type ClusterIP (type is {ty:?})"),
                ));
            }
            if spec.cluster_ips.iter().any(|s| s != "None") {
                return Err(bad(
                    "spec.clusterIPs",
                    "must be [None] for a headless service",
                ));
            }
        } else {
            let primary = match spec.cluster_ip.as_deref() {
                None | Some("") => spec.cluster_ips.first().cloned().ok_or_else(|| {
                    bad("spec.clusterIP", "required (twill has no cluster IP allocator; use \"None\" for a headless service)")
                })?,
                Some(s) => s.to_string(),
            };
            let primary_ip = service_ip("spec.clusterIP", &primary)?;
            if spec.cluster_ips.len() > 2 {
                return Err(bad(
                    "spec.clusterIPs",
                    "at most two addresses (one per family)",
                ));
            }
            let mut families = BTreeSet::new();
            for (i, s) in spec.cluster_ips.iter().enumerate() {
                let f = format!("spec.clusterIPs[{i}]");
                let ip = service_ip(&f, s)?;
                if i == 0 && ip != primary_ip {
                    return Err(bad(f, format!("{s} must equal spec.clusterIP {primary}")));
                }
                if !families.insert(ip.is_ipv6()) {
                    return Err(bad(f, format!("{s}: two addresses of one family")));
                }
            }
            if spec.ports.is_empty() {
                return Err(bad(
                    "spec.ports",
                    "required (at least one port) unless headless",
                ));
            }
        }
        // Ports.
        let mut seen_ports: BTreeMap<(u16, Proto), usize> = BTreeMap::new();
        let mut seen_node_ports: BTreeMap<(u16, Proto), usize> = BTreeMap::new();
        let mut seen_names: BTreeMap<&str, usize> = BTreeMap::new();
        let many = spec.ports.len() > 1;
        for (i, p) in spec.ports.iter().enumerate() {
            let f = |sub: &str| format!("spec.ports[{i}].{sub}");
            let port = port_number(&f("port"), p.port)?;
            let proto = protocol_of(&f("protocol"), p.protocol)?;
            match p.name.as_deref() {
                None | Some("") if many => {
                    return Err(bad(f("name"), "required when a service has several ports"));
                }
                None | Some("") => {}
                Some(n) => {
                    if !is_iana_svc_name(n) {
                        return Err(bad(
                            f("name"),
                            format!(
                                "{n:?} is not valid: at most 15 lower-case letters, digits and single '-', with a letter"
                            ),
                        ));
                    }
                    if let Some(j) = seen_names.insert(n, i) {
                        return Err(bad(
                            f("name"),
                            format!("{n:?} duplicates spec.ports[{j}].name"),
                        ));
                    }
                }
            }
            if let Some(j) = seen_ports.insert((port, proto), i) {
                return Err(bad(
                    f("port"),
                    format!("{port}/{proto} duplicates spec.ports[{j}]"),
                ));
            }
            match &p.target_port {
                None => {}
                Some(IntOrString::Int(t)) => {
                    port_number(&f("targetPort"), *t)?;
                }
                Some(IntOrString::Str(s)) => {
                    if let Ok(n) = s.parse::<i64>() {
                        port_number(&f("targetPort"), n)?;
                    } else if !is_iana_svc_name(s) {
                        return Err(bad(
                            f("targetPort"),
                            format!("{s:?} is neither a port number nor a valid port name"),
                        ));
                    }
                }
            }
            match p.node_port {
                None => {
                    if ty == ServiceType::NodePort {
                        return Err(bad(
                            f("nodePort"),
                            "required for type NodePort (twill does not allocate node ports)",
                        ));
                    }
                }
                Some(np) => {
                    if !matches!(ty, ServiceType::NodePort | ServiceType::LoadBalancer) {
                        return Err(bad(
                            f("nodePort"),
                            format!(
                                "only valid for type NodePort or LoadBalancer (type is {ty:?})"
                            ),
                        ));
                    }
                    let np = port_number(&f("nodePort"), np)?;
                    if let Some(j) = seen_node_ports.insert((np, proto), i) {
                        return Err(bad(
                            f("nodePort"),
                            format!("{np}/{proto} duplicates spec.ports[{j}].nodePort"),
                        ));
                    }
                }
            }
        }
        for (i, s) in spec.external_ips.iter().enumerate() {
            service_ip(&format!("spec.externalIPs[{i}]"), s)?;
        }
        if let Some(ip) = spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()) {
            service_ip("spec.loadBalancerIP", ip)?;
        }
        // Affinity.
        if let Some(cfg) = &spec.session_affinity_config {
            if spec.session_affinity != Some(SessionAffinity::ClientIP) {
                return Err(bad(
                    "spec.sessionAffinityConfig",
                    "only valid with sessionAffinity: ClientIP (affinity would be off)",
                ));
            }
            if let Some(t) = cfg.client_ip.as_ref().and_then(|c| c.timeout_seconds)
                && !(1..=MAX_AFFINITY_TIMEOUT_SECS).contains(&t)
            {
                return Err(bad(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is out of range (1-{MAX_AFFINITY_TIMEOUT_SECS})"),
                ));
            }
        }
        if spec.external_traffic_policy == Some(TrafficPolicy::Local)
            && !self.externally_accessible()
        {
            return Err(bad(
                "spec.externalTrafficPolicy",
                "Local only applies to types NodePort and LoadBalancer or to externalIPs; this service has none",
            ));
        }
        if !spec.load_balancer_source_ranges.is_empty() {
            return Err(bad(
                "spec.loadBalancerSourceRanges",
                "not supported by twill (traffic would not be restricted)",
            ));
        }
        if let Some(lb) = self.status.as_ref().and_then(|s| s.load_balancer.as_ref()) {
            for (i, ing) in lb.ingress.iter().enumerate() {
                let f = format!("status.loadBalancer.ingress[{i}].ip");
                if ty != ServiceType::LoadBalancer {
                    return Err(bad(
                        "status.loadBalancer.ingress",
                        format!("only valid for type LoadBalancer (type is {ty:?})"),
                    ));
                }
                match (&ing.ip, &ing.hostname) {
                    (Some(ip), _) => {
                        service_ip(&f, ip)?;
                    }
                    (None, Some(_)) => {}
                    (None, None) => return Err(bad(f, "ip or hostname is required")),
                }
            }
        }
        Ok(())
    }
}

impl Endpoint {
    /// `conditions.ready`, true when absent.
    pub fn ready(&self) -> bool {
        self.conditions.ready.unwrap_or(true)
    }

    /// `conditions.serving`, true when absent.
    pub fn serving(&self) -> bool {
        self.conditions.serving.unwrap_or(true)
    }

    /// `conditions.terminating`, false when absent.
    pub fn terminating(&self) -> bool {
        self.conditions.terminating.unwrap_or(false)
    }

    /// The address used (the first).
    pub fn address(&self) -> Option<IpAddr> {
        self.addresses.first()?.parse().ok()
    }
}

impl EndpointSlice {
    /// Namespace and name.
    pub fn key(&self) -> (String, String) {
        (
            namespace_or_default(&self.metadata.namespace).to_string(),
            self.metadata.name.clone(),
        )
    }

    /// The service it belongs to (namespace, name).
    pub fn service(&self) -> Option<(String, String)> {
        let name = self.metadata.labels.get(SERVICE_NAME_LABEL)?;
        Some((
            namespace_or_default(&self.metadata.namespace).to_string(),
            name.clone(),
        ))
    }

    /// Checks every field twill uses and fills defaults (namespace). Errors name the field.
    pub fn validate(&mut self) -> Result<(), FieldError> {
        if self.api_version != "discovery.k8s.io/v1" || self.kind != "EndpointSlice" {
            return Err(bad(
                "kind",
                format!(
                    "{} {} is not a discovery.k8s.io/v1 EndpointSlice",
                    self.api_version, self.kind
                ),
            ));
        }
        validate_meta(&mut self.metadata, Kind::EndpointSlice)?;
        let label = format!("metadata.labels[{SERVICE_NAME_LABEL}]");
        match self.metadata.labels.get(SERVICE_NAME_LABEL) {
            None => {
                return Err(bad(
                    label,
                    "required: names the Service this slice belongs to",
                ));
            }
            Some(s) if !is_dns1035_label(s) => {
                return Err(bad(label, format!("{s:?} is not a valid Service name")));
            }
            Some(_) => {}
        }
        for (i, ep) in self.endpoints.iter().enumerate() {
            if ep.addresses.is_empty() {
                return Err(bad(
                    format!("endpoints[{i}].addresses"),
                    "at least one address is required",
                ));
            }
            if self.address_type == AddressType::FQDN {
                continue;
            }
            for (j, a) in ep.addresses.iter().enumerate() {
                let f = format!("endpoints[{i}].addresses[{j}]");
                let ip = service_ip(&f, a)?;
                let want_v6 = self.address_type == AddressType::IPv6;
                if ip.is_ipv6() != want_v6 {
                    return Err(bad(
                        f,
                        format!("{a} does not match addressType {:?}", self.address_type),
                    ));
                }
            }
            if let Some(n) = &ep.node_name
                && !is_dns1123_subdomain(n)
            {
                return Err(bad(
                    format!("endpoints[{i}].nodeName"),
                    format!("{n:?} is not a valid node name"),
                ));
            }
        }
        let mut names = BTreeMap::new();
        for (i, p) in self.ports.iter().enumerate() {
            let f = |sub: &str| format!("ports[{i}].{sub}");
            if let Some(port) = p.port {
                port_number(&f("port"), port)?;
            }
            let proto = protocol_of(&f("protocol"), p.protocol)?;
            let name = p.name.as_deref().unwrap_or_default();
            if !name.is_empty() && !is_dns1123_label(name) {
                return Err(bad(
                    f("name"),
                    format!("{name:?} is not a valid port name (a DNS-1123 label)"),
                ));
            }
            if let Some(j) = names.insert((name, proto), i) {
                return Err(bad(
                    f("name"),
                    format!("{name:?}/{proto} duplicates ports[{j}]"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kubectl get svc,endpointslice -o yaml` prints for a NodePort service (trimmed of
    /// nothing: every field a real object carries is there).
    const KUBECTL_LIST: &str = r#"
apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Service"}
    creationTimestamp: "2024-05-01T10:00:00Z"
    labels:
      app: web
    name: web
    namespace: shop
    resourceVersion: "1234"
    uid: 6f1c2b9e-0000-4000-8000-000000000001
    managedFields:
    - apiVersion: v1
      fieldsType: FieldsV1
      manager: kubectl
  spec:
    clusterIP: 10.96.0.10
    clusterIPs:
    - 10.96.0.10
    externalTrafficPolicy: Cluster
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: http
      nodePort: 30080
      port: 80
      protocol: TCP
      targetPort: 8080
    - name: dns
      nodePort: 30053
      port: 53
      protocol: UDP
      targetPort: dns
    selector:
      app: web
    sessionAffinity: None
    type: NodePort
  status:
    loadBalancer: {}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 10.244.1.5
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: node-1
    targetRef:
      kind: Pod
      name: web-abc
      namespace: shop
      uid: 6f1c2b9e-0000-4000-8000-000000000002
    zone: z1
  kind: EndpointSlice
  metadata:
    generateName: web-
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: web
    name: web-x7k2p
    namespace: shop
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: web
      uid: 6f1c2b9e-0000-4000-8000-000000000001
  ports:
  - name: http
    port: 8080
    protocol: TCP
  - name: dns
    port: 5353
    protocol: UDP
kind: List
metadata:
  resourceVersion: ""
"#;

    fn err(text: &str) -> String {
        parse_manifest(text).unwrap_err().to_string()
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n";

    #[test]
    fn kubectl_list_output_parses() {
        let objs = parse_manifest(KUBECTL_LIST).unwrap();
        assert_eq!(objs.len(), 2);
        let Object::Service(s) = &objs[0] else {
            panic!()
        };
        assert_eq!(s.key(), ("shop".into(), "web".into()));
        assert_eq!(s.type_(), ServiceType::NodePort);
        assert_eq!(
            s.cluster_ips(),
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(s.spec.ports[1].target(), TargetPort::Name("dns".into()));
        assert_eq!(s.spec.ports[1].proto(), Proto::Udp);
        assert_eq!(s.spec.ports[0].node_port(), Some(30080));
        assert!(s.affinity_timeout_secs().is_none());
        let Object::EndpointSlice(e) = &objs[1] else {
            panic!()
        };
        assert_eq!(e.service(), Some(("shop".into(), "web".into())));
        assert!(e.endpoints[0].ready());
        // Canonical JSON drops what twill ignores and round-trips.
        let json = objs[0].to_json();
        assert!(
            !json.contains("managedFields") && !json.contains("last-applied"),
            "{json}"
        );
        assert_eq!(&service_from_json(json.as_bytes()).unwrap(), s);
        let json = objs[1].to_json();
        assert_eq!(&endpoint_slice_from_json(json.as_bytes()).unwrap(), e);
    }

    #[test]
    fn json_input_and_multi_document_yaml() {
        let v: serde_json::Value = serde_yaml_ng::from_str(KUBECTL_LIST).unwrap();
        let json = serde_json::to_string_pretty(&v).unwrap();
        assert_eq!(parse_manifest(&json).unwrap().len(), 2);
        let multi = format!(
            "---\n{SVC}---\n{}\n---\n",
            SVC.replace("name: web", "name: api")
        );
        let objs = parse_manifest(&multi).unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1].key().to_string(), "Service default/api");
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let two = format!(
            "{SVC}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  clusterIP: 10.96.0.11\n  ports:\n  - name: a\n    port: 80\n  - name: b\n    port: 70000\n"
        );
        assert_eq!(
            err(&two),
            "document 2 (Service default/api): spec.ports[1].port: 70000 is not a valid port (1-65535)"
        );
        let typo = SVC.replace("spec:\n", "spec:\n  sesionAffinity: ClientIP\n");
        let e = err(&typo);
        assert!(e.starts_with("document 1 (Service default/web): spec.sesionAffinity: unknown field `sesionAffinity`, expected one of"), "{e}");
        let typo = SVC.replace("  name: web\n", "  name: web\n  namepsace: shop\n");
        assert!(
            err(&typo).contains("metadata.namepsace: unknown field `namepsace`"),
            "{}",
            err(&typo)
        );
        let bad_enum = SVC.replace("spec:\n", "spec:\n  type: Nodeport\n");
        assert!(
            err(&bad_enum).contains("spec.type: unknown variant `Nodeport`"),
            "{}",
            err(&bad_enum)
        );
        let bad_type = SVC.replace("port: 80", "port: eighty");
        assert!(
            err(&bad_type).contains("spec.ports[0].port: invalid type: string \"eighty\""),
            "{}",
            err(&bad_type)
        );
        assert!(
            err("apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n")
                .contains("kind: Pod is not supported")
        );
        assert!(
            err("apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: x\n")
                .contains("EndpointSlice")
        );
        assert!(err("kind: Service\nmetadata:\n  name: x\n").contains("apiVersion: missing"));
        assert!(err(": : :\n  - [").starts_with("document 1: "));
        let dup = format!("{SVC}---\n{SVC}");
        assert_eq!(
            err(&dup),
            "document 2 (Service default/web): metadata.name: Service default/web is also defined by document 1 (Service default/web)"
        );
    }

    #[test]
    fn service_validation() {
        let cases = [
            (SVC.replace("  clusterIP: 10.96.0.10\n", ""), "spec.clusterIP: required"),
            (SVC.replace("10.96.0.10", "10.96.0.300"), "spec.clusterIP: \"10.96.0.300\" is not an IP address"),
            (SVC.replace("  ports:\n  - port: 80\n", ""), "spec.ports: required"),
            (SVC.replace("- port: 80", "- port: 80\n  - port: 81"), "spec.ports[0].name: required when a service has several ports"),
            (SVC.replace("- port: 80", "- port: 80\n    protocol: SCTP"), "spec.ports[0].protocol: SCTP is not supported"),
            (SVC.replace("- port: 80", "- port: 80\n    nodePort: 30080"), "spec.ports[0].nodePort: only valid for type NodePort or LoadBalancer (type is ClusterIP)"),
            (SVC.replace("spec:\n", "spec:\n  type: NodePort\n"), "spec.ports[0].nodePort: required for type NodePort"),
            (SVC.replace("- port: 80", "- port: 80\n    targetPort: 0"), "spec.ports[0].targetPort: 0 is not a valid port"),
            (SVC.replace("- port: 80", "- port: 80\n    targetPort: Web_Port"), "spec.ports[0].targetPort: \"Web_Port\" is neither"),
            (SVC.replace("spec:\n", "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 0\n"), "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is out of range"),
            (SVC.replace("spec:\n", "spec:\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 60\n"), "spec.sessionAffinityConfig: only valid with sessionAffinity: ClientIP"),
            (SVC.replace("spec:\n", "spec:\n  externalTrafficPolicy: Local\n"), "spec.externalTrafficPolicy: Local only applies"),
            (SVC.replace("spec:\n", "spec:\n  externalIPs: [1.2.3]\n"), "spec.externalIPs[0]: \"1.2.3\" is not an IP address"),
            (SVC.replace("spec:\n", "spec:\n  loadBalancerSourceRanges: [10.0.0.0/8]\n"), "spec.loadBalancerSourceRanges: not supported"),
            (SVC.replace("spec:\n", "spec:\n  clusterIPs: [10.96.0.11]\n"), "spec.clusterIPs[0]: 10.96.0.11 must equal spec.clusterIP 10.96.0.10"),
            (SVC.replace("spec:\n", "spec:\n  clusterIPs: [10.96.0.10, 10.96.0.11]\n"), "spec.clusterIPs[1]: 10.96.0.11: two addresses of one family"),
            (SVC.replace("name: web", "name: Web"), "metadata.name: \"Web\" is not valid"),
            (SVC.replace("name: web", "name: web\n  namespace: Shop"), "metadata.namespace: \"Shop\" is not a valid namespace"),
            (format!("{SVC}status:\n  loadBalancer:\n    ingress:\n    - ip: 192.0.2.1\n"), "status.loadBalancer.ingress: only valid for type LoadBalancer"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "want {want:?}\n got {e:?}\n for {text}");
        }
    }

    /// Kubernetes' address rules (and twill's stricter ones), for every field that names an
    /// address: each refused value is named with its field.
    #[test]
    fn special_addresses_are_refused_in_every_address_field() {
        let bad = [
            ("0.0.0.0", "may not be unspecified"),
            ("::", "may not be unspecified"),
            ("127.0.0.1", "loopback range"),
            ("127.1.2.3", "loopback range"),
            ("::1", "loopback range"),
            ("169.254.169.254", "link-local range"),
            ("fe80::1", "link-local range"),
            ("224.0.0.1", "multicast"),
            ("239.1.2.3", "multicast"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::ffff:10.96.0.10", "IPv4-mapped"),
        ];
        let lb = "apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.12\n  ports: [{port: 80}]\n";
        for (ip, why) in bad {
            let v6 = ip.contains(':');
            let cip = if v6 { "fd00::10" } else { "10.96.0.10" };
            let svc = SVC.replace("10.96.0.10", cip);
            let cases = [
                (svc.replace(cip, &format!("\"{ip}\"")), "spec.clusterIP"),
                (
                    svc.replace(
                        "spec:\n",
                        &format!("spec:\n  clusterIPs: [\"{ip}\"]\n  clusterIP: \"\"\n"),
                    )
                    .replace(&format!("  clusterIP: {cip}\n"), ""),
                    "spec.clusterIP",
                ),
                (
                    svc.replace("spec:\n", &format!("spec:\n  externalIPs: [\"{ip}\"]\n")),
                    "spec.externalIPs[0]",
                ),
                (
                    svc.replace("spec:\n", &format!("spec:\n  loadBalancerIP: \"{ip}\"\n")),
                    "spec.loadBalancerIP",
                ),
                (
                    format!("{lb}status:\n  loadBalancer:\n    ingress:\n    - ip: \"{ip}\"\n"),
                    "status.loadBalancer.ingress[0].ip",
                ),
                (
                    SLICE
                        .replace("[10.244.1.5]", &format!("[\"{ip}\"]"))
                        .replace("IPv4", if v6 { "IPv6" } else { "IPv4" }),
                    "endpoints[0].addresses[0]",
                ),
            ];
            for (text, field) in cases {
                let e = err(&text);
                assert!(
                    e.contains(&format!("{field}: {ip} ")) && e.contains(why),
                    "{ip} in {field}: got {e:?}"
                );
            }
        }
        // Only the first endpoint address is used, but every one is checked, as Kubernetes does.
        let two = SLICE.replace("[10.244.1.5]", "[10.244.1.5, 127.0.0.1]");
        assert!(
            err(&two)
                .contains("endpoints[0].addresses[1]: 127.0.0.1 may not be in the loopback range")
        );
        // Octal-looking octets never parse (Kubernetes 1.33's strict rule).
        assert!(
            err(&SVC.replace("10.96.0.10", "010.96.0.10"))
                .contains("spec.clusterIP: \"010.96.0.10\" is not an IP address")
        );
        // Ordinary unicast addresses pass, in every family and range the rig and users use.
        for ip in [
            "10.96.0.10",
            "198.18.0.1",
            "192.0.2.1",
            "100.64.0.1",
            "fd00::10",
            "2001:db8::1",
        ] {
            let cip = if ip.contains(':') {
                "fd00::99"
            } else {
                "10.96.0.99"
            };
            let text = SVC
                .replace("10.96.0.10", cip)
                .replace("spec:\n", &format!("spec:\n  externalIPs: [\"{ip}\"]\n"));
            assert!(
                parse_manifest(&text).is_ok(),
                "{ip}: {:?}",
                parse_manifest(&text)
            );
        }
        assert_eq!(special_ip("172.16.0.1".parse().unwrap()), None);
        assert_eq!(
            special_ip("0.1.2.3".parse().unwrap()),
            None,
            "only 0.0.0.0 itself, as Kubernetes"
        );
    }

    #[test]
    fn service_defaults_and_accessors() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec:\n  type: LoadBalancer\n  clusterIP: fd00::10\n  clusterIPs: [fd00::10, 10.96.0.12]\n  externalIPs: [192.0.2.7]\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  sessionAffinity: ClientIP\n  ports:\n  - port: 443\n    targetPort: \"8443\"\nstatus:\n  loadBalancer:\n    ingress:\n    - ip: 203.0.113.5\n    - ip: 203.0.113.6\n      ipMode: Proxy\n    - hostname: lb.example\n";
        let objs = parse_manifest(text).unwrap();
        let Object::Service(s) = &objs[0] else {
            panic!()
        };
        assert_eq!(s.metadata.namespace, "default");
        assert_eq!(s.cluster_ips().len(), 2);
        assert_eq!(
            s.affinity_timeout_secs(),
            Some(DEFAULT_AFFINITY_TIMEOUT_SECS)
        );
        assert!(s.external_local() && s.internal_local());
        assert_eq!(
            s.lb_ingress_ips(),
            vec!["203.0.113.5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            s.external_ips(),
            vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(s.spec.ports[0].target(), TargetPort::Number(8443));
        assert_eq!(s.spec.ports[0].node_port(), None);
        // Headless and ExternalName: valid, no frontends.
        let h = "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec:\n  clusterIP: None\n  clusterIPs: [None]\n";
        let Object::Service(s) = &parse_manifest(h).unwrap()[0] else {
            panic!()
        };
        assert!(s.is_headless() && !s.has_frontends() && s.cluster_ips().is_empty());
        let x = "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  type: ExternalName\n  externalName: db.example\n";
        let Object::Service(s) = &parse_manifest(x).unwrap()[0] else {
            panic!()
        };
        assert!(!s.has_frontends());
    }

    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nendpoints:\n- addresses: [10.244.1.5]\n  nodeName: node-1\nports:\n- port: 8080\n";

    #[test]
    fn endpoint_slice_validation() {
        let objs = parse_manifest(SLICE).unwrap();
        let Object::EndpointSlice(e) = &objs[0] else {
            panic!()
        };
        assert!(
            e.endpoints[0].ready() && e.endpoints[0].serving() && !e.endpoints[0].terminating()
        );
        assert_eq!(e.ports[0].name, None);
        let empty = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nendpoints: null\nports: null\n";
        assert!(parse_manifest(empty).is_ok());
        let cases = [
            (
                SLICE.replace("  labels:\n    kubernetes.io/service-name: web\n", ""),
                "metadata.labels[kubernetes.io/service-name]: required",
            ),
            (
                SLICE.replace("10.244.1.5", "fd00::5"),
                "endpoints[0].addresses[0]: fd00::5 does not match addressType IPv4",
            ),
            (
                SLICE.replace("[10.244.1.5]", "[]"),
                "endpoints[0].addresses: at least one address is required",
            ),
            (
                SLICE.replace("port: 8080", "port: 0"),
                "ports[0].port: 0 is not a valid port",
            ),
            (
                SLICE.replace("addressType: IPv4", "addressType: IPv5"),
                "addressType: unknown variant `IPv5`",
            ),
            (
                SLICE.replace("  nodeName: node-1\n", "  conditions: {redy: true}\n"),
                "endpoints[0].conditions.redy: unknown field `redy`",
            ),
            (
                SLICE.replace("- port: 8080", "- port: 8080\n- port: 8081"),
                "ports[1].name: \"\"/TCP duplicates ports[0]",
            ),
            (
                SLICE.replace("addressType: IPv4\n", ""),
                "missing field `addressType`",
            ),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "want {want:?}\n got {e:?}");
        }
    }
}
