//! State shared between the control thread, the workers and the metrics
//! endpoint. Workers only ever read it, lock-free, once per batch.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::{ArcSwap, ArcSwapOption};
use chime_nts_ke::KeMetrics;
use chime_proto::acl::Acl;
use chime_proto::nts::KeyRing;
use chime_proto::{ClockSnapshot, Responder, ResponderConfig};

use crate::config::SeccompMode;
use crate::leap::LeapService;
use crate::phc::PhcMapping;
use crate::stats::{Heartbeat, WorkerStats};

/// Everything the threads of one chimed share.
#[derive(Debug)]
pub struct Shared {
    /// The current clock state, replaced by the control thread.
    pub clock: ArcSwap<ClockSnapshot>,
    /// The current access-control rules, replaced on reload.
    pub acl: ArcSwap<Acl>,
    /// Set once to ask every thread to finish.
    pub shutdown: AtomicBool,
    /// The control thread's: it beats on every turn of its loop (at least
    /// every 100 ms while it is not stuck), for systemd's watchdog.
    pub control_heartbeat: Heartbeat,
    /// One entry per worker, in worker order.
    pub workers: Vec<Arc<WorkerStats>>,
    /// The kernel's TAI - UTC offset in seconds, kept by the control thread
    /// (XDP ingress stamps are CLOCK_TAI).
    pub tai_offset_s: AtomicI32,
    /// The XDP program's per-verdict counters (summed over CPUs), refreshed
    /// by the backend about once a second; all zero without XDP.
    pub xdp_program: [AtomicU64; XDP_COUNTERS],
    /// Whether the XDP backend serves (the XDP metrics are rendered only
    /// then).
    pub xdp_active: AtomicBool,
    /// The NTS master keys when NTS is enabled (set before the workers
    /// start; the control thread replaces the ring, workers load it once
    /// per batch, the NTS-KE server once per response).
    pub nts: Option<Arc<ArcSwap<KeyRing>>>,
    /// The NTS-KE server's counters, once it runs.
    pub nts_ke: OnceLock<Arc<KeMetrics>>,
    /// Leap-second state (`[leap]`), set before the control thread starts;
    /// unset, the upstream's leap flag is served as is.
    pub leap: OnceLock<LeapService>,
    /// The NIC clock's mapping to UTC, kept by the `chime-phc` thread when
    /// the interface has a PHC (see [`crate::phc`]); `None` otherwise.
    pub phc: ArcSwapOption<PhcMapping>,
    /// Responder settings published by the last reload (per worker), with
    /// [`Self::config_generation`] counting reloads; see
    /// [`Self::apply_responder_config`].
    responder_cfg: ArcSwapOption<ResponderConfig>,
    /// Bumped after every [`Self::publish_responder_config`].
    config_generation: AtomicU64,
    /// Configuration reloads by outcome (see [`ReloadOutcome`]).
    pub reloads: [AtomicU64; ReloadOutcome::ALL.len()],
    /// The packet path that serves, set by the backend once it has
    /// started (for `chime_backend_info`, `chime_worker_info`).
    pub backend: ArcSwapOption<BackendInfo>,
    /// `nts.rotation_interval` in seconds as in effect, kept by the control
    /// thread when it owns NTS keys; else 0.
    pub nts_rotation_secs: AtomicU64,
    /// The seccomp mode in force, set once the filter is installed (or
    /// known to be off), for `chime_seccomp_info`.
    pub seccomp: OnceLock<SeccompMode>,
}

/// What became of a SIGHUP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new configuration is in effect.
    Applied,
    /// A setting that needs a restart changed: nothing was applied.
    Refused,
    /// The file could not be read or is invalid, or a new upstream source
    /// or certificate could not be opened: nothing was applied.
    Failed,
}

impl ReloadOutcome {
    /// Every outcome, in counter order.
    pub const ALL: [Self; 3] = [Self::Applied, Self::Refused, Self::Failed];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// What a running backend is, for the metrics and `chimed status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// `socket`, `xdp`, or `none` (an NTS-KE-only front end).
    pub backend: &'static str,
    /// The interface (XDP), else empty.
    pub interface: String,
    /// How the XDP program is attached (`native`, `generic`), else empty.
    pub xdp_attach: String,
    /// Per worker, in worker order: the NIC queue it serves (XDP).
    pub queues: Vec<Option<u32>>,
    /// Per worker: how its AF_XDP socket is bound (`zero-copy`, `copy`),
    /// else empty.
    pub xdp_bind: Vec<&'static str>,
}

/// Number of XDP program counters.
pub const XDP_COUNTERS: usize = chime_ebpf::program::XdpCounter::COUNT;

impl Shared {
    /// Shared state for `workers` workers, starting from `clock` and `acl`.
    pub fn new(clock: ClockSnapshot, acl: Acl, workers: Vec<Arc<WorkerStats>>) -> Self {
        Self {
            clock: ArcSwap::from_pointee(clock),
            acl: ArcSwap::from_pointee(acl),
            shutdown: AtomicBool::new(false),
            control_heartbeat: Heartbeat::default(),
            workers,
            tai_offset_s: AtomicI32::new(0),
            xdp_program: std::array::from_fn(|_| AtomicU64::new(0)),
            xdp_active: AtomicBool::new(false),
            nts: None,
            nts_ke: OnceLock::new(),
            leap: OnceLock::new(),
            phc: ArcSwapOption::empty(),
            responder_cfg: ArcSwapOption::empty(),
            config_generation: AtomicU64::new(0),
            reloads: std::array::from_fn(|_| AtomicU64::new(0)),
            backend: ArcSwapOption::empty(),
            nts_rotation_secs: AtomicU64::new(0),
            seccomp: OnceLock::new(),
        }
    }

    /// Publishes new responder settings (a reload); every worker applies
    /// them before its next batch.
    pub fn publish_responder_config(&self, cfg: ResponderConfig) {
        self.responder_cfg.store(Some(Arc::new(cfg)));
        self.config_generation.fetch_add(1, Ordering::Release);
    }

    /// A worker's once-per-batch check: if settings were published since
    /// `seen`, applies them to `responder`. One atomic load when nothing
    /// changed.
    #[inline]
    pub fn apply_responder_config(&self, seen: &mut u64, responder: &mut Responder) {
        let generation = self.config_generation.load(Ordering::Acquire);
        if generation != *seen {
            *seen = generation;
            if let Some(cfg) = self.responder_cfg.load_full() {
                responder.reconfigure(&cfg);
            }
        }
    }

    /// Counts a reload's outcome.
    pub fn count_reload(&self, outcome: ReloadOutcome) {
        self.reloads[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }
}
