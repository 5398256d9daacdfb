//! Freeing what the kernel creates per flow: conntrack, affinity and socket-LB entries that
//! point at a removed backend ([`EbpfLb::purge`](super::EbpfLb), right after an apply) or are
//! idle past their timeout ([`EbpfLb::gc`], on every full resync). The kernel already ignores
//! such entries (it validates each against the backend slot on use); this frees them, and
//! aborts the node's connected UDP sockets that socket-LB tied to a removed backend.

use std::{collections::BTreeSet, net::IpAddr};

use tracing::{debug, instrument, warn};
use twill_common::service::{
    AffinityKey, BackendValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_TIMEOUT_TCP_NS, CT_TIMEOUT_UDP_NS,
    CtKey, MAP_AFFINITY, MAP_CT, MAP_SOCK, PROTO_TCP, SockKey, encode_addr,
};

use super::maps::{keys_where, remove_all};
use super::{EbpfLb, EbpfLbError, GcStats, sockdiag};
use crate::services::lb::StaleBackend;

impl EbpfLb {
    /// Removes the conntrack and affinity entries that point at `stale` backends. (The kernel
    /// already ignores them; this frees the entries.)
    pub(super) fn purge(&mut self, stale: &[StaleBackend]) -> Result<(), EbpfLbError> {
        let gone: BTreeSet<([u8; 16], u8, u16)> = stale
            .iter()
            .map(|s| {
                let (addr, family) = encode_addr(s.ip);
                (addr, family, s.port.to_be())
            })
            .collect();
        let ct: Vec<CtKey> = keys_where(&self.maps.ct, |k, v| match k.dir {
            CT_DIR_FORWARD => gone.contains(&(v.nat_addr, k.family, v.nat_port)),
            CT_DIR_REPLY => gone.contains(&(k.src, k.family, k.sport)),
            _ => false,
        });
        remove_all(&mut self.maps.ct, MAP_CT, &ct)?;
        let affinity: Vec<AffinityKey> = keys_where(&self.maps.affinity, |k, v| {
            let family = if k.family == 0 {
                // Socket-path entries do not record the family; match on address and port.
                gone.iter()
                    .find(|(a, _, p)| *a == v.addr && *p == v.port)
                    .map_or(0, |(_, f, _)| *f)
            } else {
                k.family
            };
            gone.contains(&(v.addr, family, v.port))
        });
        remove_all(&mut self.maps.affinity, MAP_AFFINITY, &affinity)?;
        // Sockets socket-LB connected to a removed backend (see `sockdiag`): the node's own
        // connected UDP would keep sending there. The node's connected UDP sockets are few, the
        // socket map may hold an entry per TCP connection too: list the sockets and look each
        // candidate up, never iterate the map. Failing to abort them is logged, not fatal: the
        // maps are already right.
        let peers: BTreeSet<(IpAddr, u16)> = stale.iter().map(|s| (s.ip, s.port)).collect();
        let sock_map = &self.maps.sock;
        let balanced = |cookie: u64, (ip, port): (IpAddr, u16)| {
            let (addr, family) = encode_addr(ip);
            let key = SockKey {
                cookie,
                addr,
                port: port.to_be(),
                family,
                pad: [0; 5],
            };
            sock_map.get(&key, 0).is_ok()
        };
        let sockets = match sockdiag::destroy_udp(&peers, balanced) {
            Ok(done) => done.sockets,
            Err(err) => {
                warn!(error = %err, "abort UDP sockets connected to removed backends (sock_diag SOCK_DESTROY)");
                0
            }
        };
        debug!(
            ct = ct.len(),
            affinity = affinity.len(),
            sockets,
            "purged entries of removed backends"
        );
        Ok(())
    }

    /// Removes conntrack, affinity and socket-LB entries that are idle past their timeout or
    /// point at a backend no longer programmed. Call it periodically (e.g. on the resync
    /// timer); the kernel already ignores such entries, this frees them.
    #[instrument(level = "debug", skip(self), err)]
    pub fn gc(&mut self) -> Result<GcStats, EbpfLbError> {
        let now = monotonic_ns();
        let backend_at = |id: u32, slot: u16| -> Option<BackendValue> {
            let key = self.mirror.key_of(id)?;
            self.mirror
                .backends(key)?
                .values()
                .find(|(s, _)| *s == slot)
                .map(|(_, v)| *v)
        };
        let live = |id: u32, slot: u16, addr: &[u8; 16], port: u16| {
            backend_at(id, slot).is_some_and(|b| b.addr == *addr && b.port == port)
        };
        let ct: Vec<CtKey> = keys_where(&self.maps.ct, |k, v| {
            let timeout = if k.proto == PROTO_TCP {
                CT_TIMEOUT_TCP_NS
            } else {
                CT_TIMEOUT_UDP_NS
            };
            let idle = now.saturating_sub(v.last_seen_ns) > timeout;
            let stale = match k.dir {
                CT_DIR_FORWARD => !live(v.svc_id, v.slot, &v.nat_addr, v.nat_port),
                _ => !live(v.svc_id, v.slot, &k.src, k.sport),
            };
            idle || stale
        });
        let affinity: Vec<AffinityKey> = keys_where(&self.maps.affinity, |k, v| {
            let timeout = self
                .mirror
                .key_of(k.svc_id)
                .and_then(|key| self.mirror.service(key))
                .map_or(0, |v| u64::from(v.affinity_timeout_secs) * 1_000_000_000);
            now.saturating_sub(v.last_seen_ns) > timeout || !live(k.svc_id, v.slot, &v.addr, v.port)
        });
        let sock: Vec<SockKey> = keys_where(&self.maps.sock, |k, v| {
            let Some(key) = self.mirror.key_of(v.svc_id) else {
                return true;
            };
            self.mirror.backends(key).is_none_or(|backends| {
                !backends
                    .values()
                    .any(|(_, b)| b.addr == k.addr && b.port == k.port)
            })
        });
        remove_all(&mut self.maps.ct, MAP_CT, &ct)?;
        remove_all(&mut self.maps.affinity, MAP_AFFINITY, &affinity)?;
        remove_all(&mut self.maps.sock, MAP_SOCK, &sock)?;
        Ok(GcStats {
            ct: ct.len(),
            affinity: affinity.len(),
            sock: sock.len(),
        })
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
