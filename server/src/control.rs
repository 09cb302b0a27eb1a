//! The control thread: turns the kernel's view of the system clock into the
//! [`ClockSnapshot`] every worker serves, and keeps a richer
//! [`ClockStatus`] for the metrics endpoint.
//!
//! Every `update_interval` it reads the configured upstream source (the
//! kernel via `adjtimex(2)`, the local chronyd, or ptp4l; see
//! [`crate::upstream`]) and turns the reading into a snapshot with
//! [`next_snapshot`], which holds a lost upstream's last good state over
//! (root dispersion growing per RFC 5905) until `max_unsync_secs` or
//! `max_root_distance`, then goes unsynchronized. The kernel is read on
//! every tick whatever the source, for the TAI offset and the metrics.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use chime_proto::nts::KeyRingConfig;
use chime_proto::packet::{LeapIndicator, RefId};
use chime_proto::{ClockSnapshot, NtpTimestamp};
use tracing::{error, info, warn};

use crate::nts::NtsKeys;
use crate::shared::Shared;
use crate::sys::adjtime::{KernelClock, read_kernel_clock};
use crate::time::now_ntp;
use crate::upstream::{self, HoldoverPolicy, Phase, SourceConfig, Track, UpstreamSource, next_snapshot};

/// Longest the control thread sleeps before looking at the shutdown flag.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// What the control thread needs from the configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlConfig {
    /// Stratum announced while the kernel clock is synchronized (clamped to
    /// 1..=15; kernel source only).
    pub stratum: u8,
    /// Reference ID announced while the kernel clock is synchronized
    /// (kernel source only).
    pub reference_id: RefId,
    /// Which upstream to read; `None`: the kernel, at `stratum` and
    /// `reference_id`.
    pub source: Option<SourceConfig>,
    /// Longest a lost upstream's last good state is served, seconds.
    pub max_unsync_secs: f64,
    /// Largest root distance served as synchronized, seconds.
    pub max_root_distance: f64,
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
    /// The upstream source's health.
    pub upstream: UpstreamHealth,
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
            upstream: UpstreamHealth::unknown(),
            snapshot: ClockSnapshot::unsynchronized(precision),
            local_fallback: false,
            taken_at: NtpTimestamp::ZERO,
        }
    }
}

/// The upstream source's health, for metrics and `chimed status`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpstreamHealth {
    /// The source's name ("kernel", "chrony", "ptp4l").
    pub source: &'static str,
    /// Whether the latest reading was good.
    pub up: bool,
    /// When the upstream was last good.
    pub last_success: Option<NtpTimestamp>,
    /// The upstream's offset from its reference, where it tells.
    pub offset: Option<f64>,
    /// Which rule produced the served snapshot.
    pub phase: Phase,
}

impl UpstreamHealth {
    /// Before anything was read.
    pub const fn unknown() -> Self {
        Self { source: "kernel", up: false, last_success: None, offset: None, phase: Phase::Unsynchronized }
    }
}

/// Where the control thread publishes its [`ClockStatus`].
pub type SharedClockStatus = Arc<ArcSwap<ClockStatus>>;

/// The running control thread.
#[derive(Debug)]
pub struct ControlHandle {
    thread: JoinHandle<()>,
    status: SharedClockStatus,
    updates: mpsc::Sender<ControlUpdate>,
}

/// New settings for the control thread (a configuration reload), applied
/// at its next turn, between two readings.
pub struct ControlUpdate {
    /// The new settings.
    pub cfg: ControlConfig,
    /// A newly opened upstream source, when its settings changed; `None`
    /// keeps the current one. The track (holdover state) carries over.
    pub source: Option<Box<dyn UpstreamSource>>,
    /// New NTS key rotation settings, if NTS runs.
    pub rotation: Option<KeyRingConfig>,
}

impl std::fmt::Debug for ControlUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlUpdate")
            .field("cfg", &self.cfg)
            .field("source", &self.source.as_ref().map(|s| s.name()))
            .field("rotation", &self.rotation)
            .finish()
    }
}

impl ControlHandle {
    /// The status cell the thread keeps up to date (for
    /// [`crate::metrics::serve`]).
    pub fn status(&self) -> SharedClockStatus {
        Arc::clone(&self.status)
    }

    /// Hands new settings to the thread; they apply within one update
    /// interval's sleep slice (at most [`SHUTDOWN_POLL`]).
    pub fn update(&self, update: ControlUpdate) -> Result<(), String> {
        self.updates.send(update).map_err(|_| "the control thread has stopped".to_owned())
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
    let source_cfg = cfg
        .source
        .clone()
        .unwrap_or(SourceConfig::Kernel { stratum: cfg.stratum.clamp(1, 15), reference_id: cfg.reference_id });
    let source = upstream::open(&source_cfg).map_err(|e| io::Error::other(format!("upstream source: {e}")))?;
    info!(precision, source = source.name(), "control thread starting");

    let mut control = Control::new(cfg, precision, source);
    control.nts = nts;
    let status = Arc::new(ArcSwap::from_pointee(ClockStatus::unknown(precision)));
    control.tick(&shared, &status);

    let (updates, inbox) = mpsc::channel();
    let thread = {
        let status = Arc::clone(&status);
        thread::Builder::new().name("chime-control".into()).spawn(move || {
            crate::privdrop::drop_thread_capabilities();
            control.run(&shared, &status, &inbox);
        })?
    };
    Ok(ControlHandle { thread, status, updates })
}

fn holdover_policy(cfg: &ControlConfig, precision: i8) -> HoldoverPolicy {
    HoldoverPolicy {
        max_unsync_secs: cfg.max_unsync_secs,
        max_root_distance: cfg.max_root_distance,
        local_stratum: cfg.local_stratum,
        precision,
    }
}

/// The control loop's state between readings.
struct Control {
    cfg: ControlConfig,
    policy: HoldoverPolicy,
    source: Box<dyn UpstreamSource>,
    track: Track,
    /// What was published last, for logging transitions only.
    last: Option<(Phase, LeapIndicator)>,
    read_failing: bool,
    kernel_failing: bool,
    nts: Option<NtsKeys>,
    nts_failing: bool,
}

impl Control {
    fn new(cfg: ControlConfig, precision: i8, source: Box<dyn UpstreamSource>) -> Self {
        let policy = holdover_policy(&cfg, precision);
        Self {
            cfg,
            policy,
            source,
            track: Track::initial(precision),
            last: None,
            read_failing: false,
            kernel_failing: false,
            nts: None,
            nts_failing: false,
        }
    }

    fn run(mut self, shared: &Shared, status: &ArcSwap<ClockStatus>, inbox: &mpsc::Receiver<ControlUpdate>) {
        let mut next = Instant::now() + self.cfg.update_interval;
        while !shared.shutdown.load(Ordering::Relaxed) {
            shared.control_heartbeat.beat(Instant::now());
            if let Ok(update) = inbox.try_recv() {
                self.apply(update);
                // Publish under the new settings at once.
                next = Instant::now();
            }
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

    /// Takes new settings: holdover policy, cadence, source, key rotation.
    fn apply(&mut self, update: ControlUpdate) {
        let ControlUpdate { cfg, source, rotation } = update;
        self.policy = holdover_policy(&cfg, self.policy.precision);
        self.cfg = cfg;
        if let Some(source) = source {
            info!(from = self.source.name(), to = source.name(), "upstream source replaced");
            self.source = source;
            self.read_failing = false;
        }
        if let (Some(keys), Some(rotation)) = (&mut self.nts, rotation)
            && let Err(e) = keys.set_rotation(rotation, crate::nts::unix_now())
        {
            error!("NTS keys: {e}");
        }
    }

    /// Reads the upstream (and the kernel) once and publishes the result.
    fn tick(&mut self, shared: &Shared, status: &ArcSwap<ClockStatus>) {
        let kernel = match read_kernel_clock() {
            Ok(k) => {
                self.kernel_failing = false;
                Some(k)
            }
            Err(e) => {
                if !self.kernel_failing {
                    error!(error = %e, "cannot read the kernel clock state (adjtimex)");
                    self.kernel_failing = true;
                }
                None
            }
        };
        let now = now_ntp();
        let reading = self.source.read(now);
        match &reading {
            Ok(_) if self.read_failing => {
                info!(source = self.source.name(), "reading the upstream works again");
                self.read_failing = false;
            }
            Err(e) if !self.read_failing => {
                error!(source = self.source.name(), error = %e, "cannot read the upstream clock state");
                self.read_failing = true;
            }
            _ => {}
        }
        self.track = next_snapshot(&self.track, reading.as_ref().ok(), now, &self.policy);
        let mut snapshot = self.track.snapshot;
        crate::leap::apply_leap(&mut snapshot, now, shared.leap.get());
        self.log_transitions(&snapshot);
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
            // For chime_nts_key_rotation_interval_seconds (a reload may
            // change it).
            shared.nts_rotation_secs.store(keys.rotation().interval_secs, Ordering::Relaxed);
        }
        let upstream = UpstreamHealth {
            source: self.source.name(),
            up: self.track.up,
            last_success: self.track.last_success(),
            offset: self.track.offset,
            phase: self.track.phase,
        };
        let local_fallback = self.track.phase == Phase::LocalFallback;
        status.store(Arc::new(ClockStatus { kernel, upstream, snapshot, local_fallback, taken_at: now }));
    }

    fn log_transitions(&mut self, snap: &ClockSnapshot) {
        let current = (self.track.phase, snap.leap);
        let previous = self.last.replace(current);
        if previous == Some(current) {
            return;
        }
        let source = self.source.name();
        if previous.map(|p| p.0) != Some(current.0) {
            match current.0 {
                Phase::Synchronized => info!(
                    source,
                    stratum = snap.stratum,
                    reference_id = ?snap.reference_id,
                    root_delay_s = snap.root_delay,
                    root_dispersion_s = snap.root_dispersion,
                    "clock synchronized"
                ),
                Phase::Holdover => warn!(
                    source,
                    max_unsync_secs = self.cfg.max_unsync_secs,
                    "upstream lost: serving its last good state, root dispersion growing"
                ),
                Phase::LocalFallback => {
                    warn!(
                        source,
                        stratum = snap.stratum,
                        "upstream lost: serving the undisciplined local clock (local_stratum)"
                    )
                }
                _ => warn!(source, "clock unsynchronized: replies announce leap 3 / stratum 16 (or go silent)"),
            }
        }
        if previous.map(|p| p.1) != Some(current.1) && previous.is_some()
            || snap.leap != LeapIndicator::NoWarning && previous.is_none()
        {
            match snap.leap {
                LeapIndicator::InsertSecond => warn!("leap second armed: inserting one at the end of this UTC day"),
                LeapIndicator::DeleteSecond => warn!("leap second armed: deleting one at the end of this UTC day"),
                _ => info!("leap second cleared"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::fake::{FakeChronyd, FakeNtp};

    fn cfg(local_stratum: Option<u8>) -> ControlConfig {
        ControlConfig {
            stratum: 2,
            reference_id: RefId([192, 0, 2, 1]),
            source: None,
            max_unsync_secs: 900.0,
            max_root_distance: 1.5,
            local_stratum,
            update_interval: Duration::from_millis(50),
        }
    }

    #[test]
    fn chrony_source_end_to_end_through_the_thread() {
        let fake = FakeChronyd::start(FakeNtp { stratum: 3, ..FakeNtp::default() });
        let shared =
            Arc::new(Shared::new(ClockSnapshot::unsynchronized(0), chime_proto::acl::Acl::default(), Vec::new()));
        let c = ControlConfig {
            source: Some(SourceConfig::Chrony { address: fake.addr() }),
            max_unsync_secs: 0.3,
            ..cfg(None)
        };
        let handle = spawn(c, Arc::clone(&shared)).unwrap();
        let first = **shared.clock.load();
        assert!(first.synchronized);
        assert_eq!(first.stratum, 4);
        let st = handle.status().load().upstream;
        assert_eq!((st.source, st.up, st.phase), ("chrony", true, Phase::Synchronized));
        drop(fake);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut saw_holdover = false;
        while shared.clock.load().synchronized {
            saw_holdover |= handle.status().load().upstream.phase == Phase::Holdover;
            assert!(Instant::now() < deadline, "still synchronized after 5 s");
            thread::sleep(Duration::from_millis(10));
        }
        assert!(saw_holdover);
        let st = handle.status().load().upstream;
        assert!(!st.up);
        assert!(st.last_success.is_some());
        shared.shutdown.store(true, Ordering::Relaxed);
        handle.join().unwrap();
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
