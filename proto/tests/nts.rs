//! NTS end to end in memory: NTS-KE records, then NTP requests from a test
//! client built from the same pieces (what chrony does after NTS-KE: Unique
//! Identifier, cookie, placeholders, authenticator sealed with C2S), and the
//! server's replies checked the way a client checks them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use chime_proto::acl::Acl;
use chime_proto::ext::{ExtensionFields, field_type, write_extension_field};
use chime_proto::nts::ke::{
    self, Direction, ErrorCode, KeError, KeLimits, KeRequestParser, KeResponse, Negotiated, Record, Records,
    record_type, write_record,
};
use chime_proto::nts::ntp::{COOKIE_FIELD_LEN, seal_authenticator};
use chime_proto::nts::{
    Aead, AesCtrNonces, COOKIE_LEN, KeyRing, KeyRingConfig, MasterKey, NonceSource, NtsKey, SessionKeys, open_cookie,
};
use chime_proto::packet::{Header, LeapIndicator, Mode, RefId};
use chime_proto::ratelimit::RateLimitConfig;
use chime_proto::{
    Action, ClockSnapshot, Context, DropReason, KissCode, NtpTimestamp, RequestMeta, Responder, ResponderConfig,
    RxTimestamp, StampKind,
};

const T0: i64 = 1_790_000_000;

fn clock() -> ClockSnapshot {
    ClockSnapshot {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 1,
        reference_id: RefId(*b"GPS\0"),
        reference_time: NtpTimestamp::from_unix(T0 - 10, 0),
        root_delay: 0.0,
        root_dispersion: 0.001,
        precision: -23,
        updated_at: NtpTimestamp::from_unix(T0, 0),
        smear: None,
    }
}

fn ring() -> KeyRing {
    KeyRing::new(MasterKey::new(1, [0xA5; 16]), 3, T0 as u64)
}

// ---------------------------------------------------------------- NTS-KE

fn ke_request(protocols: &[u16], aeads: Option<&[u16]>) -> Vec<u8> {
    let mut out = Vec::new();
    let list = |ids: &[u16]| ids.iter().flat_map(|i| i.to_be_bytes()).collect::<Vec<u8>>();
    write_record(&mut out, true, record_type::NEXT_PROTOCOL, &list(protocols));
    if let Some(aeads) = aeads {
        write_record(&mut out, true, record_type::AEAD_ALGORITHM, &list(aeads));
    }
    write_record(&mut out, true, record_type::END_OF_MESSAGE, &[]);
    out
}

fn parse_whole(bytes: &[u8]) -> Result<ke::KeRequest, KeError> {
    let mut p = KeRequestParser::new(KeLimits::default());
    match p.push(bytes)? {
        Some(r) => Ok(r),
        None => p.finish(),
    }
}

/// What an NTS-KE exchange leaves the client with (the keys stand for what
/// both sides export from TLS).
fn key_exchange(aead_prefs: &[u16], ring: &KeyRing) -> (SessionKeys, Vec<Vec<u8>>) {
    let req = parse_whole(&ke_request(&[0], Some(aead_prefs))).unwrap();
    let Ok(Negotiated::Ntpv4(aead)) = req.negotiate() else { panic!("not negotiated") };
    let n = aead.key_len();
    let keys = SessionKeys::new(aead, &[0x11; 32][..n], &[0x22; 32][..n]).unwrap();
    let mut out = Vec::new();
    let mut nonces = AesCtrNonces::new(&[3; 32]);
    KeResponse::for_outcome(req.negotiate(), &keys, None, None).write(ring, &mut nonces, &mut out);
    let mut cookies = Vec::new();
    let mut saw = (false, false, false);
    for r in Records::new(&out) {
        match r.unwrap() {
            (true, Record::NextProtocol(l)) => saw.0 = l.iter().eq([0]),
            (true, Record::AeadAlgorithm(l)) => saw.1 = l.iter().eq([aead.id()]),
            (_, Record::NewCookie(c)) => cookies.push(c.to_vec()),
            (true, Record::EndOfMessage) => saw.2 = true,
            other => panic!("unexpected record {other:?}"),
        }
    }
    assert_eq!(saw, (true, true, true));
    assert_eq!(cookies.len(), ke::COOKIES_PER_RESPONSE);
    (keys, cookies)
}

#[test]
fn ke_request_round_trip_and_split_reads() {
    let mut bytes = ke_request(&[0], Some(&[30, 15]));
    // An unknown non-critical record and a port request in the middle.
    let eom = bytes.split_off(bytes.len() - 4);
    write_record(&mut bytes, false, 0x4321, b"ignored");
    write_record(&mut bytes, true, record_type::PORT, &123u16.to_be_bytes());
    write_record(&mut bytes, false, record_type::SERVER, b"ntp.example");
    bytes.extend_from_slice(&eom);
    let whole = parse_whole(&bytes).unwrap();
    assert_eq!(whole.protocols.as_slice(), &[0]);
    assert_eq!(whole.aeads.as_slice(), &[30, 15]);
    assert_eq!(whole.preferred_aead, Some(Aead::GcmSiv128));
    assert_eq!(whole.port, Some(123));
    assert_eq!(whole.server.unwrap().as_bytes(), b"ntp.example");
    assert!(whole.wants_port() && whole.wants_server());
    // Every way of cutting the request in two, and byte by byte.
    for cut in 0..=bytes.len() {
        let mut p = KeRequestParser::new(KeLimits::default());
        let first = p.push(&bytes[..cut]).unwrap();
        let r = if cut == bytes.len() { first } else { p.push(&bytes[cut..]).unwrap() };
        assert_eq!(r, Some(whole), "cut at {cut}");
    }
    let mut p = KeRequestParser::new(KeLimits::default());
    let mut got = None;
    for b in &bytes {
        got = p.push(std::slice::from_ref(b)).unwrap();
    }
    assert_eq!(got, Some(whole));
    assert_eq!(p.push(&[0]), Err(KeError::TrailingData));
}

#[test]
fn ke_aead_negotiation_follows_client_order() {
    let neg = |aeads: &[u16]| parse_whole(&ke_request(&[0], Some(aeads))).unwrap().negotiate();
    assert_eq!(neg(&[15, 30]), Ok(Negotiated::Ntpv4(Aead::SivCmac256)));
    assert_eq!(neg(&[30, 15]), Ok(Negotiated::Ntpv4(Aead::GcmSiv128)));
    assert_eq!(neg(&[17, 16, 30]), Ok(Negotiated::Ntpv4(Aead::GcmSiv128)));
    assert_eq!(neg(&[17]), Err(KeError::NoCommonAead));
    assert_eq!(KeError::NoCommonAead.code(), ErrorCode::BadRequest);
    // No NTPv4 offered: an empty Next Protocol record, no AEAD needed.
    let r = parse_whole(&ke_request(&[0x8001], None)).unwrap();
    assert_eq!(r.negotiate(), Ok(Negotiated::NoProtocol));
    let keys = SessionKeys::new(Aead::SivCmac256, &[0; 32], &[0; 32]).unwrap();
    let mut out = Vec::new();
    KeResponse::for_outcome(r.negotiate(), &keys, None, None).write(
        &ring(),
        &mut AesCtrNonces::new(&[0; 32]),
        &mut out,
    );
    assert_eq!(out, [0x80, 0x01, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00]);
}

#[test]
fn ke_errors() {
    // Unknown critical record: error 0.
    let mut b = Vec::new();
    write_record(&mut b, true, 0x1234, &[]);
    let e = parse_whole(&b).unwrap_err();
    assert_eq!(e, KeError::UnrecognizedCritical(0x1234));
    assert_eq!(e.code(), ErrorCode::UnrecognizedCriticalRecord);
    // Oversized record, refused from its header alone.
    let mut p = KeRequestParser::new(KeLimits { max_record_body: 64, max_request: 1 << 16 });
    assert_eq!(p.push(&[0x80, 0x01, 0x00, 0x41]), Err(KeError::RecordTooLarge(65)));
    assert_eq!(p.push(&[0]), Err(KeError::RecordTooLarge(65)), "stays failed");
    // Too much in total, even of skippable records.
    let mut p = KeRequestParser::new(KeLimits { max_record_body: 64, max_request: 100 });
    let mut big = Vec::new();
    write_record(&mut big, false, 0x4000, &[0; 200]);
    assert_eq!(p.push(&big), Err(KeError::RequestTooLarge));
    // Missing records, duplicates, bad bodies, things clients don't send.
    let mut only_eom = Vec::new();
    write_record(&mut only_eom, true, record_type::END_OF_MESSAGE, &[]);
    assert_eq!(parse_whole(&only_eom), Err(KeError::MissingNextProtocol));
    assert_eq!(parse_whole(&ke_request(&[0], None)), Err(KeError::MissingAead));
    assert_eq!(parse_whole(&ke_request(&[], Some(&[15]))), Err(KeError::MalformedRecord(1)));
    let mut dup = Vec::new();
    write_record(&mut dup, true, record_type::NEXT_PROTOCOL, &[0, 0]);
    dup.extend_from_slice(&ke_request(&[0], Some(&[15])));
    assert_eq!(parse_whole(&dup), Err(KeError::UnexpectedRecord(1)));
    let mut odd = Vec::new();
    write_record(&mut odd, true, record_type::AEAD_ALGORITHM, &[0, 15, 0]);
    assert_eq!(parse_whole(&odd), Err(KeError::MalformedRecord(4)));
    let mut err = Vec::new();
    write_record(&mut err, true, record_type::ERROR, &[0, 1]);
    assert_eq!(parse_whole(&err), Err(KeError::UnexpectedRecord(2)));
    let mut eom_body = Vec::new();
    write_record(&mut eom_body, true, record_type::END_OF_MESSAGE, &[0]);
    assert_eq!(parse_whole(&eom_body), Err(KeError::MalformedRecord(0)));
    // Truncated at EOF, and trailing bytes after End of Message.
    let req = ke_request(&[0], Some(&[15]));
    let mut p = KeRequestParser::new(KeLimits::default());
    assert_eq!(p.push(&req[..req.len() - 1]), Ok(None));
    assert_eq!(p.finish(), Err(KeError::Truncated));
    let mut trailing = req.clone();
    trailing.push(0);
    assert_eq!(KeRequestParser::new(KeLimits::default()).push(&trailing), Err(KeError::TrailingData));
    // Error responses.
    let keys = SessionKeys::new(Aead::SivCmac256, &[0; 32], &[0; 32]).unwrap();
    let mut out = Vec::new();
    KeResponse::for_outcome(Err(e), &keys, None, None).write(&ring(), &mut AesCtrNonces::new(&[0; 32]), &mut out);
    assert_eq!(out, [0x80, 0x02, 0x00, 0x02, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00]);
    out.clear();
    KeResponse::Error(ErrorCode::BadRequest).write(&ring(), &mut AesCtrNonces::new(&[0; 32]), &mut out);
    assert_eq!(&out[..6], [0x80, 0x02, 0x00, 0x02, 0x00, 0x01]);
}

#[test]
fn ke_response_with_server_and_port() {
    let keys = SessionKeys::new(Aead::GcmSiv128, &[1; 16], &[2; 16]).unwrap();
    let mut out = Vec::new();
    KeResponse::for_outcome(Ok(Negotiated::Ntpv4(Aead::GcmSiv128)), &keys, Some(b"ntp2.example"), Some(1234)).write(
        &ring(),
        &mut AesCtrNonces::new(&[0; 32]),
        &mut out,
    );
    let records: Vec<_> = Records::new(&out).map(Result::unwrap).collect();
    assert_eq!(records.len(), 2 + 2 + 8 + 1);
    assert_eq!(records[2], (true, Record::Server(b"ntp2.example")));
    assert_eq!(records[3], (true, Record::Port(1234)));
    for (_, r) in &records[4..12] {
        let Record::NewCookie(c) = r else { panic!("{r:?}") };
        assert_eq!(open_cookie(&ring(), c).unwrap(), keys);
    }
    // A mismatch between negotiated AEAD and keys is a server bug: error 2.
    assert!(matches!(
        KeResponse::for_outcome(Ok(Negotiated::Ntpv4(Aead::SivCmac256)), &keys, None, None),
        KeResponse::Error(ErrorCode::InternalServerError)
    ));
}

#[test]
fn exporter_contexts() {
    assert_eq!(ke::exporter_context(Aead::SivCmac256, Direction::C2S), [0x00, 0x00, 0x00, 0x0F, 0x00]);
    assert_eq!(ke::exporter_context(Aead::SivCmac256, Direction::S2C), [0x00, 0x00, 0x00, 0x0F, 0x01]);
    assert_eq!(ke::exporter_context(Aead::GcmSiv128, Direction::S2C), [0x00, 0x00, 0x00, 0x1E, 0x01]);
    assert_eq!(ke::EXPORTER_LABEL, "EXPORTER-network-time-security");
    assert_eq!((Aead::SivCmac256.key_len(), Aead::GcmSiv128.key_len()), (32, 16));
}

// ---------------------------------------------------------------- NTP

/// A request as chrony builds it. `placeholder_len` is the value length of
/// each placeholder (chrony: the cookie's length).
fn nts_request(
    keys: &SessionKeys,
    cookie: &[u8],
    uid: &[u8],
    placeholders: usize,
    placeholder_len: usize,
    encrypted: &[u8],
) -> Vec<u8> {
    let mut b = vec![0u8; 2048];
    b[0] = 0x23;
    b[2] = 6;
    b[40..48].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
    let mut at = 48;
    at += write_extension_field(&mut b[at..], field_type::UNIQUE_IDENTIFIER, uid).unwrap();
    at += write_extension_field(&mut b[at..], field_type::NTS_COOKIE, cookie).unwrap();
    for _ in 0..placeholders {
        at +=
            write_extension_field(&mut b[at..], field_type::NTS_COOKIE_PLACEHOLDER, &vec![0; placeholder_len]).unwrap();
    }
    let key = NtsKey::new(keys.aead, keys.c2s()).unwrap();
    let nonce = [0x5A; 16];
    let nonce = &nonce[..keys.aead.nonce_len()];
    let layout = chime_proto::nts::ntp::AuthLayout::new(keys.aead.tag_first(), at, nonce.len(), encrypted.len());
    b[layout.plain_at..layout.plain_at + encrypted.len()].copy_from_slice(encrypted);
    let end = seal_authenticator(&mut b, at, &key, nonce, encrypted.len()).unwrap();
    b.truncate(end);
    b
}

/// Checks a reply the way a client does; returns the cookies in it.
fn client_check(keys: &SessionKeys, request: &[u8], reply: &[u8], uid: &[u8]) -> Vec<Vec<u8>> {
    assert!(reply.len() <= request.len(), "amplification: {} > {}", reply.len(), request.len());
    let h = Header::parse(reply).unwrap();
    assert_eq!(h.mode, Mode::Server);
    assert_eq!(h.origin_ts.to_bits(), 0x1122_3344_5566_7788);
    let mut fields = ExtensionFields::new(&reply[48..]).map(Result::unwrap);
    let u = fields.next().unwrap();
    assert_eq!(u.field_type, field_type::UNIQUE_IDENTIFIER);
    assert_eq!(&u.value[..uid.len()], uid);
    let auth = fields.next().unwrap();
    assert_eq!(auth.field_type, field_type::NTS_AUTHENTICATOR);
    assert!(fields.next().is_none(), "authenticator is last");
    let ad = &reply[..reply.len() - auth.wire_len()];
    let v = auth.value;
    let nl = usize::from(u16::from_be_bytes([v[0], v[1]]));
    let cl = usize::from(u16::from_be_bytes([v[2], v[3]]));
    assert_eq!(nl, keys.aead.nonce_len());
    let nonce = &v[4..4 + nl];
    let ct = &v[4 + nl.next_multiple_of(4)..][..cl];
    let (tag, sealed) = if keys.aead.tag_first() { (&ct[..16], &ct[16..]) } else { (&ct[cl - 16..], &ct[..cl - 16]) };
    let mut plain = sealed.to_vec();
    let key = NtsKey::new(keys.aead, keys.s2c()).unwrap();
    key.open_in_place(nonce, ad, &mut plain, tag.try_into().unwrap()).expect("reply authenticates with S2C");
    ExtensionFields::new(&plain)
        .map(Result::unwrap)
        .map(|f| {
            assert_eq!(f.field_type, field_type::NTS_COOKIE);
            f.value.to_vec()
        })
        .collect()
}

struct Server {
    responder: Responder,
    clock: ClockSnapshot,
    acl: Acl,
    ring: Option<KeyRing>,
    out: Vec<u8>,
}

impl Server {
    fn new(ring: KeyRing) -> Self {
        let rate_limit = RateLimitConfig { enabled: false, ..RateLimitConfig::default() };
        let mut responder = Responder::new(ResponderConfig { rate_limit, ..ResponderConfig::default() }, 1);
        responder.set_nonce_source(Box::new(AesCtrNonces::new(&[9; 32])));
        Self { responder, clock: clock(), acl: Acl::default(), ring: Some(ring), out: vec![0; 2048] }
    }

    fn handle(&mut self, req: &[u8]) -> Result<Vec<u8>, DropReason> {
        let ctx = Context { clock: &self.clock, acl: &self.acl, nts: self.ring.as_ref() };
        let rx = NtpTimestamp::from_unix(T0 + 100, 0);
        let meta = RequestMeta {
            source: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)), 40000),
            rx: RxTimestamp { time: rx, kind: StampKind::Hardware },
        };
        match self.responder.handle(req, &meta, &ctx, &mut || rx.add_secs(1e-6), &mut self.out) {
            Action::Reply(b) => Ok(b.to_vec()),
            Action::Drop(r) => Err(r),
        }
    }
}

fn is_nak(reply: &[u8], uid: &[u8]) -> bool {
    let h = Header::parse(reply).unwrap();
    let mut f = ExtensionFields::new(&reply[48..]).map(Result::unwrap);
    let u = f.next().unwrap();
    h.stratum == 0 && h.reference_id == RefId::NTSN && u.value.starts_with(uid) && f.next().is_none()
}

#[test]
fn full_exchange_both_aeads() {
    for prefs in [[15u16, 30], [30, 15]] {
        let ring = ring();
        let (keys, cookies) = key_exchange(&prefs, &ring);
        let mut server = Server::new(ring);
        let uid = [0xC1; 32];
        for placeholders in 0..=7 {
            let req = nts_request(&keys, &cookies[placeholders], &uid, placeholders, COOKIE_LEN, &[]);
            let reply = server.handle(&req).unwrap();
            let fresh = client_check(&keys, &req, &reply, &uid);
            assert_eq!(fresh.len(), 1 + placeholders);
            for c in &fresh {
                assert_eq!(c.len(), COOKIE_LEN);
                assert_eq!(open_cookie(server.ring.as_ref().unwrap(), c).unwrap(), keys);
                assert!(!cookies.contains(c), "fresh, not a copy");
            }
            // A fresh cookie works in the next request.
            let again = nts_request(&keys, &fresh[0], &uid, 0, 0, &[]);
            client_check(&keys, &again, &server.handle(&again).unwrap(), &uid);
        }
        let c = server.responder.counters();
        assert_eq!(c.nts_replies, 16);
        assert_eq!(c.nts_cookies, (1..=8).sum::<u64>() + 8);
        assert_eq!(c.replies, 16);
    }
}

#[test]
fn reply_never_longer_than_request() {
    let ring = ring();
    let (keys, cookies) = key_exchange(&[15], &ring);
    let mut server = Server::new(ring);
    let uid = [7u8; 40];
    // Placeholders too short to carry a cookie back: fewer cookies.
    for (n, len) in [(1, 12), (3, 40), (7, 60), (2, 100)] {
        let req = nts_request(&keys, &cookies[0], &uid, n, len, &[]);
        let reply = server.handle(&req).unwrap();
        let fresh = client_check(&keys, &req, &reply, &uid);
        let room = (req.len() - 48 - 44 - 40) / COOKIE_FIELD_LEN;
        assert_eq!(fresh.len(), (1 + n).min(room), "{n} placeholders of {len}");
    }
}

#[test]
fn encrypted_placeholders_count() {
    let ring = ring();
    let (keys, cookies) = key_exchange(&[30], &ring);
    let mut server = Server::new(ring);
    let uid = [1u8; 32];
    let mut enc = vec![0u8; 2 * COOKIE_FIELD_LEN];
    for ph in enc.chunks_mut(COOKIE_FIELD_LEN) {
        write_extension_field(ph, field_type::NTS_COOKIE_PLACEHOLDER, &[0; COOKIE_LEN]).unwrap();
    }
    let req = nts_request(&keys, &cookies[0], &uid, 0, 0, &enc);
    let reply = server.handle(&req).unwrap();
    assert_eq!(client_check(&keys, &req, &reply, &uid).len(), 3);
}

#[test]
fn forged_or_altered_requests_are_dropped() {
    let ring = ring();
    let (keys, cookies) = key_exchange(&[15], &ring);
    let mut server = Server::new(ring);
    let uid = [2u8; 32];
    let req = nts_request(&keys, &cookies[0], &uid, 1, COOKIE_LEN, &[]);
    // Any change to the header, the UID, the placeholder or the
    // authenticator fails authentication (cookie bytes give a NAK instead).
    let cookie_at = 48 + 36 + 4..48 + 36 + 4 + COOKIE_LEN;
    for i in [2usize, 40, 47, 55, 60, 48 + 36 + 104 + 8, req.len() - 1, req.len() - 20] {
        assert!(!cookie_at.contains(&i));
        let mut bad = req.clone();
        bad[i] ^= 0x01;
        let r = server.handle(&bad);
        assert!(matches!(r, Err(DropReason::NtsAuthFailed | DropReason::NtsMalformed)), "byte {i}: {r:?}");
    }
    // Sealed with the wrong key entirely.
    let wrong = SessionKeys::new(Aead::SivCmac256, &[0x33; 32], &[0x22; 32]).unwrap();
    let forged = nts_request(&wrong, &cookies[0], &uid, 0, 0, &[]);
    assert_eq!(server.handle(&forged), Err(DropReason::NtsAuthFailed));
    assert!(server.responder.counters().dropped(DropReason::NtsAuthFailed) >= 6);
    assert_eq!(server.responder.counters().nts_replies, 0);
}

#[test]
fn unknown_cookie_gets_a_nak_with_the_uid() {
    let ring = ring();
    let (keys, cookies) = key_exchange(&[15], &ring);
    let mut server = Server::new(KeyRing::new(MasterKey::new(2, [0x5A; 16]), 3, 0));
    let uid = [0xEE; 48];
    let req = nts_request(&keys, &cookies[0], &uid, 2, COOKIE_LEN, &[]);
    let reply = server.handle(&req).unwrap();
    assert!(is_nak(&reply, &uid));
    assert_eq!(reply.len(), 48 + 52);
    let h = Header::parse(&reply).unwrap();
    assert_eq!(h.origin_ts.to_bits(), 0x1122_3344_5566_7788);
    // A damaged cookie (right key id) is a NAK too, not a drop.
    let mut bad_cookie = cookies[1].clone();
    bad_cookie[50] ^= 1;
    let req = nts_request(&keys, &bad_cookie, &uid, 0, 0, &[]);
    let mut server = Server::new(ring);
    assert!(is_nak(&server.handle(&req).unwrap(), &uid));
    assert_eq!(server.responder.counters().kod_sent(KissCode::Ntsn), 1);
}

#[test]
fn rotation_accepts_kept_keys_then_naks() {
    let (keys, cookies) = key_exchange(&[15], &ring());
    let mut server = Server::new(ring());
    let uid = [3u8; 32];
    let req = nts_request(&keys, &cookies[0], &uid, 0, 0, &[]);
    for (i, id) in (10..13).enumerate() {
        server.ring.as_mut().unwrap().rotate([i as u8; 16], id, T0 as u64 + 86_400 * (i as u64 + 1)).unwrap();
        let reply = server.handle(&req).unwrap();
        let fresh = client_check(&keys, &req, &reply, &uid);
        // Fresh cookies are sealed under the newest key.
        assert_eq!(u32::from_be_bytes(fresh[0][..4].try_into().unwrap()), id);
    }
    // Key 1 was the third previous key; one more rotation forgets it.
    server.ring.as_mut().unwrap().rotate([9; 16], 13, T0 as u64 + 86_400 * 4).unwrap();
    assert!(is_nak(&server.handle(&req).unwrap(), &uid));
}

#[test]
fn persisted_ring_accepts_cookies_after_restart() {
    let mut before = ring();
    before.rotate([0x77; 16], 2, T0 as u64 + 10).unwrap();
    let (keys, cookies) = key_exchange(&[30], &before);
    let bytes = before.encode();
    let mut server = Server::new(KeyRing::decode(&bytes).unwrap());
    let uid = [4u8; 32];
    let req = nts_request(&keys, &cookies[0], &uid, 0, 0, &[]);
    client_check(&keys, &req, &server.handle(&req).unwrap(), &uid);
}

#[test]
fn fleet_servers_accept_each_others_cookies() {
    let cfg = KeyRingConfig { interval_secs: 3600, keep: 2 };
    let now = 1_790_000_000u64;
    let a = KeyRing::for_fleet(b"a fleet secret of 32 bytes......", now, cfg).unwrap();
    let b = KeyRing::for_fleet(b"a fleet secret of 32 bytes......", now, cfg).unwrap();
    let other = KeyRing::for_fleet(b"another fleet, another secret...", now, cfg).unwrap();
    // B is just behind an epoch boundary that A has crossed.
    let a_next = KeyRing::for_fleet(b"a fleet secret of 32 bytes......", now + 3600, cfg).unwrap();
    let uid = [5u8; 32];
    for issuer in [&a, &a_next] {
        let (keys, cookies) = key_exchange(&[15], issuer);
        let req = nts_request(&keys, &cookies[0], &uid, 0, 0, &[]);
        let mut sb = Server::new(b.clone());
        client_check(&keys, &req, &sb.handle(&req).unwrap(), &uid);
        let mut so = Server::new(other.clone());
        assert!(is_nak(&so.handle(&req).unwrap(), &uid));
    }
    // Cookies of an epoch past the kept ones are refused.
    let (keys, cookies) = key_exchange(&[15], &a);
    let req = nts_request(&keys, &cookies[0], &uid, 0, 0, &[]);
    let mut later = Server::new(KeyRing::for_fleet(b"a fleet secret of 32 bytes......", now + 3 * 3600, cfg).unwrap());
    assert!(is_nak(&later.handle(&req).unwrap(), &uid));
}

#[test]
fn malformed_nts_requests_are_dropped() {
    let ring = ring();
    let (keys, cookies) = key_exchange(&[15], &ring);
    let mut server = Server::new(ring);
    // Short UID (28 bytes; 31 would be padded to 32 and pass).
    let req = nts_request(&keys, &cookies[0], &[1; 28], 0, 0, &[]);
    assert_eq!(server.handle(&req), Err(DropReason::NtsMalformed));
    // A field after the authenticator.
    let mut req = nts_request(&keys, &cookies[0], &[1; 32], 0, 0, &[]);
    req.extend_from_slice(&[0x01, 0x04, 0x00, 0x24]);
    req.extend_from_slice(&[1; 32]);
    assert_eq!(server.handle(&req), Err(DropReason::NtsMalformed));
    // No authenticator: header, UID, cookie only.
    let req = nts_request(&keys, &cookies[0], &[1; 32], 0, 0, &[]);
    let no_auth = &req[..48 + 36 + 104];
    assert_eq!(server.handle(no_auth), Err(DropReason::NtsMalformed));
    // Malformed encrypted fields (authentic, but not fields).
    let req = nts_request(&keys, &cookies[0], &[1; 32], 0, 0, &[0xFF; 8]);
    assert_eq!(server.handle(&req), Err(DropReason::NtsMalformed));
    assert_eq!(server.responder.counters().dropped(DropReason::NtsMalformed), 4);
}

#[test]
fn without_key_ring_or_nonce_source() {
    let ring = ring();
    let (keys, cookies) = key_exchange(&[15], &ring);
    let req = nts_request(&keys, &cookies[0], &[1; 32], 0, 0, &[]);
    // NTS off: the fields are ignored like any unknown field.
    let mut server = Server::new(ring.clone());
    server.ring = None;
    assert_eq!(server.handle(&req).unwrap().len(), 48);
    // NTS on but no nonce source installed.
    let mut server = Server::new(ring);
    let rate_limit = RateLimitConfig { enabled: false, ..RateLimitConfig::default() };
    server.responder = Responder::new(ResponderConfig { rate_limit, ..ResponderConfig::default() }, 1);
    assert_eq!(server.handle(&req), Err(DropReason::NtsNoNonceSource));
}

#[test]
fn nonce_source_is_a_trait_the_server_implements() {
    #[derive(Debug)]
    struct Counter(u8);
    impl NonceSource for Counter {
        fn fill(&mut self, out: &mut [u8]) {
            self.0 = self.0.wrapping_add(1);
            out.fill(self.0);
        }
    }
    let ring = ring();
    let (keys, cookies) = key_exchange(&[15], &ring);
    let mut server = Server::new(ring);
    server.responder.set_nonce_source(Box::new(Counter(0)));
    let req = nts_request(&keys, &cookies[0], &[1; 32], 0, 0, &[]);
    let reply = server.handle(&req).unwrap();
    client_check(&keys, &req, &reply, &[1; 32]);
}
