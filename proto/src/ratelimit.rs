//! Per-client rate limiting (RFC 8633 section 3.?): PLACEHOLDER, being written.

use std::net::IpAddr;

use crate::time::NtpTimestamp;

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

/// Fixed-memory per-client token buckets.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimitConfig,
}

impl RateLimiter {
    /// A table sized by `cfg.capacity`; `seed` keys its hash.
    pub fn new(cfg: &RateLimitConfig, seed: [u64; 2]) -> Self {
        let _ = seed;
        Self { cfg: cfg.clone() }
    }

    /// Charges one request from `addr` at `now`.
    pub fn check(&mut self, addr: IpAddr, now: NtpTimestamp) -> RateVerdict {
        let _ = (addr, now, &self.cfg);
        RateVerdict::Pass
    }

    /// Occupancy figures.
    pub fn stats(&self) -> RateLimiterStats {
        RateLimiterStats::default()
    }
}
