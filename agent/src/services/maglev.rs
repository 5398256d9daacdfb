//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, §3.4) for backend choice.
//!
//! Why this shape:
//! - Each backend gets a permutation of the table slots from two hashes of its identity
//!   (`offset = h1 mod M`, `skip = h2 mod (M − 1) + 1`; M prime makes every skip coprime with M, so
//!   the permutation visits every slot). Backends take turns claiming their next preferred free
//!   slot until the table is full. The result is near-perfect balance (entries per backend differ
//!   by at most a few) and minimal disruption: removing one of N backends moves ≈ 1/N of the
//!   entries, where a `hash mod N` table would move ≈ (N − 1)/N.
//! - The identity is the backend's address and port only (not its list position, node or state),
//!   so a backend keeps its slots when others come and go. The table stores indices into the
//!   backend list it was built from; callers keep that list in a canonical order (sorted by
//!   address and port).
//! - The hashes are written out here (FNV-1a with two seeds, then a murmur3 finaliser) instead
//!   of `std`'s `DefaultHasher`, whose output may change between Rust releases: tables must come
//!   out identical on every node and after an agent upgrade, or established flows would move.
//! - M = [`MAGLEV_M`] = 1021: big enough for good balance up to ~100 backends (the paper wants
//!   M ≫ N, ~100× for < 1% imbalance), small enough that 30k services × M × 4 bytes stays
//!   ~120 MiB. With more backends than M some get no slot at all.

use std::net::IpAddr;

use crate::services::lb::Backend;
#[cfg(doc)]
use crate::services::lb::MAGLEV_M;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    // murmur3 fmix64: FNV's low bits mix poorly; the finaliser spreads every input bit.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The bytes a backend is hashed by: address octets (4 or 16) then the port, big-endian.
fn identity(ip: IpAddr, port: u16) -> Vec<u8> {
    let mut v = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    v.extend_from_slice(&port.to_be_bytes());
    v
}

/// `(offset, skip)` of a backend's permutation for a table of size `m`.
pub fn offset_skip(ip: IpAddr, port: u16, m: usize) -> (usize, usize) {
    let id = identity(ip, port);
    let m64 = m as u64;
    let offset = fnv1a(0x6d61_676c_6576_3031, &id) % m64; // "maglev01"
    let skip = fnv1a(0x6d61_676c_6576_3032, &id) % (m64 - 1) + 1; // "maglev02"
    #[expect(
        clippy::cast_possible_truncation,
        reason = "both values are below m, a usize"
    )]
    (offset as usize, skip as usize)
}

/// Builds the lookup table of size `m` (a prime > 1) for `backends`; entry `j` is the index in
/// `backends` of the backend owning slot `j`. Empty when `backends` is.
pub fn table(backends: &[Backend], m: usize) -> Vec<u32> {
    assert!(m > 1, "maglev table size must be a prime > 1");
    if backends.is_empty() {
        return Vec::new();
    }
    let perms: Vec<(usize, usize)> = backends
        .iter()
        .map(|b| offset_skip(b.ip, b.port, m))
        .collect();
    // Each backend's current position in its permutation, advanced by `skip` with a
    // conditional subtraction: no division in the hot loop (~M·ln M probes per table).
    let mut pos: Vec<usize> = perms.iter().map(|&(offset, _)| offset).collect();
    let mut entry = vec![u32::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for (i, &(_, skip)) in perms.iter().enumerate() {
            let mut c = pos[i];
            while entry[c] != u32::MAX {
                c += skip;
                if c >= m {
                    c -= m;
                }
            }
            entry[c] = u32::try_from(i).expect("fewer than 2^32 backends");
            c += skip;
            if c >= m {
                c -= m;
            }
            pos[i] = c;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::services::lb::{BackendState, MAGLEV_M};

    /// splitmix64: a seeded generator, so failures reproduce without a proptest dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_backends(rng: &mut Rng, n: usize) -> Vec<Backend> {
        let mut set = BTreeSet::new();
        while set.len() < n {
            #[expect(clippy::cast_possible_truncation, reason = "masked to the width")]
            let (ip, port) = if rng.below(4) == 0 {
                let a = Ipv6Addr::from((0xfd00_u128 << 112) | u128::from(rng.next() & 0xffff_ffff));
                (IpAddr::V6(a), 8080)
            } else {
                let a = Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff));
                (IpAddr::V4(a), (rng.below(3) as u16) + 8080)
            };
            set.insert((ip, port));
        }
        set.into_iter()
            .map(|(ip, port)| Backend {
                ip,
                port,
                node_local: false,
                state: BackendState::Ready,
            })
            .collect()
    }

    fn counts(t: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &e in t {
            c[e as usize] += 1;
        }
        c
    }

    #[test]
    fn table_is_full_and_deterministic() {
        let mut rng = Rng(1);
        let b = random_backends(&mut rng, 7);
        let t = table(&b, MAGLEV_M);
        assert_eq!(t.len(), MAGLEV_M);
        assert!(t.iter().all(|&e| (e as usize) < b.len()));
        assert_eq!(t, table(&b, MAGLEV_M));
        assert!(table(&[], MAGLEV_M).is_empty());
        // One backend owns everything.
        assert!(table(&b[..1], MAGLEV_M).iter().all(|&e| e == 0));
    }

    const PINNED: (usize, usize) = (909, 699);

    #[test]
    fn hashes_are_pinned() {
        // Tables must not change across releases or nodes: pin one permutation.
        let (o, s) = offset_skip("10.0.1.2".parse().unwrap(), 8080, MAGLEV_M);
        assert_eq!(
            (o, s),
            offset_skip("10.0.1.2".parse().unwrap(), 8080, MAGLEV_M)
        );
        assert!(o < MAGLEV_M && (1..MAGLEV_M).contains(&s));
        assert_eq!((o, s), PINNED);
    }

    /// Balance: with M = 1021 every backend holds close to M/N entries. Maglev guarantees each
    /// backend's count differs from M/N by at most ~the number of rounds it was blocked; we
    /// assert max/min ≤ 1.05 for N ≤ 20 and ≤ 1.2 for N ≤ 100 (measured worst cases are printed).
    #[test]
    fn property_balance() {
        let mut rng = Rng(0x5eed);
        let mut worst: BTreeMap<usize, f64> = BTreeMap::new();
        for _ in 0..300 {
            let n = 2 + usize::try_from(rng.below(99)).unwrap();
            let b = random_backends(&mut rng, n);
            let c = counts(&table(&b, MAGLEV_M), n);
            let (max, min) = (*c.iter().max().unwrap(), *c.iter().min().unwrap());
            assert!(min > 0, "n={n}: a backend got no entry");
            #[expect(clippy::cast_precision_loss, reason = "small counts")]
            let ratio = max as f64 / min as f64;
            let bound = if n <= 20 { 1.05 } else { 1.2 };
            assert!(
                ratio <= bound,
                "n={n}: max {max} min {min} ratio {ratio:.3}"
            );
            let bucket = if n <= 20 { 20 } else { 100 };
            let w = worst.entry(bucket).or_insert(0.0);
            *w = w.max(ratio);
        }
        eprintln!("maglev balance, worst max/min by N bucket: {worst:?}");
    }

    /// Minimal disruption: removing one of N backends moves the removed backend's entries plus
    /// a few more (Maglev's excess grows with N/M: measured ≤ ~6% of the table for N ≤ 62 at
    /// M = 1021), against ≈ (N − 1)/N of the table for a `hash mod N` table.
    #[test]
    fn property_minimal_disruption() {
        let mut rng = Rng(0xd15c);
        let (mut worst_excess, mut worst_vs_modulo) = (0usize, 0.0f64);
        for _ in 0..300 {
            let n = 3 + usize::try_from(rng.below(60)).unwrap();
            let b = random_backends(&mut rng, n);
            let before = table(&b, MAGLEV_M);
            let gone = usize::try_from(rng.below(n as u64)).unwrap();
            let mut after_b = b.clone();
            after_b.remove(gone);
            let after = table(&after_b, MAGLEV_M);
            // Compare by identity, not index.
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(x, y)| b[**x as usize] != after_b[**y as usize])
                .count();
            let owned = before.iter().filter(|&&x| x as usize == gone).count();
            assert!(
                moved >= owned,
                "n={n}: the removed backend's entries must move"
            );
            let excess = moved - owned;
            assert!(
                excess * 100 <= MAGLEV_M * 10,
                "n={n}: {excess} entries of surviving backends moved (owned {owned})"
            );
            let modulo_moved = (0..MAGLEV_M)
                .filter(|j| b[j % n] != after_b[j % (n - 1)])
                .count();
            let factor = if n >= 6 { 3 } else { 1 };
            assert!(
                moved * factor < modulo_moved,
                "n={n}: {moved} vs modulo {modulo_moved}"
            );
            worst_excess = worst_excess.max(excess);
            #[expect(clippy::cast_precision_loss, reason = "small counts")]
            let r = moved as f64 / modulo_moved as f64;
            worst_vs_modulo = worst_vs_modulo.max(r);
        }
        eprintln!(
            "maglev disruption over 300 cases: worst excess {worst_excess}/{MAGLEV_M} entries, \
             worst moved/modulo-moved {worst_vs_modulo:.3}"
        );
    }
}
