//! Properties that must hold for every input: no panic, no amplification,
//! the origin always echoes the request, every packet counted exactly once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use chime_proto::acl::Acl;
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

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
