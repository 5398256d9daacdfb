//! Unit tests of the read-back, the skeleton and the encoding.

use super::diff::{Mirror, Op};
use super::frontend::{ElemData, hairpin_key, slot_key, slot_value};
use super::render::{TABLE, static_sets};
use super::transport::FakeNft;
use super::wire::{comment_udata, encode_ops, parse_udata_comment};
use super::*;
use crate::services::dataplane::golden;
use crate::services::lb::{FrontendKind, Proto, plan};

fn svc(id: u32, ip: &str, backends: &[&str], affinity: bool) -> LbService {
    LbService {
        id,
        name: format!("default/s{id}"),
        frontend: Frontend {
            ip: ip.parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
            kind: FrontendKind::ClusterIp,
        },
        backends: backends
            .iter()
            .enumerate()
            .map(|(k, b)| Backend {
                ip: b.parse().unwrap(),
                port: 8080,
                node_local: k == 0,
                state: BackendState::Ready,
            })
            .collect(),
        affinity_timeout_secs: affinity.then_some(100),
        external_local: false,
        internal_local: false,
    }
}

/// Builds the dump a kernel holding exactly `ops` would return.
fn dump_of(ops: &[Op]) -> Dump {
    let mut d = Dump::default();
    for s in static_sets() {
        d.sets.insert(
            s.name.clone(),
            DumpedSet {
                flags: s.flags,
                key_len: s.key_len,
            },
        );
    }
    for op in ops {
        d.apply(op);
    }
    d
}

/// What a restarted agent does first (`ensure_skeleton` over the table its predecessor
/// programmed) leaves every service translated: nothing for the read-back to repair, so no
/// moment without the services' rules.
#[test]
fn the_skeleton_over_a_programmed_table_keeps_every_service() {
    let a = svc(1, "10.96.0.1", &["10.0.1.2", "10.0.2.2"], false);
    let b = svc(2, "fd00::2", &[], false);
    let c = svc(3, "10.96.0.3", &["10.0.1.2", "10.0.3.2"], true);
    let mut ops = skeleton_ops();
    let tx = Mirror::default().transaction(&plan(&[a.clone(), b.clone(), c.clone()], &[]));
    ops.extend(tx.ops);
    ops.extend(skeleton_ops());
    let (services, _, repairs) = reconstruct(&dump_of(&ops));
    assert!(
        repairs.is_empty(),
        "{:?}",
        repairs.iter().map(ToString::to_string).collect::<Vec<_>>()
    );
    assert_eq!(services, vec![a, c, b]);
}

#[test]
fn a_table_read_back_yields_the_same_services_and_no_repairs() {
    let a = svc(1, "10.96.0.1", &["10.0.1.2", "10.0.2.2"], false);
    let b = svc(2, "fd00::2", &[], false);
    let c = svc(3, "10.96.0.3", &["10.0.1.2", "10.0.3.2"], true);
    let mut ops = skeleton_ops();
    let tx = Mirror::default().transaction(&plan(&[a.clone(), b.clone(), c.clone()], &[]));
    ops.extend(tx.ops.clone());
    let (services, mirror, repairs) = reconstruct(&dump_of(&ops));
    assert!(repairs.is_empty(), "{repairs:?}");
    assert_eq!(services, vec![a.clone(), c.clone(), b.clone()]);
    let mut m = Mirror::default();
    m.commit(tx);
    assert_eq!(mirror, m);
}

#[test]
fn drift_is_detected_and_strays_are_removed() {
    let a = svc(1, "10.96.0.1", &["10.0.1.2", "10.0.2.2"], false);
    let c = svc(3, "10.96.0.3", &["10.0.1.2"], true);
    let mut ops = skeleton_ops();
    ops.extend(
        Mirror::default()
            .transaction(&plan(&[a.clone(), c.clone()], &[]))
            .ops,
    );
    let mut d = dump_of(&ops);
    // Someone removed a backend slot, changed an affinity rule, left a chain, a set and a
    // slot behind, and flushed a static chain.
    d.elems
        .get_mut("be4")
        .unwrap()
        .retain(|(k, _, _)| *k != slot_key(&a.frontend.key(), 1));
    d.rules.get_mut("s3").unwrap()[0].exprs.pop();
    d.chains.insert("s99".into());
    d.sets.insert(
        "a99-0a0000010050".into(),
        DumpedSet {
            flags: 0x30,
            key_len: 4,
        },
    );
    d.elems.get_mut("be4").unwrap().push((
        slot_key(&svc(42, "10.96.0.42", &[], false).frontend.key(), 0),
        ElemData::Value(slot_value("10.9.9.9".parse().unwrap(), 1)),
        None,
    ));
    d.rules.remove("nat_output");
    d.elems.get_mut("hairpin4").unwrap().push((
        hairpin_key("10.9.9.9".parse().unwrap()),
        ElemData::None,
        None,
    ));
    let (services, _, repairs) = reconstruct(&d);
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["default/s1 (drifted)", "default/s3 (drifted)"]);
    let text: Vec<String> = repairs.iter().map(ToString::to_string).collect();
    for want in [
        "add chain nat_output",
        "flush chain nat_output",
        "flush chain s99",
        "delete chain s99",
        "delete set a99-0a0000010050",
        "delete element hairpin4 0a0909090a090909",
    ] {
        assert!(
            text.contains(&want.to_string()),
            "{want} missing in {text:?}"
        );
    }
    assert!(
        text.iter()
            .any(|t| t.starts_with("delete element be4 0a60002a"))
    );
    // Drifted services differ from the desired ones, so the plan rewrites them, and the
    // rewrite restores the missing slot.
    let p = plan(&[a.clone(), c.clone()], &services);
    assert_eq!(p.upserts.len(), 2);
    let (_, mirror, _) = reconstruct(&d);
    let tx = mirror.transaction(&p);
    assert!(
        tx.ops
            .iter()
            .any(|o| matches!(o, Op::AddElem { set, key, .. } if set == "be4" && *key == slot_key(&a.frontend.key(), 1)))
    );
}

#[test]
fn udata_comments_round_trip() {
    let u = comment_udata("b 10.0.0.1 80");
    assert_eq!(parse_udata_comment(&u).as_deref(), Some("b 10.0.0.1 80"));
    assert_eq!(parse_udata_comment(&[1, 1, 0]), None);
}

#[test]
fn encoded_batches_describe_their_messages() {
    let a = svc(1, "10.96.0.1", &["10.0.1.2"], false);
    let tx = Mirror::default().transaction(&plan(std::slice::from_ref(&a), &[]));
    let b = encode_ops(TABLE, &tx.ops);
    assert_eq!(b.len(), tx.ops.len());
    assert_eq!(b.descriptions()[0], "add set c4-1");
}

/// Drains the transactions the fake was given, as golden text.
fn take(fake: &FakeNft) -> String {
    let mut out = String::new();
    for c in fake.state().commits.drain(..) {
        out.push_str("# nft transaction\n");
        out.push_str(&c.render());
    }
    out
}

fn open(fake: &FakeNft) -> NftLb {
    NftLb::with_transport(Box::new(fake.clone())).expect("open over the fake")
}

/// Every golden case: the exact nf_tables transaction of each step.
#[test]
fn golden_transactions_per_case() {
    for case in golden::cases() {
        let fake = FakeNft::new();
        let mut lb = open(&fake);
        let text = golden::run(&case, &mut lb, || take(&fake));
        golden::check(&case, "nftables.txt", &text);
    }
}

/// A restarted agent over the table its predecessor programmed re-creates only the skeleton,
/// repairs nothing and reads back the same services; an unchanged resync dumps nothing.
#[test]
fn reopen_commits_only_the_skeleton_and_an_unchanged_resync_dumps_nothing() {
    let case = golden::cases()
        .into_iter()
        .find(|c| c.ends_with("clusterip-three-backends"))
        .expect("case");
    let fake = FakeNft::new();
    let mut lb = open(&fake);
    golden::run(&case, &mut lb, || take(&fake));
    let services = lb.observed().expect("observe");
    assert_eq!(services.len(), 1);
    let mut again = open(&fake);
    let commits = std::mem::take(&mut fake.state().commits);
    assert_eq!(
        commits,
        vec![transport::Commit {
            create_table: true,
            ..transport::Commit::ops(skeleton_ops())
        }]
    );
    let dumps = fake.state().dumps;
    assert_eq!(again.observed().expect("observe"), services);
    assert_eq!(
        fake.state().dumps,
        dumps,
        "an unchanged resync dumped the table"
    );
}
