//! chime-load end to end on loopback, against a tiny in-test NTP server
//! built from `chime_proto::Responder` (plain, optionally rate-capped, and
//! NTS with an in-test NTS-KE TLS server). Every server thread stops on a
//! flag and every run is bounded by chime-load's own duration.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chime_proto::acl::Acl;
use chime_proto::nts::ke::{self, Direction, KeLimits, KeRequestParser, KeResponse, Negotiated};
use chime_proto::nts::{AesCtrNonces, KeyRing, MasterKey, SessionKeys};
use chime_proto::packet::{LeapIndicator, RefId};
use chime_proto::ratelimit::RateLimitConfig;
use chime_proto::{
    Action, ClockSnapshot, Context, NtpTimestamp, RequestMeta, Responder, ResponderConfig, RxTimestamp, StampKind,
};

fn now() -> NtpTimestamp {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    NtpTimestamp::from_unix(d.as_secs() as i64, d.subsec_nanos())
}

/// A UDP NTP server thread; stopped and joined on drop.
struct TestServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Answers everything up to `cap` requests per second (None: no cap),
    /// with NTS when `ring` is given.
    fn start(cap: Option<u64>, ring: Option<KeyRing>) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let rate_limit = RateLimitConfig { enabled: false, ..RateLimitConfig::default() };
            let mut responder = Responder::new(ResponderConfig { rate_limit, ..ResponderConfig::default() }, 7);
            responder.set_nonce_source(Box::new(AesCtrNonces::new(&[5; 32])));
            let acl = Acl::default();
            let mut buf = [0u8; 2048];
            let mut out = [0u8; 2048];
            let mut window = (Instant::now(), 0u64);
            while !flag.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                if let Some(cap) = cap {
                    if window.0.elapsed() >= Duration::from_secs(1) {
                        window = (Instant::now(), 0);
                    }
                    window.1 += 1;
                    if window.1 > cap {
                        continue;
                    }
                }
                let rx = now();
                let clock = ClockSnapshot {
                    synchronized: true,
                    leap: LeapIndicator::NoWarning,
                    stratum: 2,
                    reference_id: RefId([127, 0, 0, 1]),
                    reference_time: rx,
                    root_delay: 0.0,
                    root_dispersion: 0.001,
                    precision: -20,
                    updated_at: rx,
                    smear: None,
                };
                let ctx = Context { clock: &clock, acl: &acl, nts: ring.as_ref() };
                let meta = RequestMeta { source: from, rx: RxTimestamp { time: rx, kind: StampKind::Userspace } };
                if let Action::Reply(r) = responder.handle(&buf[..n], &meta, &ctx, &mut now, &mut out) {
                    let _ = sock.send_to(r, from);
                }
            }
        });
        Self { addr, stop, thread: Some(thread) }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("chime-load-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn chime_load(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_chime-load")).args(args).arg("--no-progress").output().unwrap();
    eprintln!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn json(path: &PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn fixed_rate_is_answered() {
    let server = TestServer::start(None, None);
    let dir = scratch("fixed");
    let report = dir.join("r.json");
    let plot = dir.join("r.svg");
    let target = server.addr.to_string();
    let out = chime_load(&[
        &target,
        "--rate",
        "1000",
        "--duration",
        "2",
        "--clients",
        "4",
        "--threads",
        "2",
        "--json",
        report.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let v = json(&report);
    let s = &v["steps"][0];
    let sent = s["sent"].as_u64().unwrap();
    assert!((1980..=2020).contains(&sent), "sent {sent}");
    let valid = s["valid"].as_u64().unwrap();
    assert!(valid as f64 >= 0.99 * sent as f64, "valid {valid} of {sent}");
    assert_eq!(s["rtt"]["count"].as_u64().unwrap(), valid);
    assert!(s["rtt"]["p50_us"].as_f64().unwrap() > 0.0);
    assert!(s["residence"]["p99_us"].as_f64().unwrap() > 0.0);
    assert_eq!(v["highest_rate_below_threshold"], 1000.0);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("p99.9") && stdout.contains("loss"), "{stdout}");
}

#[test]
fn silent_target_is_an_error() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap(); // never reads
    let target = silent.local_addr().unwrap().to_string();
    let out = chime_load(&[&target, "--rate", "200", "--duration", "0.5", "--timeout", "0.3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("answered none of"));
    // A closed port: ICMP port unreachable, counted and named.
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = chime_load(&[&format!("127.0.0.1:{port}"), "--rate", "200", "--duration", "0.5", "--timeout", "0.3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ICMP port unreachable"));
    // Bad arguments and an unresolvable name are usage errors.
    assert_eq!(chime_load(&["127.0.0.1", "--rate", "0"]).status.code(), Some(2));
    assert_eq!(chime_load(&["no-such-host.invalid"]).status.code(), Some(2));
    assert_eq!(chime_load(&["127.0.0.1", "--xdp", "lo"]).status.code(), Some(2));
}

#[test]
fn adversarial_kinds_are_counted_and_unanswered() {
    let server = TestServer::start(None, None);
    let dir = scratch("adv");
    let report = dir.join("r.json");
    let target = server.addr.to_string();
    let out = chime_load(&[
        &target,
        "--kind",
        "adversarial",
        "--rate",
        "800",
        "--duration",
        "1",
        "--clients",
        "3",
        "--timeout",
        "0.3",
        "--json",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let v = json(&report);
    let adv = &v["steps"][0]["adversarial"];
    for kind in ["short", "malformed", "mode6", "mode7", "version0", "version5", "server_mode", "flood"] {
        assert!(adv[kind]["sent"].as_u64().unwrap() > 0, "{kind} sent");
        if kind != "flood" {
            assert_eq!(adv[kind]["replies"].as_u64().unwrap(), 0, "{kind} answered");
        }
    }
    // This test server has no rate limiter: the flood is answered.
    assert!(adv["flood"]["replies"].as_u64().unwrap() > 0);
    assert_eq!(v["steps"][0]["expecting"], 0);
}

#[test]
fn interleaved_requests_get_basic_replies_from_a_basic_server() {
    let server = TestServer::start(None, None);
    let dir = scratch("il");
    let report = dir.join("r.json");
    let target = server.addr.to_string();
    let out = chime_load(&[
        &target,
        "--kind",
        "interleaved",
        "--rate",
        "300",
        "--duration",
        "1",
        "--json",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let s = &json(&report)["steps"][0];
    assert!(s["interleaved_basic"].as_u64().unwrap() >= 290);
    assert_eq!(s["interleaved_interleaved"], 0);
}

#[test]
fn ramp_stops_at_the_threshold() {
    let server = TestServer::start(Some(3000), None);
    let dir = scratch("ramp");
    let report = dir.join("r.json");
    let plot = dir.join("r.svg");
    let target = server.addr.to_string();
    let out = chime_load(&[
        &target,
        "--ramp",
        "--rate",
        "1000",
        "--ramp-factor",
        "1.5",
        "--step-secs",
        "1",
        "--timeout",
        "0.3",
        "--max-steps",
        "8",
        "--json",
        report.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let v = json(&report);
    let highest = v["highest_rate_below_threshold"].as_f64().unwrap();
    assert!((1000.0..3001.0).contains(&highest), "highest {highest}");
    let steps = v["steps"].as_array().unwrap();
    let last = steps.last().unwrap();
    assert!(last["loss"].as_f64().unwrap() >= 0.01, "stopped on loss");
    assert!(steps.len() >= 2 && steps.len() <= 5, "{} steps", steps.len());
    assert!(String::from_utf8_lossy(&out.stdout).contains("highest rate with loss"));
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<polyline"));
}

/// A one-thread NTS-KE server (TLS 1.3, ALPN ntske/1) handing out cookies
/// under `ring`; serves at most `max` connections.
fn nts_ke_server(ring: KeyRing, max: usize) -> (SocketAddr, PathBuf, JoinHandle<()>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = scratch("ke");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    cfg.alpn_protocols = vec![ke::ALPN.to_vec()];
    let cfg = Arc::new(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(tcp) = stream else { continue };
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut parser = KeRequestParser::new(KeLimits::default());
            let mut buf = [0u8; 1024];
            let req = loop {
                let n = tls.read(&mut buf).unwrap();
                assert!(n > 0, "client closed early");
                if let Some(r) = parser.push(&buf[..n]).unwrap() {
                    break r;
                }
            };
            let outcome = req.negotiate();
            let Ok(Negotiated::Ntpv4(aead)) = outcome else { panic!("{outcome:?}") };
            let mut c2s = vec![0u8; aead.key_len()];
            let mut s2c = vec![0u8; aead.key_len()];
            let label = ke::EXPORTER_LABEL.as_bytes();
            let ctx = ke::exporter_context(aead, Direction::C2S);
            tls.conn.export_keying_material(c2s.as_mut_slice(), label, Some(&ctx)).unwrap();
            let ctx = ke::exporter_context(aead, Direction::S2C);
            tls.conn.export_keying_material(s2c.as_mut_slice(), label, Some(&ctx)).unwrap();
            let keys = SessionKeys::new(aead, &c2s, &s2c).unwrap();
            let mut out = Vec::new();
            KeResponse::for_outcome(outcome, &keys, None, None).write(
                &ring,
                &mut AesCtrNonces::new(&[1; 32]),
                &mut out,
            );
            tls.write_all(&out).unwrap();
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    (addr, ca, t)
}

#[test]
fn nts_end_to_end() {
    let ring = KeyRing::new(MasterKey::new(1, [0xA5; 16]), 3, 1_790_000_000);
    let server = TestServer::start(None, Some(ring.clone()));
    let (ke_addr, ca, ke_thread) = nts_ke_server(ring, 2);
    let dir = scratch("nts");
    let report = dir.join("r.json");
    let target = server.addr.to_string();
    let out = chime_load(&[
        &target,
        "--nts",
        "--nts-ke-port",
        &ke_addr.port().to_string(),
        "--nts-ke-sessions",
        "2",
        "--ca",
        ca.to_str().unwrap(),
        "--rate",
        "400",
        "--duration",
        "1",
        "--clients",
        "3",
        "--json",
        report.to_str().unwrap(),
    ]);
    ke_thread.join().unwrap();
    assert!(out.status.success());
    let v = json(&report);
    let s = &v["steps"][0];
    let sent = s["sent"].as_u64().unwrap();
    let valid = s["valid"].as_u64().unwrap();
    assert!(sent >= 390, "sent {sent}");
    assert!(valid as f64 >= 0.99 * sent as f64, "valid {valid} of {sent}: {s}");
    assert!(s["nts_cookies"].as_u64().unwrap() >= valid);
    assert_eq!(s["nts_cookie_reuse"], 0);
    assert_eq!(v["kind"], "nts");
}
