//! Builders for the Kubernetes objects the suites feed twill: a Service as `kubectl apply` sends
//! it and its EndpointSlice as the EndpointSlice controller writes it.
//!
//! One description, two renderings: JSON values for the stand-in API server
//! ([`crate::apiserver::ApiServer::apply`]) and a manifest for `twilld apply -f`
//! ([`crate::Rig::apply_manifest`]), which is the same objects as YAML documents (JSON is YAML).
//! A test says what differs (ports, node ports, external IPs, policies, endpoints and their
//! nodes); the rest is what a real cluster fills in, so twill sees the objects it meets in one.

use std::net::IpAddr;

use serde_json::{Map, Value, json};

/// A Service and its one EndpointSlice.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    name: String,
    namespace: String,
    cluster_ip: IpAddr,
    node_port_type: bool,
    ports: Vec<PortSpec>,
    external_ips: Vec<IpAddr>,
    external_local: bool,
    client_ip_affinity: bool,
    labels: Map<String, Value>,
    slice_name: String,
    endpoints: Vec<(IpAddr, Option<String>)>,
}

#[derive(Debug, Clone)]
struct PortSpec {
    name: String,
    protocol: &'static str,
    port: u16,
    target_port: u16,
    node_port: Option<u16>,
}

impl ServiceSpec {
    /// Service `name` in namespace `default`, type ClusterIP at `cluster_ip`, no ports and no
    /// endpoints yet; its slice is `<name>-1`.
    pub fn new(name: &str, cluster_ip: IpAddr) -> ServiceSpec {
        ServiceSpec {
            name: name.to_string(),
            namespace: "default".to_string(),
            cluster_ip,
            node_port_type: false,
            ports: Vec::new(),
            external_ips: Vec::new(),
            external_local: false,
            client_ip_affinity: false,
            labels: Map::new(),
            slice_name: format!("{name}-1"),
            endpoints: Vec::new(),
        }
    }

    /// In namespace `namespace`.
    #[must_use]
    pub fn namespace(mut self, namespace: &str) -> ServiceSpec {
        self.namespace = namespace.to_string();
        self
    }

    /// A TCP port `name`: `port` on the Service, `target_port` on the endpoints.
    #[must_use]
    pub fn tcp(self, name: &str, port: u16, target_port: u16) -> ServiceSpec {
        self.port(name, "TCP", port, target_port)
    }

    /// A UDP port `name`: `port` on the Service, `target_port` on the endpoints.
    #[must_use]
    pub fn udp(self, name: &str, port: u16, target_port: u16) -> ServiceSpec {
        self.port(name, "UDP", port, target_port)
    }

    fn port(mut self, name: &str, protocol: &'static str, port: u16, target: u16) -> ServiceSpec {
        self.ports.push(PortSpec {
            name: name.to_string(),
            protocol,
            port,
            target_port: target,
            node_port: None,
        });
        self
    }

    /// Node port `node_port` for the port added last; the Service becomes type NodePort.
    #[must_use]
    pub fn node_port(mut self, node_port: u16) -> ServiceSpec {
        let last = self
            .ports
            .last_mut()
            .expect("add a port before its node port");
        last.node_port = Some(node_port);
        self.node_port_type = true;
        self
    }

    /// An external IP.
    #[must_use]
    pub fn external_ip(mut self, ip: IpAddr) -> ServiceSpec {
        self.external_ips.push(ip);
        self
    }

    /// `externalTrafficPolicy: Local`.
    #[must_use]
    pub fn external_traffic_local(mut self) -> ServiceSpec {
        self.external_local = true;
        self
    }

    /// `sessionAffinity: ClientIP` (Kubernetes' default timeout).
    #[must_use]
    pub fn client_ip_affinity(mut self) -> ServiceSpec {
        self.client_ip_affinity = true;
        self
    }

    /// A label on the Service (`service.kubernetes.io/service-proxy-name`, say).
    #[must_use]
    pub fn label(mut self, key: &str, value: &str) -> ServiceSpec {
        self.labels.insert(key.to_string(), json!(value));
        self
    }

    /// The EndpointSlice's name (default `<service>-1`).
    #[must_use]
    pub fn slice_name(mut self, name: &str) -> ServiceSpec {
        self.slice_name = name.to_string();
        self
    }

    /// A ready endpoint at `addr`, on node `node` (`nodeName`) if given.
    #[must_use]
    pub fn endpoint(mut self, addr: IpAddr, node: Option<&str>) -> ServiceSpec {
        self.endpoints.push((addr, node.map(str::to_string)));
        self
    }

    /// The endpoints replaced by `endpoints` (address, node).
    #[must_use]
    pub fn endpoints(mut self, endpoints: &[(IpAddr, Option<&str>)]) -> ServiceSpec {
        self.endpoints = endpoints
            .iter()
            .map(|(a, n)| (*a, n.map(str::to_string)))
            .collect();
        self
    }

    /// The Service, as `kubectl apply` sends it (the API server's defaults filled in).
    pub fn service(&self) -> Value {
        let family = family(self.cluster_ip);
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut v = json!({
                    "name": p.name,
                    "protocol": p.protocol,
                    "port": p.port,
                    "targetPort": p.target_port,
                });
                if let Some(np) = p.node_port {
                    v["nodePort"] = json!(np);
                }
                v
            })
            .collect();
        let mut spec = json!({
            "type": if self.node_port_type { "NodePort" } else { "ClusterIP" },
            "selector": {"app": self.name},
            "clusterIP": self.cluster_ip.to_string(),
            "clusterIPs": [self.cluster_ip.to_string()],
            "ipFamilies": [family],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": if self.client_ip_affinity { "ClientIP" } else { "None" },
            "ports": ports,
        });
        if self.node_port_type || !self.external_ips.is_empty() {
            spec["externalTrafficPolicy"] = json!(if self.external_local {
                "Local"
            } else {
                "Cluster"
            });
        }
        if !self.external_ips.is_empty() {
            let ips: Vec<String> = self.external_ips.iter().map(ToString::to_string).collect();
            spec["externalIPs"] = json!(ips);
        }
        if self.client_ip_affinity {
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 10_800}});
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": spec,
            "status": {"loadBalancer": {}},
        })
    }

    /// The EndpointSlice, as the EndpointSlice controller writes it: every endpoint ready, the
    /// change's trigger time annotated (what programming latency is measured from).
    pub fn slice(&self) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|(addr, node)| {
                let mut e = json!({
                    "addresses": [addr.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                });
                if let Some(n) = node {
                    e["nodeName"] = json!(n);
                }
                e
            })
            .collect();
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "protocol": p.protocol, "port": p.target_port}))
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": self.slice_name,
                "namespace": self.namespace,
                "generateName": format!("{}-", self.name),
                "labels": {
                    "kubernetes.io/service-name": self.name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now_rfc3339()},
            },
            "addressType": family(self.cluster_ip),
            "endpoints": endpoints,
            "ports": ports,
        })
    }

    /// Both objects as a manifest for `twilld apply -f`.
    pub fn manifest(&self) -> String {
        manifests(std::slice::from_ref(self))
    }
}

/// The objects of every spec as one manifest: YAML documents, each opened by `---`. The marker
/// comes first too: a manifest starting with `{` is read as a stream of JSON values, in which
/// `---` is not valid.
pub fn manifests(specs: &[ServiceSpec]) -> String {
    let mut out = String::new();
    for v in specs.iter().flat_map(|s| [s.service(), s.slice()]) {
        out.push_str("---\n");
        out.push_str(&serde_json::to_string_pretty(&v).expect("JSON values serialize"));
        out.push('\n');
    }
    out
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Now, to the second, as Kubernetes writes time stamps.
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .map_or_else(|_| "1970-01-01T00:00:00Z".to_string(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde::Deserialize as _;

    fn web() -> ServiceSpec {
        ServiceSpec::new("web", "10.96.0.10".parse().unwrap())
            .namespace("shop")
            .tcp("http", 80, 8080)
            .node_port(30080)
            .udp("dns", 53, 5353)
            .external_ip("198.18.200.10".parse().unwrap())
            .external_traffic_local()
            .client_ip_affinity()
            .endpoint("10.244.1.2".parse().unwrap(), Some("n1"))
            .endpoint("10.244.2.2".parse().unwrap(), None)
    }

    #[test]
    fn objects_are_what_kubernetes_serves() {
        let svc: Service = serde_json::from_value(web().service()).unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        assert_eq!(spec.external_ips, Some(vec!["198.18.200.10".to_string()]));
        let ports = spec.ports.unwrap();
        assert_eq!(
            (
                ports[0].port,
                ports[0].node_port,
                ports[1].protocol.as_deref()
            ),
            (80, Some(30080), Some("UDP"))
        );
        assert_eq!(ports[1].node_port, None);
        let slice: EndpointSlice = serde_json::from_value(web().slice()).unwrap();
        assert_eq!(slice.metadata.name.as_deref(), Some("web-1"));
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(
            slice.metadata.labels.unwrap()["kubernetes.io/service-name"],
            "web"
        );
        assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("n1"));
        assert_eq!(slice.endpoints[1].node_name, None);
        assert_eq!(slice.endpoints[1].addresses, ["10.244.2.2"]);
        let ports = slice.ports.unwrap();
        assert_eq!((ports[0].port, ports[1].port), (Some(8080), Some(5353)));
    }

    #[test]
    fn a_manifest_is_the_objects_as_yaml_documents() {
        let other = ServiceSpec::new("dns", "fd96::53".parse().unwrap()).udp("dns", 53, 53);
        let text = manifests(&[web(), other]);
        let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 4, "{text}");
        assert_eq!(docs[0], web().service());
        assert_eq!(docs[2]["spec"]["ipFamilies"], json!(["IPv6"]));
        assert_eq!(docs[2]["spec"]["type"], "ClusterIP");
        assert!(docs[2]["spec"].get("externalTrafficPolicy").is_none());
        assert_eq!(docs[3]["addressType"], "IPv6");
        assert_eq!(docs[3]["endpoints"], json!([]));
    }

    #[test]
    fn twilld_reads_the_manifest() {
        let web = ServiceSpec::new("web", "10.96.0.10".parse().unwrap())
            .tcp("http", 80, 8080)
            .node_port(30080)
            .endpoint("10.244.1.2".parse().unwrap(), Some("n1"));
        let dns = ServiceSpec::new("dns", "fd96::53".parse().unwrap()).udp("dns", 53, 53);
        let text = manifests(&[web, dns]);
        let objects = twill_agent::services::model::parse_manifest(&text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(objects.len(), 4);
    }
}
