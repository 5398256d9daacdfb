//! The overlay backends: what each puts in the kernel per node and per peer.

pub mod udp;
