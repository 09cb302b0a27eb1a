//! Per-source handshake rate limit: a token bucket per source in a small
//! fixed-size table, indexed by a keyed hash of the source.
//!
//! A source is an IPv4 address or an IPv6 /64 (one host usually holds a
//! whole /64). Two sources that hash to the same slot share nothing: the
//! newcomer takes the slot over with a full bucket, so a collision can only
//! make the limit laxer, never refuse a client that did nothing. The table
//! never grows, so a flood from many sources costs no memory.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::Instant;

/// The source `ip` belongs to, as a number: the IPv4 address, or the
/// IPv6 /64 (with a marker bit so it never equals an IPv4 key).
pub(crate) fn source_key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_bits()),
        IpAddr::V6(v6) => (v6.to_bits() & !((1u128 << 64) - 1)) | 1,
    }
}

/// Slots in the table.
pub(crate) const SLOTS: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    source: u128,
    tokens: f64,
    last: Instant,
}

/// The table.
#[derive(Debug)]
pub(crate) struct HandshakeLimiter {
    rate: f64,
    burst: f64,
    hasher: RandomState,
    slots: Vec<Option<Bucket>>,
}

impl HandshakeLimiter {
    /// `rate` handshakes per second per source on average, `burst` at once;
    /// a rate of 0 (or less) turns the limit off.
    pub(crate) fn new(rate: f64, burst: u32) -> Self {
        let on = rate > 0.0;
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            hasher: RandomState::new(),
            slots: if on { vec![None; SLOTS] } else { Vec::new() },
        }
    }

    /// Whether `ip` may start a handshake at `now` (taking a token if so).
    pub(crate) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.slots.is_empty() {
            return true;
        }
        let source = source_key(ip);
        let slot = (self.hasher.hash_one(source) as usize) % SLOTS;
        let b = match &mut self.slots[slot] {
            Some(b) if b.source == source => b,
            other => other.insert(Bucket { source, tokens: self.burst, last: now }),
        };
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_rate() {
        let mut l = HandshakeLimiter::new(2.0, 3);
        let t = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!((0..3).all(|_| l.allow(a, t)));
        assert!(!l.allow(a, t));
        assert!(l.allow(b, t), "another source has its own bucket");
        assert!(l.allow(a, t + Duration::from_millis(500)));
        assert!(!l.allow(a, t + Duration::from_millis(500)));
    }

    #[test]
    fn ipv6_by_slash_64_and_off() {
        let mut l = HandshakeLimiter::new(1.0, 1);
        let t = Instant::now();
        assert!(l.allow("2001:db8::1".parse().unwrap(), t));
        assert!(!l.allow("2001:db8::2".parse().unwrap(), t));
        assert!(l.allow("2001:db8:0:1::1".parse().unwrap(), t));
        let mut off = HandshakeLimiter::new(0.0, 1);
        assert!((0..100).all(|_| off.allow("192.0.2.1".parse().unwrap(), t)));
    }
}
