//! Service load balancer (issue 4): the maps and the backend choice shared by the socket
//! programs ([`sock`]) and the tc programs ([`tc`]). The layout and its reasons are documented in
//! `twill_common::service`; this module only adds how the kernel side uses it:
//!
//! - A frontend is one hash lookup (exact VIP), plus one wildcard lookup for NodePorts when the
//!   destination is a node address ([`LOCAL_ADDRS`]). No loop depends on the number of services.
//! - A backend is chosen by Maglev: `table[hash % M]` names a slot, `(id, slot)` names the
//!   backend. The hash is the socket cookie (socket path: one choice per socket) or the 5-tuple
//!   (tc path: one choice per flow, remembered in conntrack).
//! - Session affinity is checked first: an affinity entry is used when younger than the service's
//!   timeout *and* its slot still holds the same backend, so a removed endpoint is never reused.
//! - Everything returns `Option`/`Result`, never panics: the verifier rejects the infinite loop
//!   of a reachable panic handler, so every index is bounds-checked with `get`.
//! - Lints: map keys are passed by reference (`&key`) on purpose, so a 40-byte key is not
//!   copied into the callee's frame; aya's entry-point macros hand the context over by value;
//!   `inline(always)` is how BPF code controls its stack frames; the casts are between BPF
//!   helper ABI types whose ranges are known.
#![allow(
    clippy::needless_borrows_for_generic_args,
    clippy::needless_pass_by_value,
    clippy::inline_always,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "see the lint note in the module documentation"
)]

pub mod sock;
pub mod tc;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use twill_common::service::{
    AffinityKey, AffinityValue, BPF_F_NO_PREALLOC, BackendKey, BackendValue, CtKey, CtValue,
    DECLARED_ENTRIES, FAMILY_V4, FAMILY_V6, LbConfig, LocalAddrKey, MaglevTable, RevNatValue,
    SVC_F_AFFINITY, SockKey, SockValue, SvcCount, SvcKey, SvcValue, maglev_index,
};

/// Frontends ([`twill_common::service::MAP_SVC`]).
#[map(name = "TWL_LB_SVC")]
pub static SVC: HashMap<SvcKey, SvcValue> =
    HashMap::with_max_entries(DECLARED_ENTRIES, BPF_F_NO_PREALLOC);

/// Backends by `(service id, slot)` ([`twill_common::service::MAP_BACKEND`]).
#[map(name = "TWL_LB_BE")]
pub static BACKENDS: HashMap<BackendKey, BackendValue> =
    HashMap::with_max_entries(DECLARED_ENTRIES, BPF_F_NO_PREALLOC);

/// Maglev tables by service id ([`twill_common::service::MAP_MAGLEV`]).
#[map(name = "TWL_LB_MAGLEV")]
pub static MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::with_max_entries(DECLARED_ENTRIES, BPF_F_NO_PREALLOC);

/// Conntrack of the tc path ([`twill_common::service::MAP_CT`]).
#[map(name = "TWL_LB_CT")]
pub static CT: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(DECLARED_ENTRIES, 0);

/// Session affinity ([`twill_common::service::MAP_AFFINITY`]).
#[map(name = "TWL_LB_AFF")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(DECLARED_ENTRIES, 0);

/// Socket-LB reverse translation ([`twill_common::service::MAP_SOCK`]).
#[map(name = "TWL_LB_SOCK")]
pub static SOCK: LruHashMap<SockKey, SockValue> = LruHashMap::with_max_entries(DECLARED_ENTRIES, 0);

/// Service id → frontend and name ([`twill_common::service::MAP_REVNAT`]). Written and read by
/// user space only; declared here so that the object defines it and the loader creates and pins
/// it with the others.
#[map(name = "TWL_LB_REVNAT")]
pub static REVNAT: HashMap<u32, RevNatValue> =
    HashMap::with_max_entries(DECLARED_ENTRIES, BPF_F_NO_PREALLOC);

/// Per-service counters ([`twill_common::service::MAP_COUNT`]).
#[map(name = "TWL_LB_COUNT")]
pub static COUNT: PerCpuArray<SvcCount> = PerCpuArray::with_max_entries(DECLARED_ENTRIES, 0);

/// The node's addresses ([`twill_common::service::MAP_LOCAL_ADDR`]).
#[map(name = "TWL_LB_LADDR")]
pub static LOCAL_ADDRS: HashMap<LocalAddrKey, u32> =
    HashMap::with_max_entries(DECLARED_ENTRIES, BPF_F_NO_PREALLOC);

/// Global settings ([`twill_common::service::MAP_CONFIG`]).
#[map(name = "TWL_LB_CONFIG")]
pub static CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);

/// Equality of two map addresses (a plain `==` on arrays may become a `bcmp` call, which BPF
/// cannot link).
#[inline(always)]
pub fn addr_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    addr_diff(a, b) == 0
}

/// Zero when two map addresses are equal, computed without branches: a byte-wise comparison
/// was compiled into one branch per byte, each a path the verifier walks again (together they
/// took the tc forward hook past its limit of a million instructions).
#[inline(always)]
pub fn addr_diff(a: &[u8; 16], b: &[u8; 16]) -> u64 {
    let word = |x: &[u8; 16], i: usize| {
        u64::from_ne_bytes([
            x[i],
            x[i + 1],
            x[i + 2],
            x[i + 3],
            x[i + 4],
            x[i + 5],
            x[i + 6],
            x[i + 7],
        ])
    };
    (word(a, 0) ^ word(b, 0)) | (word(a, 8) ^ word(b, 8))
}

/// Whether `addr` is one of the node's addresses; with `loopback`, 127.0.0.0/8 and ::1 count too
/// (a NodePort on localhost, socket path only: such packets never reach tc).
#[inline(always)]
pub fn is_local(addr: &[u8; 16], family: u8, loopback: bool) -> bool {
    if loopback {
        if family == FAMILY_V4 && addr[0] == 127 {
            return true;
        }
        if family == FAMILY_V6 {
            let mut zero = 0u8;
            let mut i = 0;
            while i < 15 {
                zero |= addr[i];
                i += 1;
            }
            if zero == 0 && addr[15] == 1 {
                return true;
            }
        }
    }
    let key = LocalAddrKey {
        addr: *addr,
        family,
        pad: [0; 3],
    };
    LOCAL_ADDRS.get_ptr(&key).is_some()
}

/// Finds the frontend for `key` (address, port in network order, protocol, family): the exact
/// VIP, else the NodePort wildcard when the address is a node address. `key.addr` is cleared in
/// the second case.
///
/// Not inlined, like [`select_backend`]: keeping each step's temporaries in its own frame keeps
/// the deepest call chain under the verifier's 512-byte combined stack limit.
/// The value is written to `out` (the tc programs pass their per-CPU scratch, keeping it off
/// the stack); returns whether a frontend was found.
#[inline(never)]
pub fn lookup_service(key: &mut SvcKey, loopback: bool, out: &mut SvcValue) -> bool {
    let mut value = SVC.get_ptr(&*key);
    if value.is_none() && is_local(&key.addr, key.family, loopback) {
        key.addr = [0; 16];
        value = SVC.get_ptr(&*key);
    }
    match value {
        Some(value) => {
            // SAFETY: a pointer from a successful lookup points to a live value (the map is
            // BPF_F_NO_PREALLOC, so a concurrent update replaces the element under RCU and
            // never recycles this one while the program runs).
            *out = unsafe { *value };
            true
        }
        None => false,
    }
}

/// The backend in `slot` of service `id`.
#[inline(always)]
pub fn backend(id: u32, slot: u16) -> Option<BackendValue> {
    let key = BackendKey { id, slot, pad: 0 };
    // SAFETY: see `lookup_service`.
    BACKENDS.get_ptr(&key).map(|value| unsafe { *value })
}

/// Whether `slot` of service `id` still holds the backend `addr:port` (entries that remember a
/// backend are validated with this, so a removed endpoint is never used again).
#[inline(always)]
pub fn backend_still(id: u32, slot: u16, addr: &[u8; 16], port: u16) -> bool {
    match backend(id, slot) {
        Some(be) => be.port == port && addr_eq(&be.addr, addr),
        None => false,
    }
}

/// Chooses a backend of `svc`: the client's affinity entry if still valid, else the Maglev
/// entry for `hash` (then remembered for the client when the service has affinity).
///
/// Not inlined: its map values would otherwise share one frame with the caller's conntrack
/// entries and exceed the 512-byte BPF stack (BPF-to-BPF calls, Linux >= 4.16).
/// The backend is written to `out` (scratch memory on the tc path); returns its slot. The
/// public wrapper is inlined; the body is not, and returns the slot as an `i32` (-1: none)
/// because BPF-to-BPF calls take at most five arguments and an `Option` would add a sixth
/// (the out-pointer for the return value).
#[inline(always)]
pub fn select_backend(
    svc: &SvcValue,
    hash: u64,
    affinity: Option<&AffinityKey>,
    now_ns: u64,
    out: &mut BackendValue,
) -> Option<u16> {
    u16::try_from(select_backend_raw(svc, hash, affinity, now_ns, out)).ok()
}

#[inline(never)]
fn select_backend_raw(
    svc: &SvcValue,
    hash: u64,
    affinity: Option<&AffinityKey>,
    now_ns: u64,
    out: &mut BackendValue,
) -> i32 {
    let affinity = if svc.flags & SVC_F_AFFINITY != 0 {
        affinity
    } else {
        None
    };
    if let Some(key) = affinity
        && let Some(entry) = AFFINITY.get_ptr_mut(key)
    {
        // SAFETY: pointer from a successful LRU lookup; a concurrent writer can at worst make us
        // read a torn entry, which the backend validation below then rejects. A lost
        // `last_seen_ns` update only shortens the affinity by one refresh.
        unsafe {
            let timeout_ns = u64::from(svc.affinity_timeout_secs) * 1_000_000_000;
            if now_ns.wrapping_sub((*entry).last_seen_ns) <= timeout_ns
                && let Some(be) = BACKENDS.get_ptr(&BackendKey {
                    id: svc.id,
                    slot: (*entry).slot,
                    pad: 0,
                })
                && (*be).port == (*entry).port
                && addr_eq(&(*be).addr, &(*entry).addr)
            {
                (*entry).last_seen_ns = now_ns;
                *out = *be;
                return i32::from((*entry).slot);
            }
        }
    }

    let Some(table) = MAGLEV.get_ptr(&svc.id) else {
        return -1;
    };
    // SAFETY: see `lookup_service`; `get` bounds-checks the index.
    let Some(slot) = (unsafe { (*table).slots.get(maglev_index(hash)).copied() }) else {
        return -1;
    };
    let Some(be) = BACKENDS.get_ptr(&BackendKey {
        id: svc.id,
        slot,
        pad: 0,
    }) else {
        return -1;
    };
    // SAFETY: see `lookup_service`.
    *out = unsafe { *be };
    if let Some(key) = affinity {
        let value = AffinityValue {
            last_seen_ns: now_ns,
            addr: out.addr,
            port: out.port,
            slot,
            pad: 0,
        };
        // Best effort: without the entry the next flow is balanced by Maglev again.
        let _ = AFFINITY.insert(key, &value, 0);
    }
    i32::from(slot)
}

/// Adds to service `id`'s counters on this CPU.
#[inline(always)]
pub fn count(id: u32, conns: u64, packets: u64) {
    if let Some(c) = COUNT.get_ptr_mut(id) {
        // SAFETY: per-CPU slot of an array map; BPF programs run with migration disabled, so
        // only this CPU writes it (a rare lost update under PREEMPT_RT is fine for metrics).
        unsafe {
            (*c).conns = (*c).conns.wrapping_add(conns);
            (*c).packets = (*c).packets.wrapping_add(packets);
        }
    }
}

/// The global settings (all zero before user space wrote them).
#[inline(always)]
pub fn config() -> LbConfig {
    // SAFETY: index 0 of a one-entry array always exists; the value is plain data.
    CONFIG.get_ptr(0).map(|c| unsafe { *c }).unwrap_or_default()
}
