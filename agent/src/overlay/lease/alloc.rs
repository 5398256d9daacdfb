//! The choice of a free subnet for this node's lease.
//!
//! The allocator is pure: it takes the taken subnets and a random source, and returns a candidate.
//! The store decides whether the candidate really was free (an etcd transaction), so two nodes
//! racing for one subnet cannot both win.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;

use crate::overlay::config::NetworkConfig;
use crate::overlay::lease::{LeaseError, LeaseSubnets};

/// How many random probes before the allocator walks the range.
pub(crate) const RANDOM_PROBES: usize = 64;

/// Never walk more candidates than this (an IPv6 range can hold 2^64 subnets).
pub(crate) const WALK_LIMIT: u128 = 1 << 20;

/// Chooses a free subnet at random between `min` and `max` (inclusive, both aligned) of size
/// `len`, avoiding `taken`. Works on u128 so one function serves both families.
pub(crate) fn choose(
    min: u128,
    max: u128,
    bits: u8,
    len: u8,
    taken: &HashSet<u128>,
    rng: &mut impl Rng,
) -> Option<u128> {
    let step = 1u128 << (bits - len);
    let count = (max - min) / step + 1;
    for _ in 0..RANDOM_PROBES {
        let cand = min + rng.random_range(0..count) * step;
        if !taken.contains(&cand) {
            return Some(cand);
        }
    }
    // Dense range: walk from a random start so racing nodes still spread out.
    let start = rng.random_range(0..count);
    (0..count.min(WALK_LIMIT))
        .map(|i| min + ((start + i) % count) * step)
        .find(|c| !taken.contains(c))
}

/// Chooses a free IPv4 subnet of the config, avoiding `taken`.
pub fn choose_v4(
    cfg: &NetworkConfig,
    taken: &[Ipv4Net],
    rng: &mut impl Rng,
) -> Result<Ipv4Net, LeaseError> {
    let (min, max) = (cfg.subnet_min.expect("v4"), cfg.subnet_max.expect("v4"));
    let taken: HashSet<u128> = taken
        .iter()
        .map(|n| u128::from(u32::from(n.network())))
        .collect();
    choose(
        u128::from(u32::from(min)),
        u128::from(u32::from(max)),
        32,
        cfg.subnet_len,
        &taken,
        rng,
    )
    .map(|a| {
        Ipv4Net::new(
            Ipv4Addr::from(u32::try_from(a).expect("v4")),
            cfg.subnet_len,
        )
        .expect("len")
    })
    .ok_or(LeaseError::Exhausted {
        family: "IPv4",
        range: format!("{min}-{max}/{}", cfg.subnet_len),
    })
}

/// Chooses a free IPv6 subnet of the config, avoiding `taken`.
pub fn choose_v6(
    cfg: &NetworkConfig,
    taken: &[Ipv6Net],
    rng: &mut impl Rng,
) -> Result<Ipv6Net, LeaseError> {
    let (min, max) = (
        cfg.ipv6_subnet_min.expect("v6"),
        cfg.ipv6_subnet_max.expect("v6"),
    );
    let taken: HashSet<u128> = taken.iter().map(|n| u128::from(n.network())).collect();
    choose(
        u128::from(min),
        u128::from(max),
        128,
        cfg.ipv6_subnet_len,
        &taken,
        rng,
    )
    .map(|a| Ipv6Net::new(Ipv6Addr::from(a), cfg.ipv6_subnet_len).expect("len"))
    .ok_or(LeaseError::Exhausted {
        family: "IPv6",
        range: format!("{min}-{max}/{}", cfg.ipv6_subnet_len),
    })
}

/// Whether a subnet lies inside the config's range (a lease left over from an older config
/// outside the range is not reused).
pub fn in_range(cfg: &NetworkConfig, subnets: &LeaseSubnets) -> bool {
    family_in_range(
        cfg.enable_ipv4,
        subnets.v4.map(|n| (n.prefix_len(), n.network())),
        cfg.subnet_len,
        cfg.subnet_min,
        cfg.subnet_max,
    ) && family_in_range(
        cfg.enable_ipv6,
        subnets.v6.map(|n| (n.prefix_len(), n.network())),
        cfg.ipv6_subnet_len,
        cfg.ipv6_subnet_min,
        cfg.ipv6_subnet_max,
    )
}

/// One family's part of [`in_range`]: with the family enabled, a subnet (prefix length and
/// network address) of length `len` between `min` and `max`; with it disabled, none.
fn family_in_range<A: PartialOrd + Copy>(
    enabled: bool,
    subnet: Option<(u8, A)>,
    len: u8,
    min: Option<A>,
    max: Option<A>,
) -> bool {
    match (enabled, subnet) {
        (true, Some((prefix_len, network))) => {
            let network = Some(network);
            prefix_len == len && network >= min && network <= max
        }
        (false, None) => true,
        _ => false,
    }
}
