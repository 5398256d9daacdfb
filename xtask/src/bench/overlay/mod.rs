//! `bench overlay`: pod-to-pod throughput and latency through twill against the same rig built
//! by hand with `ip`/`bridge` (the kernel baseline twill must match), and the time from a lease
//! written in etcd to the node's routes being programmed.
//!
//! Why it is shaped as it is:
//! - Each configuration is a rig of its own with two nodes and a pod on each, all alive for the
//!   whole run: twill's (etcd, twilld on both nodes, the backend under test) and the kernel's
//!   (no etcd, no twilld; flannel's VXLAN recipe from ENVIRONMENT.md, or host-gw's one route per
//!   peer). The kernel rig copies the twill rig's subnets, MTU, addresses and pod layout, so the
//!   only difference a packet meets is who programmed the path.
//! - Repetitions interleave: within a repetition each test runs on every configuration back to
//!   back, twill right next to its baseline (the pair's order alternates, the pairs' order
//!   rotates), so the two are always measured seconds apart under the same background load.
//!   Figures are medians of the repetitions; a ratio is the median of the repetitions' paired
//!   ratios (twill over the baseline measured next to it), which cancels the slow drift of a
//!   shared machine's load better than a ratio of medians.
//! - The udp backend has no kernel twin: its target is a ratio to kernel VXLAN. A twilld that
//!   refuses `udp` (the backend is still being written) makes the run note the skip, not fail.
//! - Lease-to-programmed: fake peers' leases are written one at a time through etcd's HTTP
//!   gateway (no `etcdctl` start-up in the measurement), and `ip monitor` / `bridge monitor` in
//!   node 1's namespace timestamp the kernel's notifications. "Programmed" is the last of the
//!   route, the neighbour and the FDB entry for VXLAN (a packet needs all three), the route for
//!   the others; removal is timed to the route's deletion (what stops traffic).

mod bench;
mod iperf;
mod lease;
mod measure;
mod params;
mod report;
mod setup;
#[cfg(test)]
mod tests;

pub use bench::Overlay;
pub(crate) use lease::peer_monitor;
