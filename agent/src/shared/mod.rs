//! What both loops and the daemon use: the etcd and Kubernetes clients, netfilter's netlink
//! messages, the embedded eBPF object, the HTTP server and the node's metrics registry.

pub mod bpf;
pub mod http;
pub mod kube;
pub mod metrics;
pub mod nfnl;
