//! The source prefixes a responder rate-limits most, in fixed memory.
//!
//! An operator under a flood wants to know *who*: [`TopPrefixes`] keeps an
//! approximate top-[`TOP_K`] of the source prefixes ([`Prefix`]: IPv4 /24,
//! IPv6 /48, the sizes one network or site is usually given) whose requests
//! were over the rate limit, with the Space-Saving algorithm (Metwally,
//! Agrawal, El Abbadi, "Efficient computation of frequent and top-k elements
//! in data streams", 2005): [`TOP_K`] slots of (prefix, count, error); a
//! prefix already held counts up; a new one takes a free slot, or replaces
//! the smallest count `m` and starts at `m + 1` with error `m`. Any prefix
//! that sent more than `1 / TOP_K` of the recorded requests is guaranteed to
//! be held, and a held count overestimates the truth by at most its error.
//!
//! Recording is one pass over [`TOP_K`] 24-byte slots (a few cache lines),
//! no allocation, no hashing; it happens only for requests the rate limiter
//! refused. The caller decides the time window: read the slots, then
//! [`TopPrefixes::clear`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Slots of a [`TopPrefixes`].
pub const TOP_K: usize = 16;

/// A client network: an IPv4 /24 or an IPv6 /48 (an IPv4-mapped IPv6
/// address counts as IPv4), packed into 64 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix(u64);

impl Prefix {
    /// Prefix length of an IPv4 [`Prefix`].
    pub const V4_LEN: u8 = 24;
    /// Prefix length of an IPv6 [`Prefix`].
    pub const V6_LEN: u8 = 48;
    /// Set in [`Self::to_bits`] for IPv6.
    const V6: u64 = 1 << 63;

    /// The prefix `addr` belongs to.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(a) => Self(u64::from(a.to_bits() >> (32 - Self::V4_LEN))),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Self::of(IpAddr::V4(v4)),
                None => Self(Self::V6 | (a.to_bits() >> (128 - Self::V6_LEN)) as u64),
            },
        }
    }

    /// The network address (host bits zero).
    pub fn addr(self) -> IpAddr {
        if self.0 & Self::V6 == 0 {
            IpAddr::V4(Ipv4Addr::from_bits((self.0 as u32) << (32 - Self::V4_LEN)))
        } else {
            IpAddr::V6(Ipv6Addr::from_bits(u128::from(self.0 & !Self::V6) << (128 - Self::V6_LEN)))
        }
    }

    /// The prefix length.
    pub fn prefix_len(self) -> u8 {
        if self.0 & Self::V6 == 0 { Self::V4_LEN } else { Self::V6_LEN }
    }

    /// The packed form, e.g. to publish through an atomic.
    pub fn to_bits(self) -> u64 {
        self.0
    }

    /// Back from [`Self::to_bits`]; `None` for bits no prefix packs to.
    pub fn from_bits(bits: u64) -> Option<Self> {
        let body = bits & !Self::V6;
        let limit = if bits & Self::V6 == 0 { 1 << Self::V4_LEN } else { 1 << Self::V6_LEN };
        (body < limit).then_some(Self(bits))
    }
}

impl fmt::Display for Prefix {
    /// CIDR notation: `198.51.100.0/24`, `2001:db8:1::/48`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.prefix_len())
    }
}

/// One held prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixCount {
    /// The prefix.
    pub prefix: Prefix,
    /// Requests counted, an overestimate by at most `error`.
    pub count: u64,
    /// Largest possible overcount (the count the slot was taken over at).
    pub error: u64,
}

/// An approximate top-[`TOP_K`] of prefixes (see the module docs).
///
/// Keys and counts live in separate arrays, so the search for a held key
/// and the search for the smallest count are each one tight,
/// vectorizable loop over 128 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopPrefixes {
    /// Packed prefixes of the slots in use (`keys[..used]`).
    keys: [u64; TOP_K],
    /// Their counts; 0 in a free slot.
    counts: [u64; TOP_K],
    errors: [u64; TOP_K],
    used: usize,
    /// Everything recorded since the last clear.
    total: u64,
}

impl Default for TopPrefixes {
    fn default() -> Self {
        Self { keys: [0; TOP_K], counts: [0; TOP_K], errors: [0; TOP_K], used: 0, total: 0 }
    }
}

impl TopPrefixes {
    /// Counts one request from `prefix`.
    pub fn record(&mut self, prefix: Prefix) {
        self.total += 1;
        let key = prefix.to_bits();
        if let Some(i) = self.keys[..self.used].iter().position(|k| *k == key) {
            self.counts[i] += 1;
            return;
        }
        let (slot, error) = if self.used < TOP_K {
            self.used += 1;
            (self.used - 1, 0)
        } else {
            let mut min = 0;
            for i in 1..TOP_K {
                if self.counts[i] < self.counts[min] {
                    min = i;
                }
            }
            (min, self.counts[min])
        };
        self.keys[slot] = key;
        self.counts[slot] = error + 1;
        self.errors[slot] = error;
    }

    /// The held prefixes, in no particular order.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = PrefixCount> + '_ {
        (0..self.used).map(|i| PrefixCount {
            prefix: Prefix(self.keys[i]),
            count: self.counts[i],
            error: self.errors[i],
        })
    }

    /// Requests recorded since the last [`Self::clear`] (held or not).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Forgets everything (a new window).
    pub fn clear(&mut self) {
        self.used = 0;
        self.total = 0;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn p(s: &str) -> Prefix {
        Prefix::of(s.parse().unwrap())
    }

    #[test]
    fn prefixes_of_addresses() {
        assert_eq!(p("198.51.100.77").to_string(), "198.51.100.0/24");
        assert_eq!(p("198.51.100.77"), p("198.51.100.1"));
        assert_ne!(p("198.51.100.77"), p("198.51.101.77"));
        assert_eq!(p("::ffff:198.51.100.9"), p("198.51.100.200"));
        assert_eq!(p("2001:db8:1:2:3::4").to_string(), "2001:db8:1::/48");
        assert_eq!(p("2001:db8:1:ffff::1"), p("2001:db8:1::"));
        assert_ne!(p("2001:db8:1::"), p("2001:db8:2::"));
        assert_eq!(p("0.0.0.1").to_string(), "0.0.0.0/24");
        assert_ne!(p("0.0.0.1"), p("::1"), "IPv4 and IPv6 never collide");
        assert_eq!(p("ffff:ffff:ffff:ffff::").to_string(), "ffff:ffff:ffff::/48");
        assert_eq!(Prefix::from_bits(p("2001:db8::").to_bits()), Some(p("2001:db8::")));
        assert_eq!(Prefix::from_bits(1 << 24), None);
        assert_eq!(Prefix::from_bits((1 << 63) | (1 << 48)), None);
    }

    #[test]
    fn counts_exactly_while_there_is_room() {
        let mut t = TopPrefixes::default();
        for i in 0..10u8 {
            for _ in 0..=i {
                t.record(p(&format!("10.0.{i}.1")));
            }
        }
        assert_eq!(t.total(), 55);
        assert_eq!(t.entries().len(), 10);
        for e in t.entries() {
            let third = e.prefix.to_string().split('.').nth(2).unwrap().parse::<u64>().unwrap();
            assert_eq!((e.count, e.error), (third + 1, 0));
        }
        t.clear();
        assert_eq!(t.entries().len(), 0);
        assert_eq!(t.total(), 0);
    }

    #[test]
    fn a_heavy_hitter_survives_a_spray_of_one_off_sources() {
        let mut t = TopPrefixes::default();
        for i in 0..20_000u32 {
            t.record(Prefix::of(IpAddr::V4(Ipv4Addr::from_bits(0x0a00_0000 + (i << 8)))));
            if i % 4 == 0 {
                t.record(p("203.0.113.5"));
            }
        }
        let top = t.entries().max_by_key(|e| e.count).unwrap();
        assert_eq!(top.prefix, p("203.0.113.0"));
        assert!(top.count - top.error <= 5000 && 5000 <= top.count, "{top:?}");
        assert_eq!(t.entries().len(), TOP_K);
        assert_eq!(t.total(), 25_000);
    }

    proptest! {
        /// Space-Saving's guarantees: every held count brackets the truth
        /// (count - error <= true <= count), counts add up to the total, and
        /// any prefix above total / TOP_K is held.
        #[test]
        fn space_saving_bounds(stream in proptest::collection::vec(0u32..64, 0..2000)) {
            let mut t = TopPrefixes::default();
            let mut truth = std::collections::HashMap::new();
            for s in &stream {
                let prefix = Prefix::of(IpAddr::V4(Ipv4Addr::from_bits(s << 8)));
                t.record(prefix);
                *truth.entry(prefix).or_insert(0u64) += 1;
            }
            prop_assert_eq!(t.total(), stream.len() as u64);
            prop_assert_eq!(t.entries().map(|e| e.count).sum::<u64>(), stream.len() as u64);
            for e in t.entries() {
                let real = truth.get(&e.prefix).copied().unwrap_or(0);
                prop_assert!(e.count - e.error <= real && real <= e.count, "{:?} real {}", e, real);
            }
            for (prefix, n) in &truth {
                if *n > stream.len() as u64 / TOP_K as u64 {
                    prop_assert!(t.entries().any(|e| e.prefix == *prefix), "{} ({}) not held", prefix, n);
                }
            }
        }

        #[test]
        fn bits_round_trip(a in any::<u128>(), b in any::<u32>()) {
            for addr in [IpAddr::V6(Ipv6Addr::from_bits(a)), IpAddr::V4(Ipv4Addr::from_bits(b))] {
                let prefix = Prefix::of(addr);
                prop_assert_eq!(Prefix::from_bits(prefix.to_bits()), Some(prefix));
                prop_assert_eq!(Prefix::of(prefix.addr()), prefix);
            }
        }
    }
}
