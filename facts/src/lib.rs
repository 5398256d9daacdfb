//! The node's network facts, in flannel's `subnet.env` format.
//!
//! `twilld` writes this file once it holds a lease; `twill-cni` reads it on every call. It is the
//! only thing the two processes share, so the CNI plugin keeps working while the agent restarts,
//! and a flannel CNI plugin (or anything else that reads flannel's file) can read twill's.
//!
//! The format is flannel's: `KEY=VALUE` lines, `FLANNEL_SUBNET` carrying the subnet's first host
//! address (the pod gateway) with the subnet's prefix length, e.g. `10.244.1.1/24`.
//!
//! The file is written by another process (and sometimes by hand, or by a flannel of another
//! version), so reading it trusts nothing: [`SubnetFacts::read`] opens it without blocking and
//! takes only a regular file (a FIFO would wait for a writer forever, `/dev/zero` never ends),
//! reads at most [`MAX_FILE_SIZE`] bytes, and wants UTF-8; [`SubnetFacts::parse`] refuses a node
//! subnet outside the cluster network or with a prefix no pod subnet can have (a `/0` would put
//! the whole address space on the pod bridge). Every refusal names the file or the key and value.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Default location of the facts file (flannel's).
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";

/// The largest facts file [`SubnetFacts::read`] takes. flannel's is about 150 bytes; anything near
/// this size is not a subnet file.
pub const MAX_FILE_SIZE: u64 = 64 * 1024;

/// Prefix lengths a node's IPv4 pod subnet may have: at least one pod besides the gateway, and
/// not a large part of the address space.
pub const IPV4_SUBNET_PREFIX: std::ops::RangeInclusive<u8> = 8..=30;

/// Prefix lengths a node's IPv6 pod subnet may have.
pub const IPV6_SUBNET_PREFIX: std::ops::RangeInclusive<u8> = 16..=126;

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
    /// The path is not a regular file (a FIFO, a device, a directory, ...).
    #[error("read {path}: not a regular file but a {kind}")]
    NotRegular {
        /// The file.
        path: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// The file is larger than [`MAX_FILE_SIZE`].
    #[error("read {path}: larger than {limit} bytes, not a subnet file")]
    TooLarge {
        /// The file.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// The file is not UTF-8 text.
    #[error("read {path}: not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 {
        /// The file.
        path: String,
        /// Where the first invalid byte is.
        offset: usize,
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
        if let Some(s) = facts.subnet {
            check_subnet(
                ("FLANNEL_SUBNET", IpNet::V4(s)),
                facts.network.map(|n| ("FLANNEL_NETWORK", IpNet::V4(n))),
                &IPV4_SUBNET_PREFIX,
            )?;
        }
        if let Some(s) = facts.ipv6_subnet {
            check_subnet(
                ("FLANNEL_IPV6_SUBNET", IpNet::V6(s)),
                facts
                    .ipv6_network
                    .map(|n| ("FLANNEL_IPV6_NETWORK", IpNet::V6(n))),
                &IPV6_SUBNET_PREFIX,
            )?;
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

    /// Reads and parses the file at `path`: a regular file of at most [`MAX_FILE_SIZE`] bytes of
    /// UTF-8. Never blocks on what is not a regular file (it is opened non-blocking and refused).
    pub fn read(path: &Path) -> Result<Self, FactsError> {
        let shown = || path.display().to_string();
        let io = |op, source| FactsError::Io {
            op,
            path: shown(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| io("read", e))?;
        let kind = file.metadata().map_err(|e| io("stat", e))?.file_type();
        if !kind.is_file() {
            return Err(FactsError::NotRegular {
                path: shown(),
                kind: file_kind(kind),
            });
        }
        let mut bytes = Vec::new();
        file.take(MAX_FILE_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| io("read", e))?;
        if bytes.len() as u64 > MAX_FILE_SIZE {
            return Err(FactsError::TooLarge {
                path: shown(),
                limit: MAX_FILE_SIZE,
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| FactsError::NotUtf8 {
            path: shown(),
            offset: e.utf8_error().valid_up_to(),
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

/// Refuses a node subnet (`key` and its value) whose prefix is outside `range`, or that does not
/// lie inside the cluster network (its key and value) when the file names one.
fn check_subnet(
    (key, subnet): (&str, IpNet),
    network: Option<(&str, IpNet)>,
    range: &std::ops::RangeInclusive<u8>,
) -> Result<(), FactsError> {
    let bad = |reason: String| FactsError::BadValue {
        key: key.to_string(),
        value: subnet.to_string(),
        reason,
    };
    let prefix = subnet.prefix_len();
    if !range.contains(&prefix) {
        return Err(bad(format!(
            "prefix /{prefix} is not a pod subnet's (/{} to /{})",
            range.start(),
            range.end()
        )));
    }
    if let Some((net_key, net)) = network
        && !net.contains(&subnet.trunc())
    {
        return Err(bad(format!("outside {net_key} {net}")));
    }
    Ok(())
}

/// What kind of file `t` is, in words, for an error that names what was found instead of what
/// was wanted (a regular file, a network namespace).
#[must_use]
pub fn file_kind(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod testing;

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

    /// Runs `f` on a thread and waits at most `secs` for it: a read that blocks (a FIFO without
    /// a writer) fails the test instead of hanging it.
    fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(secs))
            .expect("read did not return in time")
    }

    #[test]
    fn read_refuses_what_is_not_a_subnet_file_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        // A valid file padded past the size limit with comments: refused, naming the file.
        let big = dir.path().join("big.env");
        let mut text = sample().render();
        while text.len() <= 64 * 1024 {
            text.push_str("# padding padding padding padding padding padding padding padding\n");
        }
        std::fs::write(&big, &text).unwrap();
        let err = SubnetFacts::read(&big).unwrap_err().to_string();
        assert!(
            err.contains("big.env") && err.contains("larger than"),
            "{err}"
        );
        // A FIFO nobody writes to: refused at once (opening it must not wait for a writer).
        let fifo = dir.path().join("fifo.env");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let f = fifo.clone();
        let err = within(10, move || SubnetFacts::read(&f))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fifo.env") && err.contains("not a regular file"),
            "{err}"
        );
        // Endless devices and directories: refused, naming the path.
        for path in ["/dev/zero", "/dev/urandom"] {
            let err = within(10, move || SubnetFacts::read(Path::new(path)))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(path) && err.contains("not a regular file"),
                "{err}"
            );
        }
        let err = SubnetFacts::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn non_utf8_names_the_file_and_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.env");
        let mut bytes = sample().render().into_bytes();
        let at = bytes.len();
        bytes.extend_from_slice(b"# caf\xe9\n");
        std::fs::write(&path, &bytes).unwrap();
        let err = SubnetFacts::read(&path).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("latin1.env") && text.contains(&format!("offset {}", at + 5)),
            "{text}"
        );
    }

    #[test]
    fn subnet_must_lie_inside_the_network_with_a_sane_prefix() {
        let ok = |t: &str| SubnetFacts::parse(t).unwrap_or_else(|e| panic!("{t}: {e}"));
        let bad = |t: &str, value: &str, why: &str| {
            let e = SubnetFacts::parse(t).expect_err(t).to_string();
            assert!(e.contains(value) && e.contains(why), "{t}: {e}");
        };
        ok("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n");
        // The node's subnet may be the whole network (one node), and needs no network line.
        ok("FLANNEL_NETWORK=10.244.0.0/24\nFLANNEL_SUBNET=10.244.0.1/24\nFLANNEL_MTU=1450\n");
        ok("FLANNEL_SUBNET=10.244.0.1/30\nFLANNEL_MTU=1450\n");
        ok(
            "FLANNEL_IPV6_NETWORK=fd00:10::/56\nFLANNEL_IPV6_SUBNET=fd00:10:0:3::1/64\nFLANNEL_MTU=1450\n",
        );
        bad(
            "FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.98.5.1/24\nFLANNEL_MTU=1450\n",
            "10.98.5.1/24",
            "outside FLANNEL_NETWORK 10.99.0.0/16",
        );
        bad(
            "FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.0.0.1/8\nFLANNEL_MTU=1450\n",
            "10.0.0.1/8",
            "outside FLANNEL_NETWORK",
        );
        bad(
            "FLANNEL_SUBNET=0.0.0.1/0\nFLANNEL_MTU=1450\n",
            "0.0.0.1/0",
            "/8 to /30",
        );
        bad(
            "FLANNEL_NETWORK=0.0.0.0/0\nFLANNEL_SUBNET=0.0.0.1/0\nFLANNEL_MTU=1450\n",
            "0.0.0.1/0",
            "/8 to /30",
        );
        bad(
            "FLANNEL_SUBNET=10.0.0.1/31\nFLANNEL_MTU=1450\n",
            "10.0.0.1/31",
            "/8 to /30",
        );
        bad(
            "FLANNEL_IPV6_NETWORK=fd00:10::/56\nFLANNEL_IPV6_SUBNET=fd00:11::1/64\nFLANNEL_MTU=1450\n",
            "fd00:11::1/64",
            "outside FLANNEL_IPV6_NETWORK fd00:10::/56",
        );
        bad(
            "FLANNEL_IPV6_SUBNET=::1/0\nFLANNEL_MTU=1450\n",
            "::1/0",
            "/16 to /126",
        );
        bad(
            "FLANNEL_IPV6_SUBNET=fd00::1/127\nFLANNEL_MTU=1450\n",
            "fd00::1/127",
            "/16 to /126",
        );
    }

    #[test]
    fn mutated_files_never_panic_and_accepted_ones_are_sane() {
        let seed = sample().render();
        let alphabet = b"=/:.\n#\"0123456789abcdefFLANNEL_SUBNETWORKIPV6MTU ";
        let mut rng = crate::testing::Mutator::new(0x9e37_79b9_7f4a_7c15);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let b = rng.mutate(seed.as_bytes(), alphabet);
            match SubnetFacts::parse(&String::from_utf8(b).unwrap()) {
                Ok(f) => {
                    crate::testing::assert_sane(&f);
                    accepted += 1;
                }
                Err(_) => refused += 1,
            }
        }
        // Both sides are exercised, or the test proves nothing.
        assert!(accepted > 1_000 && refused > 1_000, "{accepted} {refused}");
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
