//! Batched UDP sockets for the socket backend: `recvmmsg`/`sendmmsg` over
//! preallocated buffers, kernel receive timestamps, `IP_PKTINFO` /
//! `IPV6_PKTINFO` so replies leave from the address a request was sent to,
//! and a classic-BPF `SO_REUSEPORT` program that keeps each client on one
//! socket of a group.
//!
//! All buffers (payloads, addresses, control messages, iovecs, message
//! headers) are allocated once when a [`RecvBatch`] or [`SendBatch`] is
//! made; receiving and sending allocate nothing. Socket addresses and control
//! messages are read and written as bytes in the kernel's layout by safe
//! code; `unsafe` is confined to the system calls themselves.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::time::Duration;

use chime_proto::{NtpTimestamp, RxTimestamp, StampKind};

/// Bytes of each receive and send buffer: larger than any NTP or NTS
/// request chime accepts, so a datagram that does not fit is garbage anyway
/// (it is flagged [`Datagram::truncated`]).
pub const DATAGRAM_BUF_LEN: usize = 2048;

/// The most datagrams one batch may hold (the kernel's `UIO_MAXIOV` bound on
/// `recvmmsg`/`sendmmsg`).
pub const MAX_BATCH: usize = 1024;

/// How long [`BatchSocket::send_batch`] waits for room in the send buffer
/// (once per batch) before dropping what is left.
pub const SEND_WAIT: Duration = Duration::from_millis(5);

/// Pending transmit-stamp error-queue messages read per
/// [`BatchSocket::recv_tx_stamps`] call at most.
pub const TX_STAMP_BATCH: usize = 64;

/// Room for the control messages of one received datagram: packet info (at
/// most 40 bytes with its header) and `SCM_TIMESTAMPING` (64), with slack for
/// anything else the kernel adds.
const RECV_CMSG_LEN: usize = 256;

/// Room for the one packet-info control message of a reply.
const SEND_CMSG_LEN: usize = 64;

/// `sizeof(struct sockaddr_storage)`.
const SOCKADDR_LEN: usize = 128;

const SO_TIMESTAMPING_FLAGS: libc::c_uint = libc::SOF_TIMESTAMPING_RX_SOFTWARE
    | libc::SOF_TIMESTAMPING_SOFTWARE
    | libc::SOF_TIMESTAMPING_RX_HARDWARE
    | libc::SOF_TIMESTAMPING_RAW_HARDWARE;

/// Transmit stamps on top of [`SO_TIMESTAMPING_FLAGS`]: software, and
/// hardware where the NIC takes them (the kernel then gives the hardware
/// one); each tagged with a per-socket counter (`OPT_ID`) and without the
/// packet looped back (`OPT_TSONLY`).
const SO_TIMESTAMPING_TX_FLAGS: libc::c_uint = libc::SOF_TIMESTAMPING_TX_SOFTWARE
    | libc::SOF_TIMESTAMPING_TX_HARDWARE
    | libc::SOF_TIMESTAMPING_OPT_ID
    | libc::SOF_TIMESTAMPING_OPT_TSONLY;

/// `SO_EE_ORIGIN_TIMESTAMPING` from `<linux/errqueue.h>`.
const SO_EE_ORIGIN_TIMESTAMPING: u8 = 4;
/// `SCM_TSTAMP_SND`: the stamp of the datagram leaving (not scheduling).
const SCM_TSTAMP_SND: u32 = 0;
/// `SCM_TS_OPT_ID` (`<asm-generic/socket.h>`, Linux 6.13): a control message
/// setting the `OPT_ID` key of one datagram. libc 0.2 lacks it outside
/// sparc; [`explicit_tx_keys`] checks at run time that the kernel honours it.
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SCM_TS_OPT_ID: libc::c_int = 81;
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SCM_TS_OPT_ID: libc::c_int = 0x5a;

/// Byte buffer aligned for `struct sockaddr_storage`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct SockAddrBuf([u8; SOCKADDR_LEN]);

/// Byte buffer aligned for `struct cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf<const N: usize>([u8; N]);

/// Socket settings beyond the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketOptions {
    /// Requested receive buffer (`SO_RCVBUF`), bytes; 0 keeps the system
    /// default. Best effort: `SO_RCVBUFFORCE` is tried first (it works with
    /// `CAP_NET_ADMIN`), otherwise the kernel caps it at `net.core.rmem_max`.
    pub recv_buffer: usize,
    /// Requested send buffer (`SO_SNDBUF`), bytes; 0 keeps the default.
    pub send_buffer: usize,
    /// Ask for transmit stamps on the error queue (best effort).
    pub tx_timestamps: bool,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self { recv_buffer: 4 << 20, send_buffer: 1 << 20, tx_timestamps: false }
    }
}

/// How a socket's receive timestamps are taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimestampMode {
    /// `SO_TIMESTAMPING`: software stamps, and raw hardware stamps where the
    /// NIC has been configured to take them.
    Timestamping,
    /// `SO_TIMESTAMPNS`: software stamps only (older or restricted kernels).
    TimestampNs,
    /// None: the caller reads the clock after receiving.
    None,
}

/// Where a reply goes and where it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyPath {
    /// The client (the request's source).
    pub peer: SocketAddr,
    /// Our address the reply leaves from (the request's local address, from
    /// packet info); `None` lets the kernel choose.
    pub local: Option<IpAddr>,
    /// The interface the request came in on (0: unknown, kernel chooses).
    pub ifindex: u32,
}

/// One received datagram.
#[derive(Clone, Copy, Debug)]
pub struct Datagram<'a> {
    /// The UDP payload (at most [`DATAGRAM_BUF_LEN`] bytes).
    pub payload: &'a [u8],
    /// The sender. An address family the socket cannot have gives the
    /// unspecified address and port 0, which the responder drops.
    pub source: SocketAddr,
    /// Our address the datagram was received on, from packet info: for
    /// IPv4 `ipi_spec_dst` (the destination for unicast, the receiving
    /// interface's address for broadcast), for IPv6 `ipi6_addr`.
    pub local: Option<IpAddr>,
    /// Index of the interface it arrived on (0 if unknown).
    pub ifindex: u32,
    /// The kernel's software receive timestamp, if there was one.
    pub rx: Option<RxTimestamp>,
    /// The NIC's raw hardware receive stamp (its PHC's time scale, ns), if
    /// the NIC took one.
    pub hw_ns: Option<i128>,
    /// The datagram was longer than the buffer and was cut short.
    pub truncated: bool,
}

impl Datagram<'_> {
    /// The best receive stamp: the hardware stamp converted to UTC when the
    /// PHC mapping (`phc_to_utc_ns`, UTC − PHC) is known, else the software
    /// stamp.
    pub fn stamp(&self, phc_to_utc_ns: Option<i64>) -> Option<RxTimestamp> {
        match (self.hw_ns, phc_to_utc_ns) {
            (Some(hw), Some(off)) => Some(RxTimestamp {
                time: NtpTimestamp::from_unix_nanos(hw + i128::from(off)),
                kind: StampKind::Hardware,
            }),
            _ => self.rx,
        }
    }

    /// How to answer it.
    pub fn reply_path(&self) -> ReplyPath {
        ReplyPath { peer: self.source, local: self.local, ifindex: self.ifindex }
    }
}

#[derive(Clone, Copy, Debug)]
struct RecvMeta {
    len: usize,
    source: SocketAddr,
    local: Option<IpAddr>,
    ifindex: u32,
    rx: Option<RxTimestamp>,
    hw_ns: Option<i128>,
    truncated: bool,
}

const UNKNOWN_SOURCE: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

impl RecvMeta {
    const EMPTY: Self =
        Self { len: 0, source: UNKNOWN_SOURCE, local: None, ifindex: 0, rx: None, hw_ns: None, truncated: false };
}

fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: `mmsghdr` is a C struct of integers and raw pointers, for which
    // all-zero bytes are a valid value (null pointers, zero lengths).
    unsafe { mem::zeroed() }
}

const fn empty_iovec() -> libc::iovec {
    libc::iovec { iov_base: ptr::null_mut(), iov_len: 0 }
}

/// Preallocated buffers for receiving up to `capacity` datagrams with one
/// `recvmmsg`.
///
/// Receive timestamps: the software stamp (`ts[0]` of `SCM_TIMESTAMPING`,
/// or `SCM_TIMESTAMPNS`) as [`StampKind::KernelSoftware`], and the raw
/// hardware stamp (`ts[2]`) kept apart in the NIC clock's time scale;
/// [`Datagram::stamp`] converts it through the PHC mapping (`crate::phc`)
/// when one is known, and never uses it otherwise (a PHC on TAI or
/// free-running would put wrong time into replies).
pub struct RecvBatch {
    bufs: Box<[[u8; DATAGRAM_BUF_LEN]]>,
    names: Box<[SockAddrBuf]>,
    cmsgs: Box<[CmsgBuf<RECV_CMSG_LEN>]>,
    iovecs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    meta: Box<[RecvMeta]>,
    len: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("capacity", &self.capacity()).field("len", &self.len).finish()
    }
}

impl RecvBatch {
    /// Buffers for `capacity` datagrams (clamped to 1..=[`MAX_BATCH`]).
    pub fn new(capacity: usize) -> Self {
        let n = capacity.clamp(1, MAX_BATCH);
        Self {
            bufs: vec![[0; DATAGRAM_BUF_LEN]; n].into_boxed_slice(),
            names: vec![SockAddrBuf([0; SOCKADDR_LEN]); n].into_boxed_slice(),
            cmsgs: vec![CmsgBuf([0; RECV_CMSG_LEN]); n].into_boxed_slice(),
            iovecs: vec![empty_iovec(); n].into_boxed_slice(),
            hdrs: (0..n).map(|_| zeroed_mmsghdr()).collect(),
            meta: vec![RecvMeta::EMPTY; n].into_boxed_slice(),
            len: 0,
        }
    }

    /// How many datagrams fit.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// How many datagrams the last receive brought.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the last receive brought nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Datagram `i` of the last receive.
    pub fn get(&self, i: usize) -> Option<Datagram<'_>> {
        if i >= self.len {
            return None;
        }
        let m = &self.meta[i];
        Some(Datagram {
            payload: &self.bufs[i][..m.len],
            source: m.source,
            local: m.local,
            ifindex: m.ifindex,
            rx: m.rx,
            hw_ns: m.hw_ns,
            truncated: m.truncated,
        })
    }

    /// The datagrams of the last receive, in order.
    pub fn iter(&self) -> impl Iterator<Item = Datagram<'_>> + '_ {
        (0..self.len).filter_map(|i| self.get(i))
    }

    /// Points every message header at its buffers and resets the lengths the
    /// kernel overwrites. All pointers derive from one base pointer per
    /// array, taken afresh for each call.
    fn prepare(&mut self) {
        let n = self.capacity();
        let bufs = self.bufs.as_mut_ptr();
        let names = self.names.as_mut_ptr();
        let cmsgs = self.cmsgs.as_mut_ptr();
        for (i, iov) in self.iovecs.iter_mut().enumerate() {
            *iov = libc::iovec { iov_base: bufs.wrapping_add(i).cast(), iov_len: DATAGRAM_BUF_LEN };
        }
        let iovecs = self.iovecs.as_mut_ptr();
        for (i, h) in self.hdrs.iter_mut().enumerate().take(n) {
            h.msg_len = 0;
            let m = &mut h.msg_hdr;
            m.msg_name = names.wrapping_add(i).cast();
            m.msg_namelen = SOCKADDR_LEN as libc::socklen_t;
            m.msg_iov = iovecs.wrapping_add(i);
            m.msg_iovlen = 1;
            m.msg_control = cmsgs.wrapping_add(i).cast();
            m.msg_controllen = RECV_CMSG_LEN as _;
            m.msg_flags = 0;
        }
        self.len = 0;
    }

    /// Reads what the kernel wrote for the first `n` messages.
    fn parse(&mut self, n: usize) {
        for i in 0..n {
            let h = &self.hdrs[i];
            let name_len = (h.msg_hdr.msg_namelen as usize).min(SOCKADDR_LEN);
            // `msg_controllen` is a `size_t` in glibc but a `socklen_t` in musl.
            #[allow(clippy::unnecessary_cast)]
            let ctl_len = (h.msg_hdr.msg_controllen as usize).min(RECV_CMSG_LEN);
            let flags = h.msg_hdr.msg_flags;
            let mut meta = RecvMeta {
                len: (h.msg_len as usize).min(DATAGRAM_BUF_LEN),
                source: read_sockaddr(&self.names[i].0[..name_len]).unwrap_or(UNKNOWN_SOURCE),
                truncated: flags & libc::MSG_TRUNC != 0,
                ..RecvMeta::EMPTY
            };
            parse_control(&self.cmsgs[i].0[..ctl_len], &mut meta);
            self.meta[i] = meta;
        }
        self.len = n;
    }
}

/// Fills packet info and the receive timestamp from a control buffer.
fn parse_control(buf: &[u8], meta: &mut RecvMeta) {
    let mut software = None;
    let mut hardware = None;
    for (level, kind, data) in Cmsgs(buf) {
        match (level, kind) {
            (libc::IPPROTO_IP, libc::IP_PKTINFO) if data.len() >= 12 => {
                // struct in_pktinfo { int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr; }
                meta.ifindex = i32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as u32;
                meta.local = Some(IpAddr::V4(Ipv4Addr::new(data[4], data[5], data[6], data[7])));
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) if data.len() >= 20 => {
                // struct in6_pktinfo { in6_addr ipi6_addr; unsigned ipi6_ifindex; }
                let mut a = [0u8; 16];
                a.copy_from_slice(&data[..16]);
                meta.local = Some(IpAddr::V6(Ipv6Addr::from(a)));
                meta.ifindex = u32::from_ne_bytes([data[16], data[17], data[18], data[19]]);
            }
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPING) => {
                // struct scm_timestamping { struct timespec ts[3]; }: software,
                // legacy (unused), raw hardware.
                software = read_timespec(data, 0).or(software);
                hardware = read_timespec(data, 2);
            }
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => software = read_timespec(data, 0).or(software),
            _ => {}
        }
    }
    meta.rx =
        software.map(|sw| RxTimestamp { time: NtpTimestamp::from_unix_nanos(sw), kind: StampKind::KernelSoftware });
    meta.hw_ns = hardware;
}

/// One transmit stamp from a socket's error queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxStamp {
    /// The datagram's `OPT_ID` key: the socket's count of datagrams sent
    /// before it (from 0, when timestamping was switched on).
    pub key: u32,
    /// The kernel's software transmit stamp, Unix ns.
    pub sw_ns: Option<i128>,
    /// The NIC's raw hardware transmit stamp (PHC scale), ns.
    pub hw_ns: Option<i128>,
}

/// Reads a transmit stamp from the control messages of one error-queue
/// message; `None` if it is not a send timestamp.
fn parse_tx_stamp(buf: &[u8]) -> Option<TxStamp> {
    let mut key = None;
    let (mut sw_ns, mut hw_ns) = (None, None);
    for (level, kind, data) in Cmsgs(buf) {
        match (level, kind) {
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPING) => {
                sw_ns = read_timespec(data, 0);
                hw_ns = read_timespec(data, 2);
            }
            (libc::SOL_IP, libc::IP_RECVERR) | (libc::SOL_IPV6, libc::IPV6_RECVERR) if data.len() >= 16 => {
                // struct sock_extended_err { u32 ee_errno; u8 ee_origin, ee_type,
                // ee_code, ee_pad; u32 ee_info; u32 ee_data; }
                let errno = u32::from_ne_bytes(data[0..4].try_into().ok()?);
                let info = u32::from_ne_bytes(data[8..12].try_into().ok()?);
                if errno == libc::ENOMSG as u32 && data[4] == SO_EE_ORIGIN_TIMESTAMPING && info == SCM_TSTAMP_SND {
                    key = Some(u32::from_ne_bytes(data[12..16].try_into().ok()?));
                }
            }
            _ => {}
        }
    }
    let key = key?;
    (sw_ns.is_some() || hw_ns.is_some()).then_some(TxStamp { key, sw_ns, hw_ns })
}

/// Preallocated buffers for reading up to [`TX_STAMP_BATCH`] transmit
/// stamps from a socket's error queue with one `recvmmsg(MSG_ERRQUEUE)`.
pub struct TxStampBatch {
    bufs: Box<[[u8; 64]]>,
    cmsgs: Box<[CmsgBuf<RECV_CMSG_LEN>]>,
    iovecs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    stamps: Box<[Option<TxStamp>]>,
    len: usize,
}

impl std::fmt::Debug for TxStampBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxStampBatch").field("len", &self.len).finish()
    }
}

impl Default for TxStampBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl TxStampBatch {
    /// Buffers for [`TX_STAMP_BATCH`] messages.
    pub fn new() -> Self {
        let n = TX_STAMP_BATCH;
        Self {
            bufs: vec![[0; 64]; n].into_boxed_slice(),
            cmsgs: vec![CmsgBuf([0; RECV_CMSG_LEN]); n].into_boxed_slice(),
            iovecs: vec![empty_iovec(); n].into_boxed_slice(),
            hdrs: (0..n).map(|_| zeroed_mmsghdr()).collect(),
            stamps: vec![None; n].into_boxed_slice(),
            len: 0,
        }
    }

    /// The stamps of the last read (messages that were not send stamps are
    /// skipped).
    pub fn iter(&self) -> impl Iterator<Item = TxStamp> + '_ {
        self.stamps[..self.len].iter().flatten().copied()
    }

    fn prepare(&mut self) {
        let bufs = self.bufs.as_mut_ptr();
        let cmsgs = self.cmsgs.as_mut_ptr();
        for (i, iov) in self.iovecs.iter_mut().enumerate() {
            *iov = libc::iovec { iov_base: bufs.wrapping_add(i).cast(), iov_len: 64 };
        }
        let iovecs = self.iovecs.as_mut_ptr();
        for (i, h) in self.hdrs.iter_mut().enumerate() {
            h.msg_len = 0;
            let m = &mut h.msg_hdr;
            m.msg_name = ptr::null_mut();
            m.msg_namelen = 0;
            m.msg_iov = iovecs.wrapping_add(i);
            m.msg_iovlen = 1;
            m.msg_control = cmsgs.wrapping_add(i).cast();
            m.msg_controllen = RECV_CMSG_LEN as _;
            m.msg_flags = 0;
        }
        self.len = 0;
    }

    fn parse(&mut self, n: usize) {
        for i in 0..n {
            #[allow(clippy::unnecessary_cast)]
            let ctl_len = (self.hdrs[i].msg_hdr.msg_controllen as usize).min(RECV_CMSG_LEN);
            self.stamps[i] = parse_tx_stamp(&self.cmsgs[i].0[..ctl_len]);
        }
        self.len = n;
    }
}

/// `timespec` number `index` of an array in `data`, as Unix nanoseconds;
/// `None` if absent, zero or malformed.
fn read_timespec(data: &[u8], index: usize) -> Option<i128> {
    let size = mem::size_of::<libc::timespec>();
    let sec_len = mem::size_of::<libc::time_t>();
    let nsec_len = mem::size_of::<libc::c_long>();
    let ts = data.get(index * size..(index + 1) * size)?;
    let secs = read_ne_signed(&ts[..sec_len])?;
    let nanos = read_ne_signed(ts.get(sec_len..sec_len + nsec_len)?)?;
    if (secs == 0 && nanos == 0) || !(0..1_000_000_000).contains(&nanos) {
        return None;
    }
    Some(i128::from(secs) * 1_000_000_000 + i128::from(nanos))
}

fn read_ne_signed(b: &[u8]) -> Option<i64> {
    match b.len() {
        4 => Some(i64::from(i32::from_ne_bytes(b.try_into().ok()?))),
        8 => Some(i64::from_ne_bytes(b.try_into().ok()?)),
        _ => None,
    }
}

/// `CMSG_ALIGN`: control messages are aligned to `size_t`.
const fn cmsg_align(n: usize) -> usize {
    let a = mem::size_of::<usize>();
    (n + a - 1) & !(a - 1)
}

/// `CMSG_LEN(0)`: the aligned size of `struct cmsghdr { size_t len; int level; int type; }`.
const CMSG_HDR_LEN: usize = cmsg_align(mem::size_of::<usize>() + 8);

/// Iterator over `(level, type, data)` of the control messages in a buffer,
/// in the kernel's layout; stops at the first malformed header.
struct Cmsgs<'a>(&'a [u8]);

impl<'a> Iterator for Cmsgs<'a> {
    type Item = (libc::c_int, libc::c_int, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        const W: usize = mem::size_of::<usize>();
        let buf = self.0;
        if buf.len() < CMSG_HDR_LEN {
            return None;
        }
        let len = usize::from_ne_bytes(buf[..W].try_into().ok()?);
        let level = libc::c_int::from_ne_bytes(buf[W..W + 4].try_into().ok()?);
        let kind = libc::c_int::from_ne_bytes(buf[W + 4..W + 8].try_into().ok()?);
        if len < CMSG_HDR_LEN || len > buf.len() {
            self.0 = &[];
            return None;
        }
        self.0 = &buf[cmsg_align(len).min(buf.len())..];
        Some((level, kind, &buf[CMSG_HDR_LEN..len]))
    }
}

/// Writes one control message into `buf`; returns the space it takes
/// (`CMSG_SPACE`), or 0 if it does not fit.
fn write_cmsg(buf: &mut [u8], level: libc::c_int, kind: libc::c_int, data: &[u8]) -> usize {
    const W: usize = mem::size_of::<usize>();
    let len = CMSG_HDR_LEN + data.len();
    let space = cmsg_align(len);
    if space > buf.len() {
        return 0;
    }
    buf[..space].fill(0);
    buf[..W].copy_from_slice(&len.to_ne_bytes());
    buf[W..W + 4].copy_from_slice(&level.to_ne_bytes());
    buf[W + 4..W + 8].copy_from_slice(&kind.to_ne_bytes());
    buf[CMSG_HDR_LEN..len].copy_from_slice(data);
    space
}

/// Reads a `sockaddr_in` or `sockaddr_in6` in the kernel's layout.
fn read_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = libc::sa_family_t::from_ne_bytes(b.get(..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match libc::c_int::from(family) {
        libc::AF_INET => {
            let a: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(a), port)))
        }
        libc::AF_INET6 => {
            let flowinfo = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
            let a: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope_id = u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(a), port, flowinfo, scope_id)))
        }
        _ => None,
    }
}

/// Writes `addr` as a `sockaddr_in`/`sockaddr_in6`; returns its length.
fn write_sockaddr(addr: &SocketAddr, b: &mut [u8; SOCKADDR_LEN]) -> libc::socklen_t {
    b.fill(0);
    b[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr {
        SocketAddr::V4(a) => {
            b[..2].copy_from_slice(&(libc::AF_INET as libc::sa_family_t).to_ne_bytes());
            b[4..8].copy_from_slice(&a.ip().octets());
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            b[..2].copy_from_slice(&(libc::AF_INET6 as libc::sa_family_t).to_ne_bytes());
            b[4..8].copy_from_slice(&a.flowinfo().to_be_bytes());
            b[8..24].copy_from_slice(&a.ip().octets());
            b[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Preallocated buffers for up to `capacity` replies sent with one
/// `sendmmsg`, each with its destination and a packet-info control message
/// choosing the source address and interface.
pub struct SendBatch {
    bufs: Box<[[u8; DATAGRAM_BUF_LEN]]>,
    lens: Box<[usize]>,
    names: Box<[SockAddrBuf]>,
    name_lens: Box<[libc::socklen_t]>,
    cmsgs: Box<[CmsgBuf<SEND_CMSG_LEN>]>,
    cmsg_lens: Box<[usize]>,
    iovecs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    /// Per message of the last send: whether the kernel took it.
    sent: Box<[bool]>,
    len: usize,
    last_error: Option<i32>,
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch").field("capacity", &self.capacity()).field("len", &self.len).finish()
    }
}

impl SendBatch {
    /// Buffers for `capacity` replies (clamped to 1..=[`MAX_BATCH`]).
    pub fn new(capacity: usize) -> Self {
        let n = capacity.clamp(1, MAX_BATCH);
        Self {
            bufs: vec![[0; DATAGRAM_BUF_LEN]; n].into_boxed_slice(),
            lens: vec![0; n].into_boxed_slice(),
            names: vec![SockAddrBuf([0; SOCKADDR_LEN]); n].into_boxed_slice(),
            name_lens: vec![0; n].into_boxed_slice(),
            cmsgs: vec![CmsgBuf([0; SEND_CMSG_LEN]); n].into_boxed_slice(),
            cmsg_lens: vec![0; n].into_boxed_slice(),
            iovecs: vec![empty_iovec(); n].into_boxed_slice(),
            hdrs: (0..n).map(|_| zeroed_mmsghdr()).collect(),
            sent: vec![false; n].into_boxed_slice(),
            len: 0,
            last_error: None,
        }
    }

    /// How many replies fit.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// How many replies are queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether no more replies fit.
    pub fn is_full(&self) -> bool {
        self.len == self.capacity()
    }

    /// Forgets the queued replies.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The buffer of the next free slot, to write a reply into in place;
    /// `None` when the batch is full. Queue it with [`Self::commit`].
    pub fn next_buf(&mut self) -> Option<&mut [u8]> {
        let i = self.len;
        self.bufs.get_mut(i).map(|b| &mut b[..])
    }

    /// Queues the first `len` bytes of the buffer [`Self::next_buf`] gave,
    /// to go along `path`. Does nothing if the batch is full.
    pub fn commit(&mut self, len: usize, path: &ReplyPath) {
        self.commit_keyed(len, path, None);
    }

    /// [`Self::commit`], and with `Some(key)` the datagram's transmit stamp
    /// carries `key` (`SCM_TS_OPT_ID`; only where [`explicit_tx_keys`]).
    pub fn commit_keyed(&mut self, len: usize, path: &ReplyPath, key: Option<u32>) {
        let i = self.len;
        if i >= self.capacity() {
            return;
        }
        self.lens[i] = len.min(DATAGRAM_BUF_LEN);
        self.name_lens[i] = write_sockaddr(&path.peer, &mut self.names[i].0);
        let cmsg = &mut self.cmsgs[i].0;
        self.cmsg_lens[i] = match (path.local, path.peer) {
            (Some(IpAddr::V4(local)), SocketAddr::V4(_)) => {
                // struct in_pktinfo: ipi_spec_dst sets the source address;
                // ipi_ifindex stays 0 so the routing table picks the way out
                // (forcing the arrival interface loses replies where routing
                // is asymmetric); ipi_addr is ignored on send.
                let mut info = [0u8; 12];
                info[4..8].copy_from_slice(&local.octets());
                write_cmsg(cmsg, libc::IPPROTO_IP, libc::IP_PKTINFO, &info)
            }
            (Some(IpAddr::V6(local)), SocketAddr::V6(peer)) => {
                // The interface is needed only to reach a link-local peer;
                // otherwise routing decides, as for IPv4.
                let link_local = (peer.ip().segments()[0] & 0xFFC0) == 0xFE80;
                let ifindex = if link_local { path.ifindex } else { 0 };
                let mut info = [0u8; 20];
                info[..16].copy_from_slice(&local.octets());
                info[16..].copy_from_slice(&ifindex.to_ne_bytes());
                write_cmsg(cmsg, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &info)
            }
            _ => 0,
        };
        if let Some(key) = key {
            let at = self.cmsg_lens[i];
            self.cmsg_lens[i] += write_cmsg(&mut cmsg[at..], libc::SOL_SOCKET, SCM_TS_OPT_ID, &key.to_ne_bytes());
        }
        self.len += 1;
    }

    /// Copies `payload` into the next slot and queues it; false if the batch
    /// is full.
    pub fn push(&mut self, payload: &[u8], path: &ReplyPath) -> bool {
        let Some(buf) = self.next_buf() else { return false };
        let n = payload.len().min(buf.len());
        buf[..n].copy_from_slice(&payload[..n]);
        self.commit(n, path);
        true
    }

    /// Whether message `i` of the last [`BatchSocket::send_batch`] was taken
    /// by the kernel (and so consumed a transmit-stamp key).
    pub fn was_sent(&self, i: usize) -> bool {
        self.sent.get(i).copied().unwrap_or(false)
    }

    /// The error of the last failed message of the last send, if any.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.last_error.take().map(io::Error::from_raw_os_error)
    }

    fn prepare(&mut self) {
        self.sent.fill(false);
        let bufs = self.bufs.as_mut_ptr();
        let names = self.names.as_mut_ptr();
        let cmsgs = self.cmsgs.as_mut_ptr();
        for (i, iov) in self.iovecs.iter_mut().enumerate().take(self.len) {
            *iov = libc::iovec { iov_base: bufs.wrapping_add(i).cast(), iov_len: self.lens[i] };
        }
        let iovecs = self.iovecs.as_mut_ptr();
        for (i, h) in self.hdrs.iter_mut().enumerate().take(self.len) {
            h.msg_len = 0;
            let m = &mut h.msg_hdr;
            m.msg_name = names.wrapping_add(i).cast();
            m.msg_namelen = self.name_lens[i];
            m.msg_iov = iovecs.wrapping_add(i);
            m.msg_iovlen = 1;
            m.msg_control = if self.cmsg_lens[i] == 0 { ptr::null_mut() } else { cmsgs.wrapping_add(i).cast() };
            m.msg_controllen = self.cmsg_lens[i] as _;
            m.msg_flags = 0;
        }
    }
}

/// A nonblocking UDP socket in a `SO_REUSEPORT` group, read and written in
/// batches.
#[derive(Debug)]
pub struct BatchSocket {
    fd: OwnedFd,
    local: SocketAddr,
    timestamping: TimestampMode,
    tx_timestamps: bool,
    recv_buffer: usize,
    send_buffer: usize,
}

impl AsRawFd for BatchSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl BatchSocket {
    /// Creates a nonblocking UDP socket with `SO_REUSEPORT`, packet info and
    /// receive timestamps, and binds it to `addr`. IPv6 sockets are
    /// IPv6-only. Timestamping falls back from `SO_TIMESTAMPING` to
    /// `SO_TIMESTAMPNS` to none; buffer sizes are best effort (see
    /// [`Self::recv_buffer`]).
    pub fn bind(addr: SocketAddr, opts: &SocketOptions) -> io::Result<Self> {
        let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        let ty = libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // SAFETY: socket(2) takes no pointers; it returns a new descriptor or -1.
        let raw = unsafe { libc::socket(domain, ty, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        if addr.is_ipv4() {
            set_int(&fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        } else {
            set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
            set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        }
        let with_tx = SO_TIMESTAMPING_FLAGS | SO_TIMESTAMPING_TX_FLAGS;
        let tx_timestamps =
            opts.tx_timestamps && set_int(&fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPING, with_tx as libc::c_int).is_ok();
        let timestamping = if tx_timestamps
            || set_int(&fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPING, SO_TIMESTAMPING_FLAGS as _).is_ok()
        {
            TimestampMode::Timestamping
        } else if set_int(&fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1).is_ok() {
            TimestampMode::TimestampNs
        } else {
            TimestampMode::None
        };
        let recv_buffer = set_buffer(&fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, opts.recv_buffer);
        let send_buffer = set_buffer(&fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, opts.send_buffer);

        let mut name = SockAddrBuf([0; SOCKADDR_LEN]);
        let len = write_sockaddr(&addr, &mut name.0);
        // SAFETY: `name` holds a valid sockaddr of `len` bytes, aligned for
        // sockaddr_storage, alive across the call.
        let r = unsafe { libc::bind(fd.as_raw_fd(), (&raw const name).cast(), len) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let local = local_addr(&fd)?;
        Ok(Self { fd, local, timestamping, tx_timestamps, recv_buffer, send_buffer })
    }

    /// The bound address (with the actual port if bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// How receive timestamps are taken.
    pub fn timestamping(&self) -> TimestampMode {
        self.timestamping
    }

    /// Whether transmit stamps are asked for (read them with
    /// [`Self::recv_tx_stamps`]).
    pub fn tx_timestamps(&self) -> bool {
        self.tx_timestamps
    }

    /// Reads up to [`TX_STAMP_BATCH`] transmit stamps from the error queue
    /// without blocking; returns how many messages were read (0 when none
    /// are waiting).
    pub fn recv_tx_stamps(&mut self, batch: &mut TxStampBatch) -> io::Result<usize> {
        batch.prepare();
        let cap = batch.hdrs.len() as libc::c_uint;
        // SAFETY: every header of `batch.hdrs` points at buffers owned by
        // `batch` with the lengths it states; `batch` is borrowed mutably for
        // the whole call; no timeout.
        let r = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                batch.hdrs.as_mut_ptr(),
                cap,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                ptr::null_mut(),
            )
        };
        if r < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        let n = (r as usize).min(batch.hdrs.len());
        batch.parse(n);
        Ok(n)
    }

    /// The receive buffer the kernel reports (it doubles the request for
    /// bookkeeping; less than the request means it was capped by
    /// `net.core.rmem_max`).
    pub fn recv_buffer(&self) -> usize {
        self.recv_buffer
    }

    /// The send buffer the kernel reports (see [`Self::recv_buffer`]).
    pub fn send_buffer(&self) -> usize {
        self.send_buffer
    }

    /// Attaches the client-steering program to this socket's reuseport
    /// group: datagrams go to socket `steering_index(source, group_size)` of
    /// the group (sockets are numbered in the order they were bound), so a
    /// client's requests reach the same socket whatever its source port.
    /// Attach it once every socket of the group is bound; it applies to the
    /// whole group. A result of the program outside the group makes the
    /// kernel fall back to its default 4-tuple hash.
    pub fn attach_client_steering(&self, group_size: usize) -> io::Result<()> {
        let n = u32::try_from(group_size).ok().filter(|n| *n > 0).ok_or(io::ErrorKind::InvalidInput)?;
        let mut program = steering_program(self.local.is_ipv6(), n);
        let prog = libc::sock_fprog { len: program.len() as libc::c_ushort, filter: program.as_mut_ptr() };
        set_opt(&self.fd, libc::SOL_SOCKET, libc::SO_ATTACH_REUSEPORT_CBPF, &prog)
    }

    /// Receives up to `batch.capacity()` datagrams without blocking; returns
    /// how many (0 when none are waiting).
    pub fn recv_batch(&mut self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.prepare();
        let cap = batch.capacity() as libc::c_uint;
        // SAFETY: every header of `batch.hdrs` points at buffers owned by
        // `batch` with the lengths it states; `batch` is borrowed mutably for
        // the whole call, so they stay valid and unaliased; no timeout.
        let r = unsafe {
            libc::recvmmsg(self.fd.as_raw_fd(), batch.hdrs.as_mut_ptr(), cap, libc::MSG_DONTWAIT, ptr::null_mut())
        };
        if r < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        let n = (r as usize).min(batch.capacity());
        batch.parse(n);
        Ok(n)
    }

    /// Sends the queued replies and empties the batch; returns how many were
    /// sent. Messages the kernel refuses one by one (`ECONNREFUSED`,
    /// `EPERM` from a firewall, unreachable routes, …) are skipped and the
    /// rest still go; when the send buffer is full the socket is given
    /// [`SEND_WAIT`] once to drain, then the rest are dropped. The shortfall
    /// (`queued - sent`) is the caller's to count; the last error is kept in
    /// the batch ([`SendBatch::take_error`]). `Err` only for errors that are
    /// the socket's, not a message's (a bad descriptor).
    pub fn send_batch(&mut self, batch: &mut SendBatch) -> io::Result<usize> {
        let total = batch.len;
        if total == 0 {
            return Ok(0);
        }
        batch.prepare();
        let mut next = 0;
        let mut sent = 0;
        let mut waited = false;
        let mut interrupts = 0;
        let mut result = Ok(());
        // Bounded: each round sends at least one message, skips one, or
        // spends one of the few waits and retries.
        while next < total {
            let rest = (total - next) as libc::c_uint;
            // SAFETY: headers `next..total` point at buffers owned by `batch`
            // (set by `prepare`), which is borrowed mutably for the call.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    batch.hdrs.as_mut_ptr().wrapping_add(next),
                    rest,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                // A partial send means message `next + r` failed; the next
                // round retries from it and gets its error.
                batch.sent[next..next + r as usize].fill(true);
                sent += r as usize;
                next += r as usize;
                continue;
            }
            let err = if r == 0 { io::Error::from_raw_os_error(libc::EAGAIN) } else { io::Error::last_os_error() };
            let code = err.raw_os_error().unwrap_or(0);
            match code {
                libc::EINTR if interrupts < 4 => interrupts += 1,
                libc::EAGAIN | libc::ENOBUFS if !waited => {
                    waited = true;
                    if !wait_writable(self.fd.as_raw_fd(), SEND_WAIT) {
                        batch.last_error = Some(code);
                        break;
                    }
                }
                libc::EBADF | libc::ENOTSOCK | libc::EFAULT => {
                    result = Err(err);
                    break;
                }
                libc::EAGAIN | libc::ENOBUFS | libc::EINTR => {
                    batch.last_error = Some(code);
                    break;
                }
                _ => {
                    batch.last_error = Some(code);
                    next += 1;
                }
            }
        }
        batch.clear();
        result.map(|()| sent)
    }
}

/// Whether the kernel takes per-datagram transmit-stamp keys
/// (`SCM_TS_OPT_ID`, Linux 6.13+): found once by sending one datagram to a
/// throwaway loopback socket and reading its stamp back.
pub fn explicit_tx_keys() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| probe_explicit_tx_keys().unwrap_or(false))
}

fn probe_explicit_tx_keys() -> io::Result<bool> {
    const KEY: u32 = 0xC41E_0051;
    let opts = SocketOptions { tx_timestamps: true, recv_buffer: 0, send_buffer: 0 };
    let mut sock = BatchSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &opts)?;
    if !sock.tx_timestamps() {
        return Ok(false);
    }
    let path = ReplyPath { peer: sock.local_addr(), local: None, ifindex: 0 };
    let mut batch = SendBatch::new(1);
    let Some(buf) = batch.next_buf() else { return Ok(false) };
    buf[0] = 0;
    batch.commit_keyed(1, &path, Some(KEY));
    if sock.send_batch(&mut batch)? != 1 {
        return Ok(false);
    }
    let mut stamps = TxStampBatch::new();
    for _ in 0..50 {
        if sock.recv_tx_stamps(&mut stamps)? > 0 {
            return Ok(stamps.iter().any(|s| s.key == KEY));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(false)
}

/// Waits up to `timeout` for `fd` to be writable.
fn wait_writable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `p` is one valid pollfd, alive across the call.
    let r = unsafe { libc::poll(&raw mut p, 1, ms) };
    r > 0 && p.revents & libc::POLLOUT != 0
}

/// The descriptors of some sockets, waited on together for input.
/// It holds descriptor numbers only: the sockets must outlive it.
#[derive(Debug)]
pub struct PollSet {
    fds: Vec<libc::pollfd>,
}

impl PollSet {
    /// A set waiting for input on `sockets`.
    pub fn new(sockets: &[BatchSocket]) -> Self {
        let fds =
            sockets.iter().map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        Self { fds }
    }

    /// Waits up to `timeout` for input; returns how many sockets have some
    /// (0 on timeout or interruption).
    pub fn wait(&mut self, timeout: Duration) -> io::Result<usize> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds, borrowed
        // mutably for the call.
        let r = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(err) };
        }
        Ok(r as usize)
    }

    /// Whether socket `i` had input (or an error) at the last wait.
    pub fn is_ready(&self, i: usize) -> bool {
        self.fds.get(i).is_some_and(|p| p.revents != 0)
    }
}

fn set_opt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    let len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a valid, initialised `T` of `len` bytes, alive
    // across the call; the kernel only reads it.
    let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, ptr::from_ref(value).cast(), len) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn set_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_opt(fd, level, name, &value)
}

fn get_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes stated.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut value).cast(), &raw mut len) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(value) }
}

/// Asks for a buffer of `want` bytes (forced if privileged); returns what
/// the kernel reports.
fn set_buffer(fd: &OwnedFd, force: libc::c_int, plain: libc::c_int, want: usize) -> usize {
    if want > 0 {
        let want = want.min(i32::MAX as usize / 2) as libc::c_int;
        if set_int(fd, libc::SOL_SOCKET, force, want).is_err() {
            // Best effort: capped at the sysctl maximum, checked by callers.
            let _ = set_int(fd, libc::SOL_SOCKET, plain, want);
        }
    }
    get_int(fd, libc::SOL_SOCKET, plain).map_or(0, |v| v.max(0) as usize)
}

fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    let mut name = SockAddrBuf([0; SOCKADDR_LEN]);
    let mut len = SOCKADDR_LEN as libc::socklen_t;
    // SAFETY: `name` is writable for `len` bytes and aligned for a sockaddr.
    let r = unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut name).cast(), &raw mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    read_sockaddr(&name.0[..(len as usize).min(SOCKADDR_LEN)]).ok_or_else(|| io::ErrorKind::InvalidData.into())
}

// Client steering ------------------------------------------------------------

/// One round of the 32-bit finaliser used by [`steering_index`]:
/// `x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16`.
const MIX: [(u32, u32); 2] = [(16, 0x7feb_352d), (15, 0x846c_a68b)];
const MIX_LAST_SHIFT: u32 = 16;

fn mix32(mut x: u32) -> u32 {
    for (shift, mul) in MIX {
        x ^= x >> shift;
        x = x.wrapping_mul(mul);
    }
    x ^ (x >> MIX_LAST_SHIFT)
}

/// The socket of a group of `group_size` that the steering program picks
/// for a datagram from `source`: a hash of the IPv4 address, or of the /64
/// prefix of an IPv6 address (its two 32-bit words XORed), modulo the group
/// size. The port plays no part.
pub fn steering_index(source: IpAddr, group_size: usize) -> usize {
    let key = match source {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(a) => {
            let o = a.octets();
            u32::from_be_bytes([o[0], o[1], o[2], o[3]]) ^ u32::from_be_bytes([o[4], o[5], o[6], o[7]])
        }
    };
    (mix32(key) % group_size.clamp(1, u32::MAX as usize) as u32) as usize
}

const fn bpf_stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

/// The classic BPF program computing [`steering_index`]. A reuseport
/// program sees the packet from the UDP payload on, so the source address
/// is loaded relative to the network header (`SKF_NET_OFF`); absolute loads
/// are big-endian, as `u32::from_be_bytes` above.
fn steering_program(ipv6: bool, group_size: u32) -> Vec<libc::sock_filter> {
    use libc::{BPF_A, BPF_ABS, BPF_ALU, BPF_K, BPF_LD, BPF_MISC, BPF_MOD, BPF_MUL, BPF_RET, BPF_RSH, BPF_TAX, BPF_W};
    use libc::{BPF_X, BPF_XOR};
    let net = |offset: i32| (libc::SKF_NET_OFF + offset) as u32;
    let load_word = |offset| bpf_stmt(BPF_LD | BPF_W | BPF_ABS, net(offset));
    // A ^= A >> shift, through X.
    let xorshift = |shift| {
        [
            bpf_stmt(BPF_MISC | BPF_TAX, 0),
            bpf_stmt(BPF_ALU | BPF_RSH | BPF_K, shift),
            bpf_stmt(BPF_ALU | BPF_XOR | BPF_X, 0),
        ]
    };
    let mut p = Vec::with_capacity(24);
    if ipv6 {
        // Source address at offset 8 of the IPv6 header; fold its /64.
        p.push(load_word(8));
        p.push(bpf_stmt(BPF_MISC | BPF_TAX, 0));
        p.push(load_word(12));
        p.push(bpf_stmt(BPF_ALU | BPF_XOR | BPF_X, 0));
    } else {
        // Source address at offset 12 of the IPv4 header (options follow it).
        p.push(load_word(12));
    }
    for (shift, mul) in MIX {
        p.extend(xorshift(shift));
        p.push(bpf_stmt(BPF_ALU | BPF_MUL | BPF_K, mul));
    }
    p.extend(xorshift(MIX_LAST_SHIFT));
    p.push(bpf_stmt(BPF_ALU | BPF_MOD | BPF_K, group_size));
    p.push(bpf_stmt(BPF_RET | BPF_A, 0));
    p
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::Instant;

    use super::*;
    use crate::time::now_ntp;

    fn loopback_v6() -> bool {
        UdpSocket::bind("[::1]:0").is_ok()
    }

    /// Receives until `want` datagrams have arrived or a second passes.
    fn recv_some(sock: &mut BatchSocket, batch: &mut RecvBatch, want: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut poll = PollSet::new(std::slice::from_ref(sock));
        let mut got = 0;
        while got < want && Instant::now() < deadline {
            poll.wait(Duration::from_millis(50)).unwrap();
            got += sock.recv_batch(batch).unwrap();
        }
        got
    }

    #[test]
    fn sockaddr_round_trip() {
        let addrs: [SocketAddr; 3] = [
            "192.0.2.7:123".parse().unwrap(),
            "[2001:db8::1]:4460".parse().unwrap(),
            "[fe80::1%3]:123".parse().unwrap(),
        ];
        for a in addrs {
            let mut b = [0u8; SOCKADDR_LEN];
            let len = write_sockaddr(&a, &mut b);
            assert_eq!(read_sockaddr(&b[..len as usize]), Some(a));
        }
        assert_eq!(read_sockaddr(&[0u8; 16]), None);
        assert_eq!(read_sockaddr(&[2u8]), None);
    }

    #[test]
    fn cmsg_round_trip_and_garbage() {
        let mut buf = [0u8; 64];
        let n = write_cmsg(&mut buf, libc::IPPROTO_IP, libc::IP_PKTINFO, &[1, 0, 0, 0, 127, 0, 0, 9, 127, 0, 0, 9]);
        assert_eq!(n, cmsg_align(CMSG_HDR_LEN + 12));
        let mut meta = RecvMeta::EMPTY;
        parse_control(&buf[..n], &mut meta);
        assert_eq!(meta.local, Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))));
        assert_eq!(meta.ifindex, 1);
        // A length pointing past the buffer stops the walk without panicking.
        buf[..8].copy_from_slice(&1000usize.to_ne_bytes());
        assert_eq!(Cmsgs(&buf).count(), 0);
        assert_eq!(Cmsgs(&buf[..3]).count(), 0);
    }

    #[test]
    fn hardware_stamp_only_through_the_phc_mapping() {
        // Synthetic SCM_TIMESTAMPING: software stamp, and a PHC on TAI.
        let sw = 1_700_000_000_000_000_000i128;
        let hw = sw + 37_000_000_000 - 1_500;
        let mut data = Vec::new();
        for ns in [sw, 0, hw] {
            data.extend_from_slice(&((ns / 1_000_000_000) as libc::time_t).to_ne_bytes());
            data.extend_from_slice(&((ns % 1_000_000_000) as libc::c_long).to_ne_bytes());
        }
        let mut buf = [0u8; 128];
        let n = write_cmsg(&mut buf, libc::SOL_SOCKET, libc::SCM_TIMESTAMPING, &data);
        let mut meta = RecvMeta::EMPTY;
        parse_control(&buf[..n], &mut meta);
        let d = Datagram {
            payload: &[],
            source: UNKNOWN_SOURCE,
            local: None,
            ifindex: 0,
            rx: meta.rx,
            hw_ns: meta.hw_ns,
            truncated: false,
        };
        let soft = d.stamp(None).unwrap();
        assert_eq!((soft.kind, soft.time), (StampKind::KernelSoftware, NtpTimestamp::from_unix_nanos(sw)));
        let hard = d.stamp(Some(-37_000_000_000)).unwrap();
        assert_eq!((hard.kind, hard.time), (StampKind::Hardware, NtpTimestamp::from_unix_nanos(sw - 1_500)));
    }

    #[test]
    fn explicit_keys_on_this_kernel() {
        // Linux 6.13+ honours SCM_TS_OPT_ID; either way the probe answers.
        let supported = explicit_tx_keys();
        println!("SCM_TS_OPT_ID supported: {supported}");
        if !supported {
            return;
        }
        let opts = SocketOptions { tx_timestamps: true, ..SocketOptions::default() };
        let mut sock = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let path =
            ReplyPath { peer: client.local_addr().unwrap(), local: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), ifindex: 0 };
        let mut out = SendBatch::new(4);
        for key in [7u32, 9000, u32::MAX] {
            out.next_buf().unwrap()[..2].copy_from_slice(b"ok");
            out.commit_keyed(2, &path, Some(key));
        }
        assert_eq!(sock.send_batch(&mut out).unwrap(), 3);
        let mut stamps = TxStampBatch::new();
        let mut keys = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(1);
        while keys.len() < 3 && Instant::now() < deadline {
            sock.recv_tx_stamps(&mut stamps).unwrap();
            keys.extend(stamps.iter().map(|s| s.key));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(keys, [7, 9000, u32::MAX]);
    }

    #[test]
    fn tx_stamps_from_the_error_queue_on_loopback() {
        let opts = SocketOptions { tx_timestamps: true, ..SocketOptions::default() };
        let mut sock = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        assert!(sock.tx_timestamps());
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let path = ReplyPath { peer: client.local_addr().unwrap(), local: None, ifindex: 0 };
        let mut out = SendBatch::new(4);
        let before = now_ntp();
        for _ in 0..3 {
            assert!(out.push(b"stamp me", &path));
        }
        assert_eq!(sock.send_batch(&mut out).unwrap(), 3);
        assert!((0..3).all(|i| out.was_sent(i)) && !out.was_sent(3));
        let mut stamps = TxStampBatch::new();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(1);
        while got.len() < 3 && Instant::now() < deadline {
            sock.recv_tx_stamps(&mut stamps).unwrap();
            got.extend(stamps.iter());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got.iter().map(|s| s.key).collect::<Vec<_>>(), [0, 1, 2]);
        for s in &got {
            let sw = NtpTimestamp::from_unix_nanos(s.sw_ns.expect("a software transmit stamp"));
            assert!(sw.wrapping_diff(before) >= 0 && now_ntp().wrapping_diff(sw) >= 0);
        }
        // The datagrams themselves arrived normally.
        let mut buf = [0u8; 16];
        assert_eq!(client.recv(&mut buf).unwrap(), 8);
    }

    #[test]
    fn software_timestamps_on_loopback() {
        let mut sock = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), &SocketOptions::default()).unwrap();
        assert_ne!(sock.timestamping(), TimestampMode::None);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = now_ntp();
        client.send_to(&[7u8; 48], sock.local_addr()).unwrap();
        let mut batch = RecvBatch::new(8);
        assert_eq!(recv_some(&mut sock, &mut batch, 1), 1);
        let d = batch.get(0).unwrap();
        assert_eq!(d.payload, &[7u8; 48][..]);
        assert_eq!(d.source, client.local_addr().unwrap());
        assert!(!d.truncated);
        let rx = d.rx.expect("loopback datagrams carry a software receive stamp");
        assert_eq!(rx.kind, StampKind::KernelSoftware);
        let after = now_ntp();
        assert!(rx.time.wrapping_diff(before) >= 0, "stamp before send");
        assert!(after.wrapping_diff(rx.time) >= 0, "stamp after receive");
    }

    #[test]
    fn pktinfo_gives_local_address_and_replies_leave_from_it() {
        // A wildcard socket; the request goes to 127.0.0.3, so the reply must
        // come from 127.0.0.3, not from 127.0.0.1.
        let mut sock = BatchSocket::bind("0.0.0.0:0".parse().unwrap(), &SocketOptions::default()).unwrap();
        let port = sock.local_addr().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let target = SocketAddr::from(([127, 0, 0, 3], port));
        client.send_to(b"hello", target).unwrap();
        let mut batch = RecvBatch::new(4);
        assert_eq!(recv_some(&mut sock, &mut batch, 1), 1);
        let d = batch.get(0).unwrap();
        assert_eq!(d.local, Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))));
        assert_ne!(d.ifindex, 0);
        let mut out = SendBatch::new(4);
        assert!(out.push(b"world", &d.reply_path()));
        assert_eq!(sock.send_batch(&mut out).unwrap(), 1);
        assert!(out.is_empty());
        let mut buf = [0u8; 64];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"world");
        assert_eq!(from, target);
    }

    #[test]
    fn pktinfo_ipv6() {
        if !loopback_v6() {
            println!("skipped: no IPv6 loopback");
            return;
        }
        let mut sock = BatchSocket::bind("[::]:0".parse().unwrap(), &SocketOptions::default()).unwrap();
        let target = SocketAddr::new("::1".parse().unwrap(), sock.local_addr().port());
        let client = UdpSocket::bind("[::1]:0").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        client.send_to(b"v6", target).unwrap();
        let mut batch = RecvBatch::new(4);
        assert_eq!(recv_some(&mut sock, &mut batch, 1), 1);
        let d = batch.get(0).unwrap();
        assert_eq!(d.local, Some(target.ip()));
        assert_eq!(d.source, client.local_addr().unwrap());
        // No check of the receive stamp here: the kernel switches receive
        // timestamping on (the netstamp static key) in deferred work when
        // the first timestamping socket appears, so a datagram right after
        // may carry none; chimed then stamps it in userspace (counted).
        let mut out = SendBatch::new(1);
        assert!(out.push(b"six", &d.reply_path()));
        assert!(!out.push(b"full", &d.reply_path()));
        assert_eq!(sock.send_batch(&mut out).unwrap(), 1);
        let mut buf = [0u8; 16];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"six"[..], target));
    }

    #[test]
    fn truncation_is_flagged() {
        let mut sock = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), &SocketOptions::default()).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(&[1u8; 3000], sock.local_addr()).unwrap();
        client.send_to(&[2u8; 100], sock.local_addr()).unwrap();
        let mut batch = RecvBatch::new(8);
        assert_eq!(recv_some(&mut sock, &mut batch, 2), 2);
        let long = batch.get(0).unwrap();
        assert!(long.truncated);
        assert_eq!(long.payload.len(), DATAGRAM_BUF_LEN);
        let short = batch.get(1).unwrap();
        assert!(!short.truncated);
        assert_eq!(short.payload.len(), 100);
    }

    #[test]
    fn send_errors_do_not_stop_the_batch() {
        // An IPv4 reply with an IPv6 destination is refused per message.
        let mut sock = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), &SocketOptions::default()).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let good = ReplyPath { peer: client.local_addr().unwrap(), local: None, ifindex: 0 };
        let bad = ReplyPath { peer: "[::1]:9".parse().unwrap(), local: None, ifindex: 0 };
        let mut out = SendBatch::new(4);
        assert!(out.push(b"a", &good));
        assert!(out.push(b"b", &bad));
        assert!(out.push(b"c", &good));
        assert_eq!(sock.send_batch(&mut out).unwrap(), 2);
        assert!(out.take_error().is_some());
        let mut buf = [0u8; 4];
        assert_eq!(client.recv(&mut buf).unwrap(), 1);
        assert_eq!(buf[0], b'a');
        assert_eq!(client.recv(&mut buf).unwrap(), 1);
        assert_eq!(buf[0], b'c');
    }

    #[test]
    fn steering_program_shape() {
        let p4 = steering_program(false, 4);
        let p6 = steering_program(true, 4);
        assert_eq!(p6.len(), p4.len() + 3);
        assert_eq!(p4.last().unwrap().code as u32, libc::BPF_RET | libc::BPF_A);
        assert_eq!(p4[0].k, (libc::SKF_NET_OFF + 12) as u32);
        // Every index is in range and both halves of a /64 matter.
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(steering_index(a, 7), steering_index(b, 7));
        assert!((0..=255u8).all(|i| steering_index(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)), 3) < 3));
    }

    /// Binds a group of `n` sockets on one loopback port with steering.
    fn steered_group(ip: IpAddr, n: usize) -> Vec<BatchSocket> {
        let opts = SocketOptions::default();
        let first = BatchSocket::bind(SocketAddr::new(ip, 0), &opts).unwrap();
        let addr = first.local_addr();
        let mut group = vec![first];
        group.extend((1..n).map(|_| BatchSocket::bind(addr, &opts).unwrap()));
        group[0].attach_client_steering(n).unwrap();
        group
    }

    /// Sends one datagram from each of `clients` and returns, for each, the
    /// index of the socket of `group` it reached.
    fn landing(group: &mut [BatchSocket], clients: &[UdpSocket]) -> Vec<usize> {
        let addr = group[0].local_addr();
        let mut batch = RecvBatch::new(64);
        let mut seen = vec![None; clients.len()];
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&(i as u32).to_be_bytes(), addr).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while seen.iter().any(Option::is_none) && Instant::now() < deadline {
            for (s, sock) in group.iter_mut().enumerate() {
                sock.recv_batch(&mut batch).unwrap();
                for d in batch.iter() {
                    let i = u32::from_be_bytes(d.payload.try_into().unwrap()) as usize;
                    seen[i] = Some(s);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        seen.into_iter().map(|s| s.expect("datagram lost")).collect()
    }

    #[test]
    fn steering_keeps_a_client_on_one_socket() {
        let mut group = steered_group(IpAddr::V4(Ipv4Addr::LOCALHOST), 2);
        let ports: Vec<UdpSocket> = (0..32).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let want = steering_index(IpAddr::V4(Ipv4Addr::LOCALHOST), 2);
        assert!(landing(&mut group, &ports).iter().all(|s| *s == want), "source ports spread over the group");

        // Different client addresses land where the Rust mirror of the
        // program says, which for these spreads them over both sockets.
        let hosts: Vec<UdpSocket> =
            (2..34u8).map(|i| UdpSocket::bind(("127.0.0.".to_owned() + &i.to_string(), 0)).unwrap()).collect();
        let got = landing(&mut group, &hosts);
        let expected: Vec<usize> = hosts.iter().map(|h| steering_index(h.local_addr().unwrap().ip(), 2)).collect();
        assert_eq!(got, expected);
        assert!(expected.contains(&0) && expected.contains(&1));
    }

    #[test]
    fn steering_ipv6() {
        if !loopback_v6() {
            println!("skipped: no IPv6 loopback");
            return;
        }
        let mut group = steered_group(IpAddr::V6(Ipv6Addr::LOCALHOST), 3);
        let ports: Vec<UdpSocket> = (0..24).map(|_| UdpSocket::bind("[::1]:0").unwrap()).collect();
        let want = steering_index(IpAddr::V6(Ipv6Addr::LOCALHOST), 3);
        assert!(landing(&mut group, &ports).iter().all(|s| *s == want));
    }
}
