//! Network-namespace primitives: create and delete named namespaces, run programs in them, do
//! small things from inside them in-process (sysctls, an HTTP GET), find the processes in them.
//!
//! Why it is shaped as it is:
//! - Programs enter a namespace with `nsenter --net=/run/netns/NAME`, which only switches the
//!   network namespace. `ip netns exec` also unshares the mount namespace and remounts `/sys`,
//!   which hides bpffs and the cgroup2 mount that twilld needs.
//! - In-process work joins the namespace with `setns` on a fresh thread that exits afterwards:
//!   `setns` changes only the calling thread, and a thread left in a foreign namespace would
//!   poison whatever runs on it next.
//! - Every command is bounded (a timeout, and [`crate::interrupt`]), so a hung `iperf3` or a ping
//!   to nowhere cannot hang a CI run; errors carry the command line, the namespace and stderr.
//! - Namespaces are created and deleted with `ip netns add/del`, which also sets up the shared
//!   `/run/netns` mount other tools expect.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::CloneFlags;

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// How long [`exec`] and [`run`] let a command run before killing it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_mins(2);

/// The bind mount that names namespace `ns`.
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Whether the named namespace exists.
pub fn netns_exists(ns: &str) -> bool {
    netns_path(ns).exists()
}

/// A `Command` that runs `args` inside namespace `ns` (`nsenter --net=/run/netns/NS -- args`).
/// Use it when you need your own stdio or a background process; [`exec`] and [`run`] cover the
/// usual cases.
pub fn nsenter<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(ns).display()))
        .arg("--")
        .args(args);
    cmd
}

/// Starts `args` in namespace `ns` in the background, stdio discarded. The caller owns the child;
/// anything still running in a rig namespace is killed when the rig is dropped.
pub fn spawn<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<Child> {
    nsenter(ns, args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {} in netns {ns}", display_args(args)))
}

/// Runs `args` in namespace `ns` and returns its output whatever its exit status; an error only if
/// it could not be started, ran longer than [`DEFAULT_TIMEOUT`] or was interrupted.
pub fn exec<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<Output> {
    exec_timeout(ns, args, DEFAULT_TIMEOUT)
}

/// [`exec`] with an explicit timeout, after which the command is killed and an error returned.
pub fn exec_timeout<S: AsRef<OsStr>>(ns: &str, args: &[S], timeout: Duration) -> Result<Output> {
    let what = format!("{} in netns {ns}", display_args(args));
    output_bounded(nsenter(ns, args), None, timeout, true, &what)
}

/// Runs `args` in namespace `ns`; its stdout on success, an error naming the command and carrying
/// its stderr on a non-zero exit.
pub fn run<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<String> {
    let out = exec(ns, args)?;
    check_output(&out, &format!("{} in netns {ns}", display_args(args)))
}

/// Runs a batch of `ip` commands (one a line, without the leading `ip`) in namespace `ns`, or in
/// the current one when `ns` is `None`; stops at the first failing line.
pub fn ip_batch(ns: Option<&str>, script: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    let what = format!("ip -batch in netns {}", ns.unwrap_or("(root)"));
    let out = output_bounded(cmd, Some(script.as_bytes()), DEFAULT_TIMEOUT, false, &what)?;
    check_output(&out, &format!("{what}:\n{script}")).map(|_| ())
}

/// Creates the named namespace (`ip netns add`).
pub fn create_netns(ns: &str) -> Result<()> {
    ip_netns("add", ns)
}

/// Deletes the named namespace (`ip netns del`); succeeds if it is already gone. Processes still
/// inside keep the namespace alive (unnamed) until they exit: kill them first.
pub fn delete_netns(ns: &str) -> Result<()> {
    if !netns_exists(ns) {
        return Ok(());
    }
    ip_netns("del", ns)
}

/// Runs `ip netns VERB NS` in the root namespace.
fn ip_netns(verb: &str, ns: &str) -> Result<()> {
    let what = format!("ip netns {verb} {ns}");
    let out = output_bounded(
        cmd(["ip", "netns", verb, ns]),
        None,
        DEFAULT_TIMEOUT,
        false,
        &what,
    )?;
    check_output(&out, &what).map(|_| ())
}

/// Moves the calling thread into namespace `ns` for the rest of its life. Only for threads
/// spawned for that purpose (a server in a pod): `setns` changes only the calling thread, and
/// one left in a foreign namespace would poison whatever ran on it next. [`in_netns`] is the
/// usual way in.
pub fn join_netns(ns: &str) -> Result<()> {
    let path = netns_path(ns);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns(CLONE_NEWNET) into {}", path.display()))
}

/// Runs `f` on a fresh thread that has joined namespace `ns`, and returns its result. Sockets
/// created inside `f` belong to that namespace for their whole life.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    std::thread::scope(|s| {
        s.spawn(move || {
            join_netns(ns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread inside netns {ns} panicked"))?
    })
}

/// Writes a sysctl inside namespace `ns`. `key` is dotted (`net.ipv4.ip_forward`) or, when a
/// component itself contains dots (an interface such as `flannel.1`), a `/`-separated path below
/// `/proc/sys` (`net/ipv6/conf/flannel.1/accept_dad`).
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let rel = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    let path = Path::new("/proc/sys").join(rel);
    in_netns(ns, || {
        std::fs::write(&path, value)
            .with_context(|| format!("write {value} to {} in netns {ns}", path.display()))
    })
}

/// A response from [`http_get`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

/// A bounded HTTP/1.0 GET of `path` on `addr`, from inside namespace `ns` (for etcd's `/health`,
/// twilld's `/healthz` and `/metrics`). Connect and read time out after 2 s each.
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    let what = format!("GET http://{addr}{path} in netns {ns}");
    in_netns(ns, || {
        let timeout = Duration::from_secs(2);
        let mut stream = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        // One write: a server that answers after the request line and closes (twilld's) would
        // reset a request written piecewise.
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).context("read response")?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("malformed status line in {head:?}"))?;
        Ok(HttpResponse {
            status,
            body: body.to_string(),
        })
    })
    .with_context(|| what)
}

/// The (device, inode) pair identifying a namespace, as `stat` on its bind mount (or on a
/// process's `/proc/PID/ns/net`) reports it.
pub(crate) fn netns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The processes (thread-group leaders) whose network namespace is one of `namespaces`, this
/// process excepted. This finds what a test started and forgot, and what a killed run left.
pub fn pids_in_netns(namespaces: &[String]) -> Vec<i32> {
    let ids: Vec<(u64, u64)> = namespaces
        .iter()
        .filter_map(|ns| netns_id(&netns_path(ns)))
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| u32::try_from(pid).is_ok_and(|p| p != me))
        .filter(|pid| {
            netns_id(Path::new(&format!("/proc/{pid}/ns/net"))).is_some_and(|id| ids.contains(&id))
        })
        .collect()
}

/// `Command` from a fixed argument list.
fn cmd<const N: usize>(args: [&str; N]) -> Command {
    let mut c = Command::new(args[0]);
    c.args(&args[1..]);
    c
}

/// The argument list for messages.
pub(crate) fn display_args<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Stdout of a finished command, or an error with its exit status and stderr.
pub(crate) fn check_output(out: &Output, what: &str) -> Result<String> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    bail!(
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Runs `cmd` to completion with captured stdout/stderr (and `stdin` fed, if any), killing it
/// after `timeout`, or on [`crate::interrupt`] if `interruptible` (never for set-up and teardown
/// steps: an interrupted run must still be able to tear down).
pub(crate) fn output_bounded(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
    interruptible: bool,
    what: &str,
) -> Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input)
            .with_context(|| format!("write stdin of {what}"))?;
    }
    let mut out_pipe = child.stdout.take().expect("stdout is piped");
    let mut err_pipe = child.stderr.take().expect("stderr is piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let status = if interruptible {
        wait_bounded(&mut child, timeout)
    } else {
        wait_uninterruptible(&mut child, timeout)
    }
    .with_context(|| what.to_string());
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status: status?,
        stdout,
        stderr,
    })
}

/// Waits for `child`; kills (and reaps) it and returns an error after `timeout` or on
/// [`crate::interrupt`].
pub(crate) fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    wait_inner(child, timeout, true)
}

/// [`wait_bounded`] that ignores [`crate::interrupt`].
pub(crate) fn wait_uninterruptible(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    wait_inner(child, timeout, false)
}

fn wait_inner(child: &mut Child, timeout: Duration, interruptible: bool) -> Result<ExitStatus> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait().context("wait")? {
            return Ok(status);
        }
        let expired = start.elapsed() >= timeout;
        if expired || (interruptible && crate::interrupted()) {
            let _ = child.kill();
            let _ = child.wait();
            if expired {
                bail!("killed after {timeout:?}");
            }
            bail!("interrupted");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
