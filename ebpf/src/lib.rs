//! chime's kernel-facing layer.
//!
//! This crate holds:
//! - the XDP program (C source, a reproducible build script and the committed
//!   object) that steers UDP/123 for the server's addresses to per-queue
//!   AF_XDP sockets and stamps each frame with its receive time;
//! - its loader, built on libbpf-rs (device-bound programs for the NIC's
//!   receive-timestamp metadata kfunc);
//! - [`xsk`], the AF_XDP layer: UMEM, fill/completion/RX/TX rings behind
//!   `#[must_use]` transactions, sockets bound zero-copy with fallback to copy
//!   mode, frame accounting, TX metadata for hardware transmit timestamps, and
//!   [`xsk::XskQueue`], the per-queue receive → answer → transmit loop.
//!
//! It is the one crate where kernel-facing `unsafe` lives; every block carries
//! a `// SAFETY:` comment.

pub mod xsk;
