//! Mapping the NIC's clock (PHC) to system time (UTC), for hardware
//! receive and transmit stamps.
//!
//! A small thread (`chime-phc`) reads the interface's PHC against
//! CLOCK_REALTIME once per [`READ_INTERVAL`] ([`PhcClock`]; for a real
//! device `PTP_SYS_OFFSET_PRECISE`, else the narrowest window of
//! `PTP_SYS_OFFSET_EXTENDED`), fits offset and drift by least squares over
//! the last [`FIT_WINDOW`] readings ([`PhcTracker`]) and publishes an
//! immutable [`PhcMapping`] through `Shared::phc` (arc-swap). Workers load
//! it once per batch and take the offset at the batch's time
//! ([`PhcMapping::offset_at`]); a mapping older than [`MAX_AGE`] is not
//! used (hardware stamps then fall back to software ones), so a stuck PHC
//! thread never puts stale time into replies.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::shared::Shared;
use crate::sys::ptp::{self, CrossStamp, PtpDevice};

/// How often the PHC is read.
pub const READ_INTERVAL: Duration = Duration::from_secs(1);
/// Readings the fit uses.
pub const FIT_WINDOW: usize = 16;
/// A mapping older than this is not used.
pub const MAX_AGE: Duration = Duration::from_secs(10);
/// Readings whose offset is further than this from the fit are treated as a
/// clock step: the fit restarts from them.
pub const STEP_THRESHOLD_NS: f64 = 1_000_000.0;

/// Something that reads a PHC against the system clock.
pub trait PhcClock {
    /// One cross stamp.
    fn read(&mut self) -> io::Result<CrossStamp>;
}

impl PhcClock for PtpDevice {
    fn read(&mut self) -> io::Result<CrossStamp> {
        PtpDevice::read(self)
    }
}

/// UTC minus PHC time, as a line in system time: the offset at `ref_sys_ns`
/// and its rate of change.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PhcMapping {
    /// System (UTC) time of the reference point, ns since the Unix epoch.
    pub ref_sys_ns: i128,
    /// UTC − PHC at the reference point, ns.
    pub offset_ns: f64,
    /// d(offset)/d(system time), dimensionless (1e-9 = 1 ppb).
    pub drift: f64,
    /// Narrowest read window among the readings fitted, ns (0: hardware
    /// cross-timestamps).
    pub window_ns: i64,
    /// Readings in the fit.
    pub samples: usize,
}

impl PhcMapping {
    /// UTC − PHC at system time `sys_ns`, rounded to whole ns.
    pub fn offset_at(&self, sys_ns: i128) -> i64 {
        let dt = (sys_ns - self.ref_sys_ns) as f64;
        (self.offset_ns + self.drift * dt).round() as i64
    }

    /// A PHC stamp converted to UTC ns (using the offset at that time).
    pub fn to_utc_ns(&self, phc_ns: i128) -> i128 {
        // The offset is evaluated at the stamp's approximate system time.
        let approx_sys = phc_ns + self.offset_ns as i128;
        phc_ns + i128::from(self.offset_at(approx_sys))
    }

    /// Seconds since the reference point at system time `sys_ns`.
    pub fn age_secs(&self, sys_ns: i128) -> f64 {
        (sys_ns - self.ref_sys_ns) as f64 / 1e9
    }

    /// The offset to use at `sys_ns`, or `None` when the mapping is older
    /// than [`MAX_AGE`].
    pub fn fresh_offset(&self, sys_ns: i128) -> Option<i64> {
        (self.age_secs(sys_ns) <= MAX_AGE.as_secs_f64()).then(|| self.offset_at(sys_ns))
    }
}

/// Least-squares fit of offset and drift over recent readings.
#[derive(Debug, Default)]
pub struct PhcTracker {
    readings: VecDeque<CrossStamp>,
    /// Clock steps detected (fit restarted).
    pub steps: u64,
}

impl PhcTracker {
    /// A tracker with no readings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a reading and returns the new mapping.
    pub fn update(&mut self, r: CrossStamp) -> PhcMapping {
        if let Some(m) = self.fit() {
            let predicted = m.offset_at(r.sys_ns) as f64;
            let measured = (r.sys_ns - r.phc_ns) as f64;
            if (measured - predicted).abs() > STEP_THRESHOLD_NS + r.window_ns as f64 {
                self.readings.clear();
                self.steps += 1;
            }
        }
        if self.readings.len() == FIT_WINDOW {
            self.readings.pop_front();
        }
        self.readings.push_back(r);
        self.fit().expect("at least one reading")
    }

    fn fit(&self) -> Option<PhcMapping> {
        let last = self.readings.back()?;
        let n = self.readings.len();
        let t0 = last.sys_ns;
        let window_ns = self.readings.iter().map(|r| r.window_ns).min().unwrap_or(0);
        let pts = self.readings.iter().map(|r| ((r.sys_ns - t0) as f64, (r.sys_ns - r.phc_ns) as f64));
        let (mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0);
        for (x, y) in pts {
            sx += x;
            sy += y;
            sxx += x * x;
            sxy += x * y;
        }
        let nf = n as f64;
        let den = nf * sxx - sx * sx;
        let (offset_ns, drift) = if n < 2 || den.abs() < 1.0 {
            (sy / nf, 0.0)
        } else {
            let drift = (nf * sxy - sx * sy) / den;
            ((sy - drift * sx) / nf, drift)
        };
        Some(PhcMapping { ref_sys_ns: t0, offset_ns, drift, window_ns, samples: n })
    }
}

/// CLOCK_REALTIME now, ns since the Unix epoch.
pub fn sys_now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128)
}

/// The offset (UTC − PHC, ns) workers should use now, if a fresh mapping is
/// published.
pub fn current_offset(shared: &Shared) -> Option<i64> {
    shared.phc.load().as_ref().and_then(|m| m.fresh_offset(sys_now_ns()))
}

/// Finds the PHC of `interface` and starts the `chime-phc` thread that keeps
/// `shared.phc` up to date; `None` (logged) when the interface has none.
pub fn spawn_for_interface(interface: &str, shared: Arc<Shared>) -> Option<JoinHandle<()>> {
    if interface.is_empty() {
        return None;
    }
    let index = match ptp::ts_info(interface) {
        Ok(info) => match info.phc_index {
            Some(i) => i,
            None => {
                info!(%interface, "no PTP hardware clock on the interface; hardware stamps unavailable");
                return None;
            }
        },
        Err(e) => {
            info!(%interface, error = %e, "cannot query timestamping capabilities; hardware stamps unavailable");
            return None;
        }
    };
    let dev = match PtpDevice::open(index) {
        Ok(d) => d,
        Err(e) => {
            warn!(%interface, phc = %ptp::phc_path(index).display(), error = %e, "cannot open the PHC");
            return None;
        }
    };
    info!(%interface, phc = %ptp::phc_path(index).display(), precise = dev.is_precise(), "mapping the PHC to UTC");
    spawn(dev, shared).ok()
}

/// Starts the `chime-phc` thread over any [`PhcClock`].
pub fn spawn<C: PhcClock + Send + 'static>(mut clock: C, shared: Arc<Shared>) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name("chime-phc".into()).spawn(move || {
        crate::privdrop::drop_thread_capabilities();
        let mut tracker = PhcTracker::new();
        let mut failures = 0u32;
        while !shared.shutdown.load(Ordering::Relaxed) {
            match clock.read() {
                Ok(r) => {
                    shared.phc.store(Some(Arc::new(tracker.update(r))));
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    if failures <= 3 {
                        warn!(error = %e, "PHC read failed");
                    }
                }
            }
            let mut slept = Duration::ZERO;
            while slept < READ_INTERVAL && !shared.shutdown.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(50));
                slept += Duration::from_millis(50);
            }
        }
    })
}

/// A simulated PHC with a known offset and drift relative to a simulated
/// system clock: for tests (this machine has no PHC).
#[derive(Clone, Debug)]
pub struct SimulatedPhc {
    /// System time of the next reading, ns.
    pub sys_ns: i128,
    /// PHC − UTC at `start`, ns (e.g. +37 s for a PHC on TAI).
    pub offset_ns: i128,
    /// PHC rate error, parts per billion (PHC gains this much per second).
    pub drift_ppb: i128,
    /// System time the offset is given at.
    pub start: i128,
    /// System time between readings, ns.
    pub step_ns: i128,
    /// Read window, ns (the reading's system time is its midpoint).
    pub window_ns: i64,
}

impl SimulatedPhc {
    /// PHC time at system time `sys`.
    pub fn phc_at(&self, sys: i128) -> i128 {
        sys + self.offset_ns + (sys - self.start) * self.drift_ppb / 1_000_000_000
    }
}

impl PhcClock for SimulatedPhc {
    fn read(&mut self) -> io::Result<CrossStamp> {
        let r = CrossStamp { phc_ns: self.phc_at(self.sys_ns), sys_ns: self.sys_ns, window_ns: self.window_ns };
        self.sys_ns += self.step_ns;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i128 = 1_790_000_000_000_000_000;

    fn sim(offset_ns: i128, drift_ppb: i128) -> SimulatedPhc {
        SimulatedPhc { sys_ns: T, offset_ns, drift_ppb, start: T, step_ns: 1_000_000_000, window_ns: 300 }
    }

    #[test]
    fn constant_offset_of_a_tai_phc() {
        let mut phc = sim(37_000_000_000, 0);
        let mut t = PhcTracker::new();
        let m = t.update(phc.read().unwrap());
        assert_eq!(m.offset_at(T), -37_000_000_000);
        let stamp = phc.phc_at(T + 123_456);
        assert_eq!(m.to_utc_ns(stamp), T + 123_456);
    }

    #[test]
    fn drift_is_learned_and_extrapolated() {
        // PHC 2.5 ms ahead, gaining 40 ppm.
        let mut phc = sim(2_500_000, 40_000);
        let mut t = PhcTracker::new();
        let mut m = None;
        for _ in 0..10 {
            m = Some(t.update(phc.read().unwrap()));
        }
        let m = m.unwrap();
        assert!((m.drift + 40e-6).abs() < 1e-9, "drift {}", m.drift);
        assert_eq!(m.samples, 10);
        // Half a second after the last reading, a stamp converts within 2 ns.
        let sys = T + 9_500_000_000;
        let utc = m.to_utc_ns(phc.phc_at(sys));
        assert!((utc - sys).abs() <= 2, "{}", utc - sys);
        assert!(m.fresh_offset(sys).is_some());
        assert_eq!(m.fresh_offset(sys + 60_000_000_000), None, "stale");
    }

    #[test]
    fn a_step_restarts_the_fit() {
        let mut phc = sim(0, 0);
        let mut t = PhcTracker::new();
        for _ in 0..5 {
            t.update(phc.read().unwrap());
        }
        phc.offset_ns = 37_000_000_000;
        let m = t.update(phc.read().unwrap());
        assert_eq!((t.steps, m.samples), (1, 1));
        assert_eq!(m.offset_at(m.ref_sys_ns), -37_000_000_000);
    }

    #[test]
    fn thread_publishes_into_shared() {
        use chime_proto::ClockSnapshot;
        use chime_proto::acl::Acl;
        let shared = Arc::new(Shared::new(ClockSnapshot::unsynchronized(-20), Acl::default(), Vec::new()));
        // A PHC on TAI, read at the real system time.
        let now = sys_now_ns();
        let phc = SimulatedPhc { sys_ns: now, offset_ns: 37_000_000_000, start: now, ..sim(0, 0) };
        let h = spawn(phc, Arc::clone(&shared)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while shared.phc.load().is_none() && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(current_offset(&shared), Some(-37_000_000_000));
        shared.shutdown.store(true, Ordering::Relaxed);
        h.join().unwrap();
    }
}
