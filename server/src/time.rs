//! Reading the system clock in NTP format.

use std::time::{SystemTime, UNIX_EPOCH};

use chime_proto::NtpTimestamp;

/// The system (UTC, `CLOCK_REALTIME`) time now, in NTP format.
pub fn now_ntp() -> NtpTimestamp {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => NtpTimestamp::from_unix(d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => NtpTimestamp::from_unix_nanos(-(e.duration().as_nanos() as i128)),
    }
}

/// The system time now as Unix seconds (for resolving NTP eras).
pub fn now_unix_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}
