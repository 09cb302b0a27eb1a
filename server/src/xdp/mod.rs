//! The XDP backend: AF_XDP sockets fed by chime's XDP program, one worker
//! per NIC queue. This module holds what does not touch the kernel: frame
//! parsing and in-place reply building ([`frame`], [`checksum`]; they live
//! in `chime-ebpf`, shared with chime-load's AF_XDP transport), the
//! metadata the XDP program writes in front of each packet ([`XdpMeta`]),
//! receive-time conversion ([`tai_to_utc_ns`]) and the server addresses the
//! program matches ([`server_addresses`]). The program, its loader and the
//! AF_XDP rings live in `chime-ebpf`.
//!
//! # The worker (one per queue; to be wired to `chime-ebpf`)
//!
//! Each worker is one thread pinned to the core that services its queue,
//! owning that queue's AF_XDP socket, UMEM, [`chime_proto::Responder`] and a
//! scratch buffer of one frame. Its loop, with no allocation, lock, log line
//! or syscall per packet:
//!
//! 1. Take a batch of RX descriptors (`batch_size`). Once per batch load the
//!    clock snapshot, the ACL and the kernel TAI offset from `Shared`.
//! 2. For each frame:
//!    - read the [`META_LEN`]-byte receive header in front of the packet
//!      ([`parse_meta`]; the program prepended it with
//!      `bpf_xdp_adjust_head`, and the AF_XDP layer split it off). Bit 0 of `flags` set: `rx_ns` is the NIC's
//!      hardware stamp (PHC time); clear: `bpf_ktime_get_tai_ns()`, so
//!      CLOCK_TAI, turned into UTC by subtracting the kernel's TAI offset.
//!      [`XdpMetaExt::rx_timestamp`] does both; without usable metadata the
//!      worker stamps the batch itself ([`chime_proto::StampKind::Userspace`]);
//!    - [`frame::parse_request`]; an error is a counted drop
//!      ([`frame::FrameError::name`]) and the frame goes straight back to
//!      the fill ring;
//!    - [`frame::stage_request`] copies the request payload into the scratch
//!      buffer and lends the request's own payload bytes as the reply slot;
//!    - `Responder::handle(request, meta, ctx, tx_clock, slot)`: a drop
//!      returns the frame to the fill ring; a reply of `n` bytes (never more
//!      than the request) goes through [`frame::build_reply_in_place`], and
//!      the same frame, now `len` bytes long, is queued on the TX ring.
//! 3. Submit TX (kick with `sendto` only when `need_wakeup` says so), reap
//!    the completion ring into the fill ring, refill, publish counters.
//!
//! Frames are never copied between UMEM and the stack beyond the request
//! payload, and every frame is at every moment in exactly one place: fill
//! ring, RX ring, the worker's hands, TX ring or completion ring.

use std::net::{IpAddr, SocketAddr};

use chime_proto::{NtpTimestamp, RxTimestamp, StampKind};

pub mod backend;

/// Frame parsing and the in-place reply, shared with the load generator.
pub use chime_ebpf::{checksum, frame};

pub use chime_ebpf::program::{META_HW, META_LEN, XdpMeta};

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// What a worker needs to turn [`XdpMeta::rx_ns`] into UTC; refreshed once
/// per batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StampOffsets {
    /// The kernel's TAI - UTC offset in seconds (`adjtimex` `tai`; 37 since
    /// 2017, 0 when nothing set it).
    pub tai_offset_s: i32,
    /// UTC minus the NIC clock (PHC) in nanoseconds, if known: 0 for a PHC
    /// kept on UTC, -37e9 for one on TAI (ptp4l's usual), measured for
    /// anything else. `None`: hardware stamps cannot be used.
    pub phc_to_utc_ns: Option<i64>,
}

/// Reads the receive header the XDP program wrote from the area in front of
/// the packet (its last [`META_LEN`] bytes); `None` when it is shorter or the
/// magic is wrong (the program did not write it).
pub fn parse_meta(area: &[u8]) -> Option<XdpMeta> {
    let bytes: &[u8; META_LEN] = area.get(area.len().checked_sub(META_LEN)?..)?.try_into().ok()?;
    XdpMeta::from_bytes(bytes)
}

/// Turning the program's stamp into the responder's receive time.
pub trait XdpMetaExt {
    /// The receive time as UTC nanoseconds since the Unix epoch; `None` for
    /// a zero stamp or a hardware stamp whose clock offset is unknown.
    fn utc_ns(&self, offsets: &StampOffsets) -> Option<i128>;

    /// The receive timestamp to give the responder, if the metadata has a
    /// usable one.
    fn rx_timestamp(&self, offsets: &StampOffsets) -> Option<RxTimestamp>;
}

impl XdpMetaExt for XdpMeta {
    fn utc_ns(&self, offsets: &StampOffsets) -> Option<i128> {
        if self.rx_ns == 0 {
            return None;
        }
        if self.is_hw() {
            offsets.phc_to_utc_ns.map(|off| i128::from(self.rx_ns) + i128::from(off))
        } else {
            Some(tai_to_utc_ns(self.rx_ns, offsets.tai_offset_s))
        }
    }

    fn rx_timestamp(&self, offsets: &StampOffsets) -> Option<RxTimestamp> {
        let kind = if self.is_hw() { StampKind::Hardware } else { StampKind::XdpIngress };
        self.utc_ns(offsets).map(|ns| RxTimestamp { time: NtpTimestamp::from_unix_nanos(ns), kind })
    }
}

/// CLOCK_TAI nanoseconds to UTC nanoseconds since the Unix epoch, given the
/// kernel's TAI - UTC offset in seconds.
pub fn tai_to_utc_ns(tai_ns: u64, tai_offset_s: i32) -> i128 {
    i128::from(tai_ns) - i128::from(tai_offset_s) * NANOS_PER_SEC
}

/// Why the XDP server addresses cannot be derived.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// No listen address.
    #[error("server.listen is empty")]
    Empty,
    /// Listen entries with different ports.
    #[error("the xdp backend serves one port: server.listen has {0} and {1}")]
    MixedPorts(u16, u16),
    /// A wildcard was listed but the interface has no address of its family.
    #[error("{wildcard} stands for the interface's addresses, but it has no IPv{version} address")]
    NoAddressForWildcard {
        /// The wildcard listen entry.
        wildcard: SocketAddr,
        /// 4 or 6.
        version: u8,
    },
}

/// The addresses and port the XDP program steers to chime.
///
/// Explicit entries of `server.listen` are used as they are; a wildcard
/// (`0.0.0.0` or `::`) stands for every address of its family in
/// `interface_addrs` (the addresses configured on `server.interface` at
/// start, see `sys::ifaddrs`). All entries must share one port. The result
/// is sorted and without repeats.
pub fn server_addresses(listen: &[SocketAddr], interface_addrs: &[IpAddr]) -> Result<(Vec<IpAddr>, u16), AddressError> {
    let port = listen.first().ok_or(AddressError::Empty)?.port();
    let mut out = Vec::new();
    for entry in listen {
        if entry.port() != port {
            return Err(AddressError::MixedPorts(port, entry.port()));
        }
        if entry.ip().is_unspecified() {
            let before = out.len();
            out.extend(interface_addrs.iter().filter(|a| a.is_ipv4() == entry.is_ipv4()).copied());
            if out.len() == before {
                return Err(AddressError::NoAddressForWildcard {
                    wildcard: *entry,
                    version: if entry.is_ipv4() { 4 } else { 6 },
                });
            }
        } else {
            out.push(entry.ip());
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok((out, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tai_to_utc() {
        assert_eq!(tai_to_utc_ns(37_000_000_000, 37), 0);
        assert_eq!(tai_to_utc_ns(1_700_000_037_123_456_789, 37), 1_700_000_000_123_456_789);
        assert_eq!(tai_to_utc_ns(5, 0), 5);
        assert_eq!(tai_to_utc_ns(0, 37), -37_000_000_000);
        assert_eq!(tai_to_utc_ns(u64::MAX, -1), i128::from(u64::MAX) + 1_000_000_000);
    }

    #[test]
    fn metadata_layout() {
        let m = XdpMeta { rx_ns: 0x0102_0304_0506_0708, flags: META_HW };
        let b = m.to_bytes();
        assert_eq!(parse_meta(&b), Some(m));
        // The metadata is the last 16 bytes before the packet.
        let mut area = vec![0xee; 8];
        area.extend_from_slice(&b);
        assert_eq!(parse_meta(&area), Some(m));
        assert_eq!(parse_meta(&b[1..]), None, "too short");
        let mut bad = b;
        bad[15] ^= 1;
        assert_eq!(parse_meta(&bad), None, "wrong magic");
        assert_eq!(parse_meta(&[0; 16]), None, "nothing written");
        if cfg!(target_endian = "little") {
            assert_eq!(b[12..], [0x01, 0x00, 0x1e, 0xc4]);
            assert_eq!(b[0], 0x08);
        }
    }

    #[test]
    fn software_stamps_are_tai() {
        let offsets = StampOffsets { tai_offset_s: 37, phc_to_utc_ns: None };
        // 2024-01-01T00:00:00.5Z in TAI.
        let utc_ns: i128 = 1_704_067_200_500_000_000;
        let m = XdpMeta { rx_ns: (utc_ns + 37 * NANOS_PER_SEC) as u64, flags: 0 };
        assert!(!m.is_hw());
        assert_eq!(m.utc_ns(&offsets), Some(utc_ns));
        let ts = m.rx_timestamp(&offsets).unwrap();
        assert_eq!(ts.kind, StampKind::XdpIngress);
        assert_eq!(ts.time, NtpTimestamp::from_unix(1_704_067_200, 500_000_000));
        assert_eq!(XdpMeta { rx_ns: 0, flags: 0 }.rx_timestamp(&offsets), None);
    }

    #[test]
    fn hardware_stamps_need_the_phc_offset() {
        let m = XdpMeta { rx_ns: 1_704_067_237_000_000_000, flags: META_HW };
        assert_eq!(m.rx_timestamp(&StampOffsets { tai_offset_s: 37, phc_to_utc_ns: None }), None);
        let on_tai = StampOffsets { tai_offset_s: 37, phc_to_utc_ns: Some(-37_000_000_000) };
        let ts = m.rx_timestamp(&on_tai).unwrap();
        assert_eq!(ts.kind, StampKind::Hardware);
        assert_eq!(ts.time, NtpTimestamp::from_unix(1_704_067_200, 0));
    }

    #[test]
    fn addresses_from_listen() {
        let ifa: Vec<IpAddr> =
            ["198.18.0.1", "fdc4:1e::1", "fe80::1", "198.18.1.1"].iter().map(|a| a.parse().unwrap()).collect();
        let l = |v: &[&str]| v.iter().map(|a| a.parse().unwrap()).collect::<Vec<SocketAddr>>();
        let ips = |v: &[&str]| v.iter().map(|a| a.parse().unwrap()).collect::<Vec<IpAddr>>();

        let (a, p) = server_addresses(&l(&["0.0.0.0:123", "[::]:123"]), &ifa).unwrap();
        assert_eq!(p, 123);
        assert_eq!(a, ips(&["198.18.0.1", "198.18.1.1", "fdc4:1e::1", "fe80::1"]));
        let (a, _) = server_addresses(&l(&["192.0.2.1:123"]), &ifa).unwrap();
        assert_eq!(a, ips(&["192.0.2.1"]), "explicit addresses are used as they are");
        let (a, p) = server_addresses(&l(&["0.0.0.0:1123", "198.18.0.1:1123"]), &ifa).unwrap();
        assert_eq!((a, p), (ips(&["198.18.0.1", "198.18.1.1"]), 1123), "no repeats");
        assert_eq!(server_addresses(&[], &ifa), Err(AddressError::Empty));
        assert_eq!(server_addresses(&l(&["0.0.0.0:123", "[::]:124"]), &ifa), Err(AddressError::MixedPorts(123, 124)));
        let e = server_addresses(&l(&["[::]:123"]), &ips(&["198.18.0.1"])).unwrap_err();
        assert_eq!(e.to_string(), "[::]:123 stands for the interface's addresses, but it has no IPv6 address");
    }
}
