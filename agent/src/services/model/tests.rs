//! Tests of the service model: real objects as kubectl prints them, and every refusal.

use std::net::IpAddr;

use super::*;
use crate::services::lb::Proto;

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
        err("apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: x\n").contains("EndpointSlice")
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
        err(&two).contains("endpoints[0].addresses[1]: 127.0.0.1 may not be in the loopback range")
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
    assert!(e.endpoints[0].ready() && e.endpoints[0].serving() && !e.endpoints[0].terminating());
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
