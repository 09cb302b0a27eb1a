//! The control thread: turns the kernel's view of the system clock into the
//! [`ClockSnapshot`] every worker serves, and keeps a richer
//! [`ClockStatus`] for the metrics endpoint.
//!
//! Whatever disciplines the system clock (chronyd, ntpd, phc2sys) reports
//! its state to the kernel; chimed reads it with `adjtimex(2)` (read-only)
//! every `update_interval`. Reading chronyd and ptp4l directly, for root
//! delay and a tighter dispersion, comes later.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use chime_proto::clock::{MAX_DISPERSION, STRATUM_UNSYNCHRONIZED};
use chime_proto::packet::{LeapIndicator, RefId};
use chime_proto::{ClockSnapshot, NtpTimestamp};
use tracing::{error, info, warn};

use crate::nts::NtsKeys;
use crate::shared::Shared;
use crate::sys::adjtime::{KernelClock, read_kernel_clock};
use crate::time::now_ntp;

/// Longest the control thread sleeps before looking at the shutdown flag.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// What the control thread needs from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlConfig {
    /// Stratum announced while the kernel clock is synchronized (clamped to
    /// 1..=15).
    pub stratum: u8,
    /// Reference ID announced while the kernel clock is synchronized.
    pub reference_id: RefId,
    /// If set, serve the undisciplined local clock at this stratum (clamped
    /// to 1..=15) while the kernel clock is unsynchronized, instead of
    /// announcing "unsynchronized". For isolated networks only.
    pub local_stratum: Option<u8>,
    /// How often the kernel state is read and a snapshot published.
    pub update_interval: Duration,
}

/// The control thread's latest picture, for the metrics endpoint (read
/// when scraped, never on the packet path).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClockStatus {
    /// The last kernel reading, `None` if `adjtimex` failed.
    pub kernel: Option<KernelClock>,
    /// The snapshot published from it.
    pub snapshot: ClockSnapshot,
    /// Whether the snapshot is the `local_stratum` fallback (kernel
    /// unsynchronized, own clock served as synchronized).
    pub local_fallback: bool,
    /// When it was taken.
    pub taken_at: NtpTimestamp,
}

impl ClockStatus {
    /// The status before anything has been read.
    pub const fn unknown(precision: i8) -> Self {
        Self {
            kernel: None,
            snapshot: ClockSnapshot::unsynchronized(precision),
            local_fallback: false,
            taken_at: NtpTimestamp::ZERO,
        }
    }
}

/// Where the control thread publishes its [`ClockStatus`].
pub type SharedClockStatus = Arc<ArcSwap<ClockStatus>>;

/// The running control thread.
#[derive(Debug)]
pub struct ControlHandle {
    thread: JoinHandle<()>,
    status: SharedClockStatus,
}

impl ControlHandle {
    /// The status cell the thread keeps up to date (for
    /// [`crate::metrics::serve`]).
    pub fn status(&self) -> SharedClockStatus {
        Arc::clone(&self.status)
    }

    /// Waits for the thread to finish (after `shared.shutdown` is set).
    pub fn join(self) -> thread::Result<()> {
        self.thread.join()
    }

    /// The thread's handle.
    pub fn into_thread(self) -> JoinHandle<()> {
        self.thread
    }
}

/// log2 of the system clock's precision: the smallest nonzero step seen
/// between consecutive readings of `CLOCK_REALTIME`, which is its
/// resolution or the cost of reading it, whichever is larger. Rounded up (a
/// server must not claim to be better than it is) and clamped to
/// `[-30, 0]`. Takes at most a few milliseconds.
pub fn measure_precision() -> i8 {
    const READINGS: u32 = 20_000;
    const BUDGET: Duration = Duration::from_millis(20);

    let start = Instant::now();
    let mut best = u128::MAX;
    let mut prev = unix_nanos();
    for i in 0..READINGS {
        let now = unix_nanos();
        if now > prev {
            best = best.min(now - prev);
        }
        prev = now;
        if i % 256 == 255 && start.elapsed() > BUDGET {
            break;
        }
    }
    if best == u128::MAX {
        // The clock never moved: coarser than the whole measurement.
        return 0;
    }
    precision_from_step(best as f64 * 1e-9)
}

fn unix_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// `ceil(log2(step))`, clamped to `[-30, 0]`.
fn precision_from_step(step_secs: f64) -> i8 {
    if step_secs.is_nan() || step_secs <= 0.0 {
        return -30;
    }
    step_secs.log2().ceil().clamp(-30.0, 0.0) as i8
}

/// The snapshot to serve given one kernel reading.
///
/// - Kernel synchronized: synchronized at the configured stratum and
///   reference ID, leap from the kernel, root dispersion = the kernel's
///   `maxerror` (the discipline daemon's bound on the error, which the
///   kernel grows by 500 ppm/s between its updates), root delay 0 (the
///   kernel does not know it; reading chronyd/ptp4l for it comes later),
///   reference time = `now`, remembered in `last_sync`.
/// - Kernel unsynchronized with `local_stratum = Some(n)`: synchronized at
///   stratum `n`, [`RefId::LOCAL`], root dispersion = the clock precision,
///   reference time = `now`.
/// - Otherwise unsynchronized (stratum 16); its reference time is the last
///   time the kernel was seen synchronized, or zero.
///
/// `updated_at` is `now` in every case.
pub fn snapshot_from_kernel(
    k: &KernelClock,
    cfg: &ControlConfig,
    now: NtpTimestamp,
    precision: i8,
    last_sync: &mut Option<NtpTimestamp>,
) -> ClockSnapshot {
    if k.synchronized() {
        *last_sync = Some(now);
        ClockSnapshot {
            synchronized: true,
            leap: k.leap(),
            stratum: cfg.stratum.clamp(1, STRATUM_UNSYNCHRONIZED - 1),
            reference_id: cfg.reference_id,
            reference_time: now,
            root_delay: 0.0,
            root_dispersion: k.maxerror_secs().clamp(0.0, MAX_DISPERSION),
            precision,
            updated_at: now,
            smear: None,
        }
    } else if let Some(stratum) = cfg.local_stratum {
        ClockSnapshot {
            synchronized: true,
            leap: k.leap(),
            stratum: stratum.clamp(1, STRATUM_UNSYNCHRONIZED - 1),
            reference_id: RefId::LOCAL,
            reference_time: now,
            root_delay: 0.0,
            root_dispersion: 2f64.powi(i32::from(precision)),
            precision,
            updated_at: now,
            smear: None,
        }
    } else {
        unsynchronized_at(now, precision, *last_sync)
    }
}

fn unsynchronized_at(now: NtpTimestamp, precision: i8, last_sync: Option<NtpTimestamp>) -> ClockSnapshot {
    ClockSnapshot {
        reference_time: last_sync.unwrap_or(NtpTimestamp::ZERO),
        updated_at: now,
        ..ClockSnapshot::unsynchronized(precision)
    }
}

/// Starts the control thread (`chime-control`).
///
/// The first snapshot is read and published into `shared.clock` before
/// this returns, so workers never serve the placeholder `Shared` started
/// with. The thread then refreshes it every `cfg.update_interval` until
/// `shared.shutdown` is set, noticing that within about 100 ms.
pub fn spawn(cfg: ControlConfig, shared: Arc<Shared>) -> io::Result<ControlHandle> {
    spawn_with_nts(cfg, shared, None)
}

/// [`spawn`], also owning the NTS master keys: each tick rotates them when
/// due (see [`crate::nts`]).
pub fn spawn_with_nts(cfg: ControlConfig, shared: Arc<Shared>, nts: Option<NtsKeys>) -> io::Result<ControlHandle> {
    let precision = measure_precision();
    if let Some(stratum) = cfg.local_stratum {
        warn!(
            local_stratum = stratum,
            "local_stratum is set: whenever the kernel clock is unsynchronized, chimed will serve this machine's \
             own undisciplined clock as synchronized at stratum {stratum}, and clients will follow it wherever it \
             drifts; use this only on an isolated network, never for the public pool"
        );
    }
    info!(precision, stratum = cfg.stratum, reference_id = ?cfg.reference_id, "control thread starting");

    let mut control = Control::new(cfg, precision);
    control.nts = nts;
    let status = Arc::new(ArcSwap::from_pointee(ClockStatus::unknown(precision)));
    control.tick(&shared, &status);

    let thread = {
        let status = Arc::clone(&status);
        thread::Builder::new().name("chime-control".into()).spawn(move || control.run(&shared, &status))?
    };
    Ok(ControlHandle { thread, status })
}

/// The control loop's state between readings.
struct Control {
    cfg: ControlConfig,
    precision: i8,
    last_sync: Option<NtpTimestamp>,
    /// What was published last, for logging transitions only.
    last: Option<(bool, LeapIndicator, bool)>,
    read_failing: bool,
    nts: Option<NtsKeys>,
    nts_failing: bool,
}

impl Control {
    fn new(cfg: ControlConfig, precision: i8) -> Self {
        Self { cfg, precision, last_sync: None, last: None, read_failing: false, nts: None, nts_failing: false }
    }

    fn run(mut self, shared: &Shared, status: &ArcSwap<ClockStatus>) {
        let mut next = Instant::now() + self.cfg.update_interval;
        while !shared.shutdown.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next {
                thread::sleep((next - now).min(SHUTDOWN_POLL));
                continue;
            }
            self.tick(shared, status);
            // Keep the cadence, but do not try to catch up after a stall.
            next = (next + self.cfg.update_interval).max(Instant::now());
        }
        info!("control thread stopped");
    }

    /// Reads the kernel once and publishes the result.
    fn tick(&mut self, shared: &Shared, status: &ArcSwap<ClockStatus>) {
        let reading = read_kernel_clock();
        let now = now_ntp();
        let (kernel, mut snapshot, local_fallback) = match reading {
            Ok(k) => {
                if self.read_failing {
                    info!("reading the kernel clock state works again");
                    self.read_failing = false;
                }
                let snap = snapshot_from_kernel(&k, &self.cfg, now, self.precision, &mut self.last_sync);
                (Some(k), snap, !k.synchronized() && snap.synchronized)
            }
            Err(e) => {
                if !self.read_failing {
                    error!(error = %e, "cannot read the kernel clock state (adjtimex); serving as unsynchronized");
                    self.read_failing = true;
                }
                (None, unsynchronized_at(now, self.precision, self.last_sync), false)
            }
        };
        crate::leap::apply_leap(&mut snapshot, now, shared.leap.get());
        self.log_transitions(kernel.as_ref(), &snapshot, local_fallback);
        if let Some(k) = &kernel {
            shared.tai_offset_s.store(k.tai_offset, Ordering::Relaxed);
        }
        shared.clock.store(Arc::new(snapshot));
        if let Some(keys) = &mut self.nts {
            match keys.tick(crate::nts::unix_now()) {
                Ok(_) => self.nts_failing = false,
                Err(e) if !self.nts_failing => {
                    error!("NTS keys: {e}");
                    self.nts_failing = true;
                }
                Err(_) => {}
            }
        }
        status.store(Arc::new(ClockStatus { kernel, snapshot, local_fallback, taken_at: now }));
    }

    fn log_transitions(&mut self, k: Option<&KernelClock>, snap: &ClockSnapshot, local_fallback: bool) {
        let current = (snap.synchronized, snap.leap, local_fallback);
        let previous = self.last.replace(current);
        if previous == Some(current) {
            return;
        }
        let (was_synced, was_leap, was_local) = match previous {
            Some(p) => (Some(p.0), p.1, Some(p.2)),
            None => (None, LeapIndicator::NoWarning, None),
        };
        let maxerror_s = k.map(KernelClock::maxerror_secs);
        let esterror_s = k.map(KernelClock::esterror_secs);
        let kernel_state = k.map(|k| k.state.name());
        if was_synced != Some(snap.synchronized) || was_local != Some(local_fallback) {
            if local_fallback {
                warn!(
                    stratum = snap.stratum,
                    ?kernel_state,
                    "kernel clock unsynchronized: serving the undisciplined local clock (local_stratum)"
                );
            } else if snap.synchronized {
                info!(
                    stratum = snap.stratum,
                    reference_id = ?snap.reference_id,
                    root_dispersion_s = snap.root_dispersion,
                    ?maxerror_s,
                    ?esterror_s,
                    offset_ns = k.map(|k| k.offset_ns),
                    freq_ppm = k.map(|k| k.freq_ppm),
                    "clock synchronized"
                );
            } else {
                warn!(?kernel_state, ?maxerror_s, "clock unsynchronized: replies announce stratum 16");
            }
        }
        if was_leap != snap.leap {
            match snap.leap {
                LeapIndicator::InsertSecond => warn!("leap second armed: inserting one at the end of this UTC day"),
                LeapIndicator::DeleteSecond => warn!("leap second armed: deleting one at the end of this UTC day"),
                _ => info!(?kernel_state, "leap second cleared"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::adjtime::{ClockState, STA_DEL, STA_INS, STA_NANO, STA_PLL, STA_UNSYNC};

    fn kernel(state: ClockState, status: i32, maxerror_us: i64) -> KernelClock {
        KernelClock {
            state,
            status,
            maxerror_us,
            esterror_us: 12,
            tai_offset: 37,
            offset_ns: 1500,
            freq_ppm: -3.25,
            precision_us: 1,
            constant: 2,
            time_secs: 1_700_000_000,
            time_nanos: 0,
        }
    }

    fn cfg(local_stratum: Option<u8>) -> ControlConfig {
        ControlConfig {
            stratum: 2,
            reference_id: RefId([192, 0, 2, 1]),
            local_stratum,
            update_interval: Duration::from_millis(50),
        }
    }

    fn t(secs: f64) -> NtpTimestamp {
        NtpTimestamp::from_unix(1_700_000_000, 0).add_secs(secs)
    }

    #[test]
    fn synchronized_kernel() {
        let k = kernel(ClockState::Ok, STA_PLL | STA_NANO, 2500);
        let mut last = None;
        let s = snapshot_from_kernel(&k, &cfg(None), t(0.0), -24, &mut last);
        assert!(s.synchronized);
        assert_eq!(s.stratum, 2);
        assert_eq!(s.reference_id, RefId([192, 0, 2, 1]));
        assert_eq!(s.leap, LeapIndicator::NoWarning);
        assert!((s.root_dispersion - 0.0025).abs() < 1e-12);
        assert_eq!(s.root_delay, 0.0);
        assert_eq!(s.precision, -24);
        assert_eq!(s.reference_time, t(0.0));
        assert_eq!(s.updated_at, t(0.0));
        assert_eq!(last, Some(t(0.0)));
    }

    #[test]
    fn unsynchronized_kernel() {
        let k = kernel(ClockState::Error, STA_UNSYNC, 16_000_000);
        let mut last = None;
        let s = snapshot_from_kernel(&k, &cfg(None), t(5.0), -24, &mut last);
        assert!(!s.synchronized);
        assert_eq!(s.stratum, STRATUM_UNSYNCHRONIZED);
        assert_eq!(s.reference_time, NtpTimestamp::ZERO);
        assert_eq!(s.updated_at, t(5.0));
        assert_eq!(s.root_dispersion, MAX_DISPERSION);
        assert_eq!(last, None);
        // STA_UNSYNC alone is enough.
        let k = kernel(ClockState::Ok, STA_UNSYNC, 1000);
        assert!(!snapshot_from_kernel(&k, &cfg(None), t(5.0), -24, &mut last).synchronized);
    }

    #[test]
    fn local_stratum_fallback() {
        let k = kernel(ClockState::Error, STA_UNSYNC, 16_000_000);
        let mut last = None;
        let s = snapshot_from_kernel(&k, &cfg(Some(10)), t(7.0), -20, &mut last);
        assert!(s.synchronized);
        assert_eq!(s.stratum, 10);
        assert_eq!(s.reference_id, RefId::LOCAL);
        assert_eq!(s.reference_time, t(7.0));
        assert_eq!(s.updated_at, t(7.0));
        assert!((s.root_dispersion - 2f64.powi(-20)).abs() < 1e-15);
        assert_eq!(last, None, "the local clock is not a synchronization");
        // A synchronized kernel still wins over the fallback.
        let k = kernel(ClockState::Ok, 0, 100);
        let s = snapshot_from_kernel(&k, &cfg(Some(10)), t(8.0), -20, &mut last);
        assert_eq!((s.stratum, s.reference_id), (2, RefId([192, 0, 2, 1])));
    }

    #[test]
    fn leap_insert_and_delete() {
        let mut last = None;
        let k = kernel(ClockState::InsertLeap, STA_INS, 100);
        assert_eq!(snapshot_from_kernel(&k, &cfg(None), t(0.0), -24, &mut last).leap, LeapIndicator::InsertSecond);
        let k = kernel(ClockState::Ok, STA_INS, 100);
        assert_eq!(snapshot_from_kernel(&k, &cfg(None), t(0.0), -24, &mut last).leap, LeapIndicator::InsertSecond);
        let k = kernel(ClockState::DeleteLeap, STA_DEL, 100);
        assert_eq!(snapshot_from_kernel(&k, &cfg(None), t(0.0), -24, &mut last).leap, LeapIndicator::DeleteSecond);
        let k = kernel(ClockState::LeapOccurred, STA_INS, 100);
        assert_eq!(snapshot_from_kernel(&k, &cfg(None), t(0.0), -24, &mut last).leap, LeapIndicator::NoWarning);
    }

    #[test]
    fn reference_time_tracks_last_sync() {
        let synced = kernel(ClockState::Ok, 0, 100);
        let unsynced = kernel(ClockState::Error, STA_UNSYNC, 16_000_000);
        let mut last = None;
        snapshot_from_kernel(&synced, &cfg(None), t(0.0), -24, &mut last);
        let s = snapshot_from_kernel(&synced, &cfg(None), t(1.0), -24, &mut last);
        assert_eq!(s.reference_time, t(1.0));
        let s = snapshot_from_kernel(&unsynced, &cfg(None), t(2.0), -24, &mut last);
        assert_eq!(s.reference_time, t(1.0));
        assert_eq!(s.updated_at, t(2.0));
        let s = snapshot_from_kernel(&unsynced, &cfg(None), t(3.0), -24, &mut last);
        assert_eq!(s.reference_time, t(1.0));
        assert_eq!(last, Some(t(1.0)));
        let s = snapshot_from_kernel(&synced, &cfg(None), t(4.0), -24, &mut last);
        assert_eq!(s.reference_time, t(4.0));
    }

    #[test]
    fn dispersion_is_capped_and_strata_clamped() {
        let k = kernel(ClockState::Ok, 0, 40_000_000);
        let mut c = cfg(None);
        c.stratum = 0;
        let s = snapshot_from_kernel(&k, &c, t(0.0), -24, &mut None);
        assert_eq!(s.root_dispersion, MAX_DISPERSION);
        assert_eq!(s.stratum, 1);
        c.stratum = 200;
        assert_eq!(snapshot_from_kernel(&k, &c, t(0.0), -24, &mut None).stratum, 15);
    }

    #[test]
    fn precision() {
        assert_eq!(precision_from_step(1e-9), -29);
        assert_eq!(precision_from_step(30e-9), -24);
        assert_eq!(precision_from_step(2f64.powi(-25)), -25);
        assert_eq!(precision_from_step(1e-6), -19);
        assert_eq!(precision_from_step(1e-12), -30);
        assert_eq!(precision_from_step(3.0), 0);
        assert_eq!(precision_from_step(0.0), -30);
        let p = measure_precision();
        assert!((-30..=0).contains(&p), "{p}");
        // Any system this runs on reads its clock to better than 1 ms.
        assert!(p <= -10, "{p}");
    }

    #[test]
    fn spawn_publishes_first_and_stops() {
        let shared =
            Arc::new(Shared::new(ClockSnapshot::unsynchronized(0), chime_proto::acl::Acl::default(), Vec::new()));
        let before = now_ntp();
        let handle = spawn(cfg(None), Arc::clone(&shared)).unwrap();
        let first = **shared.clock.load();
        assert!(!first.updated_at.is_zero(), "published before spawn returned");
        assert!(first.updated_at.diff_secs(before) >= 0.0);
        assert!(first.precision < 0);
        let status = handle.status();
        assert_eq!(status.load().snapshot, first);
        assert!(status.load().kernel.is_some(), "adjtimex works here");

        // It keeps refreshing.
        let deadline = Instant::now() + Duration::from_secs(5);
        while shared.clock.load().updated_at == first.updated_at {
            assert!(Instant::now() < deadline, "no refresh within 5 s");
            thread::sleep(Duration::from_millis(10));
        }

        shared.shutdown.store(true, Ordering::Relaxed);
        let start = Instant::now();
        handle.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    }
}
