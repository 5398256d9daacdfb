//! Unit tests of the rendering and the diff.

use super::super::diff::{Mirror, Op, class_ops, counts};
use super::super::frontend::{
    ElemData, affinity_rules, affinity_set_id, affinity_sets, clip, hairpin_key,
    parse_backend_comment, parse_comment, parse_hairpin_key, parse_key, parse_slot_key,
    parse_slot_value, record, slot_key, slot_value,
};
use super::*;
use crate::services::lb::{Backend, plan};
use crate::services::testutil::{self, cluster_ip, svc_at};

fn be(ip: &str, port: u16, local: bool) -> Backend {
    testutil::backend(ip, port, local)
}

fn text(ops: &[Op]) -> Vec<String> {
    ops.iter().map(ToString::to_string).collect()
}

#[test]
fn records_and_classes_round_trip() {
    for (ip, kind) in [
        ("10.96.0.10", FrontendKind::ClusterIp),
        ("fd00::10", FrontendKind::ExternalIp),
        ("0.0.0.0", FrontendKind::NodePort),
        ("::", FrontendKind::NodePort),
    ] {
        for aff in [None, Some(30)] {
            let mut s = svc_at(7, ip, kind, vec![be("10.0.1.2", 8080, true)]);
            s.affinity_timeout_secs = aff;
            s.external_local = kind != FrontendKind::ClusterIp;
            let r = record(&s);
            assert_eq!(parse_key(r.set, &r.key), Some(s.frontend.key()), "{ip}");
            let m = parse_comment(&r.comment).unwrap();
            assert_eq!(
                (m.id, m.kind, m.name.as_str(), m.affinity_timeout_secs),
                (7, kind, "default/s7:http", aff)
            );
            assert_eq!(m.external_local, s.external_local);
            if aff.is_some() {
                assert_eq!(r.data, ElemData::Goto("s7".into()));
            } else {
                assert_eq!(r.set, RecordSet::Class(class_of(&s)));
                assert_eq!(r.data, ElemData::None);
            }
        }
    }
    let empty = svc_at(8, "10.96.0.11", FrontendKind::ClusterIp, vec![]);
    assert_eq!(
        (record(&empty).set, record(&empty).data),
        (RecordSet::NoEp(false), ElemData::None)
    );
    assert!(parse_key(RecordSet::NoEp(false), &[1, 2, 3]).is_none());
    let c = Class {
        v6: true,
        np: true,
        masq: true,
        n: 12,
    };
    assert_eq!(Class::from_set(&c.set()), Some(c));
    assert_eq!(c.set(), "c6npm-12");
    assert!(Class::from_set("c4-0").is_none() && Class::from_set("cx-1").is_none());
    assert_eq!(
        parse_slot_value(&slot_value("fd00::1".parse().unwrap(), 8080)),
        Some(("fd00::1".parse().unwrap(), 8080))
    );
    let fk = cluster_ip(5, vec![]).frontend.key();
    let k = slot_key(&fk, 2);
    assert_eq!(parse_slot_key(&k), Some((&k[..12], 2)));
}

#[test]
fn one_endpoint_change_is_element_updates_only() {
    let a = cluster_ip(1, vec![be("10.0.1.2", 80, true), be("10.0.2.2", 80, false)]);
    let mut m = Mirror::default();
    let tx = m.transaction(&plan(std::slice::from_ref(&a), &[]));
    let t = text(&tx.ops);
    assert_eq!(
        t[..4],
        [
            "add set c4-2",
            "add rule pick (9 exprs) c4-2",
            "add element be4 0a600001060000000050000000000000 : 0a00010200500000",
            "add element be4 0a600001060000000050000001000000 : 0a00020200500000",
        ]
    );
    m.commit(tx);
    // A second frontend of the same class needs no chain.
    let b = cluster_ip(2, vec![be("10.0.1.3", 80, true), be("10.0.2.3", 80, false)]);
    let tx = m.transaction(&plan(std::slice::from_ref(&b), &[]));
    assert!(
        !text(&tx.ops)
            .iter()
            .any(|o| o.contains("rule") || o.contains("set"))
    );
    m.commit(tx);
    // Replacing one endpoint: one slot, one hairpin element; no rule, no chain.
    let mut a2 = a.clone();
    a2.backends[1] = be("10.0.3.2", 80, false);
    let tx = m.transaction(&plan(&[a2.clone(), b.clone()], &[a.clone(), b.clone()]));
    assert_eq!(
        text(&tx.ops),
        vec![
            "delete element be4 0a600001060000000050000001000000",
            "add element be4 0a600001060000000050000001000000 : 0a00030200500000",
            "delete element hairpin4 0a0002020a000202",
            "add element hairpin4 0a0003020a000302",
        ]
    );
    m.commit(tx);
    // Adding one moves the frontend to another class (a new, small chain once).
    let mut a3 = a2.clone();
    a3.backends.push(be("10.0.4.2", 80, true));
    let tx = m.transaction(&plan(std::slice::from_ref(&a3), std::slice::from_ref(&a2)));
    let t = text(&tx.ops);
    assert_eq!(t[0], "delete element c4-2 0a6000010600000000500000");
    assert!(t.contains(&"add set c4-3".to_string()));
    assert!(t.contains(
        &"add element be4 0a600001060000000050000002000000 : 0a00040200500000".to_string()
    ));
    assert!(t.contains(&"add element local4 0a000402".to_string()));
    m.commit(tx);
    assert_eq!(m.classes.len(), 2);
    assert_eq!(m.local.get(&"10.0.1.2".parse().unwrap()), Some(&1));
}

#[test]
fn affinity_frontends_get_a_chain_sets_and_sticky_rules() {
    let mut s = cluster_ip(
        4,
        vec![be("10.0.1.2", 8080, true), be("10.0.2.2", 8080, false)],
    );
    s.affinity_timeout_secs = Some(60);
    let sets = affinity_sets(&s);
    assert_eq!(
        sets.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        vec!["a4-0a0001021f90", "a4-0a0002021f90"]
    );
    assert_eq!(sets[0].timeout_ms, Some(60_000));
    assert_eq!(affinity_set_id(&sets[1].name), Some(4));
    let rules = affinity_rules(&s);
    assert_eq!(rules.len(), 4);
    assert_eq!(rules[0].comment.as_deref(), Some("a 10.0.1.2 8080"));
    assert_eq!(
        rules
            .iter()
            .filter_map(|r| r.comment.as_deref().and_then(parse_backend_comment))
            .collect::<Vec<_>>(),
        vec![
            ("10.0.1.2".parse().unwrap(), 8080),
            ("10.0.2.2".parse().unwrap(), 8080)
        ]
    );
    let moduli: Vec<Option<u32>> = rules
        .iter()
        .map(|r| {
            r.exprs.iter().find_map(|e| match e {
                Expr::Numgen { modulus, .. } => Some(*modulus),
                _ => None,
            })
        })
        .collect();
    assert_eq!(moduli, vec![None, None, Some(2), None]);
    let tx = Mirror::default().transaction(&plan(std::slice::from_ref(&s), &[]));
    let t = text(&tx.ops);
    assert_eq!(t[0], "add chain s4");
    assert!(t.contains(&"add set a4-0a0002021f90".to_string()));
    assert!(!t.iter().any(|o| o.contains("be4")));
}

#[test]
fn losing_all_endpoints_moves_the_record_and_frees_slots() {
    let a = cluster_ip(1, vec![be("10.0.1.2", 80, true)]);
    let mut m = Mirror::default();
    let tx = m.transaction(&plan(std::slice::from_ref(&a), &[]));
    m.commit(tx);
    let mut empty = a.clone();
    empty.backends.clear();
    let tx = m.transaction(&plan(
        std::slice::from_ref(&empty),
        std::slice::from_ref(&a),
    ));
    assert_eq!(
        text(&tx.ops),
        vec![
            "delete element c4-1 0a6000010600000000500000",
            "delete element be4 0a600001060000000050000000000000",
            "add element noep4 0a6000010600000000500000 \"1 ClusterIP - - default/s1:http\"",
            "delete element hairpin4 0a0001020a000102",
            "delete element local4 0a000102",
        ]
    );
    m.commit(tx);
    let tx = m.transaction(&plan(&[], std::slice::from_ref(&empty)));
    assert_eq!(
        text(&tx.ops),
        vec!["delete element noep4 0a6000010600000000500000"]
    );
    m.commit(tx);
    assert!(m.frontends.is_empty() && m.hairpin.is_empty() && m.local.is_empty());
}

#[test]
fn shared_backends_keep_their_elements_until_the_last_user_goes() {
    let a = cluster_ip(1, vec![be("10.0.1.2", 80, true)]);
    let n = svc_at(
        2,
        "0.0.0.0",
        FrontendKind::NodePort,
        vec![be("10.0.1.2", 80, true)],
    );
    let mut m = Mirror::default();
    let tx = m.transaction(&plan(&[a.clone(), n.clone()], &[]));
    assert_eq!(
        text(&tx.ops)
            .iter()
            .filter(|o| o.contains("hairpin"))
            .count(),
        1
    );
    m.commit(tx);
    let tx = m.transaction(&plan(std::slice::from_ref(&n), &[a.clone(), n.clone()]));
    assert!(!text(&tx.ops).iter().any(|o| o.contains("hairpin")));
    m.commit(tx);
    assert_eq!(
        counts(std::slice::from_ref(&n)),
        (m.hairpin.clone(), m.local.clone())
    );
}

#[test]
fn static_layout_is_complete() {
    let mut sets = static_sets();
    let mut rules: Vec<Rule> = static_chains().into_iter().flat_map(|(_, r)| r).collect();
    for v6 in [false, true] {
        for np in [false, true] {
            let c = Class {
                v6,
                np,
                masq: true,
                n: 3,
            };
            for op in class_ops(c) {
                match op {
                    Op::AddSet(d) => sets.push(d),
                    Op::AddRule { rule, .. } => rules.push(rule),
                    _ => {}
                }
            }
        }
    }
    // Every set a rule looks up exists, with a key as long as the registers loaded.
    for r in &rules {
        for e in &r.exprs {
            if let Expr::Lookup { set, .. } = e {
                assert!(sets.iter().any(|s| &s.name == set), "{set}");
            }
        }
    }
    assert_eq!(static_chains()[0].0.name, PICK);
    assert_eq!(
        parse_hairpin_key(&hairpin_key("fd00::1".parse().unwrap())),
        Some("fd00::1".parse().unwrap())
    );
    assert_eq!(clip(&"é".repeat(150)).len(), 200);
}
