//! Unit tests of the rig's pure helpers.

use super::*;

#[test]
fn cni_results_give_the_pod_addresses() {
    let r: serde_json::Value = serde_json::from_str(
        r#"{"cniVersion":"1.1.0","ips":[{"address":"10.244.3.2/24","gateway":"10.244.3.1"},
            {"address":"fd00:10:0:3::2/64"},{"address":"10.244.3.9/24"}]}"#,
    )
    .unwrap();
    let (v4, v6) = cni_result_addresses(&r);
    assert_eq!(v4, Some(Ipv4Addr::new(10, 244, 3, 2)));
    assert_eq!(v6, Some("fd00:10:0:3::2".parse().unwrap()));
    assert_eq!(
        cni_result_addresses(&serde_json::json!({"ips": []})),
        (None, None)
    );
}

#[test]
fn service_manifests_name_every_endpoint_and_its_node() {
    use serde::Deserialize as _;
    let m = service_manifest(
        "echo",
        "10.96.0.10".parse().unwrap(),
        80,
        8080,
        Some(30080),
        &[
            ("10.244.1.2".parse().unwrap(), 1),
            ("10.244.2.2".parse().unwrap(), 2),
        ],
    );
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&m)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .collect();
    let (svc, slice) = (&docs[0], &docs[1]);
    assert_eq!(svc["kind"], "Service");
    assert_eq!(svc["spec"]["type"], "NodePort");
    assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
    assert_eq!(
        svc["spec"]["ports"][0],
        serde_json::json!({"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080})
    );
    assert_eq!(slice["kind"], "EndpointSlice");
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "echo"
    );
    assert_eq!(slice["endpoints"][1]["addresses"][0], "10.244.2.2");
    assert_eq!(slice["endpoints"][1]["nodeName"], "n2");
    assert_eq!(slice["addressType"], "IPv4");
    let empty = service_manifest("x", "10.96.0.11".parse().unwrap(), 80, 80, None, &[]);
    assert!(empty.contains("\"ClusterIP\"") && empty.contains("\"endpoints\": []"));
}

#[test]
fn node_addresses() {
    assert_eq!(Rig::node_ip(1).to_string(), "198.18.0.11");
    assert_eq!(Rig::node_ip6(3).to_string(), "fd74:7769::13");
}
