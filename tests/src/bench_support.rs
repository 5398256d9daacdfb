//! Helpers for the benchmarks (`cargo xtask bench`) that the end-to-end tests do not need:
//! per-packet ping times, etcd writes timed to the millisecond, and event streams from
//! `ip monitor`-style commands.
//!
//! Why it is shaped as it is:
//! - A lease written with `etcdctl` costs a process start (tens of ms on a busy machine) before
//!   the write even happens, which would swamp a latency of a few ms. [`EtcdHttp`] writes through
//!   etcd's JSON gateway (`POST /v3/kv/put`) on a plain TCP connection, so the clock starts right
//!   before the request leaves and the write is committed when the response arrives.
//! - The kernel side is watched, not polled: [`LineMonitor`] runs `ip monitor` (or `bridge
//!   monitor`) inside the node's namespace and timestamps each line as it is read. `ip` flushes
//!   after every event, so the timestamp trails the kernel by the pipe's wake-up only.
//! - Callers that must run in a namespace (the etcd client) do so on a thread that joined it
//!   ([`crate::ns::in_netns`]); nothing here calls `setns` itself.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::net::ping_args;
use crate::ns::{display_args, exec_timeout, nsenter};

/// Per-packet round-trip times of `ping -c COUNT -i INTERVAL ADDR` from namespace `from_ns`, in
/// milliseconds, in the order the replies came. An error if ping could not run or no reply came;
/// lost packets are simply missing (compare the length with `count`).
pub fn ping_rtts(
    from_ns: &str,
    addr: impl Into<IpAddr>,
    count: u32,
    interval: Duration,
) -> Result<Vec<f64>> {
    let args = ping_args(addr.into(), count, interval, &[]);
    let bound = interval * count + Duration::from_secs(10);
    let out = exec_timeout(from_ns, &args, bound)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts = parse_ping_rtts(&text);
    if rtts.is_empty() {
        bail!(
            "{} in netns {from_ns}: no reply ({}): {}",
            display_args(&args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(rtts)
}

/// The `time=0.045 ms` values of iputils ping's per-reply lines, in milliseconds.
pub fn parse_ping_rtts(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| {
            let rest = &l[l.find(" time=")? + 6..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// A minimal client for etcd's v3 JSON gateway (etcd ≥ 3.4: `/v3/kv/...`). Each call opens its
/// own connection and must run on a thread inside a namespace that reaches `addr`.
#[derive(Debug, Clone, Copy)]
pub struct EtcdHttp {
    /// etcd's client address (`198.18.0.1:2379` in a rig).
    pub addr: SocketAddr,
}

impl EtcdHttp {
    /// Puts `value` at `key`.
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        let body = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            base64(key.as_bytes()),
            base64(value.as_bytes())
        );
        self.post("/v3/kv/put", &body)
            .with_context(|| format!("etcd put {key}"))
            .map(|_| ())
    }

    /// Deletes `key`.
    pub fn delete(&self, key: &str) -> Result<()> {
        let body = format!(r#"{{"key":"{}"}}"#, base64(key.as_bytes()));
        self.post("/v3/kv/deleterange", &body)
            .with_context(|| format!("etcd delete {key}"))
            .map(|_| ())
    }

    /// Puts every `(key, value)` in one transaction (etcd takes at most 128 operations per
    /// transaction by default: split larger batches, see [`EtcdHttp::put_many`]).
    pub fn txn_put(&self, kvs: &[(String, String)]) -> Result<()> {
        let mut body = String::from(r#"{"success":["#);
        for (i, (k, v)) in kvs.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            let _ = write!(
                body,
                r#"{{"request_put":{{"key":"{}","value":"{}"}}}}"#,
                base64(k.as_bytes()),
                base64(v.as_bytes())
            );
        }
        body.push_str("]}");
        let reply = self
            .post_timeout("/v3/kv/txn", &body, Duration::from_secs(30))
            .with_context(|| format!("etcd txn of {} puts", kvs.len()))?;
        // A transaction without compares always succeeds; anything else is a gateway surprise.
        if !reply.contains(r#""succeeded":true"#) {
            bail!("etcd txn of {} puts did not succeed: {reply}", kvs.len());
        }
        Ok(())
    }

    /// Puts every `(key, value)`, `batch` per transaction (at most 128), calling `progress` with
    /// the number written after each transaction.
    pub fn put_many(
        &self,
        kvs: &[(String, String)],
        batch: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<()> {
        let batch = batch.clamp(1, 128);
        let mut done = 0;
        for chunk in kvs.chunks(batch) {
            if crate::interrupted() {
                bail!("interrupted");
            }
            self.txn_put(chunk)?;
            done += chunk.len();
            progress(done);
        }
        Ok(())
    }

    /// Deletes every key starting with `prefix`.
    pub fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let mut end = prefix.as_bytes().to_vec();
        // The range end of a prefix: the prefix with its last byte incremented.
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = format!(
            r#"{{"key":"{}","range_end":"{}"}}"#,
            base64(prefix.as_bytes()),
            base64(&end)
        );
        self.post("/v3/kv/deleterange", &body)
            .with_context(|| format!("etcd delete prefix {prefix}"))
            .map(|_| ())
    }

    /// POSTs `body` (JSON) to `path`; the response body on a 200, an error otherwise.
    fn post(&self, path: &str, body: &str) -> Result<String> {
        self.post_timeout(path, body, Duration::from_secs(5))
    }

    fn post_timeout(&self, path: &str, body: &str, timeout: Duration) -> Result<String> {
        let mut stream = TcpStream::connect_timeout(&self.addr, timeout)
            .with_context(|| format!("connect to {}", self.addr))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let request = format!(
            "POST {path} HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .context("send request")?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).context("read response")?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("malformed status line in {head:?}"))?;
        if status != 200 {
            bail!("POST {path}: HTTP {status}: {}", body.trim());
        }
        Ok(body.to_string())
    }
}

/// Standard base64 with padding (what etcd's gateway expects for keys and values).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Long-running commands inside a namespace whose stdout lines arrive timestamped, merged into
/// one stream (`ip monitor route`, `bridge monitor fdb`). Dropping it kills the commands.
#[derive(Debug)]
pub struct LineMonitor {
    children: Vec<Child>,
    lines: Receiver<(Instant, String)>,
    what: String,
}

impl LineMonitor {
    /// Starts `args` in namespace `ns` with its stdout read line by line on a thread.
    pub fn spawn<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<Self> {
        Self::spawn_many(ns, &[args])
    }

    /// Starts `cmd` (already set up to run where it should, e.g. [`crate::rig::nsenter_in_cgroup`])
    /// with its stdout read line by line; its stdin is a pipe that is closed when the monitor is
    /// dropped (a polite "stop" for programs that watch their stdin, such as `twill-probe
    /// follow`), before the process is killed.
    pub fn from_command(cmd: Command, what: &str) -> Result<Self> {
        let (tx, lines) = mpsc::channel();
        let mut monitor = LineMonitor {
            children: Vec::new(),
            lines,
            what: String::new(),
        };
        monitor.start(cmd, Stdio::piped(), what, &tx)?;
        Ok(monitor)
    }

    /// Starts every command of `commands` in namespace `ns`; their lines arrive in one stream,
    /// in the order read.
    pub fn spawn_many<S: AsRef<OsStr>>(ns: &str, commands: &[&[S]]) -> Result<Self> {
        let (tx, lines) = mpsc::channel();
        let mut monitor = LineMonitor {
            children: Vec::new(),
            lines,
            what: String::new(),
        };
        for args in commands {
            let what = format!("{} in netns {ns}", display_args(args));
            monitor.start(nsenter(ns, args), Stdio::null(), &what, &tx)?;
        }
        Ok(monitor)
    }

    /// Spawns `cmd` (described as `what`) with `stdin`, kept for drop to kill, and a thread that
    /// sends each line of its stdout to `tx` with the time it was read.
    fn start(
        &mut self,
        mut cmd: Command,
        stdin: Stdio,
        what: &str,
        tx: &mpsc::Sender<(Instant, String)>,
    ) -> Result<()> {
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn {what}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        // Pushed before anything can fail below, so that drop kills it.
        self.children.push(child);
        if !self.what.is_empty() {
            self.what.push_str(", ");
        }
        self.what.push_str(what);
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(())
    }

    /// The next line and when it was read, waiting at most `timeout`; `None` on timeout. An
    /// error once every command has exited.
    pub fn next_line(&self, timeout: Duration) -> Result<Option<(Instant, String)>> {
        match self.lines.recv_timeout(timeout) {
            Ok(x) => Ok(Some(x)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => bail!("{} exited", self.what),
        }
    }

    /// Discards the lines read so far.
    pub fn drain(&self) {
        while self.lines.try_recv().is_ok() {}
    }
}

impl Drop for LineMonitor {
    fn drop(&mut self) {
        for child in &mut self.children {
            drop(child.stdin.take());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `cmd` to completion with stdout and stderr captured, killing it after `timeout` (or on
/// [`crate::interrupt`]); its output whatever its exit status.
pub fn output_within(cmd: Command, timeout: Duration, what: &str) -> Result<Output> {
    crate::ns::output_bounded(cmd, None, timeout, true, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn parses_per_packet_times() {
        let text = "PING 10.244.2.2 (10.244.2.2) 56(84) bytes of data.\n\
                    64 bytes from 10.244.2.2: icmp_seq=1 ttl=62 time=0.081 ms\n\
                    64 bytes from 10.244.2.2: icmp_seq=2 ttl=62 time=1.50 ms\n\
                    From 10.244.1.1 icmp_seq=3 Destination Host Unreachable\n\n\
                    --- 10.244.2.2 ping statistics ---\n\
                    3 packets transmitted, 2 received, 33% packet loss, time 20ms\n\
                    rtt min/avg/max/mdev = 0.081/0.790/1.500/0.709 ms\n";
        assert_eq!(parse_ping_rtts(text), vec![0.081, 1.5]);
    }
}
