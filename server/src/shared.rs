//! State shared between the control thread, the workers and the metrics
//! endpoint. Workers only ever read it, lock-free, once per batch.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use chime_proto::ClockSnapshot;
use chime_proto::acl::Acl;

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
    /// One entry per worker, in worker order.
    pub workers: Vec<Arc<WorkerStats>>,
}

impl Shared {
    /// Shared state for `workers` workers, starting from `clock` and `acl`.
    pub fn new(clock: ClockSnapshot, acl: Acl, workers: Vec<Arc<WorkerStats>>) -> Self {
        Self {
            clock: ArcSwap::from_pointee(clock),
            acl: ArcSwap::from_pointee(acl),
            shutdown: AtomicBool::new(false),
            workers,
        }
    }
}
