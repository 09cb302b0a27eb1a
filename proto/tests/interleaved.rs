//! Interleaved client/server mode (RFC 9769) against an in-memory client
//! that follows the RFC (as chronyd's `xleave` does), with simulated clocks:
//! the server runs `OFFSET` ahead of the client, the network is symmetric,
//! and the server's software transmit time (taken just before sending) is
//! `TX_LATE` earlier than the precise transmit stamp fed back later.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use chime_proto::acl::Acl;
use chime_proto::packet::{Header, LeapIndicator, Mode, RefId};
use chime_proto::ratelimit::RateLimitConfig;
use chime_proto::{
    Action, ClockSnapshot, Context, NtpTimestamp, RequestMeta, Responder, ResponderConfig, RxTimestamp, StampKind,
};

const T0: i64 = 1_790_000_000;
/// Server clock minus client clock.
const OFFSET: f64 = 0.5;
/// One-way network delay.
const DELAY: f64 = 0.001;
/// From receive to the software transmit timestamp.
const PROCESS: f64 = 0.000_020;
/// From the software transmit timestamp to the datagram really leaving.
const TX_LATE: f64 = 0.000_030;

fn clock() -> ClockSnapshot {
    ClockSnapshot {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 1,
        reference_id: RefId(*b"GPS\0"),
        reference_time: NtpTimestamp::from_unix(T0 - 10, 0),
        root_delay: 0.0,
        root_dispersion: 0.0,
        precision: -23,
        updated_at: NtpTimestamp::from_unix(T0, 0),
        smear: None,
    }
}

struct Server {
    responder: Responder,
    clock: ClockSnapshot,
    acl: Acl,
    /// Feed precise transmit stamps back (false: the transport gives none).
    feed_tx: bool,
}

impl Server {
    fn new(capacity: usize) -> Self {
        let rate_limit = RateLimitConfig { enabled: false, ..RateLimitConfig::default() };
        let cfg = ResponderConfig { rate_limit, interleaved_capacity: capacity, ..ResponderConfig::default() };
        Self { responder: Responder::new(cfg, 3), clock: clock(), acl: Acl::default(), feed_tx: true }
    }

    /// Answers `req` arriving at server time `rx` from `port`; returns the
    /// reply and the server time it really left.
    fn answer(&mut self, req: &[u8; 48], rx: NtpTimestamp, port: u16) -> Option<([u8; 48], NtpTimestamp)> {
        let ctx = Context { clock: &self.clock, acl: &self.acl, nts: None };
        let meta = RequestMeta {
            source: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)), port),
            rx: RxTimestamp { time: rx, kind: StampKind::KernelSoftware },
        };
        let mut out = [0u8; 48];
        let sw_tx = rx.add_secs(PROCESS);
        let reply = match self.responder.handle(req, &meta, &ctx, &mut || sw_tx, &mut out) {
            Action::Reply(r) => <[u8; 48]>::try_from(r).ok()?,
            Action::Drop(_) => return None,
        };
        let stamps = self.responder.last_reply().expect("a time reply");
        assert_eq!(stamps.tx, sw_tx);
        let wire = sw_tx.add_secs(TX_LATE);
        if self.feed_tx {
            self.responder.record_tx(stamps.rx, wire);
        }
        Some((reply, wire))
    }
}

/// An RFC 9769 client: after a valid response, its next request carries
/// origin = the response's receive timestamp (T2), receive = its own
/// receive time of that response (T4).
#[derive(Default)]
struct Client {
    /// (T1, T2, T4) of the previous exchange.
    prev: Option<(NtpTimestamp, NtpTimestamp, NtpTimestamp)>,
    interleaved_samples: u32,
    basic_samples: u32,
    last_offset: f64,
}

impl Client {
    fn request(&self, t1: NtpTimestamp) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0] = (4 << 3) | 3;
        if let Some((_, t2, t4)) = self.prev {
            b[24..32].copy_from_slice(&t2.to_bits().to_be_bytes());
            b[32..40].copy_from_slice(&t4.to_bits().to_be_bytes());
        }
        b[40..48].copy_from_slice(&t1.to_bits().to_be_bytes());
        b
    }

    /// Takes the response to the request sent at `t1`, received at `t4`.
    fn response(&mut self, reply: &[u8; 48], t1: NtpTimestamp, t4: NtpTimestamp) {
        let h = Header::parse(reply).unwrap();
        assert_eq!(h.mode, Mode::Server);
        let interleaved = matches!(self.prev, Some((_, _, prev_t4)) if h.origin_ts == prev_t4);
        if interleaved {
            // Offset from the previous exchange, with the precise T3'.
            let (p1, p2, p4) = self.prev.unwrap();
            self.last_offset = (p2.diff_secs(p1) + h.transmit_ts.diff_secs(p4)) / 2.0;
            self.interleaved_samples += 1;
        } else {
            assert_eq!(h.origin_ts, t1, "a basic response echoes our transmit timestamp");
            self.last_offset = (h.receive_ts.diff_secs(t1) + h.transmit_ts.diff_secs(t4)) / 2.0;
            self.basic_samples += 1;
        }
        self.prev = Some((t1, h.receive_ts, t4));
    }
}

/// One exchange at client time `t1`.
fn exchange(server: &mut Server, client: &mut Client, t1: NtpTimestamp) {
    let req = client.request(t1);
    let rx = t1.add_secs(DELAY + OFFSET);
    let (reply, wire) = server.answer(&req, rx, 40_000).expect("answered");
    let t4 = wire.add_secs(DELAY - OFFSET);
    client.response(&reply, t1, t4);
}

fn start() -> NtpTimestamp {
    NtpTimestamp::from_unix(T0 + 100, 0)
}

#[test]
fn client_in_interleaved_mode_gets_the_precise_transmit_time() {
    let mut server = Server::new(1024);
    let mut client = Client::default();
    for i in 0..8 {
        exchange(&mut server, &mut client, start().add_secs(f64::from(i) * 2.0));
    }
    assert_eq!(client.basic_samples, 1, "only the first exchange is basic");
    assert_eq!(client.interleaved_samples, 7);
    assert!((client.last_offset - OFFSET).abs() < 1e-8, "exact offset: {}", client.last_offset);
    let c = server.responder.counters();
    assert_eq!((c.replies, c.interleaved_replies, c.interleaved_hits, c.interleaved_misses), (8, 7, 7, 0));
    assert_eq!((c.tx_stamps_matched, c.tx_stamps_unmatched), (8, 0));
    let s = server.responder.interleave_stats();
    assert_eq!((s.capacity, s.occupied, s.memory_bytes), (1024, 8, 1024 * 16 + 256));
}

#[test]
fn basic_mode_is_off_by_the_late_transmit_and_unchanged_by_the_table() {
    // A basic client (origin and receive zero) gets the same reply from a
    // responder with and without the table.
    let mut with = Server::new(1024);
    let mut without = Server::new(0);
    let req = Client::default().request(start());
    let rx = start().add_secs(DELAY + OFFSET);
    let (a, _) = with.answer(&req, rx, 1).unwrap();
    let (b, _) = without.answer(&req, rx, 1).unwrap();
    assert_eq!(a, b);
    assert_eq!(with.responder.counters().interleaved_misses, 0);
    // Its offset carries half the transmit error.
    let mut client = Client::default();
    exchange(&mut without, &mut client, start());
    assert!((client.last_offset - (OFFSET - TX_LATE / 2.0)).abs() < 1e-8, "{}", client.last_offset);
}

#[test]
fn with_interleaving_off_a_client_stays_in_basic_mode() {
    let mut server = Server::new(0);
    let mut client = Client::default();
    for i in 0..4 {
        exchange(&mut server, &mut client, start().add_secs(f64::from(i)));
    }
    assert_eq!((client.basic_samples, client.interleaved_samples), (4, 0));
    assert_eq!(server.responder.counters().interleaved_replies, 0);
    assert_eq!(server.responder.interleave_stats().capacity, 0);
    // record_tx is a no-op.
    assert_eq!(server.responder.counters().tx_stamps_matched, 0);
}

#[test]
fn unknown_or_evicted_origin_falls_back_to_basic() {
    let mut server = Server::new(4);
    let mut client = Client::default();
    exchange(&mut server, &mut client, start());
    // Other clients push our T2 out of the 4-entry table.
    for i in 0..64u16 {
        let other = Client::default().request(start().add_secs(0.1));
        server.answer(&other, start().add_secs(0.2 + f64::from(i) * 1e-3), 2000 + i).unwrap();
    }
    exchange(&mut server, &mut client, start().add_secs(2.0));
    assert_eq!((client.basic_samples, client.interleaved_samples), (2, 0));
    let c = server.responder.counters();
    assert_eq!(c.interleaved_misses, 1);
    assert!(c.interleaved_evictions >= 60, "{c:?}");
    // And the next exchange is interleaved again.
    exchange(&mut server, &mut client, start().add_secs(4.0));
    assert_eq!(client.interleaved_samples, 1);
}

#[test]
fn without_precise_stamps_interleaved_replies_carry_the_software_time() {
    let mut server = Server::new(64);
    server.feed_tx = false;
    let mut client = Client::default();
    for i in 0..3 {
        exchange(&mut server, &mut client, start().add_secs(f64::from(i)));
    }
    assert_eq!(client.interleaved_samples, 2);
    // The same error as basic mode, no worse.
    assert!((client.last_offset - (OFFSET - TX_LATE / 2.0)).abs() < 1e-8, "{}", client.last_offset);
}

#[test]
fn receive_equal_to_transmit_is_not_interleaved_and_t2_stays_unique() {
    let mut server = Server::new(64);
    let mut client = Client::default();
    exchange(&mut server, &mut client, start());
    let (_, t2, _) = client.prev.unwrap();
    // Request with origin = a known T2 but receive == transmit: basic.
    let mut req = client.request(start().add_secs(1.0));
    req.copy_within(40..48, 32);
    let (reply, _) = server.answer(&req, start().add_secs(1.5), 40_000).unwrap();
    let h = Header::parse(&reply).unwrap();
    assert_eq!(h.origin_ts.to_bits().to_be_bytes(), req[40..48]);
    // A request arriving with the very same receive time as a remembered
    // reply gets a distinct T2.
    let again = Client::default().request(start());
    let (reply, _) = server.answer(&again, t2, 40_001).unwrap();
    let h = Header::parse(&reply).unwrap();
    assert_ne!(h.receive_ts, t2);
    assert_eq!(h.receive_ts.to_bits(), t2.to_bits() + 1);
}
