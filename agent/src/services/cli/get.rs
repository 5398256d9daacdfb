//! `twilld get services` and `twilld get frontends`: what is stored, what this node wants, and
//! what its dataplane holds, as tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

use crate::services::dataplane::ebpf::EbpfLbView;
use crate::services::dataplane::iptables::IptLb;
use crate::services::dataplane::nft::NftLb;
use crate::services::desired::Desired;
use crate::services::lb::{FrontendKey, LbService};
use crate::services::model::{EndpointSlice, Object, Service, ServiceType};

pub(super) fn ports_column(s: &Service) -> String {
    let ports: Vec<String> = s
        .spec
        .ports
        .iter()
        .map(|p| match p.node_port() {
            Some(np) => format!("{}:{np}/{}", p.port(), p.proto()),
            None => format!("{}/{}", p.port(), p.proto()),
        })
        .collect();
    if ports.is_empty() {
        "<none>".into()
    } else {
        ports.join(",")
    }
}

/// One frontend as a node's dataplane holds it.
#[derive(Debug, Clone)]
pub struct ProgrammedFrontend {
    /// What is programmed (read back).
    pub service: LbService,
    /// Connections counted, where the dataplane counts them.
    pub conns: Option<u64>,
    /// Packets counted, where the dataplane counts them.
    pub packets: Option<u64>,
}

/// What a node's service dataplane holds, read back for `get services`.
#[derive(Debug, Clone)]
pub struct DataplaneReading {
    /// The proxy mode that programmed it (`ebpf`, `nftables`, `iptables`).
    pub mode: &'static str,
    /// Where it was read (`pinned maps in /sys/fs/bpf/twill/lb`).
    pub location: String,
    /// Programmed frontends.
    pub frontends: BTreeMap<FrontendKey, ProgrammedFrontend>,
}

impl DataplaneReading {
    /// How many of the `wanted` frontends this dataplane holds exactly as desired.
    fn count_in_sync<'a>(&self, wanted: impl IntoIterator<Item = &'a LbService>) -> usize {
        wanted
            .into_iter()
            .filter(|w| {
                self.frontends
                    .get(&w.frontend.key())
                    .is_some_and(|h| in_sync(w, &h.service))
            })
            .count()
    }
}

/// Reads the service dataplane of the node (network namespace) this runs on: the eBPF maps
/// pinned under `<bpf_pin_dir>/lb`, else the nftables table `inet twill`, else twill's iptables
/// chains. `None` when there is none.
pub fn read_dataplane(bpf_pin_dir: &Path) -> anyhow::Result<Option<DataplaneReading>> {
    let dir = bpf_pin_dir.join("lb");
    if !EbpfLbView::exists(&dir) {
        return read_netfilter();
    }
    let view = EbpfLbView::open(&dir)
        .with_context(|| format!("open the eBPF service maps in {}", dir.display()))?;
    let dump = view
        .dump()
        .with_context(|| format!("read the eBPF service maps in {}", dir.display()))?;
    Ok(Some(DataplaneReading {
        mode: "ebpf",
        location: format!("pinned maps in {}", dir.display()),
        frontends: dump
            .into_iter()
            .map(|st| {
                (
                    st.service.frontend.key(),
                    ProgrammedFrontend {
                        conns: Some(st.counts.conns),
                        packets: Some(st.counts.packets),
                        service: st.service,
                    },
                )
            })
            .collect(),
    }))
}

/// The nftables or iptables dataplane, read back (no counters: rules count nothing per
/// frontend).
pub(super) fn read_netfilter() -> anyhow::Result<Option<DataplaneReading>> {
    let programmed = |services: Vec<LbService>| {
        services
            .into_iter()
            .map(|service| {
                (
                    service.frontend.key(),
                    ProgrammedFrontend {
                        service,
                        conns: None,
                        packets: None,
                    },
                )
            })
            .collect()
    };
    if let Some(services) = NftLb::peek().context("read the nftables table inet twill")? {
        return Ok(Some(DataplaneReading {
            mode: "nftables",
            location: "table inet twill".into(),
            frontends: programmed(services),
        }));
    }
    if let Some((backend, services)) = IptLb::peek().context("read twill's iptables chains")? {
        return Ok(Some(DataplaneReading {
            mode: "iptables",
            location: format!("TWILL-* chains, iptables-{}", backend.as_str()),
            frontends: programmed(services),
        }));
    }
    Ok(None)
}

/// The frontends `desired` holds for the Service `ns/name`.
pub(super) fn frontends_of<'a>(d: &'a Desired, ns_name: &str) -> Vec<&'a LbService> {
    d.services
        .iter()
        .filter(|l| {
            l.name == ns_name
                || l.name
                    .strip_prefix(ns_name)
                    .is_some_and(|r| r.starts_with(':'))
        })
        .collect()
}

/// Whether the dataplane holds `want` with exactly its backends (addresses and ports).
pub(super) fn in_sync(want: &LbService, have: &LbService) -> bool {
    let set = |s: &LbService| {
        let mut v: Vec<_> = s.backends.iter().map(|b| (b.ip, b.port)).collect();
        v.sort_unstable();
        v
    };
    set(want) == set(have)
}

pub(super) fn backends_list(s: &LbService) -> String {
    if s.backends.is_empty() {
        return "<none>".into();
    }
    s.backends
        .iter()
        .map(|b| std::net::SocketAddr::new(b.ip, b.port).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Left-aligned columns separated by three spaces, under the `header` row.
pub(super) fn columns<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let header = header.map(String::from);
    let all = || std::iter::once(&header).chain(rows);
    let mut widths = [0usize; N];
    for r in all() {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    for r in all() {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}   ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `get services` table: one row per Service of `objects`, with the frontends this node
/// wants of it (`d`, computed from `objects`) and what the dataplane (`dp`, when one was found)
/// holds of them.
pub fn services_table(objects: &[Object], d: &Desired, dp: Option<&DataplaneReading>) -> String {
    let mut rows = Vec::new();
    // The table shows the objects as written: index them here (the snapshot keeps only what
    // the dataplane needs).
    let mut services: BTreeMap<(String, String), &Service> = BTreeMap::new();
    let mut slices: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for o in objects {
        match o {
            Object::Service(s) => {
                services.insert(s.key(), s);
            }
            Object::EndpointSlice(e) => {
                if let Some(svc) = e.service() {
                    slices.entry(svc).or_default().push(e);
                }
            }
        }
    }
    for (key, s) in services {
        let ty = if s.is_headless() {
            "ClusterIP(headless)".to_string()
        } else {
            format!("{:?}", s.type_())
        };
        let cip = if s.is_headless() {
            "None".to_string()
        } else if s.type_() == ServiceType::ExternalName {
            s.spec.external_name.clone().unwrap_or_default()
        } else {
            s.cluster_ips()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut ext: Vec<String> = s.external_ips().iter().map(ToString::to_string).collect();
        ext.extend(s.lb_ingress_ips().iter().map(ToString::to_string));
        let (mut ready, mut total) = (0, 0);
        for slice in slices.get(&key).into_iter().flatten() {
            for e in &slice.endpoints {
                total += 1;
                if e.ready() {
                    ready += 1;
                }
            }
        }
        let prefix = format!("{}/{}", key.0, key.1);
        let frontends = frontends_of(d, &prefix);
        let (programmed, conns) = match dp {
            Some(dp) => {
                let have: Vec<&ProgrammedFrontend> = frontends
                    .iter()
                    .filter_map(|f| dp.frontends.get(&f.frontend.key()))
                    .collect();
                let synced = dp.count_in_sync(frontends.iter().copied());
                let conns: Option<u64> = have.iter().map(|p| p.conns).sum();
                (
                    format!("{synced}/{}", frontends.len()),
                    conns.map_or_else(|| "-".into(), |c| c.to_string()),
                )
            }
            None => ("-".into(), "-".into()),
        };
        rows.push([
            prefix,
            ty,
            if cip.is_empty() { "<none>".into() } else { cip },
            if ext.is_empty() {
                "<none>".into()
            } else {
                ext.join(",")
            },
            ports_column(s),
            format!("{ready}/{total}"),
            frontends.len().to_string(),
            programmed,
            conns,
        ]);
    }
    let header = [
        "NAMESPACE/NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "ENDPOINTS",
        "FRONTENDS",
        "PROGRAMMED",
        "CONNS",
    ];
    let mut out = columns(header, &rows);
    for c in &d.conflicts {
        let _ = writeln!(out, "conflict: {c}");
    }
    out.push_str(&dataplane_footer(d, dp));
    out
}

/// `-o wide`: one row per frontend (desired `d`, then programmed-only), with its backends and
/// what the dataplane holds.
pub fn frontends_table(d: &Desired, dp: Option<&DataplaneReading>) -> String {
    let mut rows = Vec::new();
    let count = |v: Option<u64>| v.map_or_else(|| "-".into(), |c| c.to_string());
    for want in &d.services {
        let have = dp.and_then(|dp| dp.frontends.get(&want.frontend.key()));
        let state = match (dp, have) {
            (None, _) => "-".to_string(),
            (Some(_), None) => "missing".into(),
            (Some(_), Some(h)) if in_sync(want, &h.service) => "in sync".into(),
            (Some(_), Some(h)) => format!("differs: {}", backends_list(&h.service)),
        };
        rows.push([
            want.frontend.key().to_string(),
            want.frontend.kind.as_str().into(),
            want.name.clone(),
            backends_list(want),
            state,
            count(have.and_then(|h| h.conns)),
            count(have.and_then(|h| h.packets)),
        ]);
    }
    if let Some(dp) = dp {
        let wanted: std::collections::BTreeSet<FrontendKey> =
            d.services.iter().map(|s| s.frontend.key()).collect();
        for (key, have) in &dp.frontends {
            if wanted.contains(key) {
                continue;
            }
            rows.push([
                key.to_string(),
                have.service.frontend.kind.as_str().into(),
                have.service.name.clone(),
                "<not desired>".into(),
                format!("stale: {}", backends_list(&have.service)),
                count(have.conns),
                count(have.packets),
            ]);
        }
    }
    for r in &d.refused {
        rows.push([
            r.frontend.key().to_string(),
            r.frontend.kind.as_str().into(),
            r.service.clone(),
            "<refused>".into(),
            format!("refused: {}", r.reason.as_str()),
            "-".into(),
            "-".into(),
        ]);
    }
    let header = [
        "FRONTEND",
        "KIND",
        "SERVICE",
        "BACKENDS",
        "DATAPLANE",
        "CONNS",
        "PACKETS",
    ];
    let mut out = columns(header, &rows);
    out.push_str(&dataplane_footer(d, dp));
    out
}

pub(super) fn dataplane_footer(d: &Desired, dp: Option<&DataplaneReading>) -> String {
    match dp {
        None => {
            "(from etcd; no service dataplane found on this node: PROGRAMMED and CONNS unknown)\n"
                .to_string()
        }
        Some(dp) => {
            let synced = dp.count_in_sync(&d.services);
            let stale = dp
                .frontends
                .keys()
                .filter(|k| !d.services.iter().any(|w| w.frontend.key() == **k))
                .count();
            format!(
                "(desired from etcd; dataplane: {} ({}): {synced}/{} frontends in sync, {stale} not desired)\n",
                dp.mode,
                dp.location,
                d.services.len()
            )
        }
    }
}
