//! The responder's behaviour, request by request, with no network: time and
//! randomness are arguments, so every case is exact.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use chime_proto::acl::{Acl, AclAction, Cidr};
use chime_proto::packet::{Header, LeapIndicator, Mode, RefId};
use chime_proto::ratelimit::RateLimitConfig;
use chime_proto::rng::Probability;
use chime_proto::{
    Action, ClockSnapshot, Context, DenyResponse, DropReason, KissCode, NtpShort, NtpTimestamp, RequestMeta, Responder,
    ResponderConfig, RxTimestamp, StampKind, UnsyncPolicy,
};

const T0: i64 = 1_790_000_000; // 2026-09

fn synced_clock() -> ClockSnapshot {
    ClockSnapshot {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 1,
        reference_id: RefId(*b"GPS\0"),
        reference_time: NtpTimestamp::from_unix(T0 - 10, 0),
        root_delay: 0.000_5,
        root_dispersion: 0.001,
        precision: -23,
        updated_at: NtpTimestamp::from_unix(T0, 0),
        smear: None,
    }
}

fn request(version: u8, mode: u8, poll: i8, xmt: u64) -> [u8; 48] {
    let mut b = [0u8; 48];
    b[0] = (version << 3) | mode;
    b[2] = poll as u8;
    b[40..48].copy_from_slice(&xmt.to_be_bytes());
    b
}

fn meta(ip: IpAddr, port: u16, rx: NtpTimestamp) -> RequestMeta {
    RequestMeta { source: SocketAddr::new(ip, port), rx: RxTimestamp { time: rx, kind: StampKind::KernelSoftware } }
}

fn client() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))
}

struct Bed {
    responder: Responder,
    clock: ClockSnapshot,
    acl: Acl,
    out: [u8; 1024],
}

impl Bed {
    fn new(cfg: ResponderConfig) -> Self {
        Self { responder: Responder::new(cfg, 1), clock: synced_clock(), acl: Acl::default(), out: [0; 1024] }
    }

    fn no_limit() -> Self {
        let rate_limit = RateLimitConfig { enabled: false, ..RateLimitConfig::default() };
        Self::new(ResponderConfig { rate_limit, ..ResponderConfig::default() })
    }

    /// Handles `req` at `rx` with the transmit clock reading `tx`.
    fn handle_at(&mut self, req: &[u8], m: RequestMeta, tx: NtpTimestamp) -> Result<Vec<u8>, DropReason> {
        let ctx = Context { clock: &self.clock, acl: &self.acl, nts: None };
        match self.responder.handle(req, &m, &ctx, &mut || tx, &mut self.out) {
            Action::Reply(b) => Ok(b.to_vec()),
            Action::Drop(r) => Err(r),
        }
    }

    fn handle(&mut self, req: &[u8]) -> Result<Vec<u8>, DropReason> {
        let rx = NtpTimestamp::from_unix(T0 + 100, 250_000_000);
        self.handle_at(req, meta(client(), 40123, rx), rx.add_secs(0.000_01))
    }
}

#[test]
fn answers_a_v4_client() {
    let mut bed = Bed::no_limit();
    let rx = NtpTimestamp::from_unix(T0 + 100, 250_000_000);
    let tx = rx.add_secs(0.000_02);
    let reply = bed.handle_at(&request(4, 3, 6, 0x1122_3344_5566_7788), meta(client(), 123, rx), tx).unwrap();
    assert_eq!(reply.len(), 48);
    let h = Header::parse(&reply).unwrap();
    assert_eq!(h.mode, Mode::Server);
    assert_eq!(h.version, 4);
    assert_eq!(h.leap, LeapIndicator::NoWarning);
    assert_eq!(h.stratum, 1);
    assert_eq!(h.poll, 6);
    assert_eq!(h.precision, -23);
    assert_eq!(h.reference_id, RefId(*b"GPS\0"));
    assert_eq!(h.reference_ts, NtpTimestamp::from_unix(T0 - 10, 0));
    assert_eq!(h.origin_ts.to_bits(), 0x1122_3344_5566_7788);
    assert_eq!(h.receive_ts, rx);
    assert_eq!(h.transmit_ts, tx);
    assert_eq!(h.root_delay, NtpShort::from_secs_f64(0.000_5));
    // 100 s after the snapshot: 1 ms + 15 ppm * 100 s = 2.5 ms.
    let disp = h.root_dispersion.to_secs_f64();
    assert!((disp - 0.0025).abs() < 0.000_02, "{disp}");
    assert_eq!(bed.responder.counters().replies, 1);
    assert_eq!(bed.responder.counters().replies_stamped(StampKind::KernelSoftware), 1);
}

#[test]
fn echoes_versions_one_to_four() {
    let mut bed = Bed::no_limit();
    for v in 1..=4 {
        let reply = bed.handle(&request(v, 3, 6, 1)).unwrap();
        assert_eq!(Header::parse(&reply).unwrap().version, v);
    }
    for v in [0u8, 5, 6, 7] {
        assert_eq!(bed.handle(&request(v, 3, 6, 1)), Err(DropReason::BadVersion));
    }
    assert_eq!(bed.responder.counters().dropped(DropReason::BadVersion), 4);
}

#[test]
fn never_answers_other_modes() {
    let mut bed = Bed::no_limit();
    assert_eq!(bed.handle(&request(2, 6, 0, 1)), Err(DropReason::Mode6));
    assert_eq!(bed.handle(&request(2, 7, 0, 1)), Err(DropReason::Mode7));
    for mode in [0u8, 1, 2, 5] {
        assert_eq!(bed.handle(&request(4, mode, 6, 1)), Err(DropReason::NotClient));
    }
    // A server-mode packet with stratum 0 is a KoD (perhaps our own, reflected).
    assert_eq!(bed.handle(&request(4, 4, 6, 1)), Err(DropReason::KissOfDeath));
    let mut server = request(4, 4, 6, 1);
    server[1] = 2;
    assert_eq!(bed.handle(&server), Err(DropReason::NotClient));
    let c = bed.responder.counters();
    assert_eq!(c.received, 8);
    assert_eq!(c.replies, 0);
    assert_eq!(c.drops.iter().sum::<u64>(), 8);
}

#[test]
fn short_and_malformed_are_dropped() {
    let mut bed = Bed::no_limit();
    assert_eq!(bed.handle(&[0x23; 47]), Err(DropReason::TooShort));
    assert_eq!(bed.handle(&[]), Err(DropReason::TooShort));
    let mut long = [0u8; 48 + 10];
    long[0] = 0x23;
    assert_eq!(bed.handle(&long), Err(DropReason::MalformedExtension));
    let mut mac = [0u8; 48 + 20];
    mac[0] = 0x1B;
    mac[51] = 1;
    assert_eq!(bed.handle(&mac), Err(DropReason::LegacyMac));
}

#[test]
fn unknown_extension_fields_are_ignored_and_reply_is_plain() {
    let mut bed = Bed::no_limit();
    let mut req = vec![0u8; 48 + 16];
    req[..48].copy_from_slice(&request(4, 3, 6, 9));
    chime_proto::ext::write_extension_field(&mut req[48..], 0x7777, &[1, 2, 3]).unwrap();
    let reply = bed.handle(&req).unwrap();
    assert_eq!(reply.len(), 48);
}

#[test]
fn poll_is_clamped() {
    let mut bed = Bed::no_limit();
    let low = bed.handle(&request(4, 3, -6, 1)).unwrap();
    assert_eq!(Header::parse(&low).unwrap().poll, 4);
    let high = bed.handle(&request(4, 3, 30, 1)).unwrap();
    assert_eq!(Header::parse(&high).unwrap().poll, 17);
}

#[test]
fn unsynchronized_is_announced_or_silent() {
    let mut bed = Bed::no_limit();
    bed.clock.synchronized = false;
    let reply = bed.handle(&request(4, 3, 6, 1)).unwrap();
    let h = Header::parse(&reply).unwrap();
    assert_eq!(h.leap, LeapIndicator::Unsynchronized);
    assert_eq!(h.stratum, 16);

    let rate_limit = RateLimitConfig { enabled: false, ..RateLimitConfig::default() };
    let mut silent =
        Bed::new(ResponderConfig { unsynchronized: UnsyncPolicy::Silent, rate_limit, ..ResponderConfig::default() });
    silent.clock.synchronized = false;
    assert_eq!(silent.handle(&request(4, 3, 6, 1)), Err(DropReason::Unsynchronized));
}

#[test]
fn leap_second_is_announced() {
    let mut bed = Bed::no_limit();
    bed.clock.leap = LeapIndicator::InsertSecond;
    let reply = bed.handle(&request(4, 3, 6, 1)).unwrap();
    assert_eq!(Header::parse(&reply).unwrap().leap, LeapIndicator::InsertSecond);
}

#[test]
fn bad_sources_are_dropped() {
    let mut bed = Bed::no_limit();
    let rx = NtpTimestamp::from_unix(T0, 0);
    let req = request(4, 3, 6, 1);
    for (ip, port) in [
        (client(), 0),
        (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 123),
        (IpAddr::V4(Ipv4Addr::BROADCAST), 123),
        (IpAddr::V4(Ipv4Addr::new(224, 0, 1, 1)), 123),
        (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 123),
        (IpAddr::V6("ff02::101".parse().unwrap()), 123),
    ] {
        assert_eq!(bed.handle_at(&req, meta(ip, port, rx), rx), Err(DropReason::BadSource), "{ip} {port}");
    }
}

fn kod_code(reply: &[u8]) -> RefId {
    let h = Header::parse(reply).unwrap();
    assert_eq!(h.stratum, 0);
    assert_eq!(h.leap, LeapIndicator::Unsynchronized);
    assert_eq!(h.mode, Mode::Server);
    h.reference_id
}

#[test]
fn acl_deny_restrict_and_silence() {
    let mut bed = Bed::no_limit();
    bed.acl.insert("192.0.2.0/24".parse::<Cidr>().unwrap(), AclAction::Deny);
    bed.acl.insert("192.0.2.7/32".parse::<Cidr>().unwrap(), AclAction::Restrict);
    bed.acl.insert("2001:db8::/32".parse::<Cidr>().unwrap(), AclAction::Deny);
    let req = request(4, 3, 6, 0xABCD);
    let rx = NtpTimestamp::from_unix(T0, 0);

    let rstr = bed.handle(&req).unwrap();
    assert_eq!(kod_code(&rstr), RefId::RSTR);
    let denied_v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8));
    let deny = bed.handle_at(&req, meta(denied_v4, 5555, rx), rx).unwrap();
    assert_eq!(kod_code(&deny), RefId::DENY);
    // A KoD repeats the client's transmit timestamp and carries no time.
    let h = Header::parse(&deny).unwrap();
    assert_eq!(h.origin_ts.to_bits(), 0xABCD);
    assert_eq!(h.receive_ts.to_bits(), 0xABCD);
    assert_eq!(h.transmit_ts.to_bits(), 0xABCD);
    let denied_v6: IpAddr = "2001:db8:1::5".parse().unwrap();
    assert_eq!(kod_code(&bed.handle_at(&req, meta(denied_v6, 5555, rx), rx).unwrap()), RefId::DENY);
    let other: IpAddr = "198.51.100.1".parse().unwrap();
    assert!(bed.handle_at(&req, meta(other, 5555, rx), rx).is_ok());
    assert_eq!(bed.responder.counters().kod_sent(KissCode::Deny), 2);
    assert_eq!(bed.responder.counters().kod_sent(KissCode::Rstr), 1);

    let rate_limit = RateLimitConfig { enabled: false, ..RateLimitConfig::default() };
    let mut silent = Bed::new(ResponderConfig { deny: DenyResponse::Silent, rate_limit, ..ResponderConfig::default() });
    silent.acl = Acl::new(AclAction::Deny);
    assert_eq!(silent.handle(&req), Err(DropReason::Denied));
}

fn limited(burst: u32, kod: f64) -> Bed {
    let rate_limit = RateLimitConfig { burst, average_interval: 8.0, capacity: 1024, ..RateLimitConfig::default() };
    Bed::new(ResponderConfig {
        rate_limit,
        kod_probability: Probability::new(kod).unwrap(),
        ..ResponderConfig::default()
    })
}

#[test]
fn flood_from_one_source_gets_kod_rate() {
    let mut bed = limited(4, 1.0);
    let rx = NtpTimestamp::from_unix(T0, 0);
    let req = request(4, 3, 6, 77);
    let mut time = 0;
    let mut rate = 0;
    for i in 0..100 {
        let t = rx.add_secs(f64::from(i) * 0.01);
        let reply = bed.handle_at(&req, meta(client(), 40000, t), t).unwrap();
        if Header::parse(&reply).unwrap().stratum == 0 {
            assert_eq!(kod_code(&reply), RefId::RATE);
            rate += 1;
        } else {
            time += 1;
        }
    }
    assert_eq!(time, 4, "the burst is answered");
    assert_eq!(rate, 96);
    assert_eq!(bed.responder.counters().kod_sent(KissCode::Rate), 96);
    // Another client is unaffected.
    let other = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    let t = rx.add_secs(1.0);
    let reply = bed.handle_at(&req, meta(other, 40000, t), t).unwrap();
    assert_eq!(Header::parse(&reply).unwrap().stratum, 1);
}

#[test]
fn kod_probability_zero_drops_silently() {
    let mut bed = limited(2, 0.0);
    let rx = NtpTimestamp::from_unix(T0, 0);
    let req = request(4, 3, 6, 77);
    let results: Vec<_> = (0..10).map(|_| bed.handle_at(&req, meta(client(), 1234, rx), rx)).collect();
    assert!(results[..2].iter().all(Result::is_ok));
    assert!(results[2..].iter().all(|r| *r == Err(DropReason::RateLimited)));
}

#[test]
fn rate_limited_prefixes_are_counted_kod_or_silent() {
    let mut bed = limited(2, 0.5);
    let rx = NtpTimestamp::from_unix(T0, 0);
    let req = request(4, 3, 6, 77);
    for _ in 0..10 {
        let _ = bed.handle_at(&req, meta(client(), 1234, rx), rx);
    }
    // A neighbour in the same /24, within its burst: not counted.
    let _ = bed.handle_at(&req, meta(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99)), 1, rx), rx);
    let top = bed.responder.rate_limited();
    assert_eq!(top.total(), 8);
    assert_eq!(top.entries().len(), 1);
    let first = top.entries().next().unwrap();
    assert_eq!((first.prefix.to_string(), first.count), ("192.0.2.0/24".to_owned(), 8));
    let c = bed.responder.counters();
    assert_eq!(c.kod_sent(KissCode::Rate) + c.dropped(DropReason::RateLimited), 8);
    bed.responder.clear_rate_limited();
    assert_eq!(bed.responder.rate_limited().total(), 0);
}

#[test]
fn kod_probability_is_honoured_roughly() {
    let mut bed = limited(1, 0.25);
    let rx = NtpTimestamp::from_unix(T0, 0);
    let req = request(4, 3, 6, 77);
    let kods = (0..4000).filter(|_| bed.handle_at(&req, meta(client(), 1234, rx), rx).is_ok()).count() - 1;
    assert!((800..1200).contains(&kods), "{kods}");
}

#[test]
fn tiny_output_buffer_is_a_counted_drop() {
    let mut responder = Responder::new(ResponderConfig::default(), 3);
    let clock = synced_clock();
    let acl = Acl::default();
    let ctx = Context { clock: &clock, acl: &acl, nts: None };
    let rx = NtpTimestamp::from_unix(T0, 0);
    let mut out = [0u8; 47];
    let action = responder.handle(&request(4, 3, 6, 1), &meta(client(), 9, rx), &ctx, &mut || rx, &mut out);
    assert_eq!(action, Action::Drop(DropReason::BufferTooSmall));
}

#[test]
fn transmit_clock_is_read_once_per_time_reply_only() {
    let mut responder = Responder::new(ResponderConfig::default(), 3);
    let clock = synced_clock();
    let acl = Acl::default();
    let ctx = Context { clock: &clock, acl: &acl, nts: None };
    let rx = NtpTimestamp::from_unix(T0, 0);
    let mut reads = 0;
    let mut out = [0u8; 64];
    let mut tx = || {
        reads += 1;
        rx
    };
    let _ = responder.handle(&request(4, 3, 6, 1), &meta(client(), 9, rx), &ctx, &mut tx, &mut out);
    let _ = responder.handle(&request(4, 6, 6, 1), &meta(client(), 9, rx), &ctx, &mut tx, &mut out);
    assert_eq!(reads, 1);
}

#[test]
fn reconfigure_applies_new_limits_and_keeps_clients_and_counters() {
    let mut bed = limited(4, 1.0);
    let rx = NtpTimestamp::from_unix(T0, 0);
    let req = request(4, 3, 6, 77);
    let stratum_of = |r: &[u8]| Header::parse(r).unwrap().stratum;
    // Exhaust the client's burst of 4.
    for i in 0..6 {
        let t = rx.add_secs(f64::from(i) * 0.001);
        bed.handle_at(&req, meta(client(), 40000, t), t).unwrap();
    }
    let received = bed.responder.counters().received;
    assert_eq!(received, 6);

    // Rate limiting off, poll range narrowed: the same client is answered
    // at once, with the new clamp, and the counters go on.
    let mut cfg = bed.responder.config().clone();
    cfg.rate_limit.enabled = false;
    cfg.max_poll = 5;
    bed.responder.reconfigure(&cfg);
    let t = rx.add_secs(0.01);
    let reply = bed.handle_at(&req, meta(client(), 40000, t), t).unwrap();
    assert_eq!(stratum_of(&reply), 1);
    assert_eq!(Header::parse(&reply).unwrap().poll, 5, "max_poll applied");
    assert_eq!(bed.responder.counters().received, received + 1);

    // On again with the old burst: the client is still remembered as
    // having used its burst (state kept across the reload), so it gets
    // KoD RATE, while a new client gets its full burst.
    cfg.rate_limit.enabled = true;
    cfg.max_poll = 17;
    bed.responder.reconfigure(&cfg);
    let t = rx.add_secs(0.02);
    let reply = bed.handle_at(&req, meta(client(), 40000, t), t).unwrap();
    assert_eq!(kod_code(&reply), RefId::RATE, "the limited client stays limited");
    let other = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    let reply = bed.handle_at(&req, meta(other, 40000, t), t).unwrap();
    assert_eq!(stratum_of(&reply), 1);

    // Deny response switched from KoD to silence takes effect too.
    let mut acl = Acl::default();
    acl.insert("203.0.113.0/24".parse::<Cidr>().unwrap(), AclAction::Deny);
    bed.acl = acl;
    assert_eq!(kod_code(&bed.handle_at(&req, meta(other, 40000, t), t).unwrap()), RefId::DENY);
    cfg.deny = DenyResponse::Silent;
    bed.responder.reconfigure(&cfg);
    assert_eq!(bed.handle_at(&req, meta(other, 40000, t), t), Err(DropReason::Denied));
}
