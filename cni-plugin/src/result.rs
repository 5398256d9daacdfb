//! The ADD result, one model for every version, rendered in the version the runtime asked for.
//!
//! Results differ little between versions: 0.3.x/0.4.0 tag each IP with `version` ("4"/"6"),
//! 1.0.0 drops it, 1.1.0 adds interface `mtu`/`socketPath`/`pciID` and route
//! `mtu`/`advmss`/`priority`/`table`/`scope`. So there is one struct, parsed leniently (a
//! `prevResult` from any version and any plugin, unknown keys kept in `extra`), and
//! [`CniResult::to_version`] writes the fields the target version has. Chaining (`portmap`
//! after twill, twill after something else) appends twill's interfaces, IPs and routes to the
//! previous result, shifting twill's interface indices past the ones already there.
//!
//! Why not a crate: `cni-plugin` (0.2.1) answers 0.4.0 and 1.0.0 only (no 0.3.x, no 1.1.0 and
//! so no GC or STATUS). `rscni-types` (0.2.0) has all five versions and a legacy (0.3.x/0.4.0)
//! layout, but of eleven golden results (twill's own ADD result in every version, a chained
//! 0.4.0 `prevResult`, 1.1.0 route keys, a delegated IPAM result) it writes six differently: a
//! 1.0.0 result keeps the 1.1.0-only interface `mtu` and route `mtu`/`table`; a vendor key of a
//! `prevResult` (`"x-vendor"` on an interface, `"foo"` on a route) is dropped, where a chained
//! plugin must pass the previous result on; an empty `ips` is left out; and 0.4.0 results gain an
//! empty `"dns": {}`. Each of those is a result a runtime would read differently than today.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::version::Version;

/// One interface of the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Interface {
    /// Interface name (in the sandbox for the container end).
    pub name: String,
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// MTU (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container; absent for host ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// vhost-user socket (1.1.0); never set by twill, kept from a previous result.
    #[serde(
        default,
        rename = "socketPath",
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// PCI ID (1.1.0); never set by twill, kept from a previous result.
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
    /// Keys twill does not know, kept as they were.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One IP configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address with its prefix (`10.244.1.5/24`).
    pub address: IpNet,
    /// The gateway for this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// Keys twill does not know (and `version`, which is recomputed on output).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Next hop; absent for the interface's default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Keys twill does not set (including 1.1.0's `mtu`, `priority`, ...), kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// DNS settings, passed through from the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Dns {
    /// Name servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// resolv.conf options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// No DNS setting at all.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// A result, version-neutral.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CniResult {
    /// Interfaces.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// IP configurations.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// DNS.
    #[serde(default)]
    pub dns: Dns,
}

/// Keys of 1.1.0 that older results must not carry.
const INTERFACE_1_1_KEYS: [&str; 3] = ["mtu", "socketPath", "pciID"];
const ROUTE_1_1_KEYS: [&str; 5] = ["mtu", "advmss", "priority", "table", "scope"];

impl CniResult {
    /// Parses a result of any version (a `prevResult`, a delegated IPAM plugin's output).
    pub fn from_value(v: Value) -> Result<Self, serde_json::Error> {
        let mut r: CniResult = serde_json::from_value(v)?;
        for ip in &mut r.ips {
            ip.extra.remove("version");
        }
        Ok(r)
    }

    /// Appends `ours` after `self` (the previous result): interface indices of `ours` are
    /// shifted; `ours`'s DNS wins when it has any.
    #[must_use]
    pub fn merged(mut self, ours: CniResult) -> CniResult {
        let offset = self.interfaces.len();
        self.interfaces.extend(ours.interfaces);
        self.ips.extend(ours.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        self.routes.extend(ours.routes);
        if !ours.dns.is_empty() {
            self.dns = ours.dns;
        }
        self
    }

    /// The JSON the runtime reads, in version `v`.
    pub fn to_version(&self, v: Version) -> Value {
        let mut out = Map::new();
        out.insert("cniVersion".into(), Value::String(v.to_string()));
        let v11 = v >= Version::V1_1_0;
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = to_object(i);
                if !v11 {
                    for k in INTERFACE_1_1_KEYS {
                        o.remove(k);
                    }
                }
                Value::Object(o)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = to_object(ip);
                o.remove("version");
                if v.has_ip_version_field() {
                    let fam = if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    o.insert("version".into(), Value::String(fam.into()));
                }
                Value::Object(o)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut o = to_object(r);
                if !v11 {
                    for k in ROUTE_1_1_KEYS {
                        o.remove(k);
                    }
                }
                Value::Object(o)
            })
            .collect();
        if !interfaces.is_empty() {
            out.insert("interfaces".into(), Value::Array(interfaces));
        }
        out.insert("ips".into(), Value::Array(ips));
        if !routes.is_empty() {
            out.insert("routes".into(), Value::Array(routes));
        }
        if !self.dns.is_empty() {
            out.insert("dns".into(), Value::Object(to_object(&self.dns)));
        }
        Value::Object(out)
    }
}

fn to_object<T: Serialize>(t: &T) -> Map<String, Value> {
    match serde_json::to_value(t) {
        Ok(Value::Object(o)) => o,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "tw0123456789abc".into(),
                    mac: "0e:00:00:00:00:01".into(),
                    mtu: Some(1450),
                    ..Interface::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: "0a:58:0a:f4:01:05".into(),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/x".into()),
                    ..Interface::default()
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/24".parse().unwrap(),
                    gateway: Some("10.244.1.1".parse().unwrap()),
                    interface: Some(1),
                    extra: Map::new(),
                },
                IpConfig {
                    address: "fd00::5/64".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                    extra: Map::new(),
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.244.1.1".parse().unwrap()),
                extra: Map::new(),
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                ..Dns::default()
            },
        }
    }

    #[test]
    fn old_versions_tag_ips_with_their_family() {
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let j = ours().to_version(Version::parse(v).unwrap());
            assert_eq!(j["cniVersion"], v);
            assert_eq!(j["ips"][0]["version"], "4");
            assert_eq!(j["ips"][1]["version"], "6");
            assert_eq!(j["ips"][0]["interface"], 1);
            assert!(j["interfaces"][1].get("mtu").is_none(), "mtu is 1.1.0 only");
            assert_eq!(j["interfaces"][1]["sandbox"], "/run/netns/x");
            assert_eq!(j["interfaces"][1]["mac"], "0a:58:0a:f4:01:05");
        }
    }

    #[test]
    fn new_versions_have_no_ip_version() {
        let j = ours().to_version(Version::V1_0_0);
        assert!(j["ips"][0].get("version").is_none());
        assert!(j["interfaces"][0].get("mtu").is_none());
        let j = ours().to_version(Version::V1_1_0);
        assert!(j["ips"][0].get("version").is_none());
        assert_eq!(j["interfaces"][0]["mtu"], 1450);
        assert_eq!(j["ips"][0]["address"], "10.244.1.5/24");
        assert_eq!(j["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(j["dns"]["nameservers"][0], "10.96.0.10");
    }

    #[test]
    fn converts_a_0_4_prev_result_to_1_0_and_back() {
        let prev = serde_json::json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "lo", "mac": "00:00:00:00:00:00", "sandbox": "/x", "x-vendor": 1}],
            "ips": [{"version": "4", "address": "192.168.0.2/24", "interface": 0}],
            "dns": {}
        });
        let r = CniResult::from_value(prev).unwrap();
        assert_eq!(r.interfaces[0].extra["x-vendor"], 1);
        let j = r.to_version(Version::V1_0_0);
        assert!(j["ips"][0].get("version").is_none());
        assert_eq!(j["interfaces"][0]["x-vendor"], 1);
        let back = CniResult::from_value(j)
            .unwrap()
            .to_version(Version::V0_4_0);
        assert_eq!(back["ips"][0]["version"], "4");
    }

    #[test]
    fn merge_shifts_interface_indices() {
        let prev = CniResult::from_value(serde_json::json!({
            "interfaces": [{"name": "a"}, {"name": "b", "sandbox": "/x"}],
            "ips": [{"address": "192.168.0.2/24", "interface": 1}],
            "dns": {"nameservers": ["1.1.1.1"]}
        }))
        .unwrap();
        let m = prev.merged(ours());
        assert_eq!(m.interfaces.len(), 4);
        assert_eq!(m.ips[0].interface, Some(1));
        assert_eq!(m.ips[1].interface, Some(3));
        assert_eq!(m.dns.nameservers, vec!["10.96.0.10".to_string()]);
        let kept = CniResult::from_value(serde_json::json!({"dns": {"nameservers": ["1.1.1.1"]}}))
            .unwrap()
            .merged(CniResult::default());
        assert_eq!(kept.dns.nameservers, vec!["1.1.1.1".to_string()]);
    }

    #[test]
    fn route_1_1_keys_are_dropped_for_older_versions() {
        let r = CniResult::from_value(serde_json::json!({
            "ips": [],
            "routes": [{"dst": "10.0.0.0/8", "mtu": 1400, "table": 7, "foo": "bar"}]
        }))
        .unwrap();
        let old = r.to_version(Version::V1_0_0);
        assert!(old["routes"][0].get("mtu").is_none());
        assert!(old["routes"][0].get("table").is_none());
        assert_eq!(old["routes"][0]["foo"], "bar");
        let new = r.to_version(Version::V1_1_0);
        assert_eq!(new["routes"][0]["mtu"], 1400);
    }
}
