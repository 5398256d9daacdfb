//! `twill-probe`: the rig's pod responder and the service benchmark's client, one small binary.
//!
//! - `serve` is what every rig pod runs: on each TCP connection it answers a minimal HTTP/1.0
//!   response whose body is the pod's name, so `wget -qO- http://<VIP>/`, `curl` or `nc` show
//!   which backend a Service picked.
//! - `rate` opens fresh connections one after the other for a fixed time and prints one JSON
//!   line (count, failures, latencies): the fresh-connection rate of `cargo xtask bench
//!   services`. Given several addresses it takes them in turn, connection by connection (a VIP,
//!   then the pod IP, then the VIP...), so both meet the same background load; each address's
//!   rate is its connections over the time spent on them.
//! - `follow` connects every few hundred microseconds and prints the answering backend's name
//!   each time it changes: the benchmark timestamps those lines to see when an endpoint change
//!   reached the dataplane.
//! - `get` makes one request and prints the body.
//! - `stream` opens fresh connections one after the other and prints one line per connection
//!   with its start time, its duration and its outcome (the answer, or why it failed: refused,
//!   reset, timeout, ... and `retrans` when the handshake needed a retransmitted SYN, i.e. a
//!   packet of it was lost): the restart tests line these up with what the agent did.
//!
//! Why it is shaped as it is:
//! - The server closes first: it writes its answer, then `shutdown(SHUT_WR)`, then drains what
//!   the client sent until the client closes. TIME_WAIT therefore lands on the server side, and
//!   a client opening thousands of connections a second never runs out of ephemeral ports
//!   (ENVIRONMENT.md's rig pitfalls). Draining before closing means a client that did send a
//!   request (wget) gets a clean FIN, not a reset.
//! - It is a separate process, not a thread of the benchmark: a client must be able to live in a
//!   node's cgroup (where the eBPF socket-level load balancer is attached) while the benchmark
//!   itself stays outside, and a detached rig's responders must outlive the command that started
//!   them.
//! - One connection at a time, blocking sockets: the figure of interest is the cost of one
//!   connection through each service dataplane, which concurrency would blur on a two-core
//!   machine. Every wait is bounded (connect and read timeouts, the run's duration).

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;

/// twill's rig responder and connection-rate probe.
#[derive(Debug, Parser)]
#[command(name = "twill-probe", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Answer every TCP connection with an HTTP/1.0 response whose body is NAME, then close.
    Serve {
        /// Address to listen on (repeatable: one thread per listener).
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// The body of every answer (the pod's name).
        #[arg(long)]
        name: String,
    },
    /// One request: print the body of the answer.
    Get {
        /// Where to connect.
        addr: SocketAddr,
        /// Connect and read timeout, ms.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Fresh connections one after the other for SECS, taking the addresses in turn (one
    /// connection each); one JSON line with each address's figures.
    Rate {
        /// Where to connect (several: alternate between them, connection by connection).
        #[arg(required = true)]
        addrs: Vec<SocketAddr>,
        /// How long, seconds.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// Count an answer whose body is not this as a failure.
        #[arg(long)]
        expect: Option<String>,
        /// At most this many latency samples in the output (evenly strided).
        #[arg(long, default_value_t = 2000)]
        samples: usize,
    },
    /// Fresh connections one after the other until stdin closes (or SECS pass), one line per
    /// connection: `<start, µs since the Unix epoch> <duration, µs> <outcome> [detail]`.
    Stream {
        /// Where to connect.
        addr: SocketAddr,
        /// Connect and read timeout, ms.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Start a connection at most every INTERVAL_US (0: back to back).
        #[arg(long, default_value_t = 0)]
        interval_us: u64,
        /// Upper bound on the run, seconds.
        #[arg(long, default_value_t = 600.0)]
        secs: f64,
    },
    /// Connect every INTERVAL_US and print the answering backend's name whenever it changes
    /// (`! <error>` when connections start failing), for at most SECS or until stdin closes.
    Follow {
        /// Where to connect.
        addr: SocketAddr,
        /// Pause between connections, µs.
        #[arg(long, default_value_t = 200)]
        interval_us: u64,
        /// Upper bound on the run, seconds.
        #[arg(long, default_value_t = 600.0)]
        secs: f64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve { listen, name } => serve(&listen, &name),
        Cmd::Get { addr, timeout_ms } => {
            let body = request(addr, Duration::from_millis(timeout_ms))?;
            println!("{body}");
            Ok(())
        }
        Cmd::Rate {
            addrs,
            secs,
            expect,
            samples,
        } => {
            let figures = rate(&addrs, secs_duration(secs)?, expect.as_deref(), samples);
            println!("{}", serde_json::to_string(&figures)?);
            Ok(())
        }
        Cmd::Stream {
            addr,
            timeout_ms,
            interval_us,
            secs,
        } => {
            stream(
                addr,
                Duration::from_millis(timeout_ms),
                Duration::from_micros(interval_us),
                secs_duration(secs)?,
            );
            Ok(())
        }
        Cmd::Follow {
            addr,
            interval_us,
            secs,
        } => {
            follow(
                addr,
                Duration::from_micros(interval_us),
                secs_duration(secs)?,
            );
            Ok(())
        }
    }
}

fn secs_duration(secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        bail!("--secs {secs}: must be between 0 and 86400");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The answer to every connection.
fn response(name: &str) -> Vec<u8> {
    let body = format!("{name}\n");
    format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn serve(listen: &[SocketAddr], name: &str) -> Result<()> {
    let answer = response(name);
    let mut listeners = Vec::new();
    for addr in listen {
        listeners.push(TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))?);
    }
    std::thread::scope(|s| {
        for l in &listeners {
            let answer = &answer;
            s.spawn(move || {
                // A failed accept (a reset in the backlog) or answer only loses that one.
                for conn in l.incoming().flatten() {
                    let _ = answer_one(conn, answer);
                }
            });
        }
    });
    Ok(())
}

/// Writes the answer, closes our side first, drains the client's bytes until it closes too.
fn answer_one(mut conn: TcpStream, answer: &[u8]) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_write_timeout(Some(Duration::from_secs(1)))?;
    conn.write_all(answer)?;
    conn.shutdown(Shutdown::Write)?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut sink = [0u8; 1024];
    while conn.read(&mut sink)? > 0 {}
    Ok(())
}

/// One connection: the body of the answer (the backend's name), trimmed.
fn request(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    let mut raw = Vec::with_capacity(160);
    s.read_to_end(&mut raw)
        .with_context(|| format!("read the answer of {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(&*text, |(_, b)| b)
        .trim();
    if body.is_empty() {
        bail!("{addr} closed without an answer");
    }
    Ok(body.to_string())
}

/// What `rate` prints: one entry per target, in the order given.
#[derive(Debug, Serialize)]
struct RateRun {
    /// The run's wall time, seconds.
    secs: f64,
    /// Per target.
    targets: Vec<RateFigures>,
}

/// One target's share of a `rate` run.
#[derive(Debug, Serialize)]
struct RateFigures {
    /// The address.
    addr: SocketAddr,
    /// Connections that got the expected answer.
    ok: u64,
    /// Connections that failed (refused, timed out, wrong answer).
    failed: u64,
    /// Time spent on this target's connections (successful or not), seconds.
    busy_secs: f64,
    /// `ok / busy_secs`: the fresh-connection rate of this target had it run alone.
    rate: f64,
    /// The first failure, if any.
    first_error: Option<String>,
    /// Latency of successful connections (connect to the server's close), µs, evenly strided
    /// over the run.
    lat_us: Vec<f64>,
}

/// Fresh connections for `dur`, one at a time, to each of `addrs` in turn: connection `i` goes
/// to `addrs[i % len]`, so every target meets the same background load.
fn rate(addrs: &[SocketAddr], dur: Duration, expect: Option<&str>, samples: usize) -> RateRun {
    let timeout = Duration::from_secs(1);
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); addrs.len()];
    let mut failed = vec![0u64; addrs.len()];
    let mut busy = vec![Duration::ZERO; addrs.len()];
    let mut first_error: Vec<Option<String>> = vec![None; addrs.len()];
    let start = Instant::now();
    let mut i = 0usize;
    while start.elapsed() < dur {
        let k = i % addrs.len();
        i += 1;
        let t0 = Instant::now();
        let outcome = request(addrs[k], timeout).and_then(|body| match expect {
            Some(want) if body != want => bail!("answer {body:?}, expected {want:?}"),
            _ => Ok(()),
        });
        let took = t0.elapsed();
        busy[k] += took;
        match outcome {
            Ok(()) => lat[k].push(took.as_secs_f64() * 1e6),
            Err(e) => {
                failed[k] += 1;
                first_error[k].get_or_insert_with(|| format!("{e:#}"));
                // Nothing answers: no point hammering for the rest of the run.
                if lat.iter().all(Vec::is_empty) && failed.iter().sum::<u64>() >= 20 {
                    break;
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let targets = addrs
        .iter()
        .enumerate()
        .map(|(k, addr)| {
            let ok = lat[k].len() as u64;
            let stride = lat[k].len().div_ceil(samples.max(1)).max(1);
            let busy_secs = busy[k].as_secs_f64();
            #[expect(
                clippy::cast_precision_loss,
                reason = "connection counts are far below 2^52"
            )]
            let rate = if busy_secs > 0.0 {
                ok as f64 / busy_secs
            } else {
                0.0
            };
            RateFigures {
                addr: *addr,
                ok,
                failed: failed[k],
                busy_secs,
                rate,
                first_error: first_error[k].take(),
                lat_us: lat[k].iter().copied().step_by(stride).collect(),
            }
        })
        .collect();
    RateRun { secs, targets }
}

/// How one connection of `stream` ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Answered at the first try: the body.
    Ok(String),
    /// Answered, but a SYN (or its SYN-ACK) was lost and retransmitted: the body.
    Retrans(String),
    /// Failed: a one-word reason (`refused`, `reset`, `timeout`, `unreachable`, `rejected`,
    /// `eof`, `error`) and the error.
    Failed(&'static str, String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ok(body) => write!(f, "ok {body}"),
            Outcome::Retrans(body) => write!(f, "retrans {body}"),
            Outcome::Failed(reason, detail) => write!(f, "{reason} {detail}"),
        }
    }
}

/// The one-word reason of a failed connect or read.
fn reason(err: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match err.kind() {
        K::ConnectionRefused => "refused",
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset",
        K::TimedOut | K::WouldBlock => "timeout",
        K::HostUnreachable | K::NetworkUnreachable => "unreachable",
        // A socket-level load balancer refusing connect() (a frontend without backends).
        K::PermissionDenied => "rejected",
        _ => "error",
    }
}

/// Retransmissions the socket has made so far (`TCP_INFO`); right after `connect` only the SYN
/// can have been retransmitted.
fn retransmissions(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd as _;
    // SAFETY: `tcp_info` is plain data; zeroes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    #[expect(clippy::cast_possible_truncation, reason = "tcp_info is ~200 bytes")]
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc == 0 { info.tcpi_total_retrans } else { 0 }
}

/// One connection of `stream`.
fn attempt(addr: SocketAddr, timeout: Duration) -> Outcome {
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(reason(&e), format!("connect: {e}")),
    };
    let retrans = retransmissions(&s) > 0;
    let mut raw = Vec::with_capacity(160);
    if let Err(e) = s
        .set_read_timeout(Some(timeout))
        .and_then(|()| s.read_to_end(&mut raw))
    {
        return Outcome::Failed(reason(&e), format!("read: {e}"));
    }
    let text = String::from_utf8_lossy(&raw);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(&*text, |(_, b)| b)
        .trim();
    match body.split_whitespace().next() {
        None => Outcome::Failed("eof", "closed without an answer".into()),
        Some(name) if retrans => Outcome::Retrans(name.to_string()),
        Some(name) => Outcome::Ok(name.to_string()),
    }
}

/// Microseconds since the Unix epoch (the clock of the agent's log lines).
fn unix_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// A channel that gets a message once `read` has returned from reading stdin on a thread of its
/// own: the reader of our stdout closing its end of our stdin (or dying) ends a run.
fn on_stdin(read: impl FnOnce(&mut std::io::StdinLock<'static>) + Send + 'static) -> Receiver<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        read(&mut std::io::stdin().lock());
        let _ = tx.send(());
    });
    rx
}

fn stream(addr: SocketAddr, timeout: Duration, interval: Duration, dur: Duration) {
    let rx = on_stdin(|stdin| {
        let _ = stdin.read_to_end(&mut Vec::new());
    });
    let mut out = std::io::stdout().lock();
    let start = Instant::now();
    while start.elapsed() < dur && rx.try_recv().is_err() {
        let at = unix_us();
        let t0 = Instant::now();
        let outcome = attempt(addr, timeout);
        let took = t0.elapsed();
        if writeln!(out, "{at} {} {outcome}", took.as_micros())
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
        if let Some(rest) = interval.checked_sub(took) {
            std::thread::sleep(rest);
        }
    }
}

fn follow(addr: SocketAddr, interval: Duration, dur: Duration) {
    let rx = on_stdin(|stdin| {
        let _ = stdin.read_line(&mut String::new());
    });
    let mut out = std::io::stdout().lock();
    let mut last = String::new();
    let start = Instant::now();
    while start.elapsed() < dur && rx.try_recv().is_err() {
        let now = match request(addr, Duration::from_millis(500)) {
            Ok(name) => name,
            Err(e) => format!("! {e:#}"),
        };
        if now != last {
            // A closed pipe means the reader is gone: stop.
            if writeln!(out, "{now}").and_then(|()| out.flush()).is_err() {
                return;
            }
            last = now;
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback server answering `name` to its first `conns` connections, as `serve` does.
    fn answering(name: &'static str, conns: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().take(conns) {
                let _ = answer_one(c.unwrap(), &response(name));
            }
        });
        addr
    }

    #[test]
    fn answers_name_and_closes_first() {
        let addr = answering("n1p2", 3);
        assert_eq!(request(addr, Duration::from_secs(2)).unwrap(), "n1p2");
        let run = rate(&[addr], Duration::from_millis(50), Some("n1p2"), 10);
        let figures = &run.targets[0];
        assert!(figures.ok >= 1, "{figures:?}");
        assert!(figures.lat_us.len() <= 10);
        assert!(figures.rate > 0.0);
        assert!(figures.busy_secs <= run.secs);
    }

    #[test]
    fn wrong_answers_and_refusals_count_as_failures() {
        let addr = answering("other", 1);
        let mut run = rate(&[addr], Duration::from_millis(300), Some("n1p1"), 10);
        let f = run.targets.remove(0);
        assert_eq!(f.ok, 0);
        assert!(f.failed >= 1);
        assert!(f.first_error.unwrap().contains("other"));
    }

    #[test]
    fn alternates_between_targets() {
        let addrs = [answering("x", 40), answering("y", 40)];
        let run = rate(&addrs, Duration::from_millis(100), None, 100);
        let (x, y) = (&run.targets[0], &run.targets[1]);
        assert_eq!(x.addr, addrs[0]);
        assert!(x.ok >= 1 && y.ok >= 1, "{run:?}");
        // Taken in turn: the counts differ by at most one (or the last ones found no server).
        assert!(x.ok.abs_diff(y.ok) <= 1 || x.ok + y.ok >= 79, "{run:?}");
    }

    #[test]
    fn stream_outcomes_name_the_answer_or_the_reason() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let c = l.incoming().next().unwrap().unwrap();
            let _ = answer_one(c, &response("n1p1 extra"));
            let c = l.incoming().next().unwrap().unwrap();
            drop(c);
        });
        let t = Duration::from_secs(2);
        assert_eq!(attempt(addr, t), Outcome::Ok("n1p1".into()));
        assert!(matches!(attempt(addr, t), Outcome::Failed("eof", _)));
        server.join().unwrap();
        // Nobody listens there any more.
        let refused = attempt(addr, t);
        assert!(
            matches!(refused, Outcome::Failed("refused", _)),
            "{refused}"
        );
        assert_eq!(
            refused.to_string().split_whitespace().next(),
            Some("refused")
        );
    }

    #[test]
    fn bad_durations_are_refused() {
        assert!(secs_duration(0.0).is_err());
        assert!(secs_duration(f64::NAN).is_err());
        assert!(secs_duration(1.5).is_ok());
    }
}
