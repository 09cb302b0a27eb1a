//! The socket backend end to end on loopback: real sockets, real workers,
//! a client built from `chime_proto::packet::Header`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chime_proto::acl::Acl;
use chime_proto::packet::{HEADER_LEN, Header, LeapIndicator, Mode, RefId};
use chime_proto::ratelimit::{RateLimitConfig, RateLimiter, RateVerdict};
use chime_proto::rng::Probability;
use chime_proto::{ClockSnapshot, DropReason, KissCode, NtpShort, NtpTimestamp, ResponderConfig};
use chime_server::shared::Shared;
use chime_server::socket_backend::{BackendError, SocketBackend, SocketBackendConfig, start};
use chime_server::stats::{WorkerSnapshot, WorkerStats};
use chime_server::sys::udp::steering_index;
use chime_server::time::now_ntp;

const REF_ID: RefId = RefId([192, 0, 2, 1]);
const TIMEOUT: Duration = Duration::from_secs(2);

fn synchronized_clock() -> ClockSnapshot {
    let now = now_ntp();
    ClockSnapshot {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 2,
        reference_id: REF_ID,
        reference_time: now.add_secs(-16.0),
        root_delay: 0.012,
        root_dispersion: 0.001,
        precision: -22,
        updated_at: now,
        smear: None,
    }
}

/// A free UDP port on `ip` (bound and released; the backend then binds
/// several sockets to it).
fn free_port(ip: IpAddr) -> u16 {
    UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap().local_addr().unwrap().port()
}

struct Server {
    shared: Arc<Shared>,
    backend: Option<SocketBackend>,
    addr: SocketAddr,
}

impl Server {
    fn start(ip: IpAddr, workers: usize, responder: ResponderConfig) -> Self {
        let stats = (0..workers).map(|i| Arc::new(WorkerStats::new(i, None))).collect();
        let shared = Arc::new(Shared::new(synchronized_clock(), Acl::default(), stats));
        let addr = SocketAddr::new(ip, free_port(ip));
        let cfg = SocketBackendConfig {
            listen: vec![addr],
            workers,
            cores: Vec::new(),
            batch_size: 32,
            responder,
            ..SocketBackendConfig::default()
        };
        let backend = start(cfg, Arc::clone(&shared)).expect("backend starts");
        assert_eq!(backend.listeners()[0].addr, addr);
        assert!(backend.listeners()[0].client_steering);
        Self { shared, backend: Some(backend), addr }
    }

    fn snapshots(&self) -> Vec<WorkerSnapshot> {
        self.shared.workers.iter().map(|w| w.snapshot()).collect()
    }

    /// Waits (bounded) until `cond` holds for the workers' counters.
    fn wait_stats(&self, cond: impl Fn(&[WorkerSnapshot]) -> bool) -> Vec<WorkerSnapshot> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let s = self.snapshots();
            if cond(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sets the shutdown flag and checks the workers finish promptly.
    fn shutdown(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        let backend = self.backend.take().unwrap();
        let started = Instant::now();
        backend.join().expect("workers exit cleanly");
        assert!(started.elapsed() < Duration::from_secs(1), "join took {:?}", started.elapsed());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
    }
}

fn client(ip: IpAddr) -> UdpSocket {
    let c = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    c
}

fn request(mode: Mode, version: u8, transmit: NtpTimestamp) -> [u8; HEADER_LEN] {
    let h = Header {
        leap: LeapIndicator::Unsynchronized,
        version,
        mode,
        stratum: 0,
        poll: 6,
        precision: -20,
        root_delay: NtpShort::ZERO,
        root_dispersion: NtpShort::ZERO,
        reference_id: RefId::default(),
        reference_ts: NtpTimestamp::ZERO,
        origin_ts: NtpTimestamp::ZERO,
        receive_ts: NtpTimestamp::ZERO,
        transmit_ts: transmit,
    };
    let mut buf = [0u8; HEADER_LEN];
    h.write(&mut buf);
    buf
}

/// Sends one request and returns the reply's header and length.
fn exchange(c: &UdpSocket, to: SocketAddr, version: u8, transmit: NtpTimestamp) -> (Header, usize) {
    c.send_to(&request(Mode::Client, version, transmit), to).unwrap();
    let mut buf = [0u8; 256];
    let (n, from) = c.recv_from(&mut buf).expect("a reply");
    assert_eq!(from, to);
    (Header::parse(&buf[..n]).unwrap(), n)
}

fn check_time_reply(reply: &Header, len: usize, version: u8, transmit: NtpTimestamp) {
    assert_eq!(len, HEADER_LEN);
    assert_eq!(reply.mode, Mode::Server);
    assert_eq!(reply.version, version);
    assert_eq!(reply.leap, LeapIndicator::NoWarning);
    assert_eq!(reply.stratum, 2);
    assert_eq!(reply.reference_id, REF_ID);
    assert_eq!(reply.origin_ts, transmit);
    assert!(reply.transmit_ts.wrapping_diff(reply.receive_ts) >= 0, "receive after transmit: {reply:?}");
    assert!(reply.receive_ts.wrapping_diff(transmit) >= 0, "receive before the request was made: {reply:?}");
}

#[test]
fn answers_a_client_request() {
    let mut server = Server::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 2, ResponderConfig::default());
    let c = client(IpAddr::V4(Ipv4Addr::LOCALHOST));
    for version in [4, 3] {
        let t1 = now_ntp();
        let (reply, len) = exchange(&c, server.addr, version, t1);
        check_time_reply(&reply, len, version, t1);
    }
    let s = server.wait_stats(|s| s.iter().map(|w| w.counters.replies).sum::<u64>() == 2);
    assert_eq!(s.iter().map(|w| w.counters.replies).sum::<u64>(), 2);
    // Loopback datagrams carry kernel software stamps.
    assert_eq!(s.iter().map(|w| w.io[3]).sum::<u64>(), 0, "datagrams without a kernel timestamp");
    server.shutdown();
}

#[test]
fn mode6_is_dropped_and_counted() {
    let mut server = Server::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 2, ResponderConfig::default());
    let c = client(IpAddr::V4(Ipv4Addr::LOCALHOST));
    c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    c.send_to(&request(Mode::Control, 2, now_ntp()), server.addr).unwrap();
    let mut buf = [0u8; 256];
    let err = c.recv_from(&mut buf).expect_err("no reply to mode 6");
    assert!(matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{err}");
    let mode6 = |s: &[WorkerSnapshot]| s.iter().map(|w| w.counters.dropped(DropReason::Mode6)).sum::<u64>();
    let s = server.wait_stats(|s| mode6(s) == 1);
    assert_eq!(mode6(&s), 1);
    assert_eq!(s.iter().map(|w| w.counters.replies).sum::<u64>(), 0);
    server.shutdown();
}

#[test]
fn a_burst_gets_kod_rate() {
    let rate_limit = RateLimitConfig { burst: 5, capacity: 1024, ..RateLimitConfig::default() };
    // The rate limiter is being written elsewhere; until it limits, there is
    // nothing to see here.
    let mut probe = RateLimiter::new(&rate_limit, [1, 2]);
    let t = now_ntp();
    if !(0..100).any(|_| probe.check(IpAddr::V4(Ipv4Addr::LOCALHOST), t) == RateVerdict::Limited) {
        println!("skipped: this build's rate limiter never limits (placeholder)");
        return;
    }
    let responder = ResponderConfig { rate_limit, kod_probability: Probability::ALWAYS, ..ResponderConfig::default() };
    let mut server = Server::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 2, responder);
    let c = client(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let t1 = now_ntp();
    let total = 100;
    for _ in 0..total {
        c.send_to(&request(Mode::Client, 4, t1), server.addr).unwrap();
    }
    let (mut time, mut kod) = (0, 0);
    let mut buf = [0u8; 256];
    for _ in 0..total {
        let Ok(n) = c.recv(&mut buf) else { break };
        let h = Header::parse(&buf[..n]).unwrap();
        assert_eq!(h.origin_ts, t1);
        if h.stratum == 0 {
            assert_eq!(h.reference_id, RefId::RATE);
            assert_eq!(h.mode, Mode::Server);
            kod += 1;
        } else {
            time += 1;
        }
    }
    assert!(time <= 6, "{time} time replies past a burst of 5");
    assert!(kod >= 80, "only {kod} KoD RATE of {total}");
    let s = server.wait_stats(|s| s.iter().map(|w| w.counters.kod_sent(KissCode::Rate)).sum::<u64>() == kod);
    assert_eq!(s.iter().map(|w| w.counters.kod_sent(KissCode::Rate)).sum::<u64>(), kod);
    server.shutdown();
}

#[test]
fn ipv6_loopback() {
    if UdpSocket::bind("[::1]:0").is_err() {
        println!("skipped: IPv6 loopback unavailable");
        return;
    }
    let ip: IpAddr = "::1".parse().unwrap();
    let mut server = Server::start(ip, 2, ResponderConfig::default());
    let c = client(ip);
    let t1 = now_ntp();
    let (reply, len) = exchange(&c, server.addr, 4, t1);
    check_time_reply(&reply, len, 4, t1);
    server.shutdown();
}

#[test]
fn one_client_address_stays_on_one_worker() {
    // Many requests from one address: keep the rate limiter out of it.
    let rate_limit = RateLimitConfig { enabled: false, ..RateLimitConfig::default() };
    let responder = ResponderConfig { rate_limit, ..ResponderConfig::default() };
    let mut server = Server::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 2, responder);
    let ports = 40;
    for _ in 0..ports {
        let c = client(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let t1 = now_ntp();
        let (reply, len) = exchange(&c, server.addr, 4, t1);
        check_time_reply(&reply, len, 4, t1);
    }
    let received = |s: &[WorkerSnapshot]| s.iter().map(|w| w.counters.received).collect::<Vec<_>>();
    let s = server.wait_stats(|s| received(s).iter().sum::<u64>() == ports);
    let want = steering_index(IpAddr::V4(Ipv4Addr::LOCALHOST), 2);
    let mut expected = vec![0; 2];
    expected[want] = ports;
    assert_eq!(received(&s), expected, "requests from {ports} source ports of one address");

    // Other addresses go where the steering hash puts them.
    for i in 2..18u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, i));
        let before = received(&server.snapshots());
        let (reply, len) = exchange(&client(ip), server.addr, 4, now_ntp());
        assert_eq!((reply.stratum, len), (2, HEADER_LEN));
        let w = steering_index(ip, 2);
        let after = server.wait_stats(|s| received(s)[w] == before[w] + 1);
        assert_eq!(received(&after)[w], before[w] + 1, "{ip} did not reach worker {w}");
        assert_eq!(received(&after)[1 - w], before[1 - w], "{ip} reached worker {}", 1 - w);
    }
    server.shutdown();
}

#[test]
fn start_errors_name_the_problem() {
    // Something else (without SO_REUSEPORT) holds the port.
    let squatter = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = squatter.local_addr().unwrap();
    let stats = vec![Arc::new(WorkerStats::new(0, None))];
    let shared = Arc::new(Shared::new(synchronized_clock(), Acl::default(), stats));
    let cfg = SocketBackendConfig { listen: vec![addr], workers: 1, ..SocketBackendConfig::default() };
    match start(cfg.clone(), Arc::clone(&shared)) {
        Err(e @ BackendError::Bind { addr: a, .. }) => {
            assert_eq!(a, addr);
            assert!(e.to_string().contains(&addr.to_string()), "{e}");
        }
        other => panic!("expected a bind error, got {other:?}"),
    }
    let two = SocketBackendConfig { workers: 2, ..cfg.clone() };
    assert!(matches!(start(two, Arc::clone(&shared)), Err(BackendError::StatsMismatch { workers: 2, stats: 1 })));
    let none = SocketBackendConfig { listen: Vec::new(), ..cfg.clone() };
    assert!(matches!(start(none, Arc::clone(&shared)), Err(BackendError::NoListenAddress)));
    let dup = SocketBackendConfig { listen: vec![addr, addr], ..cfg };
    assert!(matches!(start(dup, shared), Err(BackendError::DuplicateListenAddress(_))));
}

#[test]
fn port_zero_binds_every_worker_to_one_port() {
    let stats = (0..3).map(|i| Arc::new(WorkerStats::new(i, None))).collect();
    let shared = Arc::new(Shared::new(synchronized_clock(), Acl::default(), stats));
    let cfg = SocketBackendConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        workers: 3,
        ..SocketBackendConfig::default()
    };
    let backend = start(cfg, Arc::clone(&shared)).unwrap();
    let addr = backend.listeners()[0].addr;
    assert_ne!(addr.port(), 0);
    let c = client(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let (reply, _) = exchange(&c, addr, 4, now_ntp());
    assert_eq!(reply.stratum, 2);
    shared.shutdown.store(true, Ordering::Relaxed);
    backend.join().unwrap();
}
