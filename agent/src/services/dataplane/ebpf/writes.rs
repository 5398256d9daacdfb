//! The pure half of applying a plan: from a service and the mirror of what is programmed to
//! the ordered list of map writes ([`MapWrite`]) that programs it.
//!
//! Why it is shaped as it is:
//! - **Order is the correctness argument**, so it is data a test can read. The kernel reads
//!   the maps while user space writes them, one entry at a time; an upsert therefore writes
//!   new and changed backend slots first (in slots the installed Maglev table does not
//!   reference, see [`entries::assign_slots`]), then the Maglev table (one atomic update
//!   switches every lookup to the new slots), then the reverse-NAT entry, a new service's
//!   counters (zeroed while the service is not yet visible) and the service entry (whose
//!   backend count comes last), and only then deletes the freed slots. A delete removes
//!   the service entry first, so no new lookup reaches what follows. At every point the kernel
//!   sees either the old or the new backend set, never a table pointing at an empty slot.
//! - **The mirror ([`Mirror`]) is only changed after the writes succeed** ([`Mirror::commit`]):
//!   it never claims what the maps do not hold. After a failed write the caller re-reads the
//!   maps (`observed`), which rebuilds the mirror, and plans again.
//! - Nothing here does I/O: the thin apply in the `apply` module executes the list through the
//!   [`LbMaps`](super::LbMaps) seam, the aya maps in production and
//!   [`FakeLbMaps`](super::FakeLbMaps) in tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use twill_common::service::{
    BackendKey, BackendValue, MAP_BACKEND, MAP_COUNT, MAP_MAGLEV, MAP_REVNAT, MAP_SVC, MaglevTable,
    RevNatValue, SvcKey, SvcValue,
};

use super::entries::{self, BackendId, EntryError};
use crate::services::lb::LbService;

/// One write to one map, in the order the kernel may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapWrite {
    /// `TWL_LB_BE`: a backend in a service's slot.
    Backend {
        /// Service id and slot.
        key: BackendKey,
        /// The backend.
        value: BackendValue,
    },
    /// `TWL_LB_MAGLEV`: a service's Maglev table, replaced in one update.
    Maglev {
        /// Service id.
        id: u32,
        /// Backend slot per Maglev entry.
        table: Box<MaglevTable>,
    },
    /// `TWL_LB_REVNAT`: the frontend, kind and name of a service id.
    RevNat {
        /// Service id.
        id: u32,
        /// The value.
        value: RevNatValue,
    },
    /// `TWL_LB_SVC`: a frontend's service entry.
    Service {
        /// The frontend.
        key: SvcKey,
        /// The entry.
        value: SvcValue,
    },
    /// `TWL_LB_CNT`: a new service's per-CPU counters set to zero.
    ResetCounts {
        /// Service id.
        id: u32,
    },
    /// Removes a backend slot (absent is fine).
    DeleteBackend(BackendKey),
    /// Removes a service's Maglev table (absent is fine).
    DeleteMaglev(u32),
    /// Removes a service id's reverse-NAT entry (absent is fine).
    DeleteRevNat(u32),
    /// Removes a frontend's service entry (absent is fine).
    DeleteService(SvcKey),
}

impl MapWrite {
    /// The map written.
    pub fn map(&self) -> &'static str {
        match self {
            MapWrite::Backend { .. } | MapWrite::DeleteBackend(_) => MAP_BACKEND,
            MapWrite::Maglev { .. } | MapWrite::DeleteMaglev(_) => MAP_MAGLEV,
            MapWrite::RevNat { .. } | MapWrite::DeleteRevNat(_) => MAP_REVNAT,
            MapWrite::Service { .. } | MapWrite::DeleteService(_) => MAP_SVC,
            MapWrite::ResetCounts { .. } => MAP_COUNT,
        }
    }

    /// `"update"` or `"delete"`, as in an error.
    pub fn operation(&self) -> &'static str {
        match self {
            MapWrite::DeleteBackend(_)
            | MapWrite::DeleteMaglev(_)
            | MapWrite::DeleteRevNat(_)
            | MapWrite::DeleteService(_) => "delete",
            _ => "update",
        }
    }

    /// The key, for humans (errors and golden files).
    pub fn key(&self) -> String {
        match self {
            MapWrite::Backend { key, .. } | MapWrite::DeleteBackend(key) => {
                format!("id={} slot={}", key.id, key.slot)
            }
            MapWrite::Maglev { id, .. }
            | MapWrite::RevNat { id, .. }
            | MapWrite::ResetCounts { id }
            | MapWrite::DeleteMaglev(id)
            | MapWrite::DeleteRevNat(id) => format!("id={id}"),
            MapWrite::Service { key, .. } | MapWrite::DeleteService(key) => {
                SvcKeyText(key).to_string()
            }
        }
    }
}

/// A frontend key as `10.96.0.10:80/TCP` (`[fd00::1]:80/UDP`).
pub struct SvcKeyText<'a>(pub &'a SvcKey);

impl fmt::Display for SvcKeyText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.0.proto {
            twill_common::service::PROTO_TCP => "TCP".to_owned(),
            twill_common::service::PROTO_UDP => "UDP".to_owned(),
            other => format!("proto{other}"),
        };
        match self.0.ip() {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}/{proto}", self.0.port()),
            Some(ip) => write!(f, "{ip}:{}/{proto}", self.0.port()),
            None => write!(f, "family{}:{}/{proto}", self.0.family, self.0.port()),
        }
    }
}

/// What is programmed for one frontend: its service entry and backend slots (the Maglev
/// table and the reverse-NAT entry are derived from the service and rewritten with it). Kept
/// for every frontend for as long as the agent runs, so it is compact: no per-frontend tree.
#[derive(Debug, Clone)]
pub(super) struct Programmed {
    pub(super) value: SvcValue,
    pub(super) backends: Slots,
}

/// A frontend's programmed backends, `(slot, value)` sorted by address and port.
#[derive(Debug, Clone, Default)]
pub(super) struct Slots(Box<[(u16, BackendValue)]>);

fn backend_id(value: &BackendValue) -> Option<BackendId> {
    Some((value.ip()?, value.port()))
}

impl Slots {
    /// From `(slot, value)` pairs; values without a valid address are left out.
    pub(super) fn new(pairs: impl IntoIterator<Item = (u16, BackendValue)>) -> Self {
        let mut v: Vec<(BackendId, u16, BackendValue)> = pairs
            .into_iter()
            .filter_map(|(slot, b)| Some((backend_id(&b)?, slot, b)))
            .collect();
        v.sort_unstable_by_key(|e| e.0);
        v.dedup_by_key(|e| e.0);
        Self(v.into_iter().map(|(_, slot, b)| (slot, b)).collect())
    }

    /// The slot and value of a backend.
    fn get(&self, id: &BackendId) -> Option<&(u16, BackendValue)> {
        self.0
            .binary_search_by_key(id, |(_, b)| {
                backend_id(b).unwrap_or((IpAddr::from([0; 4]), 0))
            })
            .ok()
            .map(|i| &self.0[i])
    }

    /// Every backend with its slot.
    fn slots(&self) -> impl Iterator<Item = (BackendId, u16)> + '_ {
        self.0
            .iter()
            .filter_map(|(slot, b)| Some((backend_id(b)?, *slot)))
    }

    /// Every `(slot, value)`.
    pub(super) fn values(&self) -> impl Iterator<Item = &(u16, BackendValue)> + '_ {
        self.0.iter()
    }
}

/// User space's copy of what is programmed (everything but the Maglev tables): makes
/// unchanged entries cost nothing. Rebuilt from the maps at open and on every full resync.
#[derive(Debug, Clone, Default)]
pub struct Mirror {
    pub(super) programmed: HashMap<SvcKey, Programmed>,
    pub(super) ids: HashMap<u32, SvcKey>,
}

/// The writes of one upsert and what the mirror becomes once they are done.
#[derive(Debug)]
pub struct Upsert {
    /// The writes, in order.
    pub writes: Vec<MapWrite>,
    /// Frontends the writes delete (another frontend's stale hold on the id, or this one's
    /// entries under an old id).
    removed: Vec<SvcKey>,
    key: SvcKey,
    programmed: Programmed,
}

impl Mirror {
    /// Number of programmed frontends.
    pub fn len(&self) -> usize {
        self.programmed.len()
    }

    /// Whether nothing is programmed.
    pub fn is_empty(&self) -> bool {
        self.programmed.is_empty()
    }

    /// The service entry of a frontend, if programmed.
    pub fn service(&self, key: &SvcKey) -> Option<&SvcValue> {
        self.programmed.get(key).map(|p| &p.value)
    }

    /// The service entries of every programmed frontend.
    pub fn values(&self) -> impl Iterator<Item = &SvcValue> {
        self.programmed.values().map(|p| &p.value)
    }

    /// The frontend holding a service id.
    pub(super) fn key_of(&self, id: u32) -> Option<&SvcKey> {
        self.ids.get(&id)
    }

    /// The programmed backends of a frontend.
    pub(super) fn backends(&self, key: &SvcKey) -> Option<&Slots> {
        self.programmed.get(key).map(|p| &p.backends)
    }

    /// Records a frontend read back from the maps.
    pub(super) fn insert(&mut self, key: SvcKey, value: SvcValue, backends: Slots) {
        self.ids.insert(value.id, key);
        self.programmed.insert(key, Programmed { value, backends });
    }

    /// Forgets a frontend whose entries were deleted.
    pub fn remove(&mut self, key: &SvcKey) {
        if let Some(p) = self.programmed.remove(key)
            && self.ids.get(&p.value.id) == Some(key)
        {
            self.ids.remove(&p.value.id);
        }
    }

    /// Records a done upsert.
    pub fn commit(&mut self, upsert: Upsert) {
        for key in &upsert.removed {
            self.remove(key);
        }
        self.ids.insert(upsert.programmed.value.id, upsert.key);
        self.programmed.insert(upsert.key, upsert.programmed);
    }

    /// The writes that program `svc` over what the mirror holds (see the module notes);
    /// `indices` is its Maglev table of backend indices if already computed. The mirror is not
    /// changed: [`commit`](Self::commit) the result once its writes are done.
    pub fn plan_upsert(
        &self,
        svc: &LbService,
        indices: Option<Vec<u32>>,
        max_services: u32,
    ) -> Result<Upsert, EntryError> {
        entries::validate(svc, max_services)?;
        let key = entries::frontend_key(&svc.frontend);
        let id = svc.id;
        let mut writes = Vec::with_capacity(svc.backends.len() + 4);
        let mut removed = Vec::new();
        // An id is unique among frontends; one still held by another frontend is stale.
        if let Some(other) = self.ids.get(&id).copied()
            && other != key
        {
            if let Some(p) = self.programmed.get(&other) {
                delete_writes(&other, &p.value, &mut writes);
            }
            removed.push(other);
        }
        let mut old = self.programmed.get(&key);
        if let Some(p) = old.filter(|p| p.value.id != id) {
            delete_writes(&key, &p.value, &mut writes);
            removed.push(key);
            old = None;
        }
        let old_slots: BTreeMap<BackendId, u16> = old
            .map(|p| p.backends.slots().collect())
            .unwrap_or_default();
        let slots = entries::assign_slots(&old_slots, &svc.backends)?;

        // 1. New and changed backends, in slots the installed table does not reference.
        let mut backends = Vec::with_capacity(svc.backends.len());
        for (backend, slot) in svc.backends.iter().zip(&slots.slots) {
            let value = entries::backend_value(backend);
            let unchanged = old
                .and_then(|p| p.backends.get(&(backend.ip, backend.port)))
                .is_some_and(|(s, v)| s == slot && *v == value);
            if !unchanged {
                let key = BackendKey {
                    id,
                    slot: *slot,
                    pad: 0,
                };
                writes.push(MapWrite::Backend { key, value });
            }
            backends.push((*slot, value));
        }
        // 2. The Maglev table, switched in one update.
        if svc.backends.is_empty() {
            writes.push(MapWrite::DeleteMaglev(id));
        } else {
            let table = match indices {
                Some(indices) => entries::maglev_slots(&indices, &slots.slots),
                None => entries::maglev_table(&svc.backends, &slots.slots),
            }?;
            writes.push(MapWrite::Maglev { id, table });
        }
        // 3. Reverse NAT / info, a new service's counters and the service entry. The
        // reverse-NAT entry is written with every upsert (one update) rather than mirrored
        // (168 bytes a frontend). The counters are zeroed before the entry makes the service
        // visible: an id once held by a deleted service starts from zero, and a failed reset
        // fails the upsert while the service is still missing, so the next sync redoes it.
        writes.push(MapWrite::RevNat {
            id,
            value: entries::revnat_value(svc),
        });
        if old.is_none() {
            writes.push(MapWrite::ResetCounts { id });
        }
        let value = entries::svc_value(svc, slots.high);
        if old.is_none_or(|p| p.value != value) {
            writes.push(MapWrite::Service { key, value });
        }
        // 4. Slots nobody references any more.
        for slot in slots.freed {
            writes.push(MapWrite::DeleteBackend(BackendKey { id, slot, pad: 0 }));
        }
        Ok(Upsert {
            writes,
            removed,
            key,
            programmed: Programmed {
                value,
                backends: Slots::new(backends),
            },
        })
    }
}

/// The writes that remove what is kept under service ids no service entry holds (`held`):
/// backend slots (`backends`), Maglev tables (`maglev`) and reverse-NAT entries (`revnat`),
/// and those ids' counters are zeroed. Such entries are what a delete that failed after
/// removing the service entry, or a new service's upsert that failed before writing it, left
/// behind; no lookup reaches them (every lookup starts at a service entry), so removing them
/// is safe whenever no apply is under way.
pub fn orphan_writes(
    held: &BTreeSet<u32>,
    backends: &[BackendKey],
    maglev: &[u32],
    revnat: &[u32],
) -> Vec<MapWrite> {
    let orphan = |id: &u32| !held.contains(id);
    let mut writes: Vec<MapWrite> = maglev
        .iter()
        .copied()
        .filter(orphan)
        .map(MapWrite::DeleteMaglev)
        .collect();
    writes.extend(
        revnat
            .iter()
            .copied()
            .filter(orphan)
            .map(MapWrite::DeleteRevNat),
    );
    writes.extend(
        backends
            .iter()
            .filter(|k| orphan(&k.id))
            .map(|k| MapWrite::DeleteBackend(*k)),
    );
    let ids: BTreeSet<u32> = maglev
        .iter()
        .chain(revnat)
        .chain(backends.iter().map(|k| &k.id))
        .copied()
        .filter(orphan)
        .collect();
    writes.extend(ids.into_iter().map(|id| MapWrite::ResetCounts { id }));
    writes
}

/// The writes that remove frontend `key`, whose service entry is `value`, and everything keyed
/// by its id: the service entry first (no new lookup reaches what follows), then the Maglev
/// table, the reverse-NAT entry and every slot below the high-water mark.
pub fn delete_writes(key: &SvcKey, value: &SvcValue, out: &mut Vec<MapWrite>) {
    let id = value.id;
    out.push(MapWrite::DeleteService(*key));
    out.push(MapWrite::DeleteMaglev(id));
    out.push(MapWrite::DeleteRevNat(id));
    out.extend(
        (0..value.slots).map(|slot| MapWrite::DeleteBackend(BackendKey { id, slot, pad: 0 })),
    );
}
