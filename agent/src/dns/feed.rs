//! The zone's input: the Services and EndpointSlices of the service source, followed live.
//!
//! Why this shape:
//! - The DNS server has a source of its own (the etcd cache or the Kubernetes watchers the
//!   service loop also uses), fed into [`Objects`], rather than a hook in the service loop: DNS
//!   then runs with any `--proxy-mode` (`none` included), and neither loop waits on the other.
//!   The source sends only objects the model accepted; invalid ones arrive as deletions.
//! - [`Objects`] keeps the objects and rebuilds the whole zone after each batch of updates
//!   (what arrived while the last rebuild ran, taken at once): a rebuild of 10k Services is a
//!   few milliseconds, well inside the second a change may take to be answered, and a zone built
//!   whole cannot drift from its inputs.
//! - The zone is published through an [`ArcSwap`]: queries read it without a lock and never
//!   wait for a rebuild.
//! - The zone believes every listing, even one that lost everything (the service loop holds
//!   such a listing back, so as not to flush traffic of a wiped store): a name answers what
//!   the store says now. Until the first listing arrives the zone is empty and names of the
//!   cluster domain are NXDOMAIN (never cached: the answers carry no SOA).

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::dns::zone::{Zone, ZoneBuilder};
use crate::services::model::{Change, EndpointSlice, Kind, Object, ObjectKey, Service};
use crate::services::source::{Paging, SourceUpdate};

/// The accepted Services and EndpointSlices, by namespace and name.
#[derive(Debug, Default)]
pub struct Objects {
    services: BTreeMap<(String, String), Service>,
    slices: BTreeMap<(String, String), EndpointSlice>,
    /// A listing arriving page by page: its objects so far.
    staged: Paging<Vec<Object>>,
    /// A full listing has arrived (before it, the zone is empty and says so).
    pub listed: bool,
}

impl Objects {
    /// Replaces everything with `objects`.
    pub fn reset(&mut self, objects: Vec<Object>) {
        self.services.clear();
        self.slices.clear();
        for o in objects {
            self.put(o);
        }
        self.listed = true;
    }

    /// Adds or replaces an object.
    pub fn put(&mut self, o: Object) {
        match o {
            Object::Service(s) => {
                self.services.insert(s.key(), s);
            }
            Object::EndpointSlice(s) => {
                self.slices.insert(s.key(), s);
            }
        }
    }

    /// Removes an object.
    pub fn remove(&mut self, key: &ObjectKey) {
        let k = (key.namespace.clone(), key.name.clone());
        match key.kind {
            Kind::Service => {
                self.services.remove(&k);
            }
            Kind::EndpointSlice => {
                self.slices.remove(&k);
            }
        }
    }

    /// Applies a source update; returns whether the objects may have changed.
    pub fn apply(&mut self, up: SourceUpdate) -> bool {
        match up {
            SourceUpdate::Page(l) => {
                self.staged.page(l.revision).extend(l.objects);
                false
            }
            SourceUpdate::Reset(l) => {
                let mut objects = self.staged.finish(l.revision);
                objects.extend(l.objects);
                self.reset(objects);
                true
            }
            SourceUpdate::Changes(changes) => {
                for c in changes {
                    match c {
                        Change::Put(o) => self.put(o),
                        Change::Delete(k) => self.remove(&k),
                    }
                }
                true
            }
            SourceUpdate::Invalid(_) | SourceUpdate::Triggers(_) => false,
        }
    }

    /// The zone of these objects under `domain`.
    pub fn zone(&self, domain: &str) -> Zone {
        let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
        for slice in self.slices.values() {
            if let Some(svc) = slice.service() {
                by_service.entry(svc).or_default().push(slice);
            }
        }
        let mut b = ZoneBuilder::new(domain);
        b.services(self.services.values(), &by_service);
        b.build()
    }
}

/// Follows `updates` until the channel closes, publishing a new zone into `zone` after each
/// batch; `on_zone` sees every zone published (for the metrics).
pub async fn follow(
    mut updates: mpsc::Receiver<SourceUpdate>,
    domain: String,
    zone: Arc<ArcSwap<Zone>>,
    on_zone: impl Fn(&Zone) + Send,
) {
    let mut objects = Objects::default();
    while let Some(up) = updates.recv().await {
        let mut changed = objects.apply(up);
        while let Ok(more) = updates.try_recv() {
            changed |= objects.apply(more);
        }
        if !changed || !objects.listed {
            continue;
        }
        let z = objects.zone(&domain);
        on_zone(&z);
        tracing::debug!(names = z.len(), "dns zone rebuilt");
        zone.store(Arc::new(z));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::zone::{DEFAULT_DOMAIN, Lookup, Qtype};
    use crate::services::model::parse_manifest;
    use crate::services::source::Listing;

    fn svc(name: &str, ip: &str) -> Object {
        parse_manifest(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        ))
        .unwrap()
        .remove(0)
    }

    fn listing(revision: i64, objects: Vec<Object>) -> Listing {
        Listing {
            objects,
            invalid: Vec::new(),
            revision,
            facts: None,
        }
    }

    fn resolves(o: &Objects, name: &str) -> bool {
        matches!(
            o.zone(DEFAULT_DOMAIN)
                .lookup(&format!("{name}.default.svc.cluster.local"), Qtype::A),
            Lookup::Answer(_)
        )
    }

    #[test]
    fn pages_then_reset_then_changes() {
        let mut o = Objects::default();
        // Pages are staged until the listing of their revision completes.
        assert!(!o.apply(SourceUpdate::Page(listing(5, vec![svc("a", "10.96.0.1")]))));
        assert!(!o.listed);
        assert!(o.apply(SourceUpdate::Reset(listing(5, vec![svc("b", "10.96.0.2")]))));
        assert!(o.listed && resolves(&o, "a") && resolves(&o, "b"));
        // A page of another revision is not mixed into a later listing.
        o.apply(SourceUpdate::Page(listing(6, vec![svc("c", "10.96.0.3")])));
        o.apply(SourceUpdate::Reset(listing(7, vec![svc("d", "10.96.0.4")])));
        assert!(!resolves(&o, "a") && !resolves(&o, "c") && resolves(&o, "d"));
        // Changes.
        let key = svc("d", "10.96.0.4").key();
        assert!(o.apply(SourceUpdate::Changes(vec![
            Change::Put(svc("e", "10.96.0.5")),
            Change::Delete(key),
        ])));
        assert!(resolves(&o, "e") && !resolves(&o, "d"));
        assert!(!o.apply(SourceUpdate::Triggers(Vec::new())));
    }
}
