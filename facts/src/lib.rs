//! The node's network facts, in flannel's `subnet.env` format.
//!
//! `twilld` writes this file once it holds a lease; `twill-cni` reads it on every call. It is the
//! only thing the two processes share, so the CNI plugin keeps working while the agent restarts,
//! and a flannel CNI plugin (or anything else that reads flannel's file) can read twill's.
//!
//! The format is flannel's: `KEY=VALUE` lines, `FLANNEL_SUBNET` carrying the subnet's first host
//! address (the pod gateway) with the subnet's prefix length, e.g. `10.244.1.1/24`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::{Ipv4Net, Ipv6Net};

/// Default location of the facts file (flannel's).
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";

/// Errors reading or writing the facts file.
#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    /// The file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`read`, `write`, `rename`, ...).
        op: &'static str,
        /// The file.
        path: String,
        /// The underlying error, errno kept.
        #[source]
        source: std::io::Error,
    },
    /// A line has a value that does not parse.
    #[error("invalid {key} value {value:?}: {reason}")]
    BadValue {
        /// The key of the offending line.
        key: String,
        /// Its value.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A line is not `KEY=VALUE`.
    #[error("malformed line {line:?}: expected KEY=VALUE")]
    Malformed {
        /// The offending line.
        line: String,
    },
    /// Neither an IPv4 nor an IPv6 subnet is present, or the MTU is missing.
    #[error("missing {0}")]
    Missing(&'static str),
}

/// The facts `twilld` publishes about the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetFacts {
    /// The whole cluster's IPv4 network (`FLANNEL_NETWORK`).
    pub network: Option<Ipv4Net>,
    /// The node's IPv4 pod subnet, as the gateway address with the subnet prefix
    /// (`FLANNEL_SUBNET`, e.g. `10.244.1.1/24`).
    pub subnet: Option<Ipv4Net>,
    /// The whole cluster's IPv6 network (`FLANNEL_IPV6_NETWORK`).
    pub ipv6_network: Option<Ipv6Net>,
    /// The node's IPv6 pod subnet, gateway address with prefix (`FLANNEL_IPV6_SUBNET`).
    pub ipv6_subnet: Option<Ipv6Net>,
    /// MTU pods must use (`FLANNEL_MTU`): the overlay's MTU.
    pub mtu: u32,
    /// Whether `twilld` masquerades pod egress (`FLANNEL_IPMASQ`).
    pub ipmasq: bool,
}

impl SubnetFacts {
    /// The IPv4 pod subnet itself (`10.244.1.0/24` for `FLANNEL_SUBNET=10.244.1.1/24`).
    pub fn subnet_v4(&self) -> Option<Ipv4Net> {
        self.subnet.map(|s| s.trunc())
    }

    /// The IPv4 gateway address for pods (the subnet's first host).
    pub fn gateway_v4(&self) -> Option<Ipv4Addr> {
        self.subnet.map(|s| s.addr())
    }

    /// The IPv6 pod subnet itself.
    pub fn subnet_v6(&self) -> Option<Ipv6Net> {
        self.ipv6_subnet.map(|s| s.trunc())
    }

    /// The IPv6 gateway address for pods.
    pub fn gateway_v6(&self) -> Option<Ipv6Addr> {
        self.ipv6_subnet.map(|s| s.addr())
    }

    /// Parses the file's text. Unknown keys are ignored (other tools add their own).
    pub fn parse(text: &str) -> Result<Self, FactsError> {
        let mut facts = SubnetFacts {
            network: None,
            subnet: None,
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 0,
            ipmasq: false,
        };
        let mut have_mtu = false;
        for raw in text.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| FactsError::Malformed {
                line: raw.to_string(),
            })?;
            let (key, value) = (key.trim(), value.trim().trim_matches('"'));
            let bad = |reason: String| FactsError::BadValue {
                key: key.to_string(),
                value: value.to_string(),
                reason,
            };
            match key {
                "FLANNEL_NETWORK" => {
                    facts.network = Some(value.parse().map_err(|e| bad(format!("{e}")))?);
                }
                "FLANNEL_SUBNET" => {
                    facts.subnet = Some(value.parse().map_err(|e| bad(format!("{e}")))?);
                }
                "FLANNEL_IPV6_NETWORK" => {
                    facts.ipv6_network = Some(value.parse().map_err(|e| bad(format!("{e}")))?);
                }
                "FLANNEL_IPV6_SUBNET" => {
                    facts.ipv6_subnet = Some(value.parse().map_err(|e| bad(format!("{e}")))?);
                }
                "FLANNEL_MTU" => {
                    let mtu: u32 = value.parse().map_err(|e| bad(format!("{e}")))?;
                    if !(68..=65535).contains(&mtu) {
                        return Err(bad("must be between 68 and 65535".into()));
                    }
                    facts.mtu = mtu;
                    have_mtu = true;
                }
                "FLANNEL_IPMASQ" => {
                    facts.ipmasq = value
                        .parse()
                        .map_err(|_| bad("must be true or false".into()))?;
                }
                _ => {}
            }
        }
        if facts.subnet.is_none() && facts.ipv6_subnet.is_none() {
            return Err(FactsError::Missing("FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET"));
        }
        if !have_mtu {
            return Err(FactsError::Missing("FLANNEL_MTU"));
        }
        Ok(facts)
    }

    /// Renders the file's text, keys in flannel's order.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(n) = self.network {
            let _ = writeln!(out, "FLANNEL_NETWORK={n}");
        }
        if let Some(s) = self.subnet {
            let _ = writeln!(out, "FLANNEL_SUBNET={s}");
        }
        if let Some(n) = self.ipv6_network {
            let _ = writeln!(out, "FLANNEL_IPV6_NETWORK={n}");
        }
        if let Some(s) = self.ipv6_subnet {
            let _ = writeln!(out, "FLANNEL_IPV6_SUBNET={s}");
        }
        let _ = writeln!(out, "FLANNEL_MTU={}", self.mtu);
        let _ = writeln!(out, "FLANNEL_IPMASQ={}", self.ipmasq);
        out
    }

    /// Reads and parses the file at `path`.
    pub fn read(path: &Path) -> Result<Self, FactsError> {
        let text = std::fs::read_to_string(path).map_err(|source| FactsError::Io {
            op: "read",
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Writes the file atomically: a temporary file in the same directory, fsync, rename.
    /// A reader sees the old file or the new one, never a torn one.
    pub fn write_atomic(&self, path: &Path) -> Result<(), FactsError> {
        let io = |op, source| FactsError::Io {
            op,
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("create directory for", e))?;
        }
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("write", e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SubnetFacts {
        SubnetFacts {
            network: Some("10.244.0.0/16".parse().unwrap()),
            subnet: Some("10.244.3.1/24".parse().unwrap()),
            ipv6_network: Some("fd00:10::/56".parse().unwrap()),
            ipv6_subnet: Some("fd00:10:0:3::1/64".parse().unwrap()),
            mtu: 1450,
            ipmasq: true,
        }
    }

    #[test]
    fn round_trips_flannel_format() {
        let f = sample();
        let text = f.render();
        assert!(text.contains("FLANNEL_SUBNET=10.244.3.1/24\n"));
        assert!(text.contains("FLANNEL_IPMASQ=true\n"));
        assert_eq!(SubnetFacts::parse(&text).unwrap(), f);
        assert_eq!(f.subnet_v4().unwrap().to_string(), "10.244.3.0/24");
        assert_eq!(f.gateway_v4().unwrap().to_string(), "10.244.3.1");
    }

    #[test]
    fn parses_file_written_by_flannel() {
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
        let f = SubnetFacts::parse(text).unwrap();
        assert_eq!(f.mtu, 1450);
        assert!(!f.ipmasq);
        assert!(f.ipv6_subnet.is_none());
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let err = SubnetFacts::parse("FLANNEL_SUBNET=10.244.1.300/24\nFLANNEL_MTU=1450\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLANNEL_SUBNET"), "{err}");
        assert!(err.contains("10.244.1.300/24"), "{err}");
        let err = SubnetFacts::parse("FLANNEL_SUBNET=10.244.1.1/24\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLANNEL_MTU"), "{err}");
        let err = SubnetFacts::parse("FLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=9\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLANNEL_MTU") && err.contains('9'), "{err}");
    }

    #[test]
    fn atomic_write_then_read() {
        let dir = std::env::temp_dir().join(format!("twill-facts-{}", std::process::id()));
        let path = dir.join("sub/subnet.env");
        sample().write_atomic(&path).unwrap();
        assert_eq!(SubnetFacts::read(&path).unwrap(), sample());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
