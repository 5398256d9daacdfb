//! The built-in IPAM: host-local's on-disk format, the node's subnet from the subnet file.
//!
//! State lives in `<dataDir>/<network>/`, laid out exactly as the reference `host-local` plugin
//! lays it out, so a node can move between flannel's CNI (bridge + host-local) and twill in either
//! direction without losing or double-booking an address:
//! - one file per allocated address, named by the address, holding `<containerID>\r\n<ifname>`
//!   (host-local's line break; `\n` and legacy ID-only files are read too);
//! - `last_reserved_ip.<n>` per pool (`0` for IPv4, `1` for IPv6 when both exist), so addresses are
//!   handed out round-robin and a just-released address is not reused at once;
//! - `lock`, held with `flock(2)` for the whole read-modify-write. Waiting for it is bounded
//!   ([`crate::config::BuiltinIpam::lock_timeout`]); past that the plugin answers 11, try again.
//!
//! The pure part ([`Pool`]: range, gateway, candidate order) is separate from the [`Store`] that
//! touches files, so the allocation order is unit tested without a disk.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use ipnet::IpNet;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{CniError, code};

/// Errors of the built-in IPAM.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// A state file or directory could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error, errno kept.
        #[source]
        source: io::Error,
    },
    /// Another invocation held the lock for longer than the timeout.
    #[error("lock {path}: still held by another invocation after {waited:?}")]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// Every address in the range is taken.
    #[error("no free address left in {start}-{end} of network {network}")]
    Exhausted {
        /// The network name.
        network: String,
        /// First address of the range.
        start: IpAddr,
        /// Last address of the range.
        end: IpAddr,
    },
    /// A requested address cannot be given.
    #[error("requested address {ip} is unavailable: {reason}")]
    Unavailable {
        /// The address.
        ip: IpAddr,
        /// Why.
        reason: String,
    },
    /// `rangeStart`/`rangeEnd` do not fit the node's subnet.
    #[error("invalid {field} {value}: {reason}")]
    BadRange {
        /// `ipam.rangeStart` or `ipam.rangeEnd`.
        field: &'static str,
        /// The value.
        value: IpAddr,
        /// Why.
        reason: String,
    },
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        let c = match &e {
            IpamError::Io { .. } => code::IO_FAILURE,
            IpamError::LockTimeout { .. } => code::TRY_AGAIN,
            IpamError::Exhausted { .. } | IpamError::Unavailable { .. } => code::ADDRESS_EXHAUSTED,
            IpamError::BadRange { .. } => code::INVALID_CONFIG,
        };
        CniError::from_error(c, &e)
    }
}

/// The operation of [`IpamError::Io`] when the lock file cannot be opened.
const LOCK_OPEN: &str = "open lock file";

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IpamError + use<> {
    let path = path.to_path_buf();
    move |source| IpamError::Io { op, path, source }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v4: bool, n: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX)))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

/// One address pool: a range inside the node's subnet, minus the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// The subnet (network address, prefix).
    pub subnet: IpNet,
    /// The pods' gateway (reserved).
    pub gateway: IpAddr,
    /// First address handed out.
    pub start: IpAddr,
    /// Last address handed out.
    pub end: IpAddr,
}

impl Pool {
    /// A pool for `gateway_net` (the subnet file's form: gateway address with the subnet prefix),
    /// optionally narrowed to `start..=end`.
    pub fn new(
        gateway_net: IpNet,
        start: Option<IpAddr>,
        end: Option<IpAddr>,
    ) -> Result<Self, IpamError> {
        let subnet = gateway_net.trunc();
        let v4 = subnet.addr().is_ipv4();
        let net = to_u128(subnet.network());
        let last = to_u128(subnet.broadcast());
        // The network address and the last one (IPv4 broadcast) are never handed out, as in
        // host-local.
        let (lo, hi) = (net + 1, last.saturating_sub(1));
        let check = |field: &'static str, ip: IpAddr| -> Result<u128, IpamError> {
            let n = to_u128(ip);
            if ip.is_ipv4() != v4 || n < lo || n > hi {
                return Err(IpamError::BadRange {
                    field,
                    value: ip,
                    reason: format!("outside the usable addresses of the node subnet {subnet}"),
                });
            }
            Ok(n)
        };
        let s = start
            .map(|ip| check("ipam.rangeStart", ip))
            .transpose()?
            .unwrap_or(lo);
        let e = end
            .map(|ip| check("ipam.rangeEnd", ip))
            .transpose()?
            .unwrap_or(hi);
        if s > e {
            return Err(IpamError::BadRange {
                field: "ipam.rangeStart",
                value: from_u128(v4, s),
                reason: format!("the subnet {subnet} leaves no usable address"),
            });
        }
        Ok(Pool {
            subnet,
            gateway: gateway_net.addr(),
            start: from_u128(v4, s),
            end: from_u128(v4, e),
        })
    }

    /// Whether `ip` may be handed out from this pool.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4()
            && (to_u128(self.start)..=to_u128(self.end)).contains(&to_u128(ip))
            && ip != self.gateway
    }

    /// The address with the subnet's prefix, as the pod sees it.
    pub fn with_prefix(&self, ip: IpAddr) -> IpNet {
        IpNet::new(ip, self.subnet.prefix_len()).unwrap_or(self.subnet)
    }

    /// Addresses in allocation order: after `last` (round robin), wrapping, gateway skipped.
    pub fn candidates(&self, last: Option<IpAddr>) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.start.is_ipv4();
        let (s, e) = (to_u128(self.start), to_u128(self.end));
        let first = match last.map(to_u128) {
            Some(l) if l >= s && l < e && last.is_some_and(|x| x.is_ipv4() == v4) => l + 1,
            _ => s,
        };
        let size = e - s + 1;
        (0..size)
            .map(move |i| {
                let off = (first - s + i) % size;
                from_u128(v4, s + off)
            })
            .filter(move |ip| *ip != self.gateway)
    }
}

/// Who holds an address: the content of its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Container ID.
    pub container_id: String,
    /// Interface name; `None` in files written by old host-local versions.
    pub ifname: Option<String>,
}

impl Owner {
    /// Parses `id\r\nifname`, `id\nifname` or `id`.
    pub fn parse(text: &str) -> Self {
        let text = text.trim();
        let mut lines = text.lines();
        let container_id = lines.next().unwrap_or("").trim().to_string();
        let ifname = lines
            .next()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty());
        Owner {
            container_id,
            ifname,
        }
    }

    /// Whether this is the attachment `(id, ifname)`; ID-only files match any interface.
    pub fn is(&self, id: &str, ifname: &str) -> bool {
        self.container_id == id && self.ifname.as_deref().is_none_or(|i| i == ifname)
    }
}

/// The on-disk state of one network, locked for as long as the value lives.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl Store {
    /// Creates `<data_dir>/<network>/` if needed and takes its lock, waiting at most `timeout`.
    /// For ADD, the one command that allocates.
    pub fn open(data_dir: &Path, network: &str, timeout: Duration) -> Result<Self, IpamError> {
        let dir = data_dir.join(network);
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        Self::lock(dir, timeout)
    }

    /// Takes the lock of `<data_dir>/<network>/` if that directory exists; `None` when it does
    /// not (nothing was ever allocated there). For DEL, GC, CHECK and rollbacks, which only
    /// read or release and must not leave a state directory behind where there was none.
    pub fn open_existing(
        data_dir: &Path,
        network: &str,
        timeout: Duration,
    ) -> Result<Option<Self>, IpamError> {
        match Self::lock(data_dir.join(network), timeout) {
            Ok(store) => Ok(Some(store)),
            Err(IpamError::Io { op, source, .. })
                if op == LOCK_OPEN && source.kind() == io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens (creating) `dir/lock` and locks it, waiting at most `timeout`.
    fn lock(dir: PathBuf, timeout: Duration) -> Result<Self, IpamError> {
        let lock_path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(LOCK_OPEN, &lock_path))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((file, Errno::EWOULDBLOCK)) => {
                // Contended: block in a helper thread so the wait can be bounded. If we give up,
                // the thread's lock (if it ever gets one) dies with the process.
                let (tx, rx) = mpsc::channel();
                std::thread::spawn(move || {
                    let _ = tx.send(Flock::lock(file, FlockArg::LockExclusive));
                });
                match rx.recv_timeout(timeout) {
                    Ok(Ok(l)) => l,
                    Ok(Err((_, errno))) => {
                        return Err(io_err("flock", &lock_path)(io::Error::from(errno)));
                    }
                    Err(_) => {
                        return Err(IpamError::LockTimeout {
                            path: lock_path,
                            waited: timeout,
                        });
                    }
                }
            }
            Err((_, errno)) => return Err(io_err("flock", &lock_path)(io::Error::from(errno))),
        };
        Ok(Store { dir, _lock: lock })
    }

    /// The directory of this network's state.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every allocation: address and owner.
    pub fn all(&self) -> Result<Vec<(IpAddr, Owner)>, IpamError> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.dir).map_err(io_err("read directory", &self.dir))?;
        for entry in rd {
            let entry = entry.map_err(io_err("read directory", &self.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let path = entry.path();
            match fs::read_to_string(&path) {
                Ok(text) => out.push((ip, Owner::parse(&text))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("read", &path)(e)),
            }
        }
        Ok(out)
    }

    /// Addresses held by `(id, ifname)`.
    pub fn by_owner(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|(_, o)| o.is(id, ifname))
            .map(|(ip, _)| ip)
            .collect())
    }

    /// Who holds `ip`, if anyone.
    pub fn owner_of(&self, ip: IpAddr) -> Result<Option<Owner>, IpamError> {
        let path = self.dir.join(ip.to_string());
        match fs::read_to_string(&path) {
            Ok(t) => Ok(Some(Owner::parse(&t))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    /// Records `ip` for `(id, ifname)`; `false` if someone holds it already.
    pub fn reserve(&self, ip: IpAddr, id: &str, ifname: &str) -> Result<bool, IpamError> {
        let path = self.dir.join(ip.to_string());
        let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err("create", &path)(e)),
        };
        if let Err(e) = f.write_all(format!("{id}\r\n{ifname}").as_bytes()) {
            let _ = fs::remove_file(&path);
            return Err(io_err("write", &path)(e));
        }
        Ok(true)
    }

    /// Forgets `ip` (no error if it was not held).
    pub fn release(&self, ip: IpAddr) -> Result<(), IpamError> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Forgets every address of `(id, ifname)`; returns them.
    pub fn release_owner(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        let ips = self.by_owner(id, ifname)?;
        for ip in &ips {
            self.release(*ip)?;
        }
        Ok(ips)
    }

    /// `last_reserved_ip.<idx>`.
    pub fn last_reserved(&self, idx: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("last_reserved_ip.{idx}")))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    fn set_last_reserved(&self, idx: usize, ip: IpAddr) -> Result<(), IpamError> {
        let path = self.dir.join(format!("last_reserved_ip.{idx}"));
        fs::write(&path, ip.to_string()).map_err(io_err("write", &path))
    }

    /// Gives `(id, ifname)` one address from each pool: the one it already holds (repeated ADD),
    /// else a requested one, else the next free one. Returns each address and whether this call
    /// reserved it (so a failed ADD releases only what it took).
    pub fn allocate(
        &self,
        network: &str,
        pools: &[Pool],
        id: &str,
        ifname: &str,
        requested: &[IpAddr],
    ) -> Result<Vec<(IpAddr, bool)>, IpamError> {
        let held = self.by_owner(id, ifname)?;
        let mut out: Vec<(IpAddr, bool)> = Vec::new();
        let result = (|| {
            for (idx, pool) in pools.iter().enumerate() {
                if let Some(ip) = held.iter().copied().find(|ip| pool.contains(*ip)) {
                    out.push((ip, false));
                    continue;
                }
                let v4 = pool.start.is_ipv4();
                if let Some(&want) = requested.iter().find(|ip| ip.is_ipv4() == v4) {
                    if !pool.contains(want) {
                        return Err(IpamError::Unavailable {
                            ip: want,
                            reason: format!(
                                "outside {}-{} or the gateway {}",
                                pool.start, pool.end, pool.gateway
                            ),
                        });
                    }
                    if !self.reserve(want, id, ifname)? {
                        let who = self.owner_of(want)?.map(|o| o.container_id);
                        return Err(IpamError::Unavailable {
                            ip: want,
                            reason: format!("held by container {}", who.unwrap_or_default()),
                        });
                    }
                    out.push((want, true));
                    continue;
                }
                let mut got = None;
                for ip in pool.candidates(self.last_reserved(idx)) {
                    if self.reserve(ip, id, ifname)? {
                        got = Some(ip);
                        break;
                    }
                }
                let ip = got.ok_or_else(|| IpamError::Exhausted {
                    network: network.to_string(),
                    start: pool.start,
                    end: pool.end,
                })?;
                self.set_last_reserved(idx, ip)?;
                out.push((ip, true));
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (ip, fresh) in &out {
                if *fresh {
                    let _ = self.release(*ip);
                }
            }
            return Err(e);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(net: &str) -> Pool {
        Pool::new(net.parse().unwrap(), None, None).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pool_defaults_skip_network_broadcast_and_gateway() {
        let p = pool("10.244.1.1/24");
        assert_eq!(p.start, ip("10.244.1.1"));
        assert_eq!(p.end, ip("10.244.1.254"));
        let c: Vec<_> = p.candidates(None).collect();
        assert_eq!(c.len(), 253);
        assert_eq!(c[0], ip("10.244.1.2"));
        assert!(!c.contains(&ip("10.244.1.1")));
        assert!(!p.contains(ip("10.244.1.1")));
        assert!(!p.contains(ip("10.244.1.255")));
        assert_eq!(p.with_prefix(ip("10.244.1.7")).to_string(), "10.244.1.7/24");
    }

    #[test]
    fn candidates_are_round_robin_after_last() {
        let p = pool("10.0.0.1/29"); // .1 gw, .2-.6 usable
        let c: Vec<_> = p.candidates(Some(ip("10.0.0.4"))).collect();
        assert_eq!(
            c,
            ["10.0.0.5", "10.0.0.6", "10.0.0.2", "10.0.0.3", "10.0.0.4"].map(ip)
        );
        // A last address outside the range restarts at the beginning.
        assert_eq!(
            p.candidates(Some(ip("192.168.0.1"))).next(),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(
            p.candidates(Some(ip("10.0.0.6"))).next(),
            Some(ip("10.0.0.2"))
        );
    }

    #[test]
    fn range_must_fit_the_subnet() {
        let n: IpNet = "10.0.0.1/24".parse().unwrap();
        let p = Pool::new(n, Some(ip("10.0.0.10")), Some(ip("10.0.0.12"))).unwrap();
        assert_eq!(p.candidates(None).count(), 3);
        for (s, e) in [
            (Some("10.0.1.10"), None),
            (None, Some("10.0.0.255")),
            (Some("10.0.0.0"), None),
            (Some("fd00::1"), None),
        ] {
            let err = Pool::new(n, s.map(ip), e.map(ip)).unwrap_err();
            assert!(matches!(err, IpamError::BadRange { .. }), "{err}");
        }
        let v6 = pool("fd00:0:0:1::1/64");
        assert_eq!(v6.candidates(None).next(), Some(ip("fd00:0:0:1::2")));
    }

    #[test]
    fn owner_formats() {
        assert_eq!(
            Owner::parse("abc\r\neth0"),
            Owner {
                container_id: "abc".into(),
                ifname: Some("eth0".into())
            }
        );
        assert_eq!(Owner::parse("abc\neth1").ifname.as_deref(), Some("eth1"));
        let legacy = Owner::parse("abc\n");
        assert_eq!(legacy.ifname, None);
        assert!(legacy.is("abc", "eth7"));
        assert!(!Owner::parse("abc\r\neth0").is("abc", "eth1"));
    }

    fn store(dir: &Path) -> Store {
        Store::open(dir, "net", Duration::from_millis(200)).unwrap()
    }

    #[test]
    fn allocates_distinct_addresses_and_reuses_on_repeat() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let pools = [pool("10.0.0.1/24")];
        let a = s.allocate("net", &pools, "a", "eth0", &[]).unwrap();
        let b = s.allocate("net", &pools, "b", "eth0", &[]).unwrap();
        assert_eq!(a, vec![(ip("10.0.0.2"), true)]);
        assert_eq!(b, vec![(ip("10.0.0.3"), true)]);
        let again = s.allocate("net", &pools, "a", "eth0", &[]).unwrap();
        assert_eq!(again, vec![(ip("10.0.0.2"), false)]);
        let other_if = s.allocate("net", &pools, "a", "eth1", &[]).unwrap();
        assert_eq!(other_if, vec![(ip("10.0.0.4"), true)]);
        // host-local's file format.
        let text = fs::read_to_string(tmp.path().join("net/10.0.0.2")).unwrap();
        assert_eq!(text, "a\r\neth0");
        assert_eq!(s.last_reserved(0), Some(ip("10.0.0.4")));
        // Release, then the next allocation goes on round-robin, not back to .2.
        assert_eq!(s.release_owner("a", "eth0").unwrap(), vec![ip("10.0.0.2")]);
        let c = s.allocate("net", &pools, "c", "eth0", &[]).unwrap();
        assert_eq!(c, vec![(ip("10.0.0.5"), true)]);
    }

    #[test]
    fn exhaustion_and_requested_addresses() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let n: IpNet = "10.0.0.1/24".parse().unwrap();
        let pools = [Pool::new(n, Some(ip("10.0.0.10")), Some(ip("10.0.0.11"))).unwrap()];
        s.allocate("net", &pools, "a", "eth0", &[]).unwrap();
        s.allocate("net", &pools, "b", "eth0", &[]).unwrap();
        let e = s.allocate("net", &pools, "c", "eth0", &[]).unwrap_err();
        assert!(matches!(e, IpamError::Exhausted { .. }), "{e}");
        assert_eq!(CniError::from(e).code, code::ADDRESS_EXHAUSTED);
        let e = s
            .allocate("net", &pools, "c", "eth0", &[ip("10.0.0.10")])
            .unwrap_err();
        assert!(e.to_string().contains("held by container a"), "{e}");
        let e = s
            .allocate("net", &pools, "c", "eth0", &[ip("10.0.0.50")])
            .unwrap_err();
        assert!(matches!(e, IpamError::Unavailable { .. }));
        s.release_owner("a", "eth0").unwrap();
        let got = s
            .allocate("net", &pools, "c", "eth0", &[ip("10.0.0.10")])
            .unwrap();
        assert_eq!(got, vec![(ip("10.0.0.10"), true)]);
    }

    #[test]
    fn dual_stack_failure_releases_what_it_took() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let v4 = pool("10.0.0.1/24");
        let v6n: IpNet = "fd00::1/64".parse().unwrap();
        let v6 = Pool::new(v6n, Some(ip("fd00::5")), Some(ip("fd00::5"))).unwrap();
        s.allocate("net", std::slice::from_ref(&v6), "x", "eth0", &[])
            .unwrap();
        let e = s.allocate("net", &[v4, v6], "a", "eth0", &[]).unwrap_err();
        assert!(matches!(e, IpamError::Exhausted { .. }));
        assert!(
            s.by_owner("a", "eth0").unwrap().is_empty(),
            "v4 address leaked"
        );
    }

    #[test]
    fn reads_host_local_files_and_ignores_other_files() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        fs::write(tmp.path().join("net/10.0.0.9"), "legacy\n").unwrap();
        fs::write(tmp.path().join("net/last_reserved_ip.0"), "10.0.0.9").unwrap();
        let all = s.all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(s.by_owner("legacy", "eth0").unwrap(), vec![ip("10.0.0.9")]);
        let got = s
            .allocate("net", &[pool("10.0.0.1/24")], "n", "eth0", &[])
            .unwrap();
        assert_eq!(got[0].0, ip("10.0.0.10"));
    }

    #[test]
    fn open_existing_creates_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let t = Duration::from_millis(200);
        assert!(
            Store::open_existing(tmp.path(), "net", t)
                .unwrap()
                .is_none()
        );
        assert!(!tmp.path().join("net").exists());
        assert!(
            Store::open_existing(&tmp.path().join("none"), "net", t)
                .unwrap()
                .is_none()
        );
        assert!(!tmp.path().join("none").exists());
        drop(store(tmp.path()));
        let s = Store::open_existing(tmp.path(), "net", t).unwrap().unwrap();
        assert_eq!(s.dir(), tmp.path().join("net"));
    }

    #[test]
    fn lock_times_out() {
        let tmp = tempfile::tempdir().unwrap();
        let held = store(tmp.path());
        let t0 = std::time::Instant::now();
        let e = Store::open(tmp.path(), "net", Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, IpamError::LockTimeout { .. }), "{e}");
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert_eq!(CniError::from(e).code, code::TRY_AGAIN);
        drop(held);
        // Released: the next open succeeds (the helper thread of the failed one may still hold
        // its own lock attempt; it gives up when its channel is gone).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match Store::open(tmp.path(), "net", Duration::from_millis(100)) {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn concurrent_allocations_are_distinct() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let s = Store::open(&dir, "net", Duration::from_secs(10)).unwrap();
                    s.allocate("net", &[pool("10.0.0.1/24")], &format!("c{i}"), "eth0", &[])
                        .unwrap()[0]
                        .0
                })
            })
            .collect();
        let mut ips: Vec<IpAddr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 20);
    }

    #[test]
    fn random_allocate_release_never_double_books() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let pools = [pool("10.0.0.1/28")]; // 13 usable addresses
        let mut rng = twill_facts::testing::Mutator::new(0x2545_f491_4f6c_dd1d);
        let mut next = move || rng.next_u64();
        let mut held: std::collections::HashMap<String, IpAddr> = std::collections::HashMap::new();
        for _ in 0..2_000 {
            let id = format!("c{}", next() % 20);
            if next() % 3 == 0 {
                s.release_owner(&id, "eth0").unwrap();
                held.remove(&id);
                continue;
            }
            match s.allocate("net", &pools, &id, "eth0", &[]) {
                Ok(got) => {
                    let ip = got[0].0;
                    assert!(pools[0].contains(ip), "{ip}");
                    if let Some(prev) = held.get(&id) {
                        assert_eq!(*prev, ip, "a repeated allocation moved");
                    }
                    assert!(
                        held.iter().all(|(o, h)| o == &id || *h != ip),
                        "{ip} double-booked"
                    );
                    held.insert(id, ip);
                }
                Err(IpamError::Exhausted { .. }) => assert_eq!(held.len(), 13),
                Err(e) => panic!("{e}"),
            }
            assert_eq!(s.all().unwrap().len(), held.len());
        }
    }
}
