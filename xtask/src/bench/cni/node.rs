//! The node the plugins run on: their configs, the pods' namespaces, one call, a batch, the
//! watchdog that kills a plugin that hangs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use serde_json::{Value, json};
use twill_tests::run;

use super::params::{CALL_TIMEOUT, CNI_VERSION, Cmd, Params, Plugin, Samples};
use crate::bench::stats::ms;

/// Kills plugins that outlive [`CALL_TIMEOUT`] (or every watched one on Ctrl-C). A pid is
/// unwatched before its process is reaped, so a pid the watchdog kills is never a reused one.
#[derive(Debug, Default)]
pub(crate) struct Watchdog {
    pub(crate) watched: Mutex<HashMap<i32, Instant>>,
    pub(crate) stop: AtomicBool,
}

impl Watchdog {
    pub(crate) fn watch(&self, pid: Pid) {
        self.lock().insert(pid.as_raw(), Instant::now());
    }

    pub(crate) fn unwatch(&self, pid: Pid) {
        self.lock().remove(&pid.as_raw());
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Instant>> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs until [`Watchdog::stop`].
    pub(crate) fn patrol(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            let interrupted = twill_tests::interrupted();
            for (&pid, started) in self.lock().iter() {
                if interrupted || started.elapsed() > CALL_TIMEOUT {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The node's plugins, their configs and the pods.
pub(crate) struct Node {
    pub(crate) twill: PathBuf,
    pub(crate) reference: PathBuf,
    pub(crate) cni_path: String,
    pub(crate) configs: BTreeMap<Plugin, Value>,
    /// The pods' netns paths.
    pub(crate) pods: Vec<String>,
    pub(crate) watchdog: Watchdog,
}

/// One call's outcome.
pub(crate) struct Call {
    pub(crate) ms: f64,
    /// The ADD result (for `prevResult` on DEL).
    pub(crate) result: Option<Value>,
}

/// The network configs: twill-cni in both modes and the reference, each with its own bridge,
/// subnet and state directory under `dir`.
pub(crate) fn configs(dir: &Path) -> BTreeMap<Plugin, Value> {
    let d = |name: &str| dir.join(name).display().to_string();
    BTreeMap::from([
        (
            Plugin::Twill,
            json!({
                "cniVersion": CNI_VERSION,
                "name": "twbench",
                "type": "twill-cni",
                "bridge": "twb0",
                "subnetFile": d("subnet-bridge.env"),
                "dataDir": d("ipam"),
            }),
        ),
        (
            Plugin::Routed,
            json!({
                "cniVersion": CNI_VERSION,
                "name": "twbench-routed",
                "type": "twill-cni",
                "mode": "routed",
                "subnetFile": d("subnet-routed.env"),
                "dataDir": d("ipam"),
            }),
        ),
        (
            Plugin::Reference,
            json!({
                "cniVersion": CNI_VERSION,
                "name": "twbench-ref",
                "type": "bridge",
                "bridge": "twr0",
                "isGateway": true,
                "ipMasq": false,
                "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "subnet": "10.97.2.0/24",
                    "dataDir": d("ipam-ref"),
                },
            }),
        ),
    ])
}

/// The subnet files twill-cni reads: `(file name, contents)`.
pub(crate) const SUBNET_FILES: [(&str, &str); 2] = [
    (
        "subnet-bridge.env",
        "FLANNEL_NETWORK=10.97.0.0/16\nFLANNEL_SUBNET=10.97.1.1/24\nFLANNEL_MTU=1450\n\
         FLANNEL_IPMASQ=false\n",
    ),
    (
        "subnet-routed.env",
        "FLANNEL_NETWORK=10.97.0.0/16\nFLANNEL_SUBNET=10.97.3.1/24\nFLANNEL_MTU=1450\n\
         FLANNEL_IPMASQ=false\n",
    ),
];

/// The config a runtime sends: for DEL with the ADD's result as `prevResult` (libcni does so
/// from 0.4.0 on).
pub(crate) fn stdin_for(config: &Value, prev: Option<&Value>) -> Vec<u8> {
    let mut c = config.clone();
    if let (Some(prev), Some(obj)) = (prev, c.as_object_mut()) {
        obj.insert("prevResult".into(), prev.clone());
    }
    serde_json::to_vec(&c).expect("a JSON value serializes")
}

impl Node {
    /// Execs `plugin` for `cmd` on pod `pod` as a runtime would; its latency and (ADD) result.
    pub(crate) fn call(
        &self,
        plugin: Plugin,
        cmd: Cmd,
        container: &str,
        pod: usize,
        prev: Option<&Value>,
    ) -> Result<Call> {
        let bin: &Path = match plugin {
            Plugin::Twill | Plugin::Routed => &self.twill,
            Plugin::Reference => &self.reference,
            Plugin::Floor => Path::new("/bin/true"),
        };
        let stdin = self
            .configs
            .get(&plugin)
            .map_or_else(|| b"{}".to_vec(), |c| stdin_for(c, prev));
        let mut command = Command::new(bin);
        command
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", cmd.as_str())
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", &self.pods[pod])
            .env("CNI_IFNAME", plugin.ifname())
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = || format!("{} {} {container}", plugin.label(), cmd.as_str());
        let (elapsed, out) = self.timed(command, &stdin).with_context(what)?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {} {}",
                what(),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let result = if plugin.is_cni() && cmd == Cmd::Add {
            let r: Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("{}: result is not JSON", what()))?;
            ensure!(
                r["ips"][0]["address"].is_string(),
                "{}: result without an address: {r}",
                what()
            );
            Some(r)
        } else {
            None
        };
        Ok(Call {
            ms: ms(elapsed),
            result,
        })
    }

    /// Spawns `command`, feeds it `stdin`, and times it to its exit (before reaping it).
    pub(crate) fn timed(&self, mut command: Command, stdin: &[u8]) -> Result<(Duration, Output)> {
        let start = Instant::now();
        let mut child = command.spawn().context("spawn")?;
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        self.watchdog.watch(pid);
        // The config is far below a pipe's capacity: this never blocks on the plugin.
        let fed = child.stdin.take().map(|mut s| s.write_all(stdin));
        let exited = loop {
            match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Err(Errno::EINTR) => {}
                other => break other,
            }
        };
        let elapsed = start.elapsed();
        self.watchdog.unwatch(pid);
        let out = child.wait_with_output().context("collect the output")?;
        exited.context("waitid")?;
        // A broken pipe is the floor's `/bin/true`, which reads nothing; a plugin that did not
        // read its config fails by itself.
        if let Some(Err(e)) = fed
            && e.kind() != std::io::ErrorKind::BrokenPipe
            && out.status.success()
        {
            return Err(e).context("write the config to stdin");
        }
        Ok((elapsed, out))
    }

    /// One repetition of the one-at-a-time phase: per pod an ADD of each plugin (first one
    /// rotating), then the DELs likewise.
    pub(crate) fn sequential(
        &self,
        rep: usize,
        p: Params,
        out: &mut BTreeMap<Plugin, Samples>,
    ) -> Result<()> {
        let n = Plugin::SEQUENTIAL.len();
        let mut results: HashMap<(Plugin, usize), Value> = HashMap::new();
        for cmd in [Cmd::Add, Cmd::Del] {
            for i in 0..p.pods {
                if twill_tests::interrupted() {
                    bail!("interrupted");
                }
                for k in 0..n {
                    let plugin = Plugin::SEQUENTIAL[(i + k + rep) % n];
                    let id = format!("bench-r{rep}-p{i}");
                    let prev = results.get(&(plugin, i));
                    let cpu = children_cpu_ms()?;
                    let call = self.call(plugin, cmd, &id, i, prev)?;
                    let cpu = children_cpu_ms()? - cpu;
                    if let Some(r) = call.result {
                        results.insert((plugin, i), r);
                    }
                    let s = out.entry(plugin).or_default();
                    match cmd {
                        Cmd::Add => {
                            s.add_ms.push(call.ms);
                            s.add_cpu_ms.push(cpu);
                        }
                        Cmd::Del => {
                            s.del_ms.push(call.ms);
                            s.del_cpu_ms.push(cpu);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// One concurrent batch of `cmd` for `plugin` on pods `0..n`: per-call latencies, makespan
    /// and (ADD) results.
    pub(crate) fn batch(
        &self,
        plugin: Plugin,
        cmd: Cmd,
        rep: usize,
        n: usize,
        prev: &[Option<Value>],
    ) -> Result<BatchOutcome> {
        let barrier = Barrier::new(n);
        let cpu = children_cpu_ms()?;
        // Threads inherit the namespace of the thread that creates them: the node's.
        let outcomes: Vec<(Instant, Result<Call>, Instant)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let barrier = &barrier;
                    let prev = prev.get(i).and_then(Option::as_ref);
                    s.spawn(move || {
                        barrier.wait();
                        let t0 = Instant::now();
                        let id = format!("bench-c{rep}-p{i}");
                        let r = self.call(plugin, cmd, &id, i, prev);
                        (t0, r, Instant::now())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a batch thread panicked"))
                .collect()
        });
        let cpu = children_cpu_ms()? - cpu;
        let first = outcomes.iter().map(|o| o.0).min().context("empty batch")?;
        let last = outcomes.iter().map(|o| o.2).max().context("empty batch")?;
        let mut lat = Vec::with_capacity(n);
        let mut results = Vec::with_capacity(n);
        for (_, r, _) in outcomes {
            let call = r?;
            lat.push(call.ms);
            results.push(call.result);
        }
        Ok(BatchOutcome {
            latencies_ms: lat,
            makespan_ms: ms(last - first),
            cpu_ms: cpu,
            results,
        })
    }
}

/// What [`Node::batch`] measured.
pub(crate) struct BatchOutcome {
    pub(crate) latencies_ms: Vec<f64>,
    pub(crate) makespan_ms: f64,
    /// CPU time of all the batch's processes together.
    pub(crate) cpu_ms: f64,
    /// The ADD results, per pod.
    pub(crate) results: Vec<Option<Value>>,
}

/// The CPU time (user + system) of this process's reaped children so far, ms: `cutime` +
/// `cstime` of `/proc/self/stat`, in clock ticks of 10 ms (USER_HZ is 100 on Linux). The kernel
/// keeps the sums in nanoseconds and truncates only when printing, so a difference over a batch
/// is exact to 10 ms, and per-call differences average out over many calls. Every child the
/// benchmark reaps is a plugin (or `/bin/true`): nothing else is spawned while one is timed.
pub(crate) fn children_cpu_ms() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/self/stat")?;
    // Fields after the command name start at field 3; cutime and cstime are fields 16 and 17.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        let v: u32 = fields
            .get(i - 3)
            .context("short /proc/self/stat")?
            .parse()
            .context("parse /proc/self/stat")?;
        Ok(f64::from(v) * 10.0)
    };
    Ok(tick(16)? + tick(17)?)
}

/// Checks a concurrent ADD's effect: `n` distinct addresses, and `n` ports on the bridge.
pub(crate) fn check_batch(node_ns: &str, plugin: Plugin, results: &[Option<Value>]) -> Result<()> {
    let ips: HashSet<&str> = results
        .iter()
        .flatten()
        .filter_map(|r| r["ips"][0]["address"].as_str())
        .collect();
    ensure!(
        ips.len() == results.len(),
        "{}: {} concurrent ADDs gave {} distinct addresses",
        plugin.label(),
        results.len(),
        ips.len()
    );
    let bridge = match plugin {
        Plugin::Twill => "twb0",
        Plugin::Reference => "twr0",
        Plugin::Routed | Plugin::Floor => return Ok(()),
    };
    let ports = run(node_ns, &["ip", "-o", "link", "show", "master", bridge])?;
    let count = ports.lines().count();
    ensure!(
        count == results.len(),
        "{}: {count} ports on {bridge} after {} concurrent ADDs",
        plugin.label(),
        results.len()
    );
    Ok(())
}
