//! Seeds from the operating system's random number generator.

use std::fs::File;
use std::io::{self, Read};

/// Eight random bytes from the kernel (`getrandom(2)`, falling back to
/// `/dev/urandom` where the system call does not exist). Blocks only while
/// the kernel's pool is not yet initialised, early in boot.
pub fn random_u64() -> io::Result<u64> {
    let mut buf = [0u8; 8];
    fill(&mut buf)?;
    Ok(u64::from_ne_bytes(buf))
}

/// Fills `buf` with random bytes from the kernel.
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    // Bounded: getrandom returns at least one byte per successful call and
    // 256 bytes or fewer never come back short; EINTR is retried a few times.
    let mut interrupts = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes
        // for the duration of the call; flags 0 is a plain blocking read.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r > 0 {
            done += r as usize;
            continue;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) if interrupts < 16 => interrupts += 1,
            Some(libc::ENOSYS) => return File::open("/dev/urandom")?.read_exact(&mut buf[done..]),
            _ => return Err(err),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_seeds_differ() {
        let a = random_u64().unwrap();
        let b = random_u64().unwrap();
        assert_ne!(a, b);
    }
}
