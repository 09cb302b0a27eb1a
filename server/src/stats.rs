//! Per-worker counters shared with the metrics endpoint.
//!
//! A worker counts into plain integers (its `Responder`'s [`Counters`]) and
//! publishes them here once per batch with relaxed stores; the metrics
//! thread reads them whenever it is scraped. One writer per `WorkerStats`,
//! each on its own cache lines, so workers never contend.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use chime_proto::ratelimit::RateLimiterStats;
use chime_proto::{Counters, DropReason, InterleaveStats, KissCode, StampKind};
use crossbeam_utils::CachePadded;

use crate::ratelimited::PrefixCell;
use crate::residence::ResidenceCell;

/// Where a transmit timestamp came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TxStampKind {
    /// The NIC's clock (socket `SOF_TIMESTAMPING_TX_HARDWARE`, or an AF_XDP
    /// completion stamp in zero-copy mode), converted through the PHC mapping.
    Hardware,
    /// The kernel's software stamp (socket `TX_SOFTWARE`, or the AF_XDP
    /// copy-mode completion stamp in CLOCK_TAI).
    Software,
}

impl TxStampKind {
    /// Every kind, in counter order.
    pub const ALL: [Self; 2] = [Self::Hardware, Self::Software];

    /// Stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hardware => "hardware",
            Self::Software => "software",
        }
    }
}

/// Transport-level events a worker counts outside the responder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoEvent {
    /// A receive call failed (other than "would block").
    RecvError,
    /// A send call failed or sent fewer datagrams than asked.
    SendError,
    /// A datagram was truncated because it did not fit the receive buffer.
    Truncated,
    /// A datagram arrived without a kernel timestamp.
    NoTimestamp,
    /// An XDP frame that is not a well-formed Ethernet/IP/UDP request
    /// (dropped before the responder).
    BadFrame,
}

impl IoEvent {
    /// Every event, in counter order.
    pub const ALL: [Self; 5] = [Self::RecvError, Self::SendError, Self::Truncated, Self::NoTimestamp, Self::BadFrame];

    /// Stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::RecvError => "recv_error",
            Self::SendError => "send_error",
            Self::Truncated => "truncated",
            Self::NoTimestamp => "no_timestamp",
            Self::BadFrame => "bad_frame",
        }
    }
}

/// Events of one AF_XDP queue (XDP backend only): the queue's own counters
/// and the kernel's `XDP_STATISTICS` for its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum XdpQueueEvent {
    /// Frames taken from the RX ring.
    Rx,
    /// Frames answered and put on the TX ring.
    Tx,
    /// Answers dropped because the TX ring was full.
    TxRingFull,
    /// Descriptors the frame accounting refused (nonzero means a bug).
    BadDesc,
    /// `sendto` kicks of the TX path.
    TxKicks,
    /// Wakeups of the fill ring.
    RxWakeups,
    /// Kernel: packets dropped for other reasons.
    KernelRxDropped,
    /// Kernel: invalid fill-ring descriptors.
    KernelRxInvalidDescs,
    /// Kernel: invalid TX-ring descriptors.
    KernelTxInvalidDescs,
    /// Kernel: packets dropped because the RX ring was full.
    KernelRxRingFull,
    /// Kernel: times the fill ring was found empty.
    KernelFillRingEmpty,
    /// Kernel: times the TX ring was found empty.
    KernelTxRingEmpty,
}

impl XdpQueueEvent {
    /// Every event, in counter order.
    pub const ALL: [Self; 12] = [
        Self::Rx,
        Self::Tx,
        Self::TxRingFull,
        Self::BadDesc,
        Self::TxKicks,
        Self::RxWakeups,
        Self::KernelRxDropped,
        Self::KernelRxInvalidDescs,
        Self::KernelTxInvalidDescs,
        Self::KernelRxRingFull,
        Self::KernelFillRingEmpty,
        Self::KernelTxRingEmpty,
    ];

    /// Stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Rx => "rx",
            Self::Tx => "tx",
            Self::TxRingFull => "tx_ring_full",
            Self::BadDesc => "bad_desc",
            Self::TxKicks => "tx_kicks",
            Self::RxWakeups => "rx_wakeups",
            Self::KernelRxDropped => "kernel_rx_dropped",
            Self::KernelRxInvalidDescs => "kernel_rx_invalid_descs",
            Self::KernelTxInvalidDescs => "kernel_tx_invalid_descs",
            Self::KernelRxRingFull => "kernel_rx_ring_full",
            Self::KernelFillRingEmpty => "kernel_fill_ring_empty_descs",
            Self::KernelTxRingEmpty => "kernel_tx_ring_empty_descs",
        }
    }
}

/// Where the UMEM frames of one AF_XDP queue are (XDP backend only).
pub const XDP_FRAME_STATES: [&str; 4] = ["free", "fill", "user", "tx"];

/// When a thread last went round its loop: written by that thread, read by
/// any (the metrics, `chimed status`, systemd's watchdog in `run.rs`).
#[derive(Debug)]
pub struct Heartbeat {
    /// What [`Self::beat`] measures from.
    born: Instant,
    /// Nanoseconds from `born` to the latest [`Self::beat`].
    last_ns: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self { born: Instant::now(), last_ns: AtomicU64::new(0) }
    }
}

impl Heartbeat {
    /// Records that the owning thread went round its loop at `now`.
    pub fn beat(&self, now: Instant) {
        let ns = now.saturating_duration_since(self.born).as_nanos();
        self.last_ns.store(u64::try_from(ns).unwrap_or(u64::MAX), Relaxed);
    }

    /// Time since the latest [`Self::beat`] (since creation if none).
    pub fn age(&self, now: Instant) -> Duration {
        let last = self.born + Duration::from_nanos(self.last_ns.load(Relaxed));
        now.saturating_duration_since(last)
    }
}

/// What one worker has done, readable from any thread.
#[derive(Debug)]
pub struct WorkerStats {
    /// Worker index (the `worker` label).
    pub worker: usize,
    /// Core it is pinned to, if any.
    pub core: Option<usize>,
    inner: CachePadded<Inner>,
    /// Residence-time histograms, published about once a second.
    pub residence: ResidenceCell,
    /// The prefixes this worker rate-limited most, published about once a
    /// second.
    pub rate_limited: PrefixCell,
}

#[derive(Debug, Default)]
struct Inner {
    received: AtomicU64,
    replies: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    kod: [AtomicU64; KissCode::ALL.len()],
    stamps: [AtomicU64; StampKind::ALL.len()],
    io: [AtomicU64; IoEvent::ALL.len()],
    xdp_events: [AtomicU64; XdpQueueEvent::ALL.len()],
    xdp_frames: [AtomicU64; XDP_FRAME_STATES.len()],
    limiter_capacity: AtomicU64,
    limiter_occupied: AtomicU64,
    limiter_evictions: AtomicU64,
    limiter_bytes: AtomicU64,
    nts_replies: AtomicU64,
    nts_cookies: AtomicU64,
    interleaved: [AtomicU64; 6],
    interleave_table: [AtomicU64; 3],
    tx_stamps: [AtomicU64; TxStampKind::ALL.len()],
    /// The worker's latest [`WorkerStats::beat`].
    heartbeat: Heartbeat,
}

/// A consistent-enough copy of one worker's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerSnapshot {
    /// Responder counters.
    pub counters: Counters,
    /// Rate-limiter occupancy.
    pub limiter: RateLimiterStats,
    /// Transport events, indexed like [`IoEvent::ALL`].
    pub io: [u64; IoEvent::ALL.len()],
    /// AF_XDP queue events, indexed like [`XdpQueueEvent::ALL`].
    pub xdp_events: [u64; XdpQueueEvent::ALL.len()],
    /// UMEM frames by state, indexed like [`XDP_FRAME_STATES`].
    pub xdp_frames: [u64; XDP_FRAME_STATES.len()],
    /// Interleaved-mode table occupancy.
    pub interleave: InterleaveStats,
    /// Transmit stamps received, indexed like [`TxStampKind::ALL`].
    pub tx_stamps: [u64; TxStampKind::ALL.len()],
}

fn store_all(dst: &[AtomicU64], src: &[u64]) {
    for (d, s) in dst.iter().zip(src) {
        d.store(*s, Relaxed);
    }
}

fn load_all<const N: usize>(src: &[AtomicU64; N]) -> [u64; N] {
    std::array::from_fn(|i| src[i].load(Relaxed))
}

impl WorkerStats {
    /// Zeroed counters for worker `worker`.
    pub fn new(worker: usize, core: Option<usize>) -> Self {
        Self {
            worker,
            core,
            inner: CachePadded::new(Inner::default()),
            residence: ResidenceCell::default(),
            rate_limited: PrefixCell::default(),
        }
    }

    /// Records that the worker went round its loop at `now` (the owning
    /// worker, once per batch or idle wake-up).
    pub fn beat(&self, now: Instant) {
        self.inner.heartbeat.beat(now);
    }

    /// Time since the latest [`Self::beat`] (since creation if none): it
    /// stays below the idle wait (100 ms) while the worker's loop turns, and
    /// grows when the worker is stuck or gone.
    pub fn heartbeat_age(&self, now: Instant) -> Duration {
        self.inner.heartbeat.age(now)
    }

    /// Publishes the responder's counters and limiter figures (called by the
    /// owning worker once per batch).
    pub fn publish(&self, c: &Counters, l: &RateLimiterStats) {
        let i = &*self.inner;
        i.received.store(c.received, Relaxed);
        i.replies.store(c.replies, Relaxed);
        store_all(&i.drops, &c.drops);
        store_all(&i.kod, &c.kod);
        store_all(&i.stamps, &c.stamps);
        i.limiter_capacity.store(l.capacity, Relaxed);
        i.limiter_occupied.store(l.occupied, Relaxed);
        i.limiter_evictions.store(l.evictions, Relaxed);
        i.limiter_bytes.store(l.memory_bytes, Relaxed);
        i.nts_replies.store(c.nts_replies, Relaxed);
        i.nts_cookies.store(c.nts_cookies, Relaxed);
        store_all(
            &i.interleaved,
            &[
                c.interleaved_replies,
                c.interleaved_hits,
                c.interleaved_misses,
                c.interleaved_evictions,
                c.tx_stamps_matched,
                c.tx_stamps_unmatched,
            ],
        );
    }

    /// Publishes the interleaved-mode table's occupancy (owning worker).
    pub fn publish_interleave(&self, t: &InterleaveStats) {
        store_all(&self.inner.interleave_table, &[t.capacity, t.occupied, t.memory_bytes]);
    }

    /// Counts transmit stamps of one kind (owning worker only).
    pub fn count_tx_stamps(&self, kind: TxStampKind, n: u64) {
        let a = &self.inner.tx_stamps[kind as usize];
        a.store(a.load(Relaxed) + n, Relaxed);
    }

    /// Counts one transport event (only the owning worker calls this, so a
    /// load and a store suffice: no locked instruction).
    pub fn count_io(&self, event: IoEvent, n: u64) {
        let a = &self.inner.io[event as usize];
        a.store(a.load(Relaxed) + n, Relaxed);
    }

    /// Publishes the AF_XDP queue's figures (owning worker only).
    pub fn publish_xdp(&self, events: &[u64; XdpQueueEvent::ALL.len()], frames: &[u64; XDP_FRAME_STATES.len()]) {
        store_all(&self.inner.xdp_events, events);
        store_all(&self.inner.xdp_frames, frames);
    }

    /// Reads everything.
    pub fn snapshot(&self) -> WorkerSnapshot {
        let i = &*self.inner;
        WorkerSnapshot {
            counters: Counters {
                received: i.received.load(Relaxed),
                replies: i.replies.load(Relaxed),
                drops: load_all(&i.drops),
                kod: load_all(&i.kod),
                stamps: load_all(&i.stamps),
                nts_replies: i.nts_replies.load(Relaxed),
                nts_cookies: i.nts_cookies.load(Relaxed),
                interleaved_replies: i.interleaved[0].load(Relaxed),
                interleaved_hits: i.interleaved[1].load(Relaxed),
                interleaved_misses: i.interleaved[2].load(Relaxed),
                interleaved_evictions: i.interleaved[3].load(Relaxed),
                tx_stamps_matched: i.interleaved[4].load(Relaxed),
                tx_stamps_unmatched: i.interleaved[5].load(Relaxed),
            },
            limiter: RateLimiterStats {
                capacity: i.limiter_capacity.load(Relaxed),
                occupied: i.limiter_occupied.load(Relaxed),
                evictions: i.limiter_evictions.load(Relaxed),
                memory_bytes: i.limiter_bytes.load(Relaxed),
            },
            io: load_all(&i.io),
            xdp_events: load_all(&i.xdp_events),
            xdp_frames: load_all(&i.xdp_frames),
            interleave: InterleaveStats {
                capacity: i.interleave_table[0].load(Relaxed),
                occupied: i.interleave_table[1].load(Relaxed),
                memory_bytes: i.interleave_table[2].load(Relaxed),
            },
            tx_stamps: load_all(&i.tx_stamps),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_then_snapshot() {
        let s = WorkerStats::new(3, Some(1));
        let mut c = Counters { received: 10, replies: 7, ..Counters::default() };
        c.drops[0] = 2;
        c.kod[0] = 1;
        let l = RateLimiterStats { capacity: 8, occupied: 3, evictions: 1, memory_bytes: 128 };
        s.publish(&c, &l);
        s.count_io(IoEvent::SendError, 2);
        s.count_io(IoEvent::SendError, 1);
        let snap = s.snapshot();
        assert_eq!(snap.counters, c);
        assert_eq!(snap.limiter, l);
        assert_eq!(snap.io[1], 3);
        let now = Instant::now();
        s.beat(now);
        assert_eq!(s.heartbeat_age(now), Duration::ZERO);
        assert_eq!(s.heartbeat_age(now + Duration::from_secs(3)), Duration::from_secs(3));
    }
}
