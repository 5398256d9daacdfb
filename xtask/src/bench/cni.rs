//! `bench cni`: how long a runtime waits for `twill-cni`, against the reference plugins it
//! replaces (containernetworking-plugins' `bridge` + `host-local`, which flannel's CNI plugin
//! delegates to), one pod at a time and 100 pods at once.
//!
//! Why it is shaped as it is:
//! - Plugins are exec'ed exactly as a runtime on the node execs them: a fresh process with the
//!   `CNI_*` environment and the network config on stdin, spawned by a thread that has joined
//!   the node's namespace (no `nsenter` or shell in the timed path; the bridge and the host veths
//!   land in the node). The clock runs from just before the spawn to the plugin's exit, seen with
//!   `waitid(WNOWAIT)`, i.e. before the pipes are drained and the child is reaped: the cost of a
//!   runtime's CNI call, process start included. `/bin/true` exec'ed the same way, in the same
//!   loop, is the floor no plugin can beat; the figures read best against it.
//! - One rig node without etcd or twilld (the plugins read only the subnet file, written here),
//!   and pod namespaces made by the rig, so a killed run is swept like any other. The pods' own
//!   hand-made `eth0` is left alone: the plugins attach `eth1` (twill, bridge `twb0`), `eth2`
//!   (twill, routed) and `eth3` (reference, bridge `twr0`), each on a subnet of its own.
//! - Interleaved: per pod, one ADD of each plugin and one `/bin/true`, back to back, the first
//!   one rotating; then the DELs the same way (with `prevResult`, as libcni passes it from 0.4.0
//!   on). Plugins are compared under the same background load, which on a shared two-core
//!   machine moves absolute figures by tens of percent. One ADD/DEL per plugin before the timed
//!   ones builds the bridges and warms the page cache (a node's first pod pays that once).
//! - Concurrent: 100 threads released by one barrier each exec an ADD — a runtime starting 100
//!   pods at once — then 100 DELs; per-call percentiles and the makespan. twill, the reference
//!   and 100 concurrent `/bin/true` take turns, the order rotating between repetitions; the
//!   `/bin/true` batch is the floor of what 100 simultaneous process starts cost on this many
//!   CPUs.
//! - Every call is bounded (a watchdog SIGKILLs a plugin after 30 s, or on Ctrl-C) and checked
//!   (exit status 0; an ADD result with an address; after a concurrent ADD, 100 distinct
//!   addresses and 100 ports on the bridge), so a broken plugin fails the run instead of
//!   producing a fast figure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::{Value, json};
use twill_facts::SubnetFacts;
use twill_tests::ns::in_netns;
use twill_tests::{Rig, RigOptions, run};

use super::plot::{CdfChart, Plot};
use super::report::{Check, Metric, Section, Table, fmt_num};
use super::stats::{Summary, mean, median};
use super::{Benchmark, Context};

/// Debian's containernetworking-plugins.
const REFERENCE_DIR: &str = "/usr/lib/cni";
/// What podman 4.3 writes, and what the reference plugins 1.1.1 answer.
const CNI_VERSION: &str = "0.4.0";
/// A plugin still running after this is killed and the run fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Pods started at once in the concurrent phase.
const CONCURRENCY: usize = 100;
/// Target: twill's ADD p50 at most this fraction of the reference's (issue 3).
const ADD_RATIO_TARGET: f64 = 0.5;
/// Target: p99 of 100 concurrent twill ADDs, ms (issue 3).
const CONCURRENT_P99_TARGET_MS: f64 = 20.0;

/// The CNI benchmark.
#[derive(Debug, Clone, Copy)]
pub struct Cni;

/// Counts, full or `--quick`.
#[derive(Debug, Clone, Copy, Serialize)]
struct Params {
    reps: usize,
    /// Pods per repetition in the one-at-a-time phase.
    pods: usize,
    /// Pods in each concurrent batch.
    concurrency: usize,
    /// CPUs this process may run on (what the concurrent batches share).
    cpus: usize,
}

impl Params {
    fn new(quick: bool, reps: usize) -> Self {
        Params {
            reps,
            pods: if quick { 10 } else { 50 },
            concurrency: CONCURRENCY,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// What is exec'ed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Plugin {
    /// twill-cni, bridge mode (the default).
    Twill,
    /// twill-cni, routed mode.
    Routed,
    /// `bridge` + `host-local`.
    Reference,
    /// `/bin/true`: process start and nothing else.
    Floor,
}

impl Plugin {
    /// The one-at-a-time phase, in rotation order.
    const SEQUENTIAL: [Plugin; 4] = [
        Plugin::Twill,
        Plugin::Routed,
        Plugin::Reference,
        Plugin::Floor,
    ];
    /// The concurrent phase.
    const CONCURRENT: [Plugin; 3] = [Plugin::Twill, Plugin::Reference, Plugin::Floor];

    /// Metric name component.
    fn key(self) -> &'static str {
        match self {
            Plugin::Twill => "twill",
            Plugin::Routed => "twill_routed",
            Plugin::Reference => "reference",
            Plugin::Floor => "exec_floor",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Plugin::Twill => "twill-cni (bridge)",
            Plugin::Routed => "twill-cni (routed)",
            Plugin::Reference => "reference bridge + host-local",
            Plugin::Floor => "exec of /bin/true (floor)",
        }
    }

    fn ifname(self) -> &'static str {
        match self {
            Plugin::Twill => "eth1",
            Plugin::Routed => "eth2",
            Plugin::Reference | Plugin::Floor => "eth3",
        }
    }

    /// Whether it does CNI (and its results are checked).
    fn is_cni(self) -> bool {
        self != Plugin::Floor
    }
}

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Add,
    Del,
}

impl Cmd {
    fn as_str(self) -> &'static str {
        match self {
            Cmd::Add => "ADD",
            Cmd::Del => "DEL",
        }
    }
}

/// Latencies of one plugin, and the CPU time each call used, ms.
#[derive(Debug, Clone, Default, Serialize)]
#[expect(
    clippy::struct_field_names,
    reason = "the unit belongs in every name: they are the keys in results.json"
)]
struct Samples {
    add_ms: Vec<f64>,
    del_ms: Vec<f64>,
    /// Per call, in 10 ms ticks (see [`children_cpu_ms`]): only means over many calls count.
    add_cpu_ms: Vec<f64>,
    del_cpu_ms: Vec<f64>,
}

/// Concurrent batches: per-call latencies, and per batch the makespan (first spawn to last
/// exit) and the CPU time all its processes used together, ms.
#[derive(Debug, Clone, Default, Serialize)]
#[expect(
    clippy::struct_field_names,
    reason = "the unit belongs in every name: they are the keys in results.json"
)]
struct Batches {
    add_ms: Vec<f64>,
    del_ms: Vec<f64>,
    add_makespan_ms: Vec<f64>,
    del_makespan_ms: Vec<f64>,
    add_cpu_ms: Vec<f64>,
    del_cpu_ms: Vec<f64>,
}

/// Everything measured.
#[derive(Debug, Clone, Default, Serialize)]
struct Results {
    sequential: BTreeMap<Plugin, Samples>,
    concurrent: BTreeMap<Plugin, Batches>,
}

/// Kills plugins that outlive [`CALL_TIMEOUT`] (or every watched one on Ctrl-C). A pid is
/// unwatched before its process is reaped, so a pid the watchdog kills is never a reused one.
#[derive(Debug, Default)]
struct Watchdog {
    watched: Mutex<HashMap<i32, Instant>>,
    stop: AtomicBool,
}

impl Watchdog {
    fn watch(&self, pid: Pid) {
        self.lock().insert(pid.as_raw(), Instant::now());
    }

    fn unwatch(&self, pid: Pid) {
        self.lock().remove(&pid.as_raw());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Instant>> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs until [`Watchdog::stop`].
    fn patrol(&self) {
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

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The node's plugins, their configs and the pods.
struct Node {
    twill: PathBuf,
    reference: PathBuf,
    cni_path: String,
    configs: BTreeMap<Plugin, Value>,
    /// The pods' netns paths.
    pods: Vec<String>,
    watchdog: Watchdog,
}

/// One call's outcome.
struct Call {
    ms: f64,
    /// The ADD result (for `prevResult` on DEL).
    result: Option<Value>,
}

/// The network configs: twill-cni in both modes and the reference, each with its own bridge,
/// subnet and state directory under `dir`.
fn configs(dir: &Path) -> BTreeMap<Plugin, Value> {
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
const SUBNET_FILES: [(&str, &str); 2] = [
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
fn stdin_for(config: &Value, prev: Option<&Value>) -> Vec<u8> {
    let mut c = config.clone();
    if let (Some(prev), Some(obj)) = (prev, c.as_object_mut()) {
        obj.insert("prevResult".into(), prev.clone());
    }
    serde_json::to_vec(&c).expect("a JSON value serializes")
}

impl Node {
    /// Execs `plugin` for `cmd` on pod `pod` as a runtime would; its latency and (ADD) result.
    fn call(
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
    fn timed(&self, mut command: Command, stdin: &[u8]) -> Result<(Duration, Output)> {
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
    fn sequential(&self, rep: usize, p: Params, out: &mut BTreeMap<Plugin, Samples>) -> Result<()> {
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
    fn batch(
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
struct BatchOutcome {
    latencies_ms: Vec<f64>,
    makespan_ms: f64,
    /// CPU time of all the batch's processes together.
    cpu_ms: f64,
    /// The ADD results, per pod.
    results: Vec<Option<Value>>,
}

/// The CPU time (user + system) of this process's reaped children so far, ms: `cutime` +
/// `cstime` of `/proc/self/stat`, in clock ticks of 10 ms (USER_HZ is 100 on Linux). The kernel
/// keeps the sums in nanoseconds and truncates only when printing, so a difference over a batch
/// is exact to 10 ms, and per-call differences average out over many calls. Every child the
/// benchmark reaps is a plugin (or `/bin/true`): nothing else is spawned while one is timed.
fn children_cpu_ms() -> Result<f64> {
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
fn check_batch(node_ns: &str, plugin: Plugin, results: &[Option<Value>]) -> Result<()> {
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

impl Benchmark for Cni {
    fn name(&self) -> &'static str {
        "cni"
    }

    fn run(&self, ctx: &Context<'_>) -> Result<Section> {
        let p = Params::new(ctx.opts.quick, ctx.opts.reps);
        let progress = ctx.progress;
        for plugin in ["bridge", "host-local"] {
            let path = Path::new(REFERENCE_DIR).join(plugin);
            ensure!(
                path.is_file(),
                "{} missing: apt-get install containernetworking-plugins",
                path.display()
            );
        }
        progress.plan(2 + p.reps * (1 + Plugin::CONCURRENT.len()));

        let what = format!("node and {} pods", p.pods.max(p.concurrency));
        progress.working(&what);
        let rig = Rig::with_options(RigOptions {
            nodes: 1,
            bin_dir: ctx.opts.bin_dir.clone(),
            etcd: false,
            ..RigOptions::default()
        })?;
        let twill = rig.twilld_path()?.with_file_name("twill-cni");
        ensure!(
            twill.is_file(),
            "twill-cni not found at {}: build it next to twilld \
             (cargo build --release -p twill-cni, or without --release for a debug bench)",
            twill.display()
        );
        let dir = rig.temp_dir().join("cni-bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        for (name, text) in SUBNET_FILES {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        }
        // The pods' own eth0 sits on a bridge and subnet of no plugin's.
        let pod_facts = SubnetFacts::parse(
            "FLANNEL_NETWORK=10.96.0.0/16\nFLANNEL_SUBNET=10.96.0.1/24\nFLANNEL_MTU=1500\n",
        )?;
        let mut pods = Vec::new();
        for _ in 0..p.pods.max(p.concurrency) {
            let pod = rig.add_pod(1, &pod_facts)?;
            pods.push(twill_tests::ns::netns_path(&pod.ns).display().to_string());
        }
        let twill_dir = twill.parent().context("twill-cni has no directory")?;
        let node = Node {
            cni_path: format!("{REFERENCE_DIR}:{}", twill_dir.display()),
            twill: twill.clone(),
            reference: Path::new(REFERENCE_DIR).join("bridge"),
            configs: configs(&dir),
            pods,
            watchdog: Watchdog::default(),
        };
        let node_ns = rig.node_ns(1);
        progress.done(&what, &format!("up ({})", rig.id()));

        let results = in_netns(&node_ns, || {
            std::thread::scope(|s| {
                s.spawn(|| node.watchdog.patrol());
                let r = measure(&node, &node_ns, p, progress);
                node.watchdog.stop();
                r
            })
        })?;
        drop(rig);
        Ok(section(&results, p, &twill))
    }
}

/// The warm-up, then per repetition the one-at-a-time phase and the concurrent batches.
fn measure(
    node: &Node,
    node_ns: &str,
    p: Params,
    progress: &super::progress::Progress,
) -> Result<Results> {
    let what = "warm-up ADD/DEL per plugin";
    progress.working(what);
    for plugin in Plugin::SEQUENTIAL {
        let add = node.call(plugin, Cmd::Add, "bench-warmup", 0, None)?;
        node.call(plugin, Cmd::Del, "bench-warmup", 0, add.result.as_ref())?;
    }
    for bridge in ["twb0", "twr0"] {
        run(node_ns, &["ip", "link", "show", "dev", bridge])
            .with_context(|| format!("the plugins did not build {bridge} in the node"))?;
    }
    progress.done(what, "bridges up");

    let mut res = Results::default();
    for rep in 0..p.reps {
        let what = format!("rep {}/{}: {} pods one at a time", rep + 1, p.reps, p.pods);
        progress.working(&what);
        node.sequential(rep, p, &mut res.sequential)?;
        let add_p50 = |pl: Plugin| median(&res.sequential[&pl].add_ms);
        progress.done(
            &what,
            &format!(
                "ADD p50 so far: twill {} ms, reference {} ms, floor {} ms",
                fmt_num(add_p50(Plugin::Twill)),
                fmt_num(add_p50(Plugin::Reference)),
                fmt_num(add_p50(Plugin::Floor))
            ),
        );

        let k = Plugin::CONCURRENT.len();
        for j in 0..k {
            let plugin = Plugin::CONCURRENT[(j + rep) % k];
            let what = format!(
                "rep {}/{}: {} concurrent ADDs then DELs, {}",
                rep + 1,
                p.reps,
                p.concurrency,
                plugin.label()
            );
            progress.working(&what);
            if twill_tests::interrupted() {
                bail!("interrupted");
            }
            let add = node
                .batch(plugin, Cmd::Add, rep, p.concurrency, &[])
                .with_context(|| what.clone())?;
            if plugin.is_cni() {
                check_batch(node_ns, plugin, &add.results)?;
            }
            let del = node
                .batch(plugin, Cmd::Del, rep, p.concurrency, &add.results)
                .with_context(|| what.clone())?;
            let add_sum = Summary::of(&add.latencies_ms);
            progress.done(
                &what,
                &format!(
                    "ADD p50 {} p99 {} ms, all done in {} ms, {} ms CPU; DEL p99 {} ms",
                    fmt_num(add_sum.p50),
                    fmt_num(add_sum.p99),
                    fmt_num(add.makespan_ms),
                    fmt_num(add.cpu_ms),
                    fmt_num(Summary::of(&del.latencies_ms).p99)
                ),
            );
            let b = res.concurrent.entry(plugin).or_default();
            b.add_ms.extend(add.latencies_ms);
            b.del_ms.extend(del.latencies_ms);
            b.add_makespan_ms.push(add.makespan_ms);
            b.del_makespan_ms.push(del.makespan_ms);
            b.add_cpu_ms.push(add.cpu_ms);
            b.del_cpu_ms.push(del.cpu_ms);
        }
    }
    Ok(res)
}

/// A count as a float (counts here are far below 2^52).
fn n_f64(n: usize) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
    let f = n as f64;
    f
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn metric(metrics: &mut Vec<Metric>, name: String, unit: &str, value: f64) {
    metrics.push(Metric {
        name,
        unit: unit.into(),
        value,
    });
}

/// `path` and its modification time, so a stale binary shows in the report.
fn describe_binary(path: &Path) -> String {
    let built = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(
            || "unknown".to_string(),
            |d| super::machine::rfc3339(d.as_secs()),
        );
    format!("{} (modified {built})", path.display())
}

/// The report section (pure: unit tested on made-up samples).
fn section(res: &Results, p: Params, twill: &Path) -> Section {
    let mut metrics = Vec::new();
    let mut checks = Vec::new();
    let mut notes = Vec::new();
    let empty = Samples::default();
    let seq = |pl: Plugin| res.sequential.get(&pl).unwrap_or(&empty);

    let ref_add = Summary::of(&seq(Plugin::Reference).add_ms);
    let ref_del = Summary::of(&seq(Plugin::Reference).del_ms);
    let mut one = Table {
        title: format!(
            "One pod at a time: {} pods × {} repetitions per plugin, interleaved; ms",
            p.pods, p.reps
        ),
        header: [
            "plugin",
            "ADD p50",
            "ADD p99",
            "DEL p50",
            "DEL p99",
            "ADD p50 / ref",
            "DEL p50 / ref",
            "CPU per ADD",
            "CPU per DEL",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    for pl in Plugin::SEQUENTIAL {
        let add = Summary::of(&seq(pl).add_ms);
        let del = Summary::of(&seq(pl).del_ms);
        let key = pl.key();
        metric(&mut metrics, format!("cni.{key}.add.p50"), "ms", add.p50);
        metric(&mut metrics, format!("cni.{key}.add.p99"), "ms", add.p99);
        metric(&mut metrics, format!("cni.{key}.del.p50"), "ms", del.p50);
        metric(&mut metrics, format!("cni.{key}.del.p99"), "ms", del.p99);
        let (ra, rd) = (add.p50 / ref_add.p50, del.p50 / ref_del.p50);
        if matches!(pl, Plugin::Twill | Plugin::Routed) {
            metric(
                &mut metrics,
                format!("cni.ratio.{key}.add.p50"),
                "ratio",
                ra,
            );
            metric(
                &mut metrics,
                format!("cni.ratio.{key}.del.p50"),
                "ratio",
                rd,
            );
        }
        one.rows.push(vec![
            pl.label().into(),
            fmt_num(add.p50),
            fmt_num(add.p99),
            fmt_num(del.p50),
            fmt_num(del.p99),
            format!("{ra:.2}"),
            format!("{rd:.2}"),
            fmt_num(mean(&seq(pl).add_cpu_ms)),
            fmt_num(mean(&seq(pl).del_cpu_ms)),
        ]);
    }
    let twill_add = Summary::of(&seq(Plugin::Twill).add_ms);
    checks.push(Check::at_most(
        "ADD p50 twill-cni / reference",
        twill_add.p50 / ref_add.p50,
        ADD_RATIO_TARGET,
        "",
    ));

    let mut conc = Table {
        title: format!(
            "{} concurrent ADDs, then {} DELs ({} batches each); ms",
            p.concurrency, p.concurrency, p.reps
        ),
        header: [
            "plugin",
            "ADD p50",
            "ADD p99",
            "ADD max",
            "all ADDs done",
            "CPU per ADD",
            "DEL p50",
            "DEL p99",
            "all DELs done",
            "CPU per DEL",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    let none = Batches::default();
    for pl in Plugin::CONCURRENT {
        let b = res.concurrent.get(&pl).unwrap_or(&none);
        let add = Summary::of(&b.add_ms);
        let del = Summary::of(&b.del_ms);
        let (span_add, span_del) = (median(&b.add_makespan_ms), median(&b.del_makespan_ms));
        let per_call = |total: &[f64]| median(total) / n_f64(p.concurrency);
        let key = pl.key();
        metric(
            &mut metrics,
            format!("cni.{key}.concurrent.add.p50"),
            "ms",
            add.p50,
        );
        metric(
            &mut metrics,
            format!("cni.{key}.concurrent.add.p99"),
            "ms",
            add.p99,
        );
        metric(
            &mut metrics,
            format!("cni.{key}.concurrent.add.makespan"),
            "ms",
            span_add,
        );
        metric(
            &mut metrics,
            format!("cni.{key}.concurrent.del.p99"),
            "ms",
            del.p99,
        );
        conc.rows.push(vec![
            pl.label().into(),
            fmt_num(add.p50),
            fmt_num(add.p99),
            fmt_num(add.max),
            fmt_num(span_add),
            fmt_num(per_call(&b.add_cpu_ms)),
            fmt_num(del.p50),
            fmt_num(del.p99),
            fmt_num(span_del),
            fmt_num(per_call(&b.del_cpu_ms)),
        ]);
        if pl.is_cni() {
            metric(
                &mut metrics,
                format!("cni.{key}.concurrent.add.cpu_per_call"),
                "ms",
                per_call(&b.add_cpu_ms),
            );
        }
    }
    let twill_conc = res
        .concurrent
        .get(&Plugin::Twill)
        .map_or(f64::NAN, |b| Summary::of(&b.add_ms).p99);
    checks.push(Check::at_most(
        format!("{} concurrent ADDs p99, twill-cni", p.concurrency),
        twill_conc,
        CONCURRENT_P99_TARGET_MS,
        "ms",
    ));
    if twill_conc > CONCURRENT_P99_TARGET_MS
        && let Some(b) = res.concurrent.get(&Plugin::Twill)
    {
        // Work conservation: by time t the CPUs have done at most cpus × t of work, and the
        // 99th of 100 calls to finish needs 99 calls' worth.
        let cpu = median(&b.add_cpu_ms) / n_f64(p.concurrency);
        let cpus = n_f64(p.cpus);
        let floor = res
            .concurrent
            .get(&Plugin::Floor)
            .map_or(f64::NAN, |f| Summary::of(&f.add_ms).p99);
        notes.push(format!(
            "Concurrent target: a batch of {n} twill-cni ADDs used {} ms of CPU per ADD (process \
             start included, median of the batches); on {} CPU(s) the 99th of {n} calls \
             started together cannot finish before ≈ 0.99 × {n} × {} / {} = {} ms. A p99 of \
             {CONCURRENT_P99_TARGET_MS} ms needs ≤ {} ms of CPU per ADD here. For scale, \
             {n} concurrent /bin/true: p99 {} ms.",
            fmt_num(cpu),
            p.cpus,
            fmt_num(cpu),
            p.cpus,
            fmt_num(0.99 * n_f64(p.concurrency) * cpu / cpus),
            fmt_num(CONCURRENT_P99_TARGET_MS * cpus / (0.99 * n_f64(p.concurrency))),
            fmt_num(floor),
            n = p.concurrency,
        ));
    }
    notes.push(format!("twill-cni: {}", describe_binary(twill)));
    notes.push(format!(
        "reference: {} (containernetworking-plugins)",
        describe_binary(&Path::new(REFERENCE_DIR).join("bridge"))
    ));

    let mut plots = Vec::new();
    let series: Vec<(String, Vec<f64>)> = Plugin::SEQUENTIAL
        .iter()
        .map(|&pl| (format!("{} ADD", pl.label()), seq(pl).add_ms.clone()))
        .chain(
            [Plugin::Twill, Plugin::Reference]
                .iter()
                .map(|&pl| (format!("{} DEL", pl.label()), seq(pl).del_ms.clone())),
        )
        .filter(|(_, v)| !v.is_empty())
        .collect();
    if !series.is_empty() {
        plots.push(Plot::Cdf(CdfChart {
            file: "cni-latency.svg".into(),
            title: "CNI call latency, one pod at a time (exec to exit)".into(),
            x_label: "latency, ms (log scale)".into(),
            series,
        }));
    }
    let series: Vec<(String, Vec<f64>)> = Plugin::CONCURRENT
        .iter()
        .filter_map(|pl| {
            let b = res.concurrent.get(pl)?;
            (!b.add_ms.is_empty()).then(|| (pl.label().to_string(), b.add_ms.clone()))
        })
        .collect();
    if !series.is_empty() {
        plots.push(Plot::Cdf(CdfChart {
            file: "cni-concurrent.svg".into(),
            title: format!("{} concurrent ADDs: per-call latency", p.concurrency),
            x_label: "latency, ms (log scale)".into(),
            series,
        }));
    }

    let about = format!(
        "The plugins are exec'ed as a runtime on the node execs them — `CNI_*` environment, \
         the {CNI_VERSION} network config on stdin (DEL with the ADD's `prevResult`) — by a \
         thread inside a rig node's namespace; a call is timed from spawn to the plugin's exit, \
         process start included. twill-cni in bridge mode (its default) and in routed mode \
         against the reference `bridge` (`isGateway`) + `host-local` from Debian's \
         containernetworking-plugins, each on its own bridge and subnet; `/bin/true` exec'ed \
         the same way is the floor. One pod at a time: per pod one ADD of each (the first one \
         rotating), then the DELs; {} pods × {} repetitions after one untimed ADD/DEL per \
         plugin. Concurrent: {} threads released at once each run an ADD on a pod of its own, \
         then {} DELs; the batches of twill, the reference and `/bin/true` take turns. \
         \"All done\" is from the first spawn to the last exit (median of the batches).",
        p.pods, p.reps, p.concurrency, p.concurrency
    );

    Section {
        name: "cni".into(),
        title: "CNI: twill-cni ADD/DEL vs the reference bridge + host-local".into(),
        about,
        metrics,
        tables: vec![one, conc],
        checks,
        notes,
        plot_files: Vec::new(),
        plots,
        raw: serde_json::json!({
            "params": p,
            "sequential": res.sequential,
            "concurrent": res.concurrent,
            "generated_unix_s": SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_their_own_bridges_subnets_and_state() {
        let c = configs(Path::new("/x"));
        assert_eq!(c[&Plugin::Twill]["type"], "twill-cni");
        assert_eq!(c[&Plugin::Twill]["subnetFile"], "/x/subnet-bridge.env");
        assert_eq!(c[&Plugin::Routed]["mode"], "routed");
        assert_eq!(c[&Plugin::Reference]["ipam"]["type"], "host-local");
        assert_eq!(c[&Plugin::Reference]["ipam"]["dataDir"], "/x/ipam-ref");
        let names: HashSet<&str> = c.values().filter_map(|v| v["name"].as_str()).collect();
        assert_eq!(
            names.len(),
            3,
            "each network has its own name (and IPAM directory)"
        );
        assert_ne!(c[&Plugin::Twill]["bridge"], c[&Plugin::Reference]["bridge"]);
        for (name, text) in SUBNET_FILES {
            assert!(SubnetFacts::parse(text).is_ok(), "{name}");
        }
    }

    #[test]
    fn del_carries_the_add_result_as_prev_result() {
        let c = json!({"cniVersion": "0.4.0", "name": "n", "type": "t"});
        let plain: Value = serde_json::from_slice(&stdin_for(&c, None)).unwrap();
        assert_eq!(plain, c);
        let prev = json!({"ips": [{"address": "10.97.1.2/24"}]});
        let del: Value = serde_json::from_slice(&stdin_for(&c, Some(&prev))).unwrap();
        assert_eq!(del["prevResult"], prev);
        assert_eq!(del["name"], "n");
    }

    fn made_up() -> Results {
        let mut res = Results::default();
        for (pl, add, del) in [
            (Plugin::Twill, 6.0, 20.0),
            (Plugin::Routed, 7.0, 22.0),
            (Plugin::Reference, 12.0, 30.0),
            (Plugin::Floor, 3.0, 3.0),
        ] {
            res.sequential.insert(
                pl,
                Samples {
                    add_ms: vec![add, add, add + 2.0],
                    del_ms: vec![del, del + 1.0],
                    add_cpu_ms: vec![0.0, 10.0, 0.0],
                    del_cpu_ms: vec![10.0, 10.0],
                },
            );
        }
        for (pl, add) in [
            (Plugin::Twill, 30.0),
            (Plugin::Reference, 60.0),
            (Plugin::Floor, 25.0),
        ] {
            res.concurrent.insert(
                pl,
                Batches {
                    add_ms: vec![add; 10],
                    del_ms: vec![add * 2.0; 10],
                    add_makespan_ms: vec![add * 3.0],
                    del_makespan_ms: vec![add * 4.0],
                    add_cpu_ms: vec![add * 10.0],
                    del_cpu_ms: vec![add * 20.0],
                },
            );
        }
        res
    }

    #[test]
    fn section_has_sane_metrics_ratios_and_checks() {
        let p = Params::new(true, 1);
        let s = section(&made_up(), p, Path::new("/nonexistent/twill-cni"));
        let value = |name: &str| {
            s.metrics
                .iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("no {name}"))
                .value
        };
        assert!((value("cni.ratio.twill.add.p50") - 0.5).abs() < 1e-9);
        assert!((value("cni.twill.concurrent.add.p99") - 30.0).abs() < 1e-9);
        assert!((value("cni.exec_floor.add.p50") - 3.0).abs() < 1e-9);
        assert!(
            s.metrics
                .iter()
                .all(|m| m.value.is_finite() && m.value > 0.0)
        );
        assert_eq!(s.checks.len(), 2);
        assert!(s.checks[0].pass, "0.5 meets <= 0.5");
        assert!(!s.checks[1].pass, "30 ms misses <= 20 ms");
        // 10 calls of 3 ms CPU each: the 99th cannot finish before 0.99 × 100 × 3 / cpus.
        let bound = fmt_num(0.99 * 100.0 * 3.0 / n_f64(p.cpus));
        assert!(
            s.notes
                .iter()
                .any(|n| n.contains("Concurrent target") && n.contains(&format!("= {bound} ms"))),
            "{:?}",
            s.notes
        );
        assert!((value("cni.twill.concurrent.add.cpu_per_call") - 3.0).abs() < 1e-9);
        assert_eq!(s.tables[0].rows.len(), 4);
        assert_eq!(s.tables[1].rows.len(), 3);
        assert_eq!(s.plots.len(), 2);
    }

    #[test]
    fn quick_is_smaller_but_keeps_the_target_concurrency() {
        let q = Params::new(true, 3);
        let f = Params::new(false, 3);
        assert!(q.pods < f.pods);
        assert_eq!(q.concurrency, 100);
        assert_eq!(f.concurrency, 100);
    }
}
