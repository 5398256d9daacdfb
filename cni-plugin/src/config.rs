//! The network configuration on stdin: decoded and validated whole before any command runs.
//!
//! [`load_conf`] is the only way in. It reports, in this order: undecodable JSON (6), a missing or
//! unsupported `cniVersion` (1), an unknown key (2, naming key and value: a typo such as
//! `subnetfile` would otherwise silently fall back to a default), a wrong type or an invalid value
//! (7, naming the field and the value). Keys that runtimes add to every plugin's config
//! (`args`, `runtimeConfig`, `capabilities`, `prevResult`, `cniVersions`, the GC attachment lists,
//! ...) are accepted. When `ipam.type` names an external IPAM plugin the rest of `ipam` belongs to
//! that plugin and is not checked here.
//!
//! No crate does this part: the CNI crates (`cni-plugin` 0.2.1, `rscni-types` 0.2.0) model the
//! keys every plugin shares and pass a plugin's own keys through as an untyped map, with none
//! of the error codes above; twill's keys, their checks and the error each one gets are twill's.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::env::valid_ifname;
use crate::error::{CniError, code, quoted};
use crate::result::{CniResult, Dns};
use crate::version::Version;

/// Default subnet file (flannel's).
pub const DEFAULT_SUBNET_FILE: &str = twill_facts::DEFAULT_SUBNET_FILE;
/// Default IPAM state directory (host-local's).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";
/// Default bridge (flannel's).
pub const DEFAULT_BRIDGE: &str = "cni0";
/// The longest network name twill takes: it is part of every host veth's alias, which the kernel
/// limits to 255 bytes (see [`crate::names::MAX_ALIAS_LEN`]).
pub const MAX_NETWORK_NAME_LEN: usize = 100;
/// Default time to wait for the IPAM lock before answering 11.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// How pods are attached to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Host ends on a Linux bridge that holds the subnet gateway (flannel's `cni0`).
    Bridge,
    /// No bridge: a /32 (/128) route per pod to its host veth, gateway answered by a static
    /// neighbour entry inside the pod (Calico/Cilium style).
    Routed,
}

/// Where addresses come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipam {
    /// twill's own allocator (host-local compatible state).
    Builtin(BuiltinIpam),
    /// An external IPAM plugin, looked up in `CNI_PATH`.
    Delegate {
        /// `ipam.type`.
        plugin: String,
    },
}

/// Settings of the built-in allocator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltinIpam {
    /// First address handed out (default: the subnet's first host).
    pub range_start: Option<IpAddr>,
    /// Last address handed out (default: the subnet's last host).
    pub range_end: Option<IpAddr>,
    /// How long to wait for the state lock.
    pub lock_timeout: Duration,
}

/// A (container, interface) pair named in a GC request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct Attachment {
    /// `containerID`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `ifname`.
    pub ifname: String,
}

/// The validated network configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`, parsed.
    pub version: Version,
    /// `name`.
    pub name: String,
    /// `type`.
    pub plugin_type: String,
    /// `subnetFile`.
    pub subnet_file: PathBuf,
    /// `dataDir`.
    pub data_dir: PathBuf,
    /// `bridge`.
    pub bridge: String,
    /// `mode`.
    pub mode: Mode,
    /// `mtu` (overrides the subnet file's).
    pub mtu: Option<u32>,
    /// `ipam`.
    pub ipam: Ipam,
    /// `logFile`.
    pub log_file: Option<PathBuf>,
    /// `dns`, or `runtimeConfig.dns` when the runtime sends one.
    pub dns: Dns,
    /// Addresses the runtime asks for (`runtimeConfig.ips`, `args.cni.ips`); with the built-in
    /// IPAM at most one per family.
    pub requested_ips: Vec<IpAddr>,
    /// `prevResult`.
    pub prev_result: Option<CniResult>,
    /// GC's `cni.dev/valid-attachments` (or the older `cni.dev/attachments`).
    pub valid_attachments: Option<HashSet<Attachment>>,
}

/// Top-level keys twill accepts; anything else is error 2.
const KNOWN_KEYS: &[&str] = &[
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "subnetFile",
    "dataDir",
    "bridge",
    "mode",
    "mtu",
    "ipam",
    "logFile",
    "dns",
    "runtimeConfig",
    "prevResult",
    "args",
    "capabilities",
    "disableCheck",
    "disableGC",
    "cni.dev/valid-attachments",
    "cni.dev/attachments",
];
const IPAM_KEYS: &[&str] = &["type", "rangeStart", "rangeEnd", "lockTimeoutMs"];
const DNS_KEYS: &[&str] = &["nameservers", "domain", "search", "options"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[expect(dead_code, reason = "fields read only to type-check them")]
struct RawConf {
    cni_version: String,
    #[serde(default)]
    cni_versions: Option<Vec<String>>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "type")]
    plugin_type: Option<String>,
    #[serde(default)]
    subnet_file: Option<PathBuf>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    bridge: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    ipam: Option<Map<String, Value>>,
    #[serde(default)]
    log_file: Option<PathBuf>,
    #[serde(default)]
    dns: Option<Dns>,
    #[serde(default)]
    runtime_config: Option<Map<String, Value>>,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(default)]
    args: Option<Map<String, Value>>,
    #[serde(default)]
    capabilities: Option<Map<String, Value>>,
    #[serde(default)]
    disable_check: Option<bool>,
    #[serde(default, rename = "disableGC")]
    disable_gc: Option<bool>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    #[serde(default, rename = "cni.dev/attachments")]
    attachments: Option<Vec<Attachment>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawIpam {
    #[serde(default)]
    range_start: Option<IpAddr>,
    #[serde(default)]
    range_end: Option<IpAddr>,
    #[serde(default)]
    lock_timeout_ms: Option<u64>,
}

fn invalid(field: &str, value: impl std::fmt::Display, why: impl std::fmt::Display) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!("invalid {field} {value}: {why}"),
    )
}

fn unknown_keys(obj: &Map<String, Value>, known: &[&str], prefix: &str) -> Result<(), CniError> {
    if let Some((k, v)) = obj.iter().find(|(k, _)| !known.contains(&k.as_str())) {
        return Err(CniError::new(
            code::UNSUPPORTED_FIELD,
            format!("unsupported field {prefix}{k} = {v}"),
        ));
    }
    Ok(())
}

fn typed<T: serde::de::DeserializeOwned>(v: Value, prefix: &str) -> Result<T, CniError> {
    let original = v.clone();
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            prefix.trim_end_matches('.').to_string()
        } else {
            format!("{prefix}{path}")
        };
        // Name the offending value too: serde's message does not always quote it.
        let mut at = Some(&original);
        for seg in e.path() {
            at = match seg {
                serde_path_to_error::Segment::Map { key } => at.and_then(|v| v.get(key)),
                serde_path_to_error::Segment::Seq { index } => at.and_then(|v| v.get(index)),
                _ => None,
            };
        }
        let value = at
            .filter(|_| path != ".")
            .map(|v| format!(" {v}"))
            .unwrap_or_default();
        CniError::new(
            code::INVALID_CONFIG,
            format!("invalid field {field}{value}: {}", e.inner()),
        )
    })
}

fn absolute(field: &str, p: Option<PathBuf>, default: &str) -> Result<PathBuf, CniError> {
    let p = p.unwrap_or_else(|| PathBuf::from(default));
    if !p.is_absolute() {
        return Err(invalid(field, p.display(), "must be an absolute path"));
    }
    Ok(p)
}

/// Whether `name` is a valid network name: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub fn valid_network_name(name: &str) -> bool {
    let mut b = name.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

/// Parses an address that may carry a prefix (`10.0.0.5/24` or `10.0.0.5`).
fn ip_maybe_cidr(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<IpNet>().ok().map(|n| n.addr()))
}

fn ip_list(field: &str, v: &Value) -> Result<Vec<IpAddr>, CniError> {
    let arr = v
        .as_array()
        .ok_or_else(|| invalid(field, v, "must be an array of addresses"))?;
    arr.iter()
        .map(|x| {
            x.as_str()
                .and_then(ip_maybe_cidr)
                .ok_or_else(|| invalid(field, x, "not an IP address"))
        })
        .collect()
}

/// Adds `ip` to the addresses asked of the built-in IPAM, which gives one per family: the same
/// address again is one request; a second one of a family is refused (it would be dropped).
pub fn add_requested(requested: &mut Vec<IpAddr>, ip: IpAddr) -> Result<(), String> {
    match requested.iter().find(|r| r.is_ipv4() == ip.is_ipv4()) {
        Some(r) if *r == ip => Ok(()),
        Some(r) => Err(format!(
            "a second IPv{} address ({r} is asked for already): the built-in IPAM gives one \
             address per family",
            if ip.is_ipv4() { 4 } else { 6 }
        )),
        None => {
            requested.push(ip);
            Ok(())
        }
    }
}

/// The `cniVersion` of a config, best effort, for tagging an error reply.
pub fn peek_version(stdin: &[u8]) -> Option<Version> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    let p: Peek = serde_json::from_slice(stdin).ok()?;
    Version::parse(&p.cni_version).filter(|v| v.is_supported())
}

/// Decodes and validates the whole network configuration.
pub fn load_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::from_error(code::DECODE, &e).context("decode network configuration")
    })?;
    let Value::Object(obj) = value else {
        return Err(CniError::new(
            code::DECODE,
            "decode network configuration: not a JSON object",
        ));
    };
    let version = match obj.get("cniVersion") {
        None => {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "cniVersion missing (0.1.0 assumed), which twill does not support",
            ));
        }
        Some(Value::String(s)) => match Version::parse(s) {
            Some(v) if v.is_supported() => v,
            _ => {
                return Err(CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!(
                        "incompatible cniVersion {s:?}: twill supports {}",
                        crate::version::SUPPORTED.join(", ")
                    ),
                ));
            }
        },
        Some(other) => return Err(invalid("field cniVersion", other, "must be a string")),
    };
    unknown_keys(&obj, KNOWN_KEYS, "")?;
    check_dns_keys(&obj)?;
    let raw: RawConf = typed(Value::Object(obj), "")?;

    let name = raw
        .name
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "missing field name"))?;
    if !valid_network_name(&name) {
        return Err(invalid(
            "name",
            quoted(&name),
            "must match [a-zA-Z0-9][a-zA-Z0-9_.-]*",
        ));
    }
    if name.len() > MAX_NETWORK_NAME_LEN {
        return Err(invalid(
            "name",
            quoted(&name),
            format!("longer than {MAX_NETWORK_NAME_LEN} bytes"),
        ));
    }
    let plugin_type = raw
        .plugin_type
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "missing field type"))?;
    let subnet_file = absolute("subnetFile", raw.subnet_file, DEFAULT_SUBNET_FILE)?;
    let data_dir = absolute("dataDir", raw.data_dir, DEFAULT_DATA_DIR)?;
    let log_file = raw
        .log_file
        .map(|p| absolute("logFile", Some(p), ""))
        .transpose()?;
    let bridge = raw.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
    valid_ifname(&bridge).map_err(|why| invalid("bridge", format!("{bridge:?}"), why))?;
    let mode = match raw.mode.as_deref() {
        None | Some("bridge") => Mode::Bridge,
        Some("routed") => Mode::Routed,
        Some(other) => {
            return Err(invalid(
                "mode",
                format!("{other:?}"),
                "must be \"bridge\" or \"routed\"",
            ));
        }
    };
    if let Some(mtu) = raw.mtu
        && !(68..=65535).contains(&mtu)
    {
        return Err(invalid("mtu", mtu, "must be between 68 and 65535"));
    }
    let ipam = parse_ipam(raw.ipam.unwrap_or_default())?;

    let mut dns = raw.dns.unwrap_or_default();
    let mut requested_ips = Vec::new();
    let mut requested_in = "runtimeConfig.ips";
    if let Some(rc) = &raw.runtime_config {
        if let Some(ips) = rc.get("ips") {
            requested_ips = ip_list(requested_in, ips)?;
        }
        if let Some(d) = rc.get("dns") {
            dns = runtime_dns(d)?;
        }
    }
    if requested_ips.is_empty()
        && let Some(ips) = raw
            .args
            .as_ref()
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("ips"))
    {
        requested_in = "args.cni.ips";
        requested_ips = ip_list(requested_in, ips)?;
    }
    if matches!(ipam, Ipam::Builtin(_)) {
        let mut one_each = Vec::new();
        for ip in requested_ips {
            add_requested(&mut one_each, ip).map_err(|why| invalid(requested_in, ip, why))?;
        }
        requested_ips = one_each;
    }
    let prev_result = raw
        .prev_result
        .map(|v| {
            CniResult::from_value(v).map_err(|e| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("invalid field prevResult: {e}"),
                )
            })
        })
        .transpose()?;
    let valid_attachments = raw
        .valid_attachments
        .or(raw.attachments)
        .map(|v| v.into_iter().collect());
    Ok(NetConf {
        version,
        name,
        plugin_type,
        subnet_file,
        data_dir,
        bridge,
        mode,
        mtu: raw.mtu,
        ipam,
        log_file,
        dns,
        requested_ips,
        prev_result,
        valid_attachments,
    })
}

fn parse_ipam(obj: Map<String, Value>) -> Result<Ipam, CniError> {
    match obj.get("type") {
        Some(Value::String(t)) if !t.is_empty() => {
            if t.contains('/') || t == "." || t == ".." {
                return Err(invalid(
                    "ipam.type",
                    format!("{t:?}"),
                    "must be a plugin name",
                ));
            }
            return Ok(Ipam::Delegate { plugin: t.clone() });
        }
        Some(Value::String(_)) | None => {}
        Some(other) => return Err(invalid("field ipam.type", other, "must be a string")),
    }
    if let Some((k, v)) = obj.iter().find(|(k, _)| !IPAM_KEYS.contains(&k.as_str())) {
        return Err(CniError::new(
            code::UNSUPPORTED_FIELD,
            format!(
                "unsupported field ipam.{k} = {v}: the built-in IPAM takes only rangeStart, \
                 rangeEnd and lockTimeoutMs (the subnet comes from subnetFile); set ipam.type \
                 to delegate to an IPAM plugin"
            ),
        ));
    }
    let mut obj = obj;
    obj.remove("type");
    let raw: RawIpam = typed(Value::Object(obj), "ipam.")?;
    if let (Some(s), Some(e)) = (raw.range_start, raw.range_end) {
        if s.is_ipv4() != e.is_ipv4() {
            return Err(invalid(
                "ipam.rangeEnd",
                e,
                format!("is not of the same family as rangeStart {s}"),
            ));
        }
        if s > e {
            return Err(invalid(
                "ipam.rangeEnd",
                e,
                format!("is before rangeStart {s}"),
            ));
        }
    }
    let lock_timeout = match raw.lock_timeout_ms {
        None => DEFAULT_LOCK_TIMEOUT,
        Some(ms) if (1..=600_000).contains(&ms) => Duration::from_millis(ms),
        Some(ms) => {
            return Err(invalid(
                "ipam.lockTimeoutMs",
                ms,
                "must be between 1 and 600000",
            ));
        }
    };
    Ok(Ipam::Builtin(BuiltinIpam {
        range_start: raw.range_start,
        range_end: raw.range_end,
        lock_timeout,
    }))
}

/// `runtimeConfig.dns` uses the capability's key names (`servers`, `searches`, `options`).
fn runtime_dns(v: &Value) -> Result<Dns, CniError> {
    #[derive(Deserialize)]
    struct Rt {
        #[serde(default)]
        servers: Vec<String>,
        #[serde(default)]
        searches: Vec<String>,
        #[serde(default)]
        options: Vec<String>,
        #[serde(default)]
        domain: Option<String>,
    }
    let rt: Rt = typed(v.clone(), "runtimeConfig.dns.")?;
    Ok(Dns {
        nameservers: rt.servers,
        domain: rt.domain,
        search: rt.searches,
        options: rt.options,
    })
}

/// Checks `dns` keys before typed decoding so a typo there is error 2 too.
fn check_dns_keys(obj: &Map<String, Value>) -> Result<(), CniError> {
    if let Some(Value::Object(d)) = obj.get("dns") {
        unknown_keys(d, DNS_KEYS, "dns.")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Result<NetConf, CniError> {
        let base = r#""cniVersion":"1.1.0","name":"twill","type":"twill-cni""#;
        let text = if extra.is_empty() {
            format!("{{{base}}}")
        } else {
            format!("{{{base},{extra}}}")
        };
        load_conf(text.as_bytes())
    }

    #[test]
    fn defaults() {
        let c = conf("").unwrap();
        assert_eq!(c.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/cni/networks"));
        assert_eq!(c.bridge, "cni0");
        assert_eq!(c.mode, Mode::Bridge);
        assert_eq!(c.mtu, None);
        assert_eq!(
            c.ipam,
            Ipam::Builtin(BuiltinIpam {
                range_start: None,
                range_end: None,
                lock_timeout: DEFAULT_LOCK_TIMEOUT
            })
        );
        assert!(c.dns.is_empty());
    }

    #[test]
    fn every_field() {
        let c = conf(
            r#""subnetFile":"/tmp/s.env","dataDir":"/tmp/d","bridge":"br9","mode":"routed",
               "mtu":1400,"logFile":"/tmp/l","dns":{"nameservers":["10.96.0.10"],"search":["a"]},
               "ipam":{"rangeStart":"10.1.0.10","rangeEnd":"10.1.0.20","lockTimeoutMs":250},
               "runtimeConfig":{"ips":["10.1.0.15/24"],"portMappings":[]},
               "capabilities":{"portMappings":true},"args":{"x":1},"cniVersions":["1.0.0"],
               "prevResult":{"cniVersion":"1.1.0","ips":[]}"#,
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Routed);
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(
            c.requested_ips,
            vec!["10.1.0.15".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.dns.nameservers, vec!["10.96.0.10".to_string()]);
        let Ipam::Builtin(b) = c.ipam else { panic!() };
        assert_eq!(b.lock_timeout, Duration::from_millis(250));
        assert!(c.prev_result.is_some());
    }

    #[test]
    fn decode_errors_are_6() {
        assert_eq!(load_conf(b"not json").unwrap_err().code, 6);
        assert_eq!(load_conf(b"[1]").unwrap_err().code, 6);
    }

    #[test]
    fn version_errors_are_1() {
        for v in [
            r#"{"name":"a","type":"t"}"#,
            r#"{"cniVersion":"0.2.0","name":"a","type":"t"}"#,
            r#"{"cniVersion":"9.9.9"}"#,
        ] {
            assert_eq!(load_conf(v.as_bytes()).unwrap_err().code, 1, "{v}");
        }
    }

    #[test]
    fn unknown_keys_are_2_and_named() {
        let e = conf(r#""subnetfile":"/x""#).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(
            e.msg.contains("subnetfile") && e.msg.contains("/x"),
            "{}",
            e.msg
        );
        let e = conf(r#""ipam":{"subnet":"10.0.0.0/24"}"#).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.msg.contains("ipam.subnet"), "{}", e.msg);
        let e = conf(r#""dns":{"nameserver":["1.1.1.1"]}"#).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.msg.contains("dns.nameserver"), "{}", e.msg);
    }

    #[test]
    fn delegated_ipam_is_free_form() {
        let c = conf(r#""ipam":{"type":"host-local","subnet":"10.0.0.0/24","ranges":[]}"#).unwrap();
        assert_eq!(
            c.ipam,
            Ipam::Delegate {
                plugin: "host-local".into()
            }
        );
        assert_eq!(conf(r#""ipam":{"type":"../evil"}"#).unwrap_err().code, 7);
    }

    #[test]
    fn invalid_values_are_7_and_named() {
        for (extra, field, value) in [
            (r#""mode":"bridged""#, "mode", "bridged"),
            (r#""mtu":10"#, "mtu", "10"),
            (r#""mtu":"big""#, "mtu", "big"),
            (
                r#""bridge":"a-very-long-bridge-name""#,
                "bridge",
                "a-very-long-bridge-name",
            ),
            (r#""subnetFile":"rel/path""#, "subnetFile", "rel/path"),
            (r#""dataDir":"rel""#, "dataDir", "rel"),
            (
                r#""ipam":{"rangeStart":"10.0.0.9","rangeEnd":"10.0.0.1"}"#,
                "ipam.rangeEnd",
                "10.0.0.1",
            ),
            (
                r#""ipam":{"rangeStart":"10.0.0.300"}"#,
                "ipam.rangeStart",
                "10.0.0.300",
            ),
            (r#""ipam":{"lockTimeoutMs":0}"#, "ipam.lockTimeoutMs", "0"),
            (
                r#""runtimeConfig":{"ips":["nope"]}"#,
                "runtimeConfig.ips",
                "nope",
            ),
        ] {
            let e = conf(extra).unwrap_err();
            assert_eq!(e.code, 7, "{extra}: {e}");
            assert!(e.msg.contains(field), "{extra}: {}", e.msg);
            assert!(e.msg.contains(value), "{extra}: {}", e.msg);
        }
        let e = load_conf(br#"{"cniVersion":"1.0.0","type":"t"}"#).unwrap_err();
        assert!(e.code == 7 && e.msg.contains("name"), "{e}");
        let e = load_conf(br#"{"cniVersion":"1.0.0","name":"-x","type":"t"}"#).unwrap_err();
        assert!(e.code == 7 && e.msg.contains("name"), "{e}");
    }

    #[test]
    fn gc_attachments_old_and_new_keys() {
        let c =
            conf(r#""cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]"#).unwrap();
        assert_eq!(c.valid_attachments.unwrap().len(), 1);
        let c = conf(r#""cni.dev/attachments":[{"containerID":"a","ifname":"eth0"},{"containerID":"b","ifname":"eth0"}]"#).unwrap();
        assert_eq!(c.valid_attachments.unwrap().len(), 2);
        assert!(conf("").unwrap().valid_attachments.is_none());
    }

    #[test]
    fn runtime_dns_overrides_config_dns() {
        let c = conf(r#""dns":{"nameservers":["1.1.1.1"]},"runtimeConfig":{"dns":{"servers":["9.9.9.9"],"searches":["s"]}}"#).unwrap();
        assert_eq!(c.dns.nameservers, vec!["9.9.9.9".to_string()]);
        assert_eq!(c.dns.search, vec!["s".to_string()]);
    }

    #[test]
    fn args_cni_ips() {
        let c = conf(r#""args":{"cni":{"ips":["10.0.0.7"]}}"#).unwrap();
        assert_eq!(c.requested_ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn one_requested_address_per_family() {
        for (extra, field, value) in [
            (
                r#""runtimeConfig":{"ips":["10.1.0.5/24","10.1.0.6/24"]}"#,
                "runtimeConfig.ips",
                "10.1.0.6",
            ),
            (
                r#""runtimeConfig":{"ips":["fd00::5","10.1.0.5","fd00::6"]}"#,
                "runtimeConfig.ips",
                "fd00::6",
            ),
            (
                r#""args":{"cni":{"ips":["10.1.0.7","10.1.0.8"]}}"#,
                "args.cni.ips",
                "10.1.0.8",
            ),
        ] {
            let e = conf(extra).unwrap_err();
            assert_eq!(e.code, 7, "{extra}: {e}");
            assert!(
                e.msg.contains(field) && e.msg.contains(value),
                "{extra}: {}",
                e.msg
            );
        }
        let c = conf(r#""runtimeConfig":{"ips":["10.1.0.5/24","fd00::5","10.1.0.5"]}"#).unwrap();
        assert_eq!(c.requested_ips.len(), 2, "{:?}", c.requested_ips);
        // A delegated IPAM plugin decides for itself (host-local takes one per range).
        conf(r#""ipam":{"type":"host-local"},"runtimeConfig":{"ips":["10.1.0.5","10.1.0.6"]}"#)
            .unwrap();
    }

    #[test]
    fn network_name_fits_the_host_veth_alias() {
        let longest = "n".repeat(MAX_NETWORK_NAME_LEN);
        let text = format!(r#"{{"cniVersion":"1.0.0","name":"{longest}","type":"t"}}"#);
        load_conf(text.as_bytes()).unwrap();
        let text = format!(r#"{{"cniVersion":"1.0.0","name":"{longest}x","type":"t"}}"#);
        let e = load_conf(text.as_bytes()).unwrap_err();
        assert_eq!(e.code, 7, "{e}");
        assert!(
            e.msg.contains("name") && e.msg.contains("nnnn"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn mutated_configs_never_panic_and_answer_config_codes() {
        let seeds = [
            r#"{"cniVersion":"1.1.0","name":"twill","type":"twill-cni","subnetFile":"/s","dataDir":"/d","bridge":"cni0","mode":"routed","mtu":1450,"ipam":{"rangeStart":"10.0.0.2","rangeEnd":"10.0.0.9","lockTimeoutMs":5},"dns":{"nameservers":["1.1.1.1"]},"runtimeConfig":{"ips":["10.0.0.5/24"],"dns":{"servers":["9.9.9.9"]}},"prevResult":{"ips":[{"address":"10.0.0.5/24","interface":0,"version":"4"}],"interfaces":[{"name":"eth0"}],"routes":[{"dst":"0.0.0.0/0"}]}}"#,
            r#"{"cniVersion":"0.4.0","name":"n","type":"t","ipam":{"type":"host-local","ranges":[[{"subnet":"10.0.0.0/24"}]]},"cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        ];
        let mut rng = twill_facts::testing::Mutator::new(0x9e37_79b9_7f4a_7c15);
        let alphabet = b"{}[]\":,0123456789-./aeiz \\";
        for _ in 0..20_000 {
            let pick = rng.below(seeds.len());
            let b = rng.mutate(seeds[pick].as_bytes(), alphabet);
            if let Err(e) = load_conf(&b) {
                assert!(
                    matches!(e.code, 1 | 2 | 6 | 7),
                    "{}: {e}",
                    String::from_utf8_lossy(&b)
                );
            }
        }
    }
}
