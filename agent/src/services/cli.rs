//! `twilld apply -f`, `twilld delete -f`, `twilld get services`: the standalone source's
//! command line, as a library so it is tested without a binary.
//!
//! Why this shape:
//! - Apply is all-or-nothing: every file is read and every document parsed and validated first;
//!   the result is checked against what etcd already holds (a node port, external IP or
//!   cluster IP:port that another Service owns is refused); then everything is written in one
//!   etcd transaction. A bad document means nothing is written, and the error names the file,
//!   the document (kind, namespace/name or its number) and the field.
//! - The etcd flags are the agent's (`--etcd-endpoints`, `--etcd-prefix`, `--etcd-cafile`,
//!   `--etcd-certfile`, `--etcd-keyfile`) with the same defaults, so one prefix serves both.
//! - `get services` reads etcd for what should be, and the node's dataplane for what is: the
//!   FRONTENDS column is what the agent programs on a node (computed by the same pure function
//!   it uses), PROGRAMMED how many of those the dataplane holds with exactly the desired
//!   backends, CONNS the connections it counted (eBPF only). The dataplane is read directly (the
//!   pinned eBPF maps, else the nftables table or the iptables chains of the namespace `get`
//!   runs in), not through the agent, so a node whose agent is down still shows what its kernel
//!   does; `-o wide` lists every frontend with its backends.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;

use crate::ebpf::service::EbpfLbView;
use crate::services::desired::{Desired, NodeIdentity, Snapshot, desired};
use crate::services::iptables::IptLb;
use crate::services::lb::{FrontendKey, LbService};
use crate::services::model::{
    EndpointSlice, Kind, Object, ObjectKey, Service, ServiceType, parse_manifest,
};
use crate::services::nft::NftLb;
use crate::services::source::{EtcdServiceStore, ServiceStore};
use crate::store::EtcdArgs;

/// Connects to the etcd the flags name.
async fn connect(etcd: &EtcdArgs) -> anyhow::Result<EtcdServiceStore> {
    EtcdServiceStore::connect(&etcd.etcd_endpoints, &etcd.etcd_prefix, &etcd.tls())
        .await
        .context("connect to etcd")
}

/// The service subcommands of `twilld`.
#[derive(Debug, Clone, Subcommand)]
pub enum ServiceCmd {
    /// Create or replace Services and EndpointSlices from YAML/JSON manifests (all or nothing).
    Apply {
        /// Manifest file (`-` for stdin); repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// etcd flags.
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete the objects named in manifests (all in one transaction).
    Delete {
        /// Manifest file (`-` for stdin); repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// etcd flags.
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Show stored objects.
    Get {
        /// What to show.
        #[arg(value_parser = ["services", "service", "svc"])]
        what: String,
        /// The node name to compute node-local endpoints for (FRONTENDS column).
        #[arg(long, default_value = "")]
        node_name: String,
        /// The node's subnet file: endpoints in its pod subnet are node-local too, as the agent
        /// counts them (ignored when absent).
        #[arg(long, default_value = twill_facts::DEFAULT_SUBNET_FILE)]
        subnet_file: PathBuf,
        /// The agent's pin directory: its eBPF service maps (`<dir>/lb`) are read to show what
        /// the dataplane holds.
        #[arg(long, default_value = "/sys/fs/bpf/twill")]
        bpf_pin_dir: PathBuf,
        /// `wide`: one line per frontend, with its backends and what the dataplane holds.
        #[arg(short = 'o', long = "output", value_parser = ["wide"])]
        output: Option<String>,
        /// etcd flags.
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

/// Reads and validates every file; all or nothing. Errors name the file, document and field.
pub fn load_manifests(files: &[PathBuf]) -> anyhow::Result<Vec<Object>> {
    let mut out: Vec<Object> = Vec::new();
    let mut seen: BTreeMap<ObjectKey, String> = BTreeMap::new();
    for f in files {
        let (name, text) = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("read manifest from stdin")?;
            ("<stdin>".to_string(), s)
        } else {
            let s = std::fs::read_to_string(f)
                .with_context(|| format!("read manifest {}", f.display()))?;
            (f.display().to_string(), s)
        };
        let objs = parse_manifest(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        for o in objs {
            if let Some(first) = seen.insert(o.key(), name.clone()) {
                bail!("{name}: {} is also defined in {first}", o.key());
            }
            out.push(o);
        }
    }
    if out.is_empty() {
        bail!(
            "no objects in {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(out)
}

/// Checks that `new` objects, merged over `existing`, claim no frontend twice; names the Service
/// refused and who has the frontend.
pub fn check_conflicts(existing: &[Object], new: &[Object]) -> anyhow::Result<()> {
    let mut merged: BTreeMap<ObjectKey, Object> =
        existing.iter().map(|o| (o.key(), o.clone())).collect();
    for o in new {
        merged.insert(o.key(), o.clone());
    }
    let snap = Snapshot::from_objects(merged.into_values());
    let d = desired(&snap, &NodeIdentity::default());
    let ours: Vec<String> = new
        .iter()
        .filter(|o| o.key().kind == Kind::Service)
        .map(|o| format!("{}/{}", o.key().namespace, o.key().name))
        .collect();
    let involves = |n: &str| {
        ours.iter().any(|o| {
            n == o
                || n.strip_prefix(o.as_str())
                    .is_some_and(|r| r.starts_with(':'))
        })
    };
    let mut msgs = Vec::new();
    for c in &d.conflicts {
        if involves(&c.kept) || involves(&c.refused) {
            let (a, b) = if involves(&c.refused) {
                (&c.refused, &c.kept)
            } else {
                (&c.kept, &c.refused)
            };
            msgs.push(format!(
                "Service {a}: frontend {} is also claimed by {b}",
                c.frontend
            ));
        }
    }
    if !msgs.is_empty() {
        bail!("{}", msgs.join("; "));
    }
    Ok(())
}

/// `apply`: validates everything, checks conflicts, writes in one transaction. Returns the
/// report lines (`Service default/web created|configured|unchanged`).
pub async fn apply<S: ServiceStore>(store: &S, objects: &[Object]) -> anyhow::Result<Vec<String>> {
    let listing = store.list().await.context("list stored services")?;
    check_conflicts(&listing.objects, objects)
        .context("refusing the whole apply; nothing was written")?;
    let existing: BTreeMap<ObjectKey, &Object> =
        listing.objects.iter().map(|o| (o.key(), o)).collect();
    let mut report = Vec::new();
    let mut changed = Vec::new();
    for o in objects {
        let verb = match existing.get(&o.key()) {
            None => "created",
            Some(old) if *old == o => "unchanged",
            Some(_) => "configured",
        };
        if verb != "unchanged" {
            changed.push(o.clone());
        }
        report.push(format!("{} {verb}", o.key()));
    }
    if !changed.is_empty() {
        store
            .put_all(&changed)
            .await
            .context("write objects (one transaction; nothing was written)")?;
    }
    Ok(report)
}

/// `delete`: deletes every object named, in one transaction.
pub async fn delete<S: ServiceStore>(store: &S, objects: &[Object]) -> anyhow::Result<Vec<String>> {
    let keys: Vec<ObjectKey> = objects.iter().map(Object::key).collect();
    let existed = store.delete_all(&keys).await.context("delete objects")?;
    Ok(keys
        .iter()
        .zip(existed)
        .map(|(k, e)| format!("{k} {}", if e { "deleted" } else { "not found" }))
        .collect())
}

fn ports_column(s: &Service) -> String {
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
fn read_netfilter() -> anyhow::Result<Option<DataplaneReading>> {
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
fn frontends_of<'a>(d: &'a Desired, ns_name: &str) -> Vec<&'a LbService> {
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
fn in_sync(want: &LbService, have: &LbService) -> bool {
    let set = |s: &LbService| {
        let mut v: Vec<_> = s.backends.iter().map(|b| (b.ip, b.port)).collect();
        v.sort_unstable();
        v
    };
    set(want) == set(have)
}

fn backends_list(s: &LbService) -> String {
    if s.backends.is_empty() {
        return "<none>".into();
    }
    s.backends
        .iter()
        .map(|b| std::net::SocketAddr::new(b.ip, b.port).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Left-aligned columns separated by three spaces.
fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    for r in rows {
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

/// The `get services` table: one row per Service, with what the dataplane (`dp`, when one was
/// found) holds of it.
pub fn services_table(
    objects: &[Object],
    node: &NodeIdentity,
    dp: Option<&DataplaneReading>,
) -> String {
    let snap = Snapshot::from_objects(objects.iter().cloned());
    let d = desired(&snap, node);
    let mut rows = vec![[
        "NAMESPACE/NAME".to_string(),
        "TYPE".into(),
        "CLUSTER-IP".into(),
        "EXTERNAL-IP".into(),
        "PORT(S)".into(),
        "ENDPOINTS".into(),
        "FRONTENDS".into(),
        "PROGRAMMED".into(),
        "CONNS".into(),
    ]];
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
        let frontends = frontends_of(&d, &prefix);
        let (programmed, conns) = match dp {
            Some(dp) => {
                let have: Vec<&ProgrammedFrontend> = frontends
                    .iter()
                    .filter_map(|f| dp.frontends.get(&f.frontend.key()))
                    .collect();
                let synced = frontends
                    .iter()
                    .filter(|f| {
                        dp.frontends
                            .get(&f.frontend.key())
                            .is_some_and(|p| in_sync(f, &p.service))
                    })
                    .count();
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
    let mut out = columns(&rows);
    for c in &d.conflicts {
        let _ = writeln!(out, "conflict: {c}");
    }
    out.push_str(&dataplane_footer(&d, dp));
    out
}

/// `-o wide`: one row per frontend (desired, then programmed-only), with its backends and what
/// the dataplane holds.
pub fn frontends_table(
    objects: &[Object],
    node: &NodeIdentity,
    dp: Option<&DataplaneReading>,
) -> String {
    let snap = Snapshot::from_objects(objects.iter().cloned());
    let d = desired(&snap, node);
    let mut rows = vec![[
        "FRONTEND".to_string(),
        "KIND".into(),
        "SERVICE".into(),
        "BACKENDS".into(),
        "DATAPLANE".into(),
        "CONNS".into(),
        "PACKETS".into(),
    ]];
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
    let mut out = columns(&rows);
    out.push_str(&dataplane_footer(&d, dp));
    out
}

fn dataplane_footer(d: &Desired, dp: Option<&DataplaneReading>) -> String {
    match dp {
        None => {
            "(from etcd; no service dataplane found on this node: PROGRAMMED and CONNS unknown)\n"
                .to_string()
        }
        Some(dp) => {
            let synced = d
                .services
                .iter()
                .filter(|w| {
                    dp.frontends
                        .get(&w.frontend.key())
                        .is_some_and(|h| in_sync(w, &h.service))
                })
                .count();
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

/// Runs a subcommand, printing its report to stdout.
pub async fn run(cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Apply { files, etcd } => {
            let objects = load_manifests(&files)?;
            let store = connect(&etcd).await?;
            for line in apply(&store, &objects).await? {
                println!("{line}");
            }
        }
        ServiceCmd::Delete { files, etcd } => {
            let objects = load_manifests(&files)?;
            let store = connect(&etcd).await?;
            for line in delete(&store, &objects).await? {
                println!("{line}");
            }
        }
        ServiceCmd::Get {
            what: _,
            node_name,
            subnet_file,
            bpf_pin_dir,
            output,
            etcd,
        } => {
            let store = connect(&etcd).await?;
            let listing = store.list().await.context("list stored services")?;
            let dp = read_dataplane(&bpf_pin_dir)?;
            let node = NodeIdentity {
                name: node_name,
                addresses: Vec::new(),
                pod_subnets: twill_facts::SubnetFacts::read(&subnet_file)
                    .map(|f| {
                        let v4 = f.subnet_v4().map(ipnet::IpNet::V4);
                        v4.into_iter()
                            .chain(f.subnet_v6().map(ipnet::IpNet::V6))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            let table = if output.as_deref() == Some("wide") {
                frontends_table(&listing.objects, &node, dp.as_ref())
            } else {
                services_table(&listing.objects, &node, dp.as_ref())
            };
            print!("{table}");
            for (key, e) in &listing.invalid {
                println!("invalid (ignored by the agent): {key}: {e}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::source::MemServiceStore;

    const WEB: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.10]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.5]}
- {addresses: [10.244.2.5], conditions: {ready: false}}
ports: [{name: http, port: 8080}]
";

    fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("twill-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn apply_is_all_or_nothing_and_reports() {
        let dir = tmpdir("apply");
        let good = write(&dir, "good.yaml", WEB);
        let bad = write(
            &dir,
            "bad.yaml",
            &WEB.replace("web, namespace: shop}", "api}")
                .replace("port: 80,", "port: 70000,")
                .replace("web-1", "api-1"),
        );
        let store = MemServiceStore::new();
        let e = load_manifests(&[good.clone(), bad.clone()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: document 1 (Service default/api): spec.ports[0].port: 70000 is not a valid port (1-65535)",
                bad.display()
            )
        );
        assert!(store.objects().is_empty());
        let objs = load_manifests(std::slice::from_ref(&good)).unwrap();
        assert_eq!(
            apply(&store, &objs).await.unwrap(),
            vec![
                "Service shop/web created",
                "EndpointSlice shop/web-1 created"
            ]
        );
        assert_eq!(
            apply(&store, &objs).await.unwrap(),
            vec![
                "Service shop/web unchanged",
                "EndpointSlice shop/web-1 unchanged"
            ]
        );
        let objs2 = load_manifests(&[write(
            &dir,
            "v2.yaml",
            &WEB.replace("10.244.1.5", "10.244.1.6"),
        )])
        .unwrap();
        assert_eq!(
            apply(&store, &objs2).await.unwrap(),
            vec![
                "Service shop/web unchanged",
                "EndpointSlice shop/web-1 configured"
            ]
        );
        // Same file twice: refused.
        let e = load_manifests(&[good.clone(), good.clone()]).unwrap_err();
        assert!(
            e.to_string()
                .contains("Service shop/web is also defined in"),
            "{e}"
        );
        // A second service taking web's node port: refused whole, nothing written.
        let clash = WEB
            .replace("name: web, namespace: shop", "name: other, namespace: shop")
            .replace("10.96.0.10", "10.96.0.99")
            .replace("externalIPs: [192.0.2.10]", "externalIPs: []")
            .replace("web-1", "other-1")
            .replace("service-name: web", "service-name: other");
        let objs3 = load_manifests(&[write(&dir, "clash.yaml", &clash)]).unwrap();
        let e = apply(&store, &objs3).await.unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "refusing the whole apply; nothing was written: \
             Service shop/other:dns: frontend 0.0.0.0:30053/UDP is also claimed by shop/web:dns; \
             Service shop/other:http: frontend 0.0.0.0:30080/TCP is also claimed by shop/web:http"
        );
        assert_eq!(store.objects().len(), 2);
        // Delete.
        assert_eq!(
            delete(&store, &objs).await.unwrap(),
            vec![
                "Service shop/web deleted",
                "EndpointSlice shop/web-1 deleted"
            ]
        );
        assert_eq!(
            delete(&store, &objs).await.unwrap()[0],
            "Service shop/web not found"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn table() {
        let objs = parse_manifest(WEB).unwrap();
        let node = NodeIdentity::default();
        let t = services_table(&objs, &node, None);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "NAMESPACE/NAME   TYPE       CLUSTER-IP   EXTERNAL-IP   PORT(S)                     ENDPOINTS   FRONTENDS   PROGRAMMED   CONNS"
        );
        assert_eq!(
            lines[1],
            "shop/web         NodePort   10.96.0.10   192.0.2.10    80:30080/TCP,53:30053/UDP   1/2         6           -            -"
        );
        assert!(lines[2].contains("no service dataplane found"), "{t}");

        // A dataplane holding two frontends: one as desired, one with a stale backend, plus a
        // frontend nobody wants any more.
        let d = desired(&Snapshot::from_objects(objs.clone()), &node);
        let mut frontends = BTreeMap::new();
        let pick = |f: &str| {
            d.services
                .iter()
                .find(|s| s.frontend.key().to_string() == f)
                .unwrap()
                .clone()
        };
        let mut good = pick("10.96.0.10:80/TCP");
        good.id = 77;
        let mut off = pick("0.0.0.0:30080/TCP");
        off.backends[0].ip = "10.244.9.9".parse().unwrap();
        let mut gone = pick("10.96.0.10:80/TCP");
        gone.frontend.ip = "10.96.0.99".parse().unwrap();
        gone.name = "shop/old:http".into();
        for (svc, conns) in [(good, 5), (off, 2), (gone, 1)] {
            frontends.insert(
                svc.frontend.key(),
                ProgrammedFrontend {
                    service: svc,
                    conns: Some(conns),
                    packets: Some(conns * 10),
                },
            );
        }
        let dp = DataplaneReading {
            mode: "ebpf",
            location: "pinned maps in /x".into(),
            frontends,
        };
        let t = services_table(&objs, &node, Some(&dp));
        let row = t.lines().nth(1).unwrap();
        assert!(row.ends_with("6           1/6          7"), "{t}");
        assert!(
            t.contains("dataplane: ebpf (pinned maps in /x): 1/6 frontends in sync, 1 not desired"),
            "{t}"
        );
        let w = frontends_table(&objs, &node, Some(&dp));
        assert!(w.contains("in sync"), "{w}");
        assert!(w.contains("differs: 10.244.9.9:"), "{w}");
        assert!(w.contains("missing"), "{w}");
        assert!(
            w.contains("10.96.0.99:80/TCP") && w.contains("stale: 10.244.1.5:8080"),
            "{w}"
        );
    }
}
