//! xtask's reusable parts as a library: the benchmarks (`cargo xtask bench`) and the helpers
//! the commands share. The binary (`main.rs`) is the command line; the privileged smoke test
//! (`tests/bench_smoke.rs`) calls [`bench::run`] directly instead of shelling out to cargo.

#![deny(missing_docs)]

pub mod bench;
pub mod cluster;
pub mod util;
