//! A read-only view of a node's eBPF service dataplane, opened from its pinned maps: what
//! `twilld get services` shows next to the stored objects, and what `/metrics` exports
//! (per-service counters, map occupancy).
//!
//! Why a separate view instead of asking the [`super::EbpfLb`] that programs the maps:
//! - The maps are pinned, so they can be read by any process, with or without a running agent
//!   (`twilld get services` on a node whose agent is down still shows what the kernel does).
//! - A `/metrics` scrape reads through its own map handles and never takes the lock the
//!   service loop holds while it applies a plan, so a slow scrape (iterating a large conntrack
//!   map to count it) cannot delay a sync.
//! - Nothing here writes: opening pins loads no program and attaches nothing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use twill_common::service::{MAP_SVC, MAPS, SvcCount};

use super::{
    AyaMaps, EbpfLbError, LbMaps as _, MapUsage, ServiceState, entries, map_err, read_services,
};
use crate::services::lb::LbService;

/// One programmed frontend's identity and counters (no backends: cheap enough for every
/// scrape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCounters {
    /// The frontend as programmed (`backends` left empty).
    pub service: LbService,
    /// Backends in use.
    pub backends: u16,
    /// Its counters summed over CPUs.
    pub counts: SvcCount,
}

/// The pinned maps of one dataplane, opened read-only. See the module notes.
#[derive(Debug)]
pub struct EbpfLbView {
    pin_dir: PathBuf,
    maps: AyaMaps,
}

impl EbpfLbView {
    /// Whether `pin_dir` holds every map of a dataplane (an agent that is starting pins them
    /// one by one).
    pub fn exists(pin_dir: &Path) -> bool {
        MAPS.iter().all(|name| pin_dir.join(name).exists())
    }

    /// Opens the maps pinned in `pin_dir` (the agent's `--bpf-pin-dir` followed by `lb`).
    pub fn open(pin_dir: impl AsRef<Path>) -> Result<Self, EbpfLbError> {
        let pin_dir = pin_dir.as_ref().to_owned();
        let maps = AyaMaps::from_pins(&pin_dir)?;
        Ok(Self { pin_dir, maps })
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Every programmed service with its backends, Maglev table and counters.
    pub fn dump(&self) -> Result<Vec<ServiceState>, EbpfLbError> {
        let (services, _) = read_services(&self.maps)?;
        let counters = self.maps.counters(services.iter().map(|s| s.id))?;
        Ok(services
            .into_iter()
            .map(|service| ServiceState {
                counts: counters.get(&service.id).copied().unwrap_or_default(),
                service,
            })
            .collect())
    }

    /// Every programmed frontend with its counters, sorted by frontend; backends are not read.
    /// The map is read one entry at a time (a scrape holds no copy of it beside its result).
    pub fn service_counters(&self) -> Result<Vec<ServiceCounters>, EbpfLbError> {
        let mut out = Vec::new();
        for entry in &self.maps.svc {
            let (key, mut value) = entry.map_err(map_err("iterate", MAP_SVC, ""))?;
            let counts = self.maps.count_of(value.id)?;
            let revnat = self.maps.revnat(value.id)?;
            // Backends are not read here; count them as none so the name stays as written.
            let backends = std::mem::take(&mut value.backends);
            if let Some(service) = entries::reconstruct(&key, &value, revnat.as_ref(), Vec::new()) {
                out.push(ServiceCounters {
                    service,
                    backends,
                    counts,
                });
            }
        }
        out.sort_by_key(|c| c.service.frontend.key());
        Ok(out)
    }

    /// Fill level and kernel memory of every map.
    pub fn occupancy(&self) -> Result<Vec<MapUsage>, EbpfLbError> {
        let mut failed = None;
        let values = self.maps.svc.iter().map_while(|entry| match entry {
            Ok((_, value)) => Some(value),
            Err(e) => {
                failed = Some(e);
                None
            }
        });
        let usage = self.maps.occupancy(values);
        match failed {
            Some(e) => Err(map_err("iterate", MAP_SVC, "")(e)),
            None => Ok(usage),
        }
    }

    /// Prometheus text: per-frontend connection and packet counters, backends per frontend,
    /// and every map's entries, capacity and kernel memory. A read error becomes a
    /// `twill_services_ebpf_read_errors` sample (a scrape never fails half way silently).
    pub fn render_metrics(&self) -> String {
        let mut o = String::new();
        self.write_metrics(&mut o);
        o
    }

    /// [`Self::render_metrics`] written into `o` as it is made (a scrape streams it to the
    /// client instead of holding a body of megabytes).
    pub fn write_metrics(&self, o: &mut dyn std::fmt::Write) {
        let mut errors = Vec::new();
        match self.service_counters() {
            Ok(services) => render_services(o, &services),
            Err(e) => errors.push(super::error_chain(&e)),
        }
        match self.occupancy() {
            Ok(maps) => render_maps(o, &maps),
            Err(e) => errors.push(super::error_chain(&e)),
        }
        let _ = writeln!(
            o,
            "# HELP twill_services_ebpf_read_errors Errors reading the pinned maps in this scrape.\n\
             # TYPE twill_services_ebpf_read_errors gauge\n\
             twill_services_ebpf_read_errors {}",
            errors.len()
        );
        for e in &errors {
            tracing::warn!(error = %e, "read the eBPF service maps for /metrics");
        }
    }
}

/// A Prometheus label value, escaped as it is written.
struct Label<'a, T: std::fmt::Display>(&'a T);

impl<T: std::fmt::Display> std::fmt::Display for Label<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        struct Escape<'a, 'b>(&'a mut std::fmt::Formatter<'b>);
        impl std::fmt::Write for Escape<'_, '_> {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                if !s.contains(['\\', '"', '\n']) {
                    return self.0.write_str(s);
                }
                for c in s.chars() {
                    match c {
                        '\\' => self.0.write_str("\\\\")?,
                        '"' => self.0.write_str("\\\"")?,
                        '\n' => self.0.write_str("\\n")?,
                        c => self.0.write_char(c)?,
                    }
                }
                Ok(())
            }
        }
        write!(Escape(f), "{}", self.0)
    }
}

/// Writes the per-frontend series straight into `o`, one family at a time: with 10k
/// frontends that is 30k lines, so no line is built on its own and kept.
fn render_services(o: &mut dyn std::fmt::Write, services: &[ServiceCounters]) {
    type Value = fn(&ServiceCounters) -> u64;
    let families: [(&str, &str, &str, Value); 3] = [
        (
            "twill_service_backends",
            "Backends a frontend balances over in the dataplane.",
            "gauge",
            |s| u64::from(s.backends),
        ),
        (
            "twill_service_connections_total",
            "New connections (socket connect or first packet of a tc flow) to a frontend.",
            "counter",
            |s| s.counts.conns,
        ),
        (
            "twill_service_packets_total",
            "Packets (tc path) and datagrams (socket sendmsg) to a frontend.",
            "counter",
            |s| s.counts.packets,
        ),
    ];
    for (name, help, kind, value) in families {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in services {
            let _ = writeln!(
                o,
                "{name}{{service=\"{}\",frontend=\"{}\",kind=\"{}\"}} {}",
                Label(&s.service.name),
                Label(&s.service.frontend.key()),
                s.service.frontend.kind.as_str(),
                value(s)
            );
        }
    }
}

fn render_maps(o: &mut dyn std::fmt::Write, maps: &[MapUsage]) {
    let _ = writeln!(
        o,
        "# HELP twill_bpf_map_entries Entries in use in a service map.\n# TYPE twill_bpf_map_entries gauge"
    );
    for m in maps {
        if let Some(n) = m.entries {
            let _ = writeln!(o, "twill_bpf_map_entries{{map=\"{}\"}} {n}", m.name);
        }
    }
    let _ = writeln!(
        o,
        "# HELP twill_bpf_map_max_entries Capacity of a service map.\n# TYPE twill_bpf_map_max_entries gauge"
    );
    for m in maps {
        let _ = writeln!(
            o,
            "twill_bpf_map_max_entries{{map=\"{}\"}} {}",
            m.name, m.max_entries
        );
    }
    let _ = writeln!(
        o,
        "# HELP twill_bpf_map_memory_bytes Kernel memory charged to a service map.\n# TYPE twill_bpf_map_memory_bytes gauge"
    );
    for m in maps {
        if let Some(b) = m.memlock_bytes {
            let _ = writeln!(o, "twill_bpf_map_memory_bytes{{map=\"{}\"}} {b}", m.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::lb::{Frontend, FrontendKind, Proto};

    fn counters(name: &str, ip: &str, port: u16, conns: u64) -> ServiceCounters {
        ServiceCounters {
            service: LbService {
                id: 1,
                name: name.into(),
                frontend: Frontend {
                    ip: ip.parse().unwrap(),
                    port,
                    proto: Proto::Tcp,
                    kind: FrontendKind::ClusterIp,
                },
                backends: Vec::new(),
                affinity_timeout_secs: None,
                external_local: false,
                internal_local: false,
            },
            backends: 2,
            counts: SvcCount { conns, packets: 7 },
        }
    }

    #[test]
    fn service_series_are_labelled_by_name_and_frontend() {
        let mut o = String::new();
        render_services(
            &mut o,
            &[
                counters("shop/web:http", "10.96.0.10", 80, 3),
                counters("odd\"name", "fd00::10", 443, 0),
            ],
        );
        assert!(o.contains("# TYPE twill_service_connections_total counter"));
        assert!(o.contains(
            "twill_service_connections_total{service=\"shop/web:http\",frontend=\"10.96.0.10:80/TCP\",kind=\"ClusterIP\"} 3"
        ), "{o}");
        assert!(o.contains(
            "twill_service_packets_total{service=\"odd\\\"name\",frontend=\"[fd00::10]:443/TCP\",kind=\"ClusterIP\"} 7"
        ), "{o}");
        assert!(o.contains("twill_service_backends{service=\"shop/web:http\""));
    }

    #[test]
    fn maps_render_entries_capacity_and_memory() {
        let mut o = String::new();
        render_maps(
            &mut o,
            &[
                MapUsage {
                    name: "TWL_LB_SVC",
                    entries: Some(4),
                    max_entries: 65536,
                    memlock_bytes: Some(1024),
                },
                MapUsage {
                    name: "TWL_LB_COUNT",
                    entries: None,
                    max_entries: 65536,
                    memlock_bytes: None,
                },
            ],
        );
        assert!(o.contains("twill_bpf_map_entries{map=\"TWL_LB_SVC\"} 4"));
        assert!(!o.contains("twill_bpf_map_entries{map=\"TWL_LB_COUNT\"}"));
        assert!(o.contains("twill_bpf_map_max_entries{map=\"TWL_LB_COUNT\"} 65536"));
        assert!(o.contains("twill_bpf_map_memory_bytes{map=\"TWL_LB_SVC\"} 1024"));
    }
}
