//! What chime-load sends, and how it checks what comes back.
//!
//! Requests are written into batch slots in place; replies are checked
//! without allocating: origin, mode, version, stratum and leap, T2 <= T3,
//! server time near local time. NTS parts are in [`crate::nts`].

use chime_proto::NtpTimestamp;
use chime_proto::packet::{HEADER_LEN, Header, LeapIndicator, Mode, RefId};

use crate::fuzz::Fuzz;

/// How a thread spreads its requests over its simulated clients
/// (`--poll-pattern`), i.e. each client's poll pattern at a given rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollPattern {
    /// Round robin: with C clients at R requests/s, every client polls
    /// every C/R seconds, evenly spaced (`even`).
    Even,
    /// Each request from a client drawn at random: a client's requests
    /// are spaced irregularly (geometric gaps, mean C/R), as independent
    /// clients are (`random`).
    Random,
    /// `n` requests back to back from one client, then the next client in
    /// turn, as clients starting with `iburst` do (`burst:N`).
    Burst(u32),
}

impl std::str::FromStr for PollPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "even" => Ok(Self::Even),
            "random" => Ok(Self::Random),
            _ => match s.strip_prefix("burst:").map(str::parse::<u32>) {
                Some(Ok(n)) if (1..=1024).contains(&n) => Ok(Self::Burst(n)),
                _ => Err(format!("{s:?}: expected even, random or burst:N with N from 1 to 1024")),
            },
        }
    }
}

impl std::fmt::Display for PollPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Even => f.write_str("even"),
            Self::Random => f.write_str("random"),
            Self::Burst(n) => write!(f, "burst:{n}"),
        }
    }
}

/// Picks the client of each request per a [`PollPattern`].
#[derive(Clone, Debug)]
pub struct ClientPicker {
    pattern: PollPattern,
    current: usize,
    /// Requests left for `current` in its burst.
    left: u32,
}

impl ClientPicker {
    /// A picker starting before client 0.
    pub fn new(pattern: PollPattern) -> Self {
        Self { pattern, current: usize::MAX, left: 0 }
    }

    /// The client (below `clients`) of the next request; `random` is a
    /// fresh random number for the random pattern.
    pub fn next(&mut self, clients: usize, random: u64) -> usize {
        let clients = clients.max(1);
        let step = |c: usize| if c >= clients - 1 { 0 } else { c + 1 };
        match self.pattern {
            PollPattern::Even => self.current = step(self.current),
            PollPattern::Random => self.current = (random % clients as u64) as usize,
            PollPattern::Burst(n) => {
                if self.left == 0 {
                    self.current = step(self.current);
                    self.left = n;
                }
                self.left -= 1;
            }
        }
        self.current
    }
}

/// The request kinds a run can use (`--kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum KindArg {
    /// Plain 48-byte NTPv4 client requests.
    Plain,
    /// RFC 9769 interleaved client requests.
    Interleaved,
    /// NTS-authenticated requests (NTS-KE first).
    Nts,
    /// Packets no server should answer, plus single-source floods.
    Adversarial,
    /// 80 % plain, 10 % interleaved, 10 % adversarial.
    Mix,
    /// Random and mutated packets from `--seed` (see `crate::fuzz`).
    Fuzz,
}

/// The kind of one packet, as stored in the match table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Plain request.
    Plain,
    /// Interleaved request.
    Interleaved,
    /// NTS request.
    Nts,
    /// Adversarial packet.
    Adv(Adv),
    /// Fuzz packet.
    Fuzz(Fuzz),
}

/// Adversarial packet kinds, each counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Adv {
    /// 20 bytes: shorter than a header.
    Short = 0,
    /// A header followed by 7 bytes that are not an extension field.
    Malformed = 1,
    /// An ntpq control query.
    Mode6 = 2,
    /// An ntpdc private query (the monlist amplifier).
    Mode7 = 3,
    /// Version 0.
    Version0 = 4,
    /// Version 5.
    Version5 = 5,
    /// A server-mode packet (mode 4) sent to the server.
    ServerMode = 6,
    /// Valid requests in a burst from one source (a rate limiter should
    /// stop answering them).
    Flood = 7,
}

impl Adv {
    /// Every kind, in counter order.
    pub const ALL: [Self; 8] = [
        Self::Short,
        Self::Malformed,
        Self::Mode6,
        Self::Mode7,
        Self::Version0,
        Self::Version5,
        Self::ServerMode,
        Self::Flood,
    ];
    /// The kinds that cycle in a mixed batch (the flood comes in bursts).
    pub const CYCLE: [Self; 7] =
        [Self::Short, Self::Malformed, Self::Mode6, Self::Mode7, Self::Version0, Self::Version5, Self::ServerMode];

    /// Stable name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Short => "short",
            Self::Malformed => "malformed",
            Self::Mode6 => "mode6",
            Self::Mode7 => "mode7",
            Self::Version0 => "version0",
            Self::Version5 => "version5",
            Self::ServerMode => "server_mode",
            Self::Flood => "flood",
        }
    }
}

impl Kind {
    /// The table code.
    pub const fn code(self) -> u8 {
        match self {
            Self::Plain => 0,
            Self::Interleaved => 1,
            Self::Nts => 2,
            Self::Adv(a) => 16 + a as u8,
            Self::Fuzz(f) => 32 + f as u8,
        }
    }

    /// From a table code.
    pub fn from_code(c: u8) -> Self {
        match c {
            0 => Self::Plain,
            1 => Self::Interleaved,
            2 => Self::Nts,
            c if c >= 32 => Self::Fuzz(Fuzz::ALL[usize::from(c - 32).min(Fuzz::ALL.len() - 1)]),
            c => Self::Adv(Adv::ALL[usize::from(c.saturating_sub(16)).min(Adv::ALL.len() - 1)]),
        }
    }

    /// Whether a healthy server answers this kind (loss counts it).
    pub const fn expects_reply(self) -> bool {
        !matches!(self, Self::Adv(_) | Self::Fuzz(_))
    }
}

/// The version chime-load puts in its requests (and expects echoed).
pub const VERSION: u8 = 4;

/// Writes a client header: `origin`/`receive` fields as given (0 for a plain
/// request), `xmt` as the transmit timestamp.
pub fn write_client_header(out: &mut [u8], version: u8, mode: u8, origin: u64, receive: u64, xmt: u64) {
    let h = &mut out[..HEADER_LEN];
    h.fill(0);
    h[0] = ((version & 7) << 3) | (mode & 7);
    h[2] = 6; // poll 64 s, like a pool client
    h[3] = 0xE9; // precision 2^-23
    h[24..32].copy_from_slice(&origin.to_be_bytes());
    h[32..40].copy_from_slice(&receive.to_be_bytes());
    h[40..48].copy_from_slice(&xmt.to_be_bytes());
}

/// Writes an adversarial packet carrying `xmt` (where it has a header);
/// returns its length.
pub fn write_adversarial(out: &mut [u8], adv: Adv, xmt: u64) -> usize {
    match adv {
        Adv::Short => {
            write_client_header(out, VERSION, 3, 0, 0, xmt);
            20
        }
        Adv::Malformed => {
            write_client_header(out, VERSION, 3, 0, 0, xmt);
            out[48..55].copy_from_slice(&[0x01, 0x04, 0x00, 0x03, 0xDE, 0xAD, 0xBE]);
            55
        }
        Adv::Mode6 => {
            // ntpq READSTAT: version 2, mode 6, opcode 1, sequence 1.
            out[..12].copy_from_slice(&[0x16, 0x01, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]);
            12
        }
        Adv::Mode7 => {
            // ntpdc MON_GETLIST_1 (the monlist amplifier).
            out[..48].fill(0);
            out[..4].copy_from_slice(&[0x17, 0x00, 0x03, 0x2A]);
            48
        }
        Adv::Version0 => {
            write_client_header(out, 0, 3, 0, 0, xmt);
            48
        }
        Adv::Version5 => {
            write_client_header(out, 5, 3, 0, 0, xmt);
            48
        }
        Adv::ServerMode => {
            write_client_header(out, VERSION, 4, 0, 0, xmt);
            out[1] = 2;
            48
        }
        Adv::Flood => {
            write_client_header(out, VERSION, 3, 0, 0, xmt);
            48
        }
    }
}

/// Why a reply is not a valid answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Invalid {
    /// Shorter than a header.
    TooShort = 0,
    /// Origin matches no request we sent.
    Unmatched = 1,
    /// A second reply to one request.
    Duplicate = 2,
    /// Not mode 4.
    BadMode = 3,
    /// Version not the one sent.
    BadVersion = 4,
    /// Stratum above 16, or leap and stratum that contradict.
    BadStratum = 5,
    /// Transmit before receive timestamp, or a residence over a second.
    BadTimestamps = 6,
    /// Server time outside the sanity window around local time.
    TimeOutOfWindow = 7,
    /// NTS: no or wrong Unique Identifier, or malformed fields.
    NtsMalformed = 8,
    /// NTS: the authenticator did not verify with S2C.
    NtsAuthFailed = 9,
    /// NTS: a reply with no authenticator to an NTS request.
    NtsUnauthenticated = 10,
    /// Longer than its request (an amplifier).
    LongerThanRequest = 11,
}

impl Invalid {
    /// Every reason, in counter order.
    pub const ALL: [Self; 12] = [
        Self::TooShort,
        Self::Unmatched,
        Self::Duplicate,
        Self::BadMode,
        Self::BadVersion,
        Self::BadStratum,
        Self::BadTimestamps,
        Self::TimeOutOfWindow,
        Self::NtsMalformed,
        Self::NtsAuthFailed,
        Self::NtsUnauthenticated,
        Self::LongerThanRequest,
    ];

    /// Stable name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::TooShort => "too_short",
            Self::Unmatched => "unmatched",
            Self::Duplicate => "duplicate",
            Self::BadMode => "bad_mode",
            Self::BadVersion => "bad_version",
            Self::BadStratum => "bad_stratum",
            Self::BadTimestamps => "bad_timestamps",
            Self::TimeOutOfWindow => "time_out_of_window",
            Self::NtsMalformed => "nts_malformed",
            Self::NtsAuthFailed => "nts_auth_failed",
            Self::NtsUnauthenticated => "nts_unauthenticated",
            Self::LongerThanRequest => "longer_than_request",
        }
    }
}

/// Kiss codes counted separately.
pub const KOD_NAMES: [&str; 5] = ["RATE", "DENY", "RSTR", "NTSN", "other"];

/// Index of a kiss code in [`KOD_NAMES`].
pub fn kod_index(id: RefId) -> usize {
    match id {
        RefId::RATE => 0,
        RefId::DENY => 1,
        RefId::RSTR => 2,
        RefId::NTSN => 3,
        _ => 4,
    }
}

/// A reply's header checked against its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// A time reply: residence T3 - T2 in ns, whether the server says it is
    /// unsynchronized, and its T2 (for interleaved follow-ups).
    Time {
        /// T3 - T2, ns.
        residence_ns: u64,
        /// Leap 3 / stratum 16.
        unsynchronized: bool,
        /// The receive timestamp T2.
        t2: u64,
    },
    /// A kiss-o'-death, by index into [`KOD_NAMES`].
    Kod(usize),
    /// Not a valid reply.
    Invalid(Invalid),
}

/// Checks a reply header (already matched by origin) received at `local_ns`
/// (Unix ns): mode, version, stratum/leap, T2 <= T3, server time within
/// `window_ns` of local time.
///
/// `earlier_t2` is set for a reply in interleaved mode (RFC 9769; its
/// origin matched the request's receive field): the T2 the request named
/// as its origin. The transmit field then is the transmit time of that
/// earlier reply, before this reply's T2, so the residence checked and
/// returned is T3 - that earlier T2.
pub fn check_header(h: &Header, local_ns: u64, window_ns: u64, earlier_t2: Option<u64>) -> Checked {
    if h.mode != Mode::Server {
        return Checked::Invalid(Invalid::BadMode);
    }
    if h.version != VERSION {
        return Checked::Invalid(Invalid::BadVersion);
    }
    if h.stratum == 0 {
        return Checked::Kod(kod_index(h.reference_id));
    }
    let unsynchronized = h.leap == LeapIndicator::Unsynchronized;
    if h.stratum > 16 || (h.stratum == 16) != unsynchronized {
        return Checked::Invalid(Invalid::BadStratum);
    }
    let t2 = earlier_t2.map_or(h.receive_ts, NtpTimestamp::from_bits);
    let residence = h.transmit_ts.wrapping_diff(t2);
    if residence < 0 || h.receive_ts.is_zero() || residence > (1i64 << 32) {
        return Checked::Invalid(Invalid::BadTimestamps);
    }
    let local = NtpTimestamp::from_unix_nanos(i128::from(local_ns));
    let offset = h.transmit_ts.wrapping_diff(local).unsigned_abs();
    // 2^32 units per second; compare in ns without overflow.
    let offset_ns = ((u128::from(offset) * 1_000_000_000) >> 32) as u64;
    if offset_ns > window_ns {
        return Checked::Invalid(Invalid::TimeOutOfWindow);
    }
    let residence_ns = ((residence as u128 * 1_000_000_000) >> 32) as u64;
    Checked::Time { residence_ns, unsynchronized, t2: h.receive_ts.to_bits() }
}

/// A plausible server reply header received at `local_ns` (T2 then, T3
/// 2 µs later, origin 1), for tests.
#[cfg(test)]
pub(crate) fn test_reply(local_ns: u64) -> Header {
    let t = NtpTimestamp::from_unix_nanos(i128::from(local_ns));
    Header {
        leap: LeapIndicator::NoWarning,
        version: 4,
        mode: Mode::Server,
        stratum: 2,
        poll: 6,
        precision: -20,
        root_delay: chime_proto::NtpShort::ZERO,
        root_dispersion: chime_proto::NtpShort::ZERO,
        reference_id: RefId(*b"GPS\0"),
        reference_ts: t,
        origin_ts: NtpTimestamp::from_bits(1),
        receive_ts: t,
        transmit_ts: t.add_secs(2e-6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(local_ns: u64) -> Header {
        test_reply(local_ns)
    }

    #[test]
    fn checks() {
        let now = 1_790_000_000_000_000_000u64;
        let w = 10_000_000_000;
        let Checked::Time { residence_ns, unsynchronized, .. } = check_header(&reply(now), now, w, None) else {
            panic!()
        };
        assert!((1_999..=2_001).contains(&residence_ns), "{residence_ns}");
        assert!(!unsynchronized);
        let mut h = reply(now);
        h.mode = Mode::Client;
        assert_eq!(check_header(&h, now, w, None), Checked::Invalid(Invalid::BadMode));
        let mut h = reply(now);
        h.version = 3;
        assert_eq!(check_header(&h, now, w, None), Checked::Invalid(Invalid::BadVersion));
        let mut h = reply(now);
        h.stratum = 0;
        h.reference_id = RefId::RATE;
        assert_eq!(check_header(&h, now, w, None), Checked::Kod(0));
        h.reference_id = RefId::NTSN;
        assert_eq!(check_header(&h, now, w, None), Checked::Kod(3));
        let mut h = reply(now);
        h.stratum = 16;
        assert_eq!(check_header(&h, now, w, None), Checked::Invalid(Invalid::BadStratum));
        h.leap = LeapIndicator::Unsynchronized;
        assert!(matches!(check_header(&h, now, w, None), Checked::Time { unsynchronized: true, .. }));
        let mut h = reply(now);
        h.transmit_ts = h.receive_ts.add_secs(-1e-3);
        assert_eq!(check_header(&h, now, w, None), Checked::Invalid(Invalid::BadTimestamps));
        assert_eq!(
            check_header(&reply(now), now + 11_000_000_000, w, None),
            Checked::Invalid(Invalid::TimeOutOfWindow)
        );
    }

    #[test]
    fn interleaved_replies_carry_the_earlier_transmit_time() {
        let now = 1_790_000_000_000_000_000u64;
        let w = 10_000_000_000;
        // The earlier exchange: T2 at now - 1 s, sent 5 µs later. This
        // reply: T2 now, transmit field = that earlier transmit time.
        let earlier = NtpTimestamp::from_unix_nanos(i128::from(now - 1_000_000_000));
        let mut h = reply(now);
        h.transmit_ts = earlier.add_secs(5e-6);
        assert_eq!(check_header(&h, now, w, None), Checked::Invalid(Invalid::BadTimestamps), "T3 < T2 in basic mode");
        let Checked::Time { residence_ns, t2, .. } = check_header(&h, now, w, Some(earlier.to_bits())) else {
            panic!()
        };
        assert!((4_999..=5_001).contains(&residence_ns), "{residence_ns}");
        assert_eq!(t2, h.receive_ts.to_bits(), "this reply's T2, for the next request");
        // A transmit time before the earlier T2 is still wrong.
        assert_eq!(
            check_header(&h, now, w, Some(earlier.add_secs(1e-3).to_bits())),
            Checked::Invalid(Invalid::BadTimestamps)
        );
    }

    #[test]
    fn kind_codes_round_trip() {
        let kinds = [Kind::Plain, Kind::Interleaved, Kind::Nts].into_iter().chain(Adv::ALL.map(Kind::Adv));
        for k in kinds.chain(Fuzz::ALL.map(Kind::Fuzz)) {
            assert_eq!(Kind::from_code(k.code()), k);
        }
    }

    #[test]
    fn adversarial_packets() {
        let mut b = [0u8; 128];
        for a in Adv::ALL {
            let n = write_adversarial(&mut b, a, 0x55);
            assert!(n <= 55);
            match a {
                Adv::Mode6 => assert_eq!(b[0] & 7, 6),
                Adv::Mode7 => assert_eq!(b[0] & 7, 7),
                Adv::Version0 => assert_eq!(b[0] >> 3, 0),
                Adv::Version5 => assert_eq!(b[0] >> 3, 5),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod poll_pattern_tests {
    use super::*;

    #[test]
    fn patterns_parse_and_pick_as_documented() {
        assert_eq!("even".parse::<PollPattern>(), Ok(PollPattern::Even));
        assert_eq!("burst:4".parse::<PollPattern>(), Ok(PollPattern::Burst(4)));
        assert!("burst:0".parse::<PollPattern>().is_err());
        assert!("sometimes".parse::<PollPattern>().is_err());
        assert_eq!(PollPattern::Burst(4).to_string(), "burst:4");

        let mut even = ClientPicker::new(PollPattern::Even);
        assert_eq!((0..7).map(|_| even.next(3, 0)).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2, 0]);
        let mut burst = ClientPicker::new(PollPattern::Burst(2));
        assert_eq!((0..7).map(|_| burst.next(3, 0)).collect::<Vec<_>>(), [0, 0, 1, 1, 2, 2, 0]);
        let mut random = ClientPicker::new(PollPattern::Random);
        let picks: Vec<usize> = (0..6u64).map(|r| random.next(4, r * 7 + 1)).collect();
        assert_eq!(picks, [1, 0, 3, 2, 1, 0]);
        // Every client is used, none beyond the count.
        let mut rng = chime_proto::rng::SplitMix64::new(9);
        let mut seen = [0u32; 5];
        for _ in 0..1000 {
            seen[random.next(5, rng.next_u64())] += 1;
        }
        assert!(seen.iter().all(|&n| n > 100), "{seen:?}");
    }
}
