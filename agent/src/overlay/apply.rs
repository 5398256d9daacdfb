//! The kernel side of the loop, over the [`Kernel`] seam: the backend's devices, observing what
//! the overlay owns, applying a plan, and [`reconcile`], the three in a row.
//!
//! Idempotent throughout: devices are found before they are made, entries are replaced, not
//! added, and a reconcile of a correct state reads and changes nothing. One failed operation
//! does not keep the others from being applied.

use std::net::IpAddr;

use crate::overlay::backend::{DeviceSpec, for_kind};
use crate::overlay::config::NetworkConfig;
use crate::overlay::desired::{desired, overlay_mtu};
use crate::overlay::kernel::{Kernel, KernelError, LinkInfo, VxlanSpec};
use crate::overlay::lease::{Lease, LeaseSubnets};
use crate::overlay::plan::{Observed, Op, owned_route, plan};
use crate::overlay::{Device, Devices, Uplink};

/// Makes sure each device the backend needs is there, up, with the right MTU: a VXLAN device
/// with compatible attributes (an incompatible one — other VNI, local address or port — is
/// deleted and created anew), a TUN device of the backend's data path found.
pub async fn ensure_devices<K: Kernel>(
    k: &K,
    cfg: &NetworkConfig,
    uplink: &Uplink,
) -> Result<Devices, KernelError> {
    let mtu = overlay_mtu(cfg, uplink);
    let mut devices = Devices::default();
    for (v6, spec) in for_kind(cfg.backend.kind).devices(cfg, uplink, mtu) {
        let dev = match spec {
            DeviceSpec::Vxlan(spec) => ensure_vxlan(k, &spec).await?,
            DeviceSpec::Tun { name, mtu } => ensure_tun(k, name, mtu).await?,
        };
        if v6 {
            devices.v6 = Some(dev);
        } else {
            devices.v4 = Some(dev);
        }
    }
    Ok(devices)
}

async fn ensure_vxlan<K: Kernel>(k: &K, spec: &VxlanSpec) -> Result<Device, KernelError> {
    let links = k.links().await?;
    let mut link = links.iter().find(|l| l.name == spec.name).cloned();
    if let Some(l) = &link
        && !spec.compatible(l)
    {
        tracing::warn!(device = %spec.name, existing = ?l.vxlan, "incompatible VXLAN device, recreating");
        k.delete_link(l.index).await?;
        link = None;
    }
    let link = if let Some(l) = link {
        l
    } else {
        k.create_vxlan(spec).await?;
        find_link(k, &spec.name).await?
    };
    if !link.up || link.mtu != spec.mtu {
        k.set_up(link.index, spec.mtu).await?;
    }
    Ok(Device {
        index: link.index,
        name: spec.name.clone(),
        mac: link
            .mac
            .ok_or_else(|| KernelError::NotFound(format!("MAC of {}", spec.name)))?,
        mtu: spec.mtu,
    })
}

/// The udp backend made the TUN device (it holds its queues); here it is only found, kept up at
/// the overlay MTU, and handed to the reconciler for its address and route.
async fn ensure_tun<K: Kernel>(k: &K, name: String, mtu: u32) -> Result<Device, KernelError> {
    let link = k
        .links()
        .await?
        .into_iter()
        .find(|l| l.name == name)
        .ok_or_else(|| KernelError::NotFound(format!("TUN device {name}")))?;
    if !link.up || link.mtu != mtu {
        k.set_up(link.index, mtu).await?;
    }
    Ok(Device {
        index: link.index,
        name: link.name,
        mac: [0; 6],
        mtu,
    })
}

async fn find_link<K: Kernel>(k: &K, name: &str) -> Result<LinkInfo, KernelError> {
    k.links()
        .await?
        .into_iter()
        .find(|l| l.name == name)
        .ok_or_else(|| KernelError::NotFound(format!("link {name}")))
}

/// Reads the part of the kernel state the overlay owns.
pub async fn observe<K: Kernel>(
    k: &K,
    cfg: &NetworkConfig,
    devices: &Devices,
) -> Result<Observed, KernelError> {
    let mut o = Observed::default();
    let dev_indices: Vec<u32> = [&devices.v4, &devices.v6]
        .into_iter()
        .flatten()
        .map(|d| d.index)
        .collect();
    if !dev_indices.is_empty() {
        o.addrs = k
            .addresses()
            .await?
            .into_iter()
            .filter(|a| dev_indices.contains(&a.ifindex))
            .filter(|a| !matches!(a.net.addr(), IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .collect();
    }
    for (enabled, v6) in [(cfg.enable_ipv4, false), (cfg.enable_ipv6, true)] {
        if enabled {
            o.routes.extend(
                k.routes(v6)
                    .await?
                    .into_iter()
                    .filter(|r| owned_route(r, devices)),
            );
        }
    }
    for i in dev_indices {
        o.neighs.extend(k.neighbours(i).await?);
        o.fdb.extend(k.fdb(i).await?);
    }
    Ok(o)
}

/// Applies a plan. Every operation is attempted; the first error is returned after the rest ran,
/// so one bad peer does not keep the others from being programmed.
pub async fn apply<K: Kernel>(k: &K, ops: &[Op]) -> Result<(), KernelError> {
    let mut first_err = None;
    for op in ops {
        tracing::debug!(?op, "apply");
        let r = match op {
            Op::AddAddr(a) => k.add_address(*a).await,
            Op::DelAddr(a) => k.del_address(*a).await,
            Op::ReplaceFdb(f) => k.replace_fdb(f).await,
            Op::ReplaceNeigh(n) => k.replace_neigh(n).await,
            Op::ReplaceRoute(r) => k.replace_route(r).await,
            Op::DelRoute(r) => k.del_route(r).await,
            Op::DelNeigh(n) => k.del_neigh(n).await,
            Op::DelFdb(f) => k.del_fdb(f).await,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, ?op, "kernel operation failed");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Observes, plans and applies; returns the operations applied.
pub async fn reconcile<K: Kernel>(
    k: &K,
    cfg: &NetworkConfig,
    uplink: &Uplink,
    devices: &Devices,
    own: &LeaseSubnets,
    peers: &[Lease],
) -> Result<Vec<Op>, KernelError> {
    let want = desired(cfg, uplink, devices, own, peers);
    let have = observe(k, cfg, devices).await?;
    let ops = plan(&want, &have);
    apply(k, &ops).await?;
    Ok(ops)
}
