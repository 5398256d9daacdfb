//! The real [`Dataplane`]: rtnetlink 0.24 on a tokio current-thread runtime.
//!
//! Shape, and why:
//! - One netlink socket per network namespace, opened lazily. The pod's socket is created on a
//!   short-lived helper thread that `setns(2)`s into the pod's netns first: a socket stays bound
//!   to the namespace it was created in, so every later request on it acts inside the pod, while
//!   the plugin's own threads never leave the node's namespace (setns changes only the calling
//!   thread). The socket is then driven by the same runtime as the host one.
//! - The pod end of the veth is created directly inside the pod (`IFLA_NET_NS_FD` on the peer),
//!   already named `CNI_IFNAME`, with its MAC and MTU; the host end is created enslaved to the
//!   bridge and up. (The pod end cannot be created up: the kernel configures the peer before the
//!   pair is linked, and opening an unpaired veth fails with ENOTCONN.) One `RTM_NEWLINK` instead of create/move/rename/set, and a taken
//!   `CNI_IFNAME` fails the whole creation atomically, leaving nothing to undo.
//! - Dumps go through `dump`, which checks `NLM_F_DUMP_INTR` on every message (the connection
//!   forwards `NLMSG_DONE` so a flag set on it is seen too) and starts the dump again, like the
//!   reference plugins' `netlinksafe`.
//! - Requests other than dumps use rtnetlink's builders; their errors keep the errno.
//!
//! Kernel requirements: veth peer in another netns by fd (2.6.33+), bridge port hairpin through
//! `IFLA_INFO_SLAVE_DATA` (3.9+), `IFA_F_NODAD` (2.6.28+); all far below the 6.x here.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use futures::StreamExt;
use ipnet::IpNet;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::sys::{AsyncSocket, TokioSocket, protocols::NETLINK_ROUTE};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder,
};
use tracing::{debug, instrument};

use crate::dataplane::{
    BridgeSpec, ContainerSpec, ContainerState, Dataplane, HostPort, LinkState, NetError, Netns,
    VethSpec,
};

/// How often an interrupted dump is restarted before giving up.
const DUMP_TRIES: usize = 10;

fn op_err(op: &'static str, object: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let object = object.into();
    move |source| NetError::Op { op, object, source }
}

fn nl_to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// rtnetlink's connections on one current-thread runtime: the node's, and the pod's.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    host: Option<Handle>,
    pod: Option<(PathBuf, Handle)>,
}

impl Netlink {
    /// A runtime without worker threads; sockets are opened on first use.
    pub fn new() -> Result<Self, NetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(op_err("start", "tokio runtime"))?;
        Ok(Netlink {
            rt,
            host: None,
            pod: None,
        })
    }

    fn connect(&self, socket: TokioSocket) -> Handle {
        let (mut conn, handle, _) = rtnetlink::from_socket(socket);
        conn.set_forward_done(true);
        self.rt.spawn(conn);
        handle
    }

    fn host(&mut self) -> Result<Handle, NetError> {
        if let Some(h) = &self.host {
            return Ok(h.clone());
        }
        let socket = {
            let _guard = self.rt.enter();
            TokioSocket::new(NETLINK_ROUTE).map_err(op_err("open netlink socket", "node"))?
        };
        let h = self.connect(socket);
        self.host = Some(h.clone());
        Ok(h)
    }

    fn pod(&mut self, netns: &Netns) -> Result<Handle, NetError> {
        if let Some((p, h)) = &self.pod
            && *p == netns.path
        {
            return Ok(h.clone());
        }
        let socket = socket_in_netns(self.rt.handle(), netns)?;
        let h = self.connect(socket);
        self.pod = Some((netns.path.clone(), h.clone()));
        Ok(h)
    }
}

/// Opens a netlink socket inside `netns`, from a helper thread that enters it (setns affects
/// only the calling thread; this one ends right after). The socket is registered with `rt`'s
/// reactor and stays bound to `netns` wherever it is used from.
fn socket_in_netns(rt: &tokio::runtime::Handle, netns: &Netns) -> Result<TokioSocket, NetError> {
    let path = netns.path.display().to_string();
    let ns = netns.file.as_fd();
    std::thread::scope(|s| {
        s.spawn(|| {
            let _guard = rt.enter();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| op_err("setns", path.clone())(io::Error::from(e)))?;
            TokioSocket::new(NETLINK_ROUTE).map_err(op_err("open netlink socket in", path.clone()))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetError::Unexpected {
                object: path.clone(),
                reason: "netns helper thread panicked".into(),
            })
        })
    })
}

/// [`dump`] with `request`, each message turned into a `T` by `keep` or dropped.
async fn dump_map<T>(
    handle: &mut Handle,
    request: RouteNetlinkMessage,
    keep: impl FnMut(&RouteNetlinkMessage) -> Option<T>,
) -> io::Result<Vec<T>> {
    Ok(dump(handle, request)
        .await?
        .iter()
        .filter_map(keep)
        .collect())
}

/// The address an address message gives its interface, with the prefix: IFA_LOCAL (the
/// interface's own address on point-to-point links) when present, IFA_ADDRESS otherwise.
fn address_of(a: &AddressMessage) -> Option<IpNet> {
    let (mut local, mut address) = (None, None);
    for attr in &a.attributes {
        match attr {
            AddressAttribute::Local(ip) => {
                local.get_or_insert(*ip);
            }
            AddressAttribute::Address(ip) => {
                address.get_or_insert(*ip);
            }
            _ => {}
        }
    }
    IpNet::new(local.or(address)?, a.header.prefix_len).ok()
}

/// The destination (the default route when the message names none) and the gateway of a route
/// through interface `index`; `None` for a route through another interface.
fn route_through(r: &RouteMessage, index: u32) -> Option<(IpNet, Option<IpAddr>)> {
    let mut oif = None;
    let (mut dst, mut gw) = (None, None);
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(d) => dst = route_addr(d),
            RouteAttribute::Gateway(g) => gw = route_addr(g),
            _ => {}
        }
    }
    if oif != Some(index) {
        return None;
    }
    let v4 = matches!(
        r.header.address_family,
        rtnetlink::packet_route::AddressFamily::Inet
    );
    let dst = dst.unwrap_or(if v4 {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    });
    Some((
        IpNet::new(dst, r.header.destination_prefix_length).ok()?,
        gw,
    ))
}

/// A dump, restarted while the kernel flags it `NLM_F_DUMP_INTR` (the table changed under it).
async fn dump(
    handle: &mut Handle,
    request: RouteNetlinkMessage,
) -> io::Result<Vec<RouteNetlinkMessage>> {
    for _ in 0..DUMP_TRIES {
        let mut req = NetlinkMessage::from(request.clone());
        req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut stream = handle.request(req).map_err(nl_to_io)?;
        let (mut out, mut interrupted) = (Vec::new(), false);
        while let Some(msg) = stream.next().await {
            interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
            match msg.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                _ => {}
            }
        }
        if !interrupted {
            return Ok(out);
        }
        debug!("netlink dump interrupted, restarting");
    }
    Err(io::Error::new(
        io::ErrorKind::Interrupted,
        format!("dump interrupted {DUMP_TRIES} times in a row"),
    ))
}

/// One request answered by an ACK (or an error).
async fn ack(handle: &mut Handle, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut stream = handle.request(req).map_err(nl_to_io)?;
    while let Some(m) = stream.next().await {
        if let NetlinkPayload::Error(e) = m.payload
            && e.code.is_some()
        {
            return Err(e.to_io());
        }
    }
    Ok(())
}

/// `RTM_GETLINK` by name; `None` on ENODEV.
async fn get_link(handle: &mut Handle, name: &str) -> io::Result<Option<LinkMessage>> {
    let msg = LinkUnspec::new_with_name(name).build();
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetLink(msg));
    req.header.flags = NLM_F_REQUEST;
    let mut stream = handle.request(req).map_err(nl_to_io)?;
    let mut found = None;
    while let Some(m) = stream.next().await {
        match m.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => found = Some(l),
            NetlinkPayload::Error(e) if e.code.is_some() => {
                let err = e.to_io();
                if err.raw_os_error() == Some(libc::ENODEV) {
                    return Ok(None);
                }
                return Err(err);
            }
            _ => {}
        }
    }
    Ok(found)
}

fn link_state(m: &LinkMessage) -> LinkState {
    let mut s = LinkState {
        index: m.header.index,
        up: m.header.flags.contains(LinkFlags::Up),
        ..LinkState::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => s.name.clone_from(n),
            LinkAttribute::Controller(i) => s.master = Some(*i),
            LinkAttribute::Mtu(v) => s.mtu = Some(*v),
            LinkAttribute::IfAlias(v) => s.alias = Some(v.clone()),
            LinkAttribute::Address(mac) => s.mac = <[u8; 6]>::try_from(mac.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        s.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    s
}

fn address_message(index: u32, addr: IpNet) -> AddressMessage {
    let mut m = match addr.addr() {
        IpAddr::V4(a) => rtnetlink::AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(index)
            .address(a, addr.prefix_len())
            .build(),
        IpAddr::V6(a) => rtnetlink::AddressMessageBuilder::<std::net::Ipv6Addr>::new()
            .index(index)
            .address(a, addr.prefix_len())
            .build(),
    };
    if addr.addr().is_ipv6() {
        // No duplicate address detection: the subnet is ours, and a tentative address would
        // leave the pod without IPv6 for a second or more after ADD returns.
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    m
}

/// `RTM_NEWADDR`, tolerating EEXIST.
async fn add_address(
    handle: &mut Handle,
    index: u32,
    addr: IpNet,
    on: &str,
) -> Result<(), NetError> {
    match ack(
        handle,
        RouteNetlinkMessage::NewAddress(address_message(index, addr)),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .await
    {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
            Err(op_err("add address", format!("{addr} on {on}"))(e))
        }
        _ => Ok(()),
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

fn route_message(
    index: u32,
    dst: IpNet,
    gw: Option<IpAddr>,
    onlink: bool,
) -> io::Result<RouteMessage> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .map_err(invalid)?
        .output_interface(index);
    match gw {
        Some(g) => {
            b = b.gateway(g).map_err(invalid)?;
            if onlink {
                b = b.onlink();
            }
        }
        None => b = b.scope(RouteScope::Link),
    }
    Ok(b.build())
}

/// `RTM_NEWROUTE`, tolerating EEXIST.
async fn add_route(
    handle: &mut Handle,
    msg: RouteMessage,
    what: impl FnOnce() -> String,
) -> Result<(), NetError> {
    match ack(
        handle,
        RouteNetlinkMessage::NewRoute(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .await
    {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(op_err("add route", what())(e)),
        _ => Ok(()),
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

impl Dataplane for Netlink {
    #[instrument(skip(self), fields(bridge = %spec.name))]
    fn ensure_bridge(&mut self, spec: &BridgeSpec) -> Result<u32, NetError> {
        let mut h = self.host()?;
        self.rt.block_on(async {
            let existing = get_link(&mut h, &spec.name)
                .await
                .map_err(op_err("get link", &spec.name))?;
            let state = if let Some(m) = existing {
                link_state(&m)
            } else {
                {
                    let msg = LinkBridge::new(&spec.name)
                        .mtu(spec.mtu)
                        .address(spec.mac.to_vec())
                        .up()
                        .build();
                    match ack(
                        &mut h,
                        RouteNetlinkMessage::NewLink(msg),
                        NLM_F_CREATE | NLM_F_EXCL,
                    )
                    .await
                    {
                        // Lost a race with a concurrent ADD: fine, it is there now.
                        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                            return Err(op_err("create bridge", &spec.name)(e));
                        }
                        _ => {}
                    }
                    let m = get_link(&mut h, &spec.name)
                        .await
                        .map_err(op_err("get link", &spec.name))?
                        .ok_or_else(|| NetError::Unexpected {
                            object: spec.name.clone(),
                            reason: "bridge vanished right after creation".into(),
                        })?;
                    link_state(&m)
                }
            };
            if state.kind.as_deref() != Some("bridge") {
                return Err(NetError::Unexpected {
                    object: format!("link {}", spec.name),
                    reason: format!(
                        "exists and is a {}, not a bridge",
                        state.kind.as_deref().unwrap_or("device of unknown kind")
                    ),
                });
            }
            if !state.up {
                let msg = LinkUnspec::new_with_index(state.index).up().build();
                ack(&mut h, RouteNetlinkMessage::SetLink(msg), 0)
                    .await
                    .map_err(op_err("set up", &spec.name))?;
            }
            for a in &spec.addrs {
                add_address(&mut h, state.index, *a, &spec.name).await?;
            }
            Ok(state.index)
        })
    }

    #[instrument(skip(self, netns), fields(host = %spec.host, peer = %spec.peer))]
    fn create_veth(&mut self, netns: &Netns, spec: &VethSpec) -> Result<(), NetError> {
        let mut h = self.host()?;
        // Not `up`: the kernel configures the peer before the pair is linked, and opening a
        // veth without a peer fails with ENOTCONN. configure_container brings it up.
        let peer = LinkUnspec::new_with_name(&spec.peer)
            .mtu(spec.mtu)
            .address(spec.peer_mac.to_vec())
            .append_extra_attribute(LinkAttribute::NetNsFd(netns.file.as_raw_fd()))
            .build();
        let mut b = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(spec.host.clone())
            .mtu(spec.mtu)
            .address(spec.host_mac.to_vec())
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)));
        if let Some(m) = spec.master {
            b = b.controller(m);
        }
        let msg = b.build();
        self.rt
            .block_on(ack(
                &mut h,
                RouteNetlinkMessage::NewLink(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            ))
            .map_err(op_err(
                "create veth",
                format!(
                    "{} (peer {} in {})",
                    spec.host,
                    spec.peer,
                    netns.path.display()
                ),
            ))
    }

    #[instrument(skip(self), fields(port = %port.name))]
    fn setup_host_port(&mut self, port: &HostPort) -> Result<(), NetError> {
        let mut h = self.host()?;
        self.rt.block_on(async {
            // Addressed by name (index 0): the kernel looks the link up by IFLA_IFNAME, which
            // saves a GETLINK round trip on every ADD.
            let mut b = LinkBridgePort::new(0)
                .name(port.name.clone())
                .alias(port.alias.clone());
            if port.hairpin {
                b = b.append_info_data(InfoBridgePort::HairpinMode(true));
            }
            let mut msg = b.build();
            if !port.hairpin {
                // Not a bridge port: drop the (empty) port kind.
                msg.attributes
                    .retain(|a| !matches!(a, LinkAttribute::LinkInfo(_)));
            }
            ack(&mut h, RouteNetlinkMessage::NewLink(msg), 0)
                .await
                .map_err(op_err("set alias and hairpin on", &port.name))?;
            if port.routes.is_empty() {
                return Ok(());
            }
            let index = get_link(&mut h, &port.name)
                .await
                .map_err(op_err("get link", &port.name))?
                .ok_or_else(|| {
                    op_err("get link", &port.name)(io::Error::from_raw_os_error(libc::ENODEV))
                })?
                .header
                .index;
            for dst in &port.routes {
                let m = route_message(index, *dst, None, false)
                    .map_err(op_err("build route", dst.to_string()))?;
                add_route(&mut h, m, || format!("{dst} dev {}", port.name)).await?;
            }
            Ok(())
        })
    }

    #[instrument(skip(self, netns, spec), fields(netns = %netns.path.display(), ifname = %spec.ifname))]
    fn configure_container(&mut self, netns: &Netns, spec: &ContainerSpec) -> Result<(), NetError> {
        let mut h = self.pod(netns)?;
        let object = |what: &str| format!("{what} in {}", netns.path.display());
        self.rt.block_on(async {
            let index = get_link(&mut h, &spec.ifname)
                .await
                .map_err(op_err("get link", object(&spec.ifname)))?
                .ok_or_else(|| {
                    op_err("get link", object(&spec.ifname))(io::Error::from_raw_os_error(
                        libc::ENODEV,
                    ))
                })?
                .header
                .index;
            let up = LinkUnspec::new_with_index(index).up().build();
            ack(&mut h, RouteNetlinkMessage::SetLink(up), 0)
                .await
                .map_err(op_err("set up", object(&spec.ifname)))?;
            for a in &spec.addrs {
                add_address(&mut h, index, *a, &object(&spec.ifname)).await?;
            }
            for (ip, mac) in &spec.neighbours {
                h.neighbours()
                    .add(index, *ip)
                    .link_layer_address(mac)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| op_err("add neighbour", object(&ip.to_string()))(nl_to_io(e)))?;
            }
            for r in &spec.routes {
                let m = route_message(index, r.dst, r.gw, r.onlink)
                    .map_err(op_err("build route", r.dst.to_string()))?;
                add_route(&mut h, m, || object(&format!("{} via {:?}", r.dst, r.gw))).await?;
            }
            Ok(())
        })
    }

    #[instrument(skip(self))]
    fn delete_link(&mut self, name: &str) -> Result<bool, NetError> {
        let mut h = self.host()?;
        let msg = LinkUnspec::new_with_name(name).build();
        match self
            .rt
            .block_on(ack(&mut h, RouteNetlinkMessage::DelLink(msg), 0))
        {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(op_err("delete link", name)(e)),
        }
    }

    fn link(&mut self, name: &str) -> Result<Option<LinkState>, NetError> {
        let mut h = self.host()?;
        Ok(self
            .rt
            .block_on(get_link(&mut h, name))
            .map_err(op_err("get link", name))?
            .as_ref()
            .map(link_state))
    }

    fn links(&mut self) -> Result<Vec<LinkState>, NetError> {
        let mut h = self.host()?;
        let request = RouteNetlinkMessage::GetLink(LinkMessage::default());
        self.rt
            .block_on(dump_map(&mut h, request, |m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_state(l)),
                _ => None,
            }))
            .map_err(op_err("dump", "links"))
    }

    fn inspect_container(
        &mut self,
        netns: &Netns,
        ifname: &str,
    ) -> Result<Option<ContainerState>, NetError> {
        let mut h = self.pod(netns)?;
        let where_ = netns.path.display().to_string();
        self.rt.block_on(async {
            let Some(l) = get_link(&mut h, ifname)
                .await
                .map_err(op_err("get link", format!("{ifname} in {where_}")))?
            else {
                return Ok(None);
            };
            let link = link_state(&l);
            let request = RouteNetlinkMessage::GetAddress(AddressMessage::default());
            let addrs = dump_map(&mut h, request, |m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == link.index => address_of(a),
                _ => None,
            })
            .await
            .map_err(op_err("dump addresses in", where_.clone()))?;
            let request = RouteNetlinkMessage::GetRoute(RouteMessage::default());
            let routes = dump_map(&mut h, request, |m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_through(r, link.index),
                _ => None,
            })
            .await
            .map_err(op_err("dump routes in", where_.clone()))?;
            Ok(Some(ContainerState {
                link,
                addrs,
                routes,
            }))
        })
    }
}
