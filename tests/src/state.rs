//! Crash safety: every rig records what it owns in `/run/twill-rig/<id>.json`, so that a run
//! killed before its guard could clean up (SIGKILL, a CI timeout, an abort) is swept by the next.
//!
//! Why it is shaped as it is:
//! - The record is written *before* each resource is created (a namespace, a pin directory) and
//!   right after each process is spawned, so a crash at any point leaves nothing unrecorded but
//!   a process in the instant between its spawn and the write.
//! - The owner is identified by pid *and* start time (field 22 of `/proc/PID/stat`): a recycled
//!   pid is not mistaken for a live owner, and a recycled pid of a recorded child is never killed.
//! - Besides the recorded pids, every process whose network namespace is one of the rig's is
//!   killed (matched by the namespace's inode): that catches what a test spawned and forgot
//!   (an `iperf3 -s`, a `ping`) and the instant above.
//! - Records live in `/run`, cleared at boot on most systems, like the namespaces they name; a
//!   record that outlives its rig anyway only costs its sweep a few no-op removals.
//! - Sweeps are serialised with an `flock` on `/run/twill-rig/.lock`; every step tolerates
//!   things already gone, so a sweep that itself dies half-way is finished by the next one.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::ns;

/// Where the rigs' state files live.
pub const STATE_DIR: &str = "/run/twill-rig";

/// Where the rigs' twilld instances pin their bpf objects, one directory per node.
pub const PIN_ROOT: &str = "/sys/fs/bpf/twill";

/// Where the rigs' per-node cgroup2 directories live (the socket-level load balancer of a node's
/// twilld attaches there): the cgroup2 mount of a hybrid host, or the unified hierarchy itself.
pub fn cgroup2_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified.to_path_buf()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

/// Prefix of a rig's cgroup directory names (`twill-<id>-n<node>`); the rig id follows.
pub const CGROUP_PREFIX: &str = "twill-";

/// Prefix of a rig's temporary directory name; the rig id follows.
pub const TEMP_PREFIX: &str = "twill-rig-";

/// Where rigs put their temporary directories: `TWILL_RIG_TMPDIR` if set, else `/dev/shm` (a
/// tmpfs: etcd's fsyncs cost nothing there, where on a busy disk they stall it for seconds),
/// else the system temp dir.
pub fn temp_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("TWILL_RIG_TMPDIR") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A process a rig started, identified beyond its pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    /// Its pid.
    pub pid: i32,
    /// Its start time (clock ticks after boot), so a recycled pid is never killed.
    pub start: u64,
    /// What it is (`etcd`, `twilld n1`), for messages.
    pub what: String,
}

impl ProcRecord {
    /// Whether the process still runs (same pid and start time, not a zombie).
    pub fn alive(&self) -> bool {
        still_running(self.pid, self.start)
    }
}

/// The process that owns a rig, identified like a [`ProcRecord`]; in the state file its fields
/// are `owner_pid` and `owner_start`, beside the rig's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Its pid.
    #[serde(rename = "owner_pid")]
    pub pid: u32,
    /// Its start time, see [`ProcRecord::start`].
    #[serde(rename = "owner_start")]
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn me() -> Result<Self> {
        let pid = std::process::id();
        let start = proc_start_time(i32::try_from(pid).context("pid out of range")?)
            .context("read own start time in /proc/self/stat")?;
        Ok(Owner { pid, start })
    }

    /// Whether the owner still runs (same pid and start time, not a zombie).
    pub fn alive(&self) -> bool {
        i32::try_from(self.pid).is_ok_and(|pid| still_running(pid, self.start))
    }
}

/// Everything a rig owns, as written to its state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RigState {
    /// The rig id (the prefix of every name it uses).
    pub id: String,
    /// The process that owns the rig.
    #[serde(flatten)]
    pub owner: Owner,
    /// Namespaces, in creation order.
    pub namespaces: Vec<String>,
    /// Processes started by the rig (etcd, twilld).
    pub pids: Vec<ProcRecord>,
    /// bpf pin directories handed to twilld.
    pub pin_dirs: Vec<PathBuf>,
    /// cgroup2 directories made for the nodes (`<cgroup2>/twill-<id>-n<node>`), removed after
    /// the processes and pins.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// The rig's temporary directory (etcd data, logs, subnet files).
    pub temp_dir: PathBuf,
    /// Set by [`crate::Rig::detach`]: the rig outlives its owner on purpose (`cargo xtask rig
    /// up`), so [`sweep_stale`] leaves it alone; [`crate::Rig::attach`] and [`remove`] end it.
    #[serde(default)]
    pub detached: bool,
}

impl RigState {
    /// A record for rig `id`, owned by this process.
    pub fn new(id: &str, temp_dir: PathBuf) -> Result<Self> {
        Ok(RigState {
            id: id.to_string(),
            owner: Owner::me()?,
            namespaces: Vec::new(),
            pids: Vec::new(),
            pin_dirs: Vec::new(),
            cgroups: Vec::new(),
            temp_dir,
            detached: false,
        })
    }

    /// Reads the state file of rig `id`.
    pub fn load(id: &str) -> Result<Self> {
        let path = Self::path_of(id);
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
    }

    /// Every readable state file, sorted by rig id.
    pub fn list() -> Result<Vec<Self>> {
        let dir = match std::fs::read_dir(STATE_DIR) {
            Ok(dir) => dir,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context(format!("read {STATE_DIR}")),
        };
        let mut states: Vec<Self> = dir
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
                Self::load(&name).ok()
            })
            .collect();
        states.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(states)
    }

    /// The state file of rig `id`.
    pub fn path_of(id: &str) -> PathBuf {
        Path::new(STATE_DIR).join(format!("{id}.json"))
    }

    /// Writes the state file atomically (temporary file, then rename).
    pub fn save(&self) -> Result<()> {
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("create {STATE_DIR}"))?;
        let path = Self::path_of(&self.id);
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(self)?;
        std::fs::write(&tmp, json).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))
    }
}

/// Removes every rig whose owner process is gone: its processes, namespaces, pin directories,
/// temporary directory and state file. Returns the ids swept. [`crate::Rig::new`] calls this first.
pub fn sweep_stale() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(STATE_DIR) {
        Ok(dir) => dir,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(format!("read {STATE_DIR}")),
    };
    let lock_path = Path::new(STATE_DIR).join(".lock");
    let lock_file =
        File::create(&lock_path).with_context(|| format!("create {}", lock_path.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow!("flock {}: {errno}", lock_path.display()))?;

    let mut swept = Vec::new();
    for entry in dir.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let state: RigState = match std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| serde_json::from_slice(&b).map_err(anyhow::Error::from))
        {
            Ok(s) => s,
            Err(e) if path.exists() => {
                eprintln!(
                    "twill-rig: ignoring unreadable state file {}: {e:#}",
                    path.display()
                );
                continue;
            }
            Err(_) => continue, // removed by its owner meanwhile
        };
        if state.detached || state.owner.alive() {
            continue;
        }
        eprintln!(
            "twill-rig: sweeping stale rig {} (owner pid {} is gone)",
            state.id, state.owner.pid
        );
        for err in teardown(&state) {
            eprintln!("twill-rig: sweep {}: {err:#}", state.id);
        }
        swept.push(state.id);
    }
    Ok(swept)
}

/// Removes rig `id` (detached or not, its owner alive or not) as [`sweep_stale`] would; an
/// error listing what could not be removed.
pub fn remove(id: &str) -> Result<()> {
    let state = RigState::load(id)?;
    let errors = teardown(&state);
    if errors.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
    Err(anyhow!("teardown of rig {id}: {}", lines.join("; ")))
}

/// Removes everything `state` names, tolerating what is already gone, and returns the errors
/// met on the way (it does not stop at the first: the rest is still worth removing).
pub(crate) fn teardown(state: &RigState) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();

    // Processes: the recorded ones (if still the same process), then anything else inside the
    // rig's namespaces. Twice, in case something forked meanwhile.
    let mut killed = Vec::new();
    for rec in &state.pids {
        if rec.alive() {
            let _ = kill(Pid::from_raw(rec.pid), Signal::SIGKILL);
            killed.push(rec.pid);
        }
    }
    for _ in 0..2 {
        for pid in ns::pids_in_netns(&state.namespaces) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed.push(pid);
        }
        wait_gone(&killed, Duration::from_secs(5));
    }
    if let Some(pid) = killed.iter().find(|&&p| proc_alive(p)) {
        errors.push(anyhow!("process {pid} survived SIGKILL"));
    }

    for name in state.namespaces.iter().rev() {
        if !name.starts_with(&format!("{}-", state.id)) {
            errors.push(anyhow!(
                "refusing to delete netns {name}: not named after the rig"
            ));
            continue;
        }
        if let Err(e) = ns::delete_netns(name) {
            errors.push(e);
        }
    }

    remove_rig_dirs(
        &state.pin_dirs,
        &format!("{}-", state.id),
        |dir| dir.starts_with(PIN_ROOT),
        "pin dir",
        remove_dir_all,
        &mut errors,
    );
    // The shared parent goes with the last rig: removing a directory fails while it holds
    // anything (another rig's pins, a real twilld's), and rigs create it again as they need it.
    if !state.pin_dirs.is_empty() {
        let _ = std::fs::remove_dir(PIN_ROOT);
    }

    let cgroup2 = cgroup2_root();
    remove_rig_dirs(
        &state.cgroups,
        &format!("{CGROUP_PREFIX}{}-", state.id),
        |dir| dir.parent() == Some(cgroup2.as_path()),
        "cgroup",
        remove_cgroup,
        &mut errors,
    );

    let temp_named = state
        .temp_dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == format!("{TEMP_PREFIX}{}", state.id));
    if temp_named {
        if let Err(e) = remove_dir_all(&state.temp_dir) {
            errors.push(e);
        }
    } else {
        errors.push(anyhow!(
            "refusing to remove {}: not a rig temp dir",
            state.temp_dir.display()
        ));
    }

    if errors.is_empty() {
        let path = RigState::path_of(&state.id);
        // A save interrupted by a kill leaves its temporary file behind.
        let _ = std::fs::remove_file(path.with_extension("json.tmp"));
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != ErrorKind::NotFound
        {
            errors.push(anyhow!("remove {}: {e}", path.display()));
        }
    }
    errors
}

/// What is left on the machine of rig `id`: namespaces, processes, temporary directory, pin
/// directories, state file — one line each; empty when the rig is completely gone.
pub fn leftovers(id: &str) -> Vec<String> {
    let mut left = Vec::new();
    let prefix = format!("{id}-");
    if let Ok(dir) = std::fs::read_dir(ns::NETNS_DIR) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                left.push(format!("netns {name}"));
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(PIN_ROOT) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                left.push(format!("pin dir {}", e.path().display()));
            }
        }
    }
    let cgroup_prefix = format!("{CGROUP_PREFIX}{id}-");
    if let Ok(dir) = std::fs::read_dir(cgroup2_root()) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&cgroup_prefix) {
                left.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    let temp = temp_base().join(format!("{TEMP_PREFIX}{id}"));
    if temp.exists() {
        left.push(format!("temp dir {}", temp.display()));
    }
    let state = RigState::path_of(id);
    for f in [state.clone(), state.with_extension("json.tmp")] {
        if f.exists() {
            left.push(format!("state file {}", f.display()));
        }
    }
    // Processes started by the rig name its temp dir on their command line (etcd's data dir,
    // twilld's subnet file).
    let marker = format!("{TEMP_PREFIX}{id}/");
    let me = std::process::id().to_string();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let alive = pid.parse().is_ok_and(proc_alive);
            if alive && cmdline.contains(&marker) {
                left.push(format!("process {pid}: {}", cmdline.trim()));
            }
        }
    }
    left
}

/// `remove_dir_all` that treats "already gone" as success.
/// Removes each of `dirs` with `remove`, if it is one of the rig's `kind`s: its name starts with
/// `prefix` and `placed` accepts where it is. Any other is refused (a state file is not trusted
/// to name anything outside the rig); every refusal and failure is pushed to `errors`.
fn remove_rig_dirs(
    dirs: &[PathBuf],
    prefix: &str,
    placed: impl Fn(&Path) -> bool,
    kind: &str,
    remove: fn(&Path) -> Result<()>,
    errors: &mut Vec<anyhow::Error>,
) {
    for dir in dirs {
        let named = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix));
        if !named || !placed(dir) {
            errors.push(anyhow!(
                "refusing to remove {}: not a rig {kind}",
                dir.display()
            ));
            continue;
        }
        if let Err(e) = remove(dir) {
            errors.push(e);
        }
    }
}

fn remove_dir_all(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Removes a (leaf) cgroup directory, treating "already gone" as success. Processes still in it
/// (a client a crashed run moved there, outside every rig namespace) are moved to the cgroup2
/// root first; a cgroup whose last process just died can report busy for a moment, so the rmdir
/// is retried briefly.
fn remove_cgroup(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines() {
            let _ = std::fs::write(cgroup2_root().join("cgroup.procs"), pid);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
        }
    }
}

/// The fields of `/proc/PID/stat` after the command name (field 3, the state, comes first).
fn proc_stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The start time of `pid` in clock ticks after boot (field 22 of `/proc/PID/stat`).
pub(crate) fn proc_start_time(pid: i32) -> Option<u64> {
    proc_stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

/// Whether `pid` is still the process that started at `start` (and not a zombie).
fn still_running(pid: i32, start: u64) -> bool {
    proc_alive(pid) && proc_start_time(pid) == Some(start)
}

/// Whether `pid` exists and is not a zombie.
pub(crate) fn proc_alive(pid: i32) -> bool {
    proc_stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z" && s != "X"))
}

/// Waits (bounded) until none of `pids` is alive.
fn wait_gone(pids: &[i32], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|&p| proc_alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_this_process_and_stays_flat_in_the_state_file() {
        let state = RigState::new("t1", PathBuf::from("/tmp/twill-rig-t1")).unwrap();
        assert_eq!(state.owner.pid, std::process::id());
        assert!(state.owner.alive(), "this process runs");
        let stale = Owner {
            start: state.owner.start + 1,
            ..state.owner
        };
        assert!(!stale.alive(), "same pid, another start time");

        // The file a rig of an earlier xtask wrote still reads, and this one writes the same keys.
        let json = serde_json::json!({
            "id": "t1",
            "owner_pid": state.owner.pid,
            "owner_start": state.owner.start,
            "namespaces": [],
            "pids": [],
            "pin_dirs": [],
            "temp_dir": "/tmp/twill-rig-t1",
        });
        let read: RigState = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(read, state);
        let written = serde_json::to_value(&state).unwrap();
        assert_eq!(written["owner_pid"], json["owner_pid"]);
        assert_eq!(written["owner_start"], json["owner_start"]);
        assert!(written.get("owner").is_none(), "{written}");
    }
}
