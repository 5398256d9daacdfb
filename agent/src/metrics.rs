//! `/healthz` and Prometheus `/metrics`, on a tiny HTTP/1.1 server.
//!
//! Two endpoints and a text format do not justify a web framework in a node agent whose memory
//! is a feature; the server reads one request line per connection and answers with
//! `Connection: close`.
//!
//! A scrape is written to the client as it is made, in pieces of [`SCRAPE_PIECE`] bytes: with
//! 10k frontends the eBPF service series are megabytes, and a body held whole (twice, while a
//! subsystem's text was appended to it) was the agent's peak resident set during its first
//! full sync. No lock the agent's loops take is held while a piece goes out to the client.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::http::{Reply, Response};

/// Bytes of scrape text gathered before they go out to the client.
const SCRAPE_PIECE: usize = 64 * 1024;

/// Upper bounds of the reconcile duration histogram, in seconds.
const BUCKETS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Packet counts of the overlay device, from the eBPF counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// A source of device counts read at scrape time.
pub type CountsFn = Box<dyn Fn() -> Option<DeviceCounts> + Send + Sync>;

/// Counters of the udp backend's data path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpCounts {
    /// Peers in the routing table.
    pub peers: u64,
    /// Datagrams sent to peers.
    pub tx_packets: u64,
    /// UDP payload bytes sent.
    pub tx_bytes: u64,
    /// Datagrams received from the port.
    pub rx_packets: u64,
    /// UDP payload bytes received.
    pub rx_bytes: u64,
    /// Packets read from the TUN (a GSO super-packet counts once).
    pub tun_reads: u64,
    /// Packets written to the TUN (a coalesced super-packet counts once).
    pub tun_writes: u64,
    /// Drops by reason (every reason, zeros included).
    pub drops: Vec<(&'static str, u64)>,
}

/// A source of udp backend counts read at scrape time.
pub type UdpCountsFn = Box<dyn Fn() -> UdpCounts + Send + Sync>;

/// The agent's state as exported.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    counts: Mutex<Option<(String, CountsFn)>>,
    udp: Mutex<Option<UdpCountsFn>>,
    extra: Mutex<Vec<SharedWriter>>,
}

/// A renderer of more Prometheus text (another subsystem's metrics), called at scrape time.
pub type Renderer = Box<dyn Fn() -> String + Send + Sync>;

/// Like [`Renderer`], writing its text into the scrape as it makes it (for large outputs).
pub type Writer = Box<dyn Fn(&mut dyn std::fmt::Write) + Send + Sync>;

/// A registered [`Writer`], taken out of its list for a scrape (the list's lock is not held
/// while a scrape goes out).
type SharedWriter = Arc<dyn Fn(&mut dyn std::fmt::Write) + Send + Sync>;

/// Scrape text on its way to the client: gathered in pieces, each written out when full.
struct Pieces<'a> {
    buf: String,
    out: &'a mut dyn std::io::Write,
    err: Option<std::io::Error>,
}

impl Pieces<'_> {
    fn send(&mut self) -> std::fmt::Result {
        if self.err.is_none()
            && let Err(e) = self.out.write_all(self.buf.as_bytes())
        {
            self.err = Some(e);
        }
        self.buf.clear();
        if self.err.is_some() {
            Err(std::fmt::Error)
        } else {
            Ok(())
        }
    }
}

impl std::fmt::Write for Pieces<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.err.is_some() {
            return Err(std::fmt::Error);
        }
        self.buf.push_str(s);
        if self.buf.len() >= SCRAPE_PIECE {
            self.send()?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Inner {
    ready: bool,
    /// Why the agent is not ready (a lease lost, a conflict, a refused config), if known.
    not_ready: Option<String>,
    /// Peer leases ignored right now, by reason label.
    leases_ignored: Vec<(&'static str, usize)>,
    /// Conflicts over this node's lease right now.
    lease_conflicts: usize,
    lease_expiry: Option<SystemTime>,
    peers: usize,
    reconciles: u64,
    reconcile_errors: u64,
    buckets: [u64; BUCKETS.len()],
    duration_sum: f64,
    last_error: Option<(SystemTime, String)>,
    last_ops: usize,
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Marks the agent ready (it holds a lease and programmed the overlay once).
    pub fn set_ready(&self) {
        let mut g = self.inner.lock().unwrap();
        g.ready = true;
        g.not_ready = None;
    }

    /// Marks the agent not ready (again), with the reason `/healthz` gives.
    pub fn set_not_ready(&self, reason: &str) {
        let mut g = self.inner.lock().unwrap();
        g.ready = false;
        g.not_ready = Some(reason.to_string());
    }

    /// Records how many peer leases are ignored, per reason label (every reason, zeros too).
    pub fn set_leases_ignored(&self, counts: &[(&'static str, usize)]) {
        self.inner.lock().unwrap().leases_ignored = counts.to_vec();
    }

    /// Records how many conflicts over this node's lease there are (another node with our
    /// public IP, claims on our lease, an older lease overlapping ours).
    pub fn set_lease_conflicts(&self, n: usize) {
        self.inner.lock().unwrap().lease_conflicts = n;
    }

    /// Whether the agent is ready.
    pub fn ready(&self) -> bool {
        self.inner.lock().unwrap().ready
    }

    /// Records the lease's expiry.
    pub fn set_lease_expiry(&self, t: SystemTime) {
        self.inner.lock().unwrap().lease_expiry = Some(t);
    }

    /// Records a reconcile.
    pub fn observe_reconcile(&self, took: Duration, peers: usize, ops: usize, ok: bool) {
        let mut g = self.inner.lock().unwrap();
        g.reconciles += 1;
        if !ok {
            g.reconcile_errors += 1;
        }
        g.peers = peers;
        g.last_ops = ops;
        let s = took.as_secs_f64();
        g.duration_sum += s;
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                g.buckets[i] += 1;
            }
        }
    }

    /// Records an error (shown in `/healthz` and as `twill_last_error_info`).
    pub fn set_error(&self, e: &str) {
        self.inner.lock().unwrap().last_error = Some((SystemTime::now(), e.to_string()));
    }

    /// Registers the eBPF counter of the overlay device.
    pub fn set_counts(&self, device: &str, f: CountsFn) {
        *self.counts.lock().unwrap() = Some((device.to_string(), f));
    }

    /// Registers the udp backend's counters.
    pub fn set_udp_counts(&self, f: UdpCountsFn) {
        *self.udp.lock().unwrap() = Some(f);
    }

    /// Appends another subsystem's metrics to every scrape.
    pub fn add_renderer(&self, f: Renderer) {
        self.extra.lock().unwrap().push(Arc::new(move |o| {
            let _ = o.write_str(&f());
        }));
    }

    /// Appends another subsystem's metrics to every scrape, written as they are made.
    pub fn add_writer(&self, f: Writer) {
        self.extra.lock().unwrap().push(Arc::from(f));
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        self.write(&mut o);
        o
    }

    /// The exposition written to `out` in pieces of [`SCRAPE_PIECE`] bytes (a scrape).
    pub fn write_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut pieces = Pieces {
            buf: String::with_capacity(SCRAPE_PIECE + 4096),
            out,
            err: None,
        };
        self.write(&mut pieces);
        let _ = pieces.send();
        pieces.err.map_or(Ok(()), Err)
    }

    /// The exposition written into `out`; the agent's own figures are copied out under their
    /// lock and written after it is released.
    fn write(&self, out: &mut dyn std::fmt::Write) {
        let mut o = String::new();
        let g = self.inner.lock().unwrap();
        let _ = writeln!(
            o,
            "# HELP twill_up Whether twilld holds a lease and programmed the overlay.\n# TYPE twill_up gauge\ntwill_up {}",
            u8::from(g.ready)
        );
        if let Some(t) = g.lease_expiry {
            let _ = writeln!(
                o,
                "# HELP twill_lease_expiry_timestamp_seconds When this node's subnet lease expires unless renewed.\n# TYPE twill_lease_expiry_timestamp_seconds gauge\ntwill_lease_expiry_timestamp_seconds {}",
                secs(t)
            );
        }
        let _ = writeln!(
            o,
            "# HELP twill_peers Remote nodes programmed in the overlay.\n# TYPE twill_peers gauge\ntwill_peers {}",
            g.peers
        );
        if !g.leases_ignored.is_empty() {
            let _ = writeln!(
                o,
                "# HELP twill_leases_ignored Peer leases the overlay ignores, by reason.\n# TYPE twill_leases_ignored gauge"
            );
            for (reason, n) in &g.leases_ignored {
                let _ = writeln!(o, "twill_leases_ignored{{reason=\"{reason}\"}} {n}");
            }
        }
        let _ = writeln!(
            o,
            "# HELP twill_lease_conflicts Conflicts over this node's lease (another node with its public IP).\n# TYPE twill_lease_conflicts gauge\ntwill_lease_conflicts {}",
            g.lease_conflicts
        );
        let _ = writeln!(
            o,
            "# HELP twill_reconcile_operations Kernel operations of the last reconcile.\n# TYPE twill_reconcile_operations gauge\ntwill_reconcile_operations {}",
            g.last_ops
        );
        let _ = writeln!(
            o,
            "# HELP twill_reconcile_errors_total Reconciles that failed.\n# TYPE twill_reconcile_errors_total counter\ntwill_reconcile_errors_total {}",
            g.reconcile_errors
        );
        let _ = writeln!(
            o,
            "# HELP twill_reconcile_duration_seconds Time to observe, plan and apply the overlay.\n# TYPE twill_reconcile_duration_seconds histogram"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "twill_reconcile_duration_seconds_bucket{{le=\"{b}\"}} {}",
                g.buckets[i]
            );
        }
        let _ = writeln!(
            o,
            "twill_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            g.reconciles
        );
        let _ = writeln!(o, "twill_reconcile_duration_seconds_sum {}", g.duration_sum);
        let _ = writeln!(o, "twill_reconcile_duration_seconds_count {}", g.reconciles);
        if let Some((t, e)) = &g.last_error {
            let _ = writeln!(
                o,
                "# HELP twill_last_error_info The last error twilld met.\n# TYPE twill_last_error_info gauge\ntwill_last_error_info{{error=\"{}\"}} 1",
                escape(e)
            );
            let _ = writeln!(
                o,
                "# HELP twill_last_error_timestamp_seconds When the last error happened.\n# TYPE twill_last_error_timestamp_seconds gauge\ntwill_last_error_timestamp_seconds {}",
                secs(*t)
            );
        }
        drop(g);
        if let Some((dev, f)) = &*self.counts.lock().unwrap()
            && let Some(c) = f()
        {
            let _ = writeln!(
                o,
                "# HELP twill_vxlan_packets_total Packets through the overlay device, counted by eBPF.\n# TYPE twill_vxlan_packets_total counter"
            );
            let _ = writeln!(
                o,
                "twill_vxlan_packets_total{{device=\"{dev}\",direction=\"rx\"}} {}",
                c.rx_packets
            );
            let _ = writeln!(
                o,
                "twill_vxlan_packets_total{{device=\"{dev}\",direction=\"tx\"}} {}",
                c.tx_packets
            );
            let _ = writeln!(
                o,
                "# HELP twill_vxlan_bytes_total Bytes through the overlay device, counted by eBPF.\n# TYPE twill_vxlan_bytes_total counter"
            );
            let _ = writeln!(
                o,
                "twill_vxlan_bytes_total{{device=\"{dev}\",direction=\"rx\"}} {}",
                c.rx_bytes
            );
            let _ = writeln!(
                o,
                "twill_vxlan_bytes_total{{device=\"{dev}\",direction=\"tx\"}} {}",
                c.tx_bytes
            );
        }
        if let Some(f) = &*self.udp.lock().unwrap() {
            render_udp(&mut o, &f());
        }
        if out.write_str(&o).is_err() {
            return;
        }
        drop(o);
        let extra = self.extra.lock().unwrap().clone();
        for f in extra {
            f(out);
        }
    }

    /// What `/healthz` answers: 200 when ready, else 503 with the reason.
    pub fn health(&self) -> (u16, String) {
        let g = self.inner.lock().unwrap();
        if g.ready {
            (200, "ok\n".into())
        } else {
            let why = g.not_ready.clone().unwrap_or_else(|| {
                g.last_error
                    .as_ref()
                    .map_or("starting".to_string(), |(_, e)| e.clone())
            });
            (503, format!("not ready: {why}\n"))
        }
    }
}

fn render_udp(o: &mut String, c: &UdpCounts) {
    let _ = writeln!(
        o,
        "# HELP twill_udp_peers Peers in the udp backend's routing table.\n# TYPE twill_udp_peers gauge\ntwill_udp_peers {}",
        c.peers
    );
    let _ = writeln!(
        o,
        "# HELP twill_udp_packets_total Datagrams through the udp backend's port.\n# TYPE twill_udp_packets_total counter\ntwill_udp_packets_total{{direction=\"tx\"}} {}\ntwill_udp_packets_total{{direction=\"rx\"}} {}",
        c.tx_packets, c.rx_packets
    );
    let _ = writeln!(
        o,
        "# HELP twill_udp_bytes_total UDP payload bytes through the udp backend's port.\n# TYPE twill_udp_bytes_total counter\ntwill_udp_bytes_total{{direction=\"tx\"}} {}\ntwill_udp_bytes_total{{direction=\"rx\"}} {}",
        c.tx_bytes, c.rx_bytes
    );
    let _ = writeln!(
        o,
        "# HELP twill_udp_tun_packets_total Packets between the udp backend and its TUN device (a GSO super-packet counts once).\n# TYPE twill_udp_tun_packets_total counter\ntwill_udp_tun_packets_total{{direction=\"read\"}} {}\ntwill_udp_tun_packets_total{{direction=\"write\"}} {}",
        c.tun_reads, c.tun_writes
    );
    let _ = writeln!(
        o,
        "# HELP twill_udp_drops_total Packets the udp backend dropped, by reason.\n# TYPE twill_udp_drops_total counter"
    );
    for (reason, n) in &c.drops {
        let _ = writeln!(o, "twill_udp_drops_total{{reason=\"{reason}\"}} {n}");
    }
}

/// Serves `/healthz` (and `/livez`) and `/metrics` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    crate::http::serve_replies(addr, "/healthz and /metrics", move |path| {
        let metrics = metrics.clone();
        async move {
            match path.as_str() {
                "/healthz" | "/livez" => {
                    let (code, text) = metrics.health();
                    Response::new(code, "text/plain", text).into()
                }
                // Streamed (see the module notes); renderers read kernel maps (syscalls, maybe
                // many), and the server runs the writer on a blocking thread.
                "/metrics" => Reply::Streamed {
                    code: 200,
                    content_type: "text/plain; version=0.0.4",
                    write: Box::new(move |w| metrics.write_to(w)),
                },
                _ => Response::new(404, "text/plain", "not found\n").into(),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_streams_what_render_returns_in_pieces() {
        /// Records the size of each write.
        struct Writes(Vec<u8>, Vec<usize>);
        impl std::io::Write for Writes {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.extend_from_slice(b);
                self.1.push(b.len());
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let m = Metrics::default();
        m.observe_reconcile(Duration::from_millis(3), 2, 6, true);
        m.add_renderer(Box::new(|| "twill_extra 1\n".to_string()));
        m.add_writer(Box::new(|o| {
            for i in 0..20_000 {
                let _ = writeln!(o, "twill_series{{n=\"{i}\"}} {i}");
            }
        }));
        let mut w = Writes(Vec::new(), Vec::new());
        m.write_to(&mut w).unwrap();
        let text = m.render();
        assert_eq!(String::from_utf8(w.0).unwrap(), text);
        assert!(text.contains("twill_extra 1\ntwill_series{n=\"0\"} 0\n"));
        assert!(w.1.len() > 1, "one piece for {} bytes", text.len());
        assert!(w.1.iter().all(|&n| n < SCRAPE_PIECE + 4096), "{:?}", w.1);
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.observe_reconcile(Duration::from_millis(3), 2, 6, true);
        m.set_error("etcd get: \"down\"");
        m.set_counts(
            "flannel.1",
            Box::new(|| {
                Some(DeviceCounts {
                    rx_packets: 5,
                    rx_bytes: 500,
                    tx_packets: 6,
                    tx_bytes: 600,
                })
            }),
        );
        let t = m.render();
        assert!(t.contains("twill_peers 2\n"));
        assert!(t.contains("twill_reconcile_duration_seconds_bucket{le=\"0.002\"} 0\n"));
        assert!(t.contains("twill_reconcile_duration_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(t.contains("twill_last_error_info{error=\"etcd get: \\\"down\\\"\"} 1"));
        assert!(t.contains("twill_vxlan_packets_total{device=\"flannel.1\",direction=\"tx\"} 6"));
        m.set_udp_counts(Box::new(|| UdpCounts {
            peers: 2,
            tx_packets: 3,
            rx_bytes: 99,
            drops: vec![("malformed", 2), ("no_route", 0)],
            ..UdpCounts::default()
        }));
        let t = m.render();
        assert!(t.contains("twill_udp_peers 2\n"), "{t}");
        assert!(
            t.contains("twill_udp_packets_total{direction=\"tx\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("twill_udp_bytes_total{direction=\"rx\"} 99\n"),
            "{t}"
        );
        assert!(
            t.contains("twill_udp_drops_total{reason=\"malformed\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("twill_udp_drops_total{reason=\"no_route\"} 0\n"),
            "{t}"
        );
        assert_eq!(m.health().0, 503);
        m.set_ready();
        assert_eq!(m.health().0, 200);
    }
}
