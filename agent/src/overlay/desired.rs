//! The desired overlay state: a pure function of the network config, the node (its uplink and
//! devices), its own subnets and the peer leases.
//!
//! What is common to every backend is here: the node's own address on each overlay device
//! (`<subnet>.0`, flannel's), skipping this node's own lease and leases of another backend
//! type, and one call per peer and address family into the backend
//! ([`Backend::peer_entries`]); what differs is behind [`Backend`].
//!
//! [`Backend`]: crate::overlay::backend::Backend
//! [`Backend::peer_entries`]: crate::overlay::backend::Backend::peer_entries

use std::net::IpAddr;

use ipnet::IpNet;

use crate::overlay::backend::{PeerFamily, for_kind};
use crate::overlay::config::NetworkConfig;
use crate::overlay::kernel::Addr;
use crate::overlay::lease::{Lease, LeaseAttrs, LeaseSubnets};
use crate::overlay::{Desired, Devices, Uplink};

/// The overlay MTU pods must use: `Backend.MTU` when set, else the uplink's less the
/// backend's overhead.
pub fn overlay_mtu(cfg: &NetworkConfig, uplink: &Uplink) -> u32 {
    cfg.backend.mtu.unwrap_or_else(|| {
        let overhead = for_kind(cfg.backend.kind).overhead(cfg);
        uplink.mtu.saturating_sub(overhead)
    })
}

/// What this node publishes in its lease.
pub fn lease_attrs(cfg: &NetworkConfig, uplink: &Uplink, devices: &Devices) -> LeaseAttrs {
    let backend = for_kind(cfg.backend.kind);
    let data = |d: &Option<_>| d.as_ref().and_then(|d| backend.lease_data(cfg, d));
    LeaseAttrs {
        public_ip: uplink.public_v4,
        public_ipv6: if cfg.enable_ipv6 {
            uplink.public_v6
        } else {
            None
        },
        backend_type: cfg.backend.kind.as_str().to_string(),
        backend_data: data(&devices.v4),
        backend_v6_data: data(&devices.v6),
        node_id: None,
    }
}

/// Computes the desired overlay state: a pure function of the config, the node and the leases.
pub fn desired(
    cfg: &NetworkConfig,
    uplink: &Uplink,
    devices: &Devices,
    own: &LeaseSubnets,
    peers: &[Lease],
) -> Desired {
    let backend = for_kind(cfg.backend.kind);
    let mut d = Desired::default();
    let own_nets = [
        (devices.v4.as_ref(), own.v4.map(IpNet::V4)),
        (devices.v6.as_ref(), own.v6.map(IpNet::V6)),
    ];
    for (dev, sn) in own_nets {
        if let (Some(dev), Some(sn)) = (dev, sn) {
            d.addrs.push(Addr {
                ifindex: dev.index,
                net: IpNet::new(sn.network(), sn.max_prefix_len()).expect("host prefix"),
            });
        }
    }
    backend.node_entries(&mut d, cfg, devices);
    for peer in peers {
        if peer.subnets == *own {
            continue;
        }
        if peer.attrs.backend_type != cfg.backend.kind.as_str() {
            tracing::debug!(peer = %peer.subnets.key(), backend = %peer.attrs.backend_type, "ignoring peer of another backend");
            continue;
        }
        let families = [
            (
                cfg.enable_ipv4,
                peer.subnets.v4.map(IpNet::V4),
                peer.attrs.public_ip.map(IpAddr::V4),
                devices.v4.as_ref(),
                false,
            ),
            (
                cfg.enable_ipv6,
                peer.subnets.v6.map(IpNet::V6),
                peer.attrs.public_ipv6.map(IpAddr::V6),
                devices.v6.as_ref(),
                true,
            ),
        ];
        for (enabled, subnet, public, dev, v6) in families {
            let (true, Some(subnet), Some(public)) = (enabled, subnet, public) else {
                continue;
            };
            let family = PeerFamily {
                subnet,
                vtep_ip: subnet.network(),
                public,
                attrs: &peer.attrs,
                v6,
                dev,
            };
            backend.peer_entries(&mut d, cfg, uplink, &family);
        }
    }
    d
}
