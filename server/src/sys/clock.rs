//! `CLOCK_MONOTONIC` as a number, for protocols that exchange it (systemd's
//! `MONOTONIC_USEC`); `std::time::Instant` reads the same clock but does not
//! expose its value.

/// Microseconds of `CLOCK_MONOTONIC` now.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the
    // call; CLOCK_MONOTONIC always exists on Linux, so the call cannot fail.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_forward_with_instant() {
        let a = monotonic_usec();
        let start = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = monotonic_usec();
        let elapsed = start.elapsed().as_micros() as u64;
        assert!(a > 0);
        assert!(b - a >= 20_000, "{a} {b}");
        assert!(b - a <= elapsed + 5_000, "{} vs {elapsed}", b - a);
    }
}
