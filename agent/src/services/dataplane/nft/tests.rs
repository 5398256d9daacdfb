//! Unit tests of the read-back, the skeleton and the encoding.

use super::diff::{self, Mirror, Op};
use super::frontend::{ElemData, hairpin_key, slot_key, slot_value};
use super::render::{TABLE, static_chains, static_sets};
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

/// Two IPv4 services (the second with affinity) and an IPv6 one without backends.
fn three_services() -> [LbService; 3] {
    [
        svc(1, "10.96.0.1", &["10.0.1.2", "10.0.2.2"], false),
        svc(2, "fd00::2", &[], false),
        svc(3, "10.96.0.3", &["10.0.1.2", "10.0.3.2"], true),
    ]
}

/// The skeleton, then the transaction that programs `services` into an empty table: the
/// operations a kernel holding them has seen, and that transaction.
fn programmed(services: &[LbService]) -> (Vec<Op>, diff::Tx) {
    let mut ops = skeleton_ops();
    let tx = Mirror::default().transaction(&plan(services, &[]));
    ops.extend(tx.ops.clone());
    (ops, tx)
}

/// What a restarted agent does first (`ensure_skeleton` over the table its predecessor
/// programmed) leaves every service translated: nothing for the read-back to repair, so no
/// moment without the services' rules.
#[test]
fn the_skeleton_over_a_programmed_table_keeps_every_service() {
    let [a, b, c] = three_services();
    let (mut ops, _) = programmed(&[a.clone(), b.clone(), c.clone()]);
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
    let [a, b, c] = three_services();
    let (ops, tx) = programmed(&[a.clone(), b.clone(), c.clone()]);
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
    let (ops, _) = programmed(&[a.clone(), c.clone()]);
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
    assert!(tx.ops.iter().any(
        |o| matches!(o, Op::AddElem(elem) if elem.set == "be4" && elem.key == slot_key(&a.frontend.key(), 1))
    ));
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
    golden::check_every_case("nftables.txt", open, take);
}

/// A restarted agent over the table its predecessor programmed re-creates only the skeleton,
/// repairs nothing and reads back the same services; an unchanged resync dumps nothing.
#[test]
fn reopen_commits_only_the_skeleton_and_an_unchanged_resync_dumps_nothing() {
    let case = golden::case("clusterip-three-backends");
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

/// The table the fake holds, each set's elements in key order (the order they were added in
/// means nothing to a lookup) and sets without elements left out.
fn table_of(fake: &FakeNft) -> Option<Dump> {
    let mut table = fake.state().table.clone()?;
    table.elems.retain(|_, elems| !elems.is_empty());
    for elems in table.elems.values_mut() {
        elems.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Some(table)
}

/// One sync of the service loop: read back, plan `want` against it, apply.
fn sync(lb: &mut NftLb, want: &[LbService]) -> Result<(), LbError> {
    let applied = lb.observed()?;
    lb.apply(&plan(want, &applied))
}

/// A transaction that goes wrong at any step of any golden case — refused, applied with its
/// acknowledgement lost, or preceded by another owner's change to the table — leaves the
/// table whole: as before the step or as after it (a sync is one transaction, and nf_tables
/// applies a transaction all or nothing). The next sync then heals the table to exactly what
/// a run without the fault holds, and reads back as the desired services.
#[test]
fn a_failed_transaction_at_any_step_leaves_the_table_whole_and_the_next_sync_heals() {
    let (flushed, _) = static_chains()
        .into_iter()
        .find(|(_, rules)| !rules.is_empty())
        .expect("a static chain with rules");
    let faults = [
        transport::Fault::Refused,
        transport::Fault::LostAck,
        transport::Fault::Underneath(transport::Commit::ops(vec![Op::FlushChain(flushed.name)])),
    ];
    let mut tried = 0;
    for case in golden::cases() {
        let steps = golden::desired_steps(&case);
        // A clean run: the table before and after each step, and each step's transactions.
        let fake = FakeNft::new();
        let mut lb = open(&fake);
        let mut tables = vec![table_of(&fake)];
        let mut transactions = Vec::new();
        for (_, want) in &steps {
            let before = fake.state().commits.len();
            sync(&mut lb, want).expect("clean sync");
            transactions.push(fake.state().commits.len() - before);
            tables.push(table_of(&fake));
        }
        for (step, (name, want)) in steps.iter().enumerate() {
            for n in 1..=transactions[step] {
                for fault in &faults {
                    let context = format!("{}/{name}: transaction {n} {fault:?}", case.display());
                    let fake = FakeNft::new();
                    let mut lb = open(&fake);
                    for (_, earlier) in &steps[..step] {
                        sync(&mut lb, earlier).expect("earlier step");
                    }
                    fake.fail_commit(n, fault.clone());
                    let result = sync(&mut lb, want);
                    let table = table_of(&fake);
                    match fault {
                        transport::Fault::Refused => {
                            assert!(result.is_err(), "{context}: no error");
                            assert!(table == tables[step], "{context}: not the old table");
                        }
                        transport::Fault::LostAck => {
                            assert!(result.is_err(), "{context}: no error");
                            assert!(table == tables[step + 1], "{context}: not the new table");
                        }
                        transport::Fault::Underneath(_) => {
                            result.unwrap_or_else(|e| panic!("{context}: {e}"));
                        }
                    }
                    sync(&mut lb, want).unwrap_or_else(|e| panic!("{context}: heal: {e}"));
                    assert!(
                        table_of(&fake) == tables[step + 1],
                        "{context}: healed table differs\n--- got\n{:?}\n--- want\n{:?}",
                        table_of(&fake),
                        tables[step + 1]
                    );
                    let again = plan(want, &lb.observed().expect("observe"));
                    assert!(again.is_empty(), "{context}: reads back as {again:?}");
                    tried += 1;
                }
            }
        }
    }
    assert!(tried >= 3 * 7, "only {tried} failure points");
}
