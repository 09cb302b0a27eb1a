//! Kernel ABI of AF_XDP (`include/uapi/linux/if_xdp.h`), in one place.
//!
//! `libc` 0.2 has most of it; what it has is re-exported from here so the rest
//! of the module names one source. What it lacks or has in an outdated shape
//! is defined below with the values of the Linux 6.x uapi header:
//!
//! - `struct xsk_tx_metadata` (libc's `request` arm predates `launch_time`,
//!   added in 6.15, so its size is 16 where the kernel's is 24);
//! - `XDP_TXMD_FLAGS_LAUNCH_TIME`, `XDP_MAX_TX_SKB_BUDGET`, `XDP_PACKET_HEADROOM`;
//! - a `Copy`/`Debug` descriptor type with the layout of `struct xdp_desc`.

use core::mem::{offset_of, size_of};

pub use libc::{
    AF_XDP, SOL_XDP, XDP_COPY, XDP_MMAP_OFFSETS, XDP_OPTIONS, XDP_OPTIONS_ZEROCOPY, XDP_PGOFF_RX_RING,
    XDP_PGOFF_TX_RING, XDP_RING_NEED_WAKEUP, XDP_RX_RING, XDP_SHARED_UMEM, XDP_STATISTICS, XDP_TX_METADATA,
    XDP_TX_RING, XDP_TXMD_FLAGS_CHECKSUM, XDP_TXMD_FLAGS_TIMESTAMP, XDP_UMEM_COMPLETION_RING, XDP_UMEM_FILL_RING,
    XDP_UMEM_PGOFF_COMPLETION_RING, XDP_UMEM_PGOFF_FILL_RING, XDP_UMEM_REG, XDP_UMEM_TX_METADATA_LEN,
    XDP_USE_NEED_WAKEUP, XDP_ZEROCOPY, sockaddr_xdp, xdp_mmap_offsets, xdp_options, xdp_ring_offset, xdp_statistics,
    xdp_umem_reg,
};

/// `XDP_TXMD_FLAGS_LAUNCH_TIME` (6.15): transmit at `request.launch_time`.
pub const XDP_TXMD_FLAGS_LAUNCH_TIME: u64 = 1 << 2;

/// `XDP_MAX_TX_SKB_BUDGET` (6.17): socket option, how many frames one
/// copy-mode `sendto` kick transmits at most (default 32, up to the TX ring
/// size).
pub const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;

/// `XDP_PACKET_HEADROOM`: bytes the kernel keeps in front of every received
/// packet (on top of the UMEM's own `headroom`); XDP metadata
/// (`bpf_xdp_adjust_meta`) and headers an XDP program prepends
/// (`bpf_xdp_adjust_head`, as chime's does) take from the end of it.
pub const XDP_PACKET_HEADROOM: u32 = 256;

/// `struct xdp_desc`: one RX or TX descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct XdpDesc {
    /// UMEM offset of the first packet byte.
    pub addr: u64,
    /// Packet length in bytes.
    pub len: u32,
    /// `XDP_PKT_CONTD`, `XDP_TX_METADATA`.
    pub options: u32,
}

/// `struct xsk_tx_metadata` as of Linux 6.15 (24 bytes): `flags`, then a
/// union of what userspace asks for (`request`) and what the driver returns
/// after transmit (`completion`). Laid out here as the union's bytes: the
/// request arm is `csum_start: u16, csum_offset: u16, pad: u32,
/// launch_time: u64`; the completion arm is `tx_timestamp: u64` at the same
/// offset as `csum_start`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XskTxMetadata {
    /// `XDP_TXMD_FLAGS_*`.
    pub flags: u64,
    /// Union word 0: `request.{csum_start, csum_offset}` (low 32 bits, native
    /// endian) or `completion.tx_timestamp`.
    pub word0: u64,
    /// Union word 1: `request.launch_time` (6.15+).
    pub word1: u64,
}

/// `sizeof(struct xsk_tx_metadata)` on Linux 6.15 and later. 6.8 – 6.14 had
/// 16 bytes (no `launch_time`); a `tx_metadata_len` of 24 works on both, the
/// kernel ignores the padding.
pub const XSK_TX_METADATA_SIZE: u32 = size_of::<XskTxMetadata>() as u32;

/// Offset of `completion.tx_timestamp` in `struct xsk_tx_metadata`.
pub const XSK_TX_METADATA_TIMESTAMP_OFFSET: usize = offset_of!(XskTxMetadata, word0);

// The uapi layouts, checked at compile time against libc where it has them.
const _: () = {
    assert!(size_of::<XdpDesc>() == size_of::<libc::xdp_desc>());
    assert!(size_of::<XdpDesc>() == 16);
    assert!(offset_of!(XdpDesc, addr) == offset_of!(libc::xdp_desc, addr));
    assert!(offset_of!(XdpDesc, len) == offset_of!(libc::xdp_desc, len));
    assert!(offset_of!(XdpDesc, options) == offset_of!(libc::xdp_desc, options));
    assert!(size_of::<XskTxMetadata>() == 24);
    assert!(XSK_TX_METADATA_TIMESTAMP_OFFSET == 8);
    assert!(size_of::<xdp_umem_reg>() == 32);
    assert!(offset_of!(xdp_umem_reg, tx_metadata_len) == 28);
    assert!(size_of::<xdp_statistics>() == 48);
    assert!(size_of::<xdp_mmap_offsets>() == 128);
    assert!(size_of::<sockaddr_xdp>() == 16);
    assert!(XDP_TX_METADATA == 1 << 1);
    assert!(XDP_TXMD_FLAGS_TIMESTAMP == 1 << 0);
    assert!(XDP_TXMD_FLAGS_CHECKSUM == 1 << 1);
    assert!(XDP_UMEM_TX_METADATA_LEN == 1 << 2);
    assert!(XDP_USE_NEED_WAKEUP == 1 << 3);
    assert!(XDP_ZEROCOPY == 1 << 2);
    assert!(XDP_COPY == 1 << 1);
    assert!(XDP_SHARED_UMEM == 1);
    assert!(XDP_RING_NEED_WAKEUP == 1);
    assert!(SOL_XDP == 283);
    assert!(AF_XDP == 44);
};
