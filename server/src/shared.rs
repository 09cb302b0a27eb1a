//! State shared between the control thread, the workers and the metrics
//! endpoint. Workers only ever read it, lock-free, once per batch.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64};
use std::sync::{Arc, OnceLock};

use arc_swap::{ArcSwap, ArcSwapOption};
use chime_nts_ke::KeMetrics;
use chime_proto::ClockSnapshot;
use chime_proto::acl::Acl;
use chime_proto::nts::KeyRing;

use crate::leap::LeapService;
use crate::phc::PhcMapping;
use crate::stats::WorkerStats;

/// Everything the threads of one chimed share.
#[derive(Debug)]
pub struct Shared {
    /// The current clock state, replaced by the control thread.
    pub clock: ArcSwap<ClockSnapshot>,
    /// The current access-control rules, replaced on reload.
    pub acl: ArcSwap<Acl>,
    /// Set once to ask every thread to finish.
    pub shutdown: AtomicBool,
    /// Bumped by the control thread on every turn of its loop (at least
    /// every 100 ms while it is not stuck): the watchdog's proof of progress.
    pub control_heartbeat: AtomicU64,
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
            control_heartbeat: AtomicU64::new(0),
            workers,
            tai_offset_s: AtomicI32::new(0),
            xdp_program: std::array::from_fn(|_| AtomicU64::new(0)),
            xdp_active: AtomicBool::new(false),
            nts: None,
            nts_ke: OnceLock::new(),
            leap: OnceLock::new(),
            phc: ArcSwapOption::empty(),
        }
    }
}
