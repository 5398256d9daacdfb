//! The overlay backends as a user meets them: the network config that picks one, the device it
//! makes, the MTU it gives pods, the lease it publishes. The overlay suite runs its scenarios
//! once per backend with these facts; `cargo xtask rig` and the benchmarks pick a backend by the
//! same type.

use std::fmt;
use std::net::Ipv4Addr;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// An overlay backend, as in the network config's `Backend.Type`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// Kernel VXLAN (`flannel.1`).
    Vxlan,
    /// Plain routes via the peer node.
    HostGw,
    /// Userspace UDP encapsulation over TUN.
    Udp,
}

impl Backend {
    /// Every backend, in report order.
    pub const ALL: [Backend; 3] = [Backend::Vxlan, Backend::HostGw, Backend::Udp];

    /// The name in the network config (`host-gw`).
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
            Backend::Udp => "udp",
        }
    }

    /// The network config twill's rigs use for this backend.
    pub fn network_config(self) -> String {
        self.network_config_with("")
    }

    /// The network config with more top-level fields: `extra` is JSON members, without the
    /// braces (`"SubnetLen":26`).
    pub fn network_config_with(self, extra: &str) -> String {
        let sep = if extra.is_empty() { "" } else { "," };
        format!(
            r#"{{"Network":"10.244.0.0/16"{sep}{extra},"Backend":{{"Type":"{}"}}}}"#,
            self.as_str()
        )
    }

    /// The device twilld makes for the overlay (`flannel.1`, `flannel0`); host-gw makes none.
    pub fn device(self) -> Option<&'static str> {
        match self {
            Backend::Vxlan => Some("flannel.1"),
            Backend::HostGw => None,
            Backend::Udp => Some("flannel0"),
        }
    }

    /// The pods' MTU on a 1500-byte uplink (the rig's): the uplink's minus the encapsulation.
    pub fn pod_mtu(self) -> u32 {
        match self {
            Backend::Vxlan => 1450,
            Backend::HostGw => 1500,
            Backend::Udp => 1472,
        }
    }

    /// A peer lease's value as flannel writes it for this backend: `public_ip`, and for VXLAN
    /// the VTEP's `mac`.
    pub fn lease_value(self, public_ip: Ipv4Addr, mac: &str) -> String {
        match self {
            Backend::Vxlan => format!(
                r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
            ),
            Backend::HostGw => format!(
                r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}}"#
            ),
            Backend::Udp => {
                format!(r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"udp"}}"#)
            }
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_and_leases_are_json() {
        for b in Backend::ALL {
            let cfg: serde_json::Value = serde_json::from_str(&b.network_config()).unwrap();
            assert_eq!(cfg["Backend"]["Type"], b.as_str());
            let cfg: serde_json::Value =
                serde_json::from_str(&b.network_config_with(r#""SubnetLen":26"#)).unwrap();
            assert_eq!(cfg["SubnetLen"], 26);
            let lease: serde_json::Value = serde_json::from_str(
                &b.lease_value(Ipv4Addr::new(198, 18, 0, 13), "0e:00:00:00:00:01"),
            )
            .unwrap();
            assert_eq!(lease["BackendType"], b.as_str());
            assert_eq!(lease["PublicIP"], "198.18.0.13");
        }
    }
}
