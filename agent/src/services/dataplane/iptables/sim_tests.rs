//! Tests of [`IptLb`] over the recording fake runner: the golden restore texts, restarts,
//! failed restores and drift, without root.

use std::fmt::Write as _;

use super::runner::FakeIptables;
use super::{IptLb, NAT};
use crate::services::dataplane::golden;
use crate::services::lb::{LbDataplane, LbService, plan};

/// Drains what the fake was given as golden text.
fn take(fake: &FakeIptables) -> String {
    let mut out = String::new();
    for (v6, text) in fake.state().restores.drain(..) {
        let _ = write!(
            out,
            "# ip{}tables-restore --noflush\n{text}",
            if v6 { "6" } else { "" }
        );
    }
    out
}

fn open(fake: &FakeIptables) -> IptLb {
    IptLb::with_runner(Box::new(fake.clone())).expect("open over the fake")
}

/// Every golden case: the exact `iptables-restore` input of each step.
#[test]
fn golden_restore_text_per_case() {
    golden::check_every_case("iptables.txt", open, take);
}

fn programmed(fake: &FakeIptables) -> (IptLb, Vec<LbService>) {
    let case = golden::case("clusterip-three-backends");
    let mut lb = open(fake);
    golden::run(&case, &mut lb, || take(fake));
    let services = lb.observed().expect("observe");
    assert_eq!(services.len(), 1);
    (lb, services)
}

/// A restarted agent finds its chains as it left them: it writes nothing, and reads nothing
/// more once the change token says nothing changed.
#[test]
fn reopen_writes_nothing_and_an_unchanged_resync_reads_nothing() {
    let fake = FakeIptables::new();
    let (_, services) = programmed(&fake);
    let mut again = open(&fake);
    assert_eq!(take(&fake), "", "a restart rewrote rules");
    assert_eq!(again.observed().expect("observe"), services);
    let saves = fake.state().saves;
    assert_eq!(again.observed().expect("observe"), services);
    assert_eq!(
        fake.state().saves,
        saves,
        "an unchanged resync ran iptables-save"
    );
}

/// A restore that fails is an error naming the tool, leaves the tables as they were, and is
/// not taken for done: the same plan applies once restores work again.
#[test]
fn a_failed_restore_is_reported_and_not_taken_for_done() {
    let fake = FakeIptables::new();
    let (mut lb, services) = programmed(&fake);
    let before = fake.state().saved(false, NAT);
    let mut moved = services[0].clone();
    moved.backends.pop();
    fake.state().fail_restores = true;
    let err = lb
        .apply(&plan(std::slice::from_ref(&moved), &services))
        .expect_err("a failing restore must fail the apply");
    assert!(
        format!("{err:?}").contains("iptables-legacy-restore"),
        "error does not name the tool: {err:?}"
    );
    assert_eq!(fake.state().saved(false, NAT), before);
    fake.state().fail_restores = false;
    let observed = lb.observed().expect("observe");
    assert_eq!(observed, services, "the failed change was taken for done");
    lb.apply(&plan(std::slice::from_ref(&moved), &observed))
        .expect("apply");
    assert_eq!(lb.observed().expect("observe"), vec![moved]);
}

/// A rule someone else changed makes its frontend differ on the next read, and the next plan
/// rewrites it to what twill renders.
#[test]
fn an_edited_rule_is_seen_and_rewritten() {
    let fake = FakeIptables::new();
    let (mut lb, services) = programmed(&fake);
    let rule = fake
        .state()
        .rules(false, NAT, "TWILL-SERVICES")
        .expect("chain")
        .into_iter()
        .next()
        .expect("a dispatch rule");
    let svc_rules = {
        let chain = rule.rsplit(' ').next().expect("target").to_string();
        fake.state().rules(false, NAT, &chain).expect("svc chain")
    };
    let dnat = svc_rules.last().expect("a DNAT rule").clone();
    assert!(dnat.contains("10.244."), "{dnat}");
    assert!(
        fake.state()
            .edit_rule(false, &dnat, &dnat.replace("10.244.", "10.245."))
    );
    let observed = lb.observed().expect("observe");
    let fix = plan(&services, &observed);
    assert_eq!(fix.upserts.len(), 1, "the edit went unnoticed");
    lb.apply(&fix).expect("apply");
    assert_eq!(lb.observed().expect("observe"), services);
    assert!(
        fake.state().saved(false, NAT).contains(&dnat),
        "the rule was not rewritten"
    );
}
