//! The server side of NTP: one request in, one reply (or a counted drop) out.
//!
//! [`Responder::handle`] is the whole per-packet pipeline, the same for every
//! backend: parse, classify, access control, rate limiting, reply. It reads
//! no clock (the receive time comes in [`RequestMeta`], the transmit time is
//! taken through the caller's [`TxClock`] as the very last step), allocates
//! nothing, and never writes a reply longer than the request.
//!
//! A request with NTS extension fields, when the [`Context`] has a
//! [`KeyRing`], takes the NTS path (RFC 8915 section 5): its cookie is
//! opened (failure: an NTS NAK, the KoD "NTSN" carrying the Unique
//! Identifier), its authenticator verified with the C2S key (failure: a
//! counted drop), and the reply carries the Unique Identifier and fresh
//! cookies sealed with the S2C key. The transmit timestamp is then taken
//! before the reply is sealed, since it is authenticated.
//!
//! Interleaved mode (RFC 9769, see [`crate::interleave`]): with
//! [`ResponderConfig::interleaved_capacity`] > 0 the responder remembers,
//! for every time reply, its receive timestamp (T2) and transmit time; the
//! caller improves the latter with the precise stamp of the sent datagram
//! ([`Responder::record_tx`]). A request whose origin timestamp is a T2 we
//! remember (and whose receive and transmit fields differ) is answered in
//! interleaved mode: origin = the request's receive field, receive = this
//! request's T2, transmit = the remembered transmit time of the earlier
//! reply. Everything else is answered in basic mode, as before.

use std::net::{IpAddr, SocketAddr};

use crate::acl::{Acl, AclAction};
use crate::clock::{ClockSnapshot, STRATUM_UNSYNCHRONIZED};
use crate::interleave::{Insert, TxTable};
use crate::nts::KeyRing;
use crate::nts::nonce::NonceSource;
use crate::nts::ntp::{NtsRequest, VerifyError, has_nts_fields, write_nak, write_reply};
use crate::packet::{HEADER_LEN, Header, LeapIndicator, Mode, Packet, ParseError, RefId, Trailer, write_transmit};
use crate::ratelimit::{RateLimitConfig, RateLimiter, RateLimiterStats, RateVerdict};
use crate::rng::{Probability, SplitMix64};
use crate::time::{NtpShort, NtpTimestamp};
use crate::topk::{Prefix, TopPrefixes};

/// Where a receive timestamp came from, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StampKind {
    /// The NIC's hardware clock, converted to system time.
    Hardware,
    /// The kernel's software receive stamp (`SO_TIMESTAMPING`).
    KernelSoftware,
    /// The XDP program's `bpf_ktime_get_tai_ns()` at ingress.
    XdpIngress,
    /// Read in userspace after the packet arrived (worst).
    Userspace,
}

impl StampKind {
    /// Every kind, in counter order.
    pub const ALL: [Self; 4] = [Self::Hardware, Self::KernelSoftware, Self::XdpIngress, Self::Userspace];

    /// Stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hardware => "hardware",
            Self::KernelSoftware => "kernel_software",
            Self::XdpIngress => "xdp_ingress",
            Self::Userspace => "userspace",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// A request's receive timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxTimestamp {
    /// When the request arrived (UTC, NTP format).
    pub time: NtpTimestamp,
    /// How it was taken.
    pub kind: StampKind,
}

/// What the transport knows about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestMeta {
    /// The client's address and port.
    pub source: SocketAddr,
    /// When the request arrived.
    pub rx: RxTimestamp,
}

/// The clock the transmit timestamp is read from, as late as possible.
pub trait TxClock {
    /// The current time.
    fn now(&mut self) -> NtpTimestamp;
}

impl<F: FnMut() -> NtpTimestamp> TxClock for F {
    fn now(&mut self) -> NtpTimestamp {
        self()
    }
}

/// Shared, read-only state a worker loads once per batch.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    /// The server clock's state.
    pub clock: &'a ClockSnapshot,
    /// Access control rules.
    pub acl: &'a Acl,
    /// The NTS master keys; `None` when NTS is off (NTS fields are then
    /// ignored, as any unknown extension field is).
    pub nts: Option<&'a KeyRing>,
}

/// Why a packet got no reply. Every drop is counted under one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// Shorter than the 48-byte header.
    TooShort,
    /// Bytes after the header that are neither extension fields nor a MAC.
    MalformedExtension,
    /// Version 0 or above 4.
    BadVersion,
    /// Mode 6, an ntpq control query (never answered).
    Mode6,
    /// Mode 7, an ntpdc private query (never answered).
    Mode7,
    /// A server-mode kiss-o'-death sent to us (often our own, reflected).
    KissOfDeath,
    /// Any other mode but 3 (client).
    NotClient,
    /// A legacy symmetric-key MAC; chime has no symmetric keys.
    LegacyMac,
    /// Source port 0 or a source address no reply can go to.
    BadSource,
    /// Denied by the ACL, configured for silence.
    Denied,
    /// Over the rate limit and not chosen for a KoD.
    RateLimited,
    /// The clock is unsynchronized and chimed is configured for silence.
    Unsynchronized,
    /// The reply would be longer than the request (never sent).
    ReplyTooLong,
    /// The caller's output buffer cannot hold the reply.
    BufferTooSmall,
    /// NTS fields that do not parse: no or short Unique Identifier, no or
    /// two cookies, fields after the authenticator, bad lengths, or
    /// malformed encrypted fields.
    NtsMalformed,
    /// The NTS authenticator does not verify with the cookie's C2S key.
    NtsAuthFailed,
    /// An NTS request, but the responder has no nonce source installed
    /// ([`Responder::set_nonce_source`]).
    NtsNoNonceSource,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [Self; 17] = [
        Self::TooShort,
        Self::MalformedExtension,
        Self::BadVersion,
        Self::Mode6,
        Self::Mode7,
        Self::KissOfDeath,
        Self::NotClient,
        Self::LegacyMac,
        Self::BadSource,
        Self::Denied,
        Self::RateLimited,
        Self::Unsynchronized,
        Self::ReplyTooLong,
        Self::BufferTooSmall,
        Self::NtsMalformed,
        Self::NtsAuthFailed,
        Self::NtsNoNonceSource,
    ];

    /// Stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::TooShort => "too_short",
            Self::MalformedExtension => "malformed_extension",
            Self::BadVersion => "bad_version",
            Self::Mode6 => "mode6",
            Self::Mode7 => "mode7",
            Self::KissOfDeath => "kiss_of_death",
            Self::NotClient => "not_client_mode",
            Self::LegacyMac => "legacy_mac",
            Self::BadSource => "bad_source",
            Self::Denied => "denied",
            Self::RateLimited => "rate_limited",
            Self::Unsynchronized => "unsynchronized",
            Self::ReplyTooLong => "reply_too_long",
            Self::BufferTooSmall => "buffer_too_small",
            Self::NtsMalformed => "nts_malformed",
            Self::NtsAuthFailed => "nts_auth_failed",
            Self::NtsNoNonceSource => "nts_no_nonce_source",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Kiss codes chime sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KissCode {
    /// RATE: slow down.
    Rate,
    /// DENY: access denied.
    Deny,
    /// RSTR: access restricted.
    Rstr,
    /// NTSN: NTS negative acknowledgement, the cookie did not open (unknown
    /// or expired key, or not a cookie): the client should redo NTS-KE.
    Ntsn,
}

impl KissCode {
    /// Every code, in counter order.
    pub const ALL: [Self; 4] = [Self::Rate, Self::Deny, Self::Rstr, Self::Ntsn];

    /// Stable name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Rate => "RATE",
            Self::Deny => "DENY",
            Self::Rstr => "RSTR",
            Self::Ntsn => "NTSN",
        }
    }

    /// The reference ID that carries it.
    pub const fn ref_id(self) -> RefId {
        match self {
            Self::Rate => RefId::RATE,
            Self::Deny => RefId::DENY,
            Self::Rstr => RefId::RSTR,
            Self::Ntsn => RefId::NTSN,
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Per-responder counters: plain integers, owned by one worker, which
/// publishes them once per batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams handed to [`Responder::handle`].
    pub received: u64,
    /// Time replies sent (KoD not included).
    pub replies: u64,
    /// Drops, indexed like [`DropReason::ALL`].
    pub drops: [u64; DropReason::ALL.len()],
    /// KoD replies, indexed like [`KissCode::ALL`].
    pub kod: [u64; KissCode::ALL.len()],
    /// Time replies by receive-stamp kind, indexed like [`StampKind::ALL`].
    pub stamps: [u64; StampKind::ALL.len()],
    /// Time replies authenticated with NTS (also counted in `replies`).
    pub nts_replies: u64,
    /// Fresh cookies sent in NTS replies.
    pub nts_cookies: u64,
    /// Time replies sent in interleaved mode (also counted in `replies`).
    pub interleaved_replies: u64,
    /// Requests that looked interleaved (nonzero origin, receive field
    /// different from transmit) whose origin is a T2 we remember.
    pub interleaved_hits: u64,
    /// Requests that looked interleaved but whose origin is not remembered
    /// (evicted, another server's, or a basic-mode client's habit): answered
    /// in basic mode.
    pub interleaved_misses: u64,
    /// Remembered replies pushed out of the table by newer ones.
    pub interleaved_evictions: u64,
    /// Precise transmit stamps fed to [`Responder::record_tx`] that found
    /// their reply in the table.
    pub tx_stamps_matched: u64,
    /// Precise transmit stamps whose reply was no longer (or never) in the
    /// table.
    pub tx_stamps_unmatched: u64,
}

impl Counters {
    /// Drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// KoD replies of one kind.
    pub fn kod_sent(&self, code: KissCode) -> u64 {
        self.kod[code.index()]
    }

    /// Time replies whose receive stamp was of one kind.
    pub fn replies_stamped(&self, kind: StampKind) -> u64 {
        self.stamps[kind.index()]
    }
}

/// What to do when the clock is not synchronized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnsyncPolicy {
    /// Answer with leap indicator 3 and stratum 16, so clients know.
    Announce,
    /// Answer nothing.
    Silent,
}

/// What to do with a source the ACL denies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyResponse {
    /// KoD DENY.
    Kod,
    /// Nothing.
    Silent,
}

/// Settings of a [`Responder`].
#[derive(Clone, Debug, PartialEq)]
pub struct ResponderConfig {
    /// The smallest poll exponent put in a reply.
    pub min_poll: i8,
    /// The largest poll exponent put in a reply.
    pub max_poll: i8,
    /// Behaviour while unsynchronized.
    pub unsynchronized: UnsyncPolicy,
    /// Behaviour for denied sources.
    pub deny: DenyResponse,
    /// Chance that a rate-limited request gets a KoD RATE instead of silence.
    pub kod_probability: Probability,
    /// The rate limiter of this responder.
    pub rate_limit: RateLimitConfig,
    /// Entries of the interleaved-mode table (T2 → transmit time of that
    /// reply), 16 bytes each, rounded up to a power of two; 0 turns
    /// interleaved mode off.
    pub interleaved_capacity: usize,
}

impl Default for ResponderConfig {
    fn default() -> Self {
        Self {
            min_poll: 4,
            max_poll: 17,
            unsynchronized: UnsyncPolicy::Announce,
            deny: DenyResponse::Kod,
            kod_probability: Probability::new(0.25).unwrap_or(Probability::ALWAYS),
            rate_limit: RateLimitConfig::default(),
            interleaved_capacity: 0,
        }
    }
}

/// The outcome of one request.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum Action<'b> {
    /// Send these bytes (a prefix of the caller's buffer) back to the source.
    Reply(&'b [u8]),
    /// Send nothing; the reason has been counted.
    Drop(DropReason),
}

/// The timestamps of the last time reply [`Responder::handle`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyStamps {
    /// The receive timestamp written into the reply (T2; the key under which
    /// [`Responder::record_tx`] expects the reply's precise transmit stamp).
    pub rx: NtpTimestamp,
    /// The transmit time taken from the [`TxClock`] for this reply (written
    /// as its transmit timestamp in basic mode).
    pub tx: NtpTimestamp,
    /// Whether the reply was in interleaved mode (its transmit field then
    /// holds the precise transmit time of an earlier reply).
    pub interleaved: bool,
}

/// Occupancy of the interleaved-mode table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterleaveStats {
    /// Entries available (0: interleaved mode off).
    pub capacity: u64,
    /// Entries in use.
    pub occupied: u64,
    /// Bytes of the table.
    pub memory_bytes: u64,
}

/// One worker's NTP responder: configuration, rate-limit table, coin and
/// counters. Not shared between threads.
#[derive(Debug)]
pub struct Responder {
    cfg: ResponderConfig,
    limiter: RateLimiter,
    rng: SplitMix64,
    nonces: Option<Box<dyn NonceSource>>,
    counters: Counters,
    xleave: Option<TxTable>,
    last_reply: Option<ReplyStamps>,
    /// The source prefixes rate-limited most since the caller last cleared.
    rate_limited: TopPrefixes,
}

enum Verdict {
    Time,
    Kod(KissCode),
}

impl Responder {
    /// A responder; `seed` feeds the rate limiter's hash key and the KoD
    /// coin, and should be random in production.
    pub fn new(cfg: ResponderConfig, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let key = [rng.next_u64(), rng.next_u64()];
        let limiter = RateLimiter::new(&cfg.rate_limit, key);
        let xleave = TxTable::new(cfg.interleaved_capacity);
        Self {
            cfg,
            limiter,
            rng,
            nonces: None,
            counters: Counters::default(),
            xleave,
            last_reply: None,
            rate_limited: TopPrefixes::default(),
        }
    }

    /// Applies new settings (a configuration reload) without losing state
    /// that still means the same: the rate limiter keeps its clients (see
    /// [`RateLimiter::reconfigure`] for what a changed interval, burst,
    /// prefix or capacity does to them), counters and the nonce source
    /// stay. A changed `interleaved_capacity` starts an empty table:
    /// interleaved clients get one basic reply and then go on. Walks the
    /// limiter table when it changes: not for the per-packet path.
    pub fn reconfigure(&mut self, cfg: &ResponderConfig) {
        if cfg.rate_limit != self.cfg.rate_limit {
            self.limiter.reconfigure(&cfg.rate_limit);
        }
        if cfg.interleaved_capacity != self.cfg.interleaved_capacity {
            self.xleave = TxTable::new(cfg.interleaved_capacity);
        }
        self.cfg = cfg.clone();
    }

    /// The timestamps of the reply the last [`Self::handle`] wrote, if it
    /// wrote a time reply (`None` after a drop or a KoD).
    pub fn last_reply(&self) -> Option<ReplyStamps> {
        self.last_reply
    }

    /// Feeds the precise transmit time of a sent reply (from the kernel's
    /// or NIC's transmit stamp), named by the receive timestamp the reply
    /// carried ([`ReplyStamps::rx`]). A later interleaved request naming
    /// that T2 gets it. Does nothing with interleaved mode off.
    pub fn record_tx(&mut self, rx_ts_sent: NtpTimestamp, tx_precise: NtpTimestamp) {
        let Some(table) = &mut self.xleave else { return };
        if table.improve(rx_ts_sent.to_bits(), tx_precise.to_bits()) {
            self.counters.tx_stamps_matched += 1;
        } else {
            self.counters.tx_stamps_unmatched += 1;
        }
    }

    /// The interleaved-mode table's occupancy and memory.
    pub fn interleave_stats(&self) -> InterleaveStats {
        self.xleave.as_ref().map_or_else(InterleaveStats::default, |t| InterleaveStats {
            capacity: t.capacity() as u64,
            occupied: t.occupied() as u64,
            memory_bytes: t.memory_bytes() as u64,
        })
    }

    /// Interleaved-mode decision for a time reply about to be written with
    /// header `h` (basic-mode fields filled in): makes T2 unique among the
    /// remembered ones and, for an interleaved request whose origin is
    /// remembered, rewrites the origin and returns the transmit timestamp
    /// to send instead of the current one.
    fn interleave(&mut self, req: &Header, h: &mut Header) -> Option<NtpTimestamp> {
        let table = self.xleave.as_ref()?;
        // A T2 equal to one still remembered (a clock step, two requests
        // in one stamp tick) would make two replies share a key.
        for _ in 0..4 {
            if !table.contains(h.receive_ts.to_bits()) {
                break;
            }
            h.receive_ts = NtpTimestamp::from_bits(h.receive_ts.to_bits().wrapping_add(1));
        }
        if req.origin_ts.is_zero() || req.receive_ts == req.transmit_ts {
            return None;
        }
        match table.get(req.origin_ts.to_bits()) {
            Some(tx) => {
                self.counters.interleaved_hits += 1;
                h.origin_ts = req.receive_ts;
                Some(NtpTimestamp::from_bits(tx))
            }
            None => {
                self.counters.interleaved_misses += 1;
                None
            }
        }
    }

    /// Takes the transmit time (as late as possible), writes the transmit
    /// field, and remembers the reply.
    fn finish_transmit(
        &mut self,
        out: &mut [u8],
        rx: NtpTimestamp,
        previous_tx: Option<NtpTimestamp>,
        tx_clock: &mut impl TxClock,
    ) {
        let mut tx = tx_clock.now();
        if tx == rx && self.xleave.is_some() {
            // RFC 9769: a basic reply's transmit must differ from its receive.
            tx = NtpTimestamp::from_bits(tx.to_bits().wrapping_add(1));
        }
        write_transmit(out, previous_tx.unwrap_or(tx));
        if let Some(table) = &mut self.xleave
            && table.insert(rx.to_bits(), tx.to_bits()) == Some(Insert::Evicted)
        {
            self.counters.interleaved_evictions += 1;
        }
        if previous_tx.is_some() {
            self.counters.interleaved_replies += 1;
        }
        self.last_reply = Some(ReplyStamps { rx, tx, interleaved: previous_tx.is_some() });
    }

    /// Installs the source of NTS nonces (see [`crate::nts::nonce`]): a
    /// cryptographic generator seeded from the OS, e.g.
    /// [`AesCtrNonces`](crate::nts::AesCtrNonces). Without one, NTS requests
    /// are dropped ([`DropReason::NtsNoNonceSource`]).
    pub fn set_nonce_source(&mut self, nonces: Box<dyn NonceSource>) {
        self.nonces = Some(nonces);
    }

    /// The counters so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The rate limiter's occupancy.
    pub fn limiter_stats(&self) -> RateLimiterStats {
        self.limiter.stats()
    }

    /// The source prefixes whose requests were over the rate limit (KoD
    /// RATE or dropped) most often since the last
    /// [`Self::clear_rate_limited`]: an approximate top-k in fixed memory
    /// ([`crate::topk`]).
    pub fn rate_limited(&self) -> &TopPrefixes {
        &self.rate_limited
    }

    /// Starts a new window for [`Self::rate_limited`].
    pub fn clear_rate_limited(&mut self) {
        self.rate_limited.clear();
    }

    /// The configuration.
    pub fn config(&self) -> &ResponderConfig {
        &self.cfg
    }

    /// Handles one request datagram (UDP payload) and writes the reply, if
    /// any, into `out`.
    pub fn handle<'b>(
        &mut self,
        request: &[u8],
        meta: &RequestMeta,
        ctx: &Context<'_>,
        tx_clock: &mut impl TxClock,
        out: &'b mut [u8],
    ) -> Action<'b> {
        self.counters.received += 1;
        self.last_reply = None;
        let packet = match Packet::parse(request) {
            Ok(packet) => packet,
            Err(ParseError::TooShort) => return self.drop_packet(DropReason::TooShort),
            Err(_) => return self.drop_packet(DropReason::MalformedExtension),
        };
        let verdict = match self.decide(&packet, meta, ctx) {
            Ok(verdict) => verdict,
            Err(reason) => return self.drop_packet(reason),
        };
        let header = &packet.header;
        if let (Verdict::Time, Some(ring)) = (&verdict, ctx.nts)
            && !matches!(packet.trailer, Trailer::None)
            && has_nts_fields(request)
        {
            return self.handle_nts(request, header, meta, ctx.clock, ring, tx_clock, out);
        }
        let len = HEADER_LEN;
        if len > request.len() {
            return self.drop_packet(DropReason::ReplyTooLong);
        }
        if out.len() < len {
            return self.drop_packet(DropReason::BufferTooSmall);
        }
        let out = &mut out[..len];
        match verdict {
            Verdict::Time => {
                let mut h = self.time_header(header, meta, ctx.clock);
                let previous_tx = self.interleave(header, &mut h);
                h.write_without_transmit(out);
                let clock = ctx.clock;
                self.finish_transmit(out, h.receive_ts, previous_tx, &mut || clock.served_time(tx_clock.now()));
                self.counters.replies += 1;
                self.counters.stamps[meta.rx.kind.index()] += 1;
            }
            Verdict::Kod(code) => {
                self.kod_header(header, code, ctx.clock).write(out);
                self.counters.kod[code.index()] += 1;
            }
        }
        Action::Reply(out)
    }

    /// The NTS path of a request that would get a time reply.
    #[allow(clippy::too_many_arguments)]
    fn handle_nts<'b>(
        &mut self,
        request: &[u8],
        header: &Header,
        meta: &RequestMeta,
        clock: &ClockSnapshot,
        ring: &KeyRing,
        tx_clock: &mut impl TxClock,
        out: &'b mut [u8],
    ) -> Action<'b> {
        let Ok(req) = NtsRequest::parse(request) else { return self.drop_packet(DropReason::NtsMalformed) };
        if self.nonces.is_none() {
            return self.drop_packet(DropReason::NtsNoNonceSource);
        }
        let Ok(keys) = req.session_keys(ring) else {
            // NTS NAK: a KoD carrying the Unique Identifier, unauthenticated
            // (the server has no key to authenticate it with).
            if out.len() < HEADER_LEN {
                return self.drop_packet(DropReason::BufferTooSmall);
            }
            self.kod_header(header, KissCode::Ntsn, clock).write(out);
            let Some(len) = write_nak(out, &req) else { return self.drop_packet(DropReason::BufferTooSmall) };
            self.counters.kod[KissCode::Ntsn.index()] += 1;
            return Action::Reply(&out[..len]);
        };
        // The reply is not written yet: `out` is the scratch space for the
        // decrypted extension fields.
        let encrypted_placeholders = match req.verify(&keys, out) {
            Ok(n) => n,
            Err(VerifyError::Aead(_)) => return self.drop_packet(DropReason::NtsAuthFailed),
            Err(VerifyError::EncryptedFields) => return self.drop_packet(DropReason::NtsMalformed),
            Err(_) => return self.drop_packet(DropReason::BufferTooSmall),
        };
        if out.len() < HEADER_LEN {
            return self.drop_packet(DropReason::BufferTooSmall);
        }
        let mut h = self.time_header(header, meta, clock);
        let previous_tx = self.interleave(header, &mut h);
        h.write_without_transmit(out);
        self.finish_transmit(out, h.receive_ts, previous_tx, &mut || clock.served_time(tx_clock.now()));
        let wanted = 1 + req.placeholders + encrypted_placeholders;
        let Some(nonces) = self.nonces.as_deref_mut() else {
            return self.drop_packet(DropReason::NtsNoNonceSource);
        };
        let Some((len, cookies)) = write_reply(out, &req, &keys, ring, nonces, wanted, request.len()) else {
            let reason = if out.len() < request.len() { DropReason::BufferTooSmall } else { DropReason::ReplyTooLong };
            return self.drop_packet(reason);
        };
        self.counters.replies += 1;
        self.counters.stamps[meta.rx.kind.index()] += 1;
        self.counters.nts_replies += 1;
        self.counters.nts_cookies += cookies as u64;
        Action::Reply(&out[..len])
    }

    fn drop_packet<'b>(&mut self, reason: DropReason) -> Action<'b> {
        self.counters.drops[reason.index()] += 1;
        Action::Drop(reason)
    }

    /// Everything between parsing and the reply: classify, ACL, rate limit.
    fn decide(&mut self, packet: &Packet<'_>, meta: &RequestMeta, ctx: &Context<'_>) -> Result<Verdict, DropReason> {
        if !source_is_answerable(meta.source) {
            return Err(DropReason::BadSource);
        }
        let header = &packet.header;
        match header.mode {
            Mode::Client => {}
            Mode::Control => return Err(DropReason::Mode6),
            Mode::Private => return Err(DropReason::Mode7),
            Mode::Server if header.stratum == 0 => return Err(DropReason::KissOfDeath),
            _ => return Err(DropReason::NotClient),
        }
        if !(1..=4).contains(&header.version) {
            return Err(DropReason::BadVersion);
        }
        if matches!(packet.trailer, Trailer::Mac { .. }) {
            return Err(DropReason::LegacyMac);
        }

        let acl = ctx.acl.lookup(meta.source.ip());
        // Everything that would be answered, KoD included, is charged to the
        // client's bucket, so a denied source cannot use us as a reflector
        // any more than an allowed one.
        if self.cfg.rate_limit.enabled && self.limiter.check(meta.source.ip(), meta.rx.time) == RateVerdict::Limited {
            self.rate_limited.record(Prefix::of(meta.source.ip()));
            return if self.rng.chance(self.cfg.kod_probability) {
                Ok(Verdict::Kod(KissCode::Rate))
            } else {
                Err(DropReason::RateLimited)
            };
        }
        match acl {
            AclAction::Allow => {}
            AclAction::Restrict => return Ok(Verdict::Kod(KissCode::Rstr)),
            _ => {
                return match self.cfg.deny {
                    DenyResponse::Kod => Ok(Verdict::Kod(KissCode::Deny)),
                    _ => Err(DropReason::Denied),
                };
            }
        }
        if !ctx.clock.synchronized && self.cfg.unsynchronized == UnsyncPolicy::Silent {
            return Err(DropReason::Unsynchronized);
        }
        Ok(Verdict::Time)
    }

    fn reply_poll(&self, request_poll: i8) -> i8 {
        request_poll.clamp(self.cfg.min_poll, self.cfg.max_poll)
    }

    fn time_header(&self, req: &Header, meta: &RequestMeta, clock: &ClockSnapshot) -> Header {
        let (leap, stratum) = if clock.synchronized {
            (clock.leap, clock.stratum)
        } else {
            (LeapIndicator::Unsynchronized, STRATUM_UNSYNCHRONIZED)
        };
        Header {
            leap,
            version: req.version,
            mode: Mode::Server,
            stratum,
            poll: self.reply_poll(req.poll),
            precision: clock.precision,
            root_delay: NtpShort::from_secs_f64(clock.root_delay),
            root_dispersion: NtpShort::from_secs_f64(clock.root_dispersion_at(meta.rx.time)),
            reference_id: clock.reference_id,
            reference_ts: clock.reference_time,
            origin_ts: req.transmit_ts,
            receive_ts: clock.served_time(meta.rx.time),
            transmit_ts: NtpTimestamp::ZERO,
        }
    }

    /// A kiss-o'-death carries no time: like ntpd, its receive and transmit
    /// timestamps repeat the client's transmit timestamp, so that it matches
    /// the request (a client checks the origin) but tells nothing.
    fn kod_header(&self, req: &Header, code: KissCode, clock: &ClockSnapshot) -> Header {
        Header {
            leap: LeapIndicator::Unsynchronized,
            version: req.version,
            mode: Mode::Server,
            stratum: 0,
            poll: self.reply_poll(req.poll),
            precision: clock.precision,
            root_delay: NtpShort::ZERO,
            root_dispersion: NtpShort::ZERO,
            reference_id: code.ref_id(),
            reference_ts: NtpTimestamp::ZERO,
            origin_ts: req.transmit_ts,
            receive_ts: req.transmit_ts,
            transmit_ts: req.transmit_ts,
        }
    }
}

/// Whether a reply to `source` can go anywhere useful: not port 0, not an
/// unspecified, multicast or (IPv4) broadcast address.
fn source_is_answerable(source: SocketAddr) -> bool {
    if source.port() == 0 {
        return false;
    }
    match source.ip() {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    }
}
