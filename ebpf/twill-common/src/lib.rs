//! Types and names shared by twill's eBPF programs (`twill-ebpf`) and user space (`twill-agent`).
//!
//! Why this crate is shaped as it is:
//! - It is `#![no_std]` and dependency-free so that the kernel side can build it for
//!   `bpfel-unknown-none`; the `user` feature adds the `aya::Pod` impls user space needs to read
//!   maps, without pulling aya into the eBPF build.
//! - Every map key and value is `#[repr(C)]`, `Copy`, with explicit padding fields and no
//!   `bool`, so both sides agree on the layout byte for byte; the layout is pinned by
//!   compile-time size assertions.
//! - Map, program and slot names live here, next to the types, so that a rename on one side is a
//!   compile error on the other rather than a "map not found" at load time.
#![no_std]

pub mod service;

/// Packet and byte totals for one direction of one interface, for one CPU.
///
/// The kernel side keeps one of these per CPU and per slot (see [`counter`]) in a per-CPU array,
/// so updates need no atomics; user space sums the per-CPU copies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCount {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen: `skb->len`, which at TC includes the L2 (Ethernet) header.
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<PacketCount>() == 16);
const _: () = assert!(core::mem::align_of::<PacketCount>() == 8);

impl PacketCount {
    /// Adds `other` to `self`, wrapping on overflow like the kernel-side counters do.
    #[must_use]
    pub const fn wrapping_add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

// SAFETY: `PacketCount` is `#[repr(C)]`, `Copy`, made only of integers and has no padding (checked
// by the size assertion above), so every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PacketCount {}

/// Names and slots of the per-interface packet counter (`twill_rx_count` / `twill_tx_count`).
pub mod counter {
    /// Name of the `BPF_MAP_TYPE_PERCPU_ARRAY` holding one [`crate::PacketCount`] per slot.
    pub const MAP: &str = "TWILL_PKT_COUNT";
    /// Slot counting packets received by the interface (TC ingress).
    pub const SLOT_RX: u32 = 0;
    /// Slot counting packets sent by the interface (TC egress).
    pub const SLOT_TX: u32 = 1;
    /// Number of slots in [`MAP`].
    pub const SLOTS: u32 = 2;
    /// Name of the `sched_cls` program attached at TC ingress (at most 15 bytes: the kernel's
    /// `BPF_OBJ_NAME_LEN` limit, so `bpftool` shows it whole).
    pub const PROG_INGRESS: &str = "twill_rx_count";
    /// Name of the `sched_cls` program attached at TC egress.
    pub const PROG_EGRESS: &str = "twill_tx_count";

    const _: () = assert!(PROG_INGRESS.len() < 16 && PROG_EGRESS.len() < 16 && MAP.len() < 16);
}
