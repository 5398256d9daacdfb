//! The plan: the minimal list of kernel operations from what the kernel has (as far as the
//! overlay owns it, see the ownership notes of [`crate::overlay`]) to what the overlay wants.
//! Pure; the order of the operations is the one a packet needs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::overlay::kernel::{Addr, Fdb, Neigh, PROTO_KERNEL, PROTO_TWILL, Route};
use crate::overlay::{Desired, Devices};

/// What the kernel has that the overlay owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Addresses on the VXLAN devices.
    pub addrs: Vec<Addr>,
    /// Main-table routes twill owns (see the module notes).
    pub routes: Vec<Route>,
    /// Permanent neighbours on the VXLAN devices.
    pub neighs: Vec<Neigh>,
    /// FDB entries on the VXLAN devices.
    pub fdb: Vec<Fdb>,
}

/// Whether a route read from the kernel is twill's: it carries twill's mark, or (adopted from
/// an older version, see the module notes) it leaves through one of twill's own devices and the
/// kernel did not make it.
pub fn owned_route(route: &Route, devices: &Devices) -> bool {
    route.proto == PROTO_TWILL
        || (route.proto != PROTO_KERNEL
            && [&devices.v4, &devices.v6]
                .into_iter()
                .flatten()
                .any(|d| d.index == route.oif))
}

/// One kernel operation of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Add an address to a VXLAN device.
    AddAddr(Addr),
    /// Remove a stale address.
    DelAddr(Addr),
    /// Add or fix an FDB entry.
    ReplaceFdb(Fdb),
    /// Add or fix a neighbour.
    ReplaceNeigh(Neigh),
    /// Add or fix a route.
    ReplaceRoute(Route),
    /// Remove a route.
    DelRoute(Route),
    /// Remove a neighbour.
    DelNeigh(Neigh),
    /// Remove an FDB entry.
    DelFdb(Fdb),
}

/// The entries of `desired` that `observed` lacks.
fn missing<'a, T: Ord + Clone>(
    desired: &'a BTreeSet<T>,
    observed: &'a [T],
) -> impl Iterator<Item = T> + 'a {
    let observed: BTreeSet<&T> = observed.iter().collect();
    desired
        .iter()
        .filter(move |e| !observed.contains(e))
        .cloned()
}

/// The minimal list of operations that turns `observed` into `desired`. Additions come in the
/// order a packet needs them (FDB, neighbour, then route); removals in the reverse order, so no
/// packet is routed into an entry that is not there.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<Op> {
    let mut ops = Vec::new();
    for a in &desired.addrs {
        if !observed.addrs.contains(a) {
            ops.push(Op::AddAddr(*a));
        }
    }
    ops.extend(missing(&desired.fdb, &observed.fdb).map(Op::ReplaceFdb));
    ops.extend(missing(&desired.neighs, &observed.neighs).map(Op::ReplaceNeigh));
    // Routes are keyed by destination: one route per peer subnet.
    let mut observed_routes: BTreeMap<IpNet, Vec<&Route>> = BTreeMap::new();
    for r in &observed.routes {
        observed_routes.entry(r.dst).or_default().push(r);
    }
    let desired_dsts: BTreeSet<IpNet> = desired.routes.iter().map(|r| r.dst).collect();
    for r in &desired.routes {
        let present = observed_routes
            .get(&r.dst)
            .is_some_and(|v| v.len() == 1 && v[0] == r);
        if !present {
            ops.push(Op::ReplaceRoute(r.clone()));
        }
    }
    for r in &observed.routes {
        if !desired_dsts.contains(&r.dst) {
            ops.push(Op::DelRoute(r.clone()));
        }
    }
    let desired_neigh_keys: BTreeSet<(u32, IpAddr)> =
        desired.neighs.iter().map(|n| (n.ifindex, n.ip)).collect();
    for n in &observed.neighs {
        if !desired_neigh_keys.contains(&(n.ifindex, n.ip)) {
            ops.push(Op::DelNeigh(n.clone()));
        }
    }
    for f in &observed.fdb {
        if !desired.fdb.contains(f) {
            ops.push(Op::DelFdb(f.clone()));
        }
    }
    for a in &observed.addrs {
        if !desired.addrs.contains(a) {
            ops.push(Op::DelAddr(*a));
        }
    }
    ops
}
