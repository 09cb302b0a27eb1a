//! Properties that must hold for every input: no panic, no amplification,
//! the origin always echoes the request, every packet counted exactly once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use chime_proto::acl::Acl;
use chime_proto::ext::{field_type, write_extension_field};
use chime_proto::nts::ke::{KeLimits, KeRequestParser};
use chime_proto::nts::{Aead, AesCtrNonces, COOKIE_LEN, KeyRing, MasterKey, SessionKeys, seal_cookie};
use chime_proto::packet::{Header, LeapIndicator, Packet, RefId};
use chime_proto::ratelimit::RateLimitConfig;
use chime_proto::{
    Action, ClockSnapshot, Context, NtpTimestamp, RequestMeta, Responder, ResponderConfig, RxTimestamp, StampKind,
};
use proptest::prelude::*;

fn clock(synchronized: bool) -> ClockSnapshot {
    ClockSnapshot {
        synchronized,
        leap: LeapIndicator::NoWarning,
        stratum: 2,
        reference_id: RefId([192, 0, 2, 1]),
        reference_time: NtpTimestamp::from_unix(1_790_000_000, 0),
        root_delay: 0.01,
        root_dispersion: 0.02,
        precision: -20,
        updated_at: NtpTimestamp::from_unix(1_790_000_000, 0),
        smear: None,
    }
}

fn any_source() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p)),
        (any::<u128>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p)),
    ]
}

/// Mostly well-formed client requests with random fields and random
/// trailers, plus raw garbage.
fn any_request() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        (any::<[u8; 48]>(), 0u8..8, 0u8..8, proptest::collection::vec(any::<u8>(), 0..120)).prop_map(
            |(mut h, v, m, tail)| {
                h[0] = (h[0] & 0xC0) | (v << 3) | m;
                let mut r = h.to_vec();
                r.extend_from_slice(&tail);
                r
            }
        ),
    ]
}

/// NTS-looking requests: a client header, then a random mix of NTS fields
/// (a valid cookie or garbage, UIDs and placeholders of random lengths, an
/// authenticator with random lengths and bytes, other fields), sometimes
/// truncated or with a byte flipped.
fn any_nts_request() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        (0usize..70).prop_map(|n| (field_type::UNIQUE_IDENTIFIER, vec![0xAB; n])),
        Just((field_type::NTS_COOKIE, Vec::new())), // replaced by a valid cookie
        proptest::collection::vec(any::<u8>(), 0..120).prop_map(|c| (field_type::NTS_COOKIE, c)),
        (0usize..130).prop_map(|n| (field_type::NTS_COOKIE_PLACEHOLDER, vec![0; n])),
        (any::<u16>(), any::<u16>(), proptest::collection::vec(any::<u8>(), 0..200)).prop_map(|(nl, cl, rest)| {
            let mut v = nl.min(40).to_be_bytes().to_vec();
            v.extend_from_slice(&cl.min(300).to_be_bytes());
            v.extend_from_slice(&rest);
            (field_type::NTS_AUTHENTICATOR, v)
        }),
        (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..40)),
    ];
    (
        any::<[u8; 48]>(),
        proptest::collection::vec(field, 0..8),
        any::<bool>(),
        any::<u16>(),
        any::<u8>(),
        any::<[u8; 12]>(),
    )
        .prop_map(|(mut h, fields, gcm, cut, flip, nonce)| {
            h[0] = 0x23;
            let mut out = vec![0u8; 4096];
            out[..48].copy_from_slice(&h);
            let mut at = 48;
            let aead = if gcm { Aead::GcmSiv128 } else { Aead::SivCmac256 };
            let keys = SessionKeys::new(aead, &[1; 32][..aead.key_len()], &[2; 32][..aead.key_len()]).unwrap();
            for (t, mut v) in fields {
                if t == field_type::NTS_COOKIE && v.is_empty() {
                    let mut c = [0u8; COOKIE_LEN];
                    seal_cookie(nts_ring().current(), &keys, &nonce, &mut c);
                    v = c.to_vec();
                }
                at += write_extension_field(&mut out[at..], t, &v).unwrap();
            }
            out.truncate(at);
            if cut % 4 == 0 && out.len() > 48 {
                out.truncate(48 + usize::from(cut) % (out.len() - 48));
            }
            if cut % 5 == 0 {
                let i = usize::from(cut) % out.len();
                out[i] ^= flip;
            }
            out
        })
}

fn nts_ring() -> KeyRing {
    KeyRing::new(MasterKey::new(7, [0x42; 16]), 2, 0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn nts_requests_never_panic_or_amplify(req in any_nts_request(), seed in any::<u64>()) {
        let rate_limit = RateLimitConfig { enabled: false, ..RateLimitConfig::default() };
        let mut r = Responder::new(ResponderConfig { rate_limit, ..ResponderConfig::default() }, seed);
        r.set_nonce_source(Box::new(AesCtrNonces::new(&[1; 32])));
        let clock = clock(true);
        let acl = Acl::default();
        let ring = nts_ring();
        let ctx = Context { clock: &clock, acl: &acl, nts: Some(&ring) };
        let source = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 123);
        let meta = RequestMeta { source, rx: RxTimestamp { time: NtpTimestamp::from_bits(seed), kind: StampKind::Userspace } };
        for out_len in [4096usize, 60] {
            let mut out = vec![0u8; out_len];
            if let Action::Reply(reply) = r.handle(&req, &meta, &ctx, &mut || NtpTimestamp::from_bits(seed), &mut out) {
                prop_assert!(reply.len() <= req.len(), "amplification: {} > {}", reply.len(), req.len());
                prop_assert!(reply.len() >= 48);
            }
        }
        let c = r.counters();
        prop_assert_eq!(c.replies + c.kod.iter().sum::<u64>() + c.drops.iter().sum::<u64>(), c.received);
    }

    #[test]
    fn ke_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), cuts in proptest::collection::vec(any::<u16>(), 0..6)) {
        let mut p = KeRequestParser::new(KeLimits { max_record_body: 256, max_request: 512 });
        let mut rest = &bytes[..];
        for c in cuts {
            let n = usize::from(c) % (rest.len() + 1);
            let _ = p.push(&rest[..n]);
            rest = &rest[n..];
        }
        let _ = p.push(rest);
        let _ = p.finish();
    }

    #[test]
    fn packet_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(p) = Packet::parse(&bytes) {
            for f in p.extension_fields() {
                prop_assert!(f.is_ok());
            }
        }
    }

    #[test]
    fn header_round_trips(bytes in any::<[u8; 48]>()) {
        let h = Header::parse(&bytes).unwrap();
        let mut out = [0u8; 48];
        h.write(&mut out);
        prop_assert_eq!(out, bytes);
    }

    #[test]
    fn responder_properties(
        req in any_request(),
        source in any_source(),
        rx_bits in any::<u64>(),
        tx_bits in any::<u64>(),
        synced in any::<bool>(),
        limit in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let rate_limit = RateLimitConfig { enabled: limit, burst: 1, capacity: 64, ..RateLimitConfig::default() };
        let mut r = Responder::new(ResponderConfig { rate_limit, ..ResponderConfig::default() }, seed);
        let clock = clock(synced);
        let acl = Acl::default();
        let ctx = Context { clock: &clock, acl: &acl, nts: None };
        let rx = RxTimestamp { time: NtpTimestamp::from_bits(rx_bits), kind: StampKind::Userspace };
        let meta = RequestMeta { source, rx };
        let mut out = [0u8; 2048];
        // Handle the same request twice so the limiter's limited path runs.
        for _ in 0..2 {
            match r.handle(&req, &meta, &ctx, &mut || NtpTimestamp::from_bits(tx_bits), &mut out) {
                Action::Reply(reply) => {
                    prop_assert!(reply.len() <= req.len(), "amplification: {} > {}", reply.len(), req.len());
                    prop_assert!(reply.len() >= 48);
                    let got = Header::parse(reply).unwrap();
                    let sent = Header::parse(&req).unwrap();
                    prop_assert_eq!(got.origin_ts, sent.transmit_ts);
                    prop_assert_eq!(got.version, sent.version);
                }
                Action::Drop(_) => {}
            }
        }
        let c = r.counters();
        let kods: u64 = c.kod.iter().sum();
        let drops: u64 = c.drops.iter().sum();
        prop_assert_eq!(c.received, 2);
        prop_assert_eq!(c.replies + kods + drops, c.received, "every packet counted once");
    }
}
