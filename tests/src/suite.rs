//! What the end-to-end suites share on top of [`Rig`]: a cluster of nodes running twilld with
//! one pod each, brought up in one call; the "every pod reaches every other" check with the
//! routes that explain a failure; twilld's log read without its colours.
//!
//! Set-ups one test needs stay in the test file; what two suites need comes here, and what
//! every rig user needs is a [`Rig`] method.

use std::net::IpAddr;
use std::time::Duration;

use twill_facts::SubnetFacts;

use crate::{Pod, Rig, ping, routes, wait_until};

/// How long the suites give a node to lease its subnet and a pod's first ping to cross.
pub const UP: Duration = Duration::from_secs(15);

/// A rig of `n` nodes on `config`, twilld (with `extra` args) on every node, and one pod on each:
/// the rig, the nodes' subnet facts and the pods, in node order.
pub fn cluster(config: &str, n: usize, extra: &[&str]) -> (Rig, Vec<SubnetFacts>, Vec<Pod>) {
    let rig = Rig::configured(n, config);
    let nodes: Vec<usize> = (1..=n).collect();
    let (facts, pods) = start_with_pods(&rig, &nodes, extra);
    (rig, facts, pods)
}

/// Starts twilld (with `extra` args) on each of `nodes`, waits for their subnet files and puts
/// one pod on each: the facts and the pods, in the order of `nodes`.
pub fn start_with_pods(rig: &Rig, nodes: &[usize], extra: &[&str]) -> (Vec<SubnetFacts>, Vec<Pod>) {
    let facts = start_nodes(rig, nodes, extra);
    let pods = pods_on(rig, nodes, &facts);
    (facts, pods)
}

/// Starts twilld (with `extra` args) on each of `nodes` and waits for their subnet files: the
/// facts, in the order of `nodes`.
pub fn start_nodes(rig: &Rig, nodes: &[usize], extra: &[&str]) -> Vec<SubnetFacts> {
    for &node in nodes {
        rig.start_twilld(node, extra)
            .unwrap_or_else(|e| panic!("start twilld on n{node}: {e:#}"));
    }
    wait_facts(rig, nodes.iter().copied(), UP)
}

/// Waits for the subnet file of each of `nodes`; a panic with the agent's log if one does not
/// come within `timeout`.
pub fn wait_facts(
    rig: &Rig,
    nodes: impl IntoIterator<Item = usize>,
    timeout: Duration,
) -> Vec<SubnetFacts> {
    nodes
        .into_iter()
        .map(|node| {
            rig.wait_subnet_file(node, timeout)
                .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.twilld_log(node)))
        })
        .collect()
}

/// One pod on each of `nodes`, the `i`-th in the subnet of `facts[i]`.
pub fn pods_on(rig: &Rig, nodes: &[usize], facts: &[SubnetFacts]) -> Vec<Pod> {
    nodes
        .iter()
        .zip(facts)
        .map(|(&node, f)| {
            rig.add_pod(node, f)
                .unwrap_or_else(|e| panic!("pod on n{node}: {e:#}"))
        })
        .collect()
}

/// Pod `from` reaches pod `to` (IPv6 if `v6`) within [`UP`] of bounded pings; otherwise a panic
/// with every agent's log and the routes of `from`'s node.
pub fn assert_reaches(rig: &Rig, from: &Pod, to: &Pod, v6: bool) {
    let dst: IpAddr = if v6 {
        to.ipv6.expect("pod v6").into()
    } else {
        to.ipv4.expect("pod v4").into()
    };
    let ok = wait_until(UP, || {
        ping(&from.ns, dst, 1).is_ok_and(|s| s.all_received())
    });
    if ok.is_err() {
        rig.print_logs();
        panic!(
            "pod on n{} cannot reach pod on n{} at {dst}\nroutes of n{}:\n{}",
            from.node,
            to.node,
            from.node,
            routes(&rig.node_ns(from.node)).unwrap_or_default()
        );
    }
}

/// Every pod reaches every other (see [`assert_reaches`]), waiting for the overlay to converge.
pub fn assert_full_mesh(rig: &Rig, pods: &[Pod], v6: bool) {
    for a in pods {
        for b in pods.iter().filter(|b| *b != a) {
            assert_reaches(rig, a, b, v6);
        }
    }
}

/// `text` without ANSI escape sequences (tracing colours twilld's log when it likes): each
/// `ESC [ parameters letter` sequence dropped.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(char::is_ascii_alphabetic);
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn strip_ansi_drops_colour_sequences_only() {
        let line = "\u{1b}[2m2026-12-04T15:44:15Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m udp workers=\u{1b}[1m4";
        assert_eq!(strip_ansi(line), "2026-12-04T15:44:15Z  INFO udp workers=4");
        assert_eq!(strip_ansi("plain [text]"), "plain [text]");
    }
}
