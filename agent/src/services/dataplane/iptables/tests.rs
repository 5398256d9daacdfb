//! Unit tests of the iptables dataplane's pure parts: rendering, read-back, repair, partial
//! syncs, the blob digest and the backend choice.

use std::collections::BTreeMap;
use std::hash::Hasher as _;

use super::readback::*;
use super::render::*;
use super::token::*;
use super::*;
use crate::services::lb::{Backend, BackendState, FrontendKind, plan};
use crate::services::testutil::{backend, cluster_ip, svc_at};

fn be(ip: &str, local: bool) -> Backend {
    backend(ip, 8080, local)
}

/// What `iptables-save -t nat; iptables-save -t filter` prints for `services` programmed
/// (our chains only; rules grouped by chain as iptables-save groups them).
fn saved_text(services: &[&LbService]) -> String {
    let mut chains: BTreeMap<(&str, String), Vec<String>> = BTreeMap::new();
    for (c, rules) in static_nat() {
        chains.insert((NAT, c), rules);
    }
    for (t, c) in DISPATCH {
        chains.insert((t, c.to_string()), Vec::new());
    }
    for s in services {
        let line = dispatch_rule(s);
        let chain = line.split(' ').nth(1).unwrap().to_string();
        chains.entry((table_of(s), chain)).or_default().push(line);
        for (c, rules) in frontend_chains(s) {
            chains.insert((NAT, c), rules);
        }
    }
    let mut text = String::new();
    for table in [NAT, FILTER] {
        let _ = writeln!(text, "*{table}");
        let _ = writeln!(text, ":PREROUTING ACCEPT [12:720]");
        for (t, c) in chains.keys() {
            if *t == table {
                let _ = writeln!(text, ":{c} - [0:0]");
            }
        }
        for (t, chain, rule) in jumps() {
            if t == table {
                let _ = writeln!(text, "-A {chain} {rule}");
            }
        }
        for ((t, _), rules) in &chains {
            if *t == table {
                for r in rules {
                    let _ = writeln!(text, "{r}");
                }
            }
        }
        text.push_str("COMMIT\n");
    }
    text
}

/// `text` with `from` replaced by `to` in the first rule of `chain` that holds it.
fn with_line_edited(text: &str, chain: &str, from: &str, to: &str) -> String {
    let prefix = format!("-A {chain} ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains(from))
        .unwrap();
    text.replacen(line, &line.replacen(from, to, 1), 1)
}

fn chain_names(s: &LbService) -> Vec<String> {
    frontend_chains(s).into_iter().map(|(c, _)| c).collect()
}

#[test]
fn mixed_nodeport_keeps_per_endpoint_masquerade_and_even_splits() {
    let s = svc_at(
        3,
        "0.0.0.0",
        FrontendKind::NodePort,
        vec![
            be("10.0.1.2", true),
            be("10.0.2.2", false),
            be("10.0.3.2", false),
        ],
    );
    let k = s.frontend.key();
    assert_eq!(
        dispatch_rule(&s),
        format!(
            "-A TWILL-NODEPORTS -p tcp -m comment --comment \"3 NodePort - - default/s3:http\" \
             -m tcp --dport 30080 -j {}",
            svc_chain(&k)
        )
    );
    let chains = frontend_chains(&s);
    assert_eq!(chains.len(), 4);
    let svc_rules = &chains[0].1;
    assert_eq!(svc_rules.len(), 3);
    assert!(svc_rules[0].contains("--probability 0.33333333349"));
    assert!(svc_rules[1].contains("--probability 0.50000000000"));
    assert!(!svc_rules[2].contains("statistic"));
    // The local endpoint: hairpin, no masquerade; the remote ones: masquerade (policy
    // Cluster), no hairpin.
    assert_eq!(
        chains[1].1,
        vec![
            format!("-A {} -s 10.0.1.2/32 -j TWILL-MARK-MASQ", chains[1].0),
            format!(
                "-A {} -p tcp -j DNAT --to-destination 10.0.1.2:8080",
                chains[1].0
            ),
        ]
    );
    assert_eq!(
        chains[2].1,
        vec![
            format!("-A {} -j TWILL-MARK-MASQ", chains[2].0),
            format!(
                "-A {} -p tcp -j DNAT --to-destination 10.0.2.2:8080",
                chains[2].0
            ),
        ]
    );
    assert!(svc_chain(&k).len() <= 28);
    assert_eq!(probability(1), "1.00000000000");
}

#[test]
fn chains_only_where_something_happens_per_endpoint() {
    // One remote endpoint: the dispatch rule DNATs, no chain.
    let one = cluster_ip(1, vec![be("10.0.2.2", false)]);
    assert!(
        dispatch_rule(&one).ends_with("-m tcp --dport 80 -j DNAT --to-destination 10.0.2.2:8080")
    );
    assert!(frontend_chains(&one).is_empty());
    // Ten remote endpoints: one SVC chain of ten DNAT rules.
    let ten: Vec<Backend> = (0..10).map(|i| be(&format!("10.0.2.{i}"), false)).collect();
    let many = cluster_ip(2, ten.clone());
    let chains = frontend_chains(&many);
    assert_eq!(chains.len(), 1);
    assert_eq!(chains[0].1.len(), 10);
    assert!(
        chains[0]
            .1
            .iter()
            .all(|r| r.contains(" -p tcp ") && r.contains("-j DNAT"))
    );
    // External traffic to remote endpoints only: one mark before the split.
    let np = svc_at(3, "0.0.0.0", FrontendKind::NodePort, ten);
    let chains = frontend_chains(&np);
    assert_eq!(chains.len(), 1);
    assert_eq!(
        chains[0].1[0],
        format!("-A {} -j TWILL-MARK-MASQ", chains[0].0)
    );
    assert_eq!(chains[0].1.len(), 11);
    // One remote endpoint of a NodePort still needs the mark: an SVC chain.
    let np1 = svc_at(
        4,
        "0.0.0.0",
        FrontendKind::NodePort,
        vec![be("10.0.2.2", false)],
    );
    assert_eq!(frontend_chains(&np1)[0].1.len(), 2);
    // One local endpoint: straight to its SEP chain (hairpin).
    let local = cluster_ip(5, vec![be("10.0.1.2", true)]);
    let k = local.frontend.key();
    let sep = sep_chain(&k, "10.0.1.2".parse().unwrap(), 8080);
    assert!(dispatch_rule(&local).ends_with(&format!("-j {sep}")));
    assert_eq!(chain_names(&local), vec![sep]);
    // Affinity: every endpoint has a SEP chain with `recent --set`, even a single one.
    let mut aff = cluster_ip(6, vec![be("10.0.2.2", false)]);
    aff.affinity_timeout_secs = Some(60);
    let chains = frontend_chains(&aff);
    assert_eq!(chains.len(), 2);
    assert!(chains[0].1[0].contains("--rcheck --seconds 60 --reap"));
    assert!(chains[1].1[0].contains("-m recent --set"));
    // Policy Local: no masquerade, hairpin only.
    let mut etp = svc_at(
        7,
        "192.0.2.7",
        FrontendKind::ExternalIp,
        vec![be("10.0.1.2", true)],
    );
    etp.external_local = true;
    let chains = frontend_chains(&etp);
    assert_eq!(chains.len(), 1);
    assert_eq!(chains[0].1.len(), 2);
    assert!(chains[0].1[0].contains(" -s 10.0.1.2/32 "));
    // No endpoints: REJECT in filter, no chain.
    let none = cluster_ip(8, vec![]);
    assert_eq!(table_of(&none), FILTER);
    assert!(dispatch_rule(&none).ends_with("-j REJECT --reject-with icmp-port-unreachable"));
    assert!(frontend_chains(&none).is_empty());
}

#[test]
fn signatures_ignore_save_formatting() {
    assert_eq!(
        signature("-A X -j MARK --or-mark 0x4000"),
        signature("-A X -j MARK --set-xmark 0x4000/0x4000")
    );
    assert_eq!(
        signature("-A X -m statistic --mode random --probability 0.3333333333"),
        signature("-A X -m statistic --mode random --probability 0.33333333349")
    );
    assert_ne!(
        signature("-A X -j DNAT --to-destination 10.0.0.1:80"),
        signature("-A X -j DNAT --to-destination 10.0.0.2:80")
    );
    assert_eq!(
        tokens("-A X --comment \"a b\" -j Y"),
        vec!["-A", "X", "--comment", "a b", "-j", "Y"]
    );
    assert!(same_rule(
        "-A X -j MARK --set-xmark 0x4000/0x0",
        "-A X -j MARK --xor-mark 0x4000"
    ));
}

/// Every shape of the layout, v4 and v6.
#[allow(clippy::many_single_char_names)]
fn zoo() -> Vec<LbService> {
    let mut a = cluster_ip(1, vec![be("10.0.1.2", true), be("10.0.2.2", false)]);
    a.affinity_timeout_secs = Some(60);
    let n = svc_at(
        2,
        "0.0.0.0",
        FrontendKind::NodePort,
        vec![be("10.0.1.2", true)],
    );
    let e = cluster_ip(3, vec![]);
    let d = cluster_ip(4, vec![be("10.0.2.4", false)]);
    let mut t = svc_at(
        5,
        "198.51.100.5",
        FrontendKind::LoadBalancer,
        vec![be("10.0.2.5", false), be("10.0.3.5", false)],
    );
    for b in &mut t.backends {
        b.state = BackendState::ServingTerminating;
    }
    let mut l = svc_at(
        6,
        "192.0.2.6",
        FrontendKind::ExternalIp,
        vec![be("10.0.1.6", true)],
    );
    l.external_local = true;
    let mut m = svc_at(
        7,
        "0.0.0.0",
        FrontendKind::NodePort,
        vec![be("10.0.1.7", true), be("10.0.2.7", false)],
    );
    m.frontend.port = 30082;
    let mut n7 = m.clone();
    n7.frontend.port = 30081;
    n7.id = 8;
    n7.backends.clear();
    let mut v6 = svc_at(
        9,
        "fd96::9",
        FrontendKind::ClusterIp,
        vec![be("fd00::2", true), be("fd00::3", false)],
    );
    v6.affinity_timeout_secs = Some(10800);
    let v6one = svc_at(
        10,
        "fd96::10",
        FrontendKind::ClusterIp,
        vec![be("fd00::4", false)],
    );
    vec![a, n, e, d, t, l, m, n7, v6, v6one]
}

fn family(services: &[LbService], v6: bool) -> Vec<&LbService> {
    services
        .iter()
        .filter(|s| s.frontend.ip.is_ipv6() == v6)
        .collect()
}

fn sorted(mut v: Vec<LbService>) -> Vec<LbService> {
    v.sort_by_key(|s| s.frontend.key());
    v
}

#[test]
fn read_back_round_trips_every_shape() {
    let all = zoo();
    for v6 in [false, true] {
        let want = family(&all, v6);
        let text = saved_text(&want);
        let saved = Saved::parse(&text);
        let found = reconstruct(&saved, v6);
        assert!(found.stray.is_empty() && found.junk.is_empty(), "{found:?}");
        assert_eq!(
            sorted(found.services()),
            sorted(want.iter().map(|s| (*s).clone()).collect())
        );
        // In order: nothing to repair, and a plan against it is empty.
        assert_eq!(repair_input(&saved, &found), "");
        let have = found.frontends;
        for s in &want {
            let p = &have[&s.frontend.key()];
            assert!(!p.drifted);
            assert_eq!(p, &Programmed::applied(s));
        }
    }
}

#[test]
fn read_back_detects_drift_strays_and_junk() {
    let all = zoo();
    let want = family(&all, false);
    let text = saved_text(&want);
    // A changed DNAT target reads back as that endpoint: the plan rewrites the frontend.
    let broken = text.replacen(
        "--to-destination 10.0.2.4:8080",
        "--to-destination 10.0.9.9:8080",
        1,
    );
    let found = reconstruct(&Saved::parse(&broken), false);
    let desired: Vec<LbService> = want.iter().map(|s| (*s).clone()).collect();
    let p = plan(&desired, &found.services());
    assert_eq!(p.upserts.len(), 1);
    assert_eq!(p.upserts[0].id, 4);
    assert_eq!(p.stale_backends.len(), 1);
    // A rule that renders from nothing the rules tell (a changed split) makes the frontend
    // drifted and nothing else.
    let chain = svc_chain(&want[0].frontend.key());
    let broken = with_line_edited(&text, &chain, "--probability 0.5", "--probability 0.9");
    let found = reconstruct(&Saved::parse(&broken), false);
    let drifted: Vec<u32> = found
        .frontends
        .values()
        .filter(|p| p.drifted)
        .map(|p| p.svc.id)
        .collect();
    assert_eq!(drifted, vec![1]);
    assert!(
        found
            .services()
            .iter()
            .any(|s| s.name == "default/s1:http (drifted)")
    );
    // A missing hairpin rule too (the endpoint then reads as remote).
    let sep = sep_chain(&want[1].frontend.key(), "10.0.1.2".parse().unwrap(), 8080);
    let broken = text.replace(&format!("-A {sep} -s 10.0.1.2/32 -j TWILL-MARK-MASQ\n"), "");
    let found = reconstruct(&Saved::parse(&broken), false);
    assert!(found.frontends[&want[1].frontend.key()].drifted);
    // A stray chain, a chain of ours someone else jumps to, a duplicate dispatch rule and
    // a foreign rule in a dispatch chain.
    let dup = dispatch_rule(want[3]);
    let extra = format!(
        "*nat\n:TWILL-SEP-0000000000000000 - [0:0]\n:TWILL-SVC-1111111111111111 - [0:0]\n\
         :FOREIGN - [0:0]\n-A FOREIGN -j TWILL-SVC-1111111111111111\n{dup}\n\
         -A TWILL-SERVICES -d 10.1.1.1/32 -j ACCEPT\nCOMMIT\n"
    );
    let text2 = format!("{text}{extra}");
    let saved = Saved::parse(&text2);
    let found = reconstruct(&saved, false);
    assert_eq!(
        found.stray,
        vec![(NAT, "TWILL-SEP-0000000000000000".to_string())]
    );
    assert_eq!(found.junk, vec![(NAT, SERVICES)]);
    assert!(found.frontends.values().all(|p| !p.drifted));
    let input = repair_input(&saved, &found);
    // TWILL-SERVICES is rewritten with exactly one rule per frontend it holds.
    assert!(input.contains(":TWILL-SERVICES - [0:0]\n"), "{input}");
    assert_eq!(input.matches(&dup).count(), 1, "{input}");
    let in_services = found
        .frontends
        .values()
        .filter(|p| p.table == NAT && p.dispatch.starts_with("-A TWILL-SERVICES "))
        .count();
    assert_eq!(input.matches("\n-A TWILL-SERVICES ").count(), in_services);
    assert!(input.contains("-X TWILL-SEP-0000000000000000\n"));
    assert!(!input.contains("TWILL-SVC-1111111111111111"));
    assert!(!input.contains("*filter"));
}

#[test]
fn repair_restores_static_chains_and_jumps_in_order() {
    let text = "*nat\n:PREROUTING ACCEPT [0:0]\n:TWILL-MARK-MASQ - [0:0]\n\
                -A PREROUTING -m comment --comment \"twill node ports\" -m addrtype \
                --dst-type LOCAL -j TWILL-NODEPORTS\n\
                -A TWILL-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\nCOMMIT\n";
    let saved = Saved::parse(text);
    let found = reconstruct(&saved, false);
    let input = repair_input(&saved, &found);
    for want in [
        ":TWILL-POSTROUTING - [0:0]\n",
        ":TWILL-SERVICES - [0:0]\n",
        ":TWILL-NODEPORTS - [0:0]\n",
        "-D PREROUTING -m comment --comment \"twill node ports\"",
        "-I PREROUTING 1 -m comment --comment \"twill service portals\" -j TWILL-SERVICES\n",
        "-I PREROUTING 2 -m comment --comment \"twill node ports\"",
        "-I POSTROUTING 1 ",
        "*filter\n:TWILL-SERVICES - [0:0]\n",
        "-I FORWARD 1 ",
    ] {
        assert!(input.contains(want), "{want} missing:\n{input}");
    }
    // The static chain in order is left as it is.
    assert!(!input.contains(":TWILL-MARK-MASQ"));
}

fn programmed(services: &[&LbService]) -> BTreeMap<FrontendKey, Programmed> {
    services
        .iter()
        .map(|s| (s.frontend.key(), Programmed::applied(s)))
        .collect()
}

#[test]
fn partial_sync_rewrites_only_changed_chains() {
    let a = cluster_ip(1, vec![be("10.0.1.2", true), be("10.0.2.2", false)]);
    let b = cluster_ip(2, vec![be("10.0.2.3", false), be("10.0.2.4", false)]);
    let have = programmed(&[&a, &b]);
    let k = a.frontend.key();
    // a loses its local endpoint: the SEP chain goes, the dispatch rule now DNATs.
    let mut a2 = a.clone();
    a2.backends.remove(0);
    let p = plan(&[a2.clone(), b.clone()], &[a.clone(), b.clone()]);
    let ups: Vec<&LbService> = p.upserts.iter().map(|s| &**s).collect();
    let input = render_plan(&have, &ups, &[]);
    let sep = sep_chain(&k, "10.0.1.2".parse().unwrap(), 8080);
    let mut gone = [svc_chain(&k), sep.clone()];
    gone.sort();
    assert_eq!(
        input,
        format!(
            "*nat\n:{c0} - [0:0]\n:{c1} - [0:0]\n{del}\n{add}\n-X {c0}\n-X {c1}\nCOMMIT\n",
            c0 = gone[0],
            c1 = gone[1],
            del = dispatch_rule(&a).replacen("-A ", "-D ", 1),
            add = dispatch_rule(&a2),
        )
    );
    // b's endpoint changes: only its SVC chain is rewritten, the dispatch rule stays.
    let mut b2 = b.clone();
    b2.backends[1].port = 9090;
    let input = render_plan(&have, &[&b2], &[]);
    let kb = b.frontend.key();
    assert!(input.starts_with(&format!("*nat\n:{} - [0:0]\n", svc_chain(&kb))));
    assert!(!input.contains("TWILL-SERVICES"));
    assert_eq!(input.lines().count(), 5, "{input}");
    // Losing every endpoint moves the frontend to a REJECT rule in filter.
    let mut gone = b.clone();
    gone.backends.clear();
    let input = render_plan(&have, &[&gone], &[]);
    assert!(input.contains("-D TWILL-SERVICES -d 10.96.0.2/32"));
    assert!(input.contains(&format!("-X {}", svc_chain(&kb))));
    assert!(input.contains("*filter\n-A TWILL-SERVICES -d 10.96.0.2/32"));
    assert!(input.contains("-j REJECT --reject-with icmp-port-unreachable"));
    // Deleting removes the rule and every chain.
    let input = render_plan(&have, &[], &[k]);
    assert!(input.contains(&dispatch_rule(&a).replacen("-A ", "-D ", 1)));
    assert!(input.contains(&format!("-X {sep}")));
    // A new service: its chains, then its dispatch rule.
    let input = render_plan(&BTreeMap::new(), &[&b], &[]);
    let svc_at = input.find(&format!("-A {}", svc_chain(&kb))).unwrap();
    assert!(svc_at < input.find("-A TWILL-SERVICES").unwrap());
}

#[test]
fn drifted_frontend_is_rewritten_from_what_the_kernel_holds() {
    let all = zoo();
    let want = family(&all, false);
    let text = saved_text(&want);
    // Someone edited a's dispatch rule (another comment) and an SVC rule.
    let a = want[0];
    let k = a.frontend.key();
    let broken = with_line_edited(
        &text,
        &svc_chain(&k),
        "--probability 0.5",
        "--probability 0.9",
    )
    .replace(
        "\"1 ClusterIP - 60 default/s1:http\"",
        "\"1 ClusterIP - 60 test/edited\"",
    );
    let found = reconstruct(&Saved::parse(&broken), false);
    let p = &found.frontends[&k];
    assert!(p.drifted);
    assert_eq!(p.svc.name, "test/edited");
    // The plan upserts it; the input deletes the rule as the kernel holds it (a `-D` of
    // anything else would fail the whole restore) and rewrites every chain.
    let pl = plan(std::slice::from_ref(a), &found.services());
    assert_eq!(pl.upserts.len(), 1);
    let input = render_plan(&found.frontends, &[a], &[]);
    assert!(input.contains("-D TWILL-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"1 ClusterIP - 60 test/edited\""), "{input}");
    for c in chain_names(a) {
        assert!(input.contains(&format!(":{c} - [0:0]")), "{c}: {input}");
    }
    assert!(input.contains(&dispatch_rule(a)));
    // Applied, the kernel holds exactly what the service renders to.
    let mut after = found.frontends.clone();
    after.insert(k, Programmed::applied(a));
    assert_eq!(after[&k], Programmed::applied(a));
}

#[test]
fn blob_digest_ignores_counters_not_rules() {
    // Two fake ipt_entry records (112-byte header + 8 bytes of target).
    let entry = |dst: u8, pcnt: u64| {
        let mut e = vec![0u8; 120];
        e[4] = dst;
        e[88..90].copy_from_slice(&112u16.to_ne_bytes());
        e[90..92].copy_from_slice(&120u16.to_ne_bytes());
        e[92..96].copy_from_slice(&7u32.to_ne_bytes());
        e[96..104].copy_from_slice(&pcnt.to_ne_bytes());
        e[112] = 0xAB;
        e
    };
    let digest = |blob: &[u8], v6| {
        let mut h = std::hash::DefaultHasher::new();
        blob_digest(blob, v6, &mut h);
        h.finish()
    };
    let a = [entry(1, 0), entry(2, 5)].concat();
    let b = [entry(1, 999), entry(2, 6)].concat();
    let c = [entry(1, 0), entry(3, 5)].concat();
    assert_eq!(digest(&a, false), digest(&b, false));
    assert_ne!(digest(&a, false), digest(&c, false));
    // A target byte changes the digest too.
    let mut d = a.clone();
    d[120 + 112] = 0xAC;
    assert_ne!(digest(&a, false), digest(&d, false));
    // Garbage does not loop or panic.
    let _ = digest(&[0u8; 7], true);
    let _ = digest(&[0xffu8; 300], true);
}

#[test]
fn backend_choice_never_mixes() {
    assert_eq!(
        choose_backend((true, 5), (false, 100), "").0,
        IptBackend::Legacy
    );
    assert_eq!(choose_backend((false, 5), (true, 0), "").0, IptBackend::Nft);
    assert_eq!(
        choose_backend((false, 50), (false, 3), "").0,
        IptBackend::Legacy
    );
    assert_eq!(
        choose_backend((false, 0), (false, 0), "iptables v1.8.9 (nf_tables)").0,
        IptBackend::Nft
    );
    assert_eq!(
        choose_backend((false, 0), (false, 0), "iptables v1.8.9 (legacy)").0,
        IptBackend::Legacy
    );
}
