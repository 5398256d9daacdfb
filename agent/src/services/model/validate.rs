//! Validation: names, ports, addresses and the combinations standalone mode can program,
//! with messages that say what is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::types::{
    AddressType, Endpoint, EndpointSlice, IntOrString, IpMode, ObjectMeta, Protocol, Service,
    ServicePort, ServiceType, SessionAffinity, TrafficPolicy,
};
use super::{
    DEFAULT_AFFINITY_TIMEOUT_SECS, FieldError, Kind, MAX_AFFINITY_TIMEOUT_SECS, SERVICE_NAME_LABEL,
    bad, namespace_or_default,
};
use crate::services::lb::Proto;

// Validation.

pub(super) fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Records that entry `i` of a list has `key`: an error on `field`, worded by `duplicates` from
/// the index of the earlier entry, when one had the same key.
fn first_at<K: Ord>(
    seen: &mut BTreeMap<K, usize>,
    key: K,
    i: usize,
    field: String,
    duplicates: impl FnOnce(usize) -> String,
) -> Result<(), FieldError> {
    match seen.insert(key, i) {
        Some(j) => Err(bad(field, duplicates(j))),
        None => Ok(()),
    }
}

pub(super) fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

pub(super) fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// IANA service name: ≤ 15 characters, lower-case letters, digits and single hyphens, at least
/// one letter (Kubernetes' rule for port names).
pub(super) fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

pub(super) fn port_number(field: &str, v: i64) -> Result<u16, FieldError> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad(field, format!("{v} is not a valid port (1-65535)")))
}

pub(super) fn parse_ip(field: &str, s: &str) -> Result<IpAddr, FieldError> {
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
    let (link_local, broadcast, v4_mapped) = match ip {
        IpAddr::V4(a) => (a.is_link_local(), a.is_broadcast(), false),
        IpAddr::V6(a) => (
            a.is_unicast_link_local(),
            false,
            a.to_ipv4_mapped().is_some(),
        ),
    };
    // The first rule an address breaks names it: an IPv4-mapped address is refused as such.
    [
        (
            v4_mapped,
            "must not be an IPv4-mapped IPv6 address (write the IPv4 address)",
        ),
        (ip.is_unspecified(), "may not be unspecified (0.0.0.0, ::)"),
        (
            ip.is_loopback(),
            "may not be in the loopback range (127.0.0.0/8, ::1/128)",
        ),
        (
            link_local,
            "may not be in the link-local range (169.254.0.0/16, fe80::/10)",
        ),
        (
            ip.is_multicast(),
            "may not be a multicast address (224.0.0.0/4, ff00::/8)",
        ),
        (broadcast, "may not be the broadcast address"),
    ]
    .into_iter()
    .find_map(|(breaks, why)| breaks.then_some(why))
}

/// Parses a service or endpoint address and refuses the [`special_ip`]s, naming the field.
pub(super) fn service_ip(field: &str, s: &str) -> Result<IpAddr, FieldError> {
    let ip = parse_ip(field, s)?;
    match special_ip(ip) {
        Some(why) => Err(bad(field, format!("{s} {why}"))),
        None => Ok(ip),
    }
}

pub(super) fn validate_meta(m: &mut ObjectMeta, kind: Kind) -> Result<(), FieldError> {
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

pub(super) fn protocol_of(field: &str, p: Option<Protocol>) -> Result<Proto, FieldError> {
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
                    first_at(&mut seen_names, n, i, f("name"), |j| {
                        format!("{n:?} duplicates spec.ports[{j}].name")
                    })?;
                }
            }
            first_at(&mut seen_ports, (port, proto), i, f("port"), |j| {
                format!("{port}/{proto} duplicates spec.ports[{j}]")
            })?;
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
            first_at(&mut names, (name, proto), i, f("name"), |j| {
                format!("{name:?}/{proto} duplicates ports[{j}]")
            })?;
        }
        Ok(())
    }
}
