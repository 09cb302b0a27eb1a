//! Upstream clock state: where the served time's quality comes from, and
//! what chimed announces when it is lost.
//!
//! A [`UpstreamSource`] reads the state of whatever disciplines the system
//! clock — the kernel (`adjtimex`), the local chronyd (an NTP query on
//! localhost) or ptp4l (its management socket) — as an [`UpstreamState`].
//! [`next_snapshot`], a pure function, turns the latest reading and the
//! previous [`Track`] into the [`ClockSnapshot`] workers serve:
//!
//! - a synchronized reading whose root distance is within
//!   `max_root_distance` is served as is ([`Phase::Synchronized`]);
//! - otherwise (read failed, source unsynchronized, or too far) the last
//!   good state is held over with its root dispersion grown by PHI per
//!   second (RFC 5905) ([`Phase::Holdover`]), until `max_unsync_secs`
//!   have passed since it was good or its root distance exceeds
//!   `max_root_distance`;
//! - then chimed serves the local clock if `local_stratum` is set
//!   ([`Phase::LocalFallback`]), else announces itself unsynchronized
//!   (leap 3 / stratum 16, or silence, per `upstream.unsynchronized`)
//!   ([`Phase::Unsynchronized`]).

use std::io;

use chime_proto::clock::{MAX_DISPERSION, STRATUM_UNSYNCHRONIZED};
use chime_proto::packet::{LeapIndicator, RefId};
use chime_proto::{ClockSnapshot, NtpTimestamp};

pub mod chrony;
#[doc(hidden)]
pub mod fake;
pub mod kernel;
pub mod ptp4l;

pub use chrony::ChronySource;
pub use kernel::KernelSource;
pub use ptp4l::Ptp4lSource;

/// One reading of the upstream's state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpstreamState {
    /// Whether the upstream says the clock is synchronized.
    pub synchronized: bool,
    /// Leap second announced for the end of the day.
    pub leap: LeapIndicator,
    /// Stratum chimed should serve (already one below the upstream's where
    /// that applies).
    pub stratum: u8,
    /// Reference ID chimed should serve.
    pub reference_id: RefId,
    /// Round-trip delay to the primary reference, seconds.
    pub root_delay: f64,
    /// Dispersion to the primary reference now, seconds.
    pub root_dispersion: f64,
    /// When the upstream last updated the clock; `None`: now.
    pub reference_time: Option<NtpTimestamp>,
    /// Offset of the disciplined clock from its reference as the upstream
    /// measured it (seconds), where it tells (kernel, ptp4l).
    pub offset: Option<f64>,
}

impl UpstreamState {
    /// A reading that says "reachable, but unsynchronized".
    pub const fn unsynchronized() -> Self {
        Self {
            synchronized: false,
            leap: LeapIndicator::NoWarning,
            stratum: STRATUM_UNSYNCHRONIZED,
            reference_id: RefId([0; 4]),
            root_delay: 0.0,
            root_dispersion: MAX_DISPERSION,
            reference_time: None,
            offset: None,
        }
    }
}

/// Why a source could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The peer did not answer in time.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The peer answered something chimed cannot read.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// The peer answered with an error or a refusal.
    #[error("refused: {0}")]
    Refused(String),
}

impl UpstreamError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { what, source }
    }
}

/// Something that tells the state of the upstream clock.
pub trait UpstreamSource: Send {
    /// The source's name as configured ("kernel", "chrony", "ptp4l").
    fn name(&self) -> &'static str;

    /// Reads the state once. `now` is the current time, for sources that
    /// keep time-dependent state (ptp4l holdover).
    fn read(&mut self, now: NtpTimestamp) -> Result<UpstreamState, UpstreamError>;
}

/// What [`next_snapshot`] needs from the configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HoldoverPolicy {
    /// Longest a lost upstream's last good state is served, seconds.
    pub max_unsync_secs: f64,
    /// Largest root distance (delay / 2 + dispersion) served as
    /// synchronized, seconds.
    pub max_root_distance: f64,
    /// Serve the local clock at this stratum instead of going
    /// unsynchronized (isolated networks only).
    pub local_stratum: Option<u8>,
    /// log2 of the system clock's precision.
    pub precision: i8,
}

impl HoldoverPolicy {
    /// The defaults of `[upstream]`: 900 s, 1.5 s, no local stratum.
    pub const fn new(precision: i8) -> Self {
        Self { max_unsync_secs: 900.0, max_root_distance: 1.5, local_stratum: None, precision }
    }
}

/// Which rule produced the served snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// The upstream is synchronized and close enough.
    Synchronized,
    /// The upstream is lost; its last good state is served, degrading.
    Holdover,
    /// The upstream is lost for good; the undisciplined local clock is
    /// served at `local_stratum`.
    LocalFallback,
    /// Nothing worth serving: leap 3 / stratum 16 (or silence).
    Unsynchronized,
}

impl Phase {
    /// Lower-case name, for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Synchronized => "synchronized",
            Self::Holdover => "holdover",
            Self::LocalFallback => "local",
            Self::Unsynchronized => "unsynchronized",
        }
    }
}

/// The state carried from one reading to the next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Track {
    /// The snapshot to publish.
    pub snapshot: ClockSnapshot,
    /// The rule that produced it.
    pub phase: Phase,
    /// The last synchronized snapshot, as taken (its dispersion at its
    /// `updated_at`).
    pub last_good: Option<ClockSnapshot>,
    /// Whether the latest reading was good (synchronized, within the root
    /// distance).
    pub up: bool,
    /// The upstream's offset from the latest successful reading.
    pub offset: Option<f64>,
}

impl Track {
    /// Before anything was read: unsynchronized.
    pub const fn initial(precision: i8) -> Self {
        Self {
            snapshot: ClockSnapshot::unsynchronized(precision),
            phase: Phase::Unsynchronized,
            last_good: None,
            up: false,
            offset: None,
        }
    }

    /// When the upstream was last good.
    pub fn last_success(&self) -> Option<NtpTimestamp> {
        self.last_good.map(|g| g.updated_at)
    }
}

/// A reference ID as text: four printable characters (NULs dropped) at
/// stratum 0/1 style, else a dotted quad.
pub fn refid_text(id: RefId) -> String {
    if id.0[0].is_ascii_uppercase() && id.0.iter().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == 0) {
        id.0.iter().filter(|b| **b != 0).map(|b| char::from(*b)).collect()
    } else {
        let [a, b, c, d] = id.0;
        format!("{a}.{b}.{c}.{d}")
    }
}

/// Root distance of a snapshot: `root_delay / 2 + root_dispersion`.
pub fn root_distance(s: &ClockSnapshot) -> f64 {
    s.root_delay / 2.0 + s.root_dispersion
}

/// The next state given the previous one and a reading (`None`: the read
/// failed). Pure; see the module documentation for the rules.
pub fn next_snapshot(prev: &Track, reading: Option<&UpstreamState>, now: NtpTimestamp, p: &HoldoverPolicy) -> Track {
    let offset = reading.and_then(|r| r.offset).or(if reading.is_some() { None } else { prev.offset });
    let good = reading.filter(|r| r.synchronized).map(|r| ClockSnapshot {
        synchronized: true,
        leap: if r.leap == LeapIndicator::Unsynchronized { LeapIndicator::NoWarning } else { r.leap },
        stratum: r.stratum.clamp(1, STRATUM_UNSYNCHRONIZED - 1),
        reference_id: r.reference_id,
        reference_time: r.reference_time.unwrap_or(now),
        root_delay: r.root_delay.clamp(0.0, MAX_DISPERSION),
        root_dispersion: r.root_dispersion.clamp(0.0, MAX_DISPERSION),
        precision: p.precision,
        updated_at: now,
        smear: None,
    });
    if let Some(snap) = good.filter(|s| root_distance(s) <= p.max_root_distance) {
        return Track { snapshot: snap, phase: Phase::Synchronized, last_good: Some(snap), up: true, offset };
    }

    let lost = |snapshot, phase| Track { snapshot, phase, last_good: prev.last_good, up: false, offset };
    if let Some(g) = prev.last_good {
        let held = ClockSnapshot {
            root_dispersion: g.root_dispersion_at(now).min(MAX_DISPERSION),
            updated_at: now,
            precision: p.precision,
            ..g
        };
        let elapsed = now.diff_secs(g.updated_at).max(0.0);
        if elapsed <= p.max_unsync_secs && root_distance(&held) <= p.max_root_distance {
            return lost(held, Phase::Holdover);
        }
    }
    if let Some(stratum) = p.local_stratum {
        let leap = reading.map_or(LeapIndicator::NoWarning, |r| r.leap);
        let snap = ClockSnapshot {
            synchronized: true,
            leap: if leap == LeapIndicator::Unsynchronized { LeapIndicator::NoWarning } else { leap },
            stratum: stratum.clamp(1, STRATUM_UNSYNCHRONIZED - 1),
            reference_id: RefId::LOCAL,
            reference_time: now,
            root_delay: 0.0,
            root_dispersion: 2f64.powi(i32::from(p.precision)),
            precision: p.precision,
            updated_at: now,
            smear: None,
        };
        return lost(snap, Phase::LocalFallback);
    }
    let snap = ClockSnapshot {
        reference_time: prev.last_good.map_or(NtpTimestamp::ZERO, |g| g.reference_time),
        updated_at: now,
        ..ClockSnapshot::unsynchronized(p.precision)
    };
    lost(snap, Phase::Unsynchronized)
}

/// Creates the configured source.
pub fn open(cfg: &SourceConfig) -> Result<Box<dyn UpstreamSource>, UpstreamError> {
    Ok(match cfg {
        SourceConfig::Kernel { stratum, reference_id } => Box::new(KernelSource::new(*stratum, *reference_id)),
        SourceConfig::Chrony { address } => Box::new(ChronySource::new(*address)?),
        SourceConfig::Ptp4l { socket, domain } => Box::new(Ptp4lSource::new(socket, *domain)?),
    })
}

/// Which source to read, with its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceConfig {
    /// `adjtimex`, served at a configured stratum and reference ID.
    Kernel {
        /// Stratum while synchronized.
        stratum: u8,
        /// Reference ID while synchronized.
        reference_id: RefId,
    },
    /// An NTP query to the local chronyd.
    Chrony {
        /// chronyd's NTP address.
        address: std::net::SocketAddr,
    },
    /// ptp4l's management socket.
    Ptp4l {
        /// Its Unix socket.
        socket: std::path::PathBuf,
        /// Its PTP domain.
        domain: u8,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: f64) -> NtpTimestamp {
        NtpTimestamp::from_unix(1_700_000_000, 0).add_secs(s)
    }

    fn synced(disp: f64) -> UpstreamState {
        UpstreamState {
            synchronized: true,
            leap: LeapIndicator::InsertSecond,
            stratum: 3,
            reference_id: RefId([192, 0, 2, 7]),
            root_delay: 0.010,
            root_dispersion: disp,
            reference_time: Some(t(-10.0)),
            offset: Some(1e-6),
        }
    }

    fn policy() -> HoldoverPolicy {
        HoldoverPolicy { max_unsync_secs: 100.0, max_root_distance: 0.5, local_stratum: None, precision: -20 }
    }

    #[test]
    fn timeline_sync_holdover_unsync_resync() {
        let p = policy();
        let mut tr = Track::initial(-20);
        tr = next_snapshot(&tr, Some(&synced(0.001)), t(0.0), &p);
        assert_eq!(tr.phase, Phase::Synchronized);
        assert!(tr.up);
        let s = tr.snapshot;
        assert!(s.synchronized);
        assert_eq!((s.stratum, s.leap, s.reference_id), (3, LeapIndicator::InsertSecond, RefId([192, 0, 2, 7])));
        assert_eq!(s.reference_time, t(-10.0));
        assert_eq!((s.root_delay, s.root_dispersion, s.updated_at), (0.010, 0.001, t(0.0)));

        // Read fails: the last good state, dispersion grown by PHI.
        tr = next_snapshot(&tr, None, t(10.0), &p);
        assert_eq!(tr.phase, Phase::Holdover);
        assert!(!tr.up);
        assert!(tr.snapshot.synchronized);
        assert_eq!(tr.snapshot.leap, LeapIndicator::InsertSecond);
        assert!((tr.snapshot.root_dispersion - (0.001 + 15e-6 * 10.0)).abs() < 1e-12);
        assert_eq!(tr.snapshot.updated_at, t(10.0));
        assert_eq!(tr.snapshot.reference_time, t(-10.0));
        assert_eq!(tr.last_success(), Some(t(0.0)));

        // Source reachable but unsynchronized: the same.
        tr = next_snapshot(&tr, Some(&UpstreamState::unsynchronized()), t(100.0), &p);
        assert_eq!(tr.phase, Phase::Holdover);
        assert!((tr.snapshot.root_dispersion - (0.001 + 15e-6 * 100.0)).abs() < 1e-12);

        // Past max_unsync_secs: unsynchronized, reference time kept.
        tr = next_snapshot(&tr, None, t(100.5), &p);
        assert_eq!(tr.phase, Phase::Unsynchronized);
        assert!(!tr.snapshot.synchronized);
        assert_eq!(tr.snapshot.stratum, STRATUM_UNSYNCHRONIZED);
        assert_eq!(tr.snapshot.reference_time, t(-10.0));
        assert_eq!(tr.snapshot.updated_at, t(100.5));
        tr = next_snapshot(&tr, None, t(5000.0), &p);
        assert_eq!(tr.phase, Phase::Unsynchronized);

        // Back: synchronized at once.
        tr = next_snapshot(&tr, Some(&synced(0.002)), t(5001.0), &p);
        assert_eq!(tr.phase, Phase::Synchronized);
        assert_eq!(tr.snapshot.root_dispersion, 0.002);
        assert_eq!(tr.last_success(), Some(t(5001.0)));
    }

    #[test]
    fn root_distance_ends_holdover_early_and_rejects_bad_readings() {
        let p = HoldoverPolicy { max_unsync_secs: 1e9, ..policy() };
        let mut tr = next_snapshot(&Track::initial(-20), Some(&synced(0.4)), t(0.0), &p);
        assert_eq!(tr.phase, Phase::Synchronized);
        // 0.005 + 0.4 + 15e-6 * t > 0.5 after ~6333 s.
        tr = next_snapshot(&tr, None, t(6000.0), &p);
        assert_eq!(tr.phase, Phase::Holdover);
        tr = next_snapshot(&tr, None, t(6400.0), &p);
        assert_eq!(tr.phase, Phase::Unsynchronized);
        // A synchronized reading that is too far is not good either.
        let far = next_snapshot(&Track::initial(-20), Some(&synced(0.6)), t(0.0), &p);
        assert_eq!(far.phase, Phase::Unsynchronized);
        assert!(!far.up);
        assert_eq!(far.last_good, None);
    }

    #[test]
    fn never_synchronized_and_local_fallback() {
        let p = policy();
        let tr = next_snapshot(&Track::initial(-20), None, t(0.0), &p);
        assert_eq!(tr.phase, Phase::Unsynchronized);
        assert_eq!(tr.snapshot.reference_time, NtpTimestamp::ZERO);
        let p = HoldoverPolicy { local_stratum: Some(10), ..policy() };
        let tr = next_snapshot(&Track::initial(-20), Some(&UpstreamState::unsynchronized()), t(0.0), &p);
        assert_eq!(tr.phase, Phase::LocalFallback);
        assert!(tr.snapshot.synchronized);
        assert_eq!((tr.snapshot.stratum, tr.snapshot.reference_id), (10, RefId::LOCAL));
        assert!((tr.snapshot.root_dispersion - 2f64.powi(-20)).abs() < 1e-15);
        assert_eq!(tr.last_good, None, "the local clock is not a synchronization");
        // Holdover first, local clock after it.
        let tr = next_snapshot(&Track::initial(-20), Some(&synced(0.001)), t(0.0), &p);
        let tr = next_snapshot(&tr, None, t(50.0), &p);
        assert_eq!(tr.phase, Phase::Holdover);
        let tr = next_snapshot(&tr, None, t(150.0), &p);
        assert_eq!(tr.phase, Phase::LocalFallback);
    }

    #[test]
    fn values_are_clamped() {
        let p = HoldoverPolicy { max_root_distance: 100.0, ..policy() };
        let r = UpstreamState { stratum: 0, root_dispersion: 40.0, ..synced(0.0) };
        let tr = next_snapshot(&Track::initial(-20), Some(&r), t(0.0), &p);
        assert_eq!(tr.snapshot.stratum, 1);
        assert_eq!(tr.snapshot.root_dispersion, MAX_DISPERSION);
        let r = UpstreamState { stratum: 200, leap: LeapIndicator::Unsynchronized, ..synced(0.0) };
        let tr = next_snapshot(&Track::initial(-20), Some(&r), t(0.0), &p);
        assert_eq!((tr.snapshot.stratum, tr.snapshot.leap), (15, LeapIndicator::NoWarning));
    }

    #[test]
    fn clock_stepping_back_does_not_shrink_dispersion() {
        let p = policy();
        let tr = next_snapshot(&Track::initial(-20), Some(&synced(0.001)), t(0.0), &p);
        let tr = next_snapshot(&tr, None, t(-30.0), &p);
        assert_eq!(tr.phase, Phase::Holdover);
        assert_eq!(tr.snapshot.root_dispersion, 0.001);
    }
}
