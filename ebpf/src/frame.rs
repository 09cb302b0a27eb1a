//! Reading a request frame and turning it into its reply in place.
//!
//! A worker gets whole Ethernet frames from its AF_XDP socket. For each it:
//!
//! 1. [`parse_request`]: Ethernet (at most one 802.1Q or 802.1ad tag), IPv4
//!    (options allowed, fragments not) or IPv6 (next header UDP, so no
//!    extension headers), UDP whose length matches the IP length. Bytes past
//!    the IP packet (Ethernet padding of short frames) are ignored. The
//!    result, a [`RequestFrame`], holds the offsets and both endpoints;
//! 2. [`stage_request`]: copies the NTP request (usually 48 bytes) into the
//!    worker's scratch buffer and returns it with the reply slot, the
//!    request's own payload bytes in the frame ([`reply_payload_mut`]), so
//!    the responder writes its reply straight into the frame. (The request
//!    and the reply slot are the same bytes, which Rust cannot lend as `&`
//!    and `&mut` at once; one small copy of the request is the price, and
//!    a reply is never longer than its request, so the slot is always big
//!    enough);
//! 3. [`build_reply_in_place`]: swaps the Ethernet, IP and UDP endpoints,
//!    keeps the VLAN tag, resets TTL / hop limit, fixes the lengths and both
//!    checksums. The frame, truncated to the returned length, goes out on
//!    the TX ring.
//!
//! Everything here is safe Rust that neither allocates nor panics on any
//! input: every access is bounds-checked and a bad frame is a
//! [`FrameError`], which the worker counts under [`FrameError::name`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::checksum::Checksum;

/// Ethernet header without a tag.
pub const ETH_HLEN: usize = 14;
/// An 802.1Q / 802.1ad tag.
pub const VLAN_HLEN: usize = 4;
/// IPv4 header without options.
pub const IPV4_MIN_HLEN: usize = 20;
/// IPv6 fixed header.
pub const IPV6_HLEN: usize = 40;
/// UDP header.
pub const UDP_HLEN: usize = 8;

/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType (TPID) of an 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType (TPID) of an 802.1ad (QinQ service) tag.
pub const ETH_P_8021AD: u16 = 0x88a8;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// TTL / hop limit of every reply.
pub const REPLY_TTL: u8 = 64;

/// IPv4 flags and fragment offset: "don't fragment", offset 0.
const IPV4_DF: u16 = 0x4000;
/// IPv4 "more fragments" flag and the fragment offset bits.
const IPV4_FRAGMENT_MASK: u16 = 0x3fff;

/// Why a frame is not a request this backend answers, or cannot become its
/// reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame ends inside a header.
    #[error("frame truncated")]
    Truncated,
    /// More than one VLAN tag.
    #[error("more than one VLAN tag")]
    StackedVlan,
    /// An EtherType other than IPv4 or IPv6.
    #[error("EtherType {0:#06x} is not IP")]
    NotIp(u16),
    /// The IP version field disagrees with the EtherType.
    #[error("IP version field does not match the EtherType")]
    IpVersion,
    /// IPv4 header length below 20 bytes (IHL < 5).
    #[error("IPv4 header length below 20 bytes")]
    Ipv4HeaderLength,
    /// IPv4 total length or IPv6 payload length does not fit the frame or
    /// the headers.
    #[error("IP length does not match the frame")]
    IpLength,
    /// An IPv4 fragment (more-fragments flag or a non-zero offset).
    #[error("IPv4 fragment")]
    Fragment,
    /// Not UDP (for IPv6: also any extension header).
    #[error("IP protocol / next header {0} is not UDP")]
    NotUdp(u8),
    /// UDP length below 8 or different from the IP payload length.
    #[error("UDP length does not match the IP length")]
    UdpLength,
    /// The reply is longer than the request's payload.
    #[error("reply longer than the request")]
    ReplyTooLong,
    /// The scratch buffer cannot hold the request payload.
    #[error("scratch buffer smaller than the request payload")]
    ScratchTooSmall,
    /// The [`RequestFrame`] does not describe this frame.
    #[error("request description does not match the frame")]
    Mismatch,
}

impl FrameError {
    /// Every error, in counter order.
    pub const ALL: [Self; 12] = [
        Self::Truncated,
        Self::StackedVlan,
        Self::NotIp(0),
        Self::IpVersion,
        Self::Ipv4HeaderLength,
        Self::IpLength,
        Self::Fragment,
        Self::NotUdp(0),
        Self::UdpLength,
        Self::ReplyTooLong,
        Self::ScratchTooSmall,
        Self::Mismatch,
    ];

    /// Stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::StackedVlan => "stacked_vlan",
            Self::NotIp(_) => "not_ip",
            Self::IpVersion => "ip_version",
            Self::Ipv4HeaderLength => "ipv4_header_length",
            Self::IpLength => "ip_length",
            Self::Fragment => "fragment",
            Self::NotUdp(_) => "not_udp",
            Self::UdpLength => "udp_length",
            Self::ReplyTooLong => "reply_too_long",
            Self::ScratchTooSmall => "scratch_too_small",
            Self::Mismatch => "mismatch",
        }
    }

    /// Position in [`Self::ALL`], for counter arrays.
    pub const fn index(self) -> usize {
        match self {
            Self::Truncated => 0,
            Self::StackedVlan => 1,
            Self::NotIp(_) => 2,
            Self::IpVersion => 3,
            Self::Ipv4HeaderLength => 4,
            Self::IpLength => 5,
            Self::Fragment => 6,
            Self::NotUdp(_) => 7,
            Self::UdpLength => 8,
            Self::ReplyTooLong => 9,
            Self::ScratchTooSmall => 10,
            Self::Mismatch => 11,
        }
    }
}

/// IP version of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// One VLAN tag, as found (and kept in the reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VlanTag {
    /// [`ETH_P_8021Q`] or [`ETH_P_8021AD`].
    pub tpid: u16,
    /// Priority, drop eligibility and VLAN ID.
    pub tci: u16,
}

impl VlanTag {
    /// The 12-bit VLAN ID.
    pub const fn id(self) -> u16 {
        self.tci & 0x0fff
    }
}

/// Where the parts of a parsed request frame are, and who sent it to whom.
/// Only [`parse_request`] makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestFrame {
    l3: usize,
    l4: usize,
    payload_len: usize,
    src: SocketAddr,
    dst: SocketAddr,
    vlan: Option<VlanTag>,
}

impl RequestFrame {
    /// Offset of the IP header.
    pub const fn l3_offset(&self) -> usize {
        self.l3
    }

    /// Offset of the UDP header.
    pub const fn l4_offset(&self) -> usize {
        self.l4
    }

    /// Offset of the UDP payload (the NTP packet).
    pub const fn payload_offset(&self) -> usize {
        self.l4 + UDP_HLEN
    }

    /// Length of the UDP payload.
    pub const fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// The frame's length up to the end of the UDP payload (any Ethernet
    /// padding after it excluded).
    pub const fn len(&self) -> usize {
        self.payload_offset() + self.payload_len
    }

    /// Whether the UDP payload is empty.
    pub const fn is_empty(&self) -> bool {
        self.payload_len == 0
    }

    /// The client: source address and port.
    pub const fn src(&self) -> SocketAddr {
        self.src
    }

    /// The server address and port the request was sent to.
    pub const fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// IPv4 or IPv6.
    pub const fn family(&self) -> IpFamily {
        match self.src {
            SocketAddr::V4(_) => IpFamily::V4,
            SocketAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The VLAN tag, if the frame had one.
    pub const fn vlan(&self) -> Option<VlanTag> {
        self.vlan
    }

    /// Whether the frame had a VLAN tag.
    pub const fn has_vlan(&self) -> bool {
        self.vlan.is_some()
    }
}

fn be16(b: &[u8], at: usize) -> Result<u16, FrameError> {
    match b.get(at..at + 2) {
        Some(&[hi, lo]) => Ok(u16::from_be_bytes([hi, lo])),
        _ => Err(FrameError::Truncated),
    }
}

fn array<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], FrameError> {
    b.get(at..at + N).and_then(|s| s.try_into().ok()).ok_or(FrameError::Truncated)
}

/// Parses an Ethernet frame carrying a UDP datagram (see the module docs for
/// what is accepted).
pub fn parse_request(frame: &[u8]) -> Result<RequestFrame, FrameError> {
    let outer = be16(frame, 12)?;
    let (ethertype, l3, vlan) = if outer == ETH_P_8021Q || outer == ETH_P_8021AD {
        let tci = be16(frame, ETH_HLEN)?;
        let inner = be16(frame, ETH_HLEN + 2)?;
        if inner == ETH_P_8021Q || inner == ETH_P_8021AD {
            return Err(FrameError::StackedVlan);
        }
        (inner, ETH_HLEN + VLAN_HLEN, Some(VlanTag { tpid: outer, tci }))
    } else {
        (outer, ETH_HLEN, None)
    };
    let ip = frame.get(l3..).ok_or(FrameError::Truncated)?;
    let (l4_rel, ip_payload_len, src, dst) = match ethertype {
        ETH_P_IP => {
            let first = *ip.first().ok_or(FrameError::Truncated)?;
            if ip.len() < IPV4_MIN_HLEN {
                return Err(FrameError::Truncated);
            }
            if first >> 4 != 4 {
                return Err(FrameError::IpVersion);
            }
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < IPV4_MIN_HLEN {
                return Err(FrameError::Ipv4HeaderLength);
            }
            let total = usize::from(be16(ip, 2)?);
            if total < ihl || total > ip.len() {
                return Err(FrameError::IpLength);
            }
            if be16(ip, 6)? & IPV4_FRAGMENT_MASK != 0 {
                return Err(FrameError::Fragment);
            }
            if ip[9] != IPPROTO_UDP {
                return Err(FrameError::NotUdp(ip[9]));
            }
            let src = IpAddr::V4(Ipv4Addr::from(array::<4>(ip, 12)?));
            let dst = IpAddr::V4(Ipv4Addr::from(array::<4>(ip, 16)?));
            (ihl, total - ihl, src, dst)
        }
        ETH_P_IPV6 => {
            if ip.len() < IPV6_HLEN {
                return Err(FrameError::Truncated);
            }
            if ip[0] >> 4 != 6 {
                return Err(FrameError::IpVersion);
            }
            let payload = usize::from(be16(ip, 4)?);
            if IPV6_HLEN + payload > ip.len() {
                return Err(FrameError::IpLength);
            }
            if ip[6] != IPPROTO_UDP {
                return Err(FrameError::NotUdp(ip[6]));
            }
            let src = IpAddr::V6(Ipv6Addr::from(array::<16>(ip, 8)?));
            let dst = IpAddr::V6(Ipv6Addr::from(array::<16>(ip, 24)?));
            (IPV6_HLEN, payload, src, dst)
        }
        other => return Err(FrameError::NotIp(other)),
    };
    let l4 = l3 + l4_rel;
    let udp = frame.get(l4..).ok_or(FrameError::Truncated)?;
    if ip_payload_len < UDP_HLEN {
        return Err(FrameError::UdpLength);
    }
    let sport = be16(udp, 0)?;
    let dport = be16(udp, 2)?;
    let udp_len = usize::from(be16(udp, 4)?);
    if udp_len != ip_payload_len {
        return Err(FrameError::UdpLength);
    }
    Ok(RequestFrame {
        l3,
        l4,
        payload_len: udp_len - UDP_HLEN,
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        vlan,
    })
}

/// The request's UDP payload.
pub fn request_payload<'f>(frame: &'f [u8], req: &RequestFrame) -> Result<&'f [u8], FrameError> {
    frame.get(req.payload_offset()..req.len()).ok_or(FrameError::Mismatch)
}

/// The slot the reply payload is written into: the request's payload bytes,
/// so exactly as long as the request (a reply is never longer).
pub fn reply_payload_mut<'f>(frame: &'f mut [u8], req: &RequestFrame) -> Result<&'f mut [u8], FrameError> {
    frame.get_mut(req.payload_offset()..req.len()).ok_or(FrameError::Mismatch)
}

/// Copies the request payload into `scratch` and returns it together with
/// the reply slot ([`reply_payload_mut`]), ready for `Responder::handle`.
pub fn stage_request<'s, 'f>(
    frame: &'f mut [u8],
    req: &RequestFrame,
    scratch: &'s mut [u8],
) -> Result<(&'s [u8], &'f mut [u8]), FrameError> {
    let slot = reply_payload_mut(frame, req)?;
    let staged = scratch.get_mut(..slot.len()).ok_or(FrameError::ScratchTooSmall)?;
    staged.copy_from_slice(slot);
    Ok((staged, slot))
}

/// Turns the request frame described by `req` into its reply, whose
/// `reply_len`-byte UDP payload is already at [`RequestFrame::payload_offset`]
/// (see [`reply_payload_mut`]). Returns the reply frame's length.
///
/// - Ethernet: source and destination swapped; the VLAN tag kept.
/// - IPv4: addresses swapped, TTL [`REPLY_TTL`], DF set and no fragment
///   offset, the ID kept, DSCP kept and ECN cleared (a reply is not
///   ECN-capable transport), options replaced by end-of-options bytes (no
///   source route or record route is echoed; the header keeps its length),
///   total length and header checksum recomputed.
/// - IPv6: addresses swapped, hop limit [`REPLY_TTL`], traffic class ECN
///   cleared, flow label kept (reflected, which keeps ECMP paths
///   symmetric), payload length updated.
/// - UDP: ports swapped, length updated, checksum computed over the
///   pseudo-header (for IPv4 too; `0` is sent as `0xffff`).
pub fn build_reply_in_place(frame: &mut [u8], req: &RequestFrame, reply_len: usize) -> Result<usize, FrameError> {
    if reply_len > req.payload_len {
        return Err(FrameError::ReplyTooLong);
    }
    let frame_len = req.payload_offset() + reply_len;
    let udp_len = UDP_HLEN + reply_len;
    // Every range below lies within ..req.len(), so this one check makes
    // the indexing that follows infallible.
    let frame = frame.get_mut(..req.len()).ok_or(FrameError::Mismatch)?;
    if req.l3 < ETH_HLEN || req.l4 < req.l3 + IPV4_MIN_HLEN {
        return Err(FrameError::Mismatch);
    }

    let (eth, rest) = frame.split_at_mut(ETH_HLEN);
    let (_, rest) = rest.split_at_mut(req.l3 - ETH_HLEN);
    let (ip, udp) = rest.split_at_mut(req.l4 - req.l3);
    let matches = match req.family() {
        IpFamily::V4 => ip[0] >> 4 == 4 && usize::from(ip[0] & 0x0f) * 4 == ip.len(),
        IpFamily::V6 => ip[0] >> 4 == 6 && ip.len() == IPV6_HLEN,
    };
    if !matches {
        return Err(FrameError::Mismatch);
    }

    let (dst_mac, src_mac) = eth.split_at_mut(6);
    dst_mac.swap_with_slice(&mut src_mac[..6]);
    let addrs = match req.family() {
        IpFamily::V4 => {
            let total = u16::try_from(ip.len() + udp_len).map_err(|_| FrameError::Mismatch)?;
            ip[1] &= !0x03;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[6..8].copy_from_slice(&IPV4_DF.to_be_bytes());
            ip[8] = REPLY_TTL;
            let (head, opts) = ip.split_at_mut(IPV4_MIN_HLEN);
            let (src, dst) = head[12..].split_at_mut(4);
            src.swap_with_slice(dst);
            opts.fill(0);
            set_ipv4_checksum(ip);
            addr_sum(&ip[12..20])
        }
        IpFamily::V6 => {
            ip[1] &= !0x30;
            let payload = u16::try_from(udp_len).map_err(|_| FrameError::Mismatch)?;
            ip[4..6].copy_from_slice(&payload.to_be_bytes());
            ip[7] = REPLY_TTL;
            let (src, dst) = ip[8..40].split_at_mut(16);
            src.swap_with_slice(dst);
            addr_sum(&ip[8..40])
        }
    };
    let (sport, dport) = udp[..4].split_at_mut(2);
    sport.swap_with_slice(dport);
    finish_udp(&mut udp[..udp_len], addrs)?;
    Ok(frame_len)
}

/// Zeroes the IPv4 header checksum field of `ip` (the whole header,
/// options included) and writes the header's checksum there.
fn set_ipv4_checksum(ip: &mut [u8]) {
    ip[10..12].fill(0);
    let check = Checksum::new().add_bytes(ip).finish();
    ip[10..12].copy_from_slice(&check.to_be_bytes());
}

/// The pseudo-header's address part: the sum of source and destination.
fn addr_sum(addrs: &[u8]) -> Checksum {
    let mut sum = Checksum::new();
    sum.add_bytes(addrs);
    sum
}

/// Writes the length and checksum of the UDP datagram `udp` (header and
/// payload, exactly `udp.len()` bytes); `addrs` holds the pseudo-header's
/// source and destination addresses. A computed `0` is sent as `0xffff`.
fn finish_udp(udp: &mut [u8], addrs: Checksum) -> Result<(), FrameError> {
    let len = u16::try_from(udp.len()).map_err(|_| FrameError::Mismatch)?;
    udp[4..6].copy_from_slice(&len.to_be_bytes());
    udp[6..8].fill(0);
    let mut sum = addrs;
    sum.add_u16(u16::from(IPPROTO_UDP)).add_u16(len).add_bytes(udp);
    let check = match sum.finish() {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&check.to_be_bytes());
    Ok(())
}

/// Hop limit / TTL of the frames [`write_udp_frame`] builds.
pub const REQUEST_TTL: u8 = 64;

/// Where the UDP payload starts in a frame [`write_udp_frame`] builds:
/// untagged Ethernet, IPv4 without options or IPv6 without extension
/// headers, UDP. A sender writes the payload there first.
pub const fn udp_payload_offset(family: IpFamily) -> usize {
    ETH_HLEN
        + match family {
            IpFamily::V4 => IPV4_MIN_HLEN,
            IpFamily::V6 => IPV6_HLEN,
        }
        + UDP_HLEN
}

/// The Ethernet addresses of the frames a sender builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacPair {
    /// The sending interface's address.
    pub src: [u8; 6],
    /// The next hop's address (the server's, or its gateway's).
    pub dst: [u8; 6],
}

/// Builds a UDP frame from `src` to `dst` around the `payload_len`-byte
/// payload already at [`udp_payload_offset`] in `frame`, and returns the
/// frame's length: Ethernet (untagged), then IPv4 (DF, TTL
/// [`REQUEST_TTL`], ID `ipv4_id`, header checksum) or IPv6 (hop limit
/// [`REQUEST_TTL`], traffic class and flow label 0), then UDP with its
/// checksum over the pseudo-header. This is what chime-load sends over
/// AF_XDP; [`parse_request`] reads such frames back.
///
/// Errors: [`FrameError::Mismatch`] when `src` and `dst` are of different
/// families, [`FrameError::Truncated`] when `frame` cannot hold the
/// headers and payload, [`FrameError::UdpLength`] when the datagram would
/// not fit the 16-bit length fields.
pub fn write_udp_frame(
    frame: &mut [u8],
    macs: &MacPair,
    src: SocketAddr,
    dst: SocketAddr,
    payload_len: usize,
    ipv4_id: u16,
) -> Result<usize, FrameError> {
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => IpFamily::V4,
        (IpAddr::V6(_), IpAddr::V6(_)) => IpFamily::V6,
        _ => return Err(FrameError::Mismatch),
    };
    let l4 = udp_payload_offset(family) - UDP_HLEN;
    let len = l4 + UDP_HLEN + payload_len;
    let ip_len = len - ETH_HLEN;
    if ip_len > usize::from(u16::MAX) {
        return Err(FrameError::UdpLength);
    }
    let frame = frame.get_mut(..len).ok_or(FrameError::Truncated)?;
    let (eth, rest) = frame.split_at_mut(ETH_HLEN);
    let (ip, udp) = rest.split_at_mut(l4 - ETH_HLEN);
    eth[..6].copy_from_slice(&macs.dst);
    eth[6..12].copy_from_slice(&macs.src);
    let addrs = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            eth[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
            ip[0] = 0x45;
            ip[1] = 0;
            ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&ipv4_id.to_be_bytes());
            ip[6..8].copy_from_slice(&IPV4_DF.to_be_bytes());
            ip[8] = REQUEST_TTL;
            ip[9] = IPPROTO_UDP;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            set_ipv4_checksum(ip);
            addr_sum(&ip[12..20])
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            eth[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
            ip[0..4].copy_from_slice(&(6u32 << 28).to_be_bytes());
            ip[4..6].copy_from_slice(&((UDP_HLEN + payload_len) as u16).to_be_bytes());
            ip[6] = IPPROTO_UDP;
            ip[7] = REQUEST_TTL;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            addr_sum(&ip[8..40])
        }
        _ => return Err(FrameError::Mismatch),
    };
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    finish_udp(udp, addrs)?;
    Ok(len)
}

/// Whether the request's UDP checksum is right (`0` over IPv4 means "none"
/// and passes). Not part of [`parse_request`]: frames the kernel built
/// locally (over veth, say) can carry a partial checksum that offload would
/// have completed, so checking is the worker's choice.
pub fn udp_checksum_ok(frame: &[u8], req: &RequestFrame) -> bool {
    let Some(udp) = frame.get(req.l4..req.len()) else { return false };
    if req.family() == IpFamily::V4 && udp.get(6..8) == Some(&[0, 0]) {
        return true;
    }
    let mut sum = Checksum::new();
    match (req.src.ip(), req.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum.add_bytes(&s.octets()).add_bytes(&d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum.add_bytes(&s.octets()).add_bytes(&d.octets()),
        _ => return false,
    };
    let Ok(len) = u16::try_from(udp.len()) else { return false };
    sum.add_u16(u16::from(IPPROTO_UDP)).add_u16(len).add_bytes(udp);
    sum.sum() == 0xffff
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
    const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

    /// How to build a test frame.
    #[derive(Clone, Debug)]
    struct Spec {
        src: SocketAddr,
        dst: SocketAddr,
        vlan: Option<VlanTag>,
        ipv4_options: Vec<u8>,
        ttl: u8,
        tos: u8,
        ipv4_id: u16,
        flow: u32,
        payload: Vec<u8>,
        padding: usize,
    }

    impl Spec {
        fn new(src: &str, dst: &str) -> Self {
            Self {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                vlan: None,
                ipv4_options: Vec::new(),
                ttl: 57,
                tos: 0xb9,
                ipv4_id: 0x1234,
                flow: 0xabcde,
                payload: ntp_request(),
                padding: 0,
            }
        }
    }

    fn ntp_request() -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x23;
        p[40..48].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
        p
    }

    /// The obvious RFC 1071 sum, independent of `checksum.rs`.
    fn ref_sum(data: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        for pair in data.chunks(2) {
            sum += u64::from(pair[0]) << 8 | u64::from(*pair.get(1).unwrap_or(&0));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    fn ip_bytes(ip: IpAddr) -> Vec<u8> {
        match ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }

    /// A frame built byte by byte, with correct checksums from `ref_sum`.
    fn build(spec: &Spec) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&SERVER_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        if let Some(tag) = spec.vlan {
            f.extend_from_slice(&tag.tpid.to_be_bytes());
            f.extend_from_slice(&tag.tci.to_be_bytes());
        }
        let udp_len = (UDP_HLEN + spec.payload.len()) as u16;
        let mut udp = Vec::new();
        udp.extend_from_slice(&spec.src.port().to_be_bytes());
        udp.extend_from_slice(&spec.dst.port().to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&spec.payload);
        let mut pseudo = ip_bytes(spec.src.ip());
        pseudo.extend(ip_bytes(spec.dst.ip()));
        pseudo.extend_from_slice(&[0, IPPROTO_UDP]);
        pseudo.extend_from_slice(&udp_len.to_be_bytes());
        pseudo.extend_from_slice(&udp);
        let c = !ref_sum(&pseudo);
        udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
        match (spec.src.ip(), spec.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let ihl = IPV4_MIN_HLEN + spec.ipv4_options.len();
                let mut ip = vec![0x40 | (ihl / 4) as u8, spec.tos];
                ip.extend_from_slice(&((ihl + udp.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&spec.ipv4_id.to_be_bytes());
                ip.extend_from_slice(&[0, 0, spec.ttl, IPPROTO_UDP, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&spec.ipv4_options);
                let c = !ref_sum(&ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend(ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let word = 6 << 28 | u32::from(spec.tos) << 20 | (spec.flow & 0xfffff);
                f.extend_from_slice(&word.to_be_bytes());
                f.extend_from_slice(&udp_len.to_be_bytes());
                f.extend_from_slice(&[IPPROTO_UDP, spec.ttl]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed families"),
        }
        f.extend(udp);
        f.extend(std::iter::repeat_n(0u8, spec.padding));
        f
    }

    /// Checks a reply frame with the reference sum: IPv4 header checksum and
    /// UDP checksum over the pseudo-header.
    fn checksums_ok(f: &[u8]) -> bool {
        let r = parse_request(f).unwrap();
        let l3 = r.l3_offset();
        let l4 = r.l4_offset();
        if r.family() == IpFamily::V4 && ref_sum(&f[l3..l4]) != 0xffff {
            return false;
        }
        let udp = &f[l4..r.len()];
        if udp[6..8] == [0, 0] {
            return false; // chime always computes one
        }
        let mut pseudo = ip_bytes(r.src().ip());
        pseudo.extend(ip_bytes(r.dst().ip()));
        pseudo.extend_from_slice(&[0, IPPROTO_UDP]);
        pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(udp);
        ref_sum(&pseudo) == 0xffff
    }

    /// Parses, writes a reply of `reply` bytes, builds the reply frame and
    /// checks everything about it; returns it.
    fn round_trip(spec: &Spec, reply: &[u8]) -> Vec<u8> {
        let mut f = build(spec);
        let req = parse_request(&f).unwrap();
        assert_eq!(req.src(), spec.src);
        assert_eq!(req.dst(), spec.dst);
        assert_eq!(req.vlan(), spec.vlan);
        assert_eq!(req.payload_len(), spec.payload.len());
        assert_eq!(request_payload(&f, &req).unwrap(), &spec.payload[..]);
        assert!(udp_checksum_ok(&f, &req));

        let mut scratch = [0u8; 2048];
        let (staged, slot) = stage_request(&mut f, &req, &mut scratch).unwrap();
        assert_eq!(staged, &spec.payload[..]);
        slot[..reply.len()].copy_from_slice(reply);
        let n = build_reply_in_place(&mut f, &req, reply.len()).unwrap();
        assert_eq!(n, req.payload_offset() + reply.len());
        let out = f[..n].to_vec();

        let back = parse_request(&out).unwrap();
        assert_eq!(back.src(), spec.dst, "addresses and ports swapped");
        assert_eq!(back.dst(), spec.src);
        assert_eq!(back.vlan(), spec.vlan, "VLAN tag kept");
        assert_eq!(back.payload_offset(), req.payload_offset());
        assert_eq!(request_payload(&out, &back).unwrap(), reply);
        assert_eq!(out[..6], CLIENT_MAC, "to the client's MAC");
        assert_eq!(out[6..12], SERVER_MAC, "from ours");
        assert!(checksums_ok(&out), "checksums: {out:02x?}");
        assert!(udp_checksum_ok(&out, &back));
        let ip = &out[back.l3_offset()..];
        match back.family() {
            IpFamily::V4 => {
                assert_eq!(ip[8], REPLY_TTL);
                assert_eq!(ip[6..8], [0x40, 0], "DF, no offset");
                assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), spec.ipv4_id, "ID kept");
                assert_eq!(ip[1], spec.tos & !3, "DSCP kept, ECN cleared");
            }
            IpFamily::V6 => {
                assert_eq!(ip[7], REPLY_TTL);
                let word = u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]]);
                assert_eq!(word & 0xfffff, spec.flow & 0xfffff, "flow label kept");
                assert_eq!((word >> 20) as u8, spec.tos & !3, "traffic class ECN cleared");
            }
        }
        out
    }

    #[test]
    fn ipv4_round_trip() {
        let spec = Spec::new("192.0.2.7:40123", "198.51.100.1:123");
        let mut reply = ntp_request();
        reply[0] = 0x24;
        let out = round_trip(&spec, &reply);
        assert_eq!(out.len(), 14 + 20 + 8 + 48);
    }

    #[test]
    fn ipv6_round_trip() {
        let spec = Spec::new("[2001:db8::7]:40123", "[2001:db8::1]:123");
        let out = round_trip(&spec, &[0x24; 48]);
        assert_eq!(out.len(), 14 + 40 + 8 + 48);
    }

    #[test]
    fn vlan_tagged_round_trips() {
        for (src, dst) in [("192.0.2.7:1", "198.51.100.1:123"), ("[fe80::7]:65535", "[2001:db8::1]:123")] {
            for tpid in [ETH_P_8021Q, ETH_P_8021AD] {
                let mut spec = Spec::new(src, dst);
                spec.vlan = Some(VlanTag { tpid, tci: 0x2064 });
                let out = round_trip(&spec, &[0x24; 48]);
                assert_eq!(out[12..16], [(tpid >> 8) as u8, tpid as u8, 0x20, 0x64]);
                assert_eq!(parse_request(&out).unwrap().vlan().unwrap().id(), 0x064);
            }
        }
    }

    #[test]
    fn shorter_reply_and_padding() {
        // A 68-byte request (an unknown extension, say) answered with 48;
        // the request frame carries Ethernet padding, which is ignored.
        let mut spec = Spec::new("192.0.2.7:5000", "198.51.100.1:123");
        spec.payload = vec![0x23; 68];
        spec.padding = 7;
        round_trip(&spec, &[0x24; 48]);
        // A tiny datagram padded to the Ethernet minimum of 60 bytes.
        spec.payload = vec![1, 2];
        spec.padding = 60 - (14 + 20 + 8 + 2);
        round_trip(&spec, &[9]);
        round_trip(&spec, &[]);
    }

    #[test]
    fn ipv4_options_are_honoured_and_blanked() {
        let mut spec = Spec::new("192.0.2.7:5000", "198.51.100.1:123");
        // Record route (7), length 7, pointer 4, one empty slot, then EOOL.
        spec.ipv4_options = vec![7, 7, 4, 0, 0, 0, 0, 0];
        let out = round_trip(&spec, &[0x24; 48]);
        let r = parse_request(&out).unwrap();
        assert_eq!(r.l4_offset() - r.l3_offset(), 28);
        assert_eq!(out[34..42], [0; 8], "options blanked");
    }

    #[test]
    fn reply_longer_than_request_is_refused() {
        let mut f = build(&Spec::new("192.0.2.7:5000", "198.51.100.1:123"));
        let req = parse_request(&f).unwrap();
        let before = f.clone();
        assert_eq!(build_reply_in_place(&mut f, &req, 49), Err(FrameError::ReplyTooLong));
        assert_eq!(f, before, "frame untouched");
        assert_eq!(stage_request(&mut f, &req, &mut [0u8; 47]).unwrap_err(), FrameError::ScratchTooSmall);
    }

    #[test]
    fn description_of_another_frame_is_a_mismatch() {
        let v6 = build(&Spec::new("[2001:db8::7]:40123", "[2001:db8::1]:123"));
        let req6 = parse_request(&v6).unwrap();
        let mut v4 = build(&Spec::new("192.0.2.7:5000", "198.51.100.1:123"));
        let req4 = parse_request(&v4).unwrap();
        assert_eq!(build_reply_in_place(&mut v4, &req6, 48), Err(FrameError::Mismatch));
        let mut short = v4[..60].to_vec();
        assert_eq!(build_reply_in_place(&mut short, &req4, 48), Err(FrameError::Mismatch));
        assert_eq!(reply_payload_mut(&mut short, &req4).unwrap_err(), FrameError::Mismatch);
        let mut v6 = v6;
        let before = v6.clone();
        assert_eq!(build_reply_in_place(&mut v6, &req4, 48), Err(FrameError::Mismatch));
        assert_eq!(v6, before, "nothing changed before the mismatch was found");
    }

    #[test]
    fn malformed_frames_are_errors() {
        let v4 = build(&Spec::new("192.0.2.7:5000", "198.51.100.1:123"));
        let v6 = build(&Spec::new("[2001:db8::7]:40123", "[2001:db8::1]:123"));
        let with = |base: &[u8], at: usize, bytes: &[u8]| {
            let mut f = base.to_vec();
            f[at..at + bytes.len()].copy_from_slice(bytes);
            parse_request(&f)
        };
        // Every truncation of a valid frame is an error, never a panic.
        for n in 0..v4.len() {
            assert!(parse_request(&v4[..n]).is_err(), "v4 truncated to {n}");
        }
        for n in 0..v6.len() {
            assert!(parse_request(&v6[..n]).is_err(), "v6 truncated to {n}");
        }
        assert_eq!(parse_request(&[0u8; 13]), Err(FrameError::Truncated));
        assert_eq!(with(&v4, 12, &[0x08, 0x06]), Err(FrameError::NotIp(0x0806)));
        assert_eq!(with(&v4, 14, &[0x44]), Err(FrameError::Ipv4HeaderLength));
        assert_eq!(with(&v4, 14, &[0x65]), Err(FrameError::IpVersion));
        assert_eq!(with(&v4, 14, &[0x4f]), Err(FrameError::UdpLength), "IHL 15 leaves no room for UDP");
        assert_eq!(with(&v4, 16, &[0x00, 0x13]), Err(FrameError::IpLength), "total < IHL");
        assert_eq!(with(&v4, 16, &[0x00, 0x78]), Err(FrameError::IpLength), "total > frame");
        assert_eq!(with(&v4, 16, &[0x00, 0x40]), Err(FrameError::UdpLength), "total shorter than UDP says");
        assert_eq!(with(&v4, 16, &[0x00, 0x1b]), Err(FrameError::UdpLength), "no room for UDP header");
        assert_eq!(with(&v4, 20, &[0x20, 0x00]), Err(FrameError::Fragment), "more fragments");
        assert_eq!(with(&v4, 20, &[0x00, 0x08]), Err(FrameError::Fragment), "non-zero offset");
        assert_eq!(with(&v4, 20, &[0x40, 0x00]).map(|r| r.payload_len()), Ok(48), "DF is fine");
        assert_eq!(with(&v4, 23, &[6]), Err(FrameError::NotUdp(6)));
        assert_eq!(with(&v4, 38, &[0x00, 0x07]), Err(FrameError::UdpLength));
        assert_eq!(with(&v6, 14, &[0x45]), Err(FrameError::IpVersion));
        assert_eq!(with(&v6, 18, &[0x00, 0x39]), Err(FrameError::IpLength));
        assert_eq!(with(&v6, 18, &[0x00, 0x30]), Err(FrameError::UdpLength));
        assert_eq!(with(&v6, 20, &[0]), Err(FrameError::NotUdp(0)), "hop-by-hop header");
        assert_eq!(with(&v6, 20, &[44]), Err(FrameError::NotUdp(44)), "fragment header");
        let mut qinq = Spec::new("192.0.2.7:5000", "198.51.100.1:123");
        qinq.vlan = Some(VlanTag { tpid: ETH_P_8021AD, tci: 1 });
        let f = build(&qinq);
        assert_eq!(with(&f, 16, &[0x81, 0x00]), Err(FrameError::StackedVlan));
    }

    #[test]
    fn error_names_and_indices_agree() {
        for (i, e) in FrameError::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
            assert!(!e.name().is_empty());
        }
    }

    #[test]
    fn bad_request_checksum_is_noticed() {
        let mut f = build(&Spec::new("[2001:db8::7]:40123", "[2001:db8::1]:123"));
        let req = parse_request(&f).unwrap();
        let last = f.len() - 1;
        f[last] ^= 1;
        assert!(!udp_checksum_ok(&f, &req));
        let mut f = build(&Spec::new("192.0.2.7:5000", "198.51.100.1:123"));
        f[40..42].fill(0);
        assert!(udp_checksum_ok(&f, &parse_request(&f).unwrap()), "IPv4 checksum 0 = none");
    }

    /// Builds a sender's frame with [`write_udp_frame`] around `payload`
    /// and checks it with the independent reference sum and the parser.
    fn sent_frame(src: SocketAddr, dst: SocketAddr, payload: &[u8], id: u16) -> Vec<u8> {
        let macs = MacPair { src: CLIENT_MAC, dst: SERVER_MAC };
        let family = if src.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 };
        let at = udp_payload_offset(family);
        let mut f = vec![0xeeu8; at + payload.len() + 16];
        f[at..at + payload.len()].copy_from_slice(payload);
        let n = write_udp_frame(&mut f, &macs, src, dst, payload.len(), id).unwrap();
        assert_eq!(n, at + payload.len());
        assert_eq!(f[n..], [0xee; 16], "nothing written past the frame");
        let f = f[..n].to_vec();
        let r = parse_request(&f).unwrap();
        assert_eq!((r.src(), r.dst(), r.vlan()), (src, dst, None));
        assert_eq!(r.payload_offset(), at);
        assert_eq!(request_payload(&f, &r).unwrap(), payload);
        assert_eq!(f[..6], SERVER_MAC);
        assert_eq!(f[6..12], CLIENT_MAC);
        assert!(checksums_ok(&f), "checksums: {f:02x?}");
        assert!(udp_checksum_ok(&f, &r));
        let ip = &f[ETH_HLEN..];
        match family {
            IpFamily::V4 => {
                assert_eq!(ip[..2], [0x45, 0]);
                assert_eq!(ip[4..9], [(id >> 8) as u8, id as u8, 0x40, 0, REQUEST_TTL]);
            }
            IpFamily::V6 => {
                assert_eq!(ip[..4], [0x60, 0, 0, 0]);
                assert_eq!(ip[7], REQUEST_TTL);
            }
        }
        f
    }

    #[test]
    fn sender_frames_ipv4_and_ipv6() {
        let f = sent_frame("198.19.3.4:40000".parse().unwrap(), "198.18.0.1:123".parse().unwrap(), &ntp_request(), 7);
        assert_eq!(f.len(), 14 + 20 + 8 + 48);
        // The IPv4 header checksum by hand: 4500 004c 0007 4000 4011 ____
        // c613 0304 c612 0001 sums to 0x2548e, folded 0x5490, sent 0xab6f.
        assert_eq!(f[24..26], [0xab, 0x6f]);
        let f = sent_frame("[fdc4:1e:1::7]:1024".parse().unwrap(), "[fdc4:1e::1]:123".parse().unwrap(), &[0x23; 48], 0);
        assert_eq!(f.len(), 14 + 40 + 8 + 48);
        // An NTS-sized payload and an empty one.
        sent_frame("10.0.0.1:5".parse().unwrap(), "10.0.0.2:123".parse().unwrap(), &[0x5a; 1001], 0xffff);
        sent_frame("[::1]:5".parse().unwrap(), "[::2]:123".parse().unwrap(), &[], 0);
    }

    #[test]
    fn sender_frame_errors() {
        let macs = MacPair { src: CLIENT_MAC, dst: SERVER_MAC };
        let v4: SocketAddr = "10.0.0.1:5".parse().unwrap();
        let v6: SocketAddr = "[::1]:5".parse().unwrap();
        let mut f = [0u8; 128];
        assert_eq!(write_udp_frame(&mut f, &macs, v4, v6, 48, 0), Err(FrameError::Mismatch));
        assert_eq!(write_udp_frame(&mut f[..109], &macs, v6, v6, 48, 0), Err(FrameError::Truncated));
        assert_eq!(write_udp_frame(&mut f[..110], &macs, v6, v6, 48, 0), Ok(110));
        assert_eq!(write_udp_frame(&mut f[..89], &macs, v4, v4, 48, 0), Err(FrameError::Truncated));
        let mut big = vec![0u8; 70_000];
        assert_eq!(write_udp_frame(&mut big, &macs, v4, v4, 65_536 - 28, 0), Err(FrameError::UdpLength));
    }

    fn any_spec() -> impl Strategy<Value = Spec> {
        let v4 = (any::<[u8; 4]>(), any::<[u8; 4]>())
            .prop_map(|(a, b)| (IpAddr::V4(Ipv4Addr::from(a)), IpAddr::V4(Ipv4Addr::from(b))));
        let v6 = (any::<[u8; 16]>(), any::<[u8; 16]>())
            .prop_map(|(a, b)| (IpAddr::V6(Ipv6Addr::from(a)), IpAddr::V6(Ipv6Addr::from(b))));
        let vlan = prop_oneof![
            Just(None),
            (prop_oneof![Just(ETH_P_8021Q), Just(ETH_P_8021AD)], any::<u16>())
                .prop_map(|(tpid, tci)| Some(VlanTag { tpid, tci })),
        ];
        (
            prop_oneof![v4, v6],
            any::<(u16, u16)>(),
            vlan,
            0usize..=10,
            any::<(u8, u8, u16, u32)>(),
            proptest::collection::vec(any::<u8>(), 0..600),
            0usize..20,
        )
            .prop_map(|((s, d), (sp, dp), vlan, opt_words, (ttl, tos, id, flow), payload, padding)| Spec {
                src: SocketAddr::new(s, sp),
                dst: SocketAddr::new(d, dp),
                vlan,
                ipv4_options: if s.is_ipv4() { vec![1; opt_words * 4] } else { Vec::new() },
                ttl,
                tos,
                ipv4_id: id,
                flow,
                payload,
                padding,
            })
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), reply in 0usize..100) {
            let mut f = bytes;
            if let Ok(req) = parse_request(&f) {
                let _ = udp_checksum_ok(&f, &req);
                if let Ok(n) = build_reply_in_place(&mut f, &req, reply.min(req.payload_len())) {
                    let back = parse_request(&f[..n]).unwrap();
                    prop_assert_eq!(back.src(), req.dst());
                    prop_assert!(checksums_ok(&f[..n]));
                }
            }
        }

        #[test]
        fn mutated_valid_frames_never_panic(
            spec in any_spec(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
        ) {
            let mut f = build(&spec);
            for (at, x) in flips {
                let i = at % f.len();
                f[i] ^= x;
            }
            f.truncate(cut % (f.len() + 1));
            if let Ok(req) = parse_request(&f) {
                let n = req.payload_len();
                if let Ok(len) = build_reply_in_place(&mut f, &req, n / 2) {
                    prop_assert!(parse_request(&f[..len]).is_ok());
                }
            }
        }

        #[test]
        fn sender_frames_verify(
            spec in any_spec(),
            id in any::<u16>(),
        ) {
            sent_frame(spec.src, spec.dst, &spec.payload, id);
        }

        #[test]
        fn every_valid_request_gives_a_valid_reply(spec in any_spec(), cut in any::<usize>()) {
            let reply_len = cut % (spec.payload.len() + 1);
            let reply: Vec<u8> = (0..reply_len).map(|i| i as u8 ^ 0x5a).collect();
            round_trip(&spec, &reply);
        }
    }
}
