//! Leap seconds in chimed: the `[leap]` file loaded at start, and the hook
//! the control thread calls on every snapshot it publishes
//! ([`apply_leap`]), which sets the leap indicator (and, with smearing on,
//! the smear plan) from the file and the upstream's flag.
//!
//! The decisions are [`chime_proto::leap`]'s; this module adds the I/O,
//! logging each [`LeapNote`] once when it appears, and the values the
//! metrics endpoint shows.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use chime_proto::leap::{
    LeapFileError, LeapNote, LeapTable, SECS_PER_DAY, SmearPlan, leap_from_indicator, leap_indicator,
};
use chime_proto::packet::LeapIndicator;
use chime_proto::{ClockSnapshot, NtpTimestamp};
use tracing::{info, warn};

use crate::config::LeapSection;

/// Resolves NTP eras of `now` (valid for ±68 years around 2026).
const PIVOT_UNIX: i64 = 1_767_225_600;

/// "None" in the atomics below.
const NONE: i64 = i64::MIN;

/// Why the leap-second file could not be loaded (chimed refuses to start).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeapLoadError {
    /// The file cannot be read.
    #[error("cannot read leap-second file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file does not parse or its hash does not match.
    #[error("leap-second file {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: LeapFileError,
    },
}

/// Loads and checks a `leap-seconds.list` file.
pub fn load_leap_file(path: &Path) -> Result<LeapTable, LeapLoadError> {
    let text = fs::read_to_string(path).map_err(|source| LeapLoadError::Read { path: path.to_owned(), source })?;
    LeapTable::parse(&text).map_err(|source| LeapLoadError::Parse { path: path.to_owned(), source })
}

/// The leap-second state the control thread consults: the file's table,
/// the smear setting, and what was logged already.
#[derive(Debug)]
pub struct LeapService {
    table: Option<LeapTable>,
    smear_window: Option<u32>,
    state: Mutex<State>,
    /// Unix time of the next known leap second, or [`NONE`].
    next_event: AtomicI64,
}

#[derive(Debug, Default)]
struct State {
    last_note: Option<LeapNote>,
    smear: Option<SmearPlan>,
}

impl LeapService {
    /// A service over an already parsed table; `smear_window` is `Some`
    /// when smearing is on.
    pub fn new(table: Option<LeapTable>, smear_window: Option<u32>) -> Self {
        Self { table, smear_window, state: Mutex::new(State::default()), next_event: AtomicI64::new(NONE) }
    }

    /// From the `[leap]` section: loads the file (an error names it), warns
    /// when it has already expired at `now_unix` (it is then ignored) and
    /// when smearing is on.
    pub fn from_config(cfg: &LeapSection, now_unix: i64) -> Result<Self, LeapLoadError> {
        let table = if cfg.file.as_os_str().is_empty() {
            None
        } else {
            let table = load_leap_file(&cfg.file)?;
            let file = cfg.file.display();
            if table.is_expired(now_unix) {
                warn!(
                    %file,
                    expired_at = table.expires_unix(),
                    "the leap-second file has expired and is ignored until a current one is installed; leap \
                     warnings come from the upstream only"
                );
            } else {
                info!(%file, entries = table.entries.len(), expires_at = table.expires_unix(), "leap-second file loaded");
            }
            Some(table)
        };
        let smear_window = cfg.smear.then_some(cfg.smear_window);
        if let Some(window) = smear_window {
            warn!(
                window,
                "leap smearing is on: around a leap second the served time differs from UTC by up to 0.5 s and no \
                 leap warning is sent; not suitable for a public pool server"
            );
        }
        let service = Self::new(table, smear_window);
        if let Some(t) = service.table.as_ref().filter(|t| t.is_expired(now_unix)) {
            // Warned just above; the control thread need not repeat it.
            service.state.lock().unwrap_or_else(|e| e.into_inner()).last_note =
                Some(LeapNote::FileExpired { expired_at: t.expires_unix() });
        }
        Ok(service)
    }

    /// The file's expiry, Unix seconds, if a file is loaded.
    pub fn file_expiry(&self) -> Option<i64> {
        self.table.as_ref().map(LeapTable::expires_unix)
    }

    /// The next leap second known at the last [`Self::apply`], Unix
    /// seconds.
    pub fn next_event(&self) -> Option<i64> {
        Some(self.next_event.load(Ordering::Relaxed)).filter(|&t| t != NONE)
    }

    /// Sets `snapshot.leap` (from the upstream's flag in it, and the file)
    /// and `snapshot.smear` for Unix time `now`.
    pub fn apply(&self, snapshot: &mut ClockSnapshot, now: i64) {
        let valid = self.table.as_ref().filter(|t| !t.is_expired(now));
        let decision = leap_indicator(now, self.table.as_ref(), snapshot.leap);
        let next = match valid {
            Some(t) => t.next_leap_after(now),
            None => leap_from_indicator(now, decision.indicator),
        };
        self.next_event.store(next.map_or(NONE, |l| l.at), Ordering::Relaxed);

        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if decision.note != state.last_note {
            if let Some(note) = decision.note {
                warn!("{note}");
            }
            state.last_note = decision.note;
        }
        let Some(window) = self.smear_window else {
            snapshot.leap = decision.indicator;
            return;
        };
        // Smearing: never announce; publish the plan from a day before the
        // smear starts until it ends. An upstream-announced leap is
        // remembered, as the upstream's flag clears at the leap, mid-smear.
        let half = (i64::from(window) + 1) / 2;
        let candidate = match valid {
            Some(t) => t.leaps().find(|l| l.at + half > now),
            None => leap_from_indicator(now, decision.indicator),
        };
        if let Some(leap) = candidate.filter(|l| now >= l.at - half - SECS_PER_DAY)
            && state.smear.map(|p| p.leap) != Some(leap)
        {
            info!(leap_at = leap.at, step = leap.step, window, "leap smear planned");
            state.smear = Some(SmearPlan::new(leap, window));
        }
        if state.smear.is_some_and(|p: SmearPlan| now >= p.leap.at + half) {
            state.smear = None;
        }
        snapshot.leap = LeapIndicator::NoWarning;
        snapshot.smear = state.smear;
    }
}

/// The control thread's hook: applies `leap` (when chimed has one) to the
/// snapshot about to be published at `now`.
pub fn apply_leap(snapshot: &mut ClockSnapshot, now: NtpTimestamp, leap: Option<&LeapService>) {
    if let Some(leap) = leap {
        let now = now.to_unix_nanos(PIVOT_UNIX).div_euclid(1_000_000_000) as i64;
        leap.apply(snapshot, now);
    }
}

#[cfg(test)]
mod tests {
    use chime_proto::leap::Leap;

    use super::*;

    /// 2027-01-01 00:00:00 UTC.
    const L: i64 = 1_798_761_600;

    fn synced(leap: LeapIndicator) -> ClockSnapshot {
        ClockSnapshot { synchronized: true, leap, stratum: 1, ..ClockSnapshot::unsynchronized(-20) }
    }

    fn at(now: i64, service: &LeapService, upstream: LeapIndicator) -> ClockSnapshot {
        let mut snap = synced(upstream);
        apply_leap(&mut snap, NtpTimestamp::from_unix(now, 0), Some(service));
        snap
    }

    #[test]
    fn no_service_leaves_the_snapshot_alone() {
        let mut snap = synced(LeapIndicator::InsertSecond);
        apply_leap(&mut snap, NtpTimestamp::from_unix(L - 10, 0), None);
        assert_eq!(snap, synced(LeapIndicator::InsertSecond));
    }

    #[test]
    fn upstream_only_announces_on_the_last_day() {
        let s = LeapService::new(None, None);
        assert_eq!(at(L - 10, &s, LeapIndicator::InsertSecond).leap, LeapIndicator::InsertSecond);
        assert_eq!(s.next_event(), Some(L));
        assert_eq!(at(L - 2 * SECS_PER_DAY, &s, LeapIndicator::InsertSecond).leap, LeapIndicator::NoWarning);
        assert_eq!(s.file_expiry(), None);
    }

    #[test]
    fn smear_from_the_upstream_outlives_its_flag() {
        let s = LeapService::new(None, Some(86_400));
        let before = at(L - 3600, &s, LeapIndicator::InsertSecond);
        assert_eq!(before.leap, LeapIndicator::NoWarning, "never announced while smearing");
        let plan = before.smear.expect("smear planned");
        assert_eq!(plan.leap, Leap { at: L, step: 1 });
        // After midnight the upstream's flag is gone; the smear goes on.
        let after = at(L + 3600, &s, LeapIndicator::NoWarning);
        assert_eq!(after.smear, Some(plan));
        assert!(after.served_time(NtpTimestamp::from_unix(L + 3600, 0)) > NtpTimestamp::from_unix(L + 3600, 0));
        // And ends.
        assert_eq!(at(L + 43_200, &s, LeapIndicator::NoWarning).smear, None);
    }

    #[test]
    fn load_errors_name_the_file() {
        let e = load_leap_file(Path::new("/nonexistent/leap-seconds.list")).unwrap_err();
        assert!(e.to_string().starts_with("cannot read leap-second file /nonexistent/leap-seconds.list: "), "{e}");
        let dir = std::env::temp_dir().join(format!("chime-leap-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("leap-seconds.list");
        let real = include_str!("../../proto/tests/data/leap-seconds.list");
        fs::write(&path, real.replacen("3692217600      37", "3692217600      38", 1)).unwrap();
        let e = load_leap_file(&path).unwrap_err();
        assert!(e.to_string().contains("leap-seconds.list: hash mismatch"), "{e}");
        fs::write(&path, real).unwrap();
        let cfg = LeapSection { file: path.clone(), ..LeapSection::default() };
        let s = LeapService::from_config(&cfg, 0).expect("the real file loads");
        assert_eq!(s.file_expiry(), Some(1_782_604_800));
        // The file decides while valid: no leap in 2016-12-30, one on the 31st.
        assert_eq!(at(1_483_142_400 - 10, &s, LeapIndicator::InsertSecond).leap, LeapIndicator::NoWarning);
        assert_eq!(at(1_483_142_400, &s, LeapIndicator::NoWarning).leap, LeapIndicator::InsertSecond);
        assert_eq!(s.next_event(), Some(1_483_228_800));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_show_expiry_and_next_event() {
        use std::sync::Arc;

        use arc_swap::ArcSwap;
        use chime_proto::acl::Acl;

        use crate::control::ClockStatus;
        use crate::shared::Shared;

        let sample = |text: &str, name: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).expect(name);
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let status = || Arc::new(ArcSwap::from_pointee(ClockStatus::unknown(-20)));
        let shared = Arc::new(Shared::new(ClockSnapshot::unsynchronized(-20), Acl::default(), Vec::new()));
        let text = crate::metrics::render(Arc::clone(&shared), status()).unwrap();
        assert!(sample(&text, "chime_leap_file_expiry_seconds").is_nan());
        assert!(sample(&text, "chime_leap_next_event_seconds").is_nan());

        let table = LeapTable::parse(include_str!("../../proto/tests/data/leap-seconds.list")).unwrap();
        let service = LeapService::new(Some(table), None);
        at(1_483_142_400, &service, LeapIndicator::NoWarning);
        shared.leap.set(service).unwrap();
        let text = crate::metrics::render(shared, status()).unwrap();
        assert_eq!(sample(&text, "chime_leap_file_expiry_seconds"), 1_782_604_800.0);
        assert_eq!(sample(&text, "chime_leap_next_event_seconds"), 1_483_228_800.0);
    }
}
