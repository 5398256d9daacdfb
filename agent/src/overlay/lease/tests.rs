//! Tests of the lease schema, the allocator and the validation of peer leases.

use std::collections::BTreeSet;

use rand::{Rng, SeedableRng};

use super::alloc::{choose_v4, choose_v6, in_range};
use super::validate::{IgnoreReason, OwnNode, Validated, check_one, overlaps, validate_peers};
use super::*;
use crate::overlay::config::NetworkConfig;

fn cfg(json: &str) -> NetworkConfig {
    NetworkConfig::parse(json).unwrap()
}

#[test]
fn keys_round_trip_as_flannel_writes_them() {
    for key in [
        "10.244.1.0-24",
        "10.244.1.0-24&fd74:10:0:1::-64",
        "fd74:10:0:1::-64",
    ] {
        assert_eq!(LeaseSubnets::parse_key(key).unwrap().key(), key);
    }
    for bad in [
        "10.244.1.0",
        "10.244.1.5-24",
        "x-24",
        "10.244.1.0-24&10.244.2.0-24",
        "",
        "10.244.1.0-33",
    ] {
        assert!(LeaseSubnets::parse_key(bad).is_err(), "{bad}");
    }
}

#[test]
fn lease_json_matches_flannel() {
    // As flannel v0.26 writes it.
    let text = r#"{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"de:ad:be:ef:00:01"}}"#;
    let attrs = LeaseAttrs::parse("k", text.as_bytes()).unwrap();
    assert_eq!(attrs.public_ip.unwrap().to_string(), "198.18.0.11");
    let vx = attrs.vxlan(false).unwrap();
    assert_eq!(vx.vni, 1);
    assert_eq!(
        parse_mac(&vx.vtep_mac),
        Some([0xde, 0xad, 0xbe, 0xef, 0, 1])
    );
    let ours = LeaseAttrs {
        public_ip: Some("198.18.0.12".parse().unwrap()),
        public_ipv6: None,
        backend_type: "vxlan".into(),
        backend_data: Some(serde_json::json!({"VNI": 1, "VtepMAC": "02:00:00:00:00:01"})),
        backend_v6_data: None,
        node_id: None,
    };
    assert_eq!(
        ours.to_json(),
        r#"{"PublicIP":"198.18.0.12","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}"#
    );
    assert!(
        LeaseAttrs::parse("k", b"{\"PublicIP\":\"nope\"}")
            .unwrap_err()
            .to_string()
            .contains('k')
    );
}

#[test]
fn chooses_only_free_aligned_subnets_in_range() {
    let c =
        cfg(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.20.0"}"#);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut taken = Vec::new();
    for _ in 0..11 {
        let n = choose_v4(&c, &taken, &mut rng).unwrap();
        assert!(!taken.contains(&n));
        assert!(
            in_range(
                &c,
                &LeaseSubnets {
                    v4: Some(n),
                    v6: None
                }
            ),
            "{n}"
        );
        assert_eq!(n, n.trunc());
        taken.push(n);
    }
    assert!(matches!(
        choose_v4(&c, &taken, &mut rng),
        Err(LeaseError::Exhausted { .. })
    ));
}

#[test]
fn ipv6_huge_range_still_fast() {
    let c = cfg(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/32","IPv6SubnetLen":64}"#,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let n = choose_v6(&c, &[], &mut rng).unwrap();
    assert!(c.ipv6_network.unwrap().contains(&n));
    assert_eq!(n.prefix_len(), 64);
}

fn lease(key: &str, public: &str, mac: &str) -> Lease {
    Lease {
        subnets: LeaseSubnets::parse_key(key).unwrap(),
        attrs: LeaseAttrs {
            public_ip: Some(public.parse().unwrap()),
            backend_type: "vxlan".into(),
            backend_data: Some(serde_json::json!({"VNI": 1, "VtepMAC": mac})),
            ..LeaseAttrs::default()
        },
        expires: None,
    }
}

#[test]
fn peer_leases_are_validated_before_use() {
    let c = cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
    let own = OwnNode {
        subnets: Some(LeaseSubnets::parse_key("10.244.1.0-24").unwrap()),
        public_v4: Some("198.18.0.11".parse().unwrap()),
        public_v6: None,
    };
    let good = lease("10.244.2.0-24", "198.18.0.12", "0e:00:00:00:00:02");
    let mut no_mac = lease("10.244.10.0-24", "198.18.0.20", "x");
    no_mac.attrs.backend_data = None;
    let cases = [
        (
            lease("198.18.0.0-25", "198.18.0.13", "0e:00:00:00:00:03"),
            IgnoreReason::OutsideNetwork,
            "198.18.0.0/25",
        ),
        (
            lease("8.8.8.0-24", "198.18.0.14", "0e:00:00:00:00:04"),
            IgnoreReason::OutsideNetwork,
            "8.8.8.0/24",
        ),
        (
            lease("10.244.1.128-25", "198.18.0.15", "0e:00:00:00:00:05"),
            IgnoreReason::WrongLength,
            "/24",
        ),
        (
            lease("10.244.1.0-25", "198.18.0.15", "0e:00:00:00:00:05"),
            IgnoreReason::WrongLength,
            "10.244.1.0/25",
        ),
        (
            lease("10.244.3.0-24", "0.0.0.0", "0e:00:00:00:00:06"),
            IgnoreReason::BadPublicIp,
            "0.0.0.0",
        ),
        (
            lease("10.244.4.0-24", "127.0.0.1", "0e:00:00:00:00:07"),
            IgnoreReason::BadPublicIp,
            "127.0.0.1",
        ),
        (
            lease("10.244.5.0-24", "224.0.0.1", "0e:00:00:00:00:08"),
            IgnoreReason::BadPublicIp,
            "224.0.0.1",
        ),
        (
            lease("10.244.6.0-24", "255.255.255.255", "0e:00:00:00:00:09"),
            IgnoreReason::BadPublicIp,
            "255.255.255.255",
        ),
        (
            lease("10.244.7.0-24", "169.254.1.1", "0e:00:00:00:00:0a"),
            IgnoreReason::BadPublicIp,
            "169.254.1.1",
        ),
        (
            lease("10.244.8.0-24", "10.244.9.9", "0e:00:00:00:00:0b"),
            IgnoreReason::BadPublicIp,
            "10.244.9.9",
        ),
        (
            lease("10.244.9.0-24", "198.18.0.11", "0e:00:00:00:00:0c"),
            IgnoreReason::OwnPublicIp,
            "198.18.0.11",
        ),
        (no_mac, IgnoreReason::BadVtepMac, "BackendData"),
        (
            lease("10.244.11.0-24", "198.18.0.21", "ff:ff:ff:ff:ff:ff"),
            IgnoreReason::BadVtepMac,
            "ff:ff:ff:ff:ff:ff",
        ),
        (
            lease("10.244.12.0-24", "198.18.0.22", "01:00:5e:00:00:01"),
            IgnoreReason::BadVtepMac,
            "01:00:5e",
        ),
        (
            lease("10.244.13.0-24", "198.18.0.23", "00:00:00:00:00:00"),
            IgnoreReason::BadVtepMac,
            "00:00:00",
        ),
    ];
    for (bad, reason, needle) in &cases {
        let v = validate_peers(&c, &own, [(&good, 1), (bad, 2)]);
        assert_eq!(v.peers, vec![good.clone()], "{}", bad.subnets.key());
        assert_eq!(v.ignored.len(), 1, "{v:?}");
        let i = &v.ignored[0];
        assert_eq!(
            (i.key.as_str(), i.reason),
            (bad.subnets.key().as_str(), *reason)
        );
        assert!(
            i.detail.contains(needle),
            "{}: {needle:?} not in {:?}",
            i.key,
            i.detail
        );
    }
    // Our own lease is neither a peer nor ignored; a valid /24 identical to ours is.
    let mine = lease("10.244.1.0-24", "198.18.0.11", "0e:00:00:00:00:01");
    let v = validate_peers(&c, &own, [(&mine, 1), (&good, 2)]);
    assert_eq!((v.peers.len(), v.ignored.len()), (1, 0));
    let mut twin = mine.clone();
    twin.subnets = LeaseSubnets::parse_key("10.244.1.0-24&fd00::-64").unwrap();
    twin.attrs.public_ip = Some("198.18.0.30".parse().unwrap());
    let v = validate_peers(&c, &own, [(&twin, 0)]);
    assert_eq!(
        v.ignored[0].reason,
        IgnoreReason::OverlapsOwnSubnet,
        "{v:?}"
    );
}

#[test]
fn of_overlapping_leases_the_older_wins_on_every_node() {
    let c = cfg(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd74:10::/56","Backend":{"Type":"host-gw"}}"#,
    );
    let mut a = lease("10.244.2.0-24&fd74:10:0:2::-64", "198.18.0.12", "-");
    a.attrs.public_ipv6 = Some("fd74:7769::12".parse().unwrap());
    a.attrs.backend_type = "host-gw".into();
    // Same IPv4 subnet, another IPv6 one: overlaps.
    let mut b = a.clone();
    b.subnets = LeaseSubnets::parse_key("10.244.2.0-24&fd74:10:0:3::-64").unwrap();
    b.attrs.public_ip = Some("198.18.0.13".parse().unwrap());
    b.attrs.public_ipv6 = Some("fd74:7769::13".parse().unwrap());
    for own in [
        OwnNode::default(),
        OwnNode {
            public_v4: Some("198.18.0.99".parse().unwrap()),
            ..OwnNode::default()
        },
    ] {
        for order in [[(&a, 5), (&b, 9)], [(&b, 9), (&a, 5)]] {
            let v = validate_peers(&c, &own, order);
            assert_eq!(v.peers, vec![a.clone()]);
            assert_eq!(v.ignored[0].key, b.subnets.key());
            assert_eq!(v.ignored[0].reason, IgnoreReason::OverlapsLease);
            assert!(v.ignored[0].detail.contains(&a.subnets.key()), "{v:?}");
        }
    }
    // Same revision (another store): the lower key wins.
    let v = validate_peers(&c, &OwnNode::default(), [(&b, 1), (&a, 1)]);
    assert_eq!(v.peers, vec![a.clone()]);
    // An IPv6 subnet outside IPv6Network, or without PublicIPv6.
    let mut c6 = a.clone();
    c6.subnets = LeaseSubnets::parse_key("10.244.4.0-24&fd00::-64").unwrap();
    let mut n6 = a.clone();
    n6.subnets = LeaseSubnets::parse_key("10.244.5.0-24&fd74:10:0:5::-64").unwrap();
    n6.attrs.public_ipv6 = None;
    let v = validate_peers(&c, &OwnNode::default(), [(&c6, 1), (&n6, 2)]);
    let reasons: Vec<IgnoreReason> = v.ignored.iter().map(|i| i.reason).collect();
    assert_eq!(
        reasons,
        [IgnoreReason::OutsideNetwork, IgnoreReason::BadPublicIp]
    );
}

#[test]
fn validation_property_every_node_agrees_and_keeps_only_disjoint_valid_peers() {
    use rand::seq::SliceRandom;
    let c = cfg(
        r#"{"Network":"10.244.0.0/20","EnableIPv6":true,"IPv6Network":"fd74:10::/60","Backend":{"Type":"vxlan"}}"#,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let own = OwnNode {
        subnets: Some(LeaseSubnets::parse_key("10.244.1.0-24&fd74:10:0:1::-64").unwrap()),
        public_v4: Some("198.18.0.11".parse().unwrap()),
        public_v6: Some("fd74:7769::11".parse().unwrap()),
    };
    let publics = [
        "198.18.0.12",
        "198.18.0.11",
        "0.0.0.0",
        "224.0.0.5",
        "10.244.3.3",
    ];
    let macs = ["0e:00:00:00:00:02", "ff:ff:ff:ff:ff:ff", "bad"];
    for _ in 0..300 {
        let n = rng.random_range(0..40);
        let leases: Vec<(Lease, i64)> = (0..n)
            .map(|_| {
                let len = [24u8, 24, 24, 23, 25][rng.random_range(0..5)];
                let third = rng.random_range(0u8..20);
                let v4 = Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), len)
                    .unwrap()
                    .trunc();
                let v6 = Ipv6Net::new(
                    Ipv6Addr::new(0xfd74, 0x10, 0, rng.random_range(0..20), 0, 0, 0, 0),
                    64,
                )
                .unwrap();
                let subnets = LeaseSubnets {
                    v4: Some(v4),
                    v6: rng.random_bool(0.8).then_some(v6),
                };
                let mac = macs[rng.random_range(0..macs.len())];
                let mut l = lease(
                    &subnets.key(),
                    publics[rng.random_range(0..publics.len())],
                    mac,
                );
                l.attrs.public_ipv6 = Some("fd74:7769::12".parse().unwrap());
                l.attrs.backend_v6_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": mac}));
                (l.subnets.key(), (l, rng.random_range(0..50)))
            })
            .collect::<std::collections::BTreeMap<_, _>>() // keys are unique in a store
            .into_values()
            .collect();
        let v = validate_peers(&c, &own, leases.iter().map(|(l, r)| (l, *r)));
        // Every lease but ours is used or ignored, once.
        let others = leases
            .iter()
            .filter(|(l, _)| Some(l.subnets) != own.subnets)
            .count();
        assert_eq!(v.peers.len() + v.ignored.len(), others);
        // What is used is valid and disjoint, from ours and from each other.
        for (i, p) in v.peers.iter().enumerate() {
            assert!(check_one(&c, &own, p).is_ok(), "{p:?}");
            for q in &v.peers[i + 1..] {
                assert!(!overlaps(&p.subnets, &q.subnets), "{p:?} / {q:?}");
            }
        }
        // Every node sees the leases in its own order and decides alike.
        let mut shuffled = leases.clone();
        shuffled.shuffle(&mut rng);
        let w = validate_peers(&c, &own, shuffled.iter().map(|(l, r)| (l, *r)));
        let keys =
            |ls: &[Lease]| -> BTreeSet<String> { ls.iter().map(|l| l.subnets.key()).collect() };
        assert_eq!(keys(&v.peers), keys(&w.peers));
        let ignored = |x: &Validated| -> BTreeSet<(String, IgnoreReason)> {
            x.ignored
                .iter()
                .map(|i| (i.key.clone(), i.reason))
                .collect()
        };
        assert_eq!(ignored(&v), ignored(&w));
    }
}

#[test]
fn lease_json_keeps_the_node_identity_and_reads_flannels() {
    let ours = LeaseAttrs {
        public_ip: Some("198.18.0.12".parse().unwrap()),
        backend_type: "host-gw".into(),
        node_id: Some("0123456789abcdef".into()),
        ..LeaseAttrs::default()
    };
    let json = ours.to_json();
    assert_eq!(
        json,
        r#"{"PublicIP":"198.18.0.12","BackendType":"host-gw","TwillNodeID":"0123456789abcdef"}"#
    );
    assert_eq!(LeaseAttrs::parse("k", json.as_bytes()).unwrap(), ours);
    // flannel's own leases have no identity.
    let flannel = LeaseAttrs::parse(
        "k",
        br#"{"PublicIP":"198.18.0.12","BackendType":"host-gw"}"#,
    )
    .unwrap();
    assert_eq!(flannel.node_id, None);
}

#[test]
fn macs() {
    assert_eq!(format_mac(&[2, 0, 0xab, 0, 0, 1]), "02:00:ab:00:00:01");
    assert_eq!(parse_mac("02:00:ab:00:00:01"), Some([2, 0, 0xab, 0, 0, 1]));
    assert_eq!(parse_mac("02:00:ab:00:00"), None);
    assert_eq!(parse_mac("02:00:ab:00:00:01:02"), None);
}
