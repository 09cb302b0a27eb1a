//! chime's kernel-facing layer (filled in by the XDP issue).
//!
//! This crate will hold:
//! - the XDP program (C source, a reproducible build script and the committed
//!   object) that steers UDP/123 for the server's addresses to per-queue
//!   AF_XDP sockets and stamps each frame with its receive time;
//! - its loader, built on libbpf-rs (device-bound programs for the NIC's
//!   receive-timestamp metadata kfunc);
//! - the AF_XDP layer: UMEM, fill/completion/RX/TX rings behind `#[must_use]`
//!   transactions, TX metadata for hardware transmit timestamps.
//!
//! It is the one crate where kernel-facing `unsafe` lives; every block carries
//! a `// SAFETY:` comment. Until the XDP backend lands it exports nothing and
//! chimed refuses `--backend xdp` with a clear message.
