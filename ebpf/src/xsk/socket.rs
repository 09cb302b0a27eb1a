//! The AF_XDP socket: UMEM registration, the four rings, bind.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

use super::ring::{ConsTx, ConsumerRing, ProdTx, ProducerRing, RawRing};
use super::sys::{self, XdpDesc};
use super::umem::Umem;

/// The fill ring: free frame addresses handed to the kernel for receiving.
pub type FillRing = ProducerRing<u64>;
/// The completion ring: addresses of transmitted frames, handed back.
pub type CompRing = ConsumerRing<u64>;
/// The RX ring: descriptors of received packets.
pub type RxRing = ConsumerRing<XdpDesc>;
/// The TX ring: descriptors of packets to send.
pub type TxRing = ProducerRing<XdpDesc>;
/// A reservation on the fill ring.
pub type FillTx<'a> = ProdTx<'a, u64>;
/// A reservation on the TX ring.
pub type TxTx<'a> = ProdTx<'a, XdpDesc>;
/// A batch taken from the RX ring.
pub type RxBatch<'a> = ConsTx<'a, XdpDesc>;
/// A batch taken from the completion ring.
pub type CompBatch<'a> = ConsTx<'a, u64>;

/// Whether to bind in zero-copy mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ZeroCopy {
    /// Zero-copy where the driver supports it, else copy mode (logged).
    #[default]
    Auto,
    /// Zero-copy or fail.
    Required,
    /// Copy mode (`XDP_COPY`).
    Off,
}

/// How a socket is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindOptions {
    /// Zero-copy policy.
    pub zero_copy: ZeroCopy,
    /// Bind with `XDP_USE_NEED_WAKEUP`: the kernel says (ring flag) when it
    /// needs a syscall to make progress, saving syscalls under load.
    pub need_wakeup: bool,
    /// RX ring entries, a power of two (default 2048).
    pub rx_size: u32,
    /// TX ring entries, a power of two (default 2048).
    pub tx_size: u32,
}

impl Default for BindOptions {
    fn default() -> Self {
        Self { zero_copy: ZeroCopy::Auto, need_wakeup: true, rx_size: 2048, tx_size: 2048 }
    }
}

/// The mode a socket ended up bound in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BindMode {
    /// The NIC DMAs into and out of the UMEM.
    ZeroCopy,
    /// The kernel copies between its buffers and the UMEM.
    Copy,
}

/// The socket's `XDP_STATISTICS`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct XdpStatistics {
    /// Received packets dropped for other reasons than below.
    pub rx_dropped: u64,
    /// Invalid descriptors in the fill ring.
    pub rx_invalid_descs: u64,
    /// Invalid descriptors in the TX ring.
    pub tx_invalid_descs: u64,
    /// Packets dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty.
    pub rx_fill_ring_empty_descs: u64,
    /// Times the kernel found the TX ring empty.
    pub tx_ring_empty_descs: u64,
}

/// One mmapped ring area.
#[derive(Debug)]
struct RingMap {
    ptr: NonNull<u8>,
    len: usize,
}

impl RingMap {
    fn new(fd: BorrowedFd<'_>, len: usize, pgoff: u64) -> io::Result<Self> {
        // SAFETY: a new shared mapping of the socket's ring at a kernel-chosen
        // address; no existing memory is affected. Checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                pgoff as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, len })
    }

    /// # Safety
    /// `off` describes the ring this mapping holds (from `XDP_MMAP_OFFSETS`),
    /// with `size` descriptors of type `T` after `off.desc`, inside `len`; the
    /// result must not outlive `self`.
    unsafe fn ring<T: Copy>(&self, off: &sys::xdp_ring_offset, size: u32) -> RawRing<T> {
        assert!(off.desc as usize + size as usize * size_of::<T>() <= self.len);
        assert!(off.producer as usize + 4 <= self.len && off.consumer as usize + 4 <= self.len);
        assert!(off.flags as usize + 4 <= self.len);
        let at = |o: u64| {
            // SAFETY: `o` is inside the mapping (asserted above).
            NonNull::new(unsafe { self.ptr.as_ptr().add(o as usize) }).expect("non-null inside a mapping")
        };
        // SAFETY: the kernel places producer, consumer and flags as aligned u32s
        // and the descriptor array (aligned for `T`) at these offsets of this
        // mapping, which lives as long as the ring (caller's promise).
        unsafe {
            RawRing::new(
                at(off.producer).cast::<AtomicU32>(),
                at(off.consumer).cast::<AtomicU32>(),
                at(off.flags).cast::<AtomicU32>(),
                at(off.desc).cast::<T>(),
                size,
            )
        }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the rings pointing
        // into it are dropped before (field order in `XskSocket`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// An AF_XDP socket bound to one queue of one interface, owning its UMEM and
/// its four rings. One UMEM per socket, one socket per queue, one worker per
/// socket: no shared UMEM (`XDP_SHARED_UMEM`), so no locking anywhere.
///
/// Dropping it unmaps the rings, closes the socket (which unbinds it and
/// removes it from any XSKMAP) and unmaps the UMEM, in that order.
#[derive(Debug)]
pub struct XskSocket {
    // Field order is drop order: ring views, their mappings, the fd, the UMEM.
    fill: FillRing,
    comp: CompRing,
    rx: RxRing,
    tx: TxRing,
    _maps: [RingMap; 4],
    fd: OwnedFd,
    umem: Umem,
    mode: BindMode,
    need_wakeup: bool,
    ifindex: u32,
    queue_id: u32,
}

// SAFETY: the socket exclusively owns its fd, mappings and UMEM; the raw
// pointers in the rings point only into those mappings. Moving it to another
// thread moves all of it; the kernel side is thread-agnostic.
unsafe impl Send for XskSocket {}

/// Borrows of a socket's parts at once, for a worker's batch loop.
#[derive(Debug)]
#[non_exhaustive]
pub struct XskParts<'a> {
    /// The UMEM.
    pub umem: &'a mut Umem,
    /// Fill ring.
    pub fill: &'a mut FillRing,
    /// Completion ring.
    pub comp: &'a mut CompRing,
    /// RX ring.
    pub rx: &'a mut RxRing,
    /// TX ring.
    pub tx: &'a mut TxRing,
}

impl XskSocket {
    /// Creates a socket, registers `umem` with it, sets up the rings and binds
    /// to `queue_id` of `ifindex`.
    ///
    /// With [`ZeroCopy::Auto`], a zero-copy bind refused with `EOPNOTSUPP` or
    /// `EINVAL` is retried in copy mode on a fresh socket (logged at info).
    /// An XDP program must redirect to this socket (an XSKMAP entry) for it to
    /// receive anything; binding works without one.
    pub fn new(umem: Umem, ifindex: u32, queue_id: u32, opts: BindOptions) -> io::Result<Self> {
        for (name, v) in [("rx_size", opts.rx_size), ("tx_size", opts.tx_size)] {
            if !v.is_power_of_two() {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name} {v} must be a power of two")));
            }
        }
        let wake = if opts.need_wakeup { sys::XDP_USE_NEED_WAKEUP } else { 0 };
        match opts.zero_copy {
            ZeroCopy::Off => Self::open(umem, ifindex, queue_id, opts, sys::XDP_COPY | wake).map_err(|(e, _)| e),
            ZeroCopy::Required => {
                Self::open(umem, ifindex, queue_id, opts, sys::XDP_ZEROCOPY | wake).map_err(|(e, _)| e)
            }
            ZeroCopy::Auto => match Self::open(umem, ifindex, queue_id, opts, sys::XDP_ZEROCOPY | wake) {
                Ok(s) => Ok(s),
                Err((e, umem)) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                    tracing::info!(ifindex, queue_id, error = %e, "AF_XDP zero-copy bind refused; using copy mode");
                    Self::open(umem, ifindex, queue_id, opts, sys::XDP_COPY | wake).map_err(|(e, _)| e)
                }
                Err((e, _)) => Err(e),
            },
        }
    }

    fn open(umem: Umem, ifindex: u32, queue_id: u32, opts: BindOptions, flags: u16) -> Result<Self, (io::Error, Umem)> {
        let parts = match Self::setup(&umem, opts) {
            Ok(p) => p,
            Err(e) => return Err((e, umem)),
        };
        let (fd, maps, fill, comp, rx, tx) = parts;
        let addr = libc::sockaddr_xdp {
            sxdp_family: sys::AF_XDP as u16,
            sxdp_flags: flags,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue_id,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: `addr` is a valid sockaddr_xdp and its exact size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            drop((fill, comp, rx, tx, maps, fd));
            return Err((e, umem));
        }
        let mut sock = Self {
            fill,
            comp,
            rx,
            tx,
            _maps: maps,
            fd,
            umem,
            mode: BindMode::Copy,
            need_wakeup: false,
            ifindex,
            queue_id,
        };
        sock.need_wakeup = flags & sys::XDP_USE_NEED_WAKEUP != 0;
        sock.mode = match sock.options() {
            Ok(o) if o & sys::XDP_OPTIONS_ZEROCOPY != 0 => BindMode::ZeroCopy,
            Ok(_) => BindMode::Copy,
            Err(_) if flags & sys::XDP_ZEROCOPY != 0 => BindMode::ZeroCopy,
            Err(_) => BindMode::Copy,
        };
        tracing::debug!(ifindex, queue_id, mode = ?sock.mode, need_wakeup = sock.need_wakeup, "AF_XDP socket bound");
        Ok(sock)
    }

    #[allow(clippy::type_complexity)]
    fn setup(
        umem: &Umem,
        opts: BindOptions,
    ) -> io::Result<(OwnedFd, [RingMap; 4], FillRing, CompRing, RxRing, TxRing)> {
        // SAFETY: plain socket(2) call; the result is checked below.
        let raw = unsafe { libc::socket(sys::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let cfg = *umem.config();

        let mut reg = sys::xdp_umem_reg {
            addr: umem.as_ptr() as u64,
            len: cfg.len() as u64,
            chunk_size: cfg.frame_size,
            headroom: cfg.headroom,
            flags: 0,
            tx_metadata_len: cfg.tx_metadata_len,
        };
        if cfg.tx_metadata_len > 0 {
            reg.flags = sys::XDP_UMEM_TX_METADATA_LEN;
        }
        match setsockopt(fd.as_fd(), sys::XDP_UMEM_REG, &reg) {
            // 6.8 – 6.10 take tx_metadata_len without the flag and refuse it.
            Err(e) if reg.flags != 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                reg.flags = 0;
                setsockopt(fd.as_fd(), sys::XDP_UMEM_REG, &reg)?;
            }
            r => r?,
        }
        setsockopt(fd.as_fd(), sys::XDP_UMEM_FILL_RING, &cfg.fill_size)?;
        setsockopt(fd.as_fd(), sys::XDP_UMEM_COMPLETION_RING, &cfg.comp_size)?;
        setsockopt(fd.as_fd(), sys::XDP_RX_RING, &opts.rx_size)?;
        setsockopt(fd.as_fd(), sys::XDP_TX_RING, &opts.tx_size)?;

        // SAFETY: all-zero is a valid xdp_mmap_offsets (plain integers).
        let mut off: sys::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let got = getsockopt(fd.as_fd(), sys::XDP_MMAP_OFFSETS, &mut off)?;
        if got != size_of::<sys::xdp_mmap_offsets>() {
            return Err(io::Error::other("kernel without ring flags (XDP_MMAP_OFFSETS v1); need Linux >= 5.4"));
        }
        let span = |o: &sys::xdp_ring_offset, n: u32, elem: usize| o.desc as usize + n as usize * elem;
        let fill_map = RingMap::new(fd.as_fd(), span(&off.fr, cfg.fill_size, 8), sys::XDP_UMEM_PGOFF_FILL_RING)?;
        let comp_map = RingMap::new(fd.as_fd(), span(&off.cr, cfg.comp_size, 8), sys::XDP_UMEM_PGOFF_COMPLETION_RING)?;
        let rx_map = RingMap::new(fd.as_fd(), span(&off.rx, opts.rx_size, 16), sys::XDP_PGOFF_RX_RING as u64)?;
        let tx_map = RingMap::new(fd.as_fd(), span(&off.tx, opts.tx_size, 16), sys::XDP_PGOFF_TX_RING as u64)?;
        // Each mapping holds the ring its offsets describe; the rings are stored
        // beside their mappings and dropped before them (`XskSocket` field order).
        // SAFETY: `fill_map` is the fill ring, laid out as `off.fr` says.
        let fill = FillRing::new(unsafe { fill_map.ring(&off.fr, cfg.fill_size) });
        // SAFETY: `comp_map` is the completion ring, laid out as `off.cr` says.
        let comp = CompRing::new(unsafe { comp_map.ring(&off.cr, cfg.comp_size) });
        // SAFETY: `rx_map` is the RX ring, laid out as `off.rx` says.
        let rx = RxRing::new(unsafe { rx_map.ring(&off.rx, opts.rx_size) });
        // SAFETY: `tx_map` is the TX ring, laid out as `off.tx` says.
        let tx = TxRing::new(unsafe { tx_map.ring(&off.tx, opts.tx_size) });
        Ok((fd, [fill_map, comp_map, rx_map, tx_map], fill, comp, rx, tx))
    }

    /// Zero-copy or copy.
    pub fn bind_mode(&self) -> BindMode {
        self.mode
    }

    /// Whether bound with `XDP_USE_NEED_WAKEUP`.
    pub fn uses_need_wakeup(&self) -> bool {
        self.need_wakeup
    }

    /// The interface index bound to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The queue bound to.
    pub fn queue_id(&self) -> u32 {
        self.queue_id
    }

    /// The UMEM.
    pub fn umem(&self) -> &Umem {
        &self.umem
    }

    /// The UMEM, writable.
    pub fn umem_mut(&mut self) -> &mut Umem {
        &mut self.umem
    }

    /// The fill ring.
    pub fn fill(&mut self) -> &mut FillRing {
        &mut self.fill
    }

    /// The completion ring.
    pub fn comp(&mut self) -> &mut CompRing {
        &mut self.comp
    }

    /// The RX ring.
    pub fn rx(&mut self) -> &mut RxRing {
        &mut self.rx
    }

    /// The TX ring.
    pub fn tx(&mut self) -> &mut TxRing {
        &mut self.tx
    }

    /// The UMEM and all four rings at once.
    pub fn parts(&mut self) -> XskParts<'_> {
        XskParts {
            umem: &mut self.umem,
            fill: &mut self.fill,
            comp: &mut self.comp,
            rx: &mut self.rx,
            tx: &mut self.tx,
        }
    }

    /// Whether the TX ring needs a [`kick_tx`](Self::kick_tx) to make
    /// progress: always without need_wakeup, else when the kernel says so.
    pub fn tx_needs_wakeup(&self) -> bool {
        !self.need_wakeup || self.tx.needs_wakeup()
    }

    /// Whether the kernel wants a [`wakeup_rx`](Self::wakeup_rx) to pick up
    /// fill ring entries (only with need_wakeup; without it, never needed).
    pub fn fill_needs_wakeup(&self) -> bool {
        self.need_wakeup && self.fill.needs_wakeup()
    }

    /// Tells the kernel to transmit what is on the TX ring
    /// (`sendto(MSG_DONTWAIT)`); "busy, try later" answers (`EAGAIN`,
    /// `EBUSY`, `ENOBUFS`, `EINTR`) are not errors.
    pub fn kick_tx(&self) -> io::Result<()> {
        // SAFETY: zero-length send with no buffer and no address.
        let rc =
            unsafe { libc::sendto(self.fd.as_raw_fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT, std::ptr::null(), 0) };
        if rc >= 0 {
            return Ok(());
        }
        transient_ok(io::Error::last_os_error())
    }

    /// Asks the kernel to transmit up to `budget` frames per copy-mode kick
    /// (`XDP_MAX_TX_SKB_BUDGET`, Linux 6.17; the default is 32). Refused by
    /// older kernels (`ENOPROTOOPT`) and outside 32..=TX ring size.
    pub fn set_tx_budget(&self, budget: u32) -> io::Result<()> {
        setsockopt(self.fd.as_fd(), sys::XDP_MAX_TX_SKB_BUDGET, &budget)
    }

    /// Wakes the kernel's receive side after the fill ring was replenished
    /// (`recvfrom(MSG_DONTWAIT)`); transient errors are not errors.
    pub fn wakeup_rx(&self) -> io::Result<()> {
        // SAFETY: zero-length receive with no buffer and no address.
        let rc = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        if rc >= 0 {
            return Ok(());
        }
        transient_ok(io::Error::last_os_error())
    }

    /// Waits up to `timeout_ms` (-1: forever) for the RX ring to have
    /// entries; true if it does. Also drives RX in need_wakeup mode.
    pub fn wait_rx(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, count 1.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
        match rc {
            r if r < 0 => transient_ok(io::Error::last_os_error()).map(|()| false),
            0 => Ok(false),
            _ => Ok(pfd.revents & libc::POLLIN != 0),
        }
    }

    /// The socket's `XDP_STATISTICS`.
    pub fn statistics(&self) -> io::Result<XdpStatistics> {
        // SAFETY: all-zero is a valid xdp_statistics (plain integers).
        let mut s: sys::xdp_statistics = unsafe { std::mem::zeroed() };
        getsockopt(self.fd.as_fd(), sys::XDP_STATISTICS, &mut s)?;
        Ok(XdpStatistics {
            rx_dropped: s.rx_dropped,
            rx_invalid_descs: s.rx_invalid_descs,
            tx_invalid_descs: s.tx_invalid_descs,
            rx_ring_full: s.rx_ring_full,
            rx_fill_ring_empty_descs: s.rx_fill_ring_empty_descs,
            tx_ring_empty_descs: s.tx_ring_empty_descs,
        })
    }

    fn options(&self) -> io::Result<u32> {
        let mut o = sys::xdp_options { flags: 0 };
        getsockopt(self.fd.as_fd(), sys::XDP_OPTIONS, &mut o)?;
        Ok(o.flags)
    }
}

impl AsRawFd for XskSocket {
    /// The socket's descriptor, for an XSKMAP entry or an epoll set.
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for XskSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The interface index of `name` (`if_nametoindex`).
pub fn if_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 { Err(io::Error::last_os_error()) } else { Ok(i) }
}

fn transient_ok(e: io::Error) -> io::Result<()> {
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::EINTR) => Ok(()),
        _ => Err(e),
    }
}

fn setsockopt<T>(fd: BorrowedFd<'_>, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            sys::SOL_XDP,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Returns the length the kernel wrote.
fn getsockopt<T>(fd: BorrowedFd<'_>, name: libc::c_int, out: &mut T) -> io::Result<usize> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `out` is a live, writable `T` of the size passed; the kernel
    // writes at most `len` bytes of plain integers.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), sys::SOL_XDP, name, (out as *mut T).cast(), &raw mut len) };
    if rc == 0 { Ok(len as usize) } else { Err(io::Error::last_os_error()) }
}
