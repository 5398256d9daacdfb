//! The cluster's network configuration, as flannel keeps it at `<prefix>/config`.
//!
//! twill reads flannel's document unchanged (same field names, same defaults), so a cluster can
//! mix flannel and twill nodes. Parsing is strict about values (an error names the field and the
//! value) and lenient about unknown fields, because flannel's document grows fields for backends
//! twill does not have and those must not stop a node from joining.
//!
//! Validation happens before anything touches the kernel: an invalid document is refused as a
//! whole and the dataplane already in place stays as it is.

use std::fmt;
use std::net::{AddrParseError, IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

/// Why a network config is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The document is not JSON, or a field has the wrong JSON type.
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    /// A field has a value twill cannot use.
    #[error("network config field {field} has invalid value {value}: {reason}")]
    Invalid {
        /// The field, as flannel names it (`Backend.VNI`, `SubnetLen`, ...).
        field: &'static str,
        /// The offending value, as written.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// A required field is absent.
    #[error("network config field {0} is required")]
    Missing(&'static str),
}

/// The overlay backend a network uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendType {
    /// Kernel VXLAN device, flannel-compatible (`flannel.<VNI>`, UDP 8472).
    Vxlan,
    /// Direct routes to peers on the same L2 network.
    HostGw,
    /// Userspace UDP encapsulation over TUN (flannel's `udp`).
    Udp,
}

impl BackendType {
    /// The name used in the config and in leases (`BackendType`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
            BackendType::Udp => "udp",
        }
    }
}

/// The `Backend` section, validated, with flannel's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Which backend.
    pub kind: BackendType,
    /// VXLAN network identifier (default 1).
    pub vni: u32,
    /// UDP port (VXLAN default 8472, udp default 8285).
    pub port: u16,
    /// VXLAN only: peers on the same L2 network get a direct route, not the overlay.
    pub direct_routing: bool,
    /// Explicit overlay MTU; `None` derives it from the uplink.
    pub mtu: Option<u32>,
}

/// The network config, validated, with flannel's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Whether IPv4 is enabled (default true).
    pub enable_ipv4: bool,
    /// Whether IPv6 is enabled (default false).
    pub enable_ipv6: bool,
    /// The IPv4 cluster network.
    pub network: Option<Ipv4Net>,
    /// IPv4 per-node subnet prefix length.
    pub subnet_len: u8,
    /// First IPv4 subnet that may be leased.
    pub subnet_min: Option<Ipv4Addr>,
    /// Last IPv4 subnet that may be leased.
    pub subnet_max: Option<Ipv4Addr>,
    /// The IPv6 cluster network.
    pub ipv6_network: Option<Ipv6Net>,
    /// IPv6 per-node subnet prefix length (default 64).
    pub ipv6_subnet_len: u8,
    /// First IPv6 subnet that may be leased.
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    /// Last IPv6 subnet that may be leased.
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    /// The backend.
    pub backend: BackendConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(rename = "EnableIPv4")]
    enable_ipv4: Option<bool>,
    #[serde(rename = "EnableIPv6")]
    enable_ipv6: Option<bool>,
    network: Option<String>,
    subnet_len: Option<u32>,
    subnet_min: Option<String>,
    subnet_max: Option<String>,
    #[serde(rename = "IPv6Network")]
    ipv6_network: Option<String>,
    #[serde(rename = "IPv6SubnetLen")]
    ipv6_subnet_len: Option<u32>,
    #[serde(rename = "IPv6SubnetMin")]
    ipv6_subnet_min: Option<String>,
    #[serde(rename = "IPv6SubnetMax")]
    ipv6_subnet_max: Option<String>,
    backend: Option<RawBackend>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawBackend {
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "VNI")]
    vni: Option<i64>,
    port: Option<i64>,
    direct_routing: Option<bool>,
    #[serde(rename = "MTU")]
    mtu: Option<i64>,
}

fn invalid(
    field: &'static str,
    value: impl std::fmt::Display,
    reason: impl std::fmt::Display,
) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

impl NetworkConfig {
    /// Parses and validates flannel's network config JSON.
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let enable_ipv4 = raw.enable_ipv4.unwrap_or(true);
        let enable_ipv6 = raw.enable_ipv6.unwrap_or(false);
        if !enable_ipv4 && !enable_ipv6 {
            return Err(invalid(
                "EnableIPv4",
                false,
                "at least one of EnableIPv4 and EnableIPv6 must be true",
            ));
        }

        let backend = parse_backend(raw.backend.unwrap_or_default())?;
        let v4 = enable_ipv4
            .then(|| {
                parse_family::<Ipv4Net>(raw.network, raw.subnet_len, raw.subnet_min, raw.subnet_max)
            })
            .transpose()?;
        let v6 = enable_ipv6
            .then(|| {
                parse_family::<Ipv6Net>(
                    raw.ipv6_network,
                    raw.ipv6_subnet_len,
                    raw.ipv6_subnet_min,
                    raw.ipv6_subnet_max,
                )
            })
            .transpose()?;
        Ok(NetworkConfig {
            enable_ipv4,
            enable_ipv6,
            network: v4.map(|f| f.net),
            subnet_len: v4.map_or(24, |f| f.len),
            subnet_min: v4.map(|f| f.min),
            subnet_max: v4.map(|f| f.max),
            ipv6_network: v6.map(|f| f.net),
            ipv6_subnet_len: v6.map_or(64, |f| f.len),
            ipv6_subnet_min: v6.map(|f| f.min),
            ipv6_subnet_max: v6.map(|f| f.max),
            backend,
        })
    }
}

fn parse_backend(raw: RawBackend) -> Result<BackendConfig, ConfigError> {
    // flannel's default backend is udp.
    let type_text = raw.kind.unwrap_or_else(|| "udp".to_string());
    let kind = match type_text.as_str() {
        "vxlan" => BackendType::Vxlan,
        "host-gw" => BackendType::HostGw,
        "udp" => BackendType::Udp,
        other => {
            return Err(invalid(
                "Backend.Type",
                other,
                "supported backends are vxlan, host-gw and udp",
            ));
        }
    };
    let vni = match raw.vni {
        None => 1,
        Some(v) if (0..=0x00ff_ffff).contains(&v) => u32::try_from(v).unwrap(),
        Some(v) => return Err(invalid("Backend.VNI", v, "must be between 0 and 16777215")),
    };
    let default_port = match kind {
        BackendType::Udp => 8285,
        _ => 8472,
    };
    let port = match raw.port {
        None | Some(0) => default_port,
        Some(p) => u16::try_from(p)
            .map_err(|_| invalid("Backend.Port", p, "must be between 1 and 65535"))?,
    };
    let mtu = match raw.mtu {
        None | Some(0) => None,
        Some(m) if (68..=65535).contains(&m) => Some(u32::try_from(m).unwrap()),
        Some(m) => return Err(invalid("Backend.MTU", m, "must be between 68 and 65535")),
    };
    Ok(BackendConfig {
        kind,
        vni,
        port,
        direct_routing: raw.direct_routing.unwrap_or(false),
        mtu,
    })
}

/// The network of one address family, with the names and limits of its settings.
trait FamilyNet: Copy + PartialEq + fmt::Display + FromStr + Into<IpNet> {
    /// The address type of its `SubnetMin`/`SubnetMax`.
    type Addr: Copy + PartialOrd + fmt::Display + FromStr<Err = AddrParseError> + Into<IpAddr>;
    /// `IPv4` or `IPv6`.
    const FAMILY: &'static str;
    /// The names of its network, subnet length, subnet minimum and subnet maximum fields.
    const FIELDS: [&'static str; 4];
    /// The longest subnet prefix it allows.
    const MAX_LEN: u8;
    /// The subnet length when the config gives none.
    fn default_len(&self) -> u8;
    /// The first and last `/len` subnet that may be leased, flannel's defaults: the second subnet
    /// of the network up to the last one (the network's first subnet is not leased).
    fn bounds(self, len: u8) -> (Self::Addr, Self::Addr);
}

impl FamilyNet for Ipv4Net {
    type Addr = Ipv4Addr;
    const FAMILY: &'static str = "IPv4";
    const FIELDS: [&'static str; 4] = ["Network", "SubnetLen", "SubnetMin", "SubnetMax"];
    const MAX_LEN: u8 = 30;

    fn default_len(&self) -> u8 {
        // flannel: 24 unless Network is smaller than a /22, then two less than the network.
        if self.prefix_len() > 22 {
            self.prefix_len() + 2
        } else {
            24
        }
    }

    fn bounds(self, len: u8) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.network());
        let step = 1u32 << (32 - len);
        let last = u32::from(self.broadcast()) & !(step - 1);
        (Ipv4Addr::from(base + step), Ipv4Addr::from(last))
    }
}

impl FamilyNet for Ipv6Net {
    type Addr = Ipv6Addr;
    const FAMILY: &'static str = "IPv6";
    const FIELDS: [&'static str; 4] = [
        "IPv6Network",
        "IPv6SubnetLen",
        "IPv6SubnetMin",
        "IPv6SubnetMax",
    ];
    const MAX_LEN: u8 = 126;

    fn default_len(&self) -> u8 {
        64
    }

    fn bounds(self, len: u8) -> (Ipv6Addr, Ipv6Addr) {
        let base = u128::from(self.network());
        let step = 1u128 << (128 - len);
        let last = u128::from(self.broadcast()) & !(step - 1);
        (Ipv6Addr::from(base + step), Ipv6Addr::from(last))
    }
}

/// One enabled family's checked settings.
#[derive(Clone, Copy)]
struct Family<N: FamilyNet> {
    net: N,
    len: u8,
    min: N::Addr,
    max: N::Addr,
}

/// Parses and checks one enabled family's network, subnet length and subnet bounds (the
/// fields `N::FIELDS` names).
fn parse_family<N: FamilyNet>(
    network: Option<String>,
    subnet_len: Option<u32>,
    subnet_min: Option<String>,
    subnet_max: Option<String>,
) -> Result<Family<N>, ConfigError>
where
    N::Err: fmt::Display,
{
    let [net_field, len_field, min_field, max_field] = N::FIELDS;
    let (family, max_len) = (N::FAMILY, N::MAX_LEN);
    let text = network.ok_or(ConfigError::Missing(net_field))?;
    let net: N = text
        .parse()
        .map_err(|e| invalid(net_field, &text, format!("not an {family} CIDR: {e}")))?;
    let any: IpNet = net.into();
    if any != any.trunc() {
        return Err(invalid(
            net_field,
            &text,
            format!("host bits set (did you mean {}?)", any.trunc()),
        ));
    }
    let len = subnet_len.map_or(Ok(net.default_len()), |l| {
        u8::try_from(l).map_err(|_| invalid(len_field, l, format!("must be at most {max_len}")))
    })?;
    if len > max_len || len <= any.prefix_len() {
        return Err(invalid(
            len_field,
            len,
            format!(
                "must be longer than the {net_field} prefix /{} and at most {max_len}",
                any.prefix_len()
            ),
        ));
    }
    let (min, max) = net.bounds(len);
    let min = parse_bound(min_field, subnet_min, any, len, min)?;
    let max = parse_bound(max_field, subnet_max, any, len, max)?;
    if min > max {
        return Err(invalid(
            min_field,
            min,
            format!("is above {max_field} {max}"),
        ));
    }
    Ok(Family { net, len, min, max })
}

/// A `SubnetMin`/`SubnetMax` field (of either family): `default` when absent, else an address
/// of `net`'s family inside it and aligned to a `/len` subnet.
fn parse_bound<A>(
    field: &'static str,
    text: Option<String>,
    net: IpNet,
    len: u8,
    default: A,
) -> Result<A, ConfigError>
where
    A: Copy + FromStr<Err = AddrParseError> + Into<IpAddr>,
{
    let Some(text) = text else {
        return Ok(default);
    };
    let (family, network_field) = match net {
        IpNet::V4(_) => ("IPv4", "Network"),
        IpNet::V6(_) => ("IPv6", "IPv6Network"),
    };
    let addr: A = text
        .parse()
        .map_err(|e| invalid(field, &text, format!("not an {family} address: {e}")))?;
    let ip = addr.into();
    if !net.contains(&ip) {
        return Err(invalid(
            field,
            &text,
            format!("outside {network_field} {net}"),
        ));
    }
    if IpNet::new(ip, len).ok().map(|n| n.network()) != Some(ip) {
        return Err(invalid(
            field,
            &text,
            format!("not aligned to a /{len} subnet"),
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flannel's default IPv4 network.
    const V4: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
    /// A network too small for the default `/24` subnets.
    const SMALL: &str = r#"{"Network":"10.1.2.0/24","Backend":{"Type":"host-gw"}}"#;
    /// Dual stack, with every backend option set.
    const DUAL: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd74:10::/56","Backend":{"Type":"vxlan","VNI":4,"Port":4789,"DirectRouting":true}}"#;

    /// A family's subnet length and leasable range, as the config gives them.
    fn range<A: fmt::Display>(len: u8, min: Option<A>, max: Option<A>) -> (u8, String, String) {
        (len, min.unwrap().to_string(), max.unwrap().to_string())
    }

    #[test]
    fn subnet_lengths_and_ranges_follow_flannels_defaults() {
        // (config, whether its IPv6 family is checked, length, first and last subnet)
        for (json, v6, len, min, max) in [
            (V4, false, 24, "10.244.1.0", "10.244.255.0"),
            (SMALL, false, 26, "10.1.2.64", "10.1.2.192"),
            (DUAL, true, 64, "fd74:10:0:1::", "fd74:10:0:ff::"),
        ] {
            let c = NetworkConfig::parse(json).unwrap();
            let got = if v6 {
                range(c.ipv6_subnet_len, c.ipv6_subnet_min, c.ipv6_subnet_max)
            } else {
                range(c.subnet_len, c.subnet_min, c.subnet_max)
            };
            assert_eq!(got, (len, min.to_string(), max.to_string()), "{json}");
        }
    }

    #[test]
    fn flannel_defaults() {
        let c = NetworkConfig::parse(V4).unwrap();
        assert_eq!(c.backend.vni, 1);
        assert_eq!(c.backend.port, 8472);
        assert!(!c.enable_ipv6);
        let udp = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        assert_eq!(udp.backend.kind, BackendType::Udp);
        assert_eq!(udp.backend.port, 8285);
    }

    #[test]
    fn dual_stack() {
        let c = NetworkConfig::parse(DUAL).unwrap();
        assert!(c.enable_ipv4 && c.enable_ipv6);
        assert_eq!(c.backend.vni, 4);
        assert_eq!(c.backend.port, 4789);
        assert!(c.backend.direct_routing);
    }

    #[test]
    fn errors_name_field_and_value() {
        let cases = [
            (r#"{"Network":"10.244.0.0/33"}"#, "Network", "10.244.0.0/33"),
            (r#"{"Network":"10.244.1.0/16"}"#, "Network", "10.244.1.0/16"),
            (
                r#"{"Network":"10.244.0.0/16","SubnetLen":12}"#,
                "SubnetLen",
                "12",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#,
                "Backend.Type",
                "wireguard",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#,
                "Backend.VNI",
                "16777216",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Port":70000}}"#,
                "Backend.Port",
                "70000",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0"}"#,
                "SubnetMin",
                "10.245.0.0",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.3.7"}"#,
                "SubnetMax",
                "10.244.3.7",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"10.0.0.0/8"}"#,
                "IPv6Network",
                "10.0.0.0/8",
            ),
        ];
        for (json, field, value) in cases {
            let err = NetworkConfig::parse(json).unwrap_err().to_string();
            assert!(err.contains(field), "{json}: {err}");
            assert!(err.contains(value), "{json}: {err}");
        }
        assert_eq!(
            NetworkConfig::parse(r#"{"Backend":{"Type":"vxlan"}}"#).unwrap_err(),
            ConfigError::Missing("Network")
        );
        assert!(matches!(
            NetworkConfig::parse("{not json").unwrap_err(),
            ConfigError::Json(_)
        ));
    }

    #[test]
    fn ipv6_only() {
        let c = NetworkConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48","Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert!(c.network.is_none());
        assert_eq!(c.ipv6_subnet_min.unwrap().to_string(), "fd00:0:0:1::");
    }
}
