//! chime's kernel-facing layer.
//!
//! - [`program`]: the XDP program (C source in `ebpf/xdp/`, a reproducible
//!   build script and the committed object, embedded here) that steers UDP/123
//!   for the server's addresses to per-queue AF_XDP sockets and stamps each
//!   frame with its receive time, and the Rust mirrors of what it shares with
//!   userspace (metadata layout, config, counters);
//! - [`loader`]: loads it with libbpf-rs (device-bound for the NIC's
//!   receive-timestamp metadata kfunc), fills its maps, attaches it in native
//!   or generic mode, replaces a stale chime program, refuses a foreign one,
//!   detaches on drop;
//! - [`load_xdp`]: chime-load's own small XDP program and loader, which
//!   steer the server's replies to the load generator's AF_XDP sockets;
//! - [`ethtool`]: interface index and RX queue count;
//! - [`frame`] and [`checksum`]: Ethernet/IPv4/IPv6/UDP frames as AF_XDP
//!   sees them — parsing, the server's in-place reply, the load generator's
//!   request frames — and the Internet checksum (safe Rust, no I/O);
//! - [`xsk`], the AF_XDP layer: UMEM, fill/completion/RX/TX rings behind
//!   `#[must_use]` transactions, sockets bound zero-copy with fallback to copy
//!   mode, frame accounting, TX metadata for hardware transmit timestamps, and
//!   [`xsk::XskQueue`], the per-queue receive → answer → transmit loop.
//!
//! It is the one crate where kernel-facing `unsafe` lives; every block carries
//! a `// SAFETY:` comment.

pub mod checksum;
pub mod ethtool;
pub mod frame;
pub mod load_xdp;
pub mod loader;
pub mod program;
pub mod xsk;
