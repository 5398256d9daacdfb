//! Acquiring a lease: our own back (with proof), the previous subnet if free, else a free one; conflicts reported.

use crate::overlay::config::NetworkConfig;
use crate::overlay::lease::alloc;
use crate::overlay::lease::{LEASE_TTL, LeaseAttrs, LeaseSubnets};
use crate::overlay::source::{HeldLease, LeaseStore, StoredLease};
use crate::shared::backoff::Backoff;
use crate::shared::metrics::Metrics;
use crate::shared::shutdown::Shutdown;
use anyhow::{Context, bail};
use ipnet::{Ipv4Net, Ipv6Net};
use std::time::Duration;

/// How long a claim on a conflicting lease lives unless renewed (the claimant renews it on every
/// attempt, at most 10 s apart).
pub const CLAIM_TTL: Duration = Duration::from_secs(30);

/// What [`acquire`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// A lease, ours now.
    Held(HeldLease),
    /// A lease carries our public IP but is not provably ours: its holder is another node.
    Conflict(StoredLease),
}

/// Whether `stored` is provably this node's lease: it carries our identity, or it is the subnet
/// of our previous subnet file (a lease flannel or an older twill wrote here, or ours from
/// before our identity file was lost).
pub(crate) fn provably_ours(
    stored: &StoredLease,
    attrs: &LeaseAttrs,
    previous: Option<LeaseSubnets>,
) -> bool {
    (attrs.node_id.is_some() && stored.lease.attrs.node_id == attrs.node_id)
        || previous == Some(stored.lease.subnets)
}

/// Whether a lease publishes one of our public addresses.
pub(crate) fn same_public_ip(l: &LeaseAttrs, attrs: &LeaseAttrs) -> bool {
    (attrs.public_ip.is_some() && l.public_ip == attrs.public_ip)
        || (attrs.public_ipv6.is_some() && l.public_ipv6 == attrs.public_ipv6)
}

/// Acquires a lease: our previous one (same PublicIP, provably ours) if it is still there, else
/// the subnet we had before (from the subnet file) if free, else a random free subnet. A lease
/// with our public IP that is not provably ours is never taken over ([`Acquired::Conflict`]).
/// Loses races gracefully: a taken candidate means list again and retry.
pub async fn acquire<S: LeaseStore>(
    store: &S,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<LeaseSubnets>,
) -> anyhow::Result<Acquired> {
    // Kubernetes assigns the subnet in kube-subnet-mgr mode: publish our attributes for it.
    if let Some(held) = store.acquire_assigned(cfg, attrs, LEASE_TTL).await? {
        return Ok(Acquired::Held(held));
    }
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    for attempt in 0..20 {
        let leases = store.list().await.context("list leases")?.leases;
        let mine = leases.iter().find(|l| {
            l.lease.attrs.public_ip == attrs.public_ip
                && l.lease.attrs.public_ipv6 == attrs.public_ipv6
                && alloc::in_range(cfg, &l.lease.subnets)
                && provably_ours(l, attrs, previous)
        });
        if let Some(old) = mine {
            if let Some(held) = store.reclaim(old, attrs, LEASE_TTL).await? {
                tracing::info!(subnet = %held.subnets.key(), "reclaimed our lease");
                return Ok(Acquired::Held(held));
            }
            continue;
        }
        if let Some(other) = leases
            .iter()
            .find(|l| same_public_ip(&l.lease.attrs, attrs) && !provably_ours(l, attrs, previous))
        {
            return Ok(Acquired::Conflict(other.clone()));
        }
        let taken: Vec<&LeaseSubnets> = leases.iter().map(|l| &l.lease.subnets).collect();
        let candidate = match previous {
            Some(p)
                if attempt == 0
                    && alloc::in_range(cfg, &p)
                    && !taken.iter().any(|t| {
                        (p.v4.is_some() && t.v4 == p.v4) || (p.v6.is_some() && t.v6 == p.v6)
                    }) =>
            {
                p
            }
            _ => {
                let v4s: Vec<Ipv4Net> = taken.iter().filter_map(|t| t.v4).collect();
                let v6s: Vec<Ipv6Net> = taken.iter().filter_map(|t| t.v6).collect();
                LeaseSubnets {
                    v4: if cfg.enable_ipv4 {
                        Some(alloc::choose_v4(cfg, &v4s, &mut rng)?)
                    } else {
                        None
                    },
                    v6: if cfg.enable_ipv6 {
                        Some(alloc::choose_v6(cfg, &v6s, &mut rng)?)
                    } else {
                        None
                    },
                }
            }
        };
        if let Some(held) = store.create(candidate, attrs, LEASE_TTL).await? {
            tracing::info!(subnet = %held.subnets.key(), "acquired a new lease");
            return Ok(Acquired::Held(held));
        }
        tracing::debug!(subnet = %candidate.key(), "lost a race for a subnet, retrying");
    }
    bail!("could not acquire a lease after 20 attempts (heavy contention?)")
}

/// The message for a lease conflict.
pub(crate) fn conflict_message(other: &StoredLease) -> String {
    let a = &other.lease.attrs;
    let ip = a
        .public_ip
        .map(|i| i.to_string())
        .or_else(|| a.public_ipv6.map(|i| i.to_string()))
        .unwrap_or_default();
    format!(
        "no subnet lease: lease {} carries this node's public IP {ip} but is held by node {}; \
         not taking it over (does another node run with the same --public-ip? if that node is \
         gone, delete the key or wait for its TTL)",
        other.lease.subnets.key(),
        a.node_id
            .as_deref()
            .unwrap_or("(no identity: flannel or an older twill)")
    )
}

/// Acquires a lease, retrying with backoff until it gets one or `shutdown` fires (`None`).
/// Meanwhile the node is not ready (`/healthz` says why); a conflict is logged once per lease,
/// counted, and claimed so that its holder learns of it.
pub async fn acquire_until<S: LeaseStore>(
    store: &S,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<LeaseSubnets>,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Option<HeldLease> {
    let mut backoff = Backoff::new();
    let mut reported: Option<String> = None;
    loop {
        let got = tokio::select! {
            () = shutdown.wait() => return None,
            got = acquire(store, cfg, attrs, previous) => got,
        };
        match got {
            Ok(Acquired::Held(held)) => {
                if reported.is_some() {
                    tracing::info!(subnet = %held.subnets.key(), "lease conflict over: holding a lease");
                }
                metrics.set_lease_conflicts(0);
                return Some(held);
            }
            Ok(Acquired::Conflict(other)) => {
                let msg = conflict_message(&other);
                let key = other.lease.subnets.key();
                if reported.as_deref() != Some(key.as_str()) {
                    tracing::error!(lease = %key, "{msg}");
                    reported = Some(key);
                }
                metrics.set_not_ready(&msg);
                metrics.set_lease_conflicts(1);
                if let Err(e) = store.claim(&other.lease.subnets, attrs, CLAIM_TTL).await {
                    tracing::warn!(error = %e, "leaving a claim on the conflicting lease failed");
                }
            }
            Err(e) => {
                let msg = format!("no subnet lease: acquire a subnet lease: {e:#}");
                tracing::warn!(error = %msg, "retrying");
                metrics.set_not_ready(&msg);
                metrics.set_error(&msg);
            }
        }
        tokio::select! {
            () = shutdown.wait() => return None,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
