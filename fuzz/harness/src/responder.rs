//! `responder_plain` and `responder_nts`: the whole [`Responder`] on one
//! datagram, in several situations (allowed, rate-limited, denied,
//! restricted, unsynchronized, bad source, short buffer, interleaved
//! follow-up), each call checked against the counters.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use chime_proto::acl::{Acl, AclAction, Cidr};
use chime_proto::ext::{ExtensionFields, field_type};
use chime_proto::nts::ntp::{AuthLayout, NtsRequest, seal_authenticator};
use chime_proto::nts::{AesCtrNonces, KeyRing, NtsKey, SessionKeys, open_cookie, open_once};
use chime_proto::packet::{HEADER_LEN, Header, LeapIndicator, Mode, Packet, RefId, Trailer};
use chime_proto::ratelimit::RateLimitConfig;
use chime_proto::rng::Probability;
use chime_proto::{
    Action, ClockSnapshot, Context, Counters, DenyResponse, DropReason, KissCode, NtpTimestamp, RequestMeta, Responder,
    ResponderConfig, RxTimestamp, StampKind, UnsyncPolicy,
};

/// 2026-12-07, about when the seeds were captured.
const NOW_UNIX: i64 = 1_796_601_600;
const ALLOWED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 40_123);
const DENIED: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xd, 0, 0, 0, 0, 1)), 123);
const RESTRICTED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 5_000);
const PORT_ZERO: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11)), 0);

/// The responder on a plain NTP datagram (NTS off: NTS fields are ignored).
pub fn responder_plain(data: &[u8]) {
    run(data, None);
}

/// The responder with NTS on and the fixed key ring, so that captured
/// requests authenticate; a second pass re-seals the authenticator of a
/// request whose cookie opens, so mutations past the authenticator (header
/// fields, encrypted fields) are explored too.
pub fn responder_nts(data: &[u8]) {
    let ring = crate::key_ring();
    run(data, Some(&ring));
    if let Some(resealed) = reseal(data, &ring) {
        run(&resealed, Some(&ring));
    }
}

/// Whether `data`, from an allowed client to a synchronized server with NTS
/// on, gets an authenticated NTS time reply (the captured NTS seeds must:
/// otherwise they do not reach past the authenticator).
pub fn nts_authenticates(data: &[u8]) -> bool {
    let ring = crate::key_ring();
    let cfg = config(false, Probability::NEVER, DenyResponse::Kod, UnsyncPolicy::Announce);
    let mut bench = Bench::new(cfg, Some(&ring), true);
    let _ = bench.handle(data, ALLOWED, &clock(true), 2048);
    bench.responder.counters().nts_replies == 1
}

fn clock(synchronized: bool) -> ClockSnapshot {
    ClockSnapshot {
        synchronized,
        stratum: 2,
        reference_id: RefId([192, 0, 2, 1]),
        reference_time: NtpTimestamp::from_unix(NOW_UNIX - 30, 0),
        root_delay: 0.002,
        root_dispersion: 0.001,
        updated_at: NtpTimestamp::from_unix(NOW_UNIX - 1, 0),
        ..ClockSnapshot::unsynchronized(-24)
    }
}

fn acl() -> Acl {
    let mut acl = Acl::new(AclAction::Allow);
    let cidr = |s: &str| s.parse::<Cidr>().unwrap_or_else(|e| panic!("{s}: {e:?}"));
    acl.insert(cidr("2001:db8:d::/48"), AclAction::Deny);
    acl.insert(cidr("198.51.100.0/24"), AclAction::Restrict);
    acl
}

fn config(interleaved: bool, kod: Probability, deny: DenyResponse, unsync: UnsyncPolicy) -> ResponderConfig {
    ResponderConfig {
        unsynchronized: unsync,
        deny,
        kod_probability: kod,
        rate_limit: RateLimitConfig { burst: 2, capacity: 64, ..RateLimitConfig::default() },
        interleaved_capacity: if interleaved { 16 } else { 0 },
        ..ResponderConfig::default()
    }
}

/// One responder under test and what its checks need to know.
struct Bench<'a> {
    responder: Responder,
    ring: Option<&'a KeyRing>,
    rx: NtpTimestamp,
    tx: NtpTimestamp,
}

impl<'a> Bench<'a> {
    fn new(cfg: ResponderConfig, ring: Option<&'a KeyRing>, nonces: bool) -> Self {
        let mut responder = Responder::new(cfg, 0x5EED);
        if nonces {
            responder.set_nonce_source(Box::new(AesCtrNonces::new(&[0x42; 32])));
        }
        let rx = NtpTimestamp::from_unix(NOW_UNIX, 500_000_000);
        Self { responder, ring, rx, tx: rx.add_secs(0.000_02) }
    }

    /// Handles `request` from `source` with an `out_len`-byte buffer and
    /// checks the outcome; returns the reply.
    fn handle(&mut self, request: &[u8], source: SocketAddr, clock: &ClockSnapshot, out_len: usize) -> Option<Vec<u8>> {
        let acl = acl();
        let ctx = Context { clock, acl: &acl, nts: self.ring };
        let meta = RequestMeta { source, rx: RxTimestamp { time: self.rx, kind: StampKind::KernelSoftware } };
        let before = self.responder.counters().clone();
        let tx = self.tx;
        let mut out = vec![0u8; out_len];
        let action = self.responder.handle(request, &meta, &ctx, &mut || tx, &mut out);
        let after = self.responder.counters().clone();
        let reply = match action {
            Action::Reply(r) => Some(r.to_vec()),
            Action::Drop(reason) => {
                check_drop(request, source, &before, &after, reason);
                None
            }
        };
        if let Some(reply) = &reply {
            self.check_reply(request, reply, &before, &after, clock);
        }
        assert_eq!(after.received, before.received + 1);
        assert_balanced(&after);
        // Time moves on a little between requests.
        self.rx = self.rx.add_secs(0.001);
        self.tx = self.rx.add_secs(0.000_02);
        reply
    }

    fn check_reply(&self, request: &[u8], reply: &[u8], before: &Counters, after: &Counters, clock: &ClockSnapshot) {
        assert!(reply.len() <= request.len(), "reply of {} bytes to a request of {}", reply.len(), request.len());
        assert!(reply.len() >= HEADER_LEN);
        let req = match Packet::parse(request) {
            Ok(p) => p.header,
            Err(e) => panic!("a reply to a request that does not parse ({e:?})"),
        };
        assert_eq!(req.mode, Mode::Client, "only client mode is answered");
        assert!((1..=4).contains(&req.version));
        let packet = match Packet::parse(reply) {
            Ok(p) => p,
            Err(e) => panic!("the reply does not parse: {e:?}"),
        };
        let h = packet.header;
        assert_eq!(h.mode, Mode::Server);
        assert_eq!(h.version, req.version);
        assert!(!matches!(packet.trailer, Trailer::Mac { .. }));
        assert_eq!(after.drops, before.drops, "a reply and a drop");
        if h.stratum == 0 {
            let code = KissCode::ALL
                .into_iter()
                .find(|c| c.ref_id() == h.reference_id)
                .unwrap_or_else(|| panic!("KoD with reference ID {:?}", h.reference_id));
            assert_eq!(after.kod_sent(code), before.kod_sent(code) + 1);
            assert_eq!(after.replies, before.replies);
            assert_eq!((h.origin_ts, h.receive_ts, h.transmit_ts), (req.transmit_ts, req.transmit_ts, req.transmit_ts));
            if code == KissCode::Ntsn {
                check_nak(request, reply);
            } else {
                assert_eq!(reply.len(), HEADER_LEN);
            }
            return;
        }
        assert_eq!(after.replies, before.replies + 1);
        assert_eq!(after.kod, before.kod);
        let stamps = self.responder.last_reply().unwrap_or_else(|| panic!("time reply without stamps"));
        assert_eq!(h.receive_ts, stamps.rx);
        if stamps.interleaved {
            assert_eq!(after.interleaved_replies, before.interleaved_replies + 1);
            assert_eq!(h.origin_ts, req.receive_ts);
        } else {
            assert_eq!(h.origin_ts, req.transmit_ts);
            assert_eq!(h.transmit_ts, stamps.tx);
        }
        if clock.synchronized {
            assert_eq!((h.stratum, h.reference_id), (clock.stratum, clock.reference_id));
        } else {
            assert_eq!((h.stratum, h.leap), (16, LeapIndicator::Unsynchronized));
        }
        let nts = after.nts_replies - before.nts_replies;
        if nts == 1 {
            let ring = self.ring.unwrap_or_else(|| panic!("an NTS reply with NTS off"));
            let cookies = check_nts_reply(request, reply, ring);
            assert_eq!(after.nts_cookies - before.nts_cookies, cookies as u64);
        } else {
            assert_eq!(nts, 0);
            assert_eq!(reply.len(), HEADER_LEN, "a plain reply is the bare header");
        }
    }
}

fn check_drop(request: &[u8], source: SocketAddr, before: &Counters, after: &Counters, reason: DropReason) {
    assert_eq!(after.dropped(reason), before.dropped(reason) + 1, "drop {reason:?} not counted");
    let total = |c: &Counters| c.drops.iter().sum::<u64>();
    assert_eq!(total(after), total(before) + 1, "one drop, one count");
    assert_eq!((after.replies, after.kod), (before.replies, before.kod));
    let Ok(packet) = Packet::parse(request) else {
        assert!(matches!(reason, DropReason::TooShort | DropReason::MalformedExtension));
        return;
    };
    if source.port() == 0 {
        assert_eq!(reason, DropReason::BadSource);
        return;
    }
    match packet.header.mode {
        Mode::Control => assert_eq!(reason, DropReason::Mode6),
        Mode::Private => assert_eq!(reason, DropReason::Mode7),
        Mode::Client => {}
        _ => assert!(matches!(reason, DropReason::NotClient | DropReason::KissOfDeath)),
    }
}

/// Every request is counted exactly once: a time reply, a KoD or a drop.
fn assert_balanced(c: &Counters) {
    let handled = c.replies + c.kod.iter().sum::<u64>() + c.drops.iter().sum::<u64>();
    assert_eq!(handled, c.received, "counters do not add up: {c:?}");
}

/// An NTS NAK echoes the request's Unique Identifier field and nothing else.
fn check_nak(request: &[u8], reply: &[u8]) {
    let req = NtsRequest::parse(request).unwrap_or_else(|e| panic!("NTS NAK to a non-NTS request: {e:?}"));
    assert_eq!(&reply[HEADER_LEN..], req.unique_id_field);
}

/// An NTS reply: the Unique Identifier copy, then an authenticator that
/// opens with the S2C key of the request's cookie and holds only cookies,
/// each opening to the same session keys. Returns the number of cookies.
fn check_nts_reply(request: &[u8], reply: &[u8], ring: &KeyRing) -> usize {
    let req = NtsRequest::parse(request).unwrap_or_else(|e| panic!("NTS reply to a non-NTS request: {e:?}"));
    let keys = open_cookie(ring, req.cookie).unwrap_or_else(|e| panic!("NTS reply to a bad cookie: {e:?}"));
    let uid_end = HEADER_LEN + req.unique_id_field.len();
    assert_eq!(&reply[HEADER_LEN..uid_end], req.unique_id_field);
    let mut fields = ExtensionFields::new(&reply[uid_end..]);
    let auth = match fields.next() {
        Some(Ok(f)) if f.field_type == field_type::NTS_AUTHENTICATOR => f,
        other => panic!("no authenticator after the Unique Identifier: {other:?}"),
    };
    assert_eq!(fields.next(), None, "fields after the authenticator");
    let body = auth.value;
    let nonce_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let ct_len = usize::from(u16::from_be_bytes([body[2], body[3]]));
    assert_eq!(nonce_len, keys.aead.nonce_len());
    let layout = AuthLayout::new(keys.aead.tag_first(), uid_end, nonce_len, ct_len - 16);
    assert_eq!(layout.end, reply.len());
    let nonce = &reply[layout.nonce_at..layout.nonce_at + nonce_len];
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&reply[layout.tag_at..layout.tag_at + 16]);
    let mut plain = reply[layout.plain_at..layout.plain_at + ct_len - 16].to_vec();
    if let Err(e) = open_once(keys.aead, keys.s2c(), nonce, &reply[..uid_end], &mut plain, &tag) {
        panic!("the reply does not authenticate with the S2C key: {e:?}");
    }
    let mut cookies = 0;
    for f in ExtensionFields::new(&plain) {
        let f = f.unwrap_or_else(|e| panic!("encrypted reply fields do not parse: {e:?}"));
        assert_eq!(f.field_type, field_type::NTS_COOKIE);
        let fresh = open_cookie(ring, f.value).unwrap_or_else(|e| panic!("a fresh cookie does not open: {e:?}"));
        assert_eq!(fresh, keys, "a fresh cookie holds other keys");
        cookies += 1;
    }
    cookies
}

/// `data` with its authenticator sealed again under the C2S key of its
/// cookie, the bytes where the plaintext goes taken as the plaintext; `None`
/// if it is no NTS request, the cookie does not open, the field has extra
/// padding, or the nonce does not suit the AEAD.
fn reseal(data: &[u8], ring: &KeyRing) -> Option<Vec<u8>> {
    let req = NtsRequest::parse(data).ok()?;
    let keys: SessionKeys = open_cookie(ring, req.cookie).ok()?;
    let at = req.associated_data.len();
    let plain_len = req.ciphertext.len() - 16;
    let layout = AuthLayout::new(keys.aead.tag_first(), at, req.nonce.len(), plain_len);
    let field_len = usize::from(u16::from_be_bytes([data[at + 2], data[at + 3]]));
    if at + field_len != layout.end {
        return None;
    }
    let key = NtsKey::new(keys.aead, keys.c2s()).ok()?;
    let mut out = data.to_vec();
    let end = seal_authenticator(&mut out, at, &key, req.nonce, plain_len)?;
    assert_eq!(end, data.len());
    Some(out)
}

/// The request with its origin set to the receive timestamp of `reply`
/// and its receive field made different from its transmit field: the
/// interleaved follow-up a client sends (RFC 9769).
fn interleaved_follow_up(request: &[u8], reply: &[u8]) -> Option<Vec<u8>> {
    let reply = Header::parse(reply).ok()?;
    let mut next = request.to_vec();
    let mut h = Header::parse(&next).ok()?;
    h.origin_ts = reply.receive_ts;
    h.receive_ts = reply.transmit_ts;
    if h.receive_ts == h.transmit_ts {
        h.transmit_ts = NtpTimestamp::from_bits(h.transmit_ts.to_bits() ^ 1);
    }
    h.write(&mut next);
    Some(next)
}

fn run(data: &[u8], ring: Option<&KeyRing>) {
    let synced = clock(true);
    let cfg = |interleaved, kod| config(interleaved, kod, DenyResponse::Kod, UnsyncPolicy::Announce);

    // An allowed client, interleaved mode on, until the rate limit bites
    // (KoD RATE always), then an interleaved follow-up to the first reply.
    let mut bench = Bench::new(cfg(true, Probability::ALWAYS), ring, true);
    let first = bench.handle(data, ALLOWED, &synced, 2048);
    if let Some(first) = &first
        && let Some(stamps) = bench.responder.last_reply()
    {
        let precise = stamps.tx.add_secs(0.000_001);
        bench.responder.record_tx(stamps.rx, precise);
        if let Some(next) = interleaved_follow_up(data, first) {
            let hits = bench.responder.counters().interleaved_hits;
            if let Some(reply) = bench.handle(&next, ALLOWED, &synced, 2048)
                && bench.responder.last_reply().is_some_and(|s| s.interleaved)
            {
                assert_eq!(bench.responder.counters().interleaved_hits, hits + 1);
                let h = Header::parse(&reply).unwrap_or_else(|e| panic!("{e:?}"));
                assert_eq!(h.transmit_ts, precise, "interleaved transmit is the recorded precise stamp");
            }
        }
    }
    for _ in 0..3 {
        let _ = bench.handle(data, ALLOWED, &synced, 2048);
    }

    // Rate limited with no KoD at all: a drop, never a time reply.
    let mut silent = Bench::new(cfg(false, Probability::NEVER), ring, true);
    for i in 0..4 {
        let reply = silent.handle(data, ALLOWED, &synced, 2048);
        if i >= 2 {
            assert!(reply.is_none(), "request {i} over a burst of 2 answered");
        }
    }

    // Denied (KoD and silent), restricted, port 0, unsynchronized.
    let mut other = Bench::new(cfg(false, Probability::NEVER), ring, true);
    let _ = other.handle(data, DENIED, &synced, 2048);
    let _ = other.handle(data, RESTRICTED, &synced, 2048);
    assert!(other.handle(data, PORT_ZERO, &synced, 2048).is_none());
    let _ = other.handle(data, SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), 123), &clock(false), 2048);
    let silent_cfg = config(false, Probability::NEVER, DenyResponse::Silent, UnsyncPolicy::Silent);
    let mut quiet = Bench::new(silent_cfg, ring, true);
    assert!(quiet.handle(data, DENIED, &synced, 2048).is_none());
    assert!(quiet.handle(data, ALLOWED, &clock(false), 2048).is_none());

    // A buffer too small for any reply, and one of exactly the request's size.
    let mut small = Bench::new(cfg(false, Probability::ALWAYS), ring, true);
    assert!(small.handle(data, ALLOWED, &synced, HEADER_LEN - 1).is_none());
    let _ = small.handle(data, ALLOWED, &synced, data.len());

    // NTS on but no nonce source: NTS requests are never answered with time.
    if ring.is_some() {
        let mut no_nonces = Bench::new(cfg(false, Probability::ALWAYS), ring, false);
        let _ = no_nonces.handle(data, ALLOWED, &synced, 2048);
        assert_eq!(no_nonces.responder.counters().nts_replies, 0);
    }
}
