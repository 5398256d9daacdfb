//! Loading the object and attaching its programs: [`EbpfLb::open_with`], the socket programs
//! on the cgroup, the tc programs on the configured and the pod-facing interfaces, their
//! pinned links (replaced, never left empty, across agent restarts), the global settings and
//! the node addresses NodePorts answer on.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};
use tracing::{debug, info, instrument, warn};
use twill_common::service::{
    CFG_UDP_CONNECT_VIA_TC, LbConfig, LocalAddrKey, MAP_CONFIG, MAP_LOCAL_ADDR, PROG_TC_EGRESS,
    PROG_TC_EXT_INGRESS, PROG_TC_POD_INGRESS,
};

use super::maps::{AyaMaps, check_pinned_maps, map_specs, remove};
use super::writes::Mirror;
use super::{
    EbpfLb, EbpfLbConfig, EbpfLbError, IfaceRole, LINKS_DIR, LbLimits, PodIfaceChanges,
    SOCK_PROGRAMS, TC_PROGRAMS, TC_TAGS, TcIface, map_err,
};
use crate::services::dataplane::sockopt;
use crate::shared::bpf::{EbpfError, OBJECT_NAME, object, program_mut};

impl EbpfLb {
    /// Loads (or re-uses) the dataplane: maps pinned in `pin_dir`, socket programs on the cgroup
    /// v2 directory `cgroup`, tc programs on `ifaces`, default map sizes. See
    /// [`open_with`](Self::open_with).
    pub fn open(
        pin_dir: impl AsRef<Path>,
        cgroup: impl AsRef<Path>,
        ifaces: &[TcIface],
    ) -> Result<Self, EbpfLbError> {
        Self::open_with(&EbpfLbConfig {
            pin_dir: pin_dir.as_ref().to_owned(),
            cgroup: Some(cgroup.as_ref().to_owned()),
            ifaces: ifaces.to_vec(),
            limits: LbLimits::default(),
        })
    }

    /// Loads the embedded object with its maps pinned in `config.pin_dir` (re-using pinned maps
    /// of a previous run), loads and attaches the programs, replaces the links of a previous run,
    /// writes the global settings and the node addresses, and reads back what is programmed.
    ///
    /// A configured interface that does not exist yet is left pending (logged), not an error:
    /// call [`attach_pending`](Self::attach_pending) later. A missing cgroup is an error.
    #[instrument(level = "info", skip_all, fields(pin_dir = %config.pin_dir.display()), err)]
    pub fn open_with(config: &EbpfLbConfig) -> Result<Self, EbpfLbError> {
        let bytes = object();
        if bytes.is_empty() {
            return Err(EbpfError::NotBuilt {
                object: OBJECT_NAME,
            }
            .into());
        }
        let pin_dir = config.pin_dir.clone();
        let links_dir = pin_dir.join(LINKS_DIR);
        fs::create_dir_all(&links_dir).map_err(|source| EbpfLbError::Io {
            operation: "create pin directory",
            path: links_dir.clone(),
            source,
        })?;
        let specs = map_specs(&config.limits);
        check_pinned_maps(&pin_dir, &specs)?;

        let mut loader = crate::shared::bpf::loader();
        for (name, _, _, _, _, max_entries) in specs {
            loader.map_max_entries(name, max_entries);
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let mut ebpf = loader.load(bytes).map_err(|source| EbpfError::Load {
            object: OBJECT_NAME,
            source: Box::new(source),
        })?;
        load_programs(&mut ebpf, &SOCK_PROGRAMS, CgroupSockAddr::load)?;
        load_programs(&mut ebpf, &TC_PROGRAMS, SchedClassifier::load)?;

        let maps = AyaMaps::take(&mut ebpf)?;
        // The flags a previous run set stay until this run's attachments change them: writing
        // them cleared would hand pods' connected UDP to socket-LB (which cannot move it off a
        // removed endpoint) until the pod-facing interface is attached again below.
        let host_netns_cookie = netns_cookie()?;
        let pinned = maps.config.get(&0, 0).ok();
        let settings = LbConfig {
            host_netns_cookie,
            flags: pinned
                .filter(|c| c.host_netns_cookie == host_netns_cookie)
                .map_or(0, |c| c.flags),
            pad: 0,
        };
        let mut lb = Self {
            pin_dir,
            limits: config.limits,
            ebpf,
            maps,
            links: Vec::new(),
            pending: Vec::new(),
            pod_ifaces: BTreeMap::new(),
            settings,
            mirror: Mirror::default(),
        };
        if pinned != Some(settings) {
            lb.write_settings()?;
        }
        lb.sync_local_addrs()?;
        lb.read_back()?;

        // Pins of every configured interface are kept, attached now or not: a missing
        // interface's old link is defunct anyway, and `attach_pending` replaces it.
        let mut pins: BTreeSet<PathBuf> = config
            .ifaces
            .iter()
            .flat_map(|iface| TC_TAGS.map(|tag| lb.tc_pin(iface, tag)))
            .collect();
        if let Some(cgroup) = &config.cgroup {
            lb.attach_cgroup(cgroup, &mut pins)?;
        }
        lb.pending.clone_from(&config.ifaces);
        lb.attach_pending()?;
        remove_stale_links(&links_dir, &pins);
        info!(
            services = lb.mirror.len(),
            links = lb.links.len(),
            pending = ?lb.pending.iter().map(|i| &i.name).collect::<Vec<_>>(),
            "eBPF service dataplane ready"
        );
        Ok(lb)
    }

    /// Attaches the tc programs to the configured interfaces that did not exist until now
    /// (the pod bridge appears with the first pod); returns the names attached by this call.
    /// Cheap when nothing is pending: call it on every resync.
    pub fn attach_pending(&mut self) -> Result<Vec<String>, EbpfLbError> {
        let mut attached = Vec::new();
        for iface in std::mem::take(&mut self.pending) {
            if nix::net::if_::if_nametoindex(iface.name.as_str()).is_err() {
                self.pending.push(iface);
                continue;
            }
            self.attach_tc(&iface)?;
            if iface.role == IfaceRole::Pods {
                self.set_udp_via_tc(true)?;
            }
            attached.push(iface.name);
        }
        Ok(attached)
    }

    /// Pods' connected UDP is left to the tc path only while a pod-facing hook exists; written
    /// only when it changes.
    fn set_udp_via_tc(&mut self, on: bool) -> Result<(), EbpfLbError> {
        let flags = if on {
            self.settings.flags | CFG_UDP_CONNECT_VIA_TC
        } else {
            self.settings.flags & !CFG_UDP_CONNECT_VIA_TC
        };
        if flags != self.settings.flags {
            self.settings.flags = flags;
            self.write_settings()?;
        }
        Ok(())
    }

    /// Makes the pod-side programs sit exactly on `want` (name → ifindex, as
    /// [`podif::pod_facing`] finds them): attaches the new ones (and ones whose device was
    /// re-created under the same name), detaches the ones that went. An interface that fails
    /// (it vanished meanwhile) is reported in [`PodIfaceChanges::failed`] and the others are
    /// still done; the next call retries it.
    pub fn sync_pod_interfaces(&mut self, want: &BTreeMap<String, u32>) -> PodIfaceChanges {
        let mut changes = PodIfaceChanges::default();
        // Pod interfaces are this call's from now on, configured or not.
        self.pending.retain(|i| i.role != IfaceRole::Pods);
        let gone: Vec<String> = self
            .pod_ifaces
            .extract_if(.., |name, _| !want.contains_key(name))
            .map(|(name, _)| name)
            .collect();
        for name in gone {
            match self.detach_tc(&name) {
                Ok(()) => changes.detached.push(name),
                Err(err) => changes.failed.push((name, err)),
            }
        }
        for (name, &index) in want {
            if self.pod_ifaces.get(name) == Some(&index) {
                continue;
            }
            // A device re-created under the same name: its old links are defunct; they are
            // dropped once the new ones are pinned in their place, and kept if that fails.
            let old = self.take_links(name);
            match self.attach_tc(&TcIface::pods(name.clone())) {
                Ok(()) => changes.attached.push(name.clone()),
                Err(err) => {
                    self.links.extend(old);
                    changes.failed.push((name.clone(), err));
                }
            }
        }
        if let Err(err) = self.set_udp_via_tc(!self.pod_ifaces.is_empty()) {
            changes.failed.push((MAP_CONFIG.to_string(), err));
        }
        changes
    }

    /// The pod-facing interfaces with the pod-side programs.
    pub fn pod_interfaces(&self) -> impl Iterator<Item = &str> {
        self.pod_ifaces.keys().map(String::as_str)
    }

    /// Removes the links of interface `name` from `self.links` (still pinned).
    fn take_links(&mut self, name: &str) -> Vec<(PathBuf, PinnedLink)> {
        let paths: Vec<PathBuf> = TC_TAGS
            .iter()
            .map(|tag| self.tc_pin(&TcIface::pods(name), tag))
            .collect();
        let (taken, kept) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(path, _)| paths.contains(path));
        self.links = kept;
        taken
    }

    /// Detaches the tc programs of interface `name` and removes their pins.
    fn detach_tc(&mut self, name: &str) -> Result<(), EbpfLbError> {
        let mut first_err = None;
        for (path, link) in self.take_links(name) {
            // Dropping the unpinned link's last reference detaches it.
            if let Err(source) = link.unpin() {
                first_err.get_or_insert(EbpfLbError::Link {
                    operation: "unpin",
                    path,
                    source: Box::new(source),
                });
            }
        }
        info!(ifname = name, "tc programs detached");
        first_err.map_or(Ok(()), Err)
    }

    /// Configured interfaces still waiting for [`attach_pending`](Self::attach_pending).
    pub fn pending_interfaces(&self) -> &[TcIface] {
        &self.pending
    }

    fn write_settings(&mut self) -> Result<(), EbpfLbError> {
        self.maps
            .config
            .set(0, self.settings, 0)
            .map_err(map_err("update", MAP_CONFIG, 0))
    }

    /// Where the link of `iface`'s `tag` attachment is pinned. bpffs refuses names with a dot
    /// (`flannel.1`), so dots become underscores.
    fn tc_pin(&self, iface: &TcIface, tag: &str) -> PathBuf {
        self.pin_dir
            .join(LINKS_DIR)
            .join(format!("tc_{}_{tag}", iface.name.replace('.', "_")))
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches the socket programs to `cgroup`, replacing the links of a previous run.
    fn attach_cgroup(
        &mut self,
        cgroup: &Path,
        pins: &mut BTreeSet<PathBuf>,
    ) -> Result<(), EbpfLbError> {
        let dir = fs::File::open(cgroup).map_err(|source| EbpfLbError::Io {
            operation: "open cgroup",
            path: cgroup.to_owned(),
            source,
        })?;
        for program in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = program_mut(&mut self.ebpf, program)?;
            let attach_err = |source| EbpfLbError::AttachCgroup {
                program,
                cgroup: cgroup.to_owned(),
                source: Box::new(source),
            };
            // A BPF link (Linux >= 5.7): links on one cgroup always coexist, and
            // `bpf_link_create` wants no attach flags, hence `Single` (0), not `AllowMultiple`.
            let id = prog
                .attach(dir.as_fd(), CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            let path = self.pin_dir.join(LINKS_DIR).join(format!("cg_{program}"));
            self.keep_link(path.clone(), link)?;
            pins.insert(path);
        }
        debug!(cgroup = %cgroup.display(), "socket programs attached");
        Ok(())
    }

    /// Pins a program's `link` at `path`, replacing (and so detaching) a previous run's, and
    /// keeps it.
    fn keep_link<L>(&mut self, path: PathBuf, link: L) -> Result<(), EbpfLbError>
    where
        FdLink: TryFrom<L>,
        <FdLink as TryFrom<L>>::Error: std::error::Error + Send + Sync + 'static,
    {
        let link = FdLink::try_from(link).map_err(|source| EbpfLbError::Link {
            operation: "convert",
            path: path.clone(),
            source: Box::new(source),
        })?;
        let pinned = replace_pin(&path, link)?;
        self.links.push((path, pinned));
        Ok(())
    }

    /// Attaches the tc programs of `iface`'s role at its ingress and egress (TCX, after the
    /// programs already there), replacing the links of a previous run.
    fn attach_tc(&mut self, iface: &TcIface) -> Result<(), EbpfLbError> {
        let ingress = match iface.role {
            IfaceRole::External => PROG_TC_EXT_INGRESS,
            IfaceRole::Pods => PROG_TC_POD_INGRESS,
        };
        for (program, attach_type, direction, tag) in [
            (ingress, TcAttachType::Ingress, "ingress", TC_TAGS[0]),
            (PROG_TC_EGRESS, TcAttachType::Egress, "egress", TC_TAGS[1]),
        ] {
            let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, program)?;
            let attach_err = |source| EbpfError::Attach {
                program,
                ifname: iface.name.clone(),
                direction,
                source: Box::new(source),
            };
            let id = prog
                .attach_with_options(
                    &iface.name,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            let path = self.tc_pin(iface, tag);
            self.keep_link(path, link)?;
        }
        if iface.role == IfaceRole::Pods {
            let index = nix::net::if_::if_nametoindex(iface.name.as_str()).unwrap_or(0);
            self.pod_ifaces.insert(iface.name.clone(), index);
        }
        info!(ifname = %iface.name, role = ?iface.role, "tc programs attached");
        Ok(())
    }

    /// Writes the addresses of the calling thread's network namespace to `TWL_LB_LADDR` (what
    /// a NodePort answers on), removing the ones that are gone. Returns the number of addresses.
    pub fn sync_local_addrs(&mut self) -> Result<usize, EbpfLbError> {
        let want: BTreeSet<LocalAddrKey> =
            local_addrs()?.into_iter().map(LocalAddrKey::new).collect();
        let have: BTreeSet<LocalAddrKey> = self
            .maps
            .local_addrs
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("iterate", MAP_LOCAL_ADDR, ""))?;
        for key in want.difference(&have) {
            self.maps.local_addrs.insert(key, 1, 0).map_err(map_err(
                "update",
                MAP_LOCAL_ADDR,
                key,
            ))?;
        }
        for key in have.difference(&want) {
            remove(&mut self.maps.local_addrs, MAP_LOCAL_ADDR, key)?;
        }
        Ok(want.len())
    }
}

/// Loads (verifies) the programs `names` of one kind.
fn load_programs<T>(
    ebpf: &mut Ebpf,
    names: &[&'static str],
    load: fn(&mut T) -> Result<(), ProgramError>,
) -> Result<(), EbpfError>
where
    for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    for &program in names {
        load(program_mut(ebpf, program)?).map_err(|source| EbpfError::Program {
            operation: "load",
            program,
            source: Box::new(source),
        })?;
    }
    Ok(())
}

/// Pins `link` at `path`, replacing (and so detaching) a link pinned there by a previous run.
/// The new link is attached before the old one goes, so the hook is never empty.
fn replace_pin(path: &Path, link: FdLink) -> Result<PinnedLink, EbpfLbError> {
    let link_err =
        |operation, source: Box<dyn std::error::Error + Send + Sync>| EbpfLbError::Link {
            operation,
            path: path.to_owned(),
            source,
        };
    let old = if path.exists() {
        let pinned =
            PinnedLink::from_pin(path).map_err(|err| link_err("open pinned", Box::new(err)))?;
        Some(
            pinned
                .unpin()
                .map_err(|err| link_err("unpin", Box::new(err)))?,
        )
    } else {
        None
    };
    let pinned = link
        .pin(path)
        .map_err(|err| link_err("pin", Box::new(err)))?;
    // Dropping the old link's last reference detaches it.
    drop(old);
    Ok(pinned)
}

/// Removes link pins in `dir` not in `keep` (interfaces dropped from the configuration).
pub(super) fn remove_stale_links(dir: &Path, keep: &BTreeSet<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !keep.contains(&path) {
            match fs::remove_file(&path) {
                Ok(()) => info!(path = %path.display(), "removed stale link"),
                Err(err) => warn!(path = %path.display(), error = %err, "remove stale link"),
            }
        }
    }
}

/// The calling thread's network-namespace cookie (`SO_NETNS_COOKIE`, Linux >= 5.14), which the
/// socket programs compare with `bpf_get_netns_cookie` to tell the node's sockets from pods'.
fn netns_cookie() -> Result<u64, EbpfLbError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| EbpfLbError::System("create socket", io::Error::from(errno)))?;
    let mut cookie = [0u8; 8];
    sockopt::get(
        sock.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_NETNS_COOKIE,
        &mut cookie,
    )
    .map_err(|err| EbpfLbError::System("getsockopt SO_NETNS_COOKIE", err))?;
    Ok(u64::from_ne_bytes(cookie))
}

/// The addresses of the calling thread's network namespace.
pub(super) fn local_addrs() -> Result<Vec<IpAddr>, EbpfLbError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|errno| EbpfLbError::System("getifaddrs", io::Error::from(errno)))?;
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addrs_include_loopback_family() {
        // Every namespace has `lo`; its address may be missing while it is down, so only check
        // that the call works and returns no duplicates.
        let addrs = local_addrs().unwrap();
        let unique: BTreeSet<_> = addrs.iter().collect();
        assert_eq!(unique.len(), addrs.len());
    }
}
