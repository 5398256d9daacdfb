use super::*;
use crate::dns::feed::Objects;
use crate::services::model::{Object, parse_manifest};

/// A ClusterIP Service with a named and an unnamed port, a dual-stack one, a headless one with
/// two ready endpoints and a not-ready one, an ExternalName one.
pub(crate) const MANIFEST: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  clusterIPs: [10.96.0.11, 'fd00:96::11']
  ports: [{port: 443}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: default
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
- addresses: [10.244.2.7]
  conditions: {ready: true}
- addresses: [10.244.2.9]
  conditions: {ready: false}
ports: [{name: pg, port: 15432}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: Db.Example.org.}
";

fn objects(text: &str) -> Vec<Object> {
    parse_manifest(text).unwrap()
}

pub(crate) fn zone(text: &str) -> Zone {
    let mut o = Objects::default();
    o.reset(objects(text));
    o.zone(DEFAULT_DOMAIN)
}

/// Asserts that each name looks up as expected, for the type asked.
fn expect(z: &Zone, cases: &[(&str, Qtype, Lookup<'_>)]) {
    for (name, q, want) in cases {
        assert_eq!(z.lookup(name, *q), *want, "{name} {q:?}");
    }
}

fn a(ip: &str) -> Rr {
    Rr::A(ip.parse().unwrap())
}

#[test]
fn a_service_name_has_its_cluster_ips() {
    let z = zone(MANIFEST);
    expect(
        &z,
        &[
            (
                "web.default.svc.cluster.local",
                Qtype::A,
                Lookup::Answer(&[a("10.96.0.10")]),
            ),
            // Any case, a trailing dot or none.
            (
                "WEB.Default.svc.cluster.local.",
                Qtype::A,
                Lookup::Answer(&[a("10.96.0.10")]),
            ),
            // Dual stack: one address per family, each under its own type.
            (
                "dual.shop.svc.cluster.local",
                Qtype::A,
                Lookup::Answer(&[a("10.96.0.11")]),
            ),
            (
                "dual.shop.svc.cluster.local",
                Qtype::Aaaa,
                Lookup::Answer(&[Rr::Aaaa("fd00:96::11".parse().unwrap())]),
            ),
            // A name without AAAA records exists: NODATA, not NXDOMAIN.
            ("web.default.svc.cluster.local", Qtype::Aaaa, Lookup::NoData),
            (
                "web.default.svc.cluster.local",
                Qtype::Other,
                Lookup::NoData,
            ),
        ],
    );
}

#[test]
fn named_ports_have_srv_records() {
    let z = zone(MANIFEST);
    expect(
        &z,
        &[
            (
                "_http._tcp.web.default.svc.cluster.local",
                Qtype::Srv,
                Lookup::Answer(&[Rr::Srv {
                    port: 80,
                    target: "web.default.svc.cluster.local".into(),
                }]),
            ),
            (
                "_dns._udp.web.default.svc.cluster.local",
                Qtype::Srv,
                Lookup::Answer(&[Rr::Srv {
                    port: 53,
                    target: "web.default.svc.cluster.local".into(),
                }]),
            ),
            // The protocol is part of the name.
            (
                "_dns._tcp.web.default.svc.cluster.local",
                Qtype::Srv,
                Lookup::NxDomain,
            ),
            // Unnamed ports have none.
            (
                "_443._tcp.dual.shop.svc.cluster.local",
                Qtype::Srv,
                Lookup::NxDomain,
            ),
        ],
    );
}

#[test]
fn a_headless_service_answers_with_its_ready_endpoints() {
    let z = zone(MANIFEST);
    expect(
        &z,
        &[
            (
                "db.default.svc.cluster.local",
                Qtype::A,
                Lookup::Answer(&[a("10.244.1.5"), a("10.244.2.7")]),
            ),
            // Each endpoint has its own name, the SRV records' targets, with the endpoints' port.
            (
                "10-244-2-7.db.default.svc.cluster.local",
                Qtype::A,
                Lookup::Answer(&[a("10.244.2.7")]),
            ),
            (
                "10-244-2-9.db.default.svc.cluster.local",
                Qtype::A,
                Lookup::NxDomain,
            ),
            (
                "_pg._tcp.db.default.svc.cluster.local",
                Qtype::Srv,
                Lookup::Answer(&[
                    Rr::Srv {
                        port: 15432,
                        target: "10-244-1-5.db.default.svc.cluster.local".into(),
                    },
                    Rr::Srv {
                        port: 15432,
                        target: "10-244-2-7.db.default.svc.cluster.local".into(),
                    },
                ]),
            ),
        ],
    );
}

#[test]
fn a_headless_service_without_endpoints_exists_empty() {
    let z = zone(
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None, ports: [{port: 1}]}\n",
    );
    assert_eq!(
        z.lookup("db.default.svc.cluster.local", Qtype::A),
        Lookup::NoData
    );
}

#[test]
fn an_external_name_is_a_cname_whatever_the_type() {
    let z = zone(MANIFEST);
    let cname = [Rr::Cname("db.example.org".into())];
    for q in [Qtype::A, Qtype::Aaaa, Qtype::Cname, Qtype::Any] {
        assert_eq!(
            z.lookup("ext.default.svc.cluster.local", q),
            Lookup::Answer(&cname),
            "{q:?}"
        );
    }
}

#[test]
fn unknown_names_in_the_domain_do_not_exist_and_others_are_outside() {
    let z = zone(MANIFEST);
    expect(
        &z,
        &[
            ("nope.default.svc.cluster.local", Qtype::A, Lookup::NxDomain),
            ("web.other.svc.cluster.local", Qtype::A, Lookup::NxDomain),
        ],
    );
    // The names between a record and the domain exist (empty non-terminals).
    for name in [
        "cluster.local",
        "svc.cluster.local",
        "default.svc.cluster.local",
        "_tcp.web.default.svc.cluster.local",
    ] {
        assert_eq!(z.lookup(name, Qtype::A), Lookup::NoData, "{name}");
    }
    for name in [
        "example.org",
        "local",
        "xcluster.local",
        "web.default.svc.cluster.local.example.org",
        "",
    ] {
        assert_eq!(z.lookup(name, Qtype::A), Lookup::Outside, "{name}");
    }
}

#[test]
fn another_domain() {
    let mut o = Objects::default();
    o.reset(objects(MANIFEST));
    let z = o.zone("Corp.Example.");
    assert_eq!(z.domain(), "corp.example");
    expect(
        &z,
        &[
            (
                "web.default.svc.corp.example",
                Qtype::A,
                Lookup::Answer(&[a("10.96.0.10")]),
            ),
            ("web.default.svc.cluster.local", Qtype::A, Lookup::Outside),
        ],
    );
}

#[test]
fn an_empty_zone_has_its_domain_only() {
    let z = ZoneBuilder::new(DEFAULT_DOMAIN).build();
    assert_eq!(z.len(), 1);
    expect(
        &z,
        &[
            ("cluster.local", Qtype::A, Lookup::NoData),
            ("web.default.svc.cluster.local", Qtype::A, Lookup::NxDomain),
        ],
    );
}

#[test]
fn dashed_addresses() {
    assert_eq!(dashed("10.244.1.5".parse().unwrap()), "10-244-1-5");
    assert_eq!(dashed("fd00:10:244::5".parse().unwrap()), "fd00-10-244--5");
}
