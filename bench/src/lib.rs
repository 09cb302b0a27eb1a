//! chime's benchmarks.
//!
//! The criterion micro-benchmarks live in `benches/` (`cargo bench -p
//! chime-bench`); see `bench/README.md` for how to run them and the latest
//! figures. The end-to-end side-by-side harness (chime-load against chimed and
//! a reference server in a network namespace) arrives with the load-generator
//! issue.
#![forbid(unsafe_code)]

use chime_proto::packet::{LeapIndicator, RefId};
use chime_proto::{ClockSnapshot, NtpTimestamp};

/// Unix time the fixtures are anchored at (2026-09).
pub const T0_UNIX: i64 = 1_790_000_000;

/// A synchronized stratum-1 clock, as the benchmarks serve it.
pub fn synced_clock() -> ClockSnapshot {
    ClockSnapshot {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 1,
        reference_id: RefId(*b"GPS\0"),
        reference_time: NtpTimestamp::from_unix(T0_UNIX, 0),
        root_delay: 0.0,
        root_dispersion: 0.000_01,
        precision: -24,
        updated_at: NtpTimestamp::from_unix(T0_UNIX, 0),
    }
}

/// A plain 48-byte NTPv4 client request.
pub fn plain_request() -> [u8; 48] {
    let mut r = [0u8; 48];
    r[0] = 0x23;
    r[2] = 6;
    r[40..48].copy_from_slice(&0x1234_5678_9ABC_DEF0u64.to_be_bytes());
    r
}
