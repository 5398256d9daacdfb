//! flannel's node annotations: how a node's lease is published on its Node object in
//! kube-subnet-mgr mode, read back into a [`Lease`], and what to patch when it is stale.
//!
//! Why this shape:
//! - The names, values and update rule are flannel's (`pkg/subnet/kube/annotations.go`,
//!   `kube.go`): `<prefix>/backend-type`, `backend-data` (the backend's JSON as flannel
//!   marshals it, `null` for host-gw), `public-ip`, `kube-subnet-manager: "true"`, and for IPv6
//!   `backend-v6-data` and `public-ipv6`. A flannel node and a twill node read each other's
//!   Nodes as peers because both write and read exactly these.
//! - Pure functions over plain data (annotations, `podCIDRs`), so the encoding is unit tested
//!   without an API server; [`super::subnet`] does the I/O.
//! - Where flannel fails hard and twill can do better without changing what peers see, twill is
//!   lenient and says so in the log: a `podCIDR` of a family the network config does not enable
//!   is ignored (flannel refuses a dual-stack Node under an IPv4-only config).
//! - Not supported: flannel's `public-ip-overwrite` annotations (set `--public-ip` instead).

use std::collections::BTreeMap;
use std::net::{AddrParseError, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;

use crate::overlay::config::NetworkConfig;
use crate::overlay::lease::{Lease, LeaseAttrs, LeaseSubnets};

/// flannel's default annotation prefix (`--kube-annotation-prefix`).
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// What is wrong with a Node, an annotation or the prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    /// `--kube-annotation-prefix` is not `fqdn[/name]`.
    #[error(
        "annotation prefix {0:?} is invalid: it must be a domain name, optionally followed by one '/' and lower-case letters, digits, '-' or '_'"
    )]
    BadPrefix(String),
    /// The Node has no `podCIDR` of a family the network config enables.
    #[error(
        "node {node} has no IPv{family} podCIDR (spec.podCIDRs: {cidrs:?}); is the controller manager's --allocate-node-cidrs on?"
    )]
    NoPodCidr {
        /// The node.
        node: String,
        /// 4 or 6.
        family: u8,
        /// What the node has.
        cidrs: Vec<String>,
    },
    /// A `podCIDR` does not parse.
    #[error("node {node}: spec.podCIDRs entry {value:?} is not a CIDR")]
    BadPodCidr {
        /// The node.
        node: String,
        /// The value.
        value: String,
    },
    /// More than two `podCIDRs`, or two of one family.
    #[error("node {node}: spec.podCIDRs {cidrs:?} must be one IPv4 and/or one IPv6 CIDR")]
    TooManyPodCidrs {
        /// The node.
        node: String,
        /// What the node has.
        cidrs: Vec<String>,
    },
    /// The `podCIDR` lies outside the network config's `Network`.
    #[error("node {node}: podCIDR {cidr} is outside the network config's {field} {network}")]
    OutsideNetwork {
        /// The node.
        node: String,
        /// Its podCIDR.
        cidr: IpNet,
        /// `Network` or `IPv6Network`.
        field: &'static str,
        /// The network.
        network: IpNet,
    },
    /// An annotation of a node does not parse.
    #[error("node {node}: annotation {key}={value:?} is invalid: {reason}")]
    BadAnnotation {
        /// The node.
        node: String,
        /// The annotation's key.
        key: String,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// The annotation keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotations {
    /// `<prefix>kube-subnet-manager`: `"true"` on nodes managed in this mode.
    pub kube_subnet_manager: String,
    /// `<prefix>backend-type`.
    pub backend_type: String,
    /// `<prefix>backend-data`.
    pub backend_data: String,
    /// `<prefix>backend-v6-data`.
    pub backend_v6_data: String,
    /// `<prefix>public-ip`.
    pub public_ip: String,
    /// `<prefix>public-ipv6`.
    pub public_ipv6: String,
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

impl Annotations {
    /// The keys for `prefix`, normalised as flannel does: `example.com` becomes `example.com/`,
    /// `example.com/twill` becomes `example.com/twill-`.
    pub fn new(prefix: &str) -> Result<Self, AnnotationError> {
        let bad = || AnnotationError::BadPrefix(prefix.to_string());
        let mut p = prefix.to_string();
        match p.matches('/').count() {
            0 => p.push('/'),
            1 => {}
            _ => return Err(bad()),
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        let (domain, name) = p.split_once('/').ok_or_else(bad)?;
        let labels: Vec<&str> = domain.split('.').collect();
        let domain_ok = labels.len() >= 2
            && labels
                .iter()
                .all(|l| !l.is_empty() && l.bytes().all(is_name_char));
        let name_ok = name.is_empty() || (name.ends_with('-') && name.bytes().all(is_name_char));
        if !domain_ok || !name_ok {
            return Err(bad());
        }
        let key = |k: &str| format!("{p}{k}");
        Ok(Annotations {
            kube_subnet_manager: key("kube-subnet-manager"),
            backend_type: key("backend-type"),
            backend_data: key("backend-data"),
            backend_v6_data: key("backend-v6-data"),
            public_ip: key("public-ip"),
            public_ipv6: key("public-ipv6"),
        })
    }
}

fn node_name(node: &Node) -> String {
    node.metadata.name.clone().unwrap_or_default()
}

/// `spec.podCIDRs` (or the older `spec.podCIDR`) as written.
pub fn pod_cidr_strings(node: &Node) -> Vec<String> {
    let spec = node.spec.as_ref();
    match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(list) if !list.is_empty() => list.clone(),
        _ => spec
            .and_then(|s| s.pod_cidr.clone())
            .filter(|c| !c.is_empty())
            .into_iter()
            .collect(),
    }
}

/// The node's pod CIDRs, one per family at most.
pub fn pod_cidrs(node: &Node) -> Result<(Option<Ipv4Net>, Option<Ipv6Net>), AnnotationError> {
    let cidrs = pod_cidr_strings(node);
    let (mut v4, mut v6) = (None, None);
    let too_many = || AnnotationError::TooManyPodCidrs {
        node: node_name(node),
        cidrs: cidrs.clone(),
    };
    if cidrs.len() > 2 {
        return Err(too_many());
    }
    for c in &cidrs {
        let net: IpNet = c.parse().map_err(|_| AnnotationError::BadPodCidr {
            node: node_name(node),
            value: c.clone(),
        })?;
        let dup = match net.trunc() {
            IpNet::V4(n) => v4.replace(n).is_some(),
            IpNet::V6(n) => v6.replace(n).is_some(),
        };
        if dup {
            return Err(too_many());
        }
    }
    Ok((v4, v6))
}

/// The subnets a node holds under `cfg`: its pod CIDRs of the enabled families.
pub fn node_subnets(cfg: &NetworkConfig, node: &Node) -> Result<LeaseSubnets, AnnotationError> {
    let (v4, v6) = pod_cidrs(node)?;
    let missing = |family| AnnotationError::NoPodCidr {
        node: node_name(node),
        family,
        cidrs: pod_cidr_strings(node),
    };
    let s = LeaseSubnets {
        v4: if cfg.enable_ipv4 {
            Some(v4.ok_or_else(|| missing(4))?)
        } else {
            None
        },
        v6: if cfg.enable_ipv6 {
            Some(v6.ok_or_else(|| missing(6))?)
        } else {
            None
        },
    };
    Ok(s)
}

/// [`node_subnets`], checked against the network config (flannel's `containsCIDR`).
pub fn own_subnets(cfg: &NetworkConfig, node: &Node) -> Result<LeaseSubnets, AnnotationError> {
    let s = node_subnets(cfg, node)?;
    let outside = |cidr: IpNet, field, network: IpNet| AnnotationError::OutsideNetwork {
        node: node_name(node),
        cidr,
        field,
        network,
    };
    if let (Some(sn), Some(net)) = (s.v4, cfg.network)
        && !(net.prefix_len() <= sn.prefix_len() && net.contains(&sn.network()))
    {
        return Err(outside(sn.into(), "Network", net.into()));
    }
    if let (Some(sn), Some(net)) = (s.v6, cfg.ipv6_network)
        && !(net.prefix_len() <= sn.prefix_len() && net.contains(&sn.network()))
    {
        return Err(outside(sn.into(), "IPv6Network", net.into()));
    }
    Ok(s)
}

/// A backend data annotation's value: the JSON as flannel marshals it (`null` when absent).
pub fn encode_data(data: Option<&serde_json::Value>) -> String {
    data.map_or_else(
        || "null".to_string(),
        |v| serde_json::to_string(v).expect("JSON values serialise"),
    )
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Why annotation `key` of `node`, set to `value`, is refused.
fn bad_annotation(node: &Node, key: &str, value: &str, reason: String) -> AnnotationError {
    AnnotationError::BadAnnotation {
        node: node_name(node),
        key: key.to_string(),
        value: value.to_string(),
        reason,
    }
}

/// The address in annotation `key` of `node` (absent reads as empty, so it is refused too).
fn address<A: FromStr<Err = AddrParseError>>(node: &Node, key: &str) -> Result<A, AnnotationError> {
    let v = annotation(node, key).unwrap_or_default();
    v.parse()
        .map_err(|e: AddrParseError| bad_annotation(node, key, v, e.to_string()))
}

/// The lease a Node publishes (flannel's `nodeToLease`): `Ok(None)` when the node is not
/// managed in this mode (no `kube-subnet-manager: "true"`), an error when it is but an
/// annotation or its `podCIDRs` are unusable.
pub fn node_lease(
    a: &Annotations,
    cfg: &NetworkConfig,
    node: &Node,
) -> Result<Option<Lease>, AnnotationError> {
    if annotation(node, &a.kube_subnet_manager) != Some("true") {
        return Ok(None);
    }
    let subnets = node_subnets(cfg, node)?;
    let data = |key: &str| -> Result<Option<serde_json::Value>, AnnotationError> {
        match annotation(node, key) {
            None | Some("") => Ok(None),
            Some(v) => serde_json::from_str::<Option<serde_json::Value>>(v)
                .map_err(|e| bad_annotation(node, key, v, format!("not JSON: {e}"))),
        }
    };
    let mut attrs = LeaseAttrs {
        public_ip: None,
        public_ipv6: None,
        backend_type: annotation(node, &a.backend_type)
            .unwrap_or_default()
            .to_string(),
        backend_data: None,
        backend_v6_data: None,
        node_id: None,
    };
    if cfg.enable_ipv4 {
        attrs.public_ip = Some(address(node, &a.public_ip)?);
        attrs.backend_data = data(&a.backend_data)?;
    }
    if cfg.enable_ipv6 {
        attrs.public_ipv6 = Some(address(node, &a.public_ipv6)?);
        attrs.backend_v6_data = data(&a.backend_v6_data)?;
    }
    Ok(Some(Lease {
        subnets,
        attrs,
        expires: None,
    }))
}

/// The annotations to patch on our Node so that it publishes `attrs` (flannel's
/// `AcquireLease`): empty when they are already there. Like flannel, a change of any published
/// value rewrites the whole set; IPv4 values are written except for a VXLAN node without IPv4
/// data, IPv6 values for VXLAN with IPv6 data and for host-gw with an IPv6 address.
pub fn annotation_patch(
    a: &Annotations,
    attrs: &LeaseAttrs,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let get = |k: &str| current.get(k).map_or("", String::as_str);
    let bd = encode_data(attrs.backend_data.as_ref());
    let v6bd = encode_data(attrs.backend_v6_data.as_ref());
    let public_ip = attrs.public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED).to_string();
    let public_ipv6 = attrs.public_ipv6.map(|ip| ip.to_string());
    let managed = get(&a.kube_subnet_manager) == "true";
    let same_type = get(&a.backend_type) == attrs.backend_type;
    let v4_stale = get(&a.backend_data) != bd || !same_type || get(&a.public_ip) != public_ip;
    let v6_stale = public_ipv6.as_deref().is_some_and(|ip| {
        get(&a.backend_v6_data) != v6bd || !same_type || get(&a.public_ipv6) != ip
    });
    let mut patch = BTreeMap::new();
    if managed && !v4_stale && !v6_stale {
        return patch;
    }
    let vxlan = attrs.backend_type == "vxlan";
    patch.insert(a.backend_type.clone(), attrs.backend_type.clone());
    if !vxlan || bd != "null" {
        patch.insert(a.backend_data.clone(), bd);
        patch.insert(a.public_ip.clone(), public_ip);
    }
    let v6 =
        (vxlan && v6bd != "null") || (attrs.backend_type == "host-gw" && public_ipv6.is_some());
    if v6 {
        patch.insert(a.backend_v6_data.clone(), v6bd);
        patch.insert(
            a.public_ipv6.clone(),
            public_ipv6.unwrap_or_else(|| Ipv6Addr::UNSPECIFIED.to_string()),
        );
    }
    patch.insert(a.kube_subnet_manager.clone(), "true".to_string());
    patch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).unwrap()
    }

    const V4: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
    const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;

    /// A Node as a 1.33 API server returns one that flannel (v0.26) has annotated.
    fn flannel_node() -> Node {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": "worker-1",
                "uid": "0b1c43c3-9a57-4c43-a6b3-0d3c2f1f9d11",
                "resourceVersion": "81723",
                "creationTimestamp": "2025-05-02T09:14:07Z",
                "labels": {"kubernetes.io/hostname": "worker-1", "kubernetes.io/os": "linux"},
                "annotations": {
                    "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"6e:2c:9a:41:0b:7e\"}",
                    "flannel.alpha.coreos.com/backend-type": "vxlan",
                    "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                    "flannel.alpha.coreos.com/public-ip": "192.168.56.11",
                    "flannel.alpha.coreos.com/backend-v6-data": "{\"VNI\":1,\"VtepMAC\":\"7a:01:5c:33:d0:02\"}",
                    "flannel.alpha.coreos.com/public-ipv6": "fd56::11",
                    "node.alpha.kubernetes.io/ttl": "0",
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true"
                }
            },
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.56.11"}]}
        }))
        .unwrap()
    }

    #[test]
    fn prefixes_normalise_as_flannel() {
        let a = Annotations::new(DEFAULT_PREFIX).unwrap();
        assert_eq!(a.public_ip, "flannel.alpha.coreos.com/public-ip");
        assert_eq!(a.public_ipv6, "flannel.alpha.coreos.com/public-ipv6");
        assert_eq!(
            a.kube_subnet_manager,
            "flannel.alpha.coreos.com/kube-subnet-manager"
        );
        let b = Annotations::new("example.com/twill").unwrap();
        assert_eq!(b.backend_data, "example.com/twill-backend-data");
        assert_eq!(
            Annotations::new("example.com/twill-").unwrap().backend_type,
            "example.com/twill-backend-type"
        );
        for bad in ["a/b/c", "localhost", "Example.com", "example.com/Tw", ""] {
            assert_eq!(
                Annotations::new(bad).unwrap_err(),
                AnnotationError::BadPrefix(bad.to_string()),
                "{bad}"
            );
        }
    }

    #[test]
    fn reads_a_node_flannel_annotated() {
        let a = Annotations::new(DEFAULT_PREFIX).unwrap();
        let l = node_lease(&a, &cfg(V4), &flannel_node()).unwrap().unwrap();
        assert_eq!(l.subnets.key(), "10.244.1.0-24");
        assert_eq!(l.attrs.public_ip, Some("192.168.56.11".parse().unwrap()));
        assert_eq!(l.attrs.backend_type, "vxlan");
        let vx = l.attrs.vxlan(false).unwrap();
        assert_eq!((vx.vni, vx.vtep_mac.as_str()), (1, "6e:2c:9a:41:0b:7e"));
        assert_eq!(l.attrs.public_ipv6, None, "IPv6 not enabled");
        // Dual stack: both families, as one lease.
        let l = node_lease(&a, &cfg(DUAL), &flannel_node())
            .unwrap()
            .unwrap();
        assert_eq!(l.subnets.key(), "10.244.1.0-24&fd00:10:244:1::-64");
        assert_eq!(l.attrs.public_ipv6, Some("fd56::11".parse().unwrap()));
        assert_eq!(l.attrs.vxlan(true).unwrap().vtep_mac, "7a:01:5c:33:d0:02");
    }

    #[test]
    fn unmanaged_and_broken_nodes() {
        let a = Annotations::new(DEFAULT_PREFIX).unwrap();
        let mut n = flannel_node();
        n.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove("flannel.alpha.coreos.com/kube-subnet-manager");
        assert_eq!(node_lease(&a, &cfg(V4), &n).unwrap(), None);

        let mut n = flannel_node();
        n.metadata.annotations.as_mut().unwrap().insert(
            "flannel.alpha.coreos.com/public-ip".into(),
            "192.168.56".into(),
        );
        let e = node_lease(&a, &cfg(V4), &n).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "node worker-1: annotation flannel.alpha.coreos.com/public-ip=\"192.168.56\" is invalid"
            ),
            "{e}"
        );

        let mut n = flannel_node();
        n.metadata.annotations.as_mut().unwrap().insert(
            "flannel.alpha.coreos.com/backend-data".into(),
            "{VNI".into(),
        );
        assert!(matches!(
            node_lease(&a, &cfg(V4), &n),
            Err(AnnotationError::BadAnnotation { .. })
        ));

        // host-gw writes "null" backend data: no data, a valid lease.
        let mut n = flannel_node();
        let ann = n.metadata.annotations.as_mut().unwrap();
        ann.insert(
            "flannel.alpha.coreos.com/backend-data".into(),
            "null".into(),
        );
        ann.insert(
            "flannel.alpha.coreos.com/backend-type".into(),
            "host-gw".into(),
        );
        let l = node_lease(&a, &cfg(V4), &n).unwrap().unwrap();
        assert_eq!(l.attrs.backend_data, None);
    }

    #[test]
    fn pod_cidrs_are_checked() {
        let mut n = flannel_node();
        n.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.1.0/24".into()]);
        let e = own_subnets(&cfg(DUAL), &n).unwrap_err();
        assert!(
            matches!(e, AnnotationError::NoPodCidr { family: 6, .. }),
            "{e}"
        );
        n.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.245.1.0/24".into()]);
        assert_eq!(
            own_subnets(&cfg(V4), &n).unwrap_err().to_string(),
            "node worker-1: podCIDR 10.245.1.0/24 is outside the network config's Network 10.244.0.0/16"
        );
        n.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.0.0/15".into()]);
        assert!(
            own_subnets(&cfg(V4), &n).is_err(),
            "larger than the network"
        );
        n.spec.as_mut().unwrap().pod_cidrs = Some(vec!["banana".into()]);
        assert!(matches!(
            own_subnets(&cfg(V4), &n),
            Err(AnnotationError::BadPodCidr { .. })
        ));
        n.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["10.244.1.0/24".into(), "10.244.2.0/24".into()]);
        assert!(matches!(
            own_subnets(&cfg(V4), &n),
            Err(AnnotationError::TooManyPodCidrs { .. })
        ));
        // Only the older field: still read.
        n.spec.as_mut().unwrap().pod_cidrs = None;
        assert_eq!(own_subnets(&cfg(V4), &n).unwrap().key(), "10.244.1.0-24");
        // A family the config does not enable is ignored (flannel would refuse the node).
        let v6only = cfg(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#,
        );
        assert_eq!(
            own_subnets(&v6only, &flannel_node()).unwrap().key(),
            "fd00:10:244:1::-64"
        );
    }

    fn attrs(kind: &str, data: Option<serde_json::Value>, v6: bool) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Some("198.18.0.11".parse().unwrap()),
            public_ipv6: v6.then(|| "fd74:7769::11".parse().unwrap()),
            backend_type: kind.into(),
            backend_data: data.clone(),
            backend_v6_data: if v6 { data } else { None },
            node_id: None,
        }
    }

    #[test]
    fn patch_writes_flannel_values_then_nothing() {
        let a = Annotations::new(DEFAULT_PREFIX).unwrap();
        let vx = serde_json::json!({"VNI": 1, "VtepMAC": "0e:00:00:00:00:01"});
        let at = attrs("vxlan", Some(vx), false);
        let p = annotation_patch(&a, &at, &BTreeMap::new());
        let want: BTreeMap<String, String> = [
            ("backend-data", r#"{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}"#),
            ("backend-type", "vxlan"),
            ("kube-subnet-manager", "true"),
            ("public-ip", "198.18.0.11"),
        ]
        .into_iter()
        .map(|(k, v)| (format!("flannel.alpha.coreos.com/{k}"), v.to_string()))
        .collect();
        assert_eq!(p, want);
        // Applied: nothing more to do; a node's other annotations do not matter.
        let mut current = p.clone();
        current.insert("node.alpha.kubernetes.io/ttl".into(), "0".into());
        assert!(annotation_patch(&a, &at, &current).is_empty());
        // A new VTEP MAC after a restart: rewritten.
        let at2 = attrs(
            "vxlan",
            Some(serde_json::json!({"VNI": 1, "VtepMAC": "0e:00:00:00:00:02"})),
            false,
        );
        assert!(annotation_patch(&a, &at2, &current).contains_key(&a.backend_data));
        // The result reads back as the lease it publishes.
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "annotations": current},
            "spec": {"podCIDRs": ["10.244.7.0/24"]}
        }))
        .unwrap();
        let l = node_lease(&a, &cfg(V4), &node).unwrap().unwrap();
        assert_eq!(l.attrs, at);
    }

    #[test]
    fn patch_for_host_gw_and_dual_stack() {
        let a = Annotations::new(DEFAULT_PREFIX).unwrap();
        let p = annotation_patch(&a, &attrs("host-gw", None, false), &BTreeMap::new());
        assert_eq!(p[&a.backend_data], "null");
        assert_eq!(p[&a.public_ip], "198.18.0.11");
        assert!(!p.contains_key(&a.public_ipv6));
        let p = annotation_patch(&a, &attrs("host-gw", None, true), &BTreeMap::new());
        assert_eq!(p[&a.public_ipv6], "fd74:7769::11");
        assert_eq!(p[&a.backend_v6_data], "null");
        let vx = serde_json::json!({"VNI": 4, "VtepMAC": "0e:00:00:00:00:03"});
        let p = annotation_patch(&a, &attrs("vxlan", Some(vx), true), &BTreeMap::new());
        assert_eq!(
            p[&a.backend_v6_data],
            r#"{"VNI":4,"VtepMAC":"0e:00:00:00:00:03"}"#
        );
        // Up to date in IPv4 but the IPv6 address changed: rewritten.
        let mut current = p.clone();
        current.insert(a.public_ipv6.clone(), "fd74:7769::99".into());
        let vx = serde_json::json!({"VNI": 4, "VtepMAC": "0e:00:00:00:00:03"});
        assert!(!annotation_patch(&a, &attrs("vxlan", Some(vx), true), &current).is_empty());
    }
}
