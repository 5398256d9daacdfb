//! Seeded pseudo-random inputs for the property tests of the parsers on both sides of the facts
//! file (this crate's, twill-cni's network config and address store): reproducible, and without
//! a dependency; and what every file the parser accepts satisfies, checked by those tests and
//! the fuzz target alike. Built for this crate's tests and, through the `testing` feature, for
//! other crates' tests and the fuzz targets; never part of a binary.

use crate::{IPV4_SUBNET_PREFIX, IPV6_SUBNET_PREFIX, SubnetFacts};

/// Asserts what every file [`SubnetFacts::parse`] accepts satisfies: a node subnet of a pod
/// subnet's size inside the cluster network (each family), a sane MTU, and a rendering that
/// parses back to the same facts.
///
/// # Panics
///
/// When `f` breaks one of these.
pub fn assert_sane(f: &SubnetFacts) {
    if let Some(s) = f.subnet {
        assert!(IPV4_SUBNET_PREFIX.contains(&s.prefix_len()), "{f:?}");
        assert!(f.network.is_none_or(|n| n.contains(&s.trunc())), "{f:?}");
    }
    if let Some(s) = f.ipv6_subnet {
        assert!(IPV6_SUBNET_PREFIX.contains(&s.prefix_len()), "{f:?}");
        assert!(
            f.ipv6_network.is_none_or(|n| n.contains(&s.trunc())),
            "{f:?}"
        );
    }
    assert!((68..=65535).contains(&f.mtu), "{f:?}");
    assert_eq!(SubnetFacts::parse(&f.render()).as_ref().ok(), Some(f));
}

/// A xorshift64 generator and the byte mutations the parser tests feed their parsers.
#[derive(Debug, Clone)]
pub struct Mutator(u64);

impl Mutator {
    /// A generator seeded with `seed` (not zero: xorshift stays at zero).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Mutator(seed)
    }

    /// The next number of the sequence.
    pub fn next_u64(&mut self) -> u64 {
        let x = &mut self.0;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// A number below `n` (not zero).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % n as u64).expect("below a usize")
    }

    /// `seed` with one to four edits, each replacing, removing or inserting one byte at a random
    /// place; what goes in is drawn from `alphabet`.
    pub fn mutate(&mut self, seed: &[u8], alphabet: &[u8]) -> Vec<u8> {
        let mut b = seed.to_vec();
        for _ in 0..=self.next_u64() % 4 {
            let i = self.below(b.len());
            let c = alphabet[self.below(alphabet.len())];
            match self.next_u64() % 3 {
                0 => b[i] = c,
                1 if b.len() > 1 => {
                    b.remove(i);
                }
                _ => b.insert(i, c),
            }
        }
        b
    }
}
