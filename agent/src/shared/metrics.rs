//! `/healthz` and Prometheus `/metrics`, on the agent's HTTP server ([`crate::http`]).
//!
//! The text exposition is written here, not by `prometheus-client` (0.26.0, the official Rust
//! client, whose Prometheus-text encoder was measured against this one): the kube-proxy series
//! the service loop exports must match kube-proxy's byte for byte, and with the library 5 of
//! 111 lines of two kube-proxy histograms, a counter and a gauge came out differently — every
//! `# HELP` gets a `.` appended (`Registry::register` adds it), and a float gauge or an
//! integral histogram sum is written `0.0` where Go's client writes `0`. A custom collector
//! avoids the first and not the second. The histograms themselves are a few buckets and two
//! numbers ([`Histogram`]); the scrape is streamed from the same writers either way.
//!
//! Two listeners, two purposes ([`Endpoints`]): `--healthz-ip/--healthz-port` is flannel's health
//! check, often bound to every address of the node, and serves `/healthz` only; `/metrics` (the
//! node's leases, peers, services and errors) is served on `--metrics-addr` only, loopback unless
//! the operator says otherwise.
//!
//! Errors are kept per operation, so what is exported is what is failing now: an operation's
//! error stays until that operation succeeds ([`Metrics::clear_error`]). Errors recorded without
//! an operation ([`Metrics::set_error`]) belong to the overlay loop and are cleared by its next
//! successful reconcile. A counter per operation keeps the history the gauge forgets.
//!
//! A scrape is written to the client as it is made, in pieces of [`SCRAPE_PIECE`] bytes: with
//! 10k frontends the eBPF service series are megabytes, and a body held whole (twice, while a
//! subsystem's text was appended to it) was the agent's peak resident set during its first
//! full sync. No lock the agent's loops take is held while a piece goes out to the client.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::shared::http::{Reply, Response};

/// The operation errors recorded by [`Metrics::set_error`] belong to: the overlay loop, whose
/// next successful reconcile clears them.
pub const OVERLAY_OP: &str = "overlay";

/// Bytes of scrape text gathered before they go out to the client.
const SCRAPE_PIECE: usize = 64 * 1024;

/// Upper bounds of the reconcile duration histogram, in seconds.
const BUCKETS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// A Prometheus histogram whose upper bounds are given at each call (they are constants of the
/// series), rendered in the text exposition as kube-proxy's Go client writes it. The agent's
/// and the service loop's histograms are all of this kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or below each bound.
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    /// Records `v` against `bounds` (ascending).
    pub fn observe(&mut self, bounds: &[f64], v: f64) {
        self.buckets.resize(bounds.len(), 0);
        for (i, b) in bounds.iter().enumerate() {
            if v <= *b {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Writes the series `name` (`# HELP`, `# TYPE`, a bucket per bound and `+Inf`, `_sum`,
    /// `_count`).
    pub fn render(&self, o: &mut String, name: &str, help: &str, bounds: &[f64]) {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} histogram");
        for (i, b) in bounds.iter().enumerate() {
            let n = self.buckets.get(i).copied().unwrap_or_default();
            let _ = writeln!(o, "{name}_bucket{{le=\"{b}\"}} {n}");
        }
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(o, "{name}_sum {}", self.sum);
        let _ = writeln!(o, "{name}_count {}", self.count);
    }
}

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
    reconcile_errors: u64,
    reconcile_duration: Histogram,
    /// The current error of each operation that failed and has not succeeded since.
    errors: BTreeMap<String, (SystemTime, String)>,
    /// Errors met per operation, cleared ones included.
    error_counts: BTreeMap<String, u64>,
    last_ops: usize,
}

impl Inner {
    /// The most recent current error.
    fn latest_error(&self) -> Option<&(SystemTime, String)> {
        self.errors.values().max_by_key(|(t, _)| *t)
    }
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

    /// Records a reconcile; a successful one clears the overlay's error ([`OVERLAY_OP`]).
    pub fn observe_reconcile(&self, took: Duration, peers: usize, ops: usize, ok: bool) {
        let mut g = self.inner.lock().unwrap();
        if ok {
            g.errors.remove(OVERLAY_OP);
        } else {
            g.reconcile_errors += 1;
        }
        g.peers = peers;
        g.last_ops = ops;
        g.reconcile_duration.observe(&BUCKETS, took.as_secs_f64());
    }

    /// Records an error of the overlay loop ([`OVERLAY_OP`]), shown in `/healthz` and as
    /// `twill_last_error_info` until the overlay next reconciles successfully.
    pub fn set_error(&self, e: &str) {
        self.set_op_error(OVERLAY_OP, e);
    }

    /// Records an error of operation `op` (a short fixed name, such as `renew lease`), shown in
    /// `/healthz` and as `twill_last_error_info{operation="<op>"}` until [`Metrics::clear_error`]
    /// says `op` succeeded.
    pub fn set_op_error(&self, op: &str, e: &str) {
        let mut g = self.inner.lock().unwrap();
        g.errors
            .insert(op.to_string(), (SystemTime::now(), e.to_string()));
        *g.error_counts.entry(op.to_string()).or_default() += 1;
    }

    /// Operation `op` succeeded: its error, if any, is no longer current.
    pub fn clear_error(&self, op: &str) {
        self.inner.lock().unwrap().errors.remove(op);
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
        g.reconcile_duration.render(
            &mut o,
            "twill_reconcile_duration_seconds",
            "Time to observe, plan and apply the overlay.",
            &BUCKETS,
        );
        if !g.errors.is_empty() {
            // Both families' samples from one pass over the current errors.
            let (mut info, mut stamps) = (String::new(), String::new());
            for (op, (t, e)) in &g.errors {
                let op = escape(op);
                let _ = writeln!(
                    info,
                    "twill_last_error_info{{operation=\"{op}\",error=\"{}\"}} 1",
                    escape(e)
                );
                let _ = writeln!(
                    stamps,
                    "twill_last_error_timestamp_seconds{{operation=\"{op}\"}} {}",
                    secs(*t)
                );
            }
            let _ = write!(
                o,
                "# HELP twill_last_error_info The last error of each operation that failed and has not succeeded since (errors without an operation are the overlay's, cleared by its next successful reconcile); no series when nothing is failing.\n# TYPE twill_last_error_info gauge\n{info}"
            );
            let _ = write!(
                o,
                "# HELP twill_last_error_timestamp_seconds When each current error of twill_last_error_info happened.\n# TYPE twill_last_error_timestamp_seconds gauge\n{stamps}"
            );
        }
        if !g.error_counts.is_empty() {
            let _ = writeln!(
                o,
                "# HELP twill_errors_total Errors met, by operation (cleared ones included).\n# TYPE twill_errors_total counter"
            );
            for (op, n) in &g.error_counts {
                let _ = writeln!(o, "twill_errors_total{{operation=\"{}\"}} {n}", escape(op));
            }
        }
        drop(g);
        if let Some((dev, f)) = &*self.counts.lock().unwrap()
            && let Some(c) = f()
        {
            for (name, what, rx, tx) in [
                (
                    "twill_vxlan_packets_total",
                    "Packets",
                    c.rx_packets,
                    c.tx_packets,
                ),
                ("twill_vxlan_bytes_total", "Bytes", c.rx_bytes, c.tx_bytes),
            ] {
                let _ = writeln!(
                    o,
                    "# HELP {name} {what} through the overlay device, counted by eBPF.\n# TYPE {name} counter"
                );
                for (direction, n) in [("rx", rx), ("tx", tx)] {
                    let _ = writeln!(
                        o,
                        "{name}{{device=\"{dev}\",direction=\"{direction}\"}} {n}"
                    );
                }
            }
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
                g.latest_error()
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

/// What one of the agent's listeners serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// `/healthz` only (`--healthz-ip`/`--healthz-port`, as flannel's health check).
    Health,
    /// `/metrics` and `/healthz` (`--metrics-addr`).
    MetricsAndHealth,
}

impl Endpoints {
    /// What the listener serves, for its log line.
    fn what(self) -> &'static str {
        match self {
            Endpoints::Health => "/healthz",
            Endpoints::MetricsAndHealth => "/metrics and /healthz",
        }
    }
}

/// The answer to `path` on a listener serving `endpoints`.
fn route(metrics: &Arc<Metrics>, endpoints: Endpoints, path: &str) -> Reply {
    match (path, endpoints) {
        ("/healthz", _) => {
            let (code, text) = metrics.health();
            Response::new(code, "text/plain", text).into()
        }
        // Streamed (see the module notes); renderers read kernel maps (syscalls, maybe many),
        // and the server runs the writer on a blocking thread.
        ("/metrics", Endpoints::MetricsAndHealth) => {
            let metrics = metrics.clone();
            Reply::Streamed {
                code: 200,
                content_type: "text/plain; version=0.0.4",
                write: Box::new(move |w| metrics.write_to(w)),
            }
        }
        _ => Response::new(404, "text/plain", "not found\n").into(),
    }
}

/// Serves `endpoints` on `listener` (bound at start-up with [`crate::shared::http::bind`]) until the
/// task is dropped.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    endpoints: Endpoints,
    metrics: Arc<Metrics>,
) {
    crate::shared::http::serve_replies_on(listener, endpoints.what(), move |path| {
        let reply = route(&metrics, endpoints, &path);
        async move { reply }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::testutil::assert_samples;

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
    fn histograms_render_as_gos_client_writes_them() {
        let bounds = [0.5, 1.0, 2.5];
        let mut h = Histogram::default();
        let mut o = String::new();
        h.render(&mut o, "x_seconds", "Time to x", &bounds);
        assert_eq!(
            o,
            "# HELP x_seconds Time to x\n# TYPE x_seconds histogram\nx_seconds_bucket{le=\"0.5\"} 0\nx_seconds_bucket{le=\"1\"} 0\nx_seconds_bucket{le=\"2.5\"} 0\nx_seconds_bucket{le=\"+Inf\"} 0\nx_seconds_sum 0\nx_seconds_count 0\n"
        );
        for v in [1.0, 2.0, 7.0] {
            h.observe(&bounds, v);
        }
        let mut o = String::new();
        h.render(&mut o, "x_seconds", "Time to x", &bounds);
        assert_eq!(
            o,
            "# HELP x_seconds Time to x\n# TYPE x_seconds histogram\nx_seconds_bucket{le=\"0.5\"} 0\nx_seconds_bucket{le=\"1\"} 1\nx_seconds_bucket{le=\"2.5\"} 2\nx_seconds_bucket{le=\"+Inf\"} 3\nx_seconds_sum 10\nx_seconds_count 3\n"
        );
        assert_eq!(h.count(), 3);
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
        assert_samples(
            &m.render(),
            &[
                "twill_peers 2",
                "twill_reconcile_duration_seconds_bucket{le=\"0.002\"} 0",
                "twill_reconcile_duration_seconds_bucket{le=\"0.005\"} 1",
                "twill_last_error_info{operation=\"overlay\",error=\"etcd get: \\\"down\\\"\"} 1",
                "twill_vxlan_packets_total{device=\"flannel.1\",direction=\"tx\"} 6",
            ],
        );
        m.set_udp_counts(Box::new(|| UdpCounts {
            peers: 2,
            tx_packets: 3,
            rx_bytes: 99,
            drops: vec![("malformed", 2), ("no_route", 0)],
            ..UdpCounts::default()
        }));
        assert_samples(
            &m.render(),
            &[
                "twill_udp_peers 2",
                "twill_udp_packets_total{direction=\"tx\"} 3",
                "twill_udp_bytes_total{direction=\"rx\"} 99",
                "twill_udp_drops_total{reason=\"malformed\"} 2",
                "twill_udp_drops_total{reason=\"no_route\"} 0",
            ],
        );
        assert_eq!(m.health().0, 503);
        m.set_ready();
        assert_eq!(m.health().0, 200);
    }

    /// The `twill_last_error_info` samples of a scrape.
    fn error_samples(m: &Metrics) -> Vec<String> {
        m.render()
            .lines()
            .filter(|l| l.starts_with("twill_last_error_info{"))
            .map(String::from)
            .collect()
    }

    #[test]
    fn an_error_is_exported_until_its_operation_succeeds() {
        let m = Metrics::default();
        m.observe_reconcile(Duration::from_millis(1), 1, 1, true);
        m.set_ready();
        // The overlay's error (no operation named) goes with its next successful reconcile.
        m.set_error("reconcile: add route 10.244.2.0/24: Invalid argument (os error 22)");
        assert_eq!(error_samples(&m).len(), 1, "{}", m.render());
        m.observe_reconcile(Duration::from_millis(1), 1, 0, false);
        assert_eq!(error_samples(&m).len(), 1);
        m.observe_reconcile(Duration::from_millis(1), 1, 1, true);
        assert!(error_samples(&m).is_empty(), "{}", m.render());
        assert!(!m.render().contains("twill_last_error_timestamp_seconds{"));
        // A named operation's error stays until that operation succeeds, whatever else does.
        m.set_op_error("renew lease", "etcd lease keep-alive: deadline exceeded");
        m.observe_reconcile(Duration::from_millis(1), 1, 0, true);
        assert_eq!(
            error_samples(&m),
            [
                "twill_last_error_info{operation=\"renew lease\",error=\"etcd lease keep-alive: deadline exceeded\"} 1"
            ]
        );
        // Its time, in a family of its own after the info one.
        let t = m.render();
        assert_samples(&t, &["# TYPE twill_last_error_timestamp_seconds gauge"]);
        let info = t.find("\ntwill_last_error_info{").unwrap();
        let stamp = t.find("\ntwill_last_error_timestamp_seconds{operation=\"renew lease\"} ");
        assert!(stamp.is_some_and(|stamp| stamp > info), "{t}");
        m.clear_error("renew lease");
        assert!(error_samples(&m).is_empty(), "{}", m.render());
        // The counter keeps the history.
        assert_samples(
            &m.render(),
            &[
                "twill_errors_total{operation=\"overlay\"} 1",
                "twill_errors_total{operation=\"renew lease\"} 1",
            ],
        );
    }

    #[test]
    fn healthz_names_the_latest_current_error() {
        let m = Metrics::default();
        assert_eq!(m.health(), (503, "not ready: starting\n".to_string()));
        m.set_op_error("connect to etcd", "etcd connect: refused");
        m.set_error("read network config: key not found");
        assert_eq!(
            m.health(),
            (
                503,
                "not ready: read network config: key not found\n".to_string()
            )
        );
        m.observe_reconcile(Duration::from_millis(1), 0, 0, true);
        assert_eq!(
            m.health(),
            (503, "not ready: etcd connect: refused\n".to_string())
        );
    }

    /// Code and body of a whole answer; the code of a streamed one.
    fn answer(r: Reply) -> (u16, String) {
        match r {
            Reply::Whole(r) => (r.code, r.body),
            Reply::Streamed { code, .. } => (code, "<streamed>".to_string()),
        }
    }

    #[test]
    fn the_healthz_listener_serves_healthz_only() {
        let m = Arc::new(Metrics::default());
        let on = |e, path| answer(route(&m, e, path));
        assert_eq!(on(Endpoints::Health, "/healthz").0, 503);
        assert_eq!(on(Endpoints::Health, "/metrics").0, 404);
        assert_eq!(on(Endpoints::Health, "/livez").0, 404);
        assert_eq!(
            on(Endpoints::MetricsAndHealth, "/metrics"),
            (200, "<streamed>".to_string())
        );
        m.set_ready();
        assert_eq!(on(Endpoints::Health, "/healthz"), (200, "ok\n".to_string()));
        assert_eq!(on(Endpoints::MetricsAndHealth, "/healthz").0, 200);
        assert_eq!(on(Endpoints::MetricsAndHealth, "/").0, 404);
    }

    /// One GET on loopback; the status line and the body.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    }

    #[tokio::test]
    async fn listeners_bound_first_serve_their_endpoints() {
        let m = Arc::new(Metrics::default());
        m.set_ready();
        let health = crate::shared::http::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let scrape = crate::shared::http::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let (h, s) = (health.local_addr().unwrap(), scrape.local_addr().unwrap());
        let tasks = [
            tokio::spawn(serve_on(health, Endpoints::Health, m.clone())),
            tokio::spawn(serve_on(scrape, Endpoints::MetricsAndHealth, m.clone())),
        ];
        assert_eq!(get(h, "/healthz").await.0, "HTTP/1.1 200 OK");
        assert_eq!(get(h, "/metrics").await.0, "HTTP/1.1 404 Not Found");
        let (status, body) = get(s, "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_samples(&body, &["twill_up 1"]);
        // A second bind of a bound address fails with the reason.
        let e = crate::shared::http::bind(h).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        for t in tasks {
            t.abort();
        }
    }
}
