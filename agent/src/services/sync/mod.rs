//! The service loop: source updates in, plans out through the [`LbDataplane`] seam.
//!
//! Why this shape:
//! - [`run_services`] never blocks on the source: before the first successful list it programs
//!   nothing (and deletes nothing — a restarted agent keeps the pinned state it finds); when
//!   the store goes away, the dataplane keeps what it has. Each batch of changes is planned
//!   against what was applied for the touched frontends only; the resync timer and any failed
//!   apply plan everything against what the dataplane reports ([`LbDataplane::observed`]),
//!   which heals drift. Dataplane calls are synchronous and run on the blocking pool.
//! - A store that suddenly lost everything is not believed at once ([`guard::StoreGuard`]): a
//!   fresh or wiped etcd would otherwise flush every node's services at the same moment.
//! - The source is a task handed in ([`run_services_with`]): the etcd cache or the Kubernetes
//!   watchers; the loop knows only [`SourceUpdate`]s.

pub mod guard;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::services::desired::{LbState, NodeIdentity, Refused, Snapshot};
use crate::services::lb::{FrontendKey, LbDataplane, LbPlan, LbService, plan_refs};
use crate::services::metrics::ServiceMetrics;
use crate::services::model::{Change, FieldError, Kind, Object, ObjectKey};
use crate::services::source::{Paging, ServiceStore, SourceUpdate, service_cache};
use crate::services::sync::guard::{StoreGuard, Verdict};
use crate::shared::backoff::Backoff;

// ---------------------------------------------------------------------------------------------
// The loop.

/// Reads the node's own addresses.
pub type OwnAddresses = Arc<dyn Fn() -> Vec<IpAddr> + Send + Sync>;

/// How the service loop runs, beyond its source, node and dataplane.
#[derive(Clone)]
pub struct LoopSettings {
    /// Period of the full resync against what the dataplane reports.
    pub resync: Duration,
    /// Reads the node's own addresses, which no frontend may take ([`Reserved::Node`]): called
    /// when the loop starts and before every full resync, since addresses come and go (a pod
    /// bridge's gateway address appears with the first pod). `None`: the node's reserved
    /// addresses are the ones it was given.
    pub own_addresses: Option<OwnAddresses>,
}

impl From<Duration> for LoopSettings {
    fn from(resync: Duration) -> Self {
        LoopSettings {
            resync,
            own_addresses: None,
        }
    }
}

/// Runs a synchronous dataplane call on the blocking pool.
async fn on_dataplane<D: LbDataplane, T: Send + 'static>(
    dp: &mut Option<D>,
    f: impl FnOnce(&mut D) -> T + Send + 'static,
) -> anyhow::Result<T> {
    let mut d = dp.take().context("dataplane lost by an earlier panic")?;
    let (d, out) = tokio::task::spawn_blocking(move || {
        let out = f(&mut d);
        (d, out)
    })
    .await
    .context("dataplane call panicked")?;
    *dp = Some(d);
    Ok(out)
}

struct Loop<D: LbDataplane> {
    dp: Option<D>,
    state: LbState,
    /// What the dataplane holds, as far as we know (shared with `state` once applied).
    applied: BTreeMap<FrontendKey, Arc<LbService>>,
    /// The next sync must re-read the dataplane and plan everything.
    need_full: bool,
    metrics: Arc<ServiceMetrics>,
    conflicts: usize,
    /// A sync has succeeded since the loop started.
    synced_once: bool,
    /// Refused frontends already logged.
    refused: BTreeSet<Refused>,
    /// Objects known to be invalid, with the error already logged for each.
    invalid: BTreeMap<ObjectKey, String>,
    guard: StoreGuard,
    own_addresses: Option<OwnAddresses>,
}

impl<D: LbDataplane> Loop<D> {
    /// Re-reads the node's own addresses; returns the frontends that may have changed.
    fn refresh_own_addresses(&mut self) -> BTreeSet<FrontendKey> {
        let Some(read) = &self.own_addresses else {
            return BTreeSet::new();
        };
        let mut node = self.state.node().clone();
        node.set_own_addresses(read());
        self.state.set_node(node)
    }

    /// Replaces the known invalid objects (after a listing), logging the new ones.
    fn set_invalid(&mut self, invalid: Vec<(ObjectKey, FieldError)>) {
        let old = std::mem::take(&mut self.invalid);
        for (k, e) in invalid {
            let e = e.to_string();
            if old.get(&k) != Some(&e) {
                tracing::warn!(object = %k, error = %e, "invalid object in the store; treating it as absent");
            }
            self.invalid.insert(k, e);
        }
        self.metrics.lock().invalid_objects = self.invalid.len();
    }

    /// Records objects found invalid by a watch, logging the new ones.
    fn add_invalid(&mut self, invalid: Vec<(ObjectKey, FieldError)>) {
        for (k, e) in invalid {
            let e = e.to_string();
            if self.invalid.get(&k) != Some(&e) {
                tracing::warn!(object = %k, error = %e, "invalid object in the store; treating it as absent");
            }
            self.invalid.insert(k, e);
        }
        self.metrics.lock().invalid_objects = self.invalid.len();
    }

    /// Forgets the invalid objects `changes` replace or delete.
    fn changed(&mut self, changes: &[Change]) {
        if self.invalid.is_empty() {
            return;
        }
        for c in changes {
            match c {
                Change::Put(o) => self.invalid.remove(&o.key()),
                Change::Delete(k) => self.invalid.remove(k),
            };
        }
        self.metrics.lock().invalid_objects = self.invalid.len();
    }

    /// Logs the refused frontends not logged yet and exports how many there are.
    fn report_refused(&mut self) {
        let now: BTreeSet<Refused> = self.state.refused().cloned().collect();
        if now == self.refused {
            return;
        }
        for r in now.difference(&self.refused) {
            tracing::warn!(refused = %r, "frontend not programmed");
        }
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        for r in &now {
            *counts.entry(r.reason.as_str()).or_default() += 1;
        }
        self.metrics.lock().refused = counts;
        self.refused = now;
    }

    async fn apply(&mut self, plan: LbPlan) -> anyhow::Result<Result<(), String>> {
        if plan.is_empty() {
            return Ok(Ok(()));
        }
        on_dataplane(&mut self.dp, move |d| {
            d.apply(&plan).map_err(|e| e.to_string())
        })
        .await
    }

    fn after(&mut self, kind: &'static str, start: Instant, ops: usize, res: &Result<(), String>) {
        let took = start.elapsed();
        self.metrics.observe(kind, res.is_ok(), took, ops);
        {
            let mut g = self.metrics.lock();
            g.frontends = self.applied.len();
            g.backends = self.applied.values().map(|s| s.backends.len()).sum();
            g.last_error = res.as_ref().err().cloned();
        }
        match res {
            Ok(()) => {
                self.state.ids_mut().commit();
                if !self.synced_once {
                    // Logged even when nothing changed: after a restart, `ops` says how much of
                    // what the previous run programmed had to be rewritten (nothing, normally).
                    self.synced_once = true;
                    tracing::info!(
                        kind,
                        ops,
                        ?took,
                        frontends = self.applied.len(),
                        "first service sync since start"
                    );
                }
                if ops > 0 {
                    tracing::info!(
                        kind,
                        ops,
                        ?took,
                        frontends = self.applied.len(),
                        "service dataplane synced"
                    );
                }
            }
            Err(e) => {
                self.need_full = true;
                tracing::warn!(kind, error = %e, "service dataplane sync failed; will re-read it and retry");
            }
        }
        self.report_refused();
        let conflicts = self.state.conflicts();
        if conflicts.len() != self.conflicts {
            for c in &conflicts {
                tracing::warn!(conflict = %c, "two services claim one frontend; the first by namespace/name keeps it");
            }
            self.conflicts = conflicts.len();
            self.metrics.lock().conflicts = conflicts.len();
        }
    }

    /// Plans everything against what the dataplane reports.
    async fn full(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        match on_dataplane(&mut self.dp, |d| d.observed().map_err(|e| e.to_string())).await? {
            Ok(obs) => {
                self.state.seed(&obs);
                self.applied = obs
                    .into_iter()
                    .map(|s| (s.frontend.key(), Arc::new(s)))
                    .collect();
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the service dataplane back failed; planning against what was applied");
            }
        }
        let desired = self.state.desired_shared();
        let p = plan_refs(desired.iter(), self.applied.values().map(|s| &**s));
        let ops = p.len();
        let res = self.apply(p).await?;
        if res.is_ok() {
            self.applied = desired.into_iter().map(|s| (s.frontend.key(), s)).collect();
            self.need_full = false;
        }
        self.after("full", start, ops, &res);
        // A full sync's copies (the read-back, the plan) are gone: hand their pages back.
        crate::shared::memory::trim();
        Ok(())
    }

    /// Plans the touched frontends only.
    async fn partial(&mut self, dirty: &BTreeSet<FrontendKey>) -> anyhow::Result<()> {
        let start = Instant::now();
        let desired: Vec<Arc<LbService>> = dirty
            .iter()
            .filter_map(|k| self.state.get_shared(k))
            .collect();
        let p = plan_refs(
            desired.iter(),
            dirty
                .iter()
                .filter_map(|k| self.applied.get(k))
                .map(|s| &**s),
        );
        let ops = p.len();
        let res = self.apply(p).await?;
        if res.is_ok() {
            for k in dirty {
                self.applied.remove(k);
            }
            self.applied
                .extend(desired.into_iter().map(|s| (s.frontend.key(), s)));
        }
        self.after("partial", start, ops, &res);
        Ok(())
    }
}

/// Drives `dataplane` from `store` until the task is aborted: applies a plan on every change
/// and a full, read-back-based plan every `settings.resync` (and after any failure). Returns
/// only if the dataplane panicked or the source task died.
///
/// The agent calls it once, spawned, after it knows the node's name and addresses:
/// `tokio::spawn(run_services(EtcdServiceStore::new(client, &prefix), node, dp, resync, metrics))`.
pub async fn run_services<S: ServiceStore, D: LbDataplane>(
    store: S,
    node: NodeIdentity,
    dataplane: D,
    settings: impl Into<LoopSettings> + Send,
    metrics: Arc<ServiceMetrics>,
) -> anyhow::Result<()> {
    run_services_with(
        |tx| service_cache(store, tx),
        node,
        dataplane,
        settings,
        metrics,
    )
    .await
}

/// [`run_services`] fed by any source: `source` gets the sender of the loop's channel and
/// returns the task that lists and watches (the etcd cache, [`service_cache`], or the Kubernetes
/// watchers in [`crate::services::source::kube`]). The task is spawned, and aborted when the loop ends.
/// A source sends a [`SourceUpdate::Reset`] after every (re-)list and
/// [`SourceUpdate::Changes`] in between; it never needs to stop.
pub async fn run_services_with<F, Fut, D>(
    source: F,
    node: NodeIdentity,
    dataplane: D,
    settings: impl Into<LoopSettings> + Send,
    metrics: Arc<ServiceMetrics>,
) -> anyhow::Result<()>
where
    F: FnOnce(mpsc::Sender<SourceUpdate>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    D: LbDataplane,
{
    let settings = settings.into();
    metrics.lock().mode = dataplane.mode();
    let mut lp = Loop {
        dp: Some(dataplane),
        state: LbState::new(node),
        applied: BTreeMap::new(),
        need_full: true,
        metrics,
        conflicts: 0,
        synced_once: false,
        refused: BTreeSet::new(),
        invalid: BTreeMap::new(),
        guard: StoreGuard::default(),
        own_addresses: settings.own_addresses,
    };
    lp.refresh_own_addresses();
    // Re-derive the ids the dataplane already uses before anything is computed.
    match on_dataplane(&mut lp.dp, |d| d.observed().map_err(|e| e.to_string())).await? {
        Ok(obs) => {
            tracing::info!(frontends = obs.len(), "service dataplane read back");
            lp.state.seed(&obs);
            lp.applied = obs
                .into_iter()
                .map(|s| (s.frontend.key(), Arc::new(s)))
                .collect();
        }
        Err(e) => tracing::warn!(error = %e, "reading the service dataplane back failed"),
    }
    let (tx, mut rx) = mpsc::channel(64);
    let cache = tokio::spawn(source(tx));
    let _guard = AbortOnDrop(cache);
    let mut have_snapshot = false;
    // While the store is suspect (see StoreGuard): what it holds, from its held (empty)
    // listing and the changes since.
    let mut held: Option<Snapshot> = None;
    // A listing arriving page by page: its revision, what is kept of it, its invalid objects.
    let mut staged: Paging<(Snapshot, Vec<Invalid>)> = Paging::default();
    let mut tick = tokio::time::interval(settings.resync.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut backoff = Backoff::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let retry = async move {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            up = rx.recv() => {
                let Some(up) = up else { anyhow::bail!("service source task stopped") };
                let mut dirty = BTreeSet::new();
                let mut only_pages = true;
                let mut pending = vec![up];
                while let Ok(more) = rx.try_recv() {
                    pending.push(more);
                }
                for up in pending {
                    only_pages &= matches!(up, SourceUpdate::Page(_));
                    match up {
                        SourceUpdate::Page(l) => {
                            let (svcs, eps) = count_kinds(l.objects.iter().map(Object::key));
                            lp.metrics.queued(svcs, eps);
                            let (snap, invalid) = staged.page(l.revision);
                            invalid.extend(l.invalid);
                            for o in l.objects {
                                snap.put(o);
                            }
                        }
                        SourceUpdate::Reset(l) => {
                            let (mut snap, mut invalid) = staged.finish(l.revision);
                            let empty = l.objects.is_empty()
                                && l.invalid.is_empty()
                                && invalid.is_empty()
                                && snap.services().is_empty()
                                && snap.slice_count() == 0;
                            let snapshot = lp.state.snapshot();
                            let have_state = !snapshot.services().is_empty()
                                || snapshot.slice_count() > 0
                                || !lp.applied.is_empty();
                            match lp.guard.judge(l.facts, empty, have_state) {
                                Verdict::Act => {}
                                Verdict::Confirmed => {
                                    tracing::warn!("the service store is confirmed (its network config key was written again, or it holds objects); acting on its listing");
                                    lp.metrics.lock().store_suspect = false;
                                    held = None;
                                }
                                Verdict::Hold { reasons, first } => {
                                    if first {
                                        tracing::warn!(
                                            reasons = %reasons.join("; "),
                                            frontends = lp.applied.len(),
                                            "the service store lost everything and looks new or wiped: keeping the dataplane as it is until its network config key is written again (then an empty store is a deletion of everything)"
                                        );
                                        let mut g = lp.metrics.lock();
                                        g.store_suspect = true;
                                        g.suspect_listings += 1;
                                    }
                                    held = Some(snap);
                                    continue;
                                }
                            }
                            have_snapshot = true;
                            invalid.extend(l.invalid);
                            lp.set_invalid(invalid);
                            let (svcs, eps) = count_kinds(l.objects.iter().map(Object::key));
                            lp.metrics.queued(svcs, eps);
                            for o in l.objects {
                                snap.put(o);
                            }
                            dirty.extend(lp.state.replace(snap));
                        }
                        SourceUpdate::Changes(c) => {
                            if let Some(h) = held.as_mut() {
                                // Held with the listing (see StoreGuard), until the store is
                                // confirmed by objects arriving in it.
                                for change in c {
                                    match change {
                                        Change::Put(o) => { h.put(o); }
                                        Change::Delete(k) => { h.remove(&k); }
                                    }
                                }
                                if (!h.services().is_empty() || h.slice_count() > 0)
                                    && lp.guard.objects_arrived()
                                {
                                    tracing::warn!("objects arrived in the suspect service store, whose network config key exists: acting on it");
                                    lp.metrics.lock().store_suspect = false;
                                    have_snapshot = true;
                                    lp.set_invalid(Vec::new());
                                    let snap = held.take().unwrap_or_default();
                                    dirty.extend(lp.state.replace(snap));
                                }
                                continue;
                            }
                            let (svcs, eps) = count_kinds(c.iter().map(|c| match c {
                                Change::Put(o) => o.key(),
                                Change::Delete(k) => k.clone(),
                            }));
                            lp.metrics.queued(svcs, eps);
                            lp.changed(&c);
                            dirty.extend(lp.state.change(c));
                        }
                        SourceUpdate::Invalid(i) => {
                            if held.is_none() {
                                lp.add_invalid(i);
                            }
                        }
                        SourceUpdate::Triggers(t) => lp.metrics.add_triggers(t),
                    }
                }
                if !have_snapshot || only_pages {
                    continue;
                }
                if lp.need_full { lp.full().await?; } else { lp.partial(&dirty).await?; }
            }
            _ = tick.tick() => {
                if have_snapshot {
                    lp.refresh_own_addresses();
                    lp.full().await?;
                }
            }
            () = retry => {
                retry_at = None;
                if have_snapshot && lp.need_full { lp.full().await?; }
            }
        }
        if lp.need_full && have_snapshot {
            if retry_at.is_none() {
                retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
            }
        } else {
            backoff = Backoff::new();
        }
    }
}

/// An invalid stored object and why.
type Invalid = (ObjectKey, FieldError);

/// How many of `keys` are Services and how many EndpointSlices.
fn count_kinds(keys: impl Iterator<Item = ObjectKey>) -> (u64, u64) {
    keys.fold((0, 0), |(s, e), k| match k.kind {
        Kind::Service => (s + 1, e),
        Kind::EndpointSlice => (s, e + 1),
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests;
