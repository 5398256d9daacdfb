//! What both loops and the daemon use: the etcd and Kubernetes clients, netfilter's netlink
//! messages, the embedded eBPF object, the HTTP server and the node's metrics registry.

pub mod backoff;
pub mod bpf;
pub mod etcd;
pub mod http;
pub mod kube;
pub mod memory;
pub mod metrics;
pub mod nfnl;
pub mod shutdown;
#[cfg(test)]
pub(crate) mod testutil;
