//! `cargo xtask rig`'s lifecycle through the real binary: `up` leaves a cluster running after it
//! exits (twilld with the eBPF proxy, pods made by twill-cni answering their names, the sample
//! Service), `exec` reaches nodes and pods (in the node's cgroup) and passes exit codes through,
//! `status` reports nodes, pods, leases and the Service, and `down` leaves nothing behind — no
//! namespace, process, pin, cgroup or file — also after the rig's processes were `kill -9`ed, and
//! after `up` itself was killed half-way.
//!
//! Privileged; uses the debug `twilld`, `twill-cni` and `twill-probe` in `target/debug/`
//! (`cargo xtask test` builds them). Each test names its rig by id, so tests (and other
//! engineers' rigs) never touch each other's.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use twill_tests::rig::ETCD_PREFIX;
use twill_tests::state::{RigState, STATE_DIR};
use twill_tests::{leftovers, require_root};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run xtask")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Takes a detached rig down when the test ends, pass or fail (`rig down` of a rig already
/// down is a no-op error, ignored).
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        if RigState::load(&self.0).is_ok() {
            let _ = xtask(&["rig", "down", "--id", &self.0]);
        }
    }
}

fn assert_gone(id: &str) {
    let left = leftovers(id);
    assert!(left.is_empty(), "rig {id} left:\n{}", left.join("\n"));
}

/// `rig down` of `id`, which must succeed and leave nothing behind.
fn down(id: &str) {
    let out = xtask(&["rig", "down", "--id", id]);
    assert!(out.status.success(), "{}", text(&out));
    assert_gone(id);
}

/// The rig id in `rig up`'s `xtask: rig <id> up in ...` line.
fn rig_id(output: &str) -> Option<String> {
    output.lines().find_map(|l| {
        Some(
            l.strip_prefix("xtask: rig ")?
                .split_once(" up in ")?
                .0
                .to_string(),
        )
    })
}

/// `rig up` with the debug twilld, which must leave a detached rig: its id, its state, and the
/// guard that takes it down when the test ends.
fn up(nodes: &str) -> (String, RigState, Down) {
    let out = xtask(&[
        "rig",
        "up",
        "--nodes",
        nodes,
        "--pods-per-node",
        "1",
        "--debug",
        "--no-build",
    ]);
    assert!(out.status.success(), "rig up failed:\n{}", text(&out));
    let id = rig_id(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|| panic!("no rig id in:\n{}", text(&out)));
    let down = Down(id.clone());
    let state = RigState::load(&id).unwrap();
    assert!(state.detached, "up must leave a detached rig");
    (id, state, down)
}

#[test]
fn up_exec_status_down_leaves_nothing() {
    if !require_root() {
        return;
    }
    let (id, state, _down) = up("2");
    // The owner (the xtask process) is gone, yet a sweep leaves the rig alone.
    assert!(!state.owner.alive());
    twill_tests::sweep_stale().unwrap();
    assert!(
        RigState::load(&id).is_ok(),
        "a sweep removed a detached rig"
    );
    assert!(state.pids.iter().all(twill_tests::state::ProcRecord::alive));

    let status = xtask(&["rig", "status", "--id", &id]);
    let status_text = text(&status);
    assert!(status.status.success(), "{status_text}");
    for needle in [
        "twilld running",
        "n1p1",
        "proxy mode ebpf",
        "responder running",
        "leases in etcd (2)",
        "service default/echo  ClusterIP 10.96.0.10:80  NodePort 30080",
        // twilld's own view of the service source.
        "10.96.0.10",
    ] {
        assert!(
            status_text.contains(needle),
            "no {needle:?} in:\n{status_text}"
        );
    }
    assert!(
        state.cgroups.iter().all(|c| c.is_dir()),
        "{:?}",
        state.cgroups
    );

    // The sample Service answers from a pod, with the name of one of its endpoints (busybox
    // wget, as a user would; the command runs in the node's cgroup, so socket-LB picks).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let get = xtask(&[
            "rig",
            "exec",
            "--id",
            &id,
            "n2p1",
            "--",
            "timeout",
            "5",
            "busybox",
            "wget",
            "-qO-",
            "http://10.96.0.10/",
        ]);
        assert!(get.status.success(), "{}", text(&get));
        let who = String::from_utf8_lossy(&get.stdout).trim().to_string();
        assert!(["n1p1", "n2p1"].contains(&who.as_str()), "answer {who:?}");
        seen.insert(who);
    }
    assert!(!seen.is_empty());

    // Node 1's pod reaches node 2's pod (address from the status listing).
    let peer = status_text
        .lines()
        .find(|l| l.trim_start().starts_with("n2p1"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("no n2p1 in {status_text}"))
        .to_string();
    let ping = xtask(&[
        "rig", "exec", "--id", &id, "n1p1", "--", "ping", "-c", "1", "-W", "2", &peer,
    ]);
    assert!(ping.status.success(), "{}", text(&ping));
    // Exit codes come through.
    let f = xtask(&["rig", "exec", "--id", &id, "n1", "--", "sh", "-c", "exit 3"]);
    assert_eq!(f.status.code(), Some(3), "{}", text(&f));

    down(&id);
}

/// `--proxy-mode iptables` (a dataplane of another branch) either comes up with a working
/// Service, or is refused up front with twilld's reason — and never leaves anything behind.
#[test]
fn a_proxy_mode_twilld_does_not_know_is_refused_cleanly() {
    if !require_root() {
        return;
    }
    let before: Vec<String> = RigState::list()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    let out = xtask(&[
        "rig",
        "up",
        "--nodes",
        "1",
        "--pods-per-node",
        "1",
        "--proxy-mode",
        "iptables",
        "--debug",
        "--no-build",
    ]);
    let all = text(&out);
    if out.status.success() {
        assert!(all.contains("proxy mode iptables"), "{all}");
        assert!(all.contains("service default/echo"), "{all}");
        let id = rig_id(&all).unwrap();
        let _down = Down(id.clone());
        down(&id);
    } else {
        assert!(
            all.contains("does not support --proxy-mode iptables"),
            "the refusal must name the mode:\n{all}"
        );
        let new: Vec<String> = RigState::list()
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .filter(|id| !before.contains(id))
            .collect();
        for id in &new {
            // Another test's rig may be coming up meanwhile: only ours (owned by no one) counts.
            let s = RigState::load(id);
            assert!(
                s.is_err() || s.unwrap().owner.alive(),
                "a refused rig up left rig {id}"
            );
        }
    }
}

#[test]
fn down_after_kill_9_of_the_rig_processes() {
    if !require_root() {
        return;
    }
    let (id, state, _down) = up("1");
    assert!(
        state.pids.iter().any(|p| p.what.starts_with("responder")),
        "{:?}",
        state.pids
    );
    for rec in &state.pids {
        let _ = kill(Pid::from_raw(rec.pid), Signal::SIGKILL);
    }
    // SIGKILL is delivered asynchronously.
    twill_tests::wait_until(Duration::from_secs(10), || {
        state.pids.iter().all(|p| !p.alive())
    })
    .expect("rig processes survived SIGKILL");
    let status = xtask(&["rig", "status", "--id", &id]);
    assert!(
        text(&status).contains("NOT RUNNING"),
        "status does not notice: {}",
        text(&status)
    );
    down(&id);
}

#[test]
fn down_after_up_was_killed_half_way() {
    if !require_root() {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "rig",
            "up",
            "--nodes",
            "2",
            "--pods-per-node",
            "1",
            "--debug",
            "--no-build",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until its rig has namespaces and processes, then kill it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let found = RigState::list()
            .unwrap()
            .into_iter()
            .find(|s| s.owner.pid == pid && s.pids.iter().any(|p| p.what.starts_with("twilld")));
        if let Some(s) = found {
            break s.id;
        }
        assert!(Instant::now() < deadline, "rig up never got to twilld");
        assert!(
            child.try_wait().unwrap().is_none(),
            "rig up finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(Path::new(STATE_DIR).join(format!("{id}.json")).exists());

    down(&id);
}

#[test]
fn attach_takes_a_detached_rig_back_and_its_drop_tears_down() {
    if !require_root() {
        return;
    }
    let (id, _, _down) = up("2");
    let rig = twill_tests::Rig::attach(&id).unwrap();
    assert_eq!(rig.nodes(), 2);
    assert!(
        !RigState::load(&id).unwrap().detached,
        "attached means owned"
    );
    // etcd answers through the guard, and a new pod gets the next free name and address.
    let subnets = format!("{ETCD_PREFIX}/subnets/");
    let leases = rig
        .etcdctl(&["get", "--prefix", "--keys-only", &subnets])
        .unwrap();
    assert_eq!(
        leases.lines().filter(|l| !l.is_empty()).count(),
        2,
        "{leases}"
    );
    let facts = twill_facts::SubnetFacts::read(&rig.subnet_file(1)).unwrap();
    let pod = rig.add_pod(1, &facts).unwrap();
    assert_eq!(pod.ns, format!("{id}-n1p2"));
    drop(rig);
    assert_gone(&id);
}
