//! The real kernel seam over rtnetlink.
//!
//! Requests are built from rtnetlink's message builders; dumps are read whole and filtered here
//! (the kernel's dump filters differ between families and versions, a full dump of one table is
//! cheap at the sizes an overlay has). "Already there" on add and "not there" on delete are
//! success: the reconciler may race an admin or a previous incarnation of itself.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use super::{Addr, Fdb, Kernel, KernelError, LinkInfo, Neigh, Route, VxlanAttrs, VxlanSpec};

const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EADDRNOTAVAIL: i32 = 99;
const ENODEV: i32 = 19;

/// rtnetlink on a connection owned by this value (its task runs on the current runtime).
pub struct Netlink {
    handle: Handle,
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

fn nl(
    op: &'static str,
    object: impl std::fmt::Display,
) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    let object = object.to_string();
    move |source| KernelError::Netlink { op, object, source }
}

/// Sends `req` (a neighbour or an FDB entry) as a REPLACE of a permanent entry.
async fn replace_permanent(
    req: rtnetlink::NeighbourAddRequest,
    op: &'static str,
    entry: &impl std::fmt::Debug,
) -> Result<(), KernelError> {
    req.state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(nl(op, format!("{entry:?}")))
}

/// Reads a whole dump of `what`.
async fn dump<T>(
    what: &'static str,
    msgs: impl futures::Stream<Item = Result<T, rtnetlink::Error>>,
) -> Result<Vec<T>, KernelError> {
    msgs.try_collect().await.map_err(nl("dump", what))
}

/// A neighbour or FDB entry's destination attribute.
fn neigh_destination(ip: IpAddr) -> NeighbourAttribute {
    NeighbourAttribute::Destination(match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    })
}

/// Maps "already exists" to success.
fn tolerate_exists(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
        other => other,
    }
}

/// Maps "no such object" to success.
fn tolerate_absent(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH | EADDRNOTAVAIL | ENODEV)) => {
            tracing::debug!(error = %e, "already absent");
            Ok(())
        }
        other => other,
    }
}

fn mac6(bytes: &[u8]) -> Option<[u8; 6]> {
    bytes.try_into().ok()
}

impl Netlink {
    /// Opens a netlink connection in the current network namespace and spawns its driver on the
    /// current tokio runtime.
    pub fn connect() -> Result<Self, KernelError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(KernelError::Connect)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    fn route_message(route: &Route) -> RouteMessage {
        let dst = route.dst;
        // Neither can fail: an `IpNet` is a valid prefix, and a gateway of another family than
        // the destination's is left out.
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .expect("an IpNet is a valid destination prefix")
            .output_interface(route.oif);
        if let Some(g) = route
            .gateway
            .filter(|g| g.is_ipv4() == dst.addr().is_ipv4())
        {
            b = b
                .gateway(g)
                .expect("the gateway is of the destination's family");
        }
        let mut msg = b.build();
        msg.header.protocol = RouteProtocol::from(route.proto);
        msg.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if route.onlink {
            msg.header.flags |= RouteFlags::Onlink;
        }
        msg
    }

    fn neigh_message(family: AddressFamily, ifindex: u32) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = family;
        m.header.ifindex = ifindex;
        m.header.state = NeighbourState::Permanent;
        m.header.kind = RouteType::Unspec;
        m
    }
}

fn parse_link(msg: &netlink_packet_route::link::LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        vxlan: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name.clone_from(n),
            LinkAttribute::Address(a) => info.mac = mac6(a),
            LinkAttribute::Mtu(m) => info.mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                let is_vxlan = infos
                    .iter()
                    .any(|i| matches!(i, NlLinkInfo::Kind(InfoKind::Vxlan)));
                if !is_vxlan {
                    continue;
                }
                let mut v = VxlanAttrs {
                    vni: 0,
                    local: None,
                    uplink: None,
                    port: 0,
                    learning: true,
                };
                for i in infos {
                    if let NlLinkInfo::Data(InfoData::Vxlan(data)) = i {
                        for d in data {
                            match d {
                                InfoVxlan::Id(id) => v.vni = *id,
                                InfoVxlan::Local(a) => v.local = Some(IpAddr::V4(*a)),
                                InfoVxlan::Local6(a) => v.local = Some(IpAddr::V6(*a)),
                                InfoVxlan::Link(l) => v.uplink = Some(*l),
                                InfoVxlan::Port(p) => v.port = *p,
                                InfoVxlan::Learning(l) => v.learning = *l,
                                _ => {}
                            }
                        }
                    }
                }
                info.vxlan = Some(v);
            }
            _ => {}
        }
    }
    info
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn neigh_fields(msg: &NeighbourMessage) -> (Option<IpAddr>, Option<[u8; 6]>) {
    let mut ip = None;
    let mut mac = None;
    for a in &msg.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6));
            }
            // AF_BRIDGE (FDB) entries carry the remote VTEP as raw bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(raw)) => {
                ip = match raw.len() {
                    4 => <[u8; 4]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
                    _ => None,
                };
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = mac6(l),
            _ => {}
        }
    }
    (ip, mac)
}

impl Kernel for Netlink {
    async fn links(&self) -> Result<Vec<LinkInfo>, KernelError> {
        let msgs = dump("links", self.handle.link().get().execute()).await?;
        Ok(msgs.iter().map(parse_link).collect())
    }

    async fn addresses(&self) -> Result<Vec<Addr>, KernelError> {
        let msgs = dump("addresses", self.handle.address().get().execute()).await?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS
                // otherwise. Prefer LOCAL when present.
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let addr = local.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })?;
                Some(Addr {
                    ifindex: m.header.index,
                    net: IpNet::new(addr, m.header.prefix_len).ok()?,
                })
            })
            .collect())
    }

    async fn routes(&self, v6: bool) -> Result<Vec<Route>, KernelError> {
        let query = if v6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        let msgs = dump("routes", self.handle.route().get(query).execute()).await?;
        Ok(msgs
            .iter()
            .filter(|m| {
                let table = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(m.header.table));
                table == u32::from(RouteHeader::RT_TABLE_MAIN)
                    && m.header.kind == RouteType::Unicast
            })
            .filter_map(|m| {
                let mut dst = None;
                let mut gateway = None;
                let mut oif = 0;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(d) => dst = route_addr(d),
                        RouteAttribute::Gateway(g) => gateway = route_addr(g),
                        RouteAttribute::Oif(o) => oif = *o,
                        _ => {}
                    }
                }
                let dst = dst.unwrap_or(if v6 {
                    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                });
                Some(Route {
                    dst: IpNet::new(dst, m.header.destination_prefix_length).ok()?,
                    gateway,
                    oif,
                    onlink: m.header.flags.contains(RouteFlags::Onlink),
                    proto: u8::from(m.header.protocol),
                })
            })
            .collect())
    }

    async fn neighbours(&self, ifindex: u32) -> Result<Vec<Neigh>, KernelError> {
        let msgs = dump("neighbours", self.handle.neighbours().get().execute()).await?;
        Ok(msgs
            .iter()
            .filter(|m| {
                m.header.ifindex == ifindex
                    && m.header.state == NeighbourState::Permanent
                    && matches!(m.header.family, AddressFamily::Inet | AddressFamily::Inet6)
            })
            .filter_map(|m| {
                let (ip, mac) = neigh_fields(m);
                Some(Neigh {
                    ifindex,
                    ip: ip?,
                    mac: mac?,
                })
            })
            .collect())
    }

    async fn fdb(&self, ifindex: u32) -> Result<Vec<Fdb>, KernelError> {
        let msgs = dump(
            "fdb",
            self.handle
                .neighbours()
                .get()
                .set_address_family(AddressFamily::Bridge)
                .execute(),
        )
        .await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == ifindex)
            .filter_map(|m| {
                let (ip, mac) = neigh_fields(m);
                Some(Fdb {
                    ifindex,
                    mac: mac?,
                    dst: ip?,
                })
            })
            .collect())
    }

    async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<(), KernelError> {
        let mut b = LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.uplink)
            .port(spec.port)
            .learning(false)
            .mtu(spec.mtu);
        b = match spec.local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        };
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(nl("create vxlan", &spec.name))
    }

    async fn delete_link(&self, ifindex: u32) -> Result<(), KernelError> {
        tolerate_absent(self.handle.link().del(ifindex).execute().await)
            .map_err(nl("delete link", ifindex))
    }

    async fn set_up(&self, ifindex: u32, mtu: u32) -> Result<(), KernelError> {
        let msg = LinkUnspec::new_with_index(ifindex).mtu(mtu).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl("set up", ifindex))
    }

    async fn add_address(&self, addr: Addr) -> Result<(), KernelError> {
        tolerate_exists(
            self.handle
                .address()
                .add(addr.ifindex, addr.net.addr(), addr.net.prefix_len())
                .execute()
                .await,
        )
        .map_err(nl(
            "add address",
            format!("{} dev {}", addr.net, addr.ifindex),
        ))
    }

    async fn del_address(&self, addr: Addr) -> Result<(), KernelError> {
        let msgs = dump(
            "addresses",
            self.handle
                .address()
                .get()
                .set_link_index_filter(addr.ifindex)
                .set_address_filter(addr.net.addr())
                .execute(),
        )
        .await?;
        for m in msgs {
            if m.header.prefix_len == addr.net.prefix_len() {
                tolerate_absent(self.handle.address().del(m).execute().await)
                    .map_err(nl("delete address", addr.net))?;
            }
        }
        Ok(())
    }

    async fn replace_route(&self, route: &Route) -> Result<(), KernelError> {
        self.handle
            .route()
            .add(Self::route_message(route))
            .replace()
            .execute()
            .await
            .map_err(nl("replace route", format!("{route:?}")))
    }

    async fn del_route(&self, route: &Route) -> Result<(), KernelError> {
        let mut msg = Self::route_message(route);
        // Match on destination, gateway, table, device and protocol (the kernel deletes only a
        // route of the protocol given, so a route someone else wrote with the same destination
        // is never taken along); not on scope, which the kernel may have stored differently.
        msg.header.scope = RouteScope::NoWhere;
        tolerate_absent(self.handle.route().del(msg).execute().await)
            .map_err(nl("delete route", format!("{route:?}")))
    }

    async fn replace_neigh(&self, neigh: &Neigh) -> Result<(), KernelError> {
        let req = self
            .handle
            .neighbours()
            .add(neigh.ifindex, neigh.ip)
            .link_layer_address(&neigh.mac);
        replace_permanent(req, "replace neighbour", neigh).await
    }

    async fn del_neigh(&self, neigh: &Neigh) -> Result<(), KernelError> {
        let family = if neigh.ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let mut m = Self::neigh_message(family, neigh.ifindex);
        m.attributes.push(neigh_destination(neigh.ip));
        tolerate_absent(self.handle.neighbours().del(m).execute().await)
            .map_err(nl("delete neighbour", format!("{neigh:?}")))
    }

    async fn replace_fdb(&self, fdb: &Fdb) -> Result<(), KernelError> {
        let req = self
            .handle
            .neighbours()
            .add_bridge(fdb.ifindex, &fdb.mac)
            .destination(fdb.dst)
            .flags(NeighbourFlags::Own);
        replace_permanent(req, "replace fdb", fdb).await
    }

    async fn del_fdb(&self, fdb: &Fdb) -> Result<(), KernelError> {
        let mut m = Self::neigh_message(AddressFamily::Bridge, fdb.ifindex);
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(fdb.mac.to_vec()));
        m.attributes.push(neigh_destination(fdb.dst));
        tolerate_absent(self.handle.neighbours().del(m).execute().await)
            .map_err(nl("delete fdb", format!("{fdb:?}")))
    }

    async fn set_sysctl(&self, key: &str, value: &str) -> Result<(), KernelError> {
        let path = format!("/proc/sys/{key}");
        tokio::fs::write(&path, value)
            .await
            .map_err(|source| KernelError::Io {
                op: "write",
                path,
                source,
            })
    }
}
