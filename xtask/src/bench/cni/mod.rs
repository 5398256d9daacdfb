//! `bench cni`: how long a runtime waits for `twill-cni`, against the reference plugins it
//! replaces (containernetworking-plugins' `bridge` + `host-local`, which flannel's CNI plugin
//! delegates to), one pod at a time and 100 pods at once.
//!
//! Why it is shaped as it is:
//! - Plugins are exec'ed exactly as a runtime on the node execs them: a fresh process with the
//!   `CNI_*` environment and the network config on stdin, spawned by a thread that has joined
//!   the node's namespace (no `nsenter` or shell in the timed path; the bridge and the host veths
//!   land in the node). The clock runs from just before the spawn to the plugin's exit, seen with
//!   `waitid(WNOWAIT)`, i.e. before the pipes are drained and the child is reaped: the cost of a
//!   runtime's CNI call, process start included. `/bin/true` exec'ed the same way, in the same
//!   loop, is the floor no plugin can beat; the figures read best against it.
//! - One rig node without etcd or twilld (the plugins read only the subnet file, written here),
//!   and pod namespaces made by the rig, so a killed run is swept like any other. The pods' own
//!   hand-made `eth0` is left alone: the plugins attach `eth1` (twill, bridge `twb0`), `eth2`
//!   (twill, routed) and `eth3` (reference, bridge `twr0`), each on a subnet of its own.
//! - Interleaved: per pod, one ADD of each plugin and one `/bin/true`, back to back, the first
//!   one rotating; then the DELs the same way (with `prevResult`, as libcni passes it from 0.4.0
//!   on). Plugins are compared under the same background load, which on a shared two-core
//!   machine moves absolute figures by tens of percent. One ADD/DEL per plugin before the timed
//!   ones builds the bridges and warms the page cache (a node's first pod pays that once).
//! - Concurrent: 100 threads released by one barrier each exec an ADD — a runtime starting 100
//!   pods at once — then 100 DELs; per-call percentiles and the makespan. twill, the reference
//!   and 100 concurrent `/bin/true` take turns, the order rotating between repetitions; the
//!   `/bin/true` batch is the floor of what 100 simultaneous process starts cost on this many
//!   CPUs.
//! - Every call is bounded (a watchdog SIGKILLs a plugin after 30 s, or on Ctrl-C) and checked
//!   (exit status 0; an ADD result with an address; after a concurrent ADD, 100 distinct
//!   addresses and 100 ports on the bridge), so a broken plugin fails the run instead of
//!   producing a fast figure.

mod bench;
mod measure;
mod node;
mod params;
mod report;
#[cfg(test)]
mod tests;

pub use bench::Cni;
