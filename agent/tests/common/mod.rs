//! What the agent's privileged tests share: running a command that must succeed, `ip -batch`
//! into a namespace, joining a namespace on a thread, per-namespace sysctls, the root check and
//! error chains. Each test binary uses part of it.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::thread;

use nix::sched::{CloneFlags, setns};

/// Whether the test may run: root, or (outside CI) a loud skip. Under `CI=true` a privileged test
/// without root fails instead of skipping.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "privileged test {test} needs root"
    );
    eprintln!("SKIPPED {test}: privileged test needs root");
    false
}

/// Runs `program`; panics with its output unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("spawn {program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    output
}

/// `ip -n NS -batch -` with `script` on stdin; panics unless it succeeds.
pub fn ip_batch(ns: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ip -batch");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} -batch failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Moves the calling thread into network namespace `ns` (`/run/netns/<ns>`).
pub fn join_netns(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).unwrap_or_else(|err| panic!("open {path}: {err}"));
    setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|err| panic!("setns {path}: {err}"));
}

/// Runs `f` on a thread that first joins network namespace `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            join_netns(ns);
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// Writes sysctl `key` (dotted) in namespace `ns`: `/proc/sys/net` is the reading thread's
/// namespace's, so no `sysctl` binary is needed.
pub fn sysctl(ns: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    in_netns(ns, || {
        std::fs::write(&path, value).unwrap_or_else(|err| panic!("write {path} in {ns}: {err}"));
    });
}

/// `ip netns add NS` with IPv6 duplicate address detection off for every link made in it later
/// (a tentative link-local address delays the first IPv6 exchanges by a second or more).
pub fn add_netns(ns: &str) {
    run("ip", &["netns", "add", ns]);
    for key in [
        "net.ipv6.conf.all.accept_dad",
        "net.ipv6.conf.default.accept_dad",
    ] {
        sysctl(ns, key, "0");
    }
}

/// An error with its sources, `: `-separated.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}
