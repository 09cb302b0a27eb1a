//! NTP time formats and their conversion to and from Unix time.
//!
//! NTP carries time as an unsigned 32.32 fixed-point count of seconds since
//! 1900-01-01 with no era number: era 0 ends on 2036-02-07 06:28:16 UTC and
//! the count wraps to zero. A timestamp therefore names a point in time only
//! relative to some other time known to within ±68 years (the *pivot*);
//! [`NtpTimestamp::to_unix_nanos`] resolves the era against it, and every
//! difference of timestamps is taken modulo 2^64 as a signed value, which is
//! right across the rollover.

/// Seconds from 1900-01-01 (NTP epoch) to 1970-01-01 (Unix epoch).
pub const NTP_UNIX_OFFSET_SECS: i64 = 2_208_988_800;

const NANOS_PER_SEC: u64 = 1_000_000_000;
const FRAC_PER_SEC: f64 = 4_294_967_296.0; // 2^32

/// NTP 64-bit timestamp format: 32 bits of seconds, 32 bits of fraction,
/// era-less (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NtpTimestamp(u64);

impl NtpTimestamp {
    /// The all-zero timestamp, which NTP uses for "unknown".
    pub const ZERO: Self = Self(0);

    /// A timestamp from its 64 wire bits.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The 64 wire bits.
    pub const fn to_bits(self) -> u64 {
        self.0
    }

    /// Whole seconds within the era.
    pub const fn seconds(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Fraction of a second in units of 2^-32 s.
    pub const fn fraction(self) -> u32 {
        self.0 as u32
    }

    /// Whether this is the zero ("unknown") timestamp.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Converts a Unix time (seconds since 1970, may be negative, and
    /// nanoseconds `< 1e9`) to NTP, folding it into its era.
    pub fn from_unix(secs: i64, nanos: u32) -> Self {
        debug_assert!(u64::from(nanos) < NANOS_PER_SEC);
        let ntp_secs = secs.wrapping_add(NTP_UNIX_OFFSET_SECS) as u32;
        // Round to the nearest 2^-32 s; 999_999_999 ns rounds below 2^32.
        let frac = ((u64::from(nanos) << 32) + NANOS_PER_SEC / 2) / NANOS_PER_SEC;
        Self((u64::from(ntp_secs) << 32) | frac.min(u64::from(u32::MAX)))
    }

    /// Converts a count of nanoseconds since the Unix epoch.
    pub fn from_unix_nanos(nanos: i128) -> Self {
        let secs = nanos.div_euclid(i128::from(NANOS_PER_SEC)) as i64;
        let sub = nanos.rem_euclid(i128::from(NANOS_PER_SEC)) as u32;
        Self::from_unix(secs, sub)
    }

    /// Converts back to nanoseconds since the Unix epoch, choosing the era
    /// that puts the result within 2^31 s (about 68 years) of
    /// `pivot_unix_secs`.
    pub fn to_unix_nanos(self, pivot_unix_secs: i64) -> i128 {
        let pivot_ntp = pivot_unix_secs.wrapping_add(NTP_UNIX_OFFSET_SECS) as u32;
        let delta = self.seconds().wrapping_sub(pivot_ntp) as i32;
        let secs = i128::from(pivot_unix_secs) + i128::from(delta);
        let frac_nanos = (u64::from(self.fraction()) * NANOS_PER_SEC + (1 << 31)) >> 32;
        secs * i128::from(NANOS_PER_SEC) + i128::from(frac_nanos)
    }

    /// `self - earlier` as a signed number of 2^-32 s units, modulo 2^64:
    /// right whenever the true difference is within ±68 years, including
    /// across an era rollover.
    pub const fn wrapping_diff(self, earlier: Self) -> i64 {
        self.0.wrapping_sub(earlier.0) as i64
    }

    /// `self - earlier` in seconds (see [`Self::wrapping_diff`]).
    pub fn diff_secs(self, earlier: Self) -> f64 {
        self.wrapping_diff(earlier) as f64 / FRAC_PER_SEC
    }

    /// This timestamp moved by `secs` seconds (wrapping within the era).
    pub fn add_secs(self, secs: f64) -> Self {
        Self(self.0.wrapping_add((secs * FRAC_PER_SEC) as i64 as u64))
    }
}

/// NTP short format: unsigned 16.16 fixed-point seconds, used for root delay
/// and root dispersion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NtpShort(u32);

impl NtpShort {
    /// Zero seconds.
    pub const ZERO: Self = Self(0);
    /// The largest value, just under 65536 s.
    pub const MAX: Self = Self(u32::MAX);

    /// From the 32 wire bits.
    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    /// The 32 wire bits.
    pub const fn to_bits(self) -> u32 {
        self.0
    }

    /// From seconds, rounded up to the next 2^-16 s (a bound on error must
    /// never be understated), saturating at both ends; NaN gives zero.
    pub fn from_secs_f64(secs: f64) -> Self {
        let units = secs * 65536.0;
        if units.is_nan() || units <= 0.0 {
            Self(0)
        } else if units >= f64::from(u32::MAX) {
            Self::MAX
        } else {
            // Round up without `f64::ceil`, which baseline x86-64 (no
            // SSE4.1) runs as a libm call on every reply.
            let whole = units as u32;
            Self(if f64::from(whole) < units { whole + 1 } else { whole })
        }
    }

    /// In seconds.
    pub fn to_secs_f64(self) -> f64 {
        f64::from(self.0) / 65536.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds at which NTP era 0 ends (2036-02-07T06:28:16Z).
    const ERA1_UNIX: i64 = (1i64 << 32) - NTP_UNIX_OFFSET_SECS;

    #[test]
    fn unix_epoch_is_ntp_offset() {
        let t = NtpTimestamp::from_unix(0, 0);
        assert_eq!(t.seconds(), 0x83AA_7E80);
        assert_eq!(t.fraction(), 0);
    }

    #[test]
    fn half_second_fraction() {
        assert_eq!(NtpTimestamp::from_unix(0, 500_000_000).fraction(), 0x8000_0000);
        // The largest nanosecond value must not carry into the seconds.
        let t = NtpTimestamp::from_unix(10, 999_999_999);
        assert_eq!(t.seconds(), NtpTimestamp::from_unix(10, 0).seconds());
    }

    #[test]
    fn era_rollover_wraps_to_zero() {
        let last = NtpTimestamp::from_unix(ERA1_UNIX - 1, 0);
        let first = NtpTimestamp::from_unix(ERA1_UNIX, 0);
        assert_eq!(last.seconds(), u32::MAX);
        assert_eq!(first.seconds(), 0);
        assert_eq!(first.wrapping_diff(last), 1 << 32);
        assert!((first.diff_secs(last) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn round_trip_across_eras() {
        for unix in
            [0i64, 1_700_000_000, ERA1_UNIX - 1, ERA1_UNIX, ERA1_UNIX + 86_400 * 365 * 30, -NTP_UNIX_OFFSET_SECS + 5]
        {
            for nanos in [0u32, 1, 123_456_789, 999_999_999] {
                let t = NtpTimestamp::from_unix(unix, nanos);
                let back = t.to_unix_nanos(unix + 1000);
                let want = i128::from(unix) * 1_000_000_000 + i128::from(nanos);
                assert!((back - want).abs() <= 1, "{unix} {nanos}: {back} vs {want}");
            }
        }
    }

    #[test]
    fn pivot_picks_nearest_era() {
        // Seconds 5 of an era read with a pivot in 2035 means 2036 (era 1).
        let t = NtpTimestamp::from_bits(5 << 32);
        let pivot = ERA1_UNIX - 86_400 * 365;
        assert_eq!(t.to_unix_nanos(pivot), i128::from(ERA1_UNIX + 5) * 1_000_000_000);
        // And with a pivot in 1950 it means 1900 + 5 s.
        let old = t.to_unix_nanos(-631_152_000);
        assert_eq!(old, i128::from(5 - NTP_UNIX_OFFSET_SECS) * 1_000_000_000);
    }

    #[test]
    fn from_unix_nanos_negative() {
        let t = NtpTimestamp::from_unix_nanos(-1);
        assert_eq!(t, NtpTimestamp::from_unix(-1, 999_999_999));
    }

    #[test]
    fn short_format_rounds_up_and_saturates() {
        assert_eq!(NtpShort::from_secs_f64(1.0).to_bits(), 0x0001_0000);
        assert_eq!(NtpShort::from_secs_f64(1e-9).to_bits(), 1);
        assert_eq!(NtpShort::from_secs_f64(-3.0), NtpShort::ZERO);
        assert_eq!(NtpShort::from_secs_f64(f64::NAN), NtpShort::ZERO);
        assert_eq!(NtpShort::from_secs_f64(1e9), NtpShort::MAX);
        assert!((NtpShort::from_bits(0x8000).to_secs_f64() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn add_secs_moves_forward_and_back() {
        let t = NtpTimestamp::from_unix(1_700_000_000, 0);
        assert!((t.add_secs(2.5).diff_secs(t) - 2.5).abs() < 1e-9);
        assert!((t.add_secs(-1.0).diff_secs(t) + 1.0).abs() < 1e-9);
    }
}
