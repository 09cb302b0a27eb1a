//! The kernel source: `adjtimex(2)`, read-only. Whatever disciplines the
//! system clock (chronyd, ntpd, phc2sys) reports to the kernel whether it
//! is synchronized, a bound on its error (`maxerror`, grown by the kernel
//! at 500 ppm between updates) and any leap second armed. The kernel does
//! not know the stratum, reference or root delay: those come from the
//! configuration (`upstream.stratum`, `upstream.reference_id`), root delay
//! is 0 and root dispersion is `maxerror`.

use chime_proto::NtpTimestamp;
use chime_proto::packet::RefId;

use super::{UpstreamError, UpstreamSource, UpstreamState};
use crate::sys::adjtime::{KernelClock, read_kernel_clock};

/// Reads the kernel clock state.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    stratum: u8,
    reference_id: RefId,
}

impl KernelSource {
    /// Serves `stratum` and `reference_id` while the kernel is synchronized.
    pub const fn new(stratum: u8, reference_id: RefId) -> Self {
        Self { stratum, reference_id }
    }

    /// The state one kernel reading describes.
    pub fn state(&self, k: &KernelClock) -> UpstreamState {
        if !k.synchronized() {
            return UpstreamState {
                leap: k.leap(),
                offset: Some(k.offset_ns as f64 * 1e-9),
                ..UpstreamState::unsynchronized()
            };
        }
        UpstreamState {
            synchronized: true,
            leap: k.leap(),
            stratum: self.stratum,
            reference_id: self.reference_id,
            root_delay: 0.0,
            root_dispersion: k.maxerror_secs(),
            reference_time: None,
            offset: Some(k.offset_ns as f64 * 1e-9),
        }
    }
}

impl UpstreamSource for KernelSource {
    fn name(&self) -> &'static str {
        "kernel"
    }

    fn read(&mut self, _now: NtpTimestamp) -> Result<UpstreamState, UpstreamError> {
        read_kernel_clock().map(|k| self.state(&k)).map_err(UpstreamError::io("adjtimex"))
    }
}

#[cfg(test)]
mod tests {
    use chime_proto::packet::LeapIndicator;

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

    const SRC: KernelSource = KernelSource::new(2, RefId([192, 0, 2, 1]));

    #[test]
    fn synchronized_kernel() {
        let s = SRC.state(&kernel(ClockState::Ok, STA_PLL | STA_NANO, 2500));
        assert!(s.synchronized);
        assert_eq!((s.stratum, s.reference_id), (2, RefId([192, 0, 2, 1])));
        assert_eq!(s.leap, LeapIndicator::NoWarning);
        assert!((s.root_dispersion - 0.0025).abs() < 1e-12);
        assert_eq!((s.root_delay, s.reference_time), (0.0, None));
        assert!((s.offset.unwrap() - 1.5e-6).abs() < 1e-15);
    }

    #[test]
    fn unsynchronized_kernel() {
        assert!(!SRC.state(&kernel(ClockState::Error, STA_UNSYNC, 16_000_000)).synchronized);
        // STA_UNSYNC alone is enough.
        assert!(!SRC.state(&kernel(ClockState::Ok, STA_UNSYNC, 1000)).synchronized);
    }

    #[test]
    fn leap_insert_and_delete() {
        let leap = |state, status| SRC.state(&kernel(state, status, 100)).leap;
        assert_eq!(leap(ClockState::InsertLeap, STA_INS), LeapIndicator::InsertSecond);
        assert_eq!(leap(ClockState::Ok, STA_INS), LeapIndicator::InsertSecond);
        assert_eq!(leap(ClockState::DeleteLeap, STA_DEL), LeapIndicator::DeleteSecond);
        assert_eq!(leap(ClockState::LeapOccurred, STA_INS), LeapIndicator::NoWarning);
    }

    #[test]
    fn reads_this_machine() {
        let mut k = SRC;
        k.read(NtpTimestamp::ZERO).unwrap();
        assert_eq!(k.name(), "kernel");
    }
}
