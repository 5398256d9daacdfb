//! twilld on the rig's nodes: where its binary, subnet file, pins and log are, starting and
//! signalling it, and waiting for what it writes (the subnet file, the peers' routes).

use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use twill_facts::SubnetFacts;

use super::{ETCD_ENDPOINT, Rig, STOP_GRACE, append_log, child_pid, tail};
use crate::ns::{self, nsenter};
use crate::state::PIN_ROOT;

impl Rig {
    /// Where `twilld` is expected:
    /// [`RigOptions::bin_dir`], else `TWILL_BIN_DIR`, else the `target/<profile>/` directory of
    /// the running executable (test binaries live in `target/<profile>/deps/`).
    pub fn twilld_path(&self) -> Result<PathBuf> {
        self.binary("twilld")
    }

    /// The directory the rig takes twill's binaries from (see [`Rig::twilld_path`]).
    pub fn bin_dir(&self) -> Result<PathBuf> {
        match (&self.bin_dir, std::env::var_os("TWILL_BIN_DIR")) {
            (Some(dir), _) => Ok(dir.clone()),
            (None, Some(dir)) => Ok(PathBuf::from(dir)),
            (None, None) => {
                let exe = std::env::current_exe().context("locate the running executable")?;
                let dir = exe.parent().context("executable has no directory")?;
                if dir.file_name().is_some_and(|n| n == "deps") {
                    Ok(dir.parent().context("deps has no parent")?.to_path_buf())
                } else {
                    Ok(dir.to_path_buf())
                }
            }
        }
    }

    /// twill's binary `name` (`twilld`, `twill-cni`, `twill-probe`) in [`Rig::bin_dir`]; an
    /// error saying how to build it if it is not there.
    pub fn binary(&self, name: &str) -> Result<PathBuf> {
        let path = self.bin_dir()?.join(name);
        ensure!(
            path.is_file(),
            "{name} not found at {}: build it with cargo build --workspace --bins \
             (or point TWILL_BIN_DIR at its directory)",
            path.display()
        );
        Ok(path)
    }

    /// The subnet file node `node`'s twilld writes.
    pub fn subnet_file(&self, node: usize) -> PathBuf {
        self.node_dir(node).join("subnet.env")
    }

    /// The bpf pin directory the rig gives node `node`'s twilld (`/sys/fs/bpf/twill/<id>-n<node>`).
    pub fn pin_dir(&self, node: usize) -> PathBuf {
        self.check_node(node);
        Path::new(PIN_ROOT).join(self.guard.name(&format!("n{node}")))
    }

    /// The log of node `node`'s twilld (all its runs, appended).
    pub fn twilld_log_path(&self, node: usize) -> PathBuf {
        self.node_dir(node).join("twilld.log")
    }

    /// The identity file node `node`'s twilld keeps (`<temp>/n<node>/node-id`): the rig's nodes
    /// share the host's file system, so each gets its own instead of the default path.
    pub fn node_id_file(&self, node: usize) -> PathBuf {
        self.node_dir(node).join("node-id")
    }

    /// Starts twilld on node `node`:
    /// `twilld --etcd-endpoints http://198.18.0.1:2379 --iface eth0 --subnet-file
    /// <temp>/n<node>/subnet.env --healthz-port 0 --bpf-pin-dir <pin dir> --node-id-file
    /// <temp>/n<node>/node-id <extra_args>`, with `RUST_LOG` and its output appended to
    /// [`Rig::twilld_log_path`].
    pub fn start_twilld(&self, node: usize, extra_args: &[&str]) -> Result<()> {
        self.start_twilld_env(node, extra_args, &[])
    }

    /// [`Rig::start_twilld`] with extra environment variables (test hooks such as
    /// `TWILL_TEST_DISABLE_EBPF=1`).
    pub fn start_twilld_env(
        &self,
        node: usize,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let bin = self.twilld_path()?;
        let node_ns = self.node_ns(node);
        let mut inner = self.lock();
        if let Some(child) = inner.twilld.get_mut(&node)
            && child.try_wait()?.is_none()
        {
            bail!("twilld already runs on node {node}");
        }
        let dir = self.node_dir(node);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut args: Vec<String> = vec![
            bin.display().to_string(),
            "--etcd-endpoints".into(),
            ETCD_ENDPOINT.into(),
            "--iface".into(),
            "eth0".into(),
            "--subnet-file".into(),
            self.subnet_file(node).display().to_string(),
            "--healthz-port".into(),
            "0".into(),
        ];
        if !extra_args.contains(&"--bpf-pin-dir") {
            let pin = self.pin_dir(node);
            if let Err(e) = self.guard.pin_dir(&format!("n{node}")) {
                eprintln!("twill-rig: {e:#}");
            }
            args.extend(["--bpf-pin-dir".into(), pin.display().to_string()]);
        }
        if !extra_args.contains(&"--node-id-file") {
            args.extend([
                "--node-id-file".into(),
                self.node_id_file(node).display().to_string(),
            ]);
        }
        args.extend(extra_args.iter().map(|s| (*s).to_string()));
        let log_path = self.twilld_log_path(node);
        let log = append_log(&log_path, &format!("starting {}", args.join(" ")))?;
        let mut cmd = nsenter(&node_ns, &args);
        if self.detachable {
            cmd.process_group(0);
        }
        let child = cmd
            .env("RUST_LOG", &self.rust_log)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn twilld on node {node}"))?;
        self.guard
            .record_process(&child, &format!("twilld n{node}"))?;
        inner.twilld.insert(node, child);
        Ok(())
    }

    /// Sends `signal` to node `node`'s twilld and waits (up to 10 s, then SIGKILL) for it to
    /// exit; its exit status. Use [`Rig::signal_twilld`] for signals that do not end it.
    pub fn kill_twilld(&self, node: usize, signal: Signal) -> Result<ExitStatus> {
        let mut inner = self.lock();
        let mut child = inner
            .twilld
            .remove(&node)
            .ok_or_else(|| anyhow!("twilld was not started on node {node}"))?;
        let _ = kill(Pid::from_raw(child_pid(&child)), signal);
        let status = ns::wait_uninterruptible(&mut child, STOP_GRACE)
            .with_context(|| format!("stop twilld on node {node} with {signal}"));
        self.guard.forget_process(child.id())?;
        status
    }

    /// Sends `signal` to node `node`'s twilld without waiting.
    pub fn signal_twilld(&self, node: usize, signal: Signal) -> Result<()> {
        let inner = self.lock();
        let child = inner
            .twilld
            .get(&node)
            .ok_or_else(|| anyhow!("twilld was not started on node {node}"))?;
        kill(Pid::from_raw(child_pid(child)), signal)
            .with_context(|| format!("kill({signal}) twilld on node {node}"))
    }

    /// Whether node `node`'s twilld is running.
    pub fn twilld_running(&self, node: usize) -> bool {
        let mut inner = self.lock();
        inner
            .twilld
            .get_mut(&node)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until node `node`'s subnet file exists and parses; an error (with the log's tail)
    /// on timeout or if twilld exits first.
    pub fn wait_subnet_file(&self, node: usize, timeout: Duration) -> Result<SubnetFacts> {
        let path = self.subnet_file(node);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(facts) = SubnetFacts::read(&path) {
                return Ok(facts);
            }
            let exited = {
                let mut inner = self.lock();
                match inner.twilld.get_mut(&node) {
                    None => Some("was never started".to_string()),
                    Some(c) => c.try_wait()?.map(|s| format!("exited ({s})")),
                }
            };
            if let Some(why) = exited {
                bail!(
                    "no subnet file {}: twilld on node {node} {why}; its log ends:\n{}",
                    path.display(),
                    tail(&self.twilld_log_path(node), 30)
                );
            }
            if crate::interrupted() {
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                bail!(
                    "no subnet file {} after {timeout:?}; twilld's log on node {node} ends:\n{}",
                    path.display(),
                    tail(&self.twilld_log_path(node), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the overlay has converged: every node routes the pod subnet(s) of every other
    /// node, `facts[i]` being node `i + 1`'s subnet file (one route per peer subnet, as the
    /// vxlan and host-gw backends write them; not for the udp backend, whose routing table
    /// lives in twilld). A node learns a peer's lease from its lease watch, some time after the
    /// peer wrote its subnet file: until then a pod on one node reaches another node's pods one
    /// way only (the replies have no route), while everything else already answers. An error
    /// naming the missing routes and the nodes' logs on timeout.
    pub fn wait_peer_routes(&self, facts: &[SubnetFacts], timeout: Duration) -> Result<()> {
        let missing = || -> Result<Vec<String>> {
            let mut missing = Vec::new();
            for node in 1..=facts.len() {
                let table = crate::net::routes(&self.node_ns(node))?;
                let peers = facts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i + 1 != node)
                    .flat_map(|(_, f)| {
                        let v4 = f.subnet_v4().map(|n| n.to_string());
                        v4.into_iter().chain(f.subnet_v6().map(|n| n.to_string()))
                    });
                for net in peers {
                    let routed = table
                        .lines()
                        .any(|l| l.split_whitespace().next() == Some(net.as_str()));
                    if !routed {
                        missing.push(format!("node {node} has no route to {net}"));
                    }
                }
            }
            Ok(missing)
        };
        let deadline = Instant::now() + timeout;
        loop {
            let now_missing = missing()?;
            if now_missing.is_empty() {
                return Ok(());
            }
            if crate::interrupted() {
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                let mut logs = String::new();
                for n in 1..=facts.len() {
                    let _ = writeln!(
                        logs,
                        "twilld's log on node {n} ends:\n{}",
                        tail(&self.twilld_log_path(n), 20)
                    );
                }
                bail!(
                    "the overlay did not converge within {timeout:?}: {}\n{logs}",
                    now_missing.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Node `node`'s twilld log so far (empty if it never ran).
    pub fn twilld_log(&self, node: usize) -> String {
        std::fs::read_to_string(self.twilld_log_path(node)).unwrap_or_default()
    }
}
