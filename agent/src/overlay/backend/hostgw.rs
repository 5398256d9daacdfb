//! The host-gw backend: no device and no encapsulation, one route per peer via the peer's public
//! address on the uplink, as flannel's.
//!
//! It works only between nodes on one L2 network: a peer whose public address is not on the
//! uplink's network gets no route (a warning says so), since the next hop would not be reachable
//! without a router that knows the pod subnets.

use crate::overlay::backend::{Backend, DeviceSpec, PeerFamily, direct_route, same_l2};
use crate::overlay::config::NetworkConfig;
use crate::overlay::{Desired, Device, Uplink};

/// The host-gw backend.
#[derive(Debug, Clone, Copy)]
pub struct HostGw;

impl Backend for HostGw {
    fn overhead(&self, _cfg: &NetworkConfig) -> u32 {
        0
    }

    fn devices(&self, _cfg: &NetworkConfig, _up: &Uplink, _mtu: u32) -> Vec<(bool, DeviceSpec)> {
        Vec::new()
    }

    fn lease_data(&self, _cfg: &NetworkConfig, _dev: &Device) -> Option<serde_json::Value> {
        None
    }

    fn peer_entries(
        &self,
        d: &mut Desired,
        _cfg: &NetworkConfig,
        uplink: &Uplink,
        peer: &PeerFamily<'_>,
    ) {
        if same_l2(uplink, peer.public) {
            d.routes.insert(direct_route(uplink, peer));
        } else {
            tracing::warn!(peer = %peer.subnet, public = %peer.public, "host-gw peer is not on this node's L2 network; no route");
        }
    }
}
