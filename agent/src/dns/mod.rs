//! twill's DNS: Service names answered on every node, by twilld itself, from memory.
//!
//! - [`zone`]: the pure zone, built from the Services and EndpointSlices the model accepted,
//!   with the names Kubernetes' DNS specification gives them (so CoreDNS could replace this
//!   server later without a client noticing).
//! - [`feed`]: the zone follows the service source live; a rebuilt zone is swapped in whole.
//! - [`answer`]: one query in, one reply out (hickory-proto's wire format), no sockets.
//! - [`server`]: UDP and TCP on the `--dns-listen` addresses; other names forwarded to the
//!   upstreams (`--dns-upstream`, else the host's resolv.conf, never the server itself).
//! - [`config`]: the flags, checked.
//!
//! The server is off unless `--dns-listen` is given. The address to give is one pods reach
//! without leaving the node: the pod bridge's gateway (the first address of the node's pod
//! subnet, e.g. `10.244.1.1`), which pods then name in their resolv.conf.

pub mod answer;
pub mod config;
pub mod feed;
pub mod server;
pub mod zone;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use self::answer::Outcome;
pub use self::config::{DnsConfig, DnsConfigError};
pub use self::server::{BindError, Sockets};
pub use self::zone::{Zone, ZoneBuilder};

use crate::services::source::SourceUpdate;
use crate::shared::metrics::Metrics;

/// The DNS server's counters, appended to `/metrics`.
#[derive(Debug, Default)]
pub struct DnsMetrics {
    queries: [AtomicU64; 4],
    names: AtomicU64,
    rebuilds: AtomicU64,
}

impl DnsMetrics {
    /// Counts a query by its outcome.
    pub fn count(&self, o: Outcome) {
        self.queries[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Queries so far with outcome `o`.
    pub fn queries(&self, o: Outcome) -> u64 {
        self.queries[o as usize].load(Ordering::Relaxed)
    }

    /// Records a zone just published.
    pub fn zone(&self, z: &Zone) {
        self.names.store(z.len() as u64, Ordering::Relaxed);
        self.rebuilds.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the metrics as Prometheus text.
    pub fn write(&self, o: &mut dyn std::fmt::Write) {
        let _ = writeln!(
            o,
            "# HELP twill_dns_queries_total DNS queries served, by result (answered: from the zone; nxdomain: no such name in the cluster domain; forwarded: answered by an upstream; failed: malformed, unsupported, or no upstream answered).\n# TYPE twill_dns_queries_total counter"
        );
        for outcome in Outcome::ALL {
            let _ = writeln!(
                o,
                "twill_dns_queries_total{{result=\"{}\"}} {}",
                outcome.as_str(),
                self.queries(outcome)
            );
        }
        let _ = writeln!(
            o,
            "# HELP twill_dns_zone_names Names in the cluster zone.\n# TYPE twill_dns_zone_names gauge\ntwill_dns_zone_names {}",
            self.names.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP twill_dns_zone_rebuilds_total Zones built from the service source.\n# TYPE twill_dns_zone_rebuilds_total counter\ntwill_dns_zone_rebuilds_total {}",
            self.rebuilds.load(Ordering::Relaxed)
        );
    }
}

/// Starts the DNS server: binds its sockets (an error names the address), then serves, with
/// the zone following the service source that `source` runs (given the sender of the feed's
/// channel; as the service loop's sources, it never needs to stop). Returns the server's task;
/// aborting it stops everything. Call it inside the tokio runtime.
pub fn start<F, Fut>(
    config: DnsConfig,
    source: F,
    metrics: &Arc<Metrics>,
) -> Result<JoinHandle<()>, BindError>
where
    F: FnOnce(mpsc::Sender<SourceUpdate>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let sockets = Sockets::bind(&config.listen)?;
    let dns_metrics = Arc::new(DnsMetrics::default());
    metrics.add_writer(Box::new({
        let m = dns_metrics.clone();
        move |o| m.write(o)
    }));
    tracing::info!(
        listen = ?config.listen,
        domain = %config.domain,
        upstreams = ?config.upstreams,
        "dns server listening"
    );
    let zone = Arc::new(ArcSwap::from_pointee(
        ZoneBuilder::new(&config.domain).build(),
    ));
    let (tx, rx) = mpsc::channel(64);
    let source = tokio::spawn(source(tx));
    let follow = tokio::spawn(feed::follow(rx, config.domain.clone(), zone.clone(), {
        let m = dns_metrics.clone();
        move |z: &Zone| m.zone(z)
    }));
    Ok(tokio::spawn(async move {
        struct AbortAll(Vec<tokio::task::AbortHandle>);
        impl Drop for AbortAll {
            fn drop(&mut self) {
                for t in &self.0 {
                    t.abort();
                }
            }
        }
        let _tasks = AbortAll(vec![source.abort_handle(), follow.abort_handle()]);
        server::serve(sockets, zone, config, dns_metrics).await;
    }))
}
