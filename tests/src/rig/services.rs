//! What the service proxy needs from the rig: a cgroup per node, the proxy flags, responders
//! in pods, `twilld apply -f`, and the manifests and commands the service suites use.

use std::ffi::{CString, OsStr};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::{ETCD_ENDPOINT, Pod, Rig, append_log, tail};
use crate::ns::{self, nsenter};

impl Rig {
    /// Node `node`'s cgroup2 directory (`<cgroup2>/twill-<id>-n<node>`), created on first use
    /// and recorded first, so teardown and sweeps remove it. The eBPF service proxy's socket-level
    /// load balancer attaches here ([`Rig::proxy_args`]); processes of the node's "pods" that
    /// should be balanced at connect() run inside it ([`nsenter_in_cgroup`]).
    pub fn node_cgroup(&self, node: usize) -> Result<PathBuf> {
        self.check_node(node);
        self.guard.cgroup(&format!("n{node}"))
    }

    /// The twilld flags that turn node `node`'s service proxy on in `mode` (`ebpf`, `nftables`,
    /// `iptables`): `--proxy-mode MODE --node-name n<node>`, and for `ebpf` `--lb-cgroup` with
    /// the node's own cgroup (never the cgroup2 root, which other users of the machine share).
    /// `--node-name` is what makes an EndpointSlice's `nodeName: n<node>` local: the rig's nodes
    /// share the host's UTS namespace, so without it every node would carry the host's name.
    pub fn proxy_args(&self, node: usize, mode: &str) -> Result<Vec<String>> {
        let mut args = vec![
            "--proxy-mode".to_string(),
            mode.to_string(),
            "--node-name".to_string(),
            format!("n{node}"),
        ];
        if mode == "ebpf" {
            args.push("--lb-cgroup".into());
            args.push(self.node_cgroup(node)?.display().to_string());
        }
        Ok(args)
    }

    /// Starts `twill-probe serve` in `pod`, answering every TCP connection on each of `ports`
    /// (on the pod's address) with `name`, and waits until it accepts. Recorded with the rig's
    /// processes (and in a process group of its own when the rig is detachable); its output
    /// goes to `<temp>/responders.log`.
    pub fn start_responder(&self, pod: &Pod, name: &str, ports: &[u16]) -> Result<()> {
        let probe = self.binary("twill-probe")?;
        let ip = pod
            .ip()
            .with_context(|| format!("pod {} has no address", pod.ns))?;
        ensure!(!ports.is_empty(), "a responder needs a port");
        let mut args: Vec<String> = vec![probe.display().to_string(), "serve".into()];
        for port in ports {
            args.push("--listen".into());
            args.push(SocketAddr::new(ip, *port).to_string());
        }
        args.push("--name".into());
        args.push(name.to_string());
        let log = append_log(
            &self.temp_dir().join("responders.log"),
            &format!("starting {}", args.join(" ")),
        )?;
        let mut cmd = nsenter(&pod.ns, &args);
        if self.detachable {
            cmd.process_group(0);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn the responder in {}", pod.ns))?;
        self.guard
            .record_process(&child, &format!("responder {name}"))?;
        self.lock().helpers.push(child);
        let addr = SocketAddr::new(ip, ports[0]);
        crate::wait_until(Duration::from_secs(10), || {
            ns::in_netns(&pod.ns, || {
                Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
            })
            .unwrap_or(false)
        })
        .with_context(|| {
            format!(
                "the responder in {} does not accept on {addr}:\n{}",
                pod.ns,
                tail(&self.temp_dir().join("responders.log"), 10)
            )
        })
    }

    /// `twilld apply -f` of `manifest` (YAML or JSON, several documents allowed), run in the
    /// underlay namespace against the rig's etcd.
    pub fn apply_manifest(&self, manifest: &str) -> Result<()> {
        let dir = self.temp_dir().join("manifests");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let n = std::fs::read_dir(&dir).map_or(0, Iterator::count);
        let file = dir.join(format!("{n:04}.yaml"));
        std::fs::write(&file, manifest).with_context(|| format!("write {}", file.display()))?;
        let bin = self.twilld_path()?;
        let file_arg = file.display().to_string();
        let args = [
            bin.to_str().context("twilld path is not UTF-8")?,
            "apply",
            "-f",
            &file_arg,
            "--etcd-endpoints",
            ETCD_ENDPOINT,
        ];
        let what = format!("twilld apply -f {file_arg}");
        let out = ns::output_bounded(
            nsenter(&self.underlay_ns(), &args),
            None,
            Duration::from_secs(30),
            true,
            &what,
        )?;
        ns::check_output(&out, &what).map(|_| ())
    }
}

/// A `Command` that runs `args` inside namespace `ns` *and* cgroup `cgroup`: the child moves
/// itself into the cgroup (writes `0` to its `cgroup.procs`) before exec'ing `nsenter`. A
/// process of a node's pod started this way is balanced by the node's eBPF socket-level load
/// balancer at `connect()`, as a real pod's processes are.
pub fn nsenter_in_cgroup<S: AsRef<OsStr>>(ns: &str, cgroup: &Path, args: &[S]) -> Command {
    let mut cmd = nsenter(ns, args);
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .expect("a cgroup path has no NUL byte");
    // SAFETY: between fork and exec only async-signal-safe calls (open, write, close) on memory
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd
}

/// A Service and its EndpointSlice as `twilld apply -f` takes them: `name` in namespace
/// `default`, ClusterIP `cluster_ip`, TCP `port` → `target_port`, type NodePort when
/// `node_port` is given, one ready endpoint per `(address, node)` with `nodeName: n<node>`.
pub fn service_manifest(
    name: &str,
    cluster_ip: IpAddr,
    port: u16,
    target_port: u16,
    node_port: Option<u16>,
    endpoints: &[(IpAddr, usize)],
) -> String {
    let mut spec = crate::ServiceSpec::new(name, cluster_ip).tcp("http", port, target_port);
    if let Some(p) = node_port {
        spec = spec.node_port(p);
    }
    for (addr, node) in endpoints {
        spec = spec.endpoint(*addr, Some(&format!("n{node}")));
    }
    spec.manifest()
}
