//! twill's netns rig: a whole cluster on one machine, for the privileged end-to-end tests,
//! `cargo xtask demo` and (later) `cargo xtask rig` / `bench`.
//!
//! Why it is shaped as it is:
//! - Everything lives in network namespaces the rig creates: an underlay namespace holding a
//!   bridge (the "switch") and a real `etcd`, one namespace per node, one per pod. Nothing is
//!   connected to the root namespace, so a test can never reach (or disturb) the machine's uplink.
//! - Every name carries the rig's id (`tw` + the owner's pid in base36 + a counter), so rigs of
//!   parallel tests never collide; links are created inside their namespace, so `eth0` or `br0`
//!   can repeat across namespaces and names stay under the kernel's 15 characters.
//! - Cleanup is a guard ([`Rig`]'s `Drop`), pass or fail; a run killed before its guard ran is
//!   swept by the next one: each rig keeps a state file in [`state::STATE_DIR`] naming its
//!   owner, and [`state::sweep_stale`] removes the rigs whose owner is gone.
//! - Programs run in a namespace through `nsenter --net=/run/netns/NAME`, never
//!   `ip netns exec`, which remounts `/sys` and hides bpffs and the cgroup2 mount from the
//!   program (twilld needs both).
//! - Helpers return `anyhow` errors that name the command, the namespace and the stderr, so a
//!   failing test explains itself in CI output.

#![deny(missing_docs)]

pub mod apiserver;
pub mod backend;
pub mod bench_support;
pub mod guard;
pub mod manifest;
pub mod metrics;
pub mod net;
pub mod ns;
pub mod rig;
pub mod state;
pub mod suite;
pub mod traffic;

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub use backend::Backend;
pub use guard::NetnsGuard;
pub use manifest::ServiceSpec;
pub use net::{PingStats, fdb, neigh, ping, routes};
pub use ns::{HttpResponse, exec, exec_timeout, http_get, in_netns, nsenter, run, spawn};
pub use rig::{Pod, PodShape, Rig, RigOptions};
pub use state::{leftovers, sweep_stale};
pub use traffic::{NameServer, PingFlood, server_name, tcp_exchange, tcp_line, tcp_line_in_cgroup};

/// Set by [`interrupt`]: waits and commands of the rig stop early with an "interrupted" error.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks every wait and command of the rig in this process to stop early (a Ctrl-C handler calls
/// this; the caller then drops its [`Rig`], which tears everything down).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether [`interrupt`] was called.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Whether this run is under CI (`CI=true`), where a privileged test that cannot run is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks that the test may do privileged things (create namespaces, load eBPF programs, run
/// etcd and twilld).
///
/// Returns `true` as root. Otherwise it skips by the one rule every privileged test follows:
/// under CI (`CI=true` or `CI=1`) a skip is a failure, so it panics; outside CI it says loudly
/// why the test does nothing and returns `false`, so the test can `return` early.
pub fn require_root() -> bool {
    nix::unistd::Uid::effective().is_root()
        || skip(
            "privileged test needs root (network namespaces, eBPF, etcd, twilld); run it as \
                 root, e.g. with `cargo xtask test`",
        )
}

/// Checks that the programs or files at `paths` exist (the tools a test drives: podman, the
/// reference CNI plugins, busybox), by the rule of [`require_root`]: a failure under CI, a loud
/// skip naming what is missing elsewhere.
pub fn require_tools(paths: &[&str]) -> bool {
    let missing: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|p| !std::path::Path::new(p).exists())
        .collect();
    missing.is_empty()
        || skip(&format!(
            "missing {missing:?}; `cargo xtask setup` installs them"
        ))
}

/// Skips the running test: panics under CI, says why on stderr elsewhere; always `false`.
fn skip(why: &str) -> bool {
    let test = std::thread::current().name().unwrap_or("test").to_string();
    assert!(
        !in_ci(),
        "{test}: {why} (CI=true: a skipped privileged test is a failure)"
    );
    // Straight to the stderr handle: libtest captures `eprintln!` of passing tests, and a skip
    // must not pass silently.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    false
}

/// Polls `cond` every 50 ms until it returns `true`; an error once `timeout` has passed (or on
/// [`interrupt`]).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    wait_for(timeout, || cond().then_some(()))
}

/// Polls `f` every 50 ms until it returns `Some`; an error once `timeout` has passed (or on
/// [`interrupt`]).
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if interrupted() {
            bail!("interrupted");
        }
        if Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
