//! The NTPv4 packet header (RFC 5905 section 7.3) and its codec.
//!
//! [`Header::parse`] turns the first 48 bytes of a datagram into a typed
//! header; [`Packet::parse`] also validates what follows it (extension fields
//! per RFC 7822, or a legacy symmetric-key MAC) without copying.

use core::fmt;

use crate::ext::{ExtensionError, ExtensionFields};
use crate::time::{NtpShort, NtpTimestamp};

/// Length of the fixed NTP header.
pub const HEADER_LEN: usize = 48;

/// Leap indicator (two bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeapIndicator {
    /// No leap second pending.
    NoWarning,
    /// The last minute of the day has 61 seconds.
    InsertSecond,
    /// The last minute of the day has 59 seconds.
    DeleteSecond,
    /// Clock not synchronized (alarm).
    Unsynchronized,
}

impl LeapIndicator {
    /// From the two wire bits.
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 0x3 {
            0 => Self::NoWarning,
            1 => Self::InsertSecond,
            2 => Self::DeleteSecond,
            _ => Self::Unsynchronized,
        }
    }

    /// The two wire bits.
    pub const fn to_bits(self) -> u8 {
        match self {
            Self::NoWarning => 0,
            Self::InsertSecond => 1,
            Self::DeleteSecond => 2,
            Self::Unsynchronized => 3,
        }
    }
}

/// Association mode (three bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// 0: reserved (NTPv1 packets carry it).
    Reserved,
    /// 1: symmetric active.
    SymmetricActive,
    /// 2: symmetric passive.
    SymmetricPassive,
    /// 3: client.
    Client,
    /// 4: server.
    Server,
    /// 5: broadcast.
    Broadcast,
    /// 6: NTP control message (ntpq).
    Control,
    /// 7: reserved for private use (ntpdc, the old monlist amplifier).
    Private,
}

impl Mode {
    /// From the three wire bits.
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 0x7 {
            0 => Self::Reserved,
            1 => Self::SymmetricActive,
            2 => Self::SymmetricPassive,
            3 => Self::Client,
            4 => Self::Server,
            5 => Self::Broadcast,
            6 => Self::Control,
            _ => Self::Private,
        }
    }

    /// The three wire bits.
    pub const fn to_bits(self) -> u8 {
        match self {
            Self::Reserved => 0,
            Self::SymmetricActive => 1,
            Self::SymmetricPassive => 2,
            Self::Client => 3,
            Self::Server => 4,
            Self::Broadcast => 5,
            Self::Control => 6,
            Self::Private => 7,
        }
    }
}

/// The 32-bit reference identifier: four ASCII characters at stratum 0
/// (kiss code) and 1 (reference clock), an IPv4 address (or the first four
/// bytes of an MD5 of an IPv6 address) above.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RefId(pub [u8; 4]);

impl RefId {
    /// Kiss code RATE: the client exceeds the rate limit.
    pub const RATE: Self = Self(*b"RATE");
    /// Kiss code DENY: access denied by the server.
    pub const DENY: Self = Self(*b"DENY");
    /// Kiss code RSTR: access restricted (denied for this kind of request).
    pub const RSTR: Self = Self(*b"RSTR");
    /// Kiss code NTSN: NTS negative acknowledgement (RFC 8915).
    pub const NTSN: Self = Self(*b"NTSN");
    /// 127.127.1.1, the "local clock" reference ID chrony and ntpd use for
    /// an undisciplined local clock; no client has this address.
    pub const LOCAL: Self = Self([0x7F, 0x7F, 0x01, 0x01]);

    /// From four ASCII characters (shorter strings are NUL-padded); `None`
    /// for longer or non-ASCII strings.
    pub fn from_ascii(s: &str) -> Option<Self> {
        if s.len() > 4 || !s.is_ascii() {
            return None;
        }
        let mut id = [0u8; 4];
        id[..s.len()].copy_from_slice(s.as_bytes());
        Some(Self(id))
    }
}

impl fmt::Debug for RefId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.iter().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == 0) {
            let s: String = self.0.iter().filter(|b| **b != 0).map(|b| char::from(*b)).collect();
            write!(f, "RefId({s:?})")
        } else {
            let [a, b, c, d] = self.0;
            write!(f, "RefId({a}.{b}.{c}.{d})")
        }
    }
}

/// The fixed 48-byte NTP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Leap indicator.
    pub leap: LeapIndicator,
    /// Version number, 1 to 7 on the wire (chime answers 1 to 4).
    pub version: u8,
    /// Association mode.
    pub mode: Mode,
    /// Stratum; 0 in a server packet marks a kiss-o'-death.
    pub stratum: u8,
    /// Poll exponent, log2 seconds.
    pub poll: i8,
    /// Precision exponent, log2 seconds.
    pub precision: i8,
    /// Total round-trip delay to the reference clock.
    pub root_delay: NtpShort,
    /// Total dispersion to the reference clock.
    pub root_dispersion: NtpShort,
    /// Reference identifier or kiss code.
    pub reference_id: RefId,
    /// When the system clock was last set or corrected.
    pub reference_ts: NtpTimestamp,
    /// Origin timestamp (T1 of the client's request, echoed).
    pub origin_ts: NtpTimestamp,
    /// Receive timestamp (T2).
    pub receive_ts: NtpTimestamp,
    /// Transmit timestamp (T3).
    pub transmit_ts: NtpTimestamp,
}

/// Why a datagram is not an NTP packet chime can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Shorter than the 48-byte header.
    #[error("packet shorter than the 48-byte NTP header")]
    TooShort,
    /// The bytes after the header are neither valid extension fields nor a
    /// MAC.
    #[error("malformed extension field: {0}")]
    Extension(#[from] ExtensionError),
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    (u64::from(be_u32(b, at)) << 32) | u64::from(be_u32(b, at + 4))
}

impl Header {
    /// Reads the header from the first 48 bytes of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        let b0 = buf[0];
        Ok(Self {
            leap: LeapIndicator::from_bits(b0 >> 6),
            version: (b0 >> 3) & 0x7,
            mode: Mode::from_bits(b0),
            stratum: buf[1],
            poll: buf[2] as i8,
            precision: buf[3] as i8,
            root_delay: NtpShort::from_bits(be_u32(buf, 4)),
            root_dispersion: NtpShort::from_bits(be_u32(buf, 8)),
            reference_id: RefId([buf[12], buf[13], buf[14], buf[15]]),
            reference_ts: NtpTimestamp::from_bits(be_u64(buf, 16)),
            origin_ts: NtpTimestamp::from_bits(be_u64(buf, 24)),
            receive_ts: NtpTimestamp::from_bits(be_u64(buf, 32)),
            transmit_ts: NtpTimestamp::from_bits(be_u64(buf, 40)),
        })
    }

    /// Writes the header into the first 48 bytes of `out`, except the
    /// transmit timestamp, which [`write_transmit`] fills in as late as
    /// possible. Panics if `out` is shorter than 48 bytes (callers check).
    pub fn write_without_transmit(&self, out: &mut [u8]) {
        let out = &mut out[..HEADER_LEN];
        out[0] = (self.leap.to_bits() << 6) | ((self.version & 0x7) << 3) | self.mode.to_bits();
        out[1] = self.stratum;
        out[2] = self.poll as u8;
        out[3] = self.precision as u8;
        out[4..8].copy_from_slice(&self.root_delay.to_bits().to_be_bytes());
        out[8..12].copy_from_slice(&self.root_dispersion.to_bits().to_be_bytes());
        out[12..16].copy_from_slice(&self.reference_id.0);
        out[16..24].copy_from_slice(&self.reference_ts.to_bits().to_be_bytes());
        out[24..32].copy_from_slice(&self.origin_ts.to_bits().to_be_bytes());
        out[32..40].copy_from_slice(&self.receive_ts.to_bits().to_be_bytes());
    }

    /// Writes the whole header, transmit timestamp included.
    pub fn write(&self, out: &mut [u8]) {
        self.write_without_transmit(out);
        write_transmit(out, self.transmit_ts);
    }
}

/// Writes the transmit timestamp field (bytes 40..48) of a header in `out`.
pub fn write_transmit(out: &mut [u8], ts: NtpTimestamp) {
    out[40..48].copy_from_slice(&ts.to_bits().to_be_bytes());
}

/// What follows the header of an NTP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trailer<'a> {
    /// Nothing: a plain 48-byte packet.
    None,
    /// Zero or more extension fields (RFC 7822), validated; iterate them with
    /// [`Packet::extension_fields`].
    Extensions(&'a [u8]),
    /// A legacy symmetric-key MAC (key ID and digest, or a 4-byte
    /// crypto-NAK), possibly after extension fields; chime does not do
    /// symmetric-key authentication.
    Mac {
        /// Extension fields before the MAC (validated).
        extensions: &'a [u8],
        /// The MAC bytes.
        mac: &'a [u8],
    },
}

/// A parsed NTP packet: the header and a zero-copy view of what follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The fixed header.
    pub header: Header,
    /// Extension fields or MAC.
    pub trailer: Trailer<'a>,
}

impl<'a> Packet<'a> {
    /// Parses a whole datagram: the header, then extension fields per RFC
    /// 7822 (each at least 16 bytes, a multiple of 4, within the packet).
    /// Trailing bytes that are not a valid field but have a MAC's length (4,
    /// 20 or 24 bytes) are taken as a legacy MAC.
    pub fn parse(buf: &'a [u8]) -> Result<Self, ParseError> {
        let header = Header::parse(buf)?;
        let rest = &buf[HEADER_LEN..];
        if rest.is_empty() {
            return Ok(Self { header, trailer: Trailer::None });
        }
        let mut fields = ExtensionFields::new(rest);
        let mut consumed = 0;
        loop {
            let remaining = &rest[consumed..];
            if remaining.is_empty() {
                return Ok(Self { header, trailer: Trailer::Extensions(rest) });
            }
            match fields.next() {
                Some(Ok(f)) => consumed += f.wire_len(),
                Some(Err(e)) => {
                    return if matches!(remaining.len(), 4 | 20 | 24) {
                        Ok(Self { header, trailer: Trailer::Mac { extensions: &rest[..consumed], mac: remaining } })
                    } else {
                        Err(ParseError::Extension(e))
                    };
                }
                None => unreachable_empty(),
            }
        }
    }

    /// The extension fields (already validated by [`Packet::parse`]).
    pub fn extension_fields(&self) -> ExtensionFields<'a> {
        match self.trailer {
            Trailer::None => ExtensionFields::new(&[]),
            Trailer::Extensions(e) | Trailer::Mac { extensions: e, .. } => ExtensionFields::new(e),
        }
    }
}

// The iterator only returns `None` on empty input, which the loop above
// handles first; this keeps that reasoning in one named place.
#[cold]
fn unreachable_empty() -> ! {
    unreachable!("extension iterator ended with bytes remaining")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext::{ExtensionField, write_extension_field};

    fn sample() -> Header {
        Header {
            leap: LeapIndicator::InsertSecond,
            version: 4,
            mode: Mode::Server,
            stratum: 2,
            poll: -3,
            precision: -24,
            root_delay: NtpShort::from_bits(0x0001_8000),
            root_dispersion: NtpShort::from_bits(0x42),
            reference_id: RefId(*b"GPS\0"),
            reference_ts: NtpTimestamp::from_bits(0x0102_0304_0506_0708),
            origin_ts: NtpTimestamp::from_bits(0x1112_1314_1516_1718),
            receive_ts: NtpTimestamp::from_bits(0x2122_2324_2526_2728),
            transmit_ts: NtpTimestamp::from_bits(0x3132_3334_3536_3738),
        }
    }

    #[test]
    fn header_round_trip() {
        let h = sample();
        let mut buf = [0u8; 48];
        h.write(&mut buf);
        assert_eq!(buf[0], 0b01_100_100);
        assert_eq!(buf[2], 0xFD);
        assert_eq!(&buf[40..48], &[0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38]);
        assert_eq!(Header::parse(&buf).unwrap(), h);
    }

    #[test]
    fn too_short() {
        assert_eq!(Header::parse(&[0u8; 47]), Err(ParseError::TooShort));
        assert_eq!(Packet::parse(&[]), Err(ParseError::TooShort));
    }

    #[test]
    fn plain_packet_has_no_trailer() {
        let p = Packet::parse(&[0x23; 48]).unwrap();
        assert_eq!(p.trailer, Trailer::None);
        assert_eq!(p.extension_fields().count(), 0);
    }

    #[test]
    fn extension_fields_are_views() {
        let mut buf = [0u8; 48 + 16 + 36];
        buf[0] = 0x23;
        let n1 = write_extension_field(&mut buf[48..], 0x0104, &[7u8; 12]).unwrap();
        let n2 = write_extension_field(&mut buf[48 + n1..], 0x0204, &[9u8; 30]).unwrap();
        assert_eq!((n1, n2), (16, 36));
        let p = Packet::parse(&buf).unwrap();
        let fields: Vec<ExtensionField<'_>> = p.extension_fields().map(Result::unwrap).collect();
        assert_eq!(fields.len(), 2);
        assert_eq!(fields[0].field_type, 0x0104);
        assert_eq!(fields[0].value, &[7u8; 12]);
        assert_eq!(fields[1].field_type, 0x0204);
        assert_eq!(&fields[1].value[..30], &[9u8; 30]);
        assert_eq!(&fields[1].value[30..], &[0u8; 2]);
    }

    #[test]
    fn legacy_mac_is_recognised() {
        let mut buf = [0u8; 48 + 20];
        buf[0] = 0x1B;
        buf[48..52].copy_from_slice(&1u32.to_be_bytes()); // key id 1
        let p = Packet::parse(&buf).unwrap();
        assert!(matches!(p.trailer, Trailer::Mac { mac, .. } if mac.len() == 20));
    }

    #[test]
    fn garbage_after_header_is_an_error() {
        let mut buf = [0u8; 48 + 7];
        buf[0] = 0x23;
        assert!(matches!(Packet::parse(&buf), Err(ParseError::Extension(_))));
    }

    #[test]
    fn refid_ascii() {
        assert_eq!(RefId::from_ascii("PTP"), Some(RefId(*b"PTP\0")));
        assert_eq!(RefId::from_ascii("TOOLONG"), None);
        assert_eq!(format!("{:?}", RefId::RATE), "RefId(\"RATE\")");
        assert_eq!(format!("{:?}", RefId::LOCAL), "RefId(127.127.1.1)");
    }
}
