//! Privileged test of `twill_agent::overlay::counter::PacketCounter`: build, load, verify, attach (TCX) and
//! read the per-interface counter on a real veth.
//!
//! Why it is shaped as it is:
//! - Two throw-away network namespaces joined by a veth with 10.250.0.0/30 addresses, made by
//!   twill-tests' namespace guard: every packet stays inside them, names are unique, and the
//!   guard deletes both namespaces on drop, pass or fail.
//! - The counter is attached from a dedicated thread that did `setns` into namespace A, the way
//!   `twilld` attaches by ifname in its own namespace; setns affects only the calling thread, and
//!   the resulting links and map fds keep working from any thread afterwards.
//! - Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for setns). Without root it skips loudly,
//!   except under `CI=true`, where a skip would hide a broken pipeline, so it fails.

use aya::programs::{SchedClassifier, TcAttachType};
use common::{error_chain, ip_batch, run_in};
use twill_agent::overlay::counter::{Counts, PacketCounter};
use twill_agent::shared::bpf::EbpfError;
use twill_common::counter::{PROG_EGRESS, PROG_INGRESS};
use twill_tests::{NetnsGuard, in_netns, require_root};

mod common;

/// Pings sent from namespace A to B.
const PINGS: u64 = 5;
/// IP-level size of a default `ping` echo (20 IP + 8 ICMP + 56 payload); `skb->len` at TC adds
/// the 14-byte Ethernet header on top.
const ECHO_IP_BYTES: u64 = 84;
const ADDR_A: &str = "10.250.0.1";
const ADDR_B: &str = "10.250.0.2";

/// Names of the TCX programs attached to `ifname` at `attach_type`, queried from inside `ns`.
fn tcx_programs(ns: &str, ifname: &str, attach_type: TcAttachType) -> Vec<String> {
    in_netns(ns, || {
        let (_revision, programs) = SchedClassifier::query_tcx(ifname, attach_type)
            .unwrap_or_else(|err| panic!("query tcx {ifname}: {err}"));
        Ok(programs
            .iter()
            .map(|info| info.name_as_str().unwrap_or_default().to_owned())
            .collect())
    })
    .unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn counts_veth_traffic_both_ways() {
    if !require_root() {
        return;
    }

    let guard = NetnsGuard::new().expect("namespace guard");
    let names = guard.netns_all(&["a", "b"]).expect("namespaces");
    let (a, b) = (&names[0], &names[1]);
    let (veth_a, veth_b) = ("vetha", "vethb");
    ip_batch(
        a,
        &format!(
            "link add {veth_a} type veth peer name {veth_b} netns {b}\n\
             addr add {ADDR_A}/30 dev {veth_a}\nlink set {veth_a} up\n"
        ),
    );
    ip_batch(
        b,
        &format!("addr add {ADDR_B}/30 dev {veth_b}\nlink set {veth_b} up\n"),
    );

    let counter = in_netns(a, || Ok(PacketCounter::attach(veth_a)))
        .unwrap_or_else(|e| panic!("{e:#}"))
        .unwrap_or_else(|err| panic!("attach counter to {veth_a}: {}", error_chain(err)));
    assert_eq!(counter.ifname(), veth_a);
    assert!(tcx_programs(a, veth_a, TcAttachType::Ingress).contains(&PROG_INGRESS.to_owned()));
    assert!(tcx_programs(a, veth_a, TcAttachType::Egress).contains(&PROG_EGRESS.to_owned()));
    let before = counter.read().expect("read counts");

    let count = PINGS.to_string();
    run_in(
        a,
        &["ping", "-c", &count, "-i", "0.2", "-W", "1", "-q", ADDR_B],
    );

    let Counts {
        rx_packets,
        rx_bytes,
        tx_packets,
        tx_bytes,
    } = counter.read().expect("read counts");
    eprintln!("before ping: {before:?}");
    eprintln!("after ping: rx {rx_packets} pkts {rx_bytes} B, tx {tx_packets} pkts {tx_bytes} B");
    assert!(rx_packets >= PINGS, "rx_packets {rx_packets} < {PINGS}");
    assert!(tx_packets >= PINGS, "tx_packets {tx_packets} < {PINGS}");
    assert!(
        rx_bytes >= PINGS * ECHO_IP_BYTES,
        "rx_bytes {rx_bytes} too small"
    );
    assert!(
        tx_bytes >= PINGS * ECHO_IP_BYTES,
        "tx_bytes {tx_bytes} too small"
    );

    // Drop detaches both programs.
    drop(counter);
    for (attach_type, program) in [
        (TcAttachType::Ingress, PROG_INGRESS),
        (TcAttachType::Egress, PROG_EGRESS),
    ] {
        let programs = tcx_programs(a, veth_a, attach_type);
        assert!(
            !programs.contains(&program.to_owned()),
            "{program} still attached after drop: {programs:?}"
        );
    }

    // An unknown interface is an attach error naming the interface, with the errno kept.
    let err = in_netns(a, || Ok(PacketCounter::attach("twe-no-such-if")))
        .unwrap_or_else(|e| panic!("{e:#}"))
        .expect_err("attach to a missing interface");
    assert!(
        matches!(&err, EbpfError::Attach { ifname, .. } if ifname == "twe-no-such-if"),
        "unexpected error: {}",
        error_chain(err)
    );
}
