//! twill's kernel-side eBPF programs, built by `agent/build.rs` (aya-build, nightly,
//! `bpfel-unknown-none`) and embedded in the agent.
//!
//! Why it is shaped as it is:
//! - `cfg_attr(target_arch = "bpf", no_std, no_main)`: the crate is a workspace member so that
//!   `cargo build --workspace` and `cargo clippy --workspace` on the host still work; there it is
//!   an empty binary, and all eBPF code sits in the `bpf` module, compiled only for the BPF target.
//! - Entry points are thin wrappers over `try_*` functions returning `Result`, so the verdict
//!   policy ("never drop") is in one line per program and cannot be skipped by an early return.
//! - Programs return `TCX_NEXT` (-1, the same value as legacy `TC_ACT_UNSPEC`): a counter must
//!   never decide a packet's fate, so it lets the next TCX program (or the default action, pass)
//!   decide. `TC_ACT_OK` would be a final verdict that skips programs attached after ours.
//! - The service load balancer (socket-LB on a cgroup, tc with conntrack, Maglev) is the `lb`
//!   module; its maps and names are shared through `twill_common::service`. Every loader of
//!   this object creates all of its maps, so the LB maps are declared tiny and sized by
//!   `EbpfLb` when it loads them.
//! - Counters live in a `PERCPU_ARRAY` indexed by direction: per-CPU slots need no atomics, and
//!   one object per interface (the agent loads one per attachment) keeps interfaces apart.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod lb;

#[cfg(target_arch = "bpf")]
mod bpf {
    use aya_ebpf::{
        bindings::tcx_action_base::TCX_NEXT,
        macros::{classifier, map},
        maps::PerCpuArray,
        programs::TcContext,
    };
    use twill_common::{PacketCount, counter};

    /// Per-CPU packet/byte totals, slot [`counter::SLOT_RX`] (ingress) and
    /// [`counter::SLOT_TX`] (egress). The name must equal [`counter::MAP`].
    #[map]
    static TWILL_PKT_COUNT: PerCpuArray<PacketCount> =
        PerCpuArray::with_max_entries(counter::SLOTS, 0);

    /// The map slot was missing: impossible for an in-bounds index of an array map, but the
    /// verifier requires the null check and the `try_*` shape makes it explicit.
    struct MissingSlot;

    /// TC ingress counter (name must equal [`counter::PROG_INGRESS`]).
    #[classifier]
    pub fn twill_rx_count(ctx: TcContext) -> i32 {
        let _ = try_count(&ctx, counter::SLOT_RX);
        TCX_NEXT
    }

    /// TC egress counter (name must equal [`counter::PROG_EGRESS`]).
    #[classifier]
    pub fn twill_tx_count(ctx: TcContext) -> i32 {
        let _ = try_count(&ctx, counter::SLOT_TX);
        TCX_NEXT
    }

    #[inline(always)]
    fn try_count(ctx: &TcContext, slot: u32) -> Result<(), MissingSlot> {
        let count = TWILL_PKT_COUNT.get_ptr_mut(slot).ok_or(MissingSlot)?;
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it points to
        // this CPU's value, which lives as long as the map. BPF programs run with migration
        // disabled and TC runs in softirq context, so nothing else on this CPU updates the value
        // concurrently (on PREEMPT_RT a rare lost increment is possible, acceptable for metrics).
        unsafe {
            (*count).packets = (*count).packets.wrapping_add(1);
            (*count).bytes = (*count).bytes.wrapping_add(u64::from(ctx.len()));
        }
        Ok(())
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
        loop {}
    }

    /// The license the kernel sees. The kernel-side programs are dual-licensed so the verifier
    /// allows GPL-only helpers; the rest of twill is Apache-2.0.
    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// On the host this crate is an empty binary; see the crate docs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
