//! `bench services`: what a connection to a Service VIP costs in each proxy mode as the number
//! of services grows, against the same connection to the backend's pod IP, and how long the
//! agent takes to program all services and one change — with the hand-written kernel rules of
//! ENVIRONMENT.md (an nft verdict map, iptables-legacy chains) measured in the same run.
//!
//! Why it is shaped as it is:
//! - Per proxy mode one rig of its own: node 1 hosts the backends (pods `a` and `b`, made by
//!   twill-cni, each a `twill-probe serve` answering its name on :8080 and :8081), node 2 the
//!   client pod and the only twilld with a service proxy, so every figure is that node's
//!   dataplane, not two agents' share of two cores. `--resync-interval 3600`: no periodic full
//!   resync disturbs a measurement. Extra nodes (one per repetition) exist only to start a
//!   fresh twilld whose first full sync is timed.
//! - The client is `twill-probe rate`: fresh TCP connections one at a time, the server closing
//!   first (the client never runs out of ports), run inside the client pod *and* node 2's cgroup
//!   (the eBPF socket-level load balancer sees it, as it sees a real pod's processes). The VIP
//!   goes to `a:8080`, the direct measurement to `a:8081`: mixing both on one port would make
//!   the server's TIME_WAIT sockets reject SYNs whose timestamps come from another offset (PAWS).
//! - The measured service is the last one matched: at every step a new service is created
//!   *after* the fillers, with the name that sorts last and the highest VIP, so a linear
//!   dataplane (iptables) meets it after all the others whatever order it keeps. Fillers (10
//!   endpoints each, addresses nothing answers on) are written straight into etcd in 128-object
//!   transactions; 30k `twilld apply` calls would take longer than the measurement.
//! - Repetitions interleave VIP and direct (alternating which goes first), and figures are
//!   medians; a VIP/direct ratio is the median of the per-repetition pairs. "Rate at N / rate
//!   at 1" compares medians of different steps of one run (the direct figures show how much
//!   the machine drifted meanwhile).
//! - Sync times come from the agent: `twill_services_sync_duration_seconds` (its histogram's sum
//!   and count, read from /metrics before and after) is the time to plan and apply; the time
//!   from the etcd write until the client's connections land on the new backend (`twill-probe
//!   follow`, timestamped as its lines arrive) is the end-to-end figure.
//! - A mode the twilld in use does not accept (the nftables and iptables dataplanes come from
//!   another branch) is reported "unavailable" with twilld's own words, never as a zero.

mod baselines;
mod bench;
mod measure;
mod objects;
mod params;
mod report;
mod rig;
#[cfg(test)]
mod tests;

pub use bench::Services;
pub(crate) use objects::filler_entries;
