//! Service load balancing: the service model, its sources, the desired LB state and the seam
//! every proxy mode (eBPF, nftables, iptables) implements.
//!
//! The flow is the agent's usual one: **source → model → desired → plan → dataplane seam**.
//! - [`model`]: Kubernetes `v1 Service` and `discovery.k8s.io/v1 EndpointSlice`, parsed from
//!   YAML or JSON exactly as `kubectl get -o yaml` prints them, and validated.
//! - [`source`]: the [`source::ServiceStore`] seam and its stores ([`source::etcd`], objects under
//!   `<prefix>/services/`; [`source::mem`] for tests; [`source::kube`], the API server),
//!   list+watch into updates.
//! - [`sync`]: [`sync::run_services`], the loop that turns updates into plans for a dataplane,
//!   with the guard against a store that lost everything; [`metrics`] holds what it exports.
//! - [`desired`]: a pure function from a snapshot and this node's identity to [`lb::LbService`]s
//!   (kube-proxy semantics resolved there, once, for every dataplane).
//! - [`maglev`]: the Maglev table each service carries.
//! - [`lb`]: the dataplane-facing desired state, [`lb::plan`] (the minimal diff) and the
//!   [`lb::LbDataplane`] seam with its recording fake.
//! - [`cli`]: `twilld apply -f`, `twilld delete -f`, `twilld get services`.
//! - [`nft`] and [`iptables`]: the netfilter dataplanes (the eBPF one is in `crate::shared::bpf`), with
//!   [`nfnl`] (nf_tables/ctnetlink netlink) and [`conntrack`] (UDP entries of removed
//!   backends); [`dataplane`] picks one for `--proxy-mode` and removes the others' state.
//!
//! The agent wires it with one call, once it knows the node's name and addresses:
//! `tokio::spawn(sync::run_services(source::etcd::EtcdServiceStore::new(client, &prefix), node,
//! dataplane, resync, metrics))`; `metrics.render()` is appended to `/metrics`.

pub mod cli;
pub mod dataplane;
pub mod desired;
pub mod healthz;
pub mod lb;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod source;
pub mod sync;
#[cfg(test)]
pub(crate) mod testutil;
