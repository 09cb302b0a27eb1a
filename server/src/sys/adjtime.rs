//! Reading the kernel's NTP clock state (`adjtimex(2)` with `modes = 0`).
//!
//! Whatever disciplines the system clock (chronyd, ntpd, ptp4l + phc2sys)
//! tells the kernel how good the clock is: whether it is synchronized, a
//! bound on its error (`maxerror`), an estimate of it (`esterror`) and any
//! leap second armed for the end of the day. chimed only ever *reads* this
//! state; it never adjusts the clock.

use std::io;

use chime_proto::packet::LeapIndicator;

/// `STA_PLL`: phase-locked loop updates enabled.
pub const STA_PLL: i32 = 0x0001;
/// `STA_PPSFREQ`: PPS frequency discipline enabled.
pub const STA_PPSFREQ: i32 = 0x0002;
/// `STA_PPSTIME`: PPS time discipline enabled.
pub const STA_PPSTIME: i32 = 0x0004;
/// `STA_FLL`: frequency-locked loop mode.
pub const STA_FLL: i32 = 0x0008;
/// `STA_INS`: insert a leap second at the end of the UTC day.
pub const STA_INS: i32 = 0x0010;
/// `STA_DEL`: delete a leap second at the end of the UTC day.
pub const STA_DEL: i32 = 0x0020;
/// `STA_UNSYNC`: the clock is not synchronized.
pub const STA_UNSYNC: i32 = 0x0040;
/// `STA_FREQHOLD`: hold the frequency.
pub const STA_FREQHOLD: i32 = 0x0080;
/// `STA_PPSSIGNAL`: a PPS signal is present.
pub const STA_PPSSIGNAL: i32 = 0x0100;
/// `STA_CLOCKERR`: clock hardware fault.
pub const STA_CLOCKERR: i32 = 0x1000;
/// `STA_NANO`: `offset` and the time's sub-second part are in nanoseconds
/// (else microseconds).
pub const STA_NANO: i32 = 0x2000;

/// The kernel clock state machine, as `adjtimex` returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClockState {
    /// `TIME_OK`: no leap second pending.
    Ok,
    /// `TIME_INS`: a leap second will be inserted at the end of the day.
    InsertLeap,
    /// `TIME_DEL`: a leap second will be deleted at the end of the day.
    DeleteLeap,
    /// `TIME_OOP`: a leap second is being inserted right now.
    LeapInProgress,
    /// `TIME_WAIT`: a leap second has just happened.
    LeapOccurred,
    /// `TIME_ERROR` (`TIME_BAD`): the clock is not synchronized.
    Error,
    /// A state this code does not know.
    Unknown(i32),
}

impl ClockState {
    /// From the return value of `adjtimex`.
    pub const fn from_raw(state: i32) -> Self {
        match state {
            0 => Self::Ok,
            1 => Self::InsertLeap,
            2 => Self::DeleteLeap,
            3 => Self::LeapInProgress,
            4 => Self::LeapOccurred,
            5 => Self::Error,
            other => Self::Unknown(other),
        }
    }

    /// The kernel's name for the state.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ok => "TIME_OK",
            Self::InsertLeap => "TIME_INS",
            Self::DeleteLeap => "TIME_DEL",
            Self::LeapInProgress => "TIME_OOP",
            Self::LeapOccurred => "TIME_WAIT",
            Self::Error => "TIME_ERROR",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// One reading of the kernel's NTP clock variables.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelClock {
    /// Clock state (the return value of `adjtimex`).
    pub state: ClockState,
    /// `STA_*` status bits.
    pub status: i32,
    /// Maximum error, microseconds: the discipline daemon's bound on the
    /// clock's error, grown by the kernel by 500 ppm per second.
    pub maxerror_us: i64,
    /// Estimated error, microseconds.
    pub esterror_us: i64,
    /// TAI − UTC, seconds (0 if nobody has told the kernel).
    pub tai_offset: i32,
    /// Remaining phase offset being slewed, nanoseconds.
    pub offset_ns: i64,
    /// Frequency correction, ppm.
    pub freq_ppm: f64,
    /// Clock precision as the kernel reports it, microseconds.
    pub precision_us: i64,
    /// PLL time constant.
    pub constant: i64,
    /// The time of the reading: Unix seconds.
    pub time_secs: i64,
    /// The time of the reading: nanoseconds within the second.
    pub time_nanos: u32,
}

impl KernelClock {
    /// Whether the kernel considers the clock synchronized: not in
    /// `TIME_ERROR` and `STA_UNSYNC` clear.
    pub fn synchronized(&self) -> bool {
        self.state != ClockState::Error && self.status & STA_UNSYNC == 0
    }

    /// The leap second announced for the end of the current UTC day.
    ///
    /// `TIME_INS`/`TIME_OOP` or `STA_INS` mean insert, `TIME_DEL` or
    /// `STA_DEL` mean delete. In `TIME_WAIT` the leap second has already
    /// happened (the daemon just has not cleared its bit yet), so nothing is
    /// announced: repeating it would tell clients to expect another one at
    /// the end of the new day.
    pub fn leap(&self) -> LeapIndicator {
        match self.state {
            ClockState::InsertLeap | ClockState::LeapInProgress => LeapIndicator::InsertSecond,
            ClockState::DeleteLeap => LeapIndicator::DeleteSecond,
            ClockState::LeapOccurred => LeapIndicator::NoWarning,
            _ if self.status & STA_INS != 0 => LeapIndicator::InsertSecond,
            _ if self.status & STA_DEL != 0 => LeapIndicator::DeleteSecond,
            _ => LeapIndicator::NoWarning,
        }
    }

    /// [`Self::maxerror_us`] in seconds.
    pub fn maxerror_secs(&self) -> f64 {
        self.maxerror_us as f64 / 1e6
    }

    /// [`Self::esterror_us`] in seconds.
    pub fn esterror_secs(&self) -> f64 {
        self.esterror_us as f64 / 1e6
    }
}

/// Reads the kernel clock state without changing anything (`modes = 0`
/// needs no privilege).
// `timex` fields are `c_long` on 64-bit targets and `c_longlong` on 32-bit
// ones with 64-bit time: the casts are needed on some targets only.
#[allow(clippy::unnecessary_cast)]
pub fn read_kernel_clock() -> io::Result<KernelClock> {
    // SAFETY: `timex` is a plain C struct of integers (and a `timeval`), for
    // which all-zero bytes are a valid value; `modes = 0` is the zero value.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: `tx` is a valid, exclusively borrowed `timex` that lives
    // across the call; with `modes == 0` the kernel only writes into it and
    // does not change the clock.
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return Err(io::Error::last_os_error());
    }
    let status = tx.status as i32;
    let nano = status & STA_NANO != 0;
    let sub = tx.time.tv_usec as i64;
    let (offset_ns, time_nanos) =
        if nano { (tx.offset as i64, sub) } else { ((tx.offset as i64).saturating_mul(1000), sub * 1000) };
    Ok(KernelClock {
        state: ClockState::from_raw(state),
        status,
        maxerror_us: tx.maxerror as i64,
        esterror_us: tx.esterror as i64,
        tai_offset: tx.tai as i32,
        offset_ns,
        // Scaled ppm: 16-bit binary fraction.
        freq_ppm: tx.freq as i64 as f64 / 65536.0,
        precision_us: tx.precision as i64,
        constant: tx.constant as i64,
        time_secs: tx.time.tv_sec as i64,
        time_nanos: time_nanos.clamp(0, 999_999_999) as u32,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    #[test]
    fn reads_sane_values() {
        let k = read_kernel_clock().expect("adjtimex(modes=0) works unprivileged");
        assert!(!matches!(k.state, ClockState::Unknown(_)), "{k:?}");
        // The kernel caps maxerror at NTP_PHASE_LIMIT (16 s) and esterror
        // likewise; both are non-negative.
        assert!((0..=16_000_000).contains(&k.maxerror_us), "{k:?}");
        assert!((0..=16_000_000).contains(&k.esterror_us), "{k:?}");
        // The kernel limits the frequency correction to ±500 ppm.
        assert!(k.freq_ppm.abs() <= 500.0 + 1e-9, "{k:?}");
        assert!((0..=10_000).contains(&k.tai_offset), "{k:?}");
        assert!(k.precision_us >= 0, "{k:?}");
        assert!(k.time_nanos < 1_000_000_000);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((k.time_secs - now).abs() <= 2, "kernel time {} vs {now}", k.time_secs);
        // Consistency between the state and the derived predicates.
        if k.state == ClockState::Error {
            assert!(!k.synchronized());
        }
    }

    fn fake(state: ClockState, status: i32) -> KernelClock {
        KernelClock {
            state,
            status,
            maxerror_us: 0,
            esterror_us: 0,
            tai_offset: 37,
            offset_ns: 0,
            freq_ppm: 0.0,
            precision_us: 1,
            constant: 0,
            time_secs: 0,
            time_nanos: 0,
        }
    }

    #[test]
    fn synchronized_and_leap() {
        assert!(fake(ClockState::Ok, STA_PLL | STA_NANO).synchronized());
        assert!(!fake(ClockState::Ok, STA_UNSYNC).synchronized());
        assert!(!fake(ClockState::Error, 0).synchronized());
        assert_eq!(fake(ClockState::Ok, 0).leap(), LeapIndicator::NoWarning);
        assert_eq!(fake(ClockState::Ok, STA_INS).leap(), LeapIndicator::InsertSecond);
        assert_eq!(fake(ClockState::InsertLeap, STA_INS).leap(), LeapIndicator::InsertSecond);
        assert_eq!(fake(ClockState::LeapInProgress, STA_INS).leap(), LeapIndicator::InsertSecond);
        assert_eq!(fake(ClockState::LeapOccurred, STA_INS).leap(), LeapIndicator::NoWarning);
        assert_eq!(fake(ClockState::Ok, STA_DEL).leap(), LeapIndicator::DeleteSecond);
        assert_eq!(fake(ClockState::DeleteLeap, STA_DEL).leap(), LeapIndicator::DeleteSecond);
        assert_eq!(ClockState::from_raw(5), ClockState::Error);
        assert_eq!(ClockState::from_raw(9), ClockState::Unknown(9));
    }

    #[test]
    fn libc_constants_agree() {
        assert_eq!(STA_INS, libc::STA_INS);
        assert_eq!(STA_DEL, libc::STA_DEL);
        assert_eq!(STA_UNSYNC, libc::STA_UNSYNC);
        assert_eq!(STA_NANO, libc::STA_NANO);
        assert_eq!(ClockState::from_raw(libc::TIME_ERROR), ClockState::Error);
        assert_eq!(ClockState::from_raw(libc::TIME_WAIT), ClockState::LeapOccurred);
        assert_eq!(ClockState::from_raw(libc::TIME_OOP), ClockState::LeapInProgress);
    }
}
