//! The overlay loop on the fake kernel: desired, plan and apply for each backend.

use ipnet::IpNet;

use super::*;
use crate::overlay::apply::{ensure_devices, reconcile};
use crate::overlay::backend::udp::TUN_NAME;
use crate::overlay::check::{NetworkClash, check_network};
use crate::overlay::config::NetworkConfig;
use crate::overlay::desired::{desired, lease_attrs, overlay_mtu};
use crate::overlay::kernel::fake::FakeKernel;
use crate::overlay::kernel::{LinkInfo, PROTO_BOOT, PROTO_KERNEL, PROTO_TWILL, Route};
use crate::overlay::lease::{Lease, LeaseAttrs, LeaseSubnets};
use crate::overlay::plan::Op;

fn cfg(backend: &str) -> NetworkConfig {
    NetworkConfig::parse(&format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd74:10::/56","Backend":{backend}}}"#
    ))
    .unwrap()
}

/// [`cfg`] with IPv6 off.
fn v4_cfg(backend: &str) -> NetworkConfig {
    let mut c = cfg(backend);
    c.enable_ipv6 = false;
    c
}

/// A fake kernel with [`uplink`] on it, and the devices `c` wants made there.
async fn node_with(c: &NetworkConfig) -> (FakeKernel, Uplink, Devices) {
    let k = FakeKernel::with_uplink("198.18.0.11/24", 1500);
    let up = uplink();
    let devs = ensure_devices(&k, c, &up).await.unwrap();
    (k, up, devs)
}

fn uplink() -> Uplink {
    Uplink {
        index: 2,
        name: "eth0".into(),
        mtu: 1500,
        public_v4: Some("198.18.0.11".parse().unwrap()),
        public_v6: Some("fd74:7769::11".parse().unwrap()),
        nets: vec![
            "198.18.0.11/24".parse().unwrap(),
            "fd74:7769::11/64".parse().unwrap(),
        ],
    }
}

fn own() -> LeaseSubnets {
    LeaseSubnets {
        v4: Some("10.244.1.0/24".parse().unwrap()),
        v6: Some("fd74:10:0:1::/64".parse().unwrap()),
    }
}

fn peer(n: u8, public: &str, mac_last: u8) -> Lease {
    Lease {
        subnets: LeaseSubnets {
            v4: Some(format!("10.244.{n}.0/24").parse().unwrap()),
            v6: Some(format!("fd74:10:0:{n}::/64").parse().unwrap()),
        },
        attrs: LeaseAttrs {
            public_ip: Some(public.parse().unwrap()),
            public_ipv6: Some(format!("fd74:7769::{n}").parse().unwrap()),
            backend_type: "vxlan".into(),
            backend_data: Some(
                serde_json::json!({"VNI":1,"VtepMAC":format!("0e:00:00:00:00:{mac_last:02x}")}),
            ),
            backend_v6_data: Some(
                serde_json::json!({"VNI":1,"VtepMAC":format!("0e:00:00:00:01:{mac_last:02x}")}),
            ),
            node_id: None,
        },
        expires: None,
    }
}

#[test]
fn mtu_maths() {
    let mut c = cfg(r#"{"Type":"vxlan"}"#);
    let up = uplink();
    assert_eq!(overlay_mtu(&c, &up), 1430); // dual stack: v6 underlay overhead
    c.enable_ipv6 = false;
    assert_eq!(overlay_mtu(&c, &up), 1450);
    c.backend.mtu = Some(1400);
    assert_eq!(overlay_mtu(&c, &up), 1400);
    let hg = cfg(r#"{"Type":"host-gw"}"#);
    assert_eq!(overlay_mtu(&hg, &up), 1500);
    let udp = NetworkConfig::parse(UDP_CFG).unwrap();
    assert_eq!(overlay_mtu(&udp, &udp_uplink()), 1472);
}

#[tokio::test]
async fn vxlan_three_entries_per_peer_then_nothing_to_do() {
    let conf = cfg(r#"{"Type":"vxlan"}"#);
    let (kernel, up, devs) = node_with(&conf).await;
    assert!(devs.v4.is_some() && devs.v6.is_some());
    let peers = vec![
        peer(1, "198.18.0.11", 1),
        peer(2, "198.18.0.12", 2),
        peer(3, "198.18.0.13", 3),
    ];
    // peer(1) is ourselves (same subnets): skipped.
    let peers: Vec<Lease> = peers
        .into_iter()
        .map(|mut p| {
            if p.subnets.v4 == own().v4 {
                p.subnets = own();
            }
            p
        })
        .collect();
    let ops = reconcile(&kernel, &conf, &up, &devs, &own(), &peers)
        .await
        .unwrap();
    let state = kernel.state();
    assert_eq!(state.routes.len(), 4, "{:?}", state.routes); // 2 peers × 2 families
    assert_eq!(state.neighs.len(), 4);
    assert_eq!(state.fdb.len(), 4);
    let route = state
        .routes
        .iter()
        .find(|r| r.dst.to_string() == "10.244.2.0/24")
        .unwrap();
    assert_eq!(route.gateway.unwrap().to_string(), "10.244.2.0");
    assert!(route.onlink);
    assert!(
        state
            .fdb
            .iter()
            .any(|f| f.dst.to_string() == "198.18.0.12" && f.mac == [0x0e, 0, 0, 0, 0, 2])
    );
    // FDB and neighbour before the route of the same peer.
    let pos = |pred: &dyn Fn(&Op) -> bool| ops.iter().position(pred).unwrap();
    assert!(
        pos(&|o| matches!(o, Op::ReplaceFdb(f) if f.dst.to_string() == "198.18.0.12"))
            < pos(&|o| matches!(o, Op::ReplaceRoute(r) if r.dst.to_string() == "10.244.2.0/24"))
    );
    kernel.take_calls();
    let ops = reconcile(&kernel, &conf, &up, &devs, &own(), &peers)
        .await
        .unwrap();
    assert!(ops.is_empty(), "{ops:?}");
    assert!(kernel.take_calls().is_empty());
}

#[tokio::test]
async fn heals_drift_and_removes_departed_peers_only() {
    let c = v4_cfg(r#"{"Type":"vxlan"}"#);
    let (k, up, devs) = node_with(&c).await;
    let peers = vec![peer(2, "198.18.0.12", 2), peer(3, "198.18.0.13", 3)];
    reconcile(&k, &c, &up, &devs, &own(), &peers).await.unwrap();
    // Someone deletes a route by hand, and adds one of their own outside the network.
    k.tamper(|s| {
        s.routes.retain(|r| r.dst.to_string() != "10.244.3.0/24");
        s.routes.insert(Route {
            dst: "192.168.7.0/24".parse().unwrap(),
            gateway: None,
            oif: 2,
            onlink: false,
            proto: PROTO_BOOT,
        });
    });
    k.take_calls();
    let ops = reconcile(&k, &c, &up, &devs, &own(), &peers).await.unwrap();
    assert_eq!(ops.len(), 1, "{ops:?}");
    // Peer 3 leaves: its three entries go, the foreign route stays.
    let ops = reconcile(&k, &c, &up, &devs, &own(), &peers[..1])
        .await
        .unwrap();
    assert_eq!(ops.len(), 3, "{ops:?}");
    assert!(matches!(ops[0], Op::DelRoute(_)));
    let s = k.state();
    assert!(
        s.routes
            .iter()
            .any(|r| r.dst.to_string() == "192.168.7.0/24")
    );
    assert!(
        !s.routes
            .iter()
            .any(|r| r.dst.to_string() == "10.244.3.0/24")
    );
    assert_eq!(s.fdb.len(), 1);
}

#[tokio::test]
async fn restart_keeps_device_and_entries() {
    let c = cfg(r#"{"Type":"vxlan"}"#);
    let (k, up, devs) = node_with(&c).await;
    reconcile(&k, &c, &up, &devs, &own(), &[peer(2, "198.18.0.12", 2)])
        .await
        .unwrap();
    k.take_calls();
    // A new agent process: same device (same MAC), nothing re-created, nothing flushed.
    let devs2 = ensure_devices(&k, &c, &up).await.unwrap();
    assert_eq!(devs, devs2);
    let ops = reconcile(&k, &c, &up, &devs2, &own(), &[peer(2, "198.18.0.12", 2)])
        .await
        .unwrap();
    assert!(ops.is_empty());
    assert!(k.take_calls().is_empty());
    // A VNI change needs a new device.
    let mut c2 = c.clone();
    c2.backend.vni = 7;
    let devs3 = ensure_devices(&k, &c2, &up).await.unwrap();
    assert!(
        k.take_calls()
            .iter()
            .any(|c| c.starts_with("create_vxlan flannel.7"))
    );
    assert_ne!(devs3.v4.unwrap().index, devs.v4.unwrap().index);
}

#[tokio::test]
async fn host_gw_and_direct_routing() {
    let c = v4_cfg(r#"{"Type":"host-gw"}"#);
    let (k, up, devs) = node_with(&c).await;
    assert_eq!(devs, Devices::default());
    let mut p2 = peer(2, "198.18.0.12", 2);
    p2.attrs.backend_type = "host-gw".into();
    let mut far = peer(3, "203.0.113.9", 3);
    far.attrs.backend_type = "host-gw".into();
    reconcile(&k, &c, &up, &devs, &own(), &[p2, far])
        .await
        .unwrap();
    let s = k.state();
    assert_eq!(s.routes.len(), 1);
    let r = s.routes.iter().next().unwrap();
    assert_eq!(r.gateway.unwrap().to_string(), "198.18.0.12");
    assert_eq!(r.oif, 2);

    let c = v4_cfg(r#"{"Type":"vxlan","DirectRouting":true}"#);
    let desired = desired(
        &c,
        &up,
        &Devices {
            v4: Some(Device {
                index: 9,
                name: "flannel.1".into(),
                mac: [0; 6],
                mtu: 1450,
            }),
            v6: None,
        },
        &own(),
        &[peer(2, "198.18.0.12", 2), peer(3, "203.0.113.9", 3)],
    );
    let via: Vec<_> = desired
        .routes
        .iter()
        .map(|r| (r.dst.to_string(), r.oif))
        .collect();
    assert!(via.contains(&("10.244.2.0/24".into(), 2)), "{via:?}");
    assert!(via.contains(&("10.244.3.0/24".into(), 9)), "{via:?}");
    assert_eq!(desired.fdb.len(), 1);
}

fn route(dst: &str, gateway: Option<&str>, oif: u32, proto: u8) -> Route {
    Route {
        dst: dst.parse().unwrap(),
        gateway: gateway.map(|g| g.parse().unwrap()),
        oif,
        onlink: false,
        proto,
    }
}

#[tokio::test]
async fn only_marked_routes_and_unmarked_ones_on_our_device_are_ours() {
    let c = v4_cfg(r#"{"Type":"vxlan"}"#);
    let (k, up, devs) = node_with(&c).await;
    let vx = devs.v4.as_ref().unwrap().index;
    let peers = vec![peer(2, "198.18.0.12", 2)];
    reconcile(&k, &c, &up, &devs, &own(), &peers).await.unwrap();
    assert!(k.state().routes.iter().all(|r| r.proto == PROTO_TWILL));
    // Routes that are not twill's, inside the Network and out: by hand via the uplink (no
    // mark), the kernel's connected routes (on the uplink, on the cluster's own subnet and
    // even on our device). And routes twill wrote: one with the mark to a subnet no lease
    // names any more (outside the Network, as a bad lease once made), one without the mark
    // on our device (an older twill's).
    let foreign = [
        route("10.244.250.0/24", Some("198.18.0.1"), 2, PROTO_BOOT),
        route("198.18.0.0/24", None, 2, PROTO_KERNEL),
        route("10.244.1.0/24", None, 7, PROTO_KERNEL),
        route("10.244.9.0/24", None, vx, PROTO_KERNEL),
    ];
    k.tamper(|s| {
        s.routes.extend(foreign.iter().cloned());
        s.routes
            .insert(route("8.8.8.0/24", Some("8.8.8.0"), vx, PROTO_TWILL));
        s.routes
            .insert(route("10.244.7.0/24", Some("10.244.7.0"), vx, PROTO_BOOT));
    });
    for _ in 0..3 {
        reconcile(&k, &c, &up, &devs, &own(), &peers).await.unwrap();
    }
    let s = k.state();
    for f in &foreign {
        assert!(s.routes.contains(f), "{f:?} was touched: {:?}", s.routes);
    }
    let dsts: Vec<String> = s.routes.iter().map(|r| r.dst.to_string()).collect();
    assert!(!dsts.contains(&"8.8.8.0/24".to_string()), "{dsts:?}");
    assert!(!dsts.contains(&"10.244.7.0/24".to_string()), "{dsts:?}");
    // An older twill's route to a peer that is still there is adopted: rewritten with the mark.
    k.tamper(|s| {
        s.routes.retain(|r| r.dst.to_string() != "10.244.2.0/24");
        s.routes
            .insert(route("10.244.2.0/24", Some("10.244.2.0"), vx, PROTO_BOOT));
    });
    reconcile(&k, &c, &up, &devs, &own(), &peers).await.unwrap();
    let r = k
        .state()
        .routes
        .into_iter()
        .find(|r| r.dst.to_string() == "10.244.2.0/24")
        .unwrap();
    assert_eq!((r.proto, r.onlink, r.oif), (PROTO_TWILL, true, vx));
}

#[tokio::test]
async fn a_network_over_the_underlay_takes_no_route_of_the_node() {
    // What a Network of 198.18.0.0/16 did before it was refused: every route of the node
    // inside it looked like a stale peer. With ownership by mark, none is touched.
    let c =
        NetworkConfig::parse(r#"{"Network":"198.18.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
    let (k, up, devs) = node_with(&c).await;
    let kernel_route = route("198.18.0.0/24", None, 2, PROTO_KERNEL);
    let by_hand = route("198.18.7.0/24", Some("198.18.0.1"), 2, PROTO_BOOT);
    k.tamper(|s| {
        s.routes.insert(kernel_route.clone());
        s.routes.insert(by_hand.clone());
    });
    let own = LeaseSubnets {
        v4: Some("198.18.1.0/24".parse().unwrap()),
        v6: None,
    };
    let ops = reconcile(&k, &c, &up, &devs, &own, &[]).await.unwrap();
    assert!(!ops.iter().any(|o| matches!(o, Op::DelRoute(_))), "{ops:?}");
    let s = k.state();
    assert!(s.routes.contains(&kernel_route) && s.routes.contains(&by_hand));
    // And the config itself is refused for this node, naming the Network and the address.
    let err = check_network(&c, &up, &[]).unwrap_err().to_string();
    assert!(
        err.contains("Network 198.18.0.0/16")
            && err.contains("198.18.0.11/24")
            && err.contains("eth0"),
        "{err}"
    );
}

#[test]
fn networks_holding_the_uplink_or_the_default_route_are_refused() {
    let up = uplink();
    let parse = |j: &str| NetworkConfig::parse(j).unwrap();
    let default = route("0.0.0.0/0", Some("198.18.0.1"), 2, PROTO_BOOT);
    let default6 = route("::/0", Some("fe80::1"), 2, PROTO_BOOT);
    // The usual: fine.
    let ok = cfg(r#"{"Type":"vxlan"}"#);
    check_network(&ok, &up, &[default.clone(), default6.clone()]).unwrap();
    for (json, needles) in [
        (
            r#"{"Network":"0.0.0.0/0","SubnetLen":24}"#,
            vec!["Network 0.0.0.0/0", "198.18.0.11/24"],
        ),
        (
            r#"{"Network":"198.18.0.0/16"}"#,
            vec!["Network 198.18.0.0/16", "198.18.0.11/24", "eth0"],
        ),
        (
            r#"{"Network":"10.0.0.0/8","EnableIPv6":true,"IPv6Network":"fd74::/16"}"#,
            vec!["IPv6Network fd74::/16", "fd74:7769::11/64"],
        ),
    ] {
        let err = check_network(&parse(json), &up, std::slice::from_ref(&default))
            .unwrap_err()
            .to_string();
        for n in needles {
            assert!(err.contains(n), "{json}: {n:?} not in {err}");
        }
    }
    // The default route's gateway inside the Network (the uplink elsewhere).
    let mut far = up.clone();
    far.nets = vec!["203.0.113.5/24".parse().unwrap()];
    far.public_v4 = Some("203.0.113.5".parse().unwrap());
    far.public_v6 = None;
    let err = check_network(
        &parse(r#"{"Network":"198.18.0.0/16"}"#),
        &far,
        std::slice::from_ref(&default),
    )
    .unwrap_err();
    assert!(
        matches!(&err, NetworkClash::DefaultRoute { route, .. } if route == "default via 198.18.0.1 dev eth0"),
        "{err}"
    );
    // --public-ip inside the Network, though the uplink's address is not.
    let mut lying = far.clone();
    lying.public_v4 = Some("10.244.3.3".parse().unwrap());
    let err = check_network(&ok, &lying, &[]).unwrap_err().to_string();
    assert!(err.contains("public address 10.244.3.3"), "{err}");
}

#[test]
fn lease_attrs_publish_vtep_macs() {
    let c = v4_cfg(r#"{"Type":"vxlan"}"#);
    let devs = Devices {
        v4: Some(Device {
            index: 9,
            name: "flannel.1".into(),
            mac: [0x0e, 1, 2, 3, 4, 5],
            mtu: 1450,
        }),
        v6: None,
    };
    let a = lease_attrs(&c, &uplink(), &devs);
    assert_eq!(
        a.to_json(),
        r#"{"PublicIP":"198.18.0.11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:01:02:03:04:05"}}"#
    );
}

const UDP_CFG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;

/// The uplink of an IPv4-only node (the udp backend carries IPv4 only).
pub(crate) fn udp_uplink() -> Uplink {
    let mut up = uplink();
    up.public_v6 = None;
    up.nets.truncate(1);
    up
}

fn udp_lease(n: u8) -> Lease {
    let mut l = peer(n, &format!("198.18.0.{}", 10 + n), n);
    l.subnets.v6 = None;
    l.attrs.public_ipv6 = None;
    l.attrs.backend_type = "udp".into();
    l.attrs.backend_data = None;
    l.attrs.backend_v6_data = None;
    l
}

#[tokio::test]
async fn tun_gets_address_and_network_route_from_the_reconciler() {
    let k = FakeKernel::with_uplink("198.18.0.11/24", 1500);
    let cfg = NetworkConfig::parse(UDP_CFG).unwrap();
    let up = udp_uplink();
    // No device yet: the overlay cannot go on without the backend's TUN.
    assert!(ensure_devices(&k, &cfg, &up).await.is_err());
    // The backend made flannel0 (down, default MTU); a route of an earlier VXLAN run is left
    // (twill's: it carries the mark).
    k.tamper(|s| {
        s.links.push(LinkInfo {
            index: 50,
            name: TUN_NAME.into(),
            mac: None,
            mtu: 1500,
            up: false,
            vxlan: None,
        });
        s.routes.insert(Route {
            dst: "10.244.3.0/24".parse().unwrap(),
            gateway: Some("10.244.3.0".parse().unwrap()),
            oif: 9,
            onlink: true,
            proto: crate::overlay::kernel::PROTO_TWILL,
        });
    });
    let devs = ensure_devices(&k, &cfg, &up).await.unwrap();
    assert_eq!(devs.v4.as_ref().unwrap().index, 50);
    assert!(devs.v6.is_none());
    assert!(
        k.take_calls()
            .iter()
            .any(|c| c.contains("set_up") && c.contains("1472"))
    );
    let own = udp_lease(1).subnets;
    let peers = [udp_lease(1), udp_lease(2), udp_lease(3)];
    reconcile(&k, &cfg, &up, &devs, &own, &peers).await.unwrap();
    let s = k.state();
    let on_tun: Vec<String> = s
        .addrs
        .iter()
        .filter(|a| a.ifindex == 50)
        .map(|a| a.net.to_string())
        .collect();
    assert_eq!(on_tun, ["10.244.1.0/32"]);
    let routes: Vec<&Route> = s
        .routes
        .iter()
        .filter(|r| matches!(r.dst, IpNet::V4(_)))
        .collect();
    assert_eq!(
        routes,
        [&Route {
            dst: "10.244.0.0/16".parse().unwrap(),
            gateway: None,
            oif: 50,
            onlink: false,
            proto: crate::overlay::kernel::PROTO_TWILL,
        }],
        "one route for the Network, none per peer, the stale one gone"
    );
    k.take_calls();
    let ops = reconcile(&k, &cfg, &up, &devs, &own, &peers).await.unwrap();
    assert!(ops.is_empty(), "{ops:?}");
    // flannel's udp lease: no BackendData.
    assert_eq!(
        lease_attrs(&cfg, &up, &devs).to_json(),
        r#"{"PublicIP":"198.18.0.11","BackendType":"udp"}"#
    );
}
