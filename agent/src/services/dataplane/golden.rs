//! Golden tests of the netfilter dataplanes, without root: a case is a folder under `golden/`
//! with manifests `1.yaml`, `2.yaml`, ... (Services and EndpointSlices, as `twilld apply -f`
//! reads them; each is everything that exists at that step, so an empty one deletes all), run
//! through the service loop's own path (parse → desired → lb plan) into a dataplane over its
//! recording fake. What the dataplane handed to the kernel at each step is compared
//! byte-for-byte with `<dataplane>.txt` in the case folder; `TWILL_BLESS=1` rewrites the files.
//!
//! After every step the dataplane is read back and planned against the desired state again:
//! the plan must be empty (a restart changes nothing), so a golden file cannot pin a ruleset
//! that does not read back as what was asked for.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::services::desired::{LbState, NodeIdentity};
use crate::services::lb::{LbDataplane, LbService, plan};
use crate::services::model::parse_manifest;

/// The environment variable that rewrites the golden files.
pub const BLESS_ENV: &str = "TWILL_BLESS";

/// The node every case runs on: `node-1`, 198.18.0.11, pods in 10.244.1.0/24.
pub fn node() -> NodeIdentity {
    NodeIdentity {
        name: "node-1".into(),
        addresses: vec!["198.18.0.11".parse().expect("address")],
        pod_subnets: vec!["10.244.1.0/24".parse().expect("subnet")],
        ..NodeIdentity::default()
    }
}

/// The case folders, by name.
pub fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/services/dataplane/golden");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no golden cases in {}", dir.display());
    out
}

/// The case folder `name`.
pub fn case(name: &str) -> PathBuf {
    cases()
        .into_iter()
        .find(|c| c.ends_with(name))
        .unwrap_or_else(|| panic!("no golden case {name}"))
}

/// The manifests of a case, in step order.
fn steps(case: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(case)
        .unwrap_or_else(|e| panic!("read {}: {e}", case.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no steps in {}", case.display());
    out
}

/// The desired services of each step of `case`, with the step's manifest name, as the service
/// loop computes them (ids kept from step to step).
pub fn desired_steps(case: &Path) -> Vec<(String, Vec<LbService>)> {
    let mut state = LbState::new(node());
    steps(case)
        .into_iter()
        .map(|step| {
            let yaml = std::fs::read_to_string(&step).expect("read manifest");
            let objects =
                parse_manifest(&yaml).unwrap_or_else(|e| panic!("parse {}: {e}", step.display()));
            state.reset(objects);
            let name = step
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            (name, state.desired())
        })
        .collect()
}

/// Runs `case` through `lb`; `take` returns (and forgets) what the fake was given since the
/// last call, as text. Returns the golden text: per step, the manifest's name and that text.
pub fn run<L: LbDataplane>(case: &Path, lb: &mut L, mut take: impl FnMut() -> String) -> String {
    let mut applied: Vec<LbService> = lb.observed().expect("observe after open");
    take();
    let mut out = String::new();
    for (name, desired) in desired_steps(case) {
        lb.apply(&plan(&desired, &applied)).expect("apply");
        let _ = write!(out, "## {name}\n{}", take());
        applied = lb.observed().expect("observe");
        let again = plan(&desired, &applied);
        assert!(
            again.upserts.is_empty() && again.deletes.is_empty(),
            "{}/{name}: reads back differently from what was asked: {again:?}",
            case.display()
        );
        assert!(
            take().is_empty(),
            "{}/{name}: the read-back repaired something",
            case.display()
        );
    }
    out
}

/// Runs every case through a dataplane that `open` makes over a fresh fake and compares the
/// text `take` drains from the fake (as for [`run`]) with the case's golden `file`.
pub fn check_every_case<F: Default, L: LbDataplane>(
    file: &str,
    open: impl Fn(&F) -> L,
    take: impl Fn(&F) -> String,
) {
    for case in cases() {
        let fake = F::default();
        let mut lb = open(&fake);
        let text = run(&case, &mut lb, || take(&fake));
        check(&case, file, &text);
    }
}

/// Compares `actual` with the golden file `case/<file>` (rewrites it under `TWILL_BLESS=1`).
pub fn check(case: &Path, file: &str, actual: &str) {
    let path = case.join(file);
    if std::env::var_os(BLESS_ENV).is_some_and(|v| v == "1") {
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "read {}: {e} (run with {BLESS_ENV}=1 to create it)",
            path.display()
        )
    });
    assert!(
        want == actual,
        "{} differs (run with {BLESS_ENV}=1 to accept):\n--- want\n{want}\n--- got\n{actual}",
        path.display()
    );
}
