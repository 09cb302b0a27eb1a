//! The open-file limit (`RLIMIT_NOFILE`).
//!
//! The soft limit is often 1024 (systemd's default for services, and many
//! shells'), fewer than the NTS-KE server keeps open under a connection
//! flood; the hard limit is far higher (systemd: 524288). chimed raises the
//! soft limit to the hard one at start, which needs no privilege.

use std::io;

/// The soft and hard limits on open files.
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable `rlimit` for the duration of the
    // call, which only writes it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Raises the soft limit on open files to the hard limit; returns the
/// limits before and after (soft, hard).
pub fn raise_nofile() -> io::Result<((u64, u64), (u64, u64))> {
    let before = nofile()?;
    let (soft, hard) = before;
    if soft < hard {
        let lim = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: `lim` is a valid `rlimit` the call only reads.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, nofile()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_ends_with_soft_equal_to_hard() {
        let (before, after) = raise_nofile().unwrap();
        assert_eq!(after.1, before.1, "the hard limit is untouched");
        assert_eq!(after.0, after.1);
        assert!(after.0 >= before.0);
    }
}
