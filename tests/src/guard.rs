//! The namespace guard: everything a privileged test makes on the machine — network namespaces,
//! cgroup2 directories, bpf pin directories, a temporary directory, processes — named uniquely,
//! recorded before it is made, and removed when the guard is dropped, pass or fail. Every test
//! environment is built on it: the rig ([`crate::Rig`]), the agent's dataplane tests (node,
//! backend and outside namespaces with a cgroup and a pin directory), twill-cni's node and pod
//! namespaces.
//!
//! Why it is shaped as it is:
//! - Names come from the guard, never from the test: `<id>-<short>`, where the id is `tw`, the
//!   owner's pid in base36 and a per-process counter. Tests that picked their own tags collided
//!   when two of them picked the same one and ran in parallel (one test's namespaces, cgroup
//!   and pins were deleted under the other); a guard cannot hand out a name twice.
//! - The record is the rig's state file ([`crate::state::RigState`] in
//!   [`crate::state::STATE_DIR`]), written before each object is made: a run killed before its
//!   guards dropped is swept by the next guard made anywhere ([`crate::state::sweep_stale`]), and
//!   `cargo xtask sweep` finds it too. Teardown refuses to remove anything not named after the
//!   guard.
//! - Teardown kills every process inside the guard's namespaces before deleting them (a server a
//!   test forgot, a plugin a killed test left), moves stragglers out of its cgroups, and keeps
//!   going past errors: what can be removed is removed, the rest is reported.
//! - A namespace is usable at once: loopback up, IPv6 duplicate address detection off (a
//!   tentative address delays the first IPv6 exchanges by a second or more).
//! - Every method takes `&self` (the record sits behind a mutex), so scoped threads can share a
//!   guard.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::{Context, Result, ensure};

use crate::ns;
use crate::state::{
    self, CGROUP_PREFIX, Owner, PIN_ROOT, ProcRecord, RigState, TEMP_PREFIX, proc_start_time,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A test's namespaces, cgroups, pin directories, temporary directory and processes; dropping
/// it removes all of them.
#[derive(Debug)]
pub struct NetnsGuard {
    id: String,
    temp_dir: PathBuf,
    state: Mutex<RigState>,
    /// Set by [`NetnsGuard::detach`]: the drop leaves everything in place.
    detached: AtomicBool,
}

impl NetnsGuard {
    /// A fresh guard with its temporary directory made. Needs root. Sweeps what killed runs
    /// left first.
    pub fn new() -> Result<NetnsGuard> {
        ensure!(
            nix::unistd::Uid::effective().is_root(),
            "network namespaces need root"
        );
        if let Err(e) = state::sweep_stale() {
            eprintln!("twill-rig: sweeping stale rigs failed: {e:#}");
        }
        let id = next_id();
        let temp_dir = state::temp_base().join(format!("{TEMP_PREFIX}{id}"));
        let record = RigState::new(&id, temp_dir.clone())?;
        record.save()?;
        // From here on the guard exists: an error below drops it, which removes what was made.
        let guard = NetnsGuard {
            id,
            temp_dir,
            state: Mutex::new(record),
            detached: AtomicBool::new(false),
        };
        std::fs::create_dir_all(&guard.temp_dir)
            .with_context(|| format!("create {}", guard.temp_dir.display()))?;
        Ok(guard)
    }

    /// The guard of the detached rig `id` (see [`NetnsGuard::detach`]), owned by this process
    /// from now on.
    pub fn attach(id: &str) -> Result<NetnsGuard> {
        let mut record = RigState::load(id)?;
        record.owner = Owner::me()?;
        record.detached = false;
        record.save()?;
        Ok(NetnsGuard {
            id: id.to_string(),
            temp_dir: record.temp_dir.clone(),
            state: Mutex::new(record),
            detached: AtomicBool::new(false),
        })
    }

    /// Lets everything outlive this guard and this process: marks the record detached, so
    /// sweeps leave it alone, and makes the drop a no-op. [`NetnsGuard::attach`] or
    /// [`state::remove`] end it.
    pub fn detach(&self) -> Result<()> {
        {
            let mut record = self.lock();
            record.detached = true;
            record.save()?;
        }
        self.detached.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The guard's id: the prefix of every name it hands out.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The guard's temporary directory (removed with it).
    pub fn temp_dir(&self) -> &Path {
        &self.temp_dir
    }

    /// The full name of `short`: `<id>-<short>`.
    pub fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.id)
    }

    /// Creates namespace `<id>-<short>` (recorded first), loopback up and DAD off; its name.
    pub fn netns(&self, short: &str) -> Result<String> {
        Ok(self.netns_all(&[short])?.remove(0))
    }

    /// [`NetnsGuard::netns`] for several namespaces at once (one write of the record).
    pub fn netns_all(&self, shorts: &[&str]) -> Result<Vec<String>> {
        let names: Vec<String> = shorts.iter().map(|s| self.name(s)).collect();
        {
            let mut record = self.lock();
            for name in &names {
                ensure!(
                    !record.namespaces.contains(name),
                    "namespace {name} was already made by this guard"
                );
            }
            record.namespaces.extend(names.iter().cloned());
            record.save()?;
        }
        for name in &names {
            ns::create_netns(name)?;
            ns::sysctl(name, "net.ipv6.conf.all.accept_dad", "0")?;
            ns::sysctl(name, "net.ipv6.conf.default.accept_dad", "0")?;
            ns::ip_batch(Some(name), "link set lo up\n")?;
        }
        Ok(names)
    }

    /// The guard's namespaces, in creation order.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock().namespaces.clone()
    }

    /// Deletes namespace `name` (one of the guard's) before the guard ends, after killing the
    /// processes inside; gone already is fine.
    pub fn delete_netns(&self, name: &str) -> Result<()> {
        ensure!(
            self.lock().namespaces.iter().any(|n| n == name),
            "namespace {name} is not this guard's"
        );
        for pid in ns::pids_in_netns(&[name.to_string()]) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        ns::delete_netns(name)
    }

    /// Creates cgroup2 directory `<cgroup2>/twill-<id>-<short>` (recorded first; made once);
    /// its path.
    pub fn cgroup(&self, short: &str) -> Result<PathBuf> {
        let dir = state::cgroup2_root().join(format!("{CGROUP_PREFIX}{}", self.name(short)));
        {
            let mut record = self.lock();
            if !record.cgroups.contains(&dir) {
                record.cgroups.push(dir.clone());
                record.save()?;
            }
        }
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                Err(e).with_context(|| format!("create cgroup {}", dir.display()))
            }
            _ => Ok(dir),
        }
    }

    /// Creates bpf pin directory `/sys/fs/bpf/twill/<id>-<short>` (recorded first); its path.
    pub fn pin_dir(&self, short: &str) -> Result<PathBuf> {
        let dir = Path::new(PIN_ROOT).join(self.name(short));
        {
            let mut record = self.lock();
            if !record.pin_dirs.contains(&dir) {
                record.pin_dirs.push(dir.clone());
                record.save()?;
            }
        }
        // A second try: another guard's teardown may remove the shared parent in between.
        std::fs::create_dir_all(&dir)
            .or_else(|_| std::fs::create_dir_all(&dir))
            .with_context(|| format!("create {} (is bpffs mounted?)", dir.display()))?;
        Ok(dir)
    }

    /// Records a process the test started (teardown kills it if it still runs, even outside
    /// the guard's namespaces).
    pub fn record_process(&self, child: &Child, what: &str) -> Result<()> {
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        let mut record = self.lock();
        record.pids.push(ProcRecord {
            pid,
            start: proc_start_time(pid).unwrap_or(0),
            what: what.to_string(),
        });
        record.save()
    }

    /// Forgets a recorded process that has been reaped.
    pub fn forget_process(&self, pid: u32) -> Result<()> {
        let mut record = self.lock();
        record
            .pids
            .retain(|p| u32::try_from(p.pid).ok() != Some(pid));
        record.save()
    }

    fn lock(&self) -> MutexGuard<'_, RigState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        let record = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        for err in state::teardown(record) {
            eprintln!("twill-rig: teardown of {}: {err:#}", self.id);
        }
    }
}

/// A fresh id: `tw`, the pid in base36 (5 digits, enough for any pid), a counter in base36.
fn next_id() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "tw{:0>5}{}",
        base36(u64::from(std::process::id())),
        base36(u64::from(n))
    )
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[usize::try_from(n % 36).expect("below 36")]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_and_unique() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(4_194_304).len(), 5); // pid_max on 64-bit
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| next_id()).collect();
        assert_eq!(ids.len(), 1000);
        // Two counter digits up to the 1296th guard of a process: names stay short.
        let a = next_id();
        assert!(a.len() <= 9, "{a}");
    }
}
