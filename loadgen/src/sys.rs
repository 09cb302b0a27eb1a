//! Small `unsafe` wrappers over the Linux calls std does not offer:
//! `sendmmsg`/`recvmmsg` batches on a connected UDP socket (with the
//! kernel's `SO_TIMESTAMPNS` receive stamp), a few socket options, `epoll`
//! for threads that own many sockets, and the kernel's TAI offset.
//!
//! The batch buffers are owned here and allocated once; the `iovec` and
//! `mmsghdr` arrays that point into them are built on the stack for each
//! call, so nothing holding a raw pointer outlives the call (and the owning
//! structs stay `Send`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// Largest datagram a batch slot holds: a whole UDP payload over IPv4 on a
/// 1500-byte MTU (an NTS request or reply with eight cookies is about
/// 1 kB; `--kind fuzz` sends up to this).
pub const SLOT: usize = 1472;

/// Most datagrams one `sendmmsg`/`recvmmsg` call moves.
pub const MAX_BATCH: usize = 64;

/// Control-message room per received datagram (one `SCM_TIMESTAMPNS`).
const CTRL: usize = 64;

/// A batch of datagram buffers: `MAX_BATCH` slots of `SLOT` bytes, with the
/// length of each and, after a receive, the kernel's receive time.
#[derive(Debug)]
pub struct Batch {
    buf: Box<[u8]>,
    ctrl: Box<[u8]>,
    /// Length of each datagram.
    pub lens: [usize; MAX_BATCH],
    /// Receive time of each datagram (ns since the Unix epoch, kernel
    /// stamp when present, else 0).
    pub stamps: [u64; MAX_BATCH],
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    /// A zeroed batch.
    pub fn new() -> Self {
        Self {
            buf: vec![0u8; SLOT * MAX_BATCH].into_boxed_slice(),
            ctrl: vec![0u8; CTRL * MAX_BATCH].into_boxed_slice(),
            lens: [0; MAX_BATCH],
            stamps: [0; MAX_BATCH],
        }
    }

    /// Slot `i`, all `SLOT` bytes.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[i * SLOT..(i + 1) * SLOT]
    }

    /// Copies the first `len` bytes of slot `from` to slot `to`.
    pub fn move_slot(&mut self, from: usize, to: usize, len: usize) {
        let len = len.min(SLOT);
        self.buf.copy_within(from * SLOT..from * SLOT + len, to * SLOT);
    }

    /// The datagram in slot `i` (its first `lens[i]` bytes).
    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.buf[i * SLOT..i * SLOT + self.lens[i].min(SLOT)]
    }

    /// The datagram in slot `i`, mutable (NTS replies are decrypted in place).
    pub fn datagram_mut(&mut self, i: usize) -> &mut [u8] {
        let len = self.lens[i].min(SLOT);
        &mut self.buf[i * SLOT..i * SLOT + len]
    }
}

fn iovecs(base: *mut u8, lens: &[usize; MAX_BATCH], n: usize) -> [libc::iovec; MAX_BATCH] {
    std::array::from_fn(|i| libc::iovec {
        iov_base: base.wrapping_add(i * SLOT).cast(),
        iov_len: if i < n { lens[i].min(SLOT) } else { 0 },
    })
}

fn zeroed_headers() -> [libc::mmsghdr; MAX_BATCH] {
    // SAFETY: `mmsghdr` is a plain C struct of integers and raw pointers,
    // for which all-zero bytes are a valid value (null pointers, zero
    // lengths).
    unsafe { std::mem::zeroed() }
}

/// Sends the first `n` datagrams of `batch` on the connected socket `fd`;
/// returns how many the kernel took (fewer when its buffer is full).
pub fn send_batch(fd: RawFd, batch: &mut Batch, n: usize) -> io::Result<usize> {
    let n = n.min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    let mut iov = iovecs(batch.buf.as_mut_ptr(), &batch.lens, n);
    let mut hdr = zeroed_headers();
    for (h, v) in hdr.iter_mut().zip(iov.iter_mut()).take(n) {
        h.msg_hdr.msg_iov = v;
        h.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `hdr[..n]` are initialised headers whose single iovec each
    // points into `batch.buf` within bounds (slot i, at most SLOT bytes);
    // both arrays and the buffer outlive the call; the socket is connected,
    // so no address is needed.
    let r = unsafe { libc::sendmmsg(fd, hdr.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
}

/// Receives up to `MAX_BATCH` datagrams from `fd` without blocking; fills
/// `batch.lens` and `batch.stamps` for the first returned count.
pub fn recv_batch(fd: RawFd, batch: &mut Batch) -> io::Result<usize> {
    let full = [SLOT; MAX_BATCH];
    let mut iov = iovecs(batch.buf.as_mut_ptr(), &full, MAX_BATCH);
    let ctrl = batch.ctrl.as_mut_ptr();
    let mut hdr = zeroed_headers();
    for (i, (h, v)) in hdr.iter_mut().zip(iov.iter_mut()).enumerate() {
        h.msg_hdr.msg_iov = v;
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_control = ctrl.wrapping_add(i * CTRL).cast();
        h.msg_hdr.msg_controllen = CTRL as _;
    }
    // SAFETY: every header points at one iovec of SLOT bytes inside
    // `batch.buf` and at CTRL bytes of `batch.ctrl` (slot i of each), all
    // alive and exclusively borrowed for the call; no timeout is passed.
    let r = unsafe {
        libc::recvmmsg(fd, hdr.as_mut_ptr(), MAX_BATCH as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut())
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = r as usize;
    for (i, h) in hdr.iter().enumerate().take(n) {
        batch.lens[i] = h.msg_len as usize;
        let clen = h.msg_hdr.msg_controllen.min(CTRL); // usize on 64-bit glibc
        batch.stamps[i] = parse_timestamp(&batch.ctrl[i * CTRL..i * CTRL + clen]).unwrap_or(0);
    }
    Ok(n)
}

/// Finds an `SCM_TIMESTAMPNS` control message in the bytes the kernel wrote
/// and returns it as ns since the Unix epoch. Parsed from bytes (native
/// endian, 64-bit Linux layout), no pointer casts.
pub fn parse_timestamp(ctrl: &[u8]) -> Option<u64> {
    const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
    let word = std::mem::size_of::<usize>();
    let mut at = 0;
    while at + HDR <= ctrl.len() {
        let len = usize::from_ne_bytes(ctrl[at..at + word].try_into().ok()?);
        let level = i32::from_ne_bytes(ctrl[at + word..at + word + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(ctrl[at + word + 4..at + word + 8].try_into().ok()?);
        if len < HDR || at + len > ctrl.len() {
            return None;
        }
        if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS && len >= HDR + 16 {
            let d = &ctrl[at + HDR..];
            let sec = i64::from_ne_bytes(d[..8].try_into().ok()?);
            let nsec = i64::from_ne_bytes(d[8..16].try_into().ok()?);
            return u64::try_from(sec).ok().map(|s| s * 1_000_000_000 + nsec as u64);
        }
        at += len.next_multiple_of(word);
    }
    None
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size; the
    // kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Turns on kernel receive timestamps (`SO_TIMESTAMPNS`) and asks for
/// `rcvbuf`/`sndbuf` bytes of socket buffer (the kernel caps them at
/// `net.core.rmem_max`/`wmem_max`; failure to grow them is not an error).
pub fn tune_socket(sock: &impl AsRawFd, rcvbuf: i32, sndbuf: i32) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, rcvbuf);
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, sndbuf);
    Ok(())
}

fn clock_ns(clock: libc::clockid_t) -> Option<i128> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec))
}

/// `CLOCK_TAI` minus `CLOCK_REALTIME`, rounded to whole seconds, in ns:
/// what turns the XDP program's `bpf_ktime_get_tai_ns()` receive stamps
/// into Unix time (37 s where something set the kernel's TAI offset, else
/// 0).
pub fn tai_offset_ns() -> i64 {
    match (clock_ns(libc::CLOCK_TAI), clock_ns(libc::CLOCK_REALTIME)) {
        (Some(tai), Some(real)) => {
            let secs = ((tai - real) as f64 / 1e9).round() as i64;
            secs * 1_000_000_000
        }
        _ => 0,
    }
}

/// An epoll instance watching sockets for input, each tagged with an index.
#[derive(Debug)]
pub struct Epoll {
    fd: std::os::fd::OwnedFd,
}

impl Epoll {
    /// A new, empty epoll instance.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with a flag; the result is checked below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor owned by no one else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Watches `sock` for input (level-triggered), reporting `index`.
    pub fn add(&self, sock: &impl AsRawFd, index: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: index };
        // SAFETY: both descriptors are open; `ev` is a live, initialised
        // event the kernel copies.
        let r = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, sock.as_raw_fd(), &mut ev) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Indexes of sockets with input, without waiting; writes at most
    /// `out.len()` and returns the count.
    pub fn ready(&self, out: &mut [u64; MAX_BATCH]) -> io::Result<usize> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; MAX_BATCH];
        // SAFETY: `evs` has room for MAX_BATCH events and lives across the
        // call; timeout 0 never blocks.
        let r = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), evs.as_mut_ptr(), MAX_BATCH as libc::c_int, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
        }
        let n = r as usize;
        for (o, e) in out.iter_mut().zip(evs.iter()).take(n) {
            *o = e.u64;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn batch_round_trip_on_loopback_with_stamps() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        tune_socket(&b, 1 << 20, 1 << 20).unwrap();
        let mut out = Batch::new();
        for i in 0..5 {
            out.slot_mut(i)[..3].copy_from_slice(&[i as u8; 3]);
            out.lens[i] = 3 + i;
        }
        assert_eq!(send_batch(a.as_raw_fd(), &mut out, 5).unwrap(), 5);
        let ep = Epoll::new().unwrap();
        ep.add(&b, 7).unwrap();
        let mut ready = [0u64; MAX_BATCH];
        let mut inb = Batch::new();
        let mut got = 0;
        for _ in 0..1000 {
            if ep.ready(&mut ready).unwrap() > 0 {
                assert_eq!(ready[0], 7);
            }
            match recv_batch(b.as_raw_fd(), &mut inb) {
                Ok(n) => {
                    for i in 0..n {
                        assert_eq!(inb.lens[i], 3 + got + i);
                        assert_eq!(inb.datagram(i)[0], (got + i) as u8);
                        assert!(inb.stamps[i] > 1_600_000_000_000_000_000, "kernel stamp present");
                    }
                    got += n;
                }
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
            if got == 5 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got, 5);
    }

    #[test]
    fn tai_offset_is_whole_seconds_and_small() {
        let off = tai_offset_ns();
        assert_eq!(off % 1_000_000_000, 0);
        assert!((0..=100_000_000_000).contains(&off), "{off}");
    }

    #[test]
    fn timestamp_parse_rejects_garbage() {
        assert_eq!(parse_timestamp(&[]), None);
        assert_eq!(parse_timestamp(&[0xFF; 40]), None);
    }
}
