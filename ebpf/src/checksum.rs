//! The Internet checksum (RFC 1071): one's-complement sum of big-endian
//! 16-bit words, and its incremental update (RFC 1624).
//!
//! [`Checksum`] accumulates 32-bit words into a `u64` (no carry handling in
//! the loop; 2^32 words before it could overflow, far more than a frame) and
//! folds once at the end: a one's-complement sum of 32-bit words folded to
//! 16 bits equals the sum of the 16-bit words, so the result is exactly RFC
//! 1071's. Every piece added except the last must have an even length, as
//! in every header the checksum covers (checked in debug builds).

/// A running one's-complement sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checksum {
    acc: u64,
    /// An odd-length piece was added; only the last piece may be odd.
    odd: bool,
}

impl Checksum {
    /// An empty sum.
    pub const fn new() -> Self {
        Self { acc: 0, odd: false }
    }

    /// Adds `data` as big-endian 16-bit words; an odd last byte is padded
    /// with a zero byte.
    #[inline]
    pub fn add_bytes(&mut self, data: &[u8]) -> &mut Self {
        debug_assert!(!self.odd, "only the last piece of a checksum may have an odd length");
        let mut chunks = data.chunks_exact(4);
        for c in &mut chunks {
            self.acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        }
        let rest = chunks.remainder();
        let mut pair = rest.chunks_exact(2);
        for c in &mut pair {
            self.acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = pair.remainder() {
            self.acc += u64::from(*last) << 8;
            self.odd = true;
        }
        self
    }

    /// Adds one 16-bit word.
    #[inline]
    pub fn add_u16(&mut self, word: u16) -> &mut Self {
        self.acc += u64::from(word);
        self
    }

    /// Adds one 32-bit word (two 16-bit words).
    #[inline]
    pub fn add_u32(&mut self, word: u32) -> &mut Self {
        self.acc += u64::from(word);
        self
    }

    /// The folded 16-bit one's-complement sum (not complemented).
    #[inline]
    pub fn sum(&self) -> u16 {
        fold(self.acc)
    }

    /// The checksum to put on the wire: the complement of the sum.
    #[inline]
    pub fn finish(&self) -> u16 {
        !self.sum()
    }
}

/// Folds a 64-bit accumulator of 16- or 32-bit words to 16 bits with
/// end-around carry.
#[inline]
pub const fn fold(mut acc: u64) -> u16 {
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}

/// The checksum (complemented sum) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    Checksum::new().add_bytes(data).finish()
}

/// RFC 1624 eqn. 3: the new checksum of a header whose checksum was `old`
/// after one 16-bit word changed from `from` to `to`:
/// `HC' = ~(~HC + ~m + m')`.
#[inline]
pub const fn update_u16(old: u16, from: u16, to: u16) -> u16 {
    !fold(!old as u64 + !from as u64 + to as u64)
}

/// [`update_u16`] for a 32-bit word (an IPv4 address, say).
#[inline]
pub const fn update_u32(old: u16, from: u32, to: u32) -> u16 {
    let c = update_u16(old, (from >> 16) as u16, (to >> 16) as u16);
    update_u16(c, from as u16, to as u16)
}

/// Whether `data`, checksum field included, sums to 0xffff (a correct
/// checksum verifies to all ones).
pub fn verifies(data: &[u8]) -> bool {
    Checksum::new().add_bytes(data).sum() == 0xffff
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// RFC 1071 done the obvious way: 16-bit words, carry folded after
    /// every addition.
    fn reference(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in data.chunks(2) {
            let word = u32::from(pair[0]) << 8 | u32::from(*pair.get(1).unwrap_or(&0));
            sum += word;
            if sum > 0xffff {
                sum = (sum & 0xffff) + 1;
            }
        }
        !(sum as u16)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of 0001 f203 f4f5 f6f7 is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(Checksum::new().add_bytes(&data).sum(), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
        assert_eq!(reference(&data), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A classic example header (Wikipedia, "IPv4 header checksum"):
        // checksum field 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(verifies(&h));
        assert_eq!(checksum(&h), 0);
    }

    #[test]
    fn empty_and_odd() {
        assert_eq!(checksum(&[]), 0xffff);
        assert_eq!(checksum(&[0xab]), !0xab00);
        assert_eq!(checksum(&[0x12, 0x34, 0x56]), reference(&[0x12, 0x34, 0x56]));
    }

    #[test]
    fn pieces_equal_the_whole() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1001).collect();
        let mut c = Checksum::new();
        c.add_bytes(&data[..12]).add_u32(u32::from_be_bytes([data[12], data[13], data[14], data[15]]));
        c.add_u16(u16::from_be_bytes([data[16], data[17]])).add_bytes(&data[18..]);
        assert_eq!(c.finish(), checksum(&data));
        assert_eq!(checksum(&data), reference(&data));
    }

    #[test]
    fn fold_carries_all_the_way() {
        assert_eq!(fold(0), 0);
        assert_eq!(fold(0xffff), 0xffff);
        assert_eq!(fold(0x1_0000), 1);
        assert_eq!(fold(u64::MAX), 0xffff);
        assert_eq!(fold(0xffff_ffff), 0xffff);
        assert_eq!(fold(0xffff_ffff_0001_0000), 1);
    }

    #[test]
    fn incremental_update_example() {
        // RFC 1624 section 4: HC 0xdd2f, m 0x5555 -> m' 0x3285 gives 0x0000.
        assert_eq!(update_u16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    proptest! {
        #[test]
        fn matches_the_reference(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            prop_assert_eq!(checksum(&data), reference(&data));
        }

        #[test]
        fn incremental_equals_recomputed(
            mut data in proptest::collection::vec(any::<u8>(), 2..200),
            at in any::<usize>(),
            word in any::<u16>(),
            wide in any::<u32>(),
        ) {
            let words = data.len() / 2;
            let i = (at % words) * 2;
            let before = checksum(&data);
            let old = u16::from_be_bytes([data[i], data[i + 1]]);
            data[i..i + 2].copy_from_slice(&word.to_be_bytes());
            // Incremental and full results are equal as one's-complement
            // numbers (0x0000 and 0xffff are both zero).
            let inc = update_u16(before, old, word);
            let full = checksum(&data);
            prop_assert!(inc == full || (inc | full) == 0xffff && (inc & full) == 0, "{inc:#x} {full:#x}");

            if data.len() >= 4 {
                let j = (at % (data.len() / 4)) * 4;
                let before = checksum(&data);
                let old = u32::from_be_bytes([data[j], data[j + 1], data[j + 2], data[j + 3]]);
                data[j..j + 4].copy_from_slice(&wide.to_be_bytes());
                let inc = update_u32(before, old, wide);
                let full = checksum(&data);
                prop_assert!(inc == full || (inc | full) == 0xffff && (inc & full) == 0, "{inc:#x} {full:#x}");
            }
        }
    }
}
