//! Server residence time (T3 − T2: transmit minus receive timestamp of a
//! reply) per worker, in HDR histograms.
//!
//! Each worker owns a [`Residence`] with two preallocated histograms (the
//! transmit time written into the reply, and the precise transmit stamp
//! learned afterwards) over fixed bounds, 1 ns to [`MAX_NS`] with three
//! significant digits: recording is an index computation and an increment,
//! no allocation (values outside the bounds are clamped). About once a
//! second the worker copies them into its [`ResidenceCell`] (a mutex no
//! packet touches); the metrics endpoint merges the cells of all workers.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Largest residence recorded, in nanoseconds (longer values count as this).
pub const MAX_NS: u64 = 10_000_000_000;

/// How often a worker publishes its histograms.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// The quantiles exported.
pub const QUANTILES: [(f64, &str); 5] = [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99"), (0.999, "0.999"), (1.0, "1")];

/// Which transmit time a residence is measured to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResidenceKind {
    /// The transmit timestamp written into the reply (taken just before
    /// sending).
    Written,
    /// The precise transmit stamp of the sent datagram (kernel or NIC).
    Precise,
}

impl ResidenceKind {
    /// Every kind, in storage order.
    pub const ALL: [Self; 2] = [Self::Written, Self::Precise];

    /// Stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::Precise => "precise",
        }
    }
}

/// A histogram with chime's fixed bounds.
pub fn new_histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, MAX_NS, 3).expect("constant, valid histogram bounds");
    h.auto(false);
    h
}

/// One worker's histograms (owned by the worker thread).
#[derive(Debug)]
pub struct Residence {
    hist: [Histogram<u64>; 2],
    last_publish: Instant,
    dirty: bool,
}

impl Default for Residence {
    fn default() -> Self {
        Self::new()
    }
}

impl Residence {
    /// Empty histograms.
    pub fn new() -> Self {
        Self { hist: [new_histogram(), new_histogram()], last_publish: Instant::now(), dirty: false }
    }

    /// Records a residence of `ns` nanoseconds (clamped to 1..=[`MAX_NS`];
    /// negative values, a clock step between the stamps, are not recorded).
    pub fn record(&mut self, kind: ResidenceKind, ns: i64) {
        if ns < 0 {
            return;
        }
        let v = (ns as u64).clamp(1, MAX_NS);
        // Within the bounds by construction: cannot fail or allocate.
        let _ = self.hist[kind as usize].record(v);
        self.dirty = true;
    }

    /// The histogram of one kind.
    pub fn histogram(&self, kind: ResidenceKind) -> &Histogram<u64> {
        &self.hist[kind as usize]
    }

    /// Copies the histograms into `cell` if [`PUBLISH_INTERVAL`] has passed
    /// (or `force`) and something was recorded.
    pub fn maybe_publish(&mut self, cell: &ResidenceCell, force: bool) {
        if !self.dirty || (!force && self.last_publish.elapsed() < PUBLISH_INTERVAL) {
            return;
        }
        self.last_publish = Instant::now();
        self.dirty = false;
        let mut guard = cell.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (dst, src) in guard.iter_mut().zip(&self.hist) {
            dst.reset();
            // Same bounds: no resize, cannot fail.
            let _ = dst.add(src);
        }
    }
}

/// A worker's last published histograms, read by the metrics endpoint.
#[derive(Debug)]
pub struct ResidenceCell {
    inner: Mutex<[Histogram<u64>; 2]>,
}

impl Default for ResidenceCell {
    fn default() -> Self {
        Self { inner: Mutex::new([new_histogram(), new_histogram()]) }
    }
}

impl ResidenceCell {
    /// Adds this cell's histogram of `kind` into `into`.
    pub fn merge_into(&self, kind: ResidenceKind, into: &mut Histogram<u64>) {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = into.add(&guard[kind as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_publish_merge() {
        let mut a = Residence::new();
        let mut b = Residence::new();
        for ns in 1..=1000 {
            a.record(ResidenceKind::Written, ns * 1000);
        }
        b.record(ResidenceKind::Written, 5_000_000);
        b.record(ResidenceKind::Precise, 20_000);
        a.record(ResidenceKind::Written, -5);
        a.record(ResidenceKind::Precise, i64::MAX);
        let (ca, cb) = (ResidenceCell::default(), ResidenceCell::default());
        a.maybe_publish(&ca, true);
        b.maybe_publish(&cb, true);
        let mut all = new_histogram();
        ca.merge_into(ResidenceKind::Written, &mut all);
        cb.merge_into(ResidenceKind::Written, &mut all);
        assert_eq!(all.len(), 1001);
        let median = all.value_at_quantile(0.5);
        assert!((499_000..=502_000).contains(&median), "{median}");
        assert!(all.max() >= 4_990_000);
        let mut precise = new_histogram();
        ca.merge_into(ResidenceKind::Precise, &mut precise);
        assert_eq!(precise.len(), 1);
        assert!(precise.max() >= MAX_NS - MAX_NS / 1000, "clamped to the bound");
    }
}
