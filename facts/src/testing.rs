//! Seeded pseudo-random inputs for the property tests of the parsers on both sides of the facts
//! file (this crate's, twill-cni's network config and address store): reproducible, and without
//! a dependency. Built for this crate's tests and, through the `testing` feature, for other
//! crates' tests; never part of a binary.

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
