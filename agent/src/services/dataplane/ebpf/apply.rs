//! The seam under the maps ([`LbMaps`]) and the thin apply that runs a plan's writes through
//! it.
//!
//! Why it is shaped as it is (Cilium's `LBMaps` is the model):
//! - Everything a plan writes, and everything a read-back reads, crosses [`LbMaps`]: the aya
//!   maps ([`AyaMaps`]) in production, [`FakeLbMaps`](super::FakeLbMaps) (ordered maps plus a
//!   log of the writes, optionally failing the Nth write) in tests. So the order of the
//!   writes, the entries a manifest produces and what a failed apply leaves behind are tested
//!   without root.
//! - [`apply_services`] is generic over the seam and is the only code that sequences writes:
//!   `EbpfLb::apply_plan` calls it with its aya maps, then does the chores that need the
//!   kernel (purging conntrack and sockets of removed backends, the node addresses).
//! - Conntrack, affinity and socket entries are the kernel's (it creates them per flow); they
//!   are read and freed by the `gc` module directly and are not part of this seam.

use std::collections::BTreeSet;

use aya::maps::MapError;
use tracing::{instrument, warn};
use twill_common::service::{
    BackendKey, BackendValue, MAP_BACKEND, MAP_COUNT, MAP_MAGLEV, MAP_REVNAT, MAP_SVC, RevNatValue,
    SvcCount, SvcKey, SvcValue,
};

use super::maps::{AyaMaps, optional, remove};
use super::writes::{MapWrite, Mirror, Slots, orphan_writes};
use super::{EbpfLb, EbpfLbError, entries, error_chain, map_err};
use crate::services::lb::{LbPlan, LbService};

/// Upserts from which a plan's Maglev tables are computed on a second thread (full syncs).
const PIPELINE_MIN_UPSERTS: usize = 256;
/// Maglev tables computed ahead of the map writes at most (4 KiB each).
const PIPELINE_DEPTH: usize = 64;

/// The maps a plan writes and a read-back reads: the seam under the eBPF service dataplane.
pub trait LbMaps {
    /// Executes one write; deleting an absent key succeeds.
    fn write(&mut self, write: &MapWrite) -> Result<(), EbpfLbError>;
    /// Every service entry.
    fn services(&self) -> Result<Vec<(SvcKey, SvcValue)>, EbpfLbError>;
    /// One service entry.
    fn service(&self, key: &SvcKey) -> Result<Option<SvcValue>, EbpfLbError>;
    /// A service id's reverse-NAT entry.
    fn revnat(&self, id: u32) -> Result<Option<RevNatValue>, EbpfLbError>;
    /// One backend slot.
    fn backend(&self, key: &BackendKey) -> Result<Option<BackendValue>, EbpfLbError>;
    /// Every backend slot's key.
    fn backend_keys(&self) -> Result<Vec<BackendKey>, EbpfLbError>;
    /// The service ids with a Maglev table.
    fn maglev_ids(&self) -> Result<Vec<u32>, EbpfLbError>;
    /// The service ids with a reverse-NAT entry.
    fn revnat_ids(&self) -> Result<Vec<u32>, EbpfLbError>;
}

impl LbMaps for AyaMaps {
    fn write(&mut self, write: &MapWrite) -> Result<(), EbpfLbError> {
        let err = |source| EbpfLbError::Map {
            operation: write.operation(),
            map: write.map(),
            key: write.key(),
            source: Box::new(source),
        };
        match write {
            MapWrite::Backend { key, value } => self.backends.insert(key, value, 0).map_err(err),
            MapWrite::Maglev { id, table } => self.maglev.insert(id, **table, 0).map_err(err),
            MapWrite::RevNat { id, value } => self.revnat.insert(id, value, 0).map_err(err),
            MapWrite::Service { key, value } => self.svc.insert(key, value, 0).map_err(err),
            MapWrite::ResetCounts { id } => self.reset_counts(*id),
            MapWrite::DeleteBackend(key) => remove(&mut self.backends, MAP_BACKEND, key),
            MapWrite::DeleteMaglev(id) => remove(&mut self.maglev, MAP_MAGLEV, id),
            MapWrite::DeleteRevNat(id) => remove(&mut self.revnat, MAP_REVNAT, id),
            MapWrite::DeleteService(key) => remove(&mut self.svc, MAP_SVC, key),
        }
    }

    fn services(&self) -> Result<Vec<(SvcKey, SvcValue)>, EbpfLbError> {
        self.svc
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("iterate", MAP_SVC, ""))
    }

    fn service(&self, key: &SvcKey) -> Result<Option<SvcValue>, EbpfLbError> {
        optional(self.svc.get(key, 0)).map_err(map_err("lookup", MAP_SVC, key))
    }

    fn revnat(&self, id: u32) -> Result<Option<RevNatValue>, EbpfLbError> {
        optional(self.revnat.get(&id, 0)).map_err(map_err("lookup", MAP_REVNAT, id))
    }

    fn backend(&self, key: &BackendKey) -> Result<Option<BackendValue>, EbpfLbError> {
        optional(self.backends.get(key, 0)).map_err(map_err("lookup", MAP_BACKEND, key))
    }

    fn backend_keys(&self) -> Result<Vec<BackendKey>, EbpfLbError> {
        self.backends
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("iterate", MAP_BACKEND, ""))
    }

    fn maglev_ids(&self) -> Result<Vec<u32>, EbpfLbError> {
        self.maglev
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("iterate", MAP_MAGLEV, ""))
    }

    fn revnat_ids(&self) -> Result<Vec<u32>, EbpfLbError> {
        self.revnat
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("iterate", MAP_REVNAT, ""))
    }
}

impl AyaMaps {
    fn reset_counts(&mut self, id: u32) -> Result<(), EbpfLbError> {
        let zero = aya::maps::PerCpuValues::try_from(vec![SvcCount::default(); possible_cpus()?])
            .map_err(|err| EbpfLbError::System("build per-CPU counters", err))?;
        self.count
            .set(id, zero, 0)
            .map_err(|source: MapError| map_err("update", MAP_COUNT, id)(source))
    }
}

/// The kernel's possible CPUs, the length of a per-CPU value: fixed at boot, so read from sysfs
/// once rather than for every service written.
fn possible_cpus() -> Result<usize, EbpfLbError> {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if let Some(&n) = CPUS.get() {
        return Ok(n);
    }
    let n =
        aya::util::nr_cpus().map_err(|(_, err)| EbpfLbError::System("count possible CPUs", err))?;
    Ok(*CPUS.get_or_init(|| n))
}

/// Every programmed service rebuilt from the maps (sorted by frontend), with the mirror of
/// what is programmed.
pub fn read_services<M: LbMaps + ?Sized>(
    maps: &M,
) -> Result<(Vec<LbService>, Mirror), EbpfLbError> {
    let entries = maps.services()?;
    let mut services = Vec::with_capacity(entries.len());
    let mut mirror = Mirror::default();
    for (key, value) in entries {
        let id = value.id;
        let revnat = maps.revnat(id)?;
        let mut backends = Vec::with_capacity(usize::from(value.backends));
        for slot in 0..value.slots {
            if let Some(b) = maps.backend(&BackendKey { id, slot, pad: 0 })? {
                backends.push((slot, b));
            }
        }
        if let Some(svc) = entries::reconstruct(&key, &value, revnat.as_ref(), backends.clone()) {
            services.push(svc);
        }
        mirror.insert(key, value, Slots::new(backends));
    }
    services.sort_by_key(|s| s.frontend.key());
    Ok((services, mirror))
}

/// Removes what is kept under service ids no service entry holds ([`orphan_writes`]: the
/// leftovers of a failed delete or a failed new upsert); returns how many writes that took.
/// Run between applies (the periodic resync does), never in the middle of one.
pub fn remove_orphans<M: LbMaps + ?Sized>(maps: &mut M) -> Result<usize, EbpfLbError> {
    let held: BTreeSet<u32> = maps.services()?.iter().map(|(_, v)| v.id).collect();
    let writes = orphan_writes(
        &held,
        &maps.backend_keys()?,
        &maps.maglev_ids()?,
        &maps.revnat_ids()?,
    );
    run(maps, &writes)?;
    Ok(writes.len())
}

/// Runs `writes` in order, stopping at the first that fails.
fn run<M: LbMaps + ?Sized>(maps: &mut M, writes: &[MapWrite]) -> Result<(), EbpfLbError> {
    writes.iter().try_for_each(|w| maps.write(w))
}

/// Writes the services of `plan` (its deletes, then its upserts, each in the order of the
/// `writes` module) through `maps`, keeping `mirror` in step. Returns the first service the
/// maps cannot hold (id out of range, malformed table): it is skipped and the rest of the plan
/// is applied, so one bad service does not hold back the others. A failing map operation stops
/// at once with its error (the caller re-reads and re-plans).
pub fn apply_services<M: LbMaps + ?Sized>(
    maps: &mut M,
    mirror: &mut Mirror,
    plan: &LbPlan,
    max_services: u32,
) -> Result<Option<EbpfLbError>, EbpfLbError> {
    for frontend in &plan.deletes {
        let key = entries::frontend_key(frontend);
        // A frontend the mirror does not know may still be in the maps.
        let value = match mirror.service(&key) {
            Some(value) => Some(*value),
            None => maps.service(&key)?,
        };
        if let Some(value) = value {
            let mut writes = Vec::new();
            super::writes::delete_writes(&key, &value, &mut writes);
            run(maps, &writes)?;
        }
        mirror.remove(&key);
    }
    let mut rejected = None;
    let mut one = |maps: &mut M, mirror: &mut Mirror, svc: &LbService, indices| {
        match mirror.plan_upsert(svc, indices, max_services) {
            Ok(upsert) => {
                run(maps, &upsert.writes)?;
                mirror.commit(upsert);
            }
            Err(source) => {
                let err = EbpfLbError::Entry {
                    frontend: svc.frontend.to_string(),
                    source,
                };
                warn!(error = %error_chain(&err), "service not programmed");
                rejected.get_or_insert(err);
            }
        }
        Ok::<(), EbpfLbError>(())
    };
    let upserts = &plan.upserts;
    if upserts.len() < PIPELINE_MIN_UPSERTS
        || std::thread::available_parallelism().map_or(1, std::num::NonZero::get) < 2
    {
        for svc in upserts {
            one(maps, mirror, svc, None)?;
        }
    } else {
        // A second thread computes the Maglev tables (pure, ~10 µs each: a good part of a
        // full sync) a few services ahead of the map writes, which are syscalls.
        std::thread::scope(|scope| -> Result<(), EbpfLbError> {
            let (tx, rx) = std::sync::mpsc::sync_channel(PIPELINE_DEPTH);
            scope.spawn(move || {
                for svc in upserts {
                    let indices =
                        (!svc.backends.is_empty()).then(|| entries::maglev_indices(&svc.backends));
                    // The writer stopped early (a failed map operation).
                    if tx.send(indices).is_err() {
                        return;
                    }
                }
            });
            for svc in upserts {
                one(maps, mirror, svc, rx.recv().ok().flatten())?;
            }
            Ok(())
        })?;
    }
    Ok(rejected)
}

impl EbpfLb {
    /// Applies a plan (see [`LbDataplane::apply`](crate::services::lb::LbDataplane::apply)):
    /// [`apply_services`] through the aya maps, then the conntrack, affinity and socket
    /// entries of the removed backends are purged and the node addresses refreshed.
    ///
    /// A service the maps cannot hold is skipped and reported after the rest of the plan is
    /// applied; a failing map operation stops at once (the caller re-reads and re-plans).
    #[instrument(level = "debug", skip_all, fields(upserts = plan.upserts.len(),
        deletes = plan.deletes.len(), stale = plan.stale_backends.len()), err)]
    pub fn apply_plan(&mut self, plan: &LbPlan) -> Result<(), EbpfLbError> {
        let rejected = apply_services(
            &mut self.maps,
            &mut self.mirror,
            plan,
            self.limits.max_services,
        )?;
        if !plan.stale_backends.is_empty() {
            self.purge(&plan.stale_backends)?;
        }
        self.sync_local_addrs()?;
        rejected.map_or(Ok(()), Err)
    }
}
