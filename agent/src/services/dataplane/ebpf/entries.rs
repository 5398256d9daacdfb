//! Pure map-entry computation for the eBPF service dataplane: from an [`LbService`] to the
//! values of `TWL_LB_SVC`, `TWL_LB_BE`, `TWL_LB_MAGLEV` and `TWL_LB_REVNAT`, and back.
//!
//! Why it is separate from [`super::EbpfLb`]: everything here is a function of plain data, unit
//! tested without root or a kernel; `EbpfLb` only sequences the map writes it computes.
//!
//! - [`assign_slots`] keeps each backend that stays in a service in the slot it had, and puts new
//!   backends in slots that neither a kept nor a just-removed backend uses, so that while the
//!   update is in flight the old Maglev table (still installed) never resolves to a slot that
//!   already holds a different backend.
//! - [`reconstruct`] is the inverse: it turns map entries back into an [`LbService`] equal to the
//!   one applied (backends sorted by address and port, Maglev indices into that order), so a
//!   restarted agent diffs to an empty plan instead of rewriting every service.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use twill_common::service::{
    BE_F_NODE_LOCAL, BE_F_TERMINATING, BackendValue, KIND_CLUSTER_IP, KIND_EXTERNAL_IP,
    KIND_LOAD_BALANCER, KIND_NODE_PORT, MAGLEV_M, MaglevTable, PROTO_TCP, PROTO_UDP, RevNatValue,
    SVC_F_AFFINITY, SVC_F_EXTERNAL_LOCAL, SVC_F_INTERNAL_LOCAL, SvcKey, SvcValue,
};

use crate::services::lb::{
    Backend, BackendState, Frontend, FrontendKind, LbService, MAGLEV_M as DESIRED_MAGLEV_M, Proto,
};
use crate::services::maglev;

// The desired-state builder and the kernel agree on the table size.
const _: () = assert!(MAGLEV_M == DESIRED_MAGLEV_M);

/// A backend's identity within a service: address and port.
pub type BackendId = (IpAddr, u16);

/// Why a service cannot be programmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Service id 0 or beyond the maps' capacity.
    #[error("service id {id} out of range 1..{max}")]
    IdOutOfRange {
        /// The id.
        id: u32,
        /// Exclusive upper bound (the counter array's size).
        max: u32,
    },
    /// More backends than slots (`u16`).
    #[error("{count} backends exceed the {max} slots of a service")]
    TooManyBackends {
        /// Backends requested.
        count: usize,
        /// Slots available.
        max: usize,
    },
    /// The Maglev table has the wrong size or points outside `backends`.
    #[error("maglev table invalid: {0}")]
    Maglev(String),
    /// A backend's address family differs from the frontend's.
    #[error("backend {0} has another address family than the frontend")]
    Family(IpAddr),
}

/// The map key of a frontend.
pub fn frontend_key(frontend: &Frontend) -> SvcKey {
    SvcKey::new(frontend.ip, frontend.port, frontend.proto.ip_proto())
}

/// `KIND_*` of a frontend kind.
pub fn kind_code(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::ClusterIp => KIND_CLUSTER_IP,
        FrontendKind::NodePort => KIND_NODE_PORT,
        FrontendKind::ExternalIp => KIND_EXTERNAL_IP,
        FrontendKind::LoadBalancer => KIND_LOAD_BALANCER,
    }
}

fn kind_from_code(code: u8) -> FrontendKind {
    match code {
        KIND_NODE_PORT => FrontendKind::NodePort,
        KIND_EXTERNAL_IP => FrontendKind::ExternalIp,
        KIND_LOAD_BALANCER => FrontendKind::LoadBalancer,
        _ => FrontendKind::ClusterIp,
    }
}

/// The `TWL_LB_BE` value of a backend.
pub fn backend_value(backend: &Backend) -> BackendValue {
    let mut flags = 0;
    if backend.node_local {
        flags |= BE_F_NODE_LOCAL;
    }
    if backend.state == BackendState::ServingTerminating {
        flags |= BE_F_TERMINATING;
    }
    BackendValue::new(backend.ip, backend.port, flags)
}

/// Where each backend of an update goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPlan {
    /// Slot of `backends[i]`.
    pub slots: Vec<u16>,
    /// Slots that held a backend no longer in the service (delete after the table switch).
    pub freed: Vec<u16>,
    /// High-water mark: every used slot is below it.
    pub high: u16,
}

/// Assigns slots to `backends` given the slots `old` they had (see the module notes).
pub fn assign_slots(
    old: &BTreeMap<BackendId, u16>,
    backends: &[Backend],
) -> Result<SlotPlan, EntryError> {
    if backends.len() > usize::from(u16::MAX) {
        return Err(EntryError::TooManyBackends {
            count: backends.len(),
            max: usize::from(u16::MAX),
        });
    }
    let wanted: BTreeSet<BackendId> = backends.iter().map(|b| (b.ip, b.port)).collect();
    // Slots that must not be handed out: everything the old table may still point at.
    let mut taken: BTreeSet<u16> = old.values().copied().collect();
    let freed: Vec<u16> = old
        .iter()
        .filter(|(id, _)| !wanted.contains(id))
        .map(|(_, slot)| *slot)
        .collect();
    let mut next = 0u16;
    let mut slots = Vec::with_capacity(backends.len());
    for backend in backends {
        let slot = if let Some(slot) = old.get(&(backend.ip, backend.port)) {
            *slot
        } else {
            while taken.contains(&next) {
                next = next.checked_add(1).ok_or(EntryError::TooManyBackends {
                    count: backends.len() + old.len(),
                    max: usize::from(u16::MAX),
                })?;
            }
            taken.insert(next);
            next
        };
        slots.push(slot);
    }
    let high = slots.iter().max().map_or(0, |max| max.saturating_add(1));
    Ok(SlotPlan { slots, freed, high })
}

/// The kernel's Maglev table of a service with `backends` (sorted, as the desired state has
/// them) in `slots`: the Maglev permutation table over the backends, each entry (an index into
/// `backends`) replaced by that backend's slot.
pub fn maglev_table(backends: &[Backend], slots: &[u16]) -> Result<Box<MaglevTable>, EntryError> {
    maglev_slots(&maglev_indices(backends), slots)
}

/// The Maglev permutation table over `backends` (indices into it): the slot-independent, costly
/// part of [`maglev_table`] (~10 µs of CPU for a table).
pub fn maglev_indices(backends: &[Backend]) -> Vec<u32> {
    maglev::table(backends, DESIRED_MAGLEV_M)
}

/// [`maglev_table`] from a table of indices ([`maglev_indices`]).
pub fn maglev_slots(maglev: &[u32], slots: &[u16]) -> Result<Box<MaglevTable>, EntryError> {
    if maglev.len() != MAGLEV_M {
        return Err(EntryError::Maglev(format!(
            "{} entries, expected {MAGLEV_M}",
            maglev.len()
        )));
    }
    let mut table = Box::new(MaglevTable::default());
    for (entry, index) in table.slots.iter_mut().zip(maglev) {
        *entry = usize::try_from(*index)
            .ok()
            .and_then(|i| slots.get(i))
            .copied()
            .ok_or_else(|| {
                EntryError::Maglev(format!("entry {index} beyond the {} backends", slots.len()))
            })?;
    }
    Ok(table)
}

/// Checks what the kernel side relies on: a usable id, one family, slots for every backend.
pub fn validate(svc: &LbService, max_services: u32) -> Result<(), EntryError> {
    if svc.id == 0 || svc.id >= max_services {
        return Err(EntryError::IdOutOfRange {
            id: svc.id,
            max: max_services,
        });
    }
    if let Some(b) = svc
        .backends
        .iter()
        .find(|b| b.ip.is_ipv4() != svc.frontend.ip.is_ipv4())
    {
        return Err(EntryError::Family(b.ip));
    }
    Ok(())
}

/// The `TWL_LB_SVC` value of a service whose backends occupy slots below `high`.
pub fn svc_value(svc: &LbService, high: u16) -> SvcValue {
    let mut flags = 0;
    if svc.affinity_timeout_secs.is_some() {
        flags |= SVC_F_AFFINITY;
    }
    if svc.external_local {
        flags |= SVC_F_EXTERNAL_LOCAL;
    }
    if svc.internal_local {
        flags |= SVC_F_INTERNAL_LOCAL;
    }
    SvcValue {
        id: svc.id,
        // `validate`/`assign_slots` bound the count by u16::MAX.
        backends: u16::try_from(svc.backends.len()).unwrap_or(u16::MAX),
        slots: high,
        flags,
        pad: 0,
        affinity_timeout_secs: svc.affinity_timeout_secs.unwrap_or(0),
    }
}

/// The `TWL_LB_REVNAT` value of a service.
pub fn revnat_value(svc: &LbService) -> RevNatValue {
    RevNatValue::new(
        frontend_key(&svc.frontend),
        kind_code(svc.frontend.kind),
        &svc.name,
    )
}

/// Marks a read-back service whose entries are not what one complete upsert leaves (see
/// [`reconstruct`]), so it differs from any desired service and the next plan re-upserts it.
pub const INCONSISTENT: &str = " (inconsistent)";

/// Rebuilds the service programmed by these entries; `None` when the key is not a valid
/// frontend. Backends come back sorted by (address, port), the order the desired-state builder
/// uses.
///
/// The Maglev table is not read: it is a pure function of the backends and is written, by an
/// upsert, after the backend slots and before the service entry, whose backend count comes
/// last; the freed slots are deleted after that. So a service whose backend entries do not
/// number `value.backends` is one an agent stopped in the middle of an upsert (its table may be
/// stale): its name gets [`INCONSISTENT`] appended and the next plan rewrites it whole.
pub fn reconstruct(
    key: &SvcKey,
    value: &SvcValue,
    info: Option<&RevNatValue>,
    mut backends: Vec<(u16, BackendValue)>,
) -> Option<LbService> {
    let ip = key.ip()?;
    let proto = match key.proto {
        PROTO_TCP => Proto::Tcp,
        PROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let complete = backends.len() == usize::from(value.backends);
    backends.retain(|(_, b)| b.ip().is_some());
    backends.sort_by_key(|(_, b)| (b.ip(), b.port()));
    let mut name = info.map(|i| i.name().to_owned()).unwrap_or_default();
    if !complete {
        name.push_str(INCONSISTENT);
    }
    let backends = backends
        .iter()
        .filter_map(|(_, b)| {
            Some(Backend {
                ip: b.ip()?,
                port: b.port(),
                node_local: b.flags & BE_F_NODE_LOCAL != 0,
                state: if b.flags & BE_F_TERMINATING != 0 {
                    BackendState::ServingTerminating
                } else {
                    BackendState::Ready
                },
            })
        })
        .collect();
    Some(LbService {
        id: value.id,
        name,
        frontend: Frontend {
            ip,
            port: key.port(),
            proto,
            kind: info.map_or(FrontendKind::ClusterIp, |i| kind_from_code(i.kind)),
        },
        backends,
        affinity_timeout_secs: (value.flags & SVC_F_AFFINITY != 0)
            .then_some(value.affinity_timeout_secs),
        external_local: value.flags & SVC_F_EXTERNAL_LOCAL != 0,
        internal_local: value.flags & SVC_F_INTERNAL_LOCAL != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testutil::{self, be};

    fn service(id: u32, backends: Vec<Backend>) -> LbService {
        testutil::service(
            id,
            format!("default/svc{id}:http"),
            ("10.96.0.10", 80, FrontendKind::ClusterIp),
            backends,
        )
    }

    /// [`assign_slots`] from the slots of the old backends, `(ip, port, slot)`, to the new
    /// backends `(ip, port)`.
    fn slots(old: &[(&str, u16, u16)], new: &[(&str, u16)]) -> SlotPlan {
        let old: BTreeMap<BackendId, u16> = old
            .iter()
            .map(|(ip, port, slot)| ((ip.parse().unwrap(), *port), *slot))
            .collect();
        let new: Vec<Backend> = new.iter().map(|(ip, port)| be(ip, *port)).collect();
        assign_slots(&old, &new).unwrap()
    }

    #[test]
    fn fresh_service_gets_dense_slots() {
        let plan = slots(&[], &[("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)]);
        assert_eq!(plan.slots, vec![0, 1, 2]);
        assert!(plan.freed.is_empty());
        assert_eq!(plan.high, 3);
    }

    #[test]
    fn kept_backends_keep_slots_and_new_ones_avoid_freed_slots() {
        // .2 removed, .4 added: .4 must not take slot 1, which the old table still references.
        let plan = slots(
            &[
                ("10.0.0.1", 80, 0),
                ("10.0.0.2", 80, 1),
                ("10.0.0.3", 80, 2),
            ],
            &[("10.0.0.1", 80), ("10.0.0.3", 80), ("10.0.0.4", 80)],
        );
        assert_eq!(plan.slots, vec![0, 2, 3]);
        assert_eq!(plan.freed, vec![1]);
        assert_eq!(plan.high, 4);
        // Next round, slot 1 is free again.
        let plan = slots(
            &[
                ("10.0.0.1", 80, 0),
                ("10.0.0.3", 80, 2),
                ("10.0.0.4", 80, 3),
            ],
            &[
                ("10.0.0.1", 80),
                ("10.0.0.3", 80),
                ("10.0.0.4", 80),
                ("10.0.0.5", 80),
            ],
        );
        assert_eq!(plan.slots, vec![0, 2, 3, 1]);
    }

    #[test]
    fn same_address_other_port_is_another_backend() {
        let plan = slots(&[("10.0.0.1", 80, 0)], &[("10.0.0.1", 8080)]);
        assert_eq!(plan.slots, vec![1]);
        assert_eq!(plan.freed, vec![0]);
    }

    #[test]
    fn empty_service_frees_everything() {
        let plan = slots(&[("10.0.0.1", 80, 0), ("10.0.0.2", 80, 5)], &[]);
        assert!(plan.slots.is_empty());
        assert_eq!(plan.freed, vec![0, 5]);
        assert_eq!(plan.high, 0);
    }

    #[test]
    fn maglev_indices_become_slots() {
        let svc = service(1, vec![be("10.0.0.1", 80), be("10.0.0.2", 80)]);
        let indices = maglev::table(&svc.backends, DESIRED_MAGLEV_M);
        let table = maglev_table(&svc.backends, &[7, 3]).unwrap();
        for (slot, index) in table.slots.iter().zip(&indices) {
            assert_eq!(*slot, if *index == 0 { 7 } else { 3 });
        }
        assert!(
            maglev_table(&svc.backends, &[7]).is_err(),
            "index 1 has no slot"
        );
        assert!(maglev_slots(&[0; 10], &[7]).is_err(), "wrong size");
    }

    #[test]
    fn validate_rejects_what_the_kernel_cannot_hold() {
        let ok = service(1, vec![be("10.0.0.1", 80)]);
        assert_eq!(validate(&ok, 10), Ok(()));
        let mut bad = ok.clone();
        bad.id = 0;
        assert!(matches!(
            validate(&bad, 10),
            Err(EntryError::IdOutOfRange { .. })
        ));
        bad.id = 10;
        assert!(validate(&bad, 10).is_err());
        let mut bad = ok.clone();
        bad.backends.push(be("fd00::1", 80));
        assert!(matches!(validate(&bad, 10), Err(EntryError::Family(_))));
        assert_eq!(validate(&service(2, vec![]), 10), Ok(()));
    }

    #[test]
    fn values_carry_flags() {
        let mut svc = service(3, vec![be("10.0.0.1", 80)]);
        svc.affinity_timeout_secs = Some(60);
        svc.external_local = true;
        let v = svc_value(&svc, 1);
        assert_eq!(v.id, 3);
        assert_eq!(v.backends, 1);
        assert_eq!(v.slots, 1);
        assert_eq!(v.flags, SVC_F_AFFINITY | SVC_F_EXTERNAL_LOCAL);
        assert_eq!(v.affinity_timeout_secs, 60);

        let mut b = be("10.0.0.9", 8080);
        b.node_local = true;
        b.state = BackendState::ServingTerminating;
        let bv = backend_value(&b);
        assert_eq!(bv.flags, BE_F_NODE_LOCAL | BE_F_TERMINATING);
        assert_eq!(bv.port(), 8080);
        assert_eq!(bv.port.to_ne_bytes(), 8080u16.to_be_bytes());
    }

    /// What `EbpfLb::apply` writes, read back by `observed`, is the service that was applied,
    /// whatever slots the backends ended up in.
    #[test]
    fn reconstruct_round_trips_through_scattered_slots() {
        for v6 in [false, true] {
            let backends = if v6 {
                vec![be("fd00::1", 80), be("fd00::2", 81), be("fd00::3", 80)]
            } else {
                vec![be("10.0.0.1", 80), be("10.0.0.2", 81), be("10.0.0.3", 80)]
            };
            let mut svc = service(9, backends);
            if v6 {
                svc.frontend.ip = "fd00:96::10".parse().unwrap();
            }
            svc.frontend.kind = FrontendKind::NodePort;
            svc.affinity_timeout_secs = Some(10_800);
            svc.internal_local = true;
            svc.backends[1].node_local = true;
            svc.backends[2].state = BackendState::ServingTerminating;
            let slots = [4u16, 0, 9];
            // Entries come back from a hash map in any order.
            let entries: Vec<(u16, BackendValue)> = vec![
                (slots[2], backend_value(&svc.backends[2])),
                (slots[0], backend_value(&svc.backends[0])),
                (slots[1], backend_value(&svc.backends[1])),
            ];
            let key = frontend_key(&svc.frontend);
            let back = reconstruct(
                &key,
                &svc_value(&svc, 10),
                Some(&revnat_value(&svc)),
                entries.clone(),
            )
            .unwrap();
            assert_eq!(back, svc);
            // An upsert stopped half way (one more entry than the service value counts, or
            // one fewer) reads back as a service no plan leaves alone.
            let mut more = entries.clone();
            more.push((
                7,
                backend_value(&be(if v6 { "fd00::4" } else { "10.0.0.4" }, 80)),
            ));
            let mut fewer = entries;
            fewer.pop();
            for partial in [more, fewer] {
                let back = reconstruct(
                    &key,
                    &svc_value(&svc, 10),
                    Some(&revnat_value(&svc)),
                    partial,
                )
                .unwrap();
                assert_eq!(back.name, format!("{}{INCONSISTENT}", svc.name));
                assert_ne!(back, svc);
            }
        }
    }

    #[test]
    fn reconstruct_service_without_backends() {
        let svc = service(4, vec![]);
        let key = frontend_key(&svc.frontend);
        let back =
            reconstruct(&key, &svc_value(&svc, 0), Some(&revnat_value(&svc)), vec![]).unwrap();
        assert_eq!(back, svc);
    }

    #[test]
    fn reconstruct_rejects_bad_keys() {
        let mut key = SvcKey::new("10.0.0.1".parse().unwrap(), 80, 1);
        assert!(reconstruct(&key, &SvcValue::default(), None, vec![]).is_none());
        key.proto = PROTO_UDP;
        key.family = 0;
        assert!(reconstruct(&key, &SvcValue::default(), None, vec![]).is_none());
    }

    #[test]
    fn frontend_keys_distinguish_proto_and_family() {
        let mut f = service(1, vec![]).frontend;
        let tcp = frontend_key(&f);
        f.proto = Proto::Udp;
        assert_ne!(frontend_key(&f), tcp);
        f.ip = Frontend::any_addr(false);
        assert_eq!(frontend_key(&f).addr, [0; 16]);
        f.ip = Frontend::any_addr(true);
        assert_eq!(frontend_key(&f).family, twill_common::service::FAMILY_V6);
    }
}
