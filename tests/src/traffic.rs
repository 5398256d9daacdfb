//! Traffic for the tests: servers that answer with their name and the client they saw, one-shot
//! clients (a TCP line, a UDP round trip, a bulk TCP transfer), and a ping flood whose progress
//! a test can wait for.
//!
//! Why it is shaped as it is:
//! - A [`NameServer`] answers `<name> peer=<client address>`: a test sees which backend served a
//!   flow and which source address reached it (NAT or not), from one line. It is a thread of the
//!   test inside the pod's namespace, so it needs nothing installed and stops with its guard.
//! - Clients run on threads that joined the client's namespace ([`in_netns`]): they take the
//!   namespace's routing and netfilter path but sit in no node cgroup, so an eBPF service proxy
//!   sees them on its tc path. [`tcp_line_in_cgroup`] is the client inside a cgroup (a process),
//!   for socket-level load balancing.
//! - Every step is bounded (connect, read and write timeouts; the flood's run and its wait), so
//!   a broken dataplane fails a test instead of hanging it.
//! - [`PingFlood`] reads ping's per-packet lines as they come (`-O` reports every unanswered
//!   request too), so "the flood is under way" and "so many packets crossed the restart" are
//!   conditions a test waits for, not sleeps.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::net::{PingStats, ping_args};
use crate::ns::{in_netns, join_netns, nsenter};

/// How long a client waits to connect, and then for each read or write.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP and/or UDP server in a namespace answering every connection and every datagram with
/// `<name> peer=<client address>`; stops when dropped.
#[derive(Debug)]
pub struct NameServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NameServer {
    /// Binds `tcp` and/or `udp` inside namespace `ns` and serves them on a thread; returns once
    /// both are bound (an error if binding fails).
    pub fn start(
        ns: &str,
        name: &str,
        tcp: Option<SocketAddr>,
        udp: Option<SocketAddr>,
    ) -> Result<NameServer> {
        ensure!(
            tcp.is_some() || udp.is_some(),
            "a server needs a TCP or a UDP address"
        );
        let what = format!("server {name} in netns {ns}");
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::spawn({
            let (ns, name, stop) = (ns.to_string(), name.to_string(), stop.clone());
            move || {
                let bound = (|| -> Result<(Option<TcpListener>, Option<UdpSocket>)> {
                    join_netns(&ns)?;
                    let tcp = tcp
                        .map(|a| {
                            let l =
                                TcpListener::bind(a).with_context(|| format!("bind tcp {a}"))?;
                            l.set_nonblocking(true)?;
                            anyhow::Ok(l)
                        })
                        .transpose()?;
                    let udp = udp
                        .map(|a| {
                            let s = UdpSocket::bind(a).with_context(|| format!("bind udp {a}"))?;
                            // The loop's pace: a UDP wait when there is a socket to wait on.
                            s.set_read_timeout(Some(Duration::from_millis(10)))?;
                            anyhow::Ok(s)
                        })
                        .transpose()?;
                    Ok((tcp, udp))
                })();
                let (tcp, udp) = match bound {
                    Ok(b) => {
                        let _ = ready_tx.send(Ok(()));
                        b
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Some(l) = &tcp
                        && let Ok((mut s, peer)) = l.accept()
                    {
                        let _ = writeln!(s, "{name} peer={peer}");
                    }
                    match &udp {
                        Some(u) => {
                            if let Ok((_, peer)) = u.recv_from(&mut buf) {
                                let _ = u.send_to(format!("{name} peer={peer}").as_bytes(), peer);
                            }
                        }
                        None => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }
        });
        let server = NameServer {
            stop,
            thread: Some(thread),
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("{what}: not bound within 10 s"))?
            .with_context(|| what)?;
        Ok(server)
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The first word of a [`NameServer`]'s answer: the name of the server that answered.
pub fn server_name(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or_default()
}

/// One TCP exchange from a thread in `ns`: the first line the server sends, trimmed, or the
/// error ([`CLIENT_TIMEOUT`] to connect and to read).
pub fn tcp_exchange(ns: &str, addr: SocketAddr) -> std::io::Result<String> {
    in_netns(ns, || {
        let s = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim().to_owned())
    })
    .map_err(|e| match e.downcast::<std::io::Error>() {
        Ok(io) => io,
        Err(other) => std::io::Error::other(format!("{other:#}")),
    })
}

/// [`tcp_exchange`] as an option: the line, `None` on any failure or an empty answer.
pub fn tcp_line(ns: &str, addr: SocketAddr) -> Option<String> {
    tcp_exchange(ns, addr).ok().filter(|l| !l.is_empty())
}

/// The same from a process in `ns` inside `cgroup` (so socket-level load balancing attached to
/// that cgroup sees it): `busybox nc` with a 2 s timeout.
pub fn tcp_line_in_cgroup(ns: &str, cgroup: &Path, addr: SocketAddr) -> Option<String> {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{ns} -- \
         busybox nc -w 2 {} {} </dev/null",
        cgroup.display(),
        addr.ip(),
        addr.port()
    );
    let out = Command::new("sh").args(["-c", &script]).output().ok()?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!line.is_empty()).then_some(line)
}

/// A UDP round trip between a socket in `from_ns` and one bound to `to_ip` in `to_ns` (a few
/// tries: the first datagram may wait on ARP or neighbour discovery): whether the echo came
/// back. Reachability without `ping`.
pub fn udp_round_trip(from_ns: &str, to_ns: &str, to_ip: IpAddr) -> Result<bool> {
    let server = in_netns(to_ns, || Ok(UdpSocket::bind(SocketAddr::new(to_ip, 0))?))?;
    let addr = server.local_addr()?;
    server.set_read_timeout(Some(Duration::from_secs(3)))?;
    let unspecified: IpAddr = if to_ip.is_ipv4() {
        [0u8; 4].into()
    } else {
        [0u16; 8].into()
    };
    let client = in_netns(from_ns, || {
        Ok(UdpSocket::bind(SocketAddr::new(unspecified, 0))?)
    })?;
    client.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [0u8; 16];
    for _ in 0..3 {
        client.send_to(b"twill", addr)?;
        if let Ok((n, peer)) = server.recv_from(&mut buf) {
            server.send_to(&buf[..n], peer)?;
            if client.recv_from(&mut buf).is_ok() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Sends `data` over one TCP connection from namespace `from_ns` to `dst`, where a listener
/// bound in namespace `to_ns` reads it to the end; what arrived. Every step is bounded by
/// `timeout`.
pub fn tcp_transfer(
    from_ns: &str,
    to_ns: &str,
    dst: SocketAddr,
    data: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    tcp_transfer_via(from_ns, to_ns, dst, dst, data, timeout)
}

/// [`tcp_transfer`] to a listener bound to `bind` rather than to `dst` itself: a wildcard or a
/// node address that `dst` (a service or NAT address) is translated to on the way.
pub fn tcp_transfer_via(
    from_ns: &str,
    to_ns: &str,
    bind: SocketAddr,
    dst: SocketAddr,
    data: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn({
        let to_ns = to_ns.to_string();
        move || {
            in_netns(&to_ns, || {
                let l = TcpListener::bind(bind).with_context(|| format!("bind {bind}"))?;
                l.set_nonblocking(true)?;
                let _ = ready_tx.send(());
                let deadline = Instant::now() + timeout;
                let mut s = loop {
                    match l.accept() {
                        Ok((s, _)) => break s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            ensure!(Instant::now() < deadline, "no connection to {dst}");
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(timeout))?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf)?;
                Ok(buf)
            })
        }
    });
    if ready_rx.recv_timeout(timeout).is_err() {
        return server
            .join()
            .map_err(|_| anyhow!("the receiver in {to_ns} panicked"))?
            .and_then(|_| Err(anyhow!("the receiver in {to_ns} did not listen")));
    }
    let sent = in_netns(from_ns, || {
        let mut s = TcpStream::connect_timeout(&dst, timeout)?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(data)?;
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    let got = server
        .join()
        .map_err(|_| anyhow!("the receiver in {to_ns} panicked"))?;
    sent.with_context(|| format!("send {} bytes from {from_ns} to {dst}", data.len()))?;
    got.with_context(|| format!("receive at {bind} in {to_ns}"))
}

/// A `ping` flood from a namespace whose progress is read as it goes.
#[derive(Debug)]
pub struct PingFlood {
    child: Child,
    seen: Arc<Mutex<FloodLines>>,
    reader: Option<JoinHandle<()>>,
    what: String,
    bound: Duration,
}

#[derive(Debug, Default)]
struct FloodLines {
    /// The highest `icmp_seq` ping has reported (answered or not): how far the flood has got.
    last_seq: u32,
    /// Replies so far.
    replies: u32,
    /// Everything ping printed, for the summary and for messages.
    text: String,
}

impl PingFlood {
    /// Starts `count` pings `interval` apart from `from_ns` to `dst` (each answered within 1 s
    /// or counted lost; every unanswered one reported as it goes, `-O`).
    pub fn start(from_ns: &str, dst: IpAddr, count: u32, interval: Duration) -> Result<PingFlood> {
        let args = ping_args(dst, count, interval, &["-O"]);
        let what = format!("{} in netns {from_ns}", args.join(" "));
        let mut child = nsenter(from_ns, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn {what}"))?;
        let out = child.stdout.take().expect("stdout is piped");
        let seen = Arc::new(Mutex::new(FloodLines::default()));
        let reader = std::thread::spawn({
            let seen = seen.clone();
            move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    let mut s = seen.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(seq) = icmp_seq(&line) {
                        s.last_seq = s.last_seq.max(seq);
                        if line.contains(" bytes from ") {
                            s.replies += 1;
                        }
                    }
                    s.text.push_str(&line);
                    s.text.push('\n');
                }
            }
        });
        Ok(PingFlood {
            child,
            seen,
            reader: Some(reader),
            what,
            bound: interval * count + Duration::from_secs(10),
        })
    }

    /// How far the flood has got: the highest sequence number ping has reported.
    pub fn sent(&self) -> u32 {
        self.lock().last_seq
    }

    /// How many replies came back so far.
    pub fn replies(&self) -> u32 {
        self.lock().replies
    }

    /// Waits until the flood has got `n` requests further than `from` (so many crossed whatever
    /// happened since); an error after `timeout` or if ping ended first.
    pub fn wait_past(&mut self, from: u32, n: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.sent() >= from + n {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} ended ({status}) at request {} before request {}",
                    self.what,
                    self.sent(),
                    from + n
                );
            }
            if crate::interrupted() {
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} at request {} after {timeout:?}, waiting for request {}",
                    self.what,
                    self.sent(),
                    from + n
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (bounded) for ping to finish; its statistics and everything it printed.
    pub fn finish(mut self) -> Result<(PingStats, String)> {
        let status = crate::ns::wait_bounded(&mut self.child, self.bound)
            .with_context(|| self.what.clone())?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let text = std::mem::take(&mut self.lock().text);
        let stats = PingStats::parse(&text).with_context(|| format!("{} ({status})", self.what))?;
        Ok((stats, text))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FloodLines> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for PingFlood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `icmp_seq=N` of one of ping's per-packet lines.
fn icmp_seq(line: &str) -> Option<u32> {
    let rest = &line[line.find("icmp_seq=")? + 9..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sequence_numbers_of_answered_and_unanswered_requests() {
        assert_eq!(
            icmp_seq("64 bytes from 10.244.2.2: icmp_seq=17 ttl=62 time=0.081 ms"),
            Some(17)
        );
        assert_eq!(icmp_seq("no answer yet for icmp_seq=203"), Some(203));
        assert_eq!(
            icmp_seq("From 10.244.1.1 icmp_seq=3 Destination Host Unreachable"),
            Some(3)
        );
        assert_eq!(icmp_seq("--- 10.244.2.2 ping statistics ---"), None);
    }

    #[test]
    fn names_the_server_that_answered() {
        assert_eq!(server_name("b2 peer=10.244.1.3:41000"), "b2");
        assert_eq!(server_name(""), "");
    }
}
