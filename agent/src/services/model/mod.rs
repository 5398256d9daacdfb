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

mod parse;
mod types;
mod validate;

pub use self::parse::{endpoint_slice_from_json, parse_manifest, service_from_json};
pub use self::types::{
    AddressType, ClientIpConfig, Endpoint, EndpointConditions, EndpointPort, EndpointSlice,
    IntOrString, IpMode, LoadBalancerIngress, LoadBalancerStatus, ObjectMeta, Protocol, Service,
    ServicePort, ServiceSpec, ServiceStatus, ServiceType, SessionAffinity, SessionAffinityConfig,
    TrafficPolicy,
};
pub use self::validate::{TargetPort, special_ip};

use std::fmt;

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

#[cfg(test)]
mod tests;
