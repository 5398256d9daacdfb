//! The wire types: the fields of a Service and an EndpointSlice as the API server writes
//! them, typed where twill uses them and accepted-and-dropped ([`Ignored`]) where it does not.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

// Wire types.

/// A field twill accepts and drops: deserialises anything, compares equal, never serialises.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Ignored;

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

pub(super) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
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
    pub(super) annotations: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) generate_name: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) self_link: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) uid: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) resource_version: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) generation: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) creation_timestamp: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) deletion_timestamp: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) deletion_grace_period_seconds: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) owner_references: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) finalizers: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) managed_fields: Ignored,
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
    pub(super) app_protocol: Ignored,
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
    pub(super) selector: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) ip_families: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) ip_family_policy: Ignored,
    /// Deprecated in Kubernetes and not programmed by twill (the ingress IPs in
    /// `status.loadBalancer` are), but validated like every other service address.
    #[serde(rename = "loadBalancerIP", default, skip_serializing)]
    pub(super) load_balancer_ip: Option<String>,
    #[serde(default, skip_serializing)]
    pub(super) load_balancer_class: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) allocate_load_balancer_node_ports: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) health_check_node_port: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) publish_not_ready_addresses: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) traffic_distribution: Ignored,
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
    pub(super) ports: Ignored,
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
    pub(super) conditions: Ignored,
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
    pub(super) hostname: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) hints: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) target_ref: Ignored,
    #[serde(default, skip_serializing)]
    pub(super) deprecated_topology: Ignored,
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
    pub(super) app_protocol: Ignored,
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
