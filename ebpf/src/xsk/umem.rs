//! The UMEM: one anonymous mapping cut into equal frames.

use std::io;
use std::ptr::NonNull;

use super::sys::{XDP_PACKET_HEADROOM, XSK_TX_METADATA_SIZE};

/// Shape of a UMEM and of its fill and completion rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UmemConfig {
    /// Number of frames (default 4096).
    pub frame_count: u32,
    /// Bytes per frame: a power of two from 2048 to the page size (default
    /// 4096). Aligned-chunk mode: a frame is a UMEM "chunk".
    pub frame_size: u32,
    /// Extra bytes the kernel leaves free before each received packet, on top
    /// of its own `XDP_PACKET_HEADROOM` (256) in which the XDP program's
    /// metadata lives (default 0).
    pub headroom: u32,
    /// Fill ring entries, a power of two (default 2048).
    pub fill_size: u32,
    /// Completion ring entries, a power of two (default 2048).
    pub comp_size: u32,
    /// Bytes reserved before each TX packet for `struct xsk_tx_metadata`: 0
    /// (off) or a multiple of 8 below 256, normally
    /// [`XSK_TX_METADATA_SIZE`] (24; 16 is enough before Linux 6.15 and when
    /// launch time is never asked for). Default 0.
    pub tx_metadata_len: u32,
}

impl Default for UmemConfig {
    fn default() -> Self {
        Self { frame_count: 4096, frame_size: 4096, headroom: 0, fill_size: 2048, comp_size: 2048, tx_metadata_len: 0 }
    }
}

impl UmemConfig {
    /// The default shape with TX metadata enabled (`tx_metadata_len` =
    /// [`XSK_TX_METADATA_SIZE`]).
    pub fn with_tx_metadata(mut self) -> Self {
        self.tx_metadata_len = XSK_TX_METADATA_SIZE;
        self
    }

    /// Checks what the kernel would refuse, with a readable message.
    pub fn validate(&self) -> io::Result<()> {
        let page = page_size();
        let bad = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        if self.frame_count == 0 {
            return bad("UMEM frame_count must be > 0".into());
        }
        if !self.frame_size.is_power_of_two() || self.frame_size < 2048 || self.frame_size as usize > page {
            return bad(format!("UMEM frame_size {} must be a power of two in 2048..={page}", self.frame_size));
        }
        if self.headroom + XDP_PACKET_HEADROOM + 64 > self.frame_size {
            return bad(format!("UMEM headroom {} leaves no room for a packet", self.headroom));
        }
        if !self.tx_metadata_len.is_multiple_of(8) || self.tx_metadata_len >= 256 {
            return bad(format!("tx_metadata_len {} must be a multiple of 8 below 256", self.tx_metadata_len));
        }
        for (name, v) in [("fill_size", self.fill_size), ("comp_size", self.comp_size)] {
            if !v.is_power_of_two() {
                return bad(format!("{name} {v} must be a power of two"));
            }
        }
        if u64::from(self.frame_count) * u64::from(self.frame_size) > isize::MAX as u64 {
            return bad("UMEM too large".into());
        }
        Ok(())
    }

    /// Bytes of the UMEM.
    pub fn len(&self) -> usize {
        self.frame_count as usize * self.frame_size as usize
    }

    /// Whether the UMEM would have no bytes (never for a valid config).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The UMEM memory: `frame_count * frame_size` bytes, page aligned, zeroed.
///
/// It is registered with the kernel (`XDP_UMEM_REG`) by the socket that takes
/// it ([`XskSocket::new`](super::XskSocket::new)), which then owns it: one
/// UMEM per socket. Frames are addressed by their UMEM offset ("address"),
/// as in the rings; [`frame_addr`](Self::frame_addr) gives frame `i`'s base.
///
/// No Rust reference ever covers the whole area, only frames userspace owns
/// at the time (the kernel writes into the others), through
/// [`frame`](Self::frame)/[`frame_mut`](Self::frame_mut).
#[derive(Debug)]
pub struct Umem {
    ptr: NonNull<u8>,
    map_len: usize,
    cfg: UmemConfig,
}

// SAFETY: `Umem` owns its mapping exclusively (like a `Box<[u8]>`); frame access
// follows `&`/`&mut` borrows of the `Umem`.
unsafe impl Send for Umem {}
// SAFETY: shared access only reads through `&self` methods returning `&[u8]`.
unsafe impl Sync for Umem {}

impl Umem {
    /// Maps the UMEM (anonymous, private, populated); asks for transparent
    /// huge pages, best effort.
    pub fn new(cfg: UmemConfig) -> io::Result<Self> {
        cfg.validate()?;
        let page = page_size();
        let map_len = cfg.len().div_ceil(page) * page;
        // SAFETY: anonymous mapping at a kernel-chosen address; no existing
        // memory is affected. The result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: advisory call on the mapping just made; failure (no THP) is fine.
        let _ = unsafe { libc::madvise(ptr, map_len, libc::MADV_HUGEPAGE) };
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, map_len, cfg })
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &UmemConfig {
        &self.cfg
    }

    /// Number of frames.
    pub fn frame_count(&self) -> u32 {
        self.cfg.frame_count
    }

    /// Bytes per frame.
    pub fn frame_size(&self) -> u32 {
        self.cfg.frame_size
    }

    /// Bytes reserved before a TX packet for TX metadata (0 = off).
    pub fn tx_metadata_len(&self) -> u32 {
        self.cfg.tx_metadata_len
    }

    /// Start of the area, for `XDP_UMEM_REG`.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The UMEM address of frame `i`'s first byte.
    ///
    /// # Panics
    /// If `i >= frame_count`.
    pub fn frame_addr(&self, i: u32) -> u64 {
        assert!(i < self.cfg.frame_count, "frame {i} out of {}", self.cfg.frame_count);
        u64::from(i) * u64::from(self.cfg.frame_size)
    }

    /// The base address of the frame holding `addr`.
    pub fn frame_base(&self, addr: u64) -> u64 {
        addr & !(u64::from(self.cfg.frame_size) - 1)
    }

    /// Bytes from `addr` to the end of its frame.
    ///
    /// # Panics
    /// If `addr` is outside the UMEM.
    pub fn frame(&self, addr: u64) -> &[u8] {
        let (off, len) = self.span(addr);
        let start = self.ptr.as_ptr().wrapping_add(off);
        // SAFETY: `span` keeps `off..off+len` inside the mapping (so `start` is
        // in bounds); the shared borrow of `self` forbids `frame_mut` meanwhile.
        unsafe { std::slice::from_raw_parts(start, len) }
    }

    /// Bytes from `addr` to the end of its frame, writable.
    ///
    /// # Panics
    /// If `addr` is outside the UMEM.
    pub fn frame_mut(&mut self, addr: u64) -> &mut [u8] {
        let (off, len) = self.span(addr);
        let start = self.ptr.as_ptr().wrapping_add(off);
        // SAFETY: `span` keeps `off..off+len` inside the mapping (so `start` is
        // in bounds); the exclusive borrow of `self` makes this the only
        // reference into it.
        unsafe { std::slice::from_raw_parts_mut(start, len) }
    }

    /// The whole frame holding `addr` and `addr`'s offset in it: for looking
    /// at the headroom (metadata) in front of a packet and the packet at once.
    ///
    /// # Panics
    /// If `addr` is outside the UMEM.
    pub fn chunk_mut(&mut self, addr: u64) -> (&mut [u8], usize) {
        let base = self.frame_base(addr);
        let offset = (addr - base) as usize;
        (self.frame_mut(base), offset)
    }

    /// Whether `addr` lies inside the UMEM.
    pub fn contains(&self, addr: u64) -> bool {
        addr < self.cfg.len() as u64
    }

    fn span(&self, addr: u64) -> (usize, usize) {
        assert!(self.contains(addr), "UMEM address {addr:#x} out of range");
        let off = addr as usize;
        let end = self.frame_base(addr) as usize + self.cfg.frame_size as usize;
        (off, end - off)
    }
}

impl Drop for Umem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference into it
        // outlives `self` (all borrow `self`). A socket registered with it owns
        // it and closes first (field order in `XskSocket`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> UmemConfig {
        UmemConfig { frame_count: 8, frame_size: 2048, ..UmemConfig::default() }
    }

    #[test]
    fn frames_are_addressed_and_bounded() {
        let mut u = Umem::new(small()).unwrap();
        assert_eq!(u.frame_addr(3), 3 * 2048);
        assert_eq!(u.frame(u.frame_addr(3)).len(), 2048);
        assert_eq!(u.frame(3 * 2048 + 256).len(), 2048 - 256);
        u.frame_mut(2048 + 10)[0] = 0xab;
        assert_eq!(u.frame(2048)[10], 0xab);
        let (chunk, off) = u.chunk_mut(2048 + 10);
        assert_eq!((chunk.len(), off, chunk[10]), (2048, 10, 0xab));
        assert!(u.contains(8 * 2048 - 1));
        assert!(!u.contains(8 * 2048));
        // Whole area writable, last byte included.
        u.frame_mut(8 * 2048 - 1)[0] = 1;
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn frame_out_of_range_panics() {
        let u = Umem::new(small()).unwrap();
        let _ = u.frame(8 * 2048);
    }

    #[test]
    fn config_validation() {
        let ok = UmemConfig::default();
        assert!(ok.validate().is_ok());
        assert!(ok.with_tx_metadata().validate().is_ok());
        for bad in [
            UmemConfig { frame_size: 3000, ..ok },
            UmemConfig { frame_size: 1024, ..ok },
            UmemConfig { frame_count: 0, ..ok },
            UmemConfig { fill_size: 1000, ..ok },
            UmemConfig { tx_metadata_len: 12, ..ok },
            UmemConfig { tx_metadata_len: 256, ..ok },
            UmemConfig { headroom: 4000, ..ok },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
