//! Golden tests of the map writes, without root: each case in `golden/` is a sequence of
//! manifests (`<case>.1.yaml`, `<case>.2.yaml`, ...: Services and EndpointSlices as
//! `twilld apply` reads them) taken through the real parse → desired → lb plan →
//! [`apply_services`] path onto [`FakeLbMaps`]; `<case>.txt` holds, per step, every map write
//! in order, then the maps after the last step (a Maglev table summarised by the count of
//! entries per slot and a hash). `TWILL_BLESS=1 cargo test -p twill-agent --lib golden`
//! rewrites the `.txt` files; review their diff.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use twill_common::service::{
    BE_F_NODE_LOCAL, BE_F_TERMINATING, BackendValue, DEFAULT_MAX_SERVICES, KIND_CLUSTER_IP,
    KIND_EXTERNAL_IP, KIND_LOAD_BALANCER, KIND_NODE_PORT, MAGLEV_M, MaglevTable, RevNatValue,
    SVC_F_AFFINITY, SVC_F_EXTERNAL_LOCAL, SVC_F_INTERNAL_LOCAL, SvcValue,
};

use super::{
    FakeLbMaps, MapWrite, Mirror, SvcKeyText, apply_services, read_services, remove_orphans,
};
use crate::services::desired::{self, IdAllocator, NodeIdentity, Snapshot};
use crate::services::lb;
use crate::services::model::parse_manifest;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/services/dataplane/ebpf/golden")
}

/// The node the cases run on: `node-a`, address 192.168.1.10, pod subnet 10.244.1.0/24.
fn node() -> NodeIdentity {
    NodeIdentity {
        name: "node-a".into(),
        addresses: vec!["192.168.1.10".parse().unwrap()],
        pod_subnets: vec!["10.244.1.0/24".parse().unwrap()],
        ..NodeIdentity::default()
    }
}

fn flags(bits: u16, names: &[(u16, &str)]) -> String {
    let set: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if set.is_empty() {
        "-".into()
    } else {
        set.join(",")
    }
}

fn svc_text(v: &SvcValue) -> String {
    let f = flags(
        v.flags,
        &[
            (SVC_F_AFFINITY, "affinity"),
            (SVC_F_EXTERNAL_LOCAL, "external-local"),
            (SVC_F_INTERNAL_LOCAL, "internal-local"),
        ],
    );
    format!(
        "id={} backends={} slots={} flags={f} affinity_timeout={}",
        v.id, v.backends, v.slots, v.affinity_timeout_secs
    )
}

fn backend_text(v: &BackendValue) -> String {
    let f = flags(
        u16::from(v.flags),
        &[
            (u16::from(BE_F_NODE_LOCAL), "node-local"),
            (u16::from(BE_F_TERMINATING), "terminating"),
        ],
    );
    let addr = v.ip().map_or_else(|| "?".into(), |ip| ip.to_string());
    format!("{addr}:{} flags={f}", v.port())
}

/// Entries per slot and an FNV-1a hash of the whole table.
fn maglev_text(t: &MaglevTable) -> String {
    let mut per_slot = std::collections::BTreeMap::<u16, usize>::new();
    let mut hash: u32 = 0x811c_9dc5;
    for slot in &t.slots {
        *per_slot.entry(*slot).or_default() += 1;
        for byte in slot.to_le_bytes() {
            hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
        }
    }
    let counts: Vec<String> = per_slot
        .iter()
        .map(|(slot, n)| format!("slot{slot}={n}"))
        .collect();
    format!("m={MAGLEV_M} fnv={hash:08x} {}", counts.join(" "))
}

fn revnat_text(v: &RevNatValue) -> String {
    let kind = match v.kind {
        KIND_CLUSTER_IP => "ClusterIP",
        KIND_NODE_PORT => "NodePort",
        KIND_EXTERNAL_IP => "ExternalIP",
        KIND_LOAD_BALANCER => "LoadBalancer",
        _ => "?",
    };
    format!("{} kind={kind} name={}", SvcKeyText(&v.frontend), v.name())
}

fn write_text(w: &MapWrite) -> String {
    let head = format!("{} {} {}", w.operation(), w.map(), w.key());
    match w {
        MapWrite::Backend { value, .. } => format!("{head} -> {}", backend_text(value)),
        MapWrite::Maglev { table, .. } => format!("{head} -> {}", maglev_text(table)),
        MapWrite::RevNat { value, .. } => format!("{head} -> {}", revnat_text(value)),
        MapWrite::Service { value, .. } => format!("{head} -> {}", svc_text(value)),
        MapWrite::ResetCounts { .. } => format!("{head} -> zero"),
        MapWrite::DeleteBackend(_)
        | MapWrite::DeleteMaglev(_)
        | MapWrite::DeleteRevNat(_)
        | MapWrite::DeleteService(_) => head,
    }
}

fn maps_text(maps: &FakeLbMaps, out: &mut String) {
    for (key, value) in &maps.svc {
        writeln!(out, "TWL_LB_SVC {} {}", SvcKeyText(key), svc_text(value)).unwrap();
    }
    for (key, value) in &maps.backends {
        let text = backend_text(value);
        writeln!(out, "TWL_LB_BE id={} slot={} {text}", key.id, key.slot).unwrap();
    }
    for (id, table) in &maps.maglev {
        writeln!(out, "TWL_LB_MAGLEV id={id} {}", maglev_text(table)).unwrap();
    }
    for (id, value) in &maps.revnat {
        writeln!(out, "TWL_LB_REVNAT id={id} {}", revnat_text(value)).unwrap();
    }
}

/// Runs a case's steps; returns the golden text.
fn run_case(case: &str) -> String {
    let mut maps = FakeLbMaps::new();
    let mut mirror = Mirror::default();
    let mut ids = IdAllocator::new();
    let mut out = String::new();
    for step in 1.. {
        let file = format!("{case}.{step}.yaml");
        let Ok(text) = std::fs::read_to_string(dir().join(&file)) else {
            break;
        };
        let objects = parse_manifest(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let snap = Snapshot::from_objects(objects);
        let desired = desired::build(&snap, &node(), &mut ids);
        assert!(
            desired.conflicts.is_empty() && desired.refused.is_empty(),
            "{file}"
        );
        let (applied, _) = read_services(&maps).unwrap();
        let plan = lb::plan(&desired.services, &applied);
        let rejected = apply_services(&mut maps, &mut mirror, &plan, DEFAULT_MAX_SERVICES).unwrap();
        assert!(rejected.is_none(), "{file}: {rejected:?}");
        ids.commit();
        // What the maps hold reads back as the desired state: the next plan is empty.
        let (back, _) = read_services(&maps).unwrap();
        assert_eq!(back, desired.services, "{file}: read-back");
        writeln!(
            out,
            "# step {step} ({file}): {} upserts, {} deletes, {} stale backends",
            plan.upserts.len(),
            plan.deletes.len(),
            plan.stale_backends.len()
        )
        .unwrap();
        for w in maps.take_log() {
            writeln!(out, "{}", write_text(&w)).unwrap();
        }
    }
    assert!(
        !out.is_empty(),
        "no step of case {case} in {}",
        dir().display()
    );
    out.push_str("# maps after the last step\n");
    maps_text(&maps, &mut out);
    out
}

/// Compares a case with its golden file, or rewrites the file under `TWILL_BLESS=1`.
fn check(case: &str) {
    let got = run_case(case);
    let path = dir().join(format!("{case}.txt"));
    if std::env::var_os("TWILL_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (TWILL_BLESS=1 writes it)", path.display()));
    if got != want {
        let first = got
            .lines()
            .zip(want.lines())
            .position(|(g, w)| g != w)
            .unwrap_or_else(|| got.lines().count().min(want.lines().count()));
        panic!(
            "{} differs from the writes at line {} (TWILL_BLESS=1 rewrites it)\n--- got\n{got}--- want\n{want}",
            path.display(),
            first + 1
        );
    }
}

#[test]
fn golden_clusterip_three_backends() {
    check("clusterip");
}

#[test]
fn golden_nodeport_external_local() {
    check("nodeport-local");
}

#[test]
fn golden_session_affinity_client_ip() {
    check("affinity");
}

#[test]
fn golden_maglev_table() {
    check("maglev");
}

#[test]
fn golden_update_removes_then_adds_a_backend() {
    check("update");
}

#[test]
fn golden_delete() {
    check("delete");
}

/// Every case of the folder has a test (a new case is not silently skipped).
#[test]
fn golden_cases_all_run() {
    let mut cases: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(name.strip_suffix(".1.yaml")?.to_owned())
        })
        .collect();
    cases.sort();
    assert_eq!(
        cases,
        [
            "affinity",
            "clusterip",
            "delete",
            "maglev",
            "nodeport-local",
            "update"
        ]
    );
}

/// The desired services of a manifest file of `golden/`.
fn desired_of(file: &str, ids: &mut IdAllocator) -> Vec<lb::LbService> {
    let text = std::fs::read_to_string(dir().join(file)).unwrap();
    let snap = Snapshot::from_objects(parse_manifest(&text).unwrap());
    desired::build(&snap, &node(), ids).services
}

/// Every service entry with backends has a Maglev table, and every slot that table points at
/// holds a backend of that service: what the kernel may look up is never missing.
fn assert_reachable_entries_complete(maps: &FakeLbMaps, context: &str) {
    for (key, value) in &maps.svc {
        if value.backends == 0 {
            continue;
        }
        let table = maps
            .maglev
            .get(&value.id)
            .unwrap_or_else(|| panic!("{context}: {} has no table", SvcKeyText(key)));
        for slot in table
            .slots
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
        {
            let be = twill_common::service::BackendKey {
                id: value.id,
                slot: *slot,
                pad: 0,
            };
            assert!(
                maps.backends.contains_key(&be),
                "{context}: {} table points at empty slot {slot}",
                SvcKeyText(key)
            );
        }
    }
}

/// A packet through every programmed service, counted as the kernel would.
fn traffic(maps: &mut FakeLbMaps) {
    for value in maps.svc.values() {
        *maps.counts.entry(value.id).or_default() += 1;
    }
}

/// The counters of the service ids a service entry holds.
fn held_counts(maps: &FakeLbMaps) -> Vec<(u32, u64)> {
    let held: std::collections::BTreeSet<u32> = maps.svc.values().map(|v| v.id).collect();
    held.into_iter()
        .map(|id| (id, maps.counts.get(&id).copied().unwrap_or(0)))
        .collect()
}

/// Reads back (which rebuilds the mirror), removes the leftovers under ids no service holds,
/// plans `want` against what was read and applies it: the service loop's resync. Returns the
/// plan and how many leftovers were removed.
fn resync(maps: &mut FakeLbMaps, want: &[lb::LbService]) -> (lb::LbPlan, usize) {
    let (applied, mut mirror) = read_services(maps).unwrap();
    let removed = remove_orphans(maps).unwrap();
    let plan = lb::plan(want, &applied);
    apply_services(maps, &mut mirror, &plan, DEFAULT_MAX_SERVICES).unwrap();
    (plan, removed)
}

/// The writes `plan` takes over `maps` when none fails.
fn writes_of(maps: &FakeLbMaps, plan: &lb::LbPlan) -> usize {
    let mut dry = maps.clone();
    let (_, mut mirror) = read_services(&dry).unwrap();
    dry.take_log();
    apply_services(&mut dry, &mut mirror, plan, DEFAULT_MAX_SERVICES).unwrap();
    dry.take_log().len()
}

/// A service that takes over the id of a deleted one starts from zero counters, even when
/// its counter reset fails: the reset comes before the service entry, so the failure leaves
/// the service missing and the next sync programs it, reset included.
#[test]
fn a_reused_id_starts_from_zero_counters_even_after_a_failed_reset() {
    let mut ids = IdAllocator::new();
    let old = desired_of("clusterip.1.yaml", &mut ids);
    let mut reuse = old[0].clone();
    reuse.frontend.port += 1;
    reuse.name = "default/other:http".into();
    let id = reuse.id;
    let mut clean = FakeLbMaps::new();
    resync(&mut clean, &old);
    traffic(&mut clean);
    let plan = lb::plan(
        std::slice::from_ref(&reuse),
        &read_services(&clean).unwrap().0,
    );
    for n in 1..=writes_of(&clean, &plan) {
        let mut maps = clean.clone();
        maps.fail_write(n);
        let (applied, mut mirror) = read_services(&maps).unwrap();
        let plan = lb::plan(std::slice::from_ref(&reuse), &applied);
        apply_services(&mut maps, &mut mirror, &plan, DEFAULT_MAX_SERVICES)
            .expect_err("the faulty write fails the apply");
        resync(&mut maps, std::slice::from_ref(&reuse));
        assert_eq!(
            read_services(&maps).unwrap().0,
            vec![reuse.clone()],
            "write {n}: healed"
        );
        assert_eq!(
            held_counts(&maps),
            [(id, 0)],
            "write {n} failed: the new service inherited the old one's counters"
        );
    }
}

/// A delete that fails after the service entry is gone leaves the other entries of its id
/// behind, unreachable; the next resync removes them.
#[test]
fn a_failed_delete_leaves_nothing_behind_after_the_next_resync() {
    let mut ids = IdAllocator::new();
    let old = desired_of("clusterip.1.yaml", &mut ids);
    let id = old[0].id;
    let mut clean = FakeLbMaps::new();
    resync(&mut clean, &old);
    traffic(&mut clean);
    let plan = lb::plan(&[], &read_services(&clean).unwrap().0);
    let writes = writes_of(&clean, &plan);
    assert!(writes > 3, "the delete takes {writes} writes");
    for n in 1..=writes {
        let mut maps = clean.clone();
        maps.fail_write(n);
        let (_, mut mirror) = read_services(&maps).unwrap();
        apply_services(&mut maps, &mut mirror, &plan, DEFAULT_MAX_SERVICES)
            .expect_err("the faulty write fails the apply");
        resync(&mut maps, &[]);
        let mut left = String::new();
        maps_text(&maps, &mut left);
        assert_eq!(left, "", "write {n} failed: entries of id {id} left behind");
    }
}

/// A failed write at any point of any step (the faulty fake fails the Nth write) leaves maps
/// in which every reachable table points at a backend, and the next sync — read back, plan
/// again, apply — ends with exactly the maps of a run that never failed.
#[test]
fn failed_write_at_any_point_leaves_lookups_whole_and_the_next_sync_heals() {
    let steps = [
        "update.1.yaml",
        "update.2.yaml",
        "update.3.yaml",
        "delete.2.yaml",
    ];
    let mut ids = IdAllocator::new();
    let desired: Vec<Vec<lb::LbService>> = steps
        .iter()
        .map(|file| {
            let d = desired_of(file, &mut ids);
            ids.commit();
            d
        })
        .collect();
    // A clean run, with traffic through every service before each step: the maps and the
    // services' counters after each step, and how many writes each step takes.
    let mut clean = FakeLbMaps::new();
    let mut mirror = Mirror::default();
    let mut after = Vec::new();
    let mut writes = Vec::new();
    for want in &desired {
        traffic(&mut clean);
        let (applied, _) = read_services(&clean).unwrap();
        let plan = lb::plan(want, &applied);
        apply_services(&mut clean, &mut mirror, &plan, DEFAULT_MAX_SERVICES).unwrap();
        writes.push(clean.take_log().len());
        let mut text = String::new();
        maps_text(&clean, &mut text);
        after.push((text, held_counts(&clean)));
    }
    let mut tried = 0;
    for (step, want) in desired.iter().enumerate() {
        for n in 1..=writes[step] {
            let context = format!("{} write {n}", steps[step]);
            // The maps as the previous steps left them.
            let mut maps = FakeLbMaps::new();
            let mut mirror = Mirror::default();
            for earlier in &desired[..step] {
                traffic(&mut maps);
                let (applied, _) = read_services(&maps).unwrap();
                let plan = lb::plan(earlier, &applied);
                apply_services(&mut maps, &mut mirror, &plan, DEFAULT_MAX_SERVICES).unwrap();
            }
            traffic(&mut maps);
            maps.fail_write(n);
            let (applied, _) = read_services(&maps).unwrap();
            let plan = lb::plan(want, &applied);
            let err = apply_services(&mut maps, &mut mirror, &plan, DEFAULT_MAX_SERVICES)
                .expect_err(&context);
            let err = err.to_string();
            assert!(err.contains(" map TWL_LB_"), "{context}: {err}");
            assert_reachable_entries_complete(&maps, &context);
            // The service loop's recovery notices every failure: the plan rewrites a service
            // that differs, or the leftovers of a failed delete are removed.
            let (plan, removed) = resync(&mut maps, want);
            assert!(
                !plan.is_empty() || removed > 0,
                "{context}: the failure went unnoticed"
            );
            let mut text = String::new();
            maps_text(&maps, &mut text);
            assert_eq!(
                (text, held_counts(&maps)),
                after[step],
                "{context}: healed maps and counters"
            );
            tried += 1;
        }
    }
    assert!(tried > 20, "only {tried} failure points");
}
