//! Stable frontend ids ([`IdAllocator`]) and the incremental state the service loop keeps
//! ([`LbState`]): only the Services a change touches are recomputed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::compute::{Conflict, Desired, desired, service_frontends};
use super::snapshot::{NsName, Snapshot, dense, insert_sorted};
use super::{NodeIdentity, Refused};
use crate::services::lb::{FrontendKey, LbService};
use crate::services::model::{Change, Object};

/// Stable ids per frontend: see the module notes.
#[derive(Debug, Clone)]
pub struct IdAllocator {
    pub(super) by_key: BTreeMap<FrontendKey, u32>,
    pub(super) used: BTreeSet<u32>,
    /// Freed, not reusable until [`IdAllocator::commit`] (the dataplane may still hold them).
    pub(super) pending: Vec<u32>,
    /// No id below this is free.
    pub(super) hint: u32,
}

impl Default for IdAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl IdAllocator {
    /// An empty allocator.
    pub fn new() -> Self {
        IdAllocator {
            by_key: BTreeMap::new(),
            used: BTreeSet::new(),
            pending: Vec::new(),
            hint: 1,
        }
    }

    /// Adopts the ids a dataplane reports (after a restart or a failed apply): each frontend
    /// keeps the id the dataplane has for it, unless another frontend already holds that id here
    /// (a corrupt read-back), in which case it keeps or gets another one.
    pub fn seed(&mut self, observed: &[LbService]) {
        for s in observed {
            let key = s.frontend.key();
            if s.id == 0 || self.by_key.get(&key) == Some(&s.id) || self.used.contains(&s.id) {
                continue;
            }
            if let Some(old) = self.by_key.insert(key, s.id) {
                self.pending.push(old);
            }
            self.used.insert(s.id);
        }
    }

    /// The id of a frontend, if it has one.
    pub fn get(&self, key: &FrontendKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// The id of a frontend, allocating the lowest free one if it has none.
    pub fn id_for(&mut self, key: FrontendKey) -> u32 {
        if let Some(&id) = self.by_key.get(&key) {
            return id;
        }
        let mut id = self.hint.max(1);
        while self.used.contains(&id) {
            id += 1;
        }
        self.hint = id + 1;
        self.by_key.insert(key, id);
        self.used.insert(id);
        id
    }

    /// Frees a frontend's id; it becomes reusable after the next [`IdAllocator::commit`].
    pub fn free(&mut self, key: &FrontendKey) {
        if let Some(id) = self.by_key.remove(key) {
            self.pending.push(id);
        }
    }

    /// Makes freed ids reusable: call once the dataplane no longer holds them (after a
    /// successful apply of the plan that deleted their frontends).
    pub fn commit(&mut self) {
        for id in std::mem::take(&mut self.pending) {
            if !self.by_key.values().any(|v| *v == id) {
                self.used.remove(&id);
                self.hint = self.hint.min(id);
            }
        }
    }

    /// Sets the id of every service (keeping existing ones) and frees the ids of frontends not
    /// in `services` (reusable after [`IdAllocator::commit`]).
    pub fn assign(&mut self, services: &mut [LbService]) {
        let keep: BTreeSet<FrontendKey> = services.iter().map(|s| s.frontend.key()).collect();
        let gone: Vec<FrontendKey> = self
            .by_key
            .keys()
            .filter(|k| !keep.contains(*k))
            .copied()
            .collect();
        for s in services.iter_mut() {
            s.id = self.id_for(s.frontend.key());
        }
        for k in gone {
            self.free(&k);
        }
    }
}

/// [`desired`] with ids assigned by `ids`.
pub fn build(snap: &Snapshot, node: &NodeIdentity, ids: &mut IdAllocator) -> Desired {
    let mut d = desired(snap, node);
    ids.assign(&mut d.services);
    d
}

/// The incremental form of [`build`]: keeps the objects, each Service's candidate frontends,
/// who claims which frontend and the ids, so a change recomputes only the Services it touches
/// (one endpoint change costs one Service's backends, not 10k). Same result as [`build`]
/// at every step (checked by a property test): the first claimant by (namespace, name) owns a
/// frontend.
///
/// Each candidate is kept once, behind an [`Arc`], with its id set: [`LbState::get_shared`]
/// and [`LbState::desired_shared`] hand out pointers, so the service loop's record of what it
/// applied shares them instead of holding a second copy of every frontend.
#[derive(Debug, Clone)]
pub struct LbState {
    pub(super) node: NodeIdentity,
    pub(super) snap: Snapshot,
    /// Each Service's candidate frontends, sorted by frontend key.
    pub(super) per_service: BTreeMap<NsName, Box<[Arc<LbService>]>>,
    /// Who claims each frontend, sorted by (namespace, name): the first owns it. Almost always
    /// one.
    pub(super) claims: BTreeMap<FrontendKey, Vec<NsName>>,
    /// The frontends each Service asks for and does not get (almost always none).
    pub(super) refused: BTreeMap<NsName, Box<[Refused]>>,
    pub(super) ids: IdAllocator,
}

/// The candidate for `key` among one Service's sorted frontends.
pub(super) fn find<'a>(
    list: &'a [Arc<LbService>],
    key: &FrontendKey,
) -> Option<&'a Arc<LbService>> {
    list.binary_search_by_key(key, |s| s.frontend.key())
        .ok()
        .map(|i| &list[i])
}

impl LbState {
    /// Empty state for this node.
    pub fn new(node: NodeIdentity) -> Self {
        LbState {
            node,
            snap: Snapshot::default(),
            per_service: BTreeMap::new(),
            claims: BTreeMap::new(),
            refused: BTreeMap::new(),
            ids: IdAllocator::new(),
        }
    }

    /// The node this state is computed for.
    pub fn node(&self) -> &NodeIdentity {
        &self.node
    }

    /// Replaces the node's identity (its own addresses changed); recomputes every Service if it
    /// differs and returns the frontends that may have changed.
    pub fn set_node(&mut self, node: NodeIdentity) -> BTreeSet<FrontendKey> {
        if node == self.node {
            return BTreeSet::new();
        }
        self.node = node;
        let all: BTreeSet<NsName> = self.snap.services.keys().cloned().collect();
        self.recompute(all)
    }

    /// Every frontend asked for and refused, by Service.
    pub fn refused(&self) -> impl Iterator<Item = &Refused> {
        self.refused.values().flat_map(|r| r.iter())
    }

    /// The objects.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// The id allocator (seed it from the dataplane's read-back; commit after applies).
    pub fn ids_mut(&mut self) -> &mut IdAllocator {
        &mut self.ids
    }

    /// Replaces every object (after a re-list); returns the frontends that may have changed.
    pub fn reset(&mut self, objects: Vec<Object>) -> BTreeSet<FrontendKey> {
        self.replace(Snapshot::from_objects(objects))
    }

    /// Replaces every object with `snap` (a listing built page by page); returns the frontends
    /// that may have changed.
    pub fn replace(&mut self, mut snap: Snapshot) -> BTreeSet<FrontendKey> {
        let mut touched: BTreeSet<NsName> = self.snap.services.keys().cloned().collect();
        snap.compact();
        self.snap = snap;
        touched.extend(self.snap.services.keys().cloned());
        let dirty = self.recompute(touched);
        // Every service was just recomputed, in key order: the maps are as sparse as they get.
        dense(&mut self.per_service);
        dense(&mut self.claims);
        dirty
    }

    /// Applies changes; returns the frontends that may have changed.
    pub fn change(&mut self, changes: Vec<Change>) -> BTreeSet<FrontendKey> {
        let mut touched = BTreeSet::new();
        for c in changes {
            match c {
                Change::Put(o) => touched.extend(self.snap.put(o)),
                Change::Delete(k) => touched.extend(self.snap.remove(&k)),
            }
        }
        self.recompute(touched)
    }

    pub(super) fn recompute(&mut self, services: BTreeSet<NsName>) -> BTreeSet<FrontendKey> {
        let mut dirty = BTreeSet::new();
        for key in services {
            let (frontends, refused) = match self.snap.services.get(&key) {
                Some(svc) => service_frontends(&self.snap, &key, svc, &self.node),
                None => (Vec::new(), Vec::new()),
            };
            if refused.is_empty() {
                self.refused.remove(&key);
            } else {
                self.refused.insert(key.clone(), refused.into());
            }
            let new: Box<[Arc<LbService>]> = frontends
                .into_iter()
                .map(|s| (s.frontend.key(), s))
                .collect::<BTreeMap<_, _>>()
                .into_values()
                .map(Arc::new)
                .collect();
            let old = self.per_service.remove(&key).unwrap_or_default();
            for s in &old {
                let k = s.frontend.key();
                if find(&new, &k).is_none()
                    && let Some(set) = self.claims.get_mut(&k)
                {
                    set.retain(|o| *o != key);
                    if set.is_empty() {
                        self.claims.remove(&k);
                    }
                }
                dirty.insert(k);
            }
            for s in &new {
                let k = s.frontend.key();
                insert_sorted(self.claims.entry(k).or_default(), &key);
                dirty.insert(k);
            }
            if !new.is_empty() {
                self.per_service.insert(key, new);
            }
        }
        for k in &dirty {
            if self.claims.contains_key(k) {
                let id = self.ids.id_for(*k);
                self.set_id(k, id);
            } else {
                self.ids.free(k);
            }
        }
        dirty
    }

    /// Writes `id` into every candidate for `key`.
    pub(super) fn set_id(&mut self, key: &FrontendKey, id: u32) {
        let Some(owners) = self.claims.get(key) else {
            return;
        };
        for owner in owners {
            if let Some(list) = self.per_service.get_mut(owner)
                && let Ok(i) = list.binary_search_by_key(key, |s| s.frontend.key())
                && list[i].id != id
            {
                Arc::make_mut(&mut list[i]).id = id;
            }
        }
    }

    /// Adopts the ids a dataplane reports ([`IdAllocator::seed`]) and writes them into the
    /// candidates.
    pub fn seed(&mut self, observed: &[LbService]) {
        self.ids.seed(observed);
        for s in observed {
            let k = s.frontend.key();
            if let Some(id) = self.ids.get(&k) {
                self.set_id(&k, id);
            }
        }
    }

    /// The desired service for a frontend, with its id, shared.
    pub fn get_shared(&self, key: &FrontendKey) -> Option<Arc<LbService>> {
        let owner = self.claims.get(key)?.first()?;
        let s = find(self.per_service.get(owner)?, key)?;
        let id = self.ids.get(key)?;
        if s.id == id {
            Some(s.clone())
        } else {
            // Only if the allocator was seeded behind this state's back (`ids_mut`).
            let mut copy = LbService::clone(s);
            copy.id = id;
            Some(Arc::new(copy))
        }
    }

    /// The desired service for a frontend, with its id.
    pub fn get(&self, key: &FrontendKey) -> Option<LbService> {
        self.get_shared(key).map(Arc::unwrap_or_clone)
    }

    /// Every desired service, sorted by frontend key, shared.
    pub fn desired_shared(&self) -> Vec<Arc<LbService>> {
        self.claims
            .keys()
            .filter_map(|k| self.get_shared(k))
            .collect()
    }

    /// Every desired service, sorted by frontend key.
    pub fn desired(&self) -> Vec<LbService> {
        self.claims.keys().filter_map(|k| self.get(k)).collect()
    }

    /// Number of desired frontends.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// No desired frontend.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// Frontends claimed by more than one Service.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let mut out = Vec::new();
        for (k, owners) in &self.claims {
            let mut it = owners.iter();
            let Some(first) = it.next() else { continue };
            let name = |o: &NsName| {
                self.per_service
                    .get(o)
                    .and_then(|m| find(m, k))
                    .map_or_else(|| format!("{}/{}", o.0, o.1), |s| s.name.clone())
            };
            for other in it {
                out.push(Conflict {
                    frontend: *k,
                    kept: name(first),
                    refused: name(other),
                });
            }
        }
        out
    }
}
