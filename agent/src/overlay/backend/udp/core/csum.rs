//! Ones-complement checksums (RFC 1071) and the byte helpers the headers are read and written with.

/// A ones-complement (RFC 1071) running sum.
///
/// Bytes are added in native-endian 64-bit words with end-around carry (2^64 ≡ 1 mod 2^16-1, so
/// the wide sum folds to the same 16-bit sum); the byte order is fixed once, at [`Csum::fold`].
/// Every piece added must start at an even offset of the checksummed region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Csum(u64);

pub(super) fn add_carry(a: u64, b: u64) -> u64 {
    let (s, c) = a.overflowing_add(b);
    s + u64::from(c)
}

impl Csum {
    /// Adds `data` (starting at an even offset of the region).
    ///
    /// Four independent carry chains over 32-byte blocks: the adds of one block do not wait for
    /// each other, which roughly doubles the speed of a single chain (this sum is the one pass
    /// the data path makes over every payload byte it carries).
    #[must_use]
    pub fn add_bytes(self, data: &[u8]) -> Csum {
        let word =
            |c: &[u8], i: usize| u64::from_ne_bytes(c[i..i + 8].try_into().expect("8 bytes"));
        let (mut a, mut b, mut c, mut d) = (self.0, 0u64, 0u64, 0u64);
        let mut blocks = data.chunks_exact(32);
        for k in &mut blocks {
            a = add_carry(a, word(k, 0));
            b = add_carry(b, word(k, 8));
            c = add_carry(c, word(k, 16));
            d = add_carry(d, word(k, 24));
        }
        let rest = blocks.remainder();
        let mut tail = [0u8; 32];
        tail[..rest.len()].copy_from_slice(rest);
        a = add_carry(a, word(&tail, 0));
        b = add_carry(b, word(&tail, 8));
        c = add_carry(c, word(&tail, 16));
        d = add_carry(d, word(&tail, 24));
        Csum(add_carry(add_carry(a, b), add_carry(c, d)))
    }

    /// Adds another sum of a piece that starts at an even offset of the region.
    #[must_use]
    pub fn combine(self, other: Csum) -> Csum {
        Csum(add_carry(self.0, other.0))
    }

    /// The IPv4 pseudo-header of a transport segment of `len` bytes.
    #[must_use]
    pub fn pseudo_v4(self, src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> Csum {
        let l = len.to_be_bytes();
        self.add_bytes(&[
            src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], 0, proto, l[0], l[1],
        ])
    }

    /// The folded 16-bit sum (not complemented), as a host integer of the big-endian word.
    pub fn fold(self) -> u16 {
        let mut s = self.0;
        s = (s & 0xffff_ffff) + (s >> 32);
        s = (s & 0xffff_ffff) + (s >> 32);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        let native = u16::try_from(s).expect("folded to 16 bits");
        // The words were read native-endian: on little-endian hosts the sum is byte-swapped.
        u16::from_be(native)
    }

    /// The checksum to store: the complemented fold.
    pub fn finish(self) -> u16 {
        !self.fold()
    }
}

/// The IPv4 header checksum of `hdr` (its checksum field included: 0 means valid when the field
/// holds the right value, so this both computes — with the field zeroed — and verifies).
pub fn ipv4_header_checksum(hdr: &[u8]) -> u16 {
    Csum::default().add_bytes(hdr).finish()
}

pub(super) fn set_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

pub(super) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(super) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
pub(super) fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

pub(super) fn len_u16(n: usize) -> u16 {
    u16::try_from(n).expect("IPv4 lengths fit 16 bits")
}

/// Rewrites the IPv4 header checksum of `hdr` (the whole header, `ihl` bytes).
pub(super) fn fix_ipv4_checksum(hdr: &mut [u8]) {
    set_u16(hdr, 10, 0);
    let c = ipv4_header_checksum(hdr);
    set_u16(hdr, 10, c);
}
