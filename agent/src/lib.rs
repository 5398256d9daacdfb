//! twill's node agent, `twilld`, as a library.
//!
//! The shape follows one pattern for every part: **sources → model → desired state → diff
//! against observed → plan → apply through a seam**, with a periodic resync that heals drift.
//! Sources (etcd leases) never touch the kernel; the model ([`config`], [`lease`]) is plain data;
//! desired state and the plan ([`overlay`]) are pure functions unit-tested without root; every
//! kernel effect crosses the [`kernel::Kernel`] seam (rtnetlink, or a recording fake in tests),
//! and every etcd effect crosses [`store::LeaseStore`].
#![deny(missing_docs)]

pub mod daemon;
pub mod overlay;
pub mod services;
pub mod shared;
