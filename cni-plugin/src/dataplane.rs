//! The seam between the commands and the kernel: every netlink effect goes through [`Dataplane`].
//!
//! The commands decide *what* (a bridge with the gateway, a veth with these names and MACs, these
//! addresses and routes in the pod, delete that link); the trait's real implementation
//! ([`crate::netlink::Netlink`]) decides *how* (rtnetlink requests, entering the pod's netns). The
//! operations are coarse on purpose — one call per step that ADD may have to undo — so the
//! recording fake in the tests checks ADD's ordering and rollback without a kernel, and the real
//! one can pack each step into as few netlink round trips as the kernel allows.
//!
//! Every operation is idempotent in the direction that matters for retries: creating what exists
//! is tolerated (EEXIST), deleting what is gone is not an error.
//!
//! [`Netns::open`] is the one kernel query outside the trait: it only opens `CNI_NETNS` and asks
//! the kernel what it is, so that a path that is no network namespace is refused while nothing
//! has been created yet.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::error::{CniError, code};

/// Errors of kernel operations.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A netlink request (or a syscall around it) failed.
    #[error("{op} {object}: {source}")]
    Op {
        /// The operation (`create veth`, `add address`, ...).
        op: &'static str,
        /// What it acted on (link name, address).
        object: String,
        /// The error, errno kept.
        #[source]
        source: io::Error,
    },
    /// The kernel state is not what twill can work with.
    #[error("{object}: {reason}")]
    Unexpected {
        /// What was found.
        object: String,
        /// Why it is a problem.
        reason: String,
    },
    /// `CNI_NETNS` names nothing: the container is gone (CNI error 3).
    #[error("network namespace {} does not exist", path.display())]
    NoNetns {
        /// `CNI_NETNS`.
        path: PathBuf,
    },
    /// `CNI_NETNS` exists but cannot be opened or inspected (CNI error 4).
    #[error("{op} CNI_NETNS {}: {source}", path.display())]
    OpenNetns {
        /// `open`, `fstatfs`, `NS_GET_NSTYPE`.
        op: &'static str,
        /// `CNI_NETNS`.
        path: PathBuf,
        /// The error, errno kept.
        #[source]
        source: io::Error,
    },
    /// `CNI_NETNS` is something else than a network namespace (CNI error 4).
    #[error("invalid CNI_NETNS {}: a {what}, not a network namespace", path.display())]
    NotNetns {
        /// `CNI_NETNS`.
        path: PathBuf,
        /// What it is (`regular file`, `mnt namespace`, ...).
        what: String,
    },
}

impl NetError {
    /// The errno of a failed operation.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetError::Op { source, .. } | NetError::OpenNetns { source, .. } => {
                source.raw_os_error()
            }
            NetError::Unexpected { .. } | NetError::NoNetns { .. } | NetError::NotNetns { .. } => {
                None
            }
        }
    }

    /// Whether the failure is "already exists".
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
}

impl From<NetError> for CniError {
    fn from(e: NetError) -> Self {
        let c = match &e {
            NetError::NoNetns { .. } => code::UNKNOWN_CONTAINER,
            NetError::OpenNetns { .. } | NetError::NotNetns { .. } => code::INVALID_ENV,
            NetError::Op { .. } | NetError::Unexpected { .. } => code::NETLINK,
        };
        CniError::from_error(c, &e)
    }
}

/// An open network namespace of a container.
#[derive(Debug)]
pub struct Netns {
    /// `CNI_NETNS`.
    pub path: PathBuf,
    /// The open namespace file (kept open so the namespace cannot vanish mid-ADD).
    pub file: File,
}

/// `NS_GET_NSTYPE` (`_IO(0xb7, 0x3)`, Linux 4.11): the `CLONE_NEW*` type of a namespace file.
const NS_GET_NSTYPE: libc::Ioctl = 0xb703;

impl Netns {
    /// Opens `CNI_NETNS` and makes sure it is a network namespace, so a wrong path is refused
    /// (error 4, naming it and what it is) before anything is created, rather than failing in the
    /// middle of ADD when the kernel is handed a file that is no namespace. The file must be on
    /// nsfs and `NS_GET_NSTYPE` (Linux 4.11+) must say `CLONE_NEWNET`.
    pub fn open(path: &Path) -> Result<Self, NetError> {
        let failed = |op, source| NetError::OpenNetns {
            op,
            path: path.to_path_buf(),
            source,
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(NetError::NoNetns {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(failed("open", e)),
        };
        let not = |what: String| NetError::NotNetns {
            path: path.to_path_buf(),
            what,
        };
        let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| failed("fstatfs", e.into()))?;
        if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
            let kind = file.metadata().map_err(|e| failed("stat", e))?.file_type();
            return Err(not(twill_facts::file_kind(kind).to_string()));
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only returns the type; the fd is open.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if nstype < 0 {
            return Err(failed("NS_GET_NSTYPE on", io::Error::last_os_error()));
        }
        if nstype != libc::CLONE_NEWNET {
            return Err(not(format!("{} namespace", ns_kind(nstype))));
        }
        Ok(Netns {
            path: path.to_path_buf(),
            file,
        })
    }
}

/// The name of a namespace type (`CLONE_NEW*`), as `/proc/<pid>/ns/` names it.
fn ns_kind(nstype: libc::c_int) -> &'static str {
    match nstype {
        libc::CLONE_NEWNS => "mnt",
        libc::CLONE_NEWPID => "pid",
        libc::CLONE_NEWUSER => "user",
        libc::CLONE_NEWUTS => "uts",
        libc::CLONE_NEWIPC => "ipc",
        libc::CLONE_NEWCGROUP => "cgroup",
        0x80 => "time",
        _ => "other",
    }
}

/// The node bridge and the gateway addresses it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    /// Bridge name.
    pub name: String,
    /// MTU set when the bridge is created.
    pub mtu: u32,
    /// MAC set when the bridge is created.
    pub mac: [u8; 6],
    /// Gateway addresses with the subnet prefix (`10.244.1.1/24`).
    pub addrs: Vec<IpNet>,
}

/// A veth pair: the host end in the plugin's netns, the peer created directly in the pod's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    /// Host end name.
    pub host: String,
    /// Host end MAC.
    pub host_mac: [u8; 6],
    /// Pod end name (`CNI_IFNAME`).
    pub peer: String,
    /// Pod end MAC.
    pub peer_mac: [u8; 6],
    /// MTU of both ends.
    pub mtu: u32,
    /// Bridge index the host end is enslaved to at creation (bridge mode).
    pub master: Option<u32>,
}

/// Settings of the host end after creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host end name.
    pub name: String,
    /// `twill:<network>:<containerID>:<ifname>`, read back by GC.
    pub alias: String,
    /// Hairpin mode on the bridge port (a pod can reach itself through a service VIP).
    pub hairpin: bool,
    /// Routes to add through this link (routed mode: the pod's /32 and /128).
    pub routes: Vec<IpNet>,
}

/// A route inside the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Destination.
    pub dst: IpNet,
    /// Next hop; `None` for a link-scope route.
    pub gw: Option<IpAddr>,
    /// Next hop is on-link even though no address covers it (routed mode).
    pub onlink: bool,
}

/// What the pod end gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// Addresses with prefix.
    pub addrs: Vec<IpNet>,
    /// Permanent neighbour entries (routed mode: gateway → host end MAC).
    pub neighbours: Vec<(IpAddr, [u8; 6])>,
    /// Routes, in order (link routes before the ones using them).
    pub routes: Vec<RouteSpec>,
}

/// A link as observed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkState {
    /// Name.
    pub name: String,
    /// Index.
    pub index: u32,
    /// `IFLA_INFO_KIND` (`bridge`, `veth`, ...).
    pub kind: Option<String>,
    /// Master (bridge) index.
    pub master: Option<u32>,
    /// MAC.
    pub mac: Option<[u8; 6]>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// `IFLA_IFALIAS`.
    pub alias: Option<String>,
}

/// The pod end as observed (for CHECK).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerState {
    /// The interface.
    pub link: LinkState,
    /// Its addresses.
    pub addrs: Vec<IpNet>,
    /// Routes through it: destination and gateway.
    pub routes: Vec<(IpNet, Option<IpAddr>)>,
}

/// Kernel effects of the plugin.
pub trait Dataplane {
    /// Creates the bridge if absent (up, MTU, MAC), brings it up, adds the gateway addresses.
    /// Returns its index. Fails if the name is taken by something that is not a bridge.
    fn ensure_bridge(&mut self, spec: &BridgeSpec) -> Result<u32, NetError>;
    /// Creates the veth pair, the host end up, the peer inside `netns`. EEXIST when either name is
    /// taken (the host name in this netns or the peer name in the pod's).
    fn create_veth(&mut self, netns: &Netns, spec: &VethSpec) -> Result<(), NetError>;
    /// Sets alias and hairpin on the host end and adds its routes.
    fn setup_host_port(&mut self, port: &HostPort) -> Result<(), NetError>;
    /// Configures the pod end: up, addresses, neighbours, routes.
    fn configure_container(&mut self, netns: &Netns, spec: &ContainerSpec) -> Result<(), NetError>;
    /// Deletes a link of this netns by name; `false` if it did not exist.
    fn delete_link(&mut self, name: &str) -> Result<bool, NetError>;
    /// A link of this netns by name.
    fn link(&mut self, name: &str) -> Result<Option<LinkState>, NetError>;
    /// Every link of this netns (a dump, retried when interrupted).
    fn links(&mut self) -> Result<Vec<LinkState>, NetError>;
    /// The pod end, its addresses and routes; `None` if there is no such interface.
    fn inspect_container(
        &mut self,
        netns: &Netns,
        ifname: &str,
    ) -> Result<Option<ContainerState>, NetError>;
}

/// A recording fake for unit tests.
#[cfg(test)]
pub mod fake {
    use std::collections::HashMap;

    use super::*;

    /// Records calls; fails the ones named in `fail` with the given errno.
    #[derive(Debug, Default)]
    pub struct FakeDataplane {
        /// Calls made, as `op name` strings.
        pub calls: Vec<String>,
        /// Links that exist (name → state).
        pub links: HashMap<String, LinkState>,
        /// Names taken inside the pod netns by something that is not twill's.
        pub pod_taken: Vec<String>,
        /// Operation name → errno to fail with.
        pub fail: HashMap<&'static str, i32>,
        next_index: u32,
    }

    impl FakeDataplane {
        fn check(&self, op: &'static str, object: &str) -> Result<(), NetError> {
            match self.fail.get(op) {
                Some(errno) => Err(NetError::Op {
                    op,
                    object: object.to_string(),
                    source: io::Error::from_raw_os_error(*errno),
                }),
                None => Ok(()),
            }
        }
    }

    impl Dataplane for FakeDataplane {
        fn ensure_bridge(&mut self, spec: &BridgeSpec) -> Result<u32, NetError> {
            self.calls.push(format!("ensure_bridge {}", spec.name));
            self.check("ensure_bridge", &spec.name)?;
            self.next_index += 1;
            let idx = self.next_index;
            let l = self.links.entry(spec.name.clone()).or_insert(LinkState {
                name: spec.name.clone(),
                index: idx,
                kind: Some("bridge".into()),
                up: true,
                ..LinkState::default()
            });
            Ok(l.index)
        }

        fn create_veth(&mut self, _netns: &Netns, spec: &VethSpec) -> Result<(), NetError> {
            self.calls
                .push(format!("create_veth {} {}", spec.host, spec.peer));
            self.check("create_veth", &spec.host)?;
            if self.links.contains_key(&spec.host) || self.pod_taken.contains(&spec.peer) {
                return Err(NetError::Op {
                    op: "create veth",
                    object: spec.host.clone(),
                    source: io::Error::from_raw_os_error(libc::EEXIST),
                });
            }
            self.next_index += 1;
            self.links.insert(
                spec.host.clone(),
                LinkState {
                    name: spec.host.clone(),
                    index: self.next_index,
                    kind: Some("veth".into()),
                    master: spec.master,
                    mac: Some(spec.host_mac),
                    mtu: Some(spec.mtu),
                    up: true,
                    alias: None,
                },
            );
            Ok(())
        }

        fn setup_host_port(&mut self, port: &HostPort) -> Result<(), NetError> {
            self.calls.push(format!("setup_host_port {}", port.name));
            self.check("setup_host_port", &port.name)?;
            let l = self.links.get_mut(&port.name).ok_or_else(|| NetError::Op {
                op: "set up host port",
                object: port.name.clone(),
                source: io::Error::from_raw_os_error(libc::ENODEV),
            })?;
            l.alias = Some(port.alias.clone());
            Ok(())
        }

        fn configure_container(
            &mut self,
            _netns: &Netns,
            spec: &ContainerSpec,
        ) -> Result<(), NetError> {
            self.calls
                .push(format!("configure_container {}", spec.ifname));
            self.check("configure_container", &spec.ifname)
        }

        fn delete_link(&mut self, name: &str) -> Result<bool, NetError> {
            self.calls.push(format!("delete_link {name}"));
            self.check("delete_link", name)?;
            Ok(self.links.remove(name).is_some())
        }

        fn link(&mut self, name: &str) -> Result<Option<LinkState>, NetError> {
            Ok(self.links.get(name).cloned())
        }

        fn links(&mut self) -> Result<Vec<LinkState>, NetError> {
            self.calls.push("links".into());
            Ok(self.links.values().cloned().collect())
        }

        fn inspect_container(
            &mut self,
            _netns: &Netns,
            _ifname: &str,
        ) -> Result<Option<ContainerState>, NetError> {
            Ok(None)
        }
    }
}
