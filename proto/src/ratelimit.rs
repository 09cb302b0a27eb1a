//! Per-client rate limiting in fixed memory.
//!
//! RFC 8633 (NTP best current practices, BCP 223) recommends that a public
//! server limit how often it answers any one client, so that it cannot be
//! used to flood a spoofed victim and so that misconfigured clients polling
//! far too often get a kiss-o'-death RATE (RFC 5905, section 7.4) instead of
//! time. This module decides *whether* a request is over the limit; what to
//! send then (KoD or silence) is the [`Responder`](crate::Responder)'s call.
//!
//! # Policy
//!
//! Each client has a token bucket: it may send [`RateLimitConfig::burst`]
//! requests back to back, and sustain one request per
//! [`RateLimitConfig::average_interval`] seconds. A client not seen before
//! starts with a full bucket. Requests that are refused are not charged, so a
//! client that sends too fast still gets one answer per interval. A client is
//! its IPv4 address (an IPv4-mapped IPv6 source `::ffff:a.b.c.d` counts as
//! IPv4), or its IPv6 address masked to [`RateLimitConfig::ipv6_prefix_len`]
//! bits (default /64, the usual assignment to one site or host).
//!
//! # Design
//!
//! - **Bucket as a time** (the "generic cell rate algorithm"): instead of a
//!   credit and a last-seen time, each entry keeps one number, the time `tat`
//!   at which its bucket will be full again. A request at `now` passes when
//!   `tat - now <= (burst - 1) * interval`, and then moves `tat` to
//!   `max(tat, now) + interval`. This is exactly a token bucket with
//!   continuous refill (credit = `burst - (tat - now) / interval`), needs no
//!   refill arithmetic, and a bucket is full exactly when `tat <= now`.
//! - **Time** is the limiter's own monotonic clock, in 2^-32 s, started at
//!   the first request: each call advances it by the time elapsed since the
//!   latest timestamp seen, taken with [`NtpTimestamp::wrapping_diff`] (so
//!   the NTP era rollover of 2036 is just one more second). A timestamp
//!   earlier than the latest advances it by nothing, so a clock stepped back
//!   grants no credit. Up to one second back is taken as jitter between
//!   stamp sources, and the clock waits for time to pass the latest stamp
//!   again (interleaved stamps cannot make it run fast); further back is
//!   taken as a clock step, and the limiter follows the new timeline at once
//!   rather than freezing every bucket until the old time comes round.
//!   Entries store `tat` in 2^-16 s as a `u64`, which does not wrap for
//!   millions of years: there is no compact-time wrap to handle, and a
//!   client idle for any length of time is simply found full. (A 32-bit time in 2^-10 s would
//!   wrap every 48.5 days, and a client idle for a multiple of that would be
//!   judged on stale debt; the 64-bit field costs nothing, since it replaces
//!   both the 32-bit time and the 32-bit credit.) Configured intervals are
//!   rounded to 2^-16 s, with a minimum of one unit.
//! - **Table**: set-associative, [`WAYS`] = 4 entries of 16 bytes (64-bit tag
//!   and `tat`) per 64-byte, cache-line-aligned set, so a lookup touches one
//!   cache line. The number of sets is `capacity / 4` rounded *up* to a power
//!   of two (so the real capacity, reported by [`RateLimiter::stats`], is
//!   between the configured one and twice it, and at least 4); the table is
//!   allocated once and never grows, whatever the number of distinct sources.
//! - **Keyed hash**: the key is hashed with SipHash-1-3 under the 128-bit
//!   seed. The 64-bit hash is the tag (0 marks an empty slot, so a hash of 0
//!   is stored as 1) and its low bits pick the set; without the seed, an
//!   attacker cannot aim sources at one set to push a victim's entry out.
//! - **Eviction**: a client not in its set replaces the entry whose bucket is
//!   fullest (least debt), ties going to the oldest, which in the `tat` form
//!   is simply the entry with the smallest `tat`. A full bucket behaves
//!   exactly like a fresh entry, so replacing it loses nothing; state is
//!   lost only when all four entries of a set are in debt (not full), and
//!   then the one closest to full goes. A flooding client therefore keeps its
//!   entry while spoofed one-off sources churn through the table (they owe
//!   one interval, it owes close to a whole burst). With `burst = 1` the two
//!   owe the same and cannot be told apart. [`RateLimiterStats::evictions`]
//!   counts only replacements of entries that were not full.
//!
//! Everything per request is O(1): one hash, one cache line, no allocation.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use crate::time::NtpTimestamp;

/// Entries per set (one cache line of 16-byte entries).
pub const WAYS: usize = 4;

/// Largest accepted [`RateLimitConfig::average_interval`], seconds (a day).
pub const MAX_AVERAGE_INTERVAL: f64 = 86_400.0;
/// Largest accepted [`RateLimitConfig::burst`].
pub const MAX_BURST: u32 = 1_000_000;
/// Smallest accepted [`RateLimitConfig::capacity`].
pub const MIN_CAPACITY: usize = WAYS;
/// Largest accepted [`RateLimitConfig::capacity`] (2^28 entries, 4 GiB).
pub const MAX_CAPACITY: usize = 1 << 28;

/// Bits of fraction in the entries' time unit (2^-16 s).
const UNIT_BITS: u32 = 16;
/// Entries' time units per second.
const UNITS_PER_SEC: f64 = (1u64 << UNIT_BITS) as f64;

/// How far back (in 2^-32 s, here one second) a timestamp may lie behind the
/// latest one and still count as jitter rather than a clock step.
///
/// A timestamp earlier than the latest seen never advances the limiter's
/// clock. Up to this far back it is taken as jitter between stamp sources
/// (hardware, kernel and userspace stamps can disagree by microseconds to
/// milliseconds), and the clock waits until time passes the latest stamp
/// again, so interleaved stamps cannot make it run fast. Further back, it is
/// taken as the system clock having been stepped: the limiter follows the
/// new timeline at once instead of freezing every bucket until the old time
/// comes round again. Either way a step back grants no credit.
const STEP_BACK: i64 = 1 << 32;

/// Rate-limit settings for one table.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimitConfig {
    /// Whether limiting is on.
    pub enabled: bool,
    /// Average interval between requests a client may sustain, seconds.
    pub average_interval: f64,
    /// Requests a client may send back to back after being quiet.
    pub burst: u32,
    /// IPv6 clients are keyed by this prefix length.
    pub ipv6_prefix_len: u8,
    /// Clients this table tracks at once (its memory is fixed by this).
    pub capacity: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { enabled: true, average_interval: 2.0, burst: 16, ipv6_prefix_len: 64, capacity: 1 << 20 }
    }
}

impl RateLimitConfig {
    /// Checks the settings against the accepted ranges: `average_interval`
    /// finite, above zero and at most [`MAX_AVERAGE_INTERVAL`]; `burst` in
    /// 1..=[`MAX_BURST`]; `ipv6_prefix_len` in 32..=128; `capacity` in
    /// [`MIN_CAPACITY`]..=[`MAX_CAPACITY`].
    ///
    /// [`RateLimiter`] works with any settings (it clamps them), but a
    /// configuration file should be rejected rather than silently clamped.
    pub fn validate(&self) -> Result<(), String> {
        let interval = self.average_interval;
        if !interval.is_finite() || interval <= 0.0 || interval > MAX_AVERAGE_INTERVAL {
            return Err(format!(
                "rate limit average_interval must be above 0 and at most {MAX_AVERAGE_INTERVAL} seconds, not {interval}"
            ));
        }
        if !(1..=MAX_BURST).contains(&self.burst) {
            return Err(format!("rate limit burst must be between 1 and {MAX_BURST}, not {}", self.burst));
        }
        if !(32..=128).contains(&self.ipv6_prefix_len) {
            return Err(format!("rate limit ipv6_prefix_len must be between 32 and 128, not {}", self.ipv6_prefix_len));
        }
        if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&self.capacity) {
            return Err(format!(
                "rate limit capacity must be between {MIN_CAPACITY} and {MAX_CAPACITY}, not {}",
                self.capacity
            ));
        }
        Ok(())
    }
}

/// The limiter's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateVerdict {
    /// Within the limit.
    Pass,
    /// Over the limit.
    Limited,
}

/// Occupancy figures for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimiterStats {
    /// Entries the table has.
    pub capacity: u64,
    /// Entries in use.
    pub occupied: u64,
    /// Entries that held state and were replaced by another client.
    pub evictions: u64,
    /// Bytes of table memory.
    pub memory_bytes: u64,
}

/// One cache line: four tags, then their four `tat`s. A tag of 0 is an
/// empty slot.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Set {
    tags: [u64; WAYS],
    tats: [u64; WAYS],
}

/// The settings in the units the table works in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Params {
    /// Time units (2^-16 s) per request sustained.
    interval: u64,
    /// `(burst - 1) * interval`: how far `tat` may run ahead of now.
    tolerance: u64,
    /// IPv6 prefix length, at most 128.
    prefix_len: u8,
    /// Number of sets, a power of two.
    sets: usize,
}

impl Params {
    /// Settings clamped into the accepted ranges (see
    /// [`RateLimitConfig::validate`]); NaN or non-positive intervals become
    /// the smallest, one time unit.
    fn new(cfg: &RateLimitConfig) -> Self {
        let secs = if cfg.average_interval > 0.0 { cfg.average_interval.min(MAX_AVERAGE_INTERVAL) } else { 0.0 };
        // Float-to-int casts saturate; at most 86400 * 2^16 < 2^33 here.
        let interval = ((secs * UNITS_PER_SEC).round() as u64).max(1);
        let burst = u64::from(cfg.burst.clamp(1, MAX_BURST));
        let capacity = cfg.capacity.clamp(MIN_CAPACITY, MAX_CAPACITY);
        Self {
            interval,
            tolerance: (burst - 1) * interval,
            prefix_len: cfg.ipv6_prefix_len.min(128),
            sets: capacity.div_ceil(WAYS).next_power_of_two(),
        }
    }
}

/// Fixed-memory per-client token buckets.
pub struct RateLimiter {
    cfg: RateLimitConfig,
    params: Params,
    key: [u64; 2],
    sets: Vec<Set>,
    /// The limiter's monotonic clock, 2^-32 s since the first request.
    clock: u64,
    /// The latest request timestamp on the current timeline, if any.
    latest: Option<NtpTimestamp>,
    occupied: u64,
    evictions: u64,
}

impl fmt::Debug for RateLimiter {
    // The table itself is far too big to print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("cfg", &self.cfg)
            .field("clock", &self.clock)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A table sized by `cfg.capacity`; `seed` keys its hash.
    ///
    /// Settings out of the ranges [`RateLimitConfig::validate`] accepts are
    /// clamped into them; the capacity is rounded up as described in the
    /// module docs.
    pub fn new(cfg: &RateLimitConfig, seed: [u64; 2]) -> Self {
        let params = Params::new(cfg);
        Self {
            cfg: cfg.clone(),
            params,
            key: seed,
            sets: vec![Set::default(); params.sets],
            clock: 0,
            latest: None,
            occupied: 0,
            evictions: 0,
        }
    }

    /// The settings this limiter was built or last reconfigured with.
    pub fn config(&self) -> &RateLimitConfig {
        &self.cfg
    }

    /// Charges one request from `addr` at `now`.
    pub fn check(&mut self, addr: IpAddr, now: NtpTimestamp) -> RateVerdict {
        let now = self.advance(now);
        let tag = self.tag(addr);
        let Params { interval, tolerance, .. } = self.params;
        let set = &mut self.sets[set_index(tag, self.params.sets)];

        let way = match set.tags.iter().position(|&t| t == tag) {
            Some(way) => way,
            None => {
                let way = match set.tags.iter().position(|&t| t == 0) {
                    Some(empty) => {
                        self.occupied += 1;
                        empty
                    }
                    None => {
                        let victim = fullest(set);
                        if set.tats[victim] > now {
                            self.evictions += 1;
                        }
                        victim
                    }
                };
                set.tags[way] = tag;
                set.tats[way] = 0; // full
                way
            }
        };

        let tat = set.tats[way];
        if tat.saturating_sub(now) > tolerance {
            return RateVerdict::Limited;
        }
        set.tats[way] = tat.max(now).saturating_add(interval);
        RateVerdict::Pass
    }

    /// Occupancy figures.
    pub fn stats(&self) -> RateLimiterStats {
        RateLimiterStats {
            capacity: (self.sets.len() * WAYS) as u64,
            occupied: self.occupied,
            evictions: self.evictions,
            memory_bytes: std::mem::size_of_val(self.sets.as_slice()) as u64,
        }
    }

    /// Applies new settings live (for a configuration reload).
    ///
    /// - Interval or burst changed: every client keeps its debt measured in
    ///   requests (a client two requests short of a full bucket stays two
    ///   requests short), capped at an empty bucket under the new burst.
    /// - IPv6 prefix length changed: the table is cleared, since IPv6 keys
    ///   no longer mean the same clients (everyone starts with a full
    ///   bucket).
    /// - Capacity changed (after rounding): a new table is allocated and the
    ///   entries are moved into it; when it is smaller, the eviction policy
    ///   decides which stay.
    ///
    /// This walks the table once (O(capacity)); it is not for the per-packet
    /// path.
    pub fn reconfigure(&mut self, cfg: &RateLimitConfig) {
        let old = self.params;
        let new = Params::new(cfg);
        self.cfg = cfg.clone();
        self.params = new;
        let now = self.clock >> UNIT_BITS;

        if new.prefix_len != old.prefix_len {
            self.sets = vec![Set::default(); new.sets];
            self.occupied = 0;
            return;
        }
        if (new.interval, new.tolerance) != (old.interval, old.tolerance) {
            let max_debt = new.tolerance.saturating_add(new.interval);
            for set in &mut self.sets {
                for way in 0..WAYS {
                    let debt = set.tats[way].saturating_sub(now);
                    if set.tags[way] != 0 && debt > 0 {
                        // debt / old.interval requests, in new units; < 2^128.
                        let scaled = u128::from(debt) * u128::from(new.interval) / u128::from(old.interval);
                        let debt = u64::try_from(scaled).unwrap_or(u64::MAX).min(max_debt);
                        set.tats[way] = now + debt;
                    }
                }
            }
        }
        if new.sets != old.sets {
            let old_sets = std::mem::replace(&mut self.sets, vec![Set::default(); new.sets]);
            self.occupied = 0;
            for set in &old_sets {
                for way in 0..WAYS {
                    if set.tags[way] != 0 {
                        self.reinsert(set.tags[way], set.tats[way], now);
                    }
                }
            }
        }
    }

    /// Moves one entry into the (new) table, evicting by the usual policy
    /// if its set is full.
    fn reinsert(&mut self, tag: u64, tat: u64, now: u64) {
        let set = &mut self.sets[set_index(tag, self.params.sets)];
        let way = match set.tags.iter().position(|&t| t == 0) {
            Some(empty) => {
                self.occupied += 1;
                empty
            }
            None => {
                let victim = fullest(set);
                if set.tats[victim] >= tat {
                    // The newcomer is the fuller one: it is the one dropped.
                    if tat > now {
                        self.evictions += 1;
                    }
                    return;
                }
                if set.tats[victim] > now {
                    self.evictions += 1;
                }
                victim
            }
        };
        set.tags[way] = tag;
        set.tats[way] = tat;
    }

    /// Advances the limiter's clock to `now` and returns it in entry units
    /// (2^-16 s). See [`STEP_BACK`] for what a step backwards does.
    fn advance(&mut self, now: NtpTimestamp) -> u64 {
        match self.latest {
            None => self.latest = Some(now),
            Some(latest) => {
                let elapsed = now.wrapping_diff(latest);
                if elapsed > 0 {
                    self.clock = self.clock.saturating_add(elapsed as u64);
                    self.latest = Some(now);
                } else if elapsed < -STEP_BACK {
                    self.latest = Some(now);
                }
            }
        }
        self.clock >> UNIT_BITS
    }

    /// The keyed hash of the client `addr` belongs to, never 0.
    fn tag(&self, addr: IpAddr) -> u64 {
        let hash = siphash::<1, 3>(self.key, &client_key(addr, self.params.prefix_len));
        hash.max(1)
    }
}

/// The set a tag lives in; `sets` is a power of two.
fn set_index(tag: u64, sets: usize) -> usize {
    // The mask keeps the value below `sets`, a usize.
    (tag & (sets as u64 - 1)) as usize
}

/// The way whose bucket is fullest, ties to the oldest: the smallest `tat`.
fn fullest(set: &Set) -> usize {
    let mut best = 0;
    for way in 1..WAYS {
        if set.tats[way] < set.tats[best] {
            best = way;
        }
    }
    best
}

/// The bytes hashed for a client: a family byte (4 or 6), then the IPv4
/// address (zero-padded) or the masked IPv6 prefix.
fn client_key(addr: IpAddr, ipv6_prefix_len: u8) -> [u8; 17] {
    let mut key = [0u8; 17];
    match canonical(addr) {
        IpAddr::V4(a) => {
            key[0] = 4;
            key[1..5].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            key[0] = 6;
            let mask = u128::MAX.checked_shl(128 - u32::from(ipv6_prefix_len)).unwrap_or(0);
            key[1..].copy_from_slice(&(a.to_bits() & mask).to_be_bytes());
        }
    }
    key
}

/// `addr`, with an IPv4-mapped IPv6 address turned into IPv4.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => match Ipv6Addr::to_ipv4_mapped(&a) {
            Some(v4) => IpAddr::V4(v4),
            None => addr,
        },
        v4 => v4,
    }
}

/// SipHash-c-d (Aumasson and Bernstein) of `msg` under `key`, the 64-bit
/// output variant. `C = 1, D = 3` is the fast variant used here; `C = 2,
/// D = 4` is the original, used in the tests against the standard library.
fn siphash<const C: usize, const D: usize>(key: [u64; 2], msg: &[u8]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    let compress = |v: &mut [u64; 4], m: u64| {
        v[3] ^= m;
        for _ in 0..C {
            sip_round(v);
        }
        v[0] ^= m;
    };
    let mut blocks = msg.chunks_exact(8);
    for block in &mut blocks {
        let mut word = [0u8; 8];
        word.copy_from_slice(block);
        compress(&mut v, u64::from_le_bytes(word));
    }
    let mut last = [0u8; 8];
    let tail = blocks.remainder();
    last[..tail.len()].copy_from_slice(tail);
    last[7] = msg.len() as u8; // the length modulo 256
    compress(&mut v, u64::from_le_bytes(last));

    v[2] ^= 0xff;
    for _ in 0..D {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    const SEED: [u64; 2] = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];

    fn cfg(interval: f64, burst: u32, capacity: usize) -> RateLimitConfig {
        RateLimitConfig { enabled: true, average_interval: interval, burst, ipv6_prefix_len: 64, capacity }
    }

    fn t0() -> NtpTimestamp {
        NtpTimestamp::from_unix(1_700_000_000, 0)
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
    }

    /// How many of `n` requests at `at` pass.
    fn passes(l: &mut RateLimiter, addr: IpAddr, at: NtpTimestamp, n: usize) -> usize {
        (0..n).filter(|_| l.check(addr, at) == RateVerdict::Pass).count()
    }

    #[test]
    fn siphash_2_4_matches_std() {
        #[allow(deprecated)]
        fn reference(key: [u64; 2], msg: &[u8]) -> u64 {
            use std::hash::Hasher;
            let mut h = std::hash::SipHasher::new_with_keys(key[0], key[1]);
            h.write(msg);
            h.finish()
        }
        let msg: Vec<u8> = (0..40u8).collect();
        for len in 0..msg.len() {
            assert_eq!(siphash::<2, 4>(SEED, &msg[..len]), reference(SEED, &msg[..len]), "length {len}");
        }
    }

    #[test]
    fn validate_ranges() {
        assert_eq!(RateLimitConfig::default().validate(), Ok(()));
        let ok = cfg(2.0, 16, 1024);
        for bad in [
            RateLimitConfig { average_interval: 0.0, ..ok.clone() },
            RateLimitConfig { average_interval: -1.0, ..ok.clone() },
            RateLimitConfig { average_interval: f64::NAN, ..ok.clone() },
            RateLimitConfig { average_interval: f64::INFINITY, ..ok.clone() },
            RateLimitConfig { average_interval: 86_400.5, ..ok.clone() },
            RateLimitConfig { burst: 0, ..ok.clone() },
            RateLimitConfig { burst: 1_000_001, ..ok.clone() },
            RateLimitConfig { ipv6_prefix_len: 31, ..ok.clone() },
            RateLimitConfig { ipv6_prefix_len: 129, ..ok.clone() },
            RateLimitConfig { capacity: 3, ..ok.clone() },
            RateLimitConfig { capacity: (1 << 28) + 1, ..ok.clone() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        for good in [
            RateLimitConfig { average_interval: 86_400.0, burst: 1_000_000, ..ok.clone() },
            RateLimitConfig { average_interval: 1e-6, burst: 1, ..ok.clone() },
            RateLimitConfig { ipv6_prefix_len: 32, capacity: 4, ..ok.clone() },
            RateLimitConfig { ipv6_prefix_len: 128, capacity: 1 << 28, ..ok.clone() },
        ] {
            assert_eq!(good.validate(), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn capacity_rounds_up_to_power_of_two_sets() {
        for (asked, real) in [(0, 4), (1, 4), (4, 4), (5, 8), (1000, 1024), (1024, 1024), (1025, 2048)] {
            let l = RateLimiter::new(&cfg(2.0, 16, asked), SEED);
            let s = l.stats();
            assert_eq!(s.capacity, real, "capacity {asked}");
            assert_eq!(s.memory_bytes, real * 16);
            assert_eq!(s.occupied, 0);
        }
    }

    #[test]
    fn burst_then_limited() {
        let mut l = RateLimiter::new(&cfg(2.0, 16, 1024), SEED);
        let a = v4(192, 0, 2, 1);
        assert_eq!(passes(&mut l, a, t0(), 16), 16);
        assert_eq!(l.check(a, t0()), RateVerdict::Limited);
        assert_eq!(passes(&mut l, a, t0().add_secs(1.0), 10), 0);
        assert_eq!(l.stats().occupied, 1);
    }

    #[test]
    fn refill_after_waiting() {
        let mut l = RateLimiter::new(&cfg(2.0, 16, 1024), SEED);
        let a = v4(192, 0, 2, 1);
        assert_eq!(passes(&mut l, a, t0(), 20), 16);
        // One interval buys one request.
        assert_eq!(passes(&mut l, a, t0().add_secs(2.0), 5), 1);
        // Five more intervals, five requests.
        assert_eq!(passes(&mut l, a, t0().add_secs(12.0), 10), 5);
        // Sustained: one request per interval passes, forever.
        for i in 1..=100 {
            assert_eq!(l.check(a, t0().add_secs(12.0 + 2.0 * f64::from(i))), RateVerdict::Pass, "{i}");
        }
        // Long quiet: a full bucket, never more.
        assert_eq!(passes(&mut l, a, t0().add_secs(10_000.0), 40), 16);
    }

    #[test]
    fn refused_requests_are_not_charged() {
        let mut l = RateLimiter::new(&cfg(1.0, 4, 1024), SEED);
        let a = v4(192, 0, 2, 1);
        let mut passed = 0;
        // 100 requests per second for 60 s: the burst, then one per second.
        for ms in (0..60_000).step_by(10) {
            if l.check(a, t0().add_secs(f64::from(ms) / 1000.0)) == RateVerdict::Pass {
                passed += 1;
            }
        }
        assert!((4 + 59..=4 + 60).contains(&passed), "{passed}");
    }

    #[test]
    fn distinct_clients_are_independent() {
        let mut l = RateLimiter::new(&cfg(2.0, 16, 1024), SEED);
        let a = v4(192, 0, 2, 1);
        let b = v4(192, 0, 2, 2);
        assert_eq!(passes(&mut l, a, t0(), 16), 16);
        assert_eq!(l.check(a, t0()), RateVerdict::Limited);
        assert_eq!(passes(&mut l, b, t0(), 16), 16);
        assert_eq!(l.check(b, t0()), RateVerdict::Limited);
        assert_eq!(l.stats().occupied, 2);
    }

    #[test]
    fn ipv6_keyed_by_prefix() {
        let mut l = RateLimiter::new(&cfg(2.0, 16, 1024), SEED);
        let a1 = v6("2001:db8:1:2::1");
        let a2 = v6("2001:db8:1:2:ffff:ffff:ffff:ffff");
        let other = v6("2001:db8:1:3::1");
        assert_eq!(passes(&mut l, a1, t0(), 10), 10);
        assert_eq!(passes(&mut l, a2, t0(), 10), 6, "same /64 shares the bucket");
        assert_eq!(passes(&mut l, other, t0(), 16), 16, "a different /64 has its own");
        assert_eq!(l.stats().occupied, 2);

        let mut host = RateLimiter::new(&RateLimitConfig { ipv6_prefix_len: 128, ..cfg(2.0, 16, 1024) }, SEED);
        assert_eq!(passes(&mut host, a1, t0(), 16), 16);
        assert_eq!(passes(&mut host, a2, t0(), 16), 16, "/128: every address its own");
    }

    #[test]
    fn ipv4_mapped_is_ipv4() {
        let mut l = RateLimiter::new(&RateLimitConfig { ipv6_prefix_len: 32, ..cfg(2.0, 16, 1024) }, SEED);
        assert_eq!(passes(&mut l, v6("::ffff:192.0.2.7"), t0(), 10), 10);
        assert_eq!(passes(&mut l, v4(192, 0, 2, 7), t0(), 10), 6);
        // Not the same as another IPv4 address the /32 mask would merge.
        assert_eq!(passes(&mut l, v6("::ffff:192.0.2.8"), t0(), 16), 16);
        // Nor as the IPv6 prefix ::/32 that the mapped range lies in.
        assert_eq!(passes(&mut l, v6("::1"), t0(), 16), 16);
    }

    #[test]
    fn time_going_backwards_grants_nothing() {
        let mut l = RateLimiter::new(&cfg(2.0, 4, 1024), SEED);
        let a = v4(192, 0, 2, 1);
        let t = t0();
        assert_eq!(passes(&mut l, a, t, 4), 4);
        for back in [-0.5, -0.25, -1000.0, -3000.0, -1e9] {
            assert_eq!(l.check(a, t.add_secs(back)), RateVerdict::Limited, "{back}");
        }
        // A large step back is a new timeline: elapsed time counts from it.
        let mut l = RateLimiter::new(&cfg(2.0, 4, 1024), SEED);
        assert_eq!(passes(&mut l, a, t, 4), 4);
        let back = t.add_secs(-3000.0);
        assert_eq!(l.check(a, back), RateVerdict::Limited);
        assert_eq!(passes(&mut l, a, back.add_secs(2.0), 4), 1);
        // A small one is jitter: nothing counts until time passes the latest.
        let mut l = RateLimiter::new(&cfg(2.0, 4, 1024), SEED);
        assert_eq!(passes(&mut l, a, t, 4), 4);
        let back = t.add_secs(-0.5);
        assert_eq!(l.check(a, back), RateVerdict::Limited);
        assert_eq!(passes(&mut l, a, back.add_secs(2.0), 4), 0);
        assert_eq!(passes(&mut l, a, t.add_secs(2.0), 4), 1);
    }

    #[test]
    fn jitter_does_not_speed_up_the_clock() {
        // Stamps from two sources 5 ms apart, interleaved: the clock must
        // follow the later one, not add up every forward step.
        let mut l = RateLimiter::new(&cfg(1.0, 1, 1024), SEED);
        let a = v4(192, 0, 2, 1);
        let mut passed = 0;
        for ms in (0..10_000u32).step_by(10) {
            let t = t0().add_secs(f64::from(ms) / 1000.0);
            for stamp in [t.add_secs(0.005), t] {
                if l.check(a, stamp) == RateVerdict::Pass {
                    passed += 1;
                }
            }
        }
        assert!((10..=11).contains(&passed), "{passed}");
    }

    #[test]
    fn era_rollover_is_one_second() {
        let mut l = RateLimiter::new(&cfg(1.0, 2, 1024), SEED);
        let a = v4(192, 0, 2, 1);
        let before = NtpTimestamp::from_bits((u64::from(u32::MAX) << 32) | 0x8000_0000); // 0.5 s before 2036
        let after = NtpTimestamp::from_bits(0x8000_0000); // 0.5 s after
        assert_eq!(passes(&mut l, a, before, 3), 2);
        assert_eq!(passes(&mut l, a, after, 3), 1, "1 s across the rollover refills one request");
    }

    #[test]
    fn long_idle_client_is_refilled() {
        // Idle spans past where a 32-bit 2^-10 s time would wrap (48.5 days)
        // and its multiples, including exactly one wrap.
        let wrap = f64::from(u32::MAX) / 1024.0 + 1.0 / 1024.0;
        for idle in [wrap / 2.0, wrap, wrap + 1.0, 2.0 * wrap, 3.0 * wrap - 0.5, 20.0 * 365.0 * 86_400.0] {
            let mut l = RateLimiter::new(&cfg(60.0, 8, 1024), SEED);
            let a = v4(192, 0, 2, 1);
            let other = v4(198, 51, 100, 1);
            assert_eq!(passes(&mut l, a, t0(), 10), 8);
            // Someone else keeps the server busy meanwhile, or nobody does.
            let mut t = t0();
            for _ in 0..10 {
                t = t.add_secs(idle / 10.0);
                let _ = l.check(other, t);
            }
            assert_eq!(passes(&mut l, a, t, 10), 8, "idle {idle} s");
        }
        let mut quiet = RateLimiter::new(&cfg(60.0, 8, 1024), SEED);
        let a = v4(192, 0, 2, 1);
        assert_eq!(passes(&mut quiet, a, t0(), 10), 8);
        assert_eq!(passes(&mut quiet, a, t0().add_secs(wrap), 10), 8);
    }

    #[test]
    fn fine_grained_time_accumulates() {
        // Requests 10 µs apart (below the 2^-16 s entry unit) still add up.
        let mut l = RateLimiter::new(&cfg(0.01, 1, 1024), SEED);
        let a = v4(192, 0, 2, 1);
        let mut passed = 0;
        for i in 0..100_000u32 {
            if l.check(a, t0().add_secs(f64::from(i) * 10e-6)) == RateVerdict::Pass {
                passed += 1;
            }
        }
        // 1 s at one per 10 ms (rounded to 655 units of 2^-16 s).
        assert!((99..=102).contains(&passed), "{passed}");
    }

    #[test]
    fn million_sources_fixed_memory() {
        let mut l = RateLimiter::new(&cfg(2.0, 16, 4096), SEED);
        let before = l.stats();
        let mut t = t0();
        for i in 0..1_000_000u32 {
            if i % 1000 == 0 {
                t = t.add_secs(0.001);
            }
            let _ = l.check(IpAddr::V4(Ipv4Addr::from_bits(i.wrapping_mul(0x9E37_79B9))), t);
        }
        let s = l.stats();
        assert_eq!(s.capacity, 4096);
        assert!(s.occupied <= s.capacity);
        assert!(s.occupied > s.capacity * 9 / 10, "the table fills: {s:?}");
        assert_eq!(s.memory_bytes, before.memory_bytes);
        assert_eq!(s.memory_bytes, 4096 * 16);
        assert!(s.evictions > 0);
    }

    #[test]
    fn flooder_stays_limited_while_sources_churn() {
        let mut l = RateLimiter::new(&cfg(2.0, 16, 64), SEED);
        let flooder = v4(203, 0, 113, 9);
        let mut t = t0();
        let mut flooder_passes = 0;
        // 60 s; per 10 ms the flooder sends one request and 50 new (spoofed)
        // sources send one each: 300 000 sources through a 64-entry table.
        for step in 0..6000u32 {
            t = t.add_secs(0.01);
            if l.check(flooder, t) == RateVerdict::Pass {
                flooder_passes += 1;
            }
            for k in 0..50u32 {
                let src = Ipv4Addr::from_bits(0x0a00_0000 + step * 50 + k);
                assert_eq!(l.check(IpAddr::V4(src), t), RateVerdict::Pass);
            }
        }
        // The burst, then one per 2 s: never a fresh bucket.
        assert!(flooder_passes <= 16 + 30, "{flooder_passes}");
        let s = l.stats();
        assert!(s.occupied <= s.capacity);
        assert!(s.evictions > 0);
    }

    #[test]
    fn full_buckets_are_evicted_without_counting() {
        // Capacity 4: one set. Four clients that used one request each and
        // then waited are full again; newcomers replace them silently.
        let mut l = RateLimiter::new(&cfg(1.0, 4, 4), SEED);
        for d in 1..=4 {
            assert_eq!(l.check(v4(192, 0, 2, d), t0()), RateVerdict::Pass);
        }
        let later = t0().add_secs(5.0);
        for d in 5..=8 {
            assert_eq!(l.check(v4(192, 0, 2, d), later), RateVerdict::Pass);
        }
        assert_eq!(l.stats().evictions, 0);
        assert_eq!(l.stats().occupied, 4);
        // Now all four are in debt: the next newcomer evicts one.
        assert_eq!(l.check(v4(192, 0, 2, 9), later), RateVerdict::Pass);
        assert_eq!(l.stats().evictions, 1);
    }

    #[test]
    fn reconfigure_keeps_or_moves_state() {
        let a = v4(192, 0, 2, 1);
        let mut l = RateLimiter::new(&cfg(2.0, 4, 1024), SEED);
        assert_eq!(passes(&mut l, a, t0(), 4), 4);

        // Same capacity, new burst: still limited, the table kept.
        l.reconfigure(&cfg(2.0, 8, 1024));
        assert_eq!(l.stats().occupied, 1);
        assert_eq!(l.check(a, t0()), RateVerdict::Pass, "burst 8 leaves room for four more");
        assert_eq!(passes(&mut l, a, t0(), 10), 3);

        // Shorter interval: the debt of 8 requests stays 8 requests.
        l.reconfigure(&cfg(0.5, 8, 1024));
        assert_eq!(l.check(a, t0()), RateVerdict::Limited);
        assert_eq!(passes(&mut l, a, t0().add_secs(0.5), 3), 1);

        // New capacity: moved, still limited.
        l.reconfigure(&cfg(0.5, 8, 64));
        assert_eq!(l.stats().capacity, 64);
        assert_eq!(l.stats().memory_bytes, 64 * 16);
        assert_eq!(l.stats().occupied, 1);
        assert_eq!(l.check(a, t0().add_secs(0.5)), RateVerdict::Limited);

        // New prefix length: cleared.
        l.reconfigure(&RateLimitConfig { ipv6_prefix_len: 56, ..cfg(0.5, 8, 64) });
        assert_eq!(l.stats().occupied, 0);
        assert_eq!(passes(&mut l, a, t0().add_secs(0.5), 8), 8);
    }

    #[test]
    fn shrinking_keeps_occupancy_bounded() {
        let mut l = RateLimiter::new(&cfg(2.0, 16, 4096), SEED);
        for i in 0..4096u32 {
            let _ = l.check(IpAddr::V4(Ipv4Addr::from_bits(i)), t0());
        }
        l.reconfigure(&cfg(2.0, 16, 16));
        let s = l.stats();
        assert_eq!(s.capacity, 16);
        assert!(s.occupied <= 16);
    }

    fn any_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from_bits(a))),
            any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from_bits(a))),
            any::<u32>().prop_map(|a| IpAddr::V6(Ipv4Addr::from_bits(a).to_ipv6_mapped())),
            (0u32..8).prop_map(|a| IpAddr::V4(Ipv4Addr::from_bits(a))),
        ]
    }

    fn any_config() -> impl Strategy<Value = RateLimitConfig> {
        let interval =
            prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(0.0), Just(-1.0), 1e-9..1e6f64,];
        (any::<bool>(), interval, any::<u32>(), any::<u8>(), 0usize..300).prop_map(
            |(enabled, average_interval, burst, ipv6_prefix_len, capacity)| RateLimitConfig {
                enabled,
                average_interval,
                burst,
                ipv6_prefix_len,
                capacity,
            },
        )
    }

    proptest! {
        #[test]
        fn check_never_panics(
            cfg in any_config(),
            cfg2 in any_config(),
            seed in any::<[u64; 2]>(),
            reqs in proptest::collection::vec((any_addr(), any::<u64>()), 1..300),
        ) {
            let mut l = RateLimiter::new(&cfg, seed);
            let memory = l.stats().memory_bytes;
            for (i, (addr, bits)) in reqs.iter().enumerate() {
                let _ = l.check(*addr, NtpTimestamp::from_bits(*bits));
                let s = l.stats();
                prop_assert!(s.occupied <= s.capacity);
                if i == reqs.len() / 2 {
                    l.reconfigure(&cfg2);
                } else if i < reqs.len() / 2 {
                    prop_assert_eq!(s.memory_bytes, memory);
                }
            }
        }

        #[test]
        fn never_more_than_burst_at_once(
            burst in 1u32..50,
            interval in 0.001f64..100.0,
            start in any::<u64>(),
            n in 1usize..200,
        ) {
            let mut l = RateLimiter::new(&cfg(interval, burst, 64), SEED);
            let t = NtpTimestamp::from_bits(start);
            let passed = passes(&mut l, v4(192, 0, 2, 1), t, n);
            prop_assert_eq!(passed, n.min(burst as usize));
        }
    }
}
