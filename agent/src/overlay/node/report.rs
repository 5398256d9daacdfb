//! What the loop says about leases: ignored peers, conflicts and claims, a lease lost or taken, the usable peers.

use crate::overlay::config::NetworkConfig;
use crate::overlay::lease::validate::{self, IgnoreReason, Ignored, OwnNode};
use crate::overlay::lease::{Lease, LeaseAttrs};
use crate::overlay::node::cache::Snapshot;
use crate::overlay::source::HeldLease;
use crate::shared::metrics::Metrics;
use std::collections::BTreeSet;

/// Logs each ignored peer lease once per key and reason (not on every reconcile), says when one
/// is used again, and keeps `twill_leases_ignored` current; the same for conflicts over our own
/// lease (another node's lease with our public IP or overlapping ours, claims on ours).
#[derive(Debug, Default)]
pub(crate) struct LeaseReport {
    ignored: BTreeSet<(String, IgnoreReason)>,
    /// Older leases that overlap ours (peers use theirs, not ours).
    shadowed_by: BTreeSet<String>,
    /// Claims on our lease, by the claimant's identity.
    claims: BTreeSet<String>,
}

impl LeaseReport {
    pub(crate) fn update_ignored(&mut self, ignored: &[Ignored], metrics: &Metrics) {
        let now: BTreeSet<(String, IgnoreReason)> =
            ignored.iter().map(|i| (i.key.clone(), i.reason)).collect();
        for i in ignored {
            if !self.ignored.contains(&(i.key.clone(), i.reason)) {
                tracing::warn!(lease = %i.key, reason = i.reason.label(), "ignoring peer lease: {}", i.detail);
            }
        }
        for (key, reason) in self.ignored.difference(&now) {
            tracing::info!(lease = %key, reason = reason.label(), "peer lease no longer ignored for this reason");
        }
        self.ignored = now;
        let counts: Vec<(&'static str, usize)> = IgnoreReason::ALL
            .iter()
            .map(|r| {
                (
                    r.label(),
                    self.ignored.iter().filter(|(_, x)| x == r).count(),
                )
            })
            .collect();
        metrics.set_leases_ignored(&counts);
        self.export_conflicts(metrics);
    }

    pub(crate) fn update_shadowed(&mut self, own: &str, older: BTreeSet<String>) {
        for k in older.difference(&self.shadowed_by) {
            tracing::error!(
                lease = %own,
                older = %k,
                "our lease overlaps an older lease: every node uses that one and ignores ours"
            );
        }
        self.shadowed_by = older;
    }

    pub(crate) fn update_claims(
        &mut self,
        own: &str,
        claims: &[LeaseAttrs],
        ours: Option<&str>,
        metrics: &Metrics,
    ) {
        let now: BTreeSet<String> = claims
            .iter()
            .filter_map(|c| c.node_id.clone())
            .filter(|id| Some(id.as_str()) != ours)
            .collect();
        for c in claims {
            let Some(id) = &c.node_id else { continue };
            if Some(id.as_str()) != ours && !self.claims.contains(id) {
                tracing::error!(
                    lease = %own,
                    claimant = %id,
                    public_ip = ?c.public_ip,
                    public_ipv6 = ?c.public_ipv6,
                    "another node with this node's public IP wants our lease (not handed over): \
                     two nodes run with the same --public-ip"
                );
            }
        }
        for id in self.claims.difference(&now) {
            tracing::info!(lease = %own, claimant = %id, "the claim on our lease is gone");
        }
        self.claims = now;
        self.export_conflicts(metrics);
    }

    pub(crate) fn export_conflicts(&self, metrics: &Metrics) {
        let own_ip = self
            .ignored
            .iter()
            .filter(|(_, r)| *r == IgnoreReason::OwnPublicIp)
            .count();
        metrics.set_lease_conflicts(own_ip + self.claims.len() + self.shadowed_by.len());
    }
}

/// How our lease stopped being ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Loss {
    /// The key was deleted or expired.
    Gone(String),
    /// Another holder rewrote the key.
    Taken(String),
}

impl Loss {
    pub(crate) fn why(&self) -> &str {
        match self {
            Loss::Gone(w) | Loss::Taken(w) => w,
        }
    }
}

/// Whether our lease is still ours in `snap`: `None` if it is, else what happened to it. A
/// snapshot older than our last write of the key proves nothing and is ignored; `same_store`
/// says whether the snapshot's revisions count in the store we wrote to (else, after an etcd
/// was replaced, only what the snapshot holds counts).
pub(crate) fn lease_lost(
    snap: &Snapshot,
    held: &HeldLease,
    attrs: &LeaseAttrs,
    same_store: bool,
) -> Option<Loss> {
    let held_rev = if same_store { held.revision } else { 0 };
    if snap.revision < held_rev {
        return None;
    }
    let key = held.subnets.key();
    let Some(stored) = snap.leases.iter().find(|l| l.lease.subnets == held.subnets) else {
        return Some(Loss::Gone(format!("lease {key} was deleted or expired")));
    };
    let rewritten = (held_rev == 0 || stored.mod_revision > held_rev)
        && (stored.etcd_lease != held.etcd_lease || stored.lease.attrs.node_id != attrs.node_id);
    let by = &stored.lease.attrs;
    rewritten.then(|| {
        Loss::Taken(format!(
            "lease {key} was taken over: rewritten by node {} (PublicIP {})",
            by.node_id.as_deref().unwrap_or("(no identity)"),
            by.public_ip
                .map_or_else(|| "-".to_string(), |i| i.to_string())
        ))
    })
}

/// Validates the snapshot's peer leases for this node (see [`validate::validate_peers`]), reports
/// the ignored ones and the conflicts over our own lease, and returns the peers to program.
pub(crate) fn usable_peers(
    cfg: &NetworkConfig,
    snap: &Snapshot,
    held: &HeldLease,
    attrs: &LeaseAttrs,
    report: &mut LeaseReport,
    metrics: &Metrics,
) -> Vec<Lease> {
    let own = OwnNode {
        subnets: Some(held.subnets),
        public_v4: attrs.public_ip,
        public_v6: attrs.public_ipv6,
    };
    let v = validate::validate_peers(
        cfg,
        &own,
        snap.leases.iter().map(|l| (&l.lease, l.create_revision)),
    );
    if let Some(mine) = snap.leases.iter().find(|l| l.lease.subnets == held.subnets) {
        // Leases the other nodes use rather than ours: valid but for the overlap, and older.
        let overlapping: BTreeSet<&str> = v
            .ignored
            .iter()
            .filter(|i| i.reason == IgnoreReason::OverlapsOwnSubnet)
            .map(|i| i.key.as_str())
            .collect();
        let mine_at = (mine.create_revision, mine.lease.subnets.key());
        let older: BTreeSet<String> = snap
            .leases
            .iter()
            .map(|l| (l.create_revision, l.lease.subnets.key()))
            .filter(|(rev, key)| {
                overlapping.contains(key.as_str()) && (*rev, key.clone()) < mine_at
            })
            .map(|(_, key)| key)
            .collect();
        report.update_shadowed(&held.subnets.key(), older);
    }
    report.update_ignored(&v.ignored, metrics);
    v.peers
}
