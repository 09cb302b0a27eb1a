//! The server's view of its own clock, published by the control thread and
//! read by every worker: what goes into the header fields that describe the
//! server's synchronization (leap, stratum, reference, root distance).

use crate::leap::SmearPlan;
use crate::packet::{LeapIndicator, RefId};
use crate::time::NtpTimestamp;

/// RFC 5905 PHI: the frequency tolerance, 15 ppm, by which root dispersion
/// grows per second since the last update from upstream.
pub const FREQUENCY_TOLERANCE: f64 = 15e-6;

/// RFC 5905 MAXDISP: a root dispersion of 16 s or more means "useless".
pub const MAX_DISPERSION: f64 = 16.0;

/// Stratum that tells a client the server is unsynchronized.
pub const STRATUM_UNSYNCHRONIZED: u8 = 16;

/// An immutable picture of the server clock's state at `updated_at`.
///
/// Workers derive the root dispersion of a reply from it as
/// `root_dispersion + PHI * (rx - updated_at)`, so a snapshot that is not
/// refreshed (a stalled upstream) makes replies honestly worse over time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClockSnapshot {
    /// Whether the clock is synchronized to a source worth serving.
    pub synchronized: bool,
    /// Leap second announced for the end of the current day (never
    /// [`LeapIndicator::Unsynchronized`]; use `synchronized` for that).
    pub leap: LeapIndicator,
    /// Stratum of this server (1 for a primary server).
    pub stratum: u8,
    /// Reference identifier.
    pub reference_id: RefId,
    /// When the clock was last set or corrected by its upstream.
    pub reference_time: NtpTimestamp,
    /// Round-trip delay to the primary reference, seconds.
    pub root_delay: f64,
    /// Dispersion to the primary reference at `updated_at`, seconds.
    pub root_dispersion: f64,
    /// Precision of the clock, log2 seconds.
    pub precision: i8,
    /// When this snapshot was taken.
    pub updated_at: NtpTimestamp,
    /// A leap smear in progress or coming (off by default): the responder
    /// adds its offset to the receive and transmit timestamps.
    pub smear: Option<SmearPlan>,
}

impl ClockSnapshot {
    /// The state before anything is known: unsynchronized.
    pub const fn unsynchronized(precision: i8) -> Self {
        Self {
            synchronized: false,
            leap: LeapIndicator::NoWarning,
            stratum: STRATUM_UNSYNCHRONIZED,
            reference_id: RefId([0; 4]),
            reference_time: NtpTimestamp::ZERO,
            root_delay: 0.0,
            root_dispersion: MAX_DISPERSION,
            precision,
            updated_at: NtpTimestamp::ZERO,
            smear: None,
        }
    }

    /// Root dispersion at time `now`: the snapshot's value grown by PHI per
    /// second since `updated_at` (never shrunk if `now` is earlier).
    pub fn root_dispersion_at(&self, now: NtpTimestamp) -> f64 {
        let elapsed = now.diff_secs(self.updated_at).max(0.0);
        self.root_dispersion + FREQUENCY_TOLERANCE * elapsed
    }

    /// `t` as served: moved by the leap smear, if one is set.
    pub fn served_time(&self, t: NtpTimestamp) -> NtpTimestamp {
        match &self.smear {
            Some(plan) => t.add_secs(plan.offset_at(t)),
            None => t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispersion_grows_with_phi() {
        let t0 = NtpTimestamp::from_unix(1_700_000_000, 0);
        let snap = ClockSnapshot { updated_at: t0, root_dispersion: 0.001, ..ClockSnapshot::unsynchronized(-20) };
        assert!((snap.root_dispersion_at(t0) - 0.001).abs() < 1e-12);
        let later = t0.add_secs(1000.0);
        assert!((snap.root_dispersion_at(later) - (0.001 + 0.015)).abs() < 1e-9);
        let earlier = t0.add_secs(-5.0);
        assert!((snap.root_dispersion_at(earlier) - 0.001).abs() < 1e-12);
    }
}
