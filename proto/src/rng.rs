//! A small deterministic pseudo-random generator (SplitMix64) for the hot
//! path's coin flips (KoD probability). Seeded by the caller, so the core
//! stays deterministic under test; it is not for anything secret.

/// SplitMix64 state.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p` (a [`Probability`]).
    pub fn chance(&mut self, p: Probability) -> bool {
        // Compare the top 32 bits against the threshold; p = 1 always wins.
        p.0 > (self.next_u64() >> 32) as u32 || p.0 == u32::MAX
    }
}

/// A probability in [0, 1] stored as a 32-bit threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probability(u32);

impl Probability {
    /// Never.
    pub const NEVER: Self = Self(0);
    /// Always.
    pub const ALWAYS: Self = Self(u32::MAX);

    /// From a fraction; values outside [0, 1] (and NaN) are `None`.
    pub fn new(p: f64) -> Option<Self> {
        if !(0.0..=1.0).contains(&p) {
            return None;
        }
        Some(if p >= 1.0 { Self::ALWAYS } else { Self((p * 4_294_967_296.0) as u32) })
    }

    /// As a fraction.
    pub fn as_f64(self) -> f64 {
        if self == Self::ALWAYS { 1.0 } else { f64::from(self.0) / 4_294_967_296.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probability_bounds() {
        assert!(Probability::new(-0.1).is_none());
        assert!(Probability::new(1.1).is_none());
        assert!(Probability::new(f64::NAN).is_none());
        let mut r = SplitMix64::new(7);
        assert!((0..1000).all(|_| r.chance(Probability::ALWAYS)));
        assert!((0..1000).all(|_| !r.chance(Probability::NEVER)));
    }

    #[test]
    fn quarter_is_roughly_a_quarter() {
        let mut r = SplitMix64::new(42);
        let p = Probability::new(0.25).unwrap();
        let hits = (0..100_000).filter(|_| r.chance(p)).count();
        assert!((23_000..27_000).contains(&hits), "{hits}");
    }
}
