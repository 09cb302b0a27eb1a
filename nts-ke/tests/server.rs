//! The NTS-KE server over loopback, against a rustls client, with test
//! certificates made by rcgen at test time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chime_nts_ke::{FailReason, NtsKeConfig, NtsKeError, NtsKeServer, read_secret_file};
use chime_proto::nts::ke::{
    self, Direction, EXPORTER_LABEL, ErrorCode, Record, Records, exporter_context, record_type, write_record,
};
use chime_proto::nts::{Aead, KeyRing, MasterKey, open_cookie};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

const NAME: &str = "ntp.chime.test";

/// A CA and a server certificate for [`NAME`] signed by it, as PEM.
struct TestPki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn make_pki() -> TestPki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "chime test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![NAME.to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, NAME);
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    TestPki { ca_pem: ca_cert.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("chime-ntske-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_pki(dir: &Path, pki: &TestPki) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    write_secret(&key, pki.key_pem.as_bytes());
    (cert, key)
}

fn write_secret(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn ring() -> KeyRing {
    KeyRing::new(MasterKey::new(7, [0x5A; 16]), 2, 1_000)
}

struct Fixture {
    server: NtsKeServer,
    addr: SocketAddr,
    pki: TestPki,
    ring: Arc<ArcSwap<KeyRing>>,
    dir: TempDir,
}

fn start(tweak: impl FnOnce(&mut NtsKeConfig)) -> Fixture {
    let dir = TempDir::new("srv");
    let pki = make_pki();
    let (tls_cert, tls_key) = write_pki(&dir.0, &pki);
    let mut cfg = NtsKeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        tls_cert,
        tls_key,
        handshake_rate: 0.0,
        ..NtsKeConfig::default()
    };
    tweak(&mut cfg);
    let ring = Arc::new(ArcSwap::from_pointee(ring()));
    let server = NtsKeServer::start(cfg, Arc::clone(&ring)).unwrap();
    let addr = server.local_addrs()[0];
    Fixture { server, addr, pki, ring, dir }
}

fn client_config(ca_pem: &str, alpn: Option<&[u8]>, tls12_only: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] =
        if tls12_only { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if let Some(alpn) = alpn {
        cfg.alpn_protocols = vec![alpn.to_vec()];
    }
    Arc::new(cfg)
}

/// A connected, handshaken client.
struct Client {
    tls: ClientConnection,
    sock: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<Self, rustls::Error> {
        let mut sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut tls = ClientConnection::new(cfg, NAME.try_into().unwrap()).unwrap();
        while tls.is_handshaking() {
            match tls.complete_io(&mut sock) {
                Ok(_) => {}
                Err(e) => {
                    return Err(e
                        .get_ref()
                        .and_then(|i| i.downcast_ref::<rustls::Error>())
                        .cloned()
                        .unwrap_or(rustls::Error::General(e.to_string())));
                }
            }
        }
        Ok(Self { tls, sock })
    }

    fn send(&mut self, bytes: &[u8]) {
        self.tls.writer().write_all(bytes).unwrap();
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut self.sock).is_err() {
                break;
            }
        }
    }

    fn close_notify(&mut self) {
        self.tls.send_close_notify();
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut self.sock).is_err() {
                break;
            }
        }
    }

    /// Everything the server sends until it closes.
    fn read_all(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = rustls::Stream::new(&mut self.tls, &mut self.sock).read_to_end(&mut out);
        out
    }

    fn export(&self, aead: Aead, dir: Direction) -> Vec<u8> {
        let mut k = vec![0u8; aead.key_len()];
        self.tls.export_keying_material(&mut k, EXPORTER_LABEL.as_bytes(), Some(&exporter_context(aead, dir))).unwrap();
        k
    }
}

fn request(aeads: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    write_record(&mut out, true, record_type::NEXT_PROTOCOL, &0u16.to_be_bytes());
    let list: Vec<u8> = aeads.iter().flat_map(|a| a.to_be_bytes()).collect();
    write_record(&mut out, true, record_type::AEAD_ALGORITHM, &list);
    write_record(&mut out, true, record_type::END_OF_MESSAGE, &[]);
    out
}

#[derive(Debug, Default)]
struct Response {
    aead: Option<u16>,
    cookies: Vec<Vec<u8>>,
    error: Option<u16>,
    server: Option<Vec<u8>>,
    port: Option<u16>,
    eom: bool,
}

fn parse_response(bytes: &[u8]) -> Response {
    let mut r = Response::default();
    for rec in Records::new(bytes) {
        match rec.unwrap().1 {
            Record::AeadAlgorithm(l) => r.aead = l.iter().next(),
            Record::NewCookie(c) => r.cookies.push(c.to_vec()),
            Record::Error(e) => r.error = Some(e),
            Record::Server(s) => r.server = Some(s.to_vec()),
            Record::Port(p) => r.port = Some(p),
            Record::EndOfMessage => r.eom = true,
            _ => {}
        }
    }
    r
}

fn exchange(f: &Fixture, aeads: &[u16]) -> (Response, Client) {
    let mut c = Client::connect(f.addr, client_config(&f.pki.ca_pem, Some(ke::ALPN), false)).unwrap();
    c.send(&request(aeads));
    let bytes = c.read_all();
    (parse_response(&bytes), c)
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn exchange_gives_eight_cookies_with_the_exported_keys() {
    let f = start(|_| {});
    for (prefs, want) in
        [(&[30u16, 15][..], Aead::GcmSiv128), (&[15, 30][..], Aead::SivCmac256), (&[99, 15], Aead::SivCmac256)]
    {
        let (r, client) = exchange(&f, prefs);
        assert!(r.eom && r.error.is_none(), "{r:?}");
        assert_eq!(r.aead, Some(want.id()));
        assert_eq!(r.cookies.len(), 8);
        let ring = f.ring.load();
        for c in &r.cookies {
            let keys = open_cookie(&ring, c).unwrap();
            assert_eq!(keys.aead, want);
            assert_eq!(keys.c2s(), client.export(want, Direction::C2S));
            assert_eq!(keys.s2c(), client.export(want, Direction::S2C));
        }
        assert_eq!(r.cookies.iter().collect::<std::collections::HashSet<_>>().len(), 8, "cookies differ");
    }
    let m = f.server.metrics();
    assert_eq!(m.ok(), 3);
    assert_eq!(m.cookies(), 24);
    assert_eq!(m.responses(Aead::GcmSiv128), 1);
    assert_eq!(m.responses(Aead::SivCmac256), 2);
    // A rotation applies to the next response.
    f.ring.store(Arc::new(KeyRing::new(MasterKey::new(8, [1; 16]), 2, 2_000)));
    let (r, _) = exchange(&f, &[15]);
    assert_eq!(&r.cookies[0][..4], &8u32.to_be_bytes());
}

#[test]
fn server_and_port_negotiation_when_configured() {
    let f = start(|c| {
        c.ntp_server = Some("ntp2.chime.test".to_owned());
        c.ntp_port = Some(1123);
    });
    let (r, _) = exchange(&f, &[15]);
    assert_eq!(r.server.as_deref(), Some(&b"ntp2.chime.test"[..]));
    assert_eq!(r.port, Some(1123));
    assert_eq!(r.cookies.len(), 8);
    let plain = start(|_| {});
    let (r, _) = exchange(&plain, &[15]);
    assert_eq!((r.server, r.port), (None, None));
}

#[test]
fn alpn_is_required() {
    let f = start(|_| {});
    for alpn in [None, Some(&b"http/1.1"[..])] {
        let e = Client::connect(f.addr, client_config(&f.pki.ca_pem, alpn, false)).err();
        assert_eq!(
            e,
            Some(rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)),
            "alpn {alpn:?}"
        );
    }
    wait_for("alpn failures", || f.server.metrics().failures(FailReason::Alpn) == 2);
    assert_eq!(exchange(&f, &[15]).0.cookies.len(), 8);
}

#[test]
fn tls12_only_client_fails() {
    let f = start(|_| {});
    let e = Client::connect(f.addr, client_config(&f.pki.ca_pem, Some(ke::ALPN), true)).err();
    assert!(e.is_some());
    wait_for("tls failure", || f.server.metrics().failures(FailReason::Tls) == 1);
    assert_eq!(f.server.metrics().ok(), 0);
}

#[test]
fn bad_requests_get_error_records_and_the_server_goes_on() {
    let f = start(|c| c.limits.max_record_body = 256);
    let cfg = client_config(&f.pki.ca_pem, Some(ke::ALPN), false);
    let send = |bytes: &[u8], close: bool| {
        let mut c = Client::connect(f.addr, Arc::clone(&cfg)).unwrap();
        c.send(bytes);
        if close {
            c.close_notify();
        }
        parse_response(&c.read_all())
    };
    // Unknown critical record: error 0.
    let mut b = Vec::new();
    write_record(&mut b, true, 0x4321, b"x");
    assert_eq!(send(&b, false).error, Some(ErrorCode::UnrecognizedCriticalRecord.code()));
    // Garbage: a header claiming a known record too large to keep.
    assert_eq!(send(&[0x80, 0x01, 0x10, 0x00, 1, 2, 3], false).error, Some(ErrorCode::BadRequest.code()));
    // Truncated: half a request, then close_notify.
    let whole = request(&[15]);
    assert_eq!(send(&whole[..7], true).error, Some(ErrorCode::BadRequest.code()));
    // Oversized request: unknown non-critical records past max_request.
    let mut big = Vec::new();
    for _ in 0..10 {
        write_record(&mut big, false, 0x4000, &[0; 1000]);
    }
    assert_eq!(send(&big, false).error, Some(ErrorCode::BadRequest.code()));
    // No AEAD in common.
    assert_eq!(send(&request(&[99]), false).error, Some(ErrorCode::BadRequest.code()));
    wait_for("bad requests", || f.server.metrics().failures(FailReason::BadRequest) == 5);
    // Not TLS at all.
    let mut raw = TcpStream::connect(f.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);
    // Truncated TCP: a partial ClientHello then EOF.
    let mut raw = TcpStream::connect(f.addr).unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0x01, 0x00, 0x01]).unwrap();
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = raw.read_to_end(&mut sink);
    wait_for("tls and io failures", || {
        let m = f.server.metrics();
        m.failures(FailReason::Tls) == 1 && m.failures(FailReason::Io) == 1
    });
    assert_eq!(exchange(&f, &[15]).0.cookies.len(), 8);
}

#[test]
fn silent_client_is_closed_at_the_deadline_while_others_are_served() {
    let f = start(|c| c.timeout = Duration::from_millis(600));
    let t = Instant::now();
    let mut idle = TcpStream::connect(f.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Served meanwhile.
    assert_eq!(exchange(&f, &[15]).0.cookies.len(), 8);
    let mut b = [0u8; 16];
    let n = idle.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0);
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(550) && waited < Duration::from_secs(3), "{waited:?}");
    // A client that handshakes and then says nothing: the same.
    let c = Client::connect(f.addr, client_config(&f.pki.ca_pem, Some(ke::ALPN), false)).unwrap();
    let mut sock = c.sock.try_clone().unwrap();
    let mut sink = Vec::new();
    let _ = sock.read_to_end(&mut sink);
    wait_for("timeouts", || f.server.metrics().failures(FailReason::Timeout) == 2);
    assert_eq!(f.server.metrics().connections_open.load(Ordering::Relaxed), 0);
}

/// Whether the server closed `s` (EOF or reset within five seconds).
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

/// A TCP connection to `to` from the loopback address `from`.
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(from.parse().unwrap(), 0).into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

#[test]
fn a_full_table_evicts_the_oldest_connection() {
    let f = start(|c| c.max_connections = 2);
    let mut a = TcpStream::connect(f.addr).unwrap();
    let _b = TcpStream::connect(f.addr).unwrap();
    wait_for("two open", || f.server.metrics().connections_open.load(Ordering::Relaxed) == 2);
    // A third client is served, not refused: the oldest idle one goes.
    assert_eq!(exchange(&f, &[15]).0.cookies.len(), 8);
    assert!(closed_by_server(&mut a), "the oldest connection was evicted");
    let m = f.server.metrics();
    assert_eq!(m.failures(FailReason::TooManyConnections), 1);
    assert_eq!(m.connections_evicted.load(Ordering::Relaxed), 1);
    assert!(m.connections_open.load(Ordering::Relaxed) <= 2);
}

#[test]
fn a_source_at_its_cap_evicts_its_own_oldest() {
    let f = start(|c| {
        c.max_connections = 100;
        c.max_connections_per_source = 2;
    });
    let mut first = connect_from("127.0.0.2", f.addr);
    let mut second = connect_from("127.0.0.2", f.addr);
    let mut other = connect_from("127.0.0.3", f.addr);
    wait_for("three open", || f.server.metrics().connections_open.load(Ordering::Relaxed) == 3);
    let _third = connect_from("127.0.0.2", f.addr);
    assert!(closed_by_server(&mut first), "127.0.0.2's oldest was evicted");
    // A client from 127.0.0.1 evicts nothing.
    assert_eq!(exchange(&f, &[15]).0.cookies.len(), 8);
    assert_eq!(f.server.metrics().connections_evicted.load(Ordering::Relaxed), 1);
    for s in [&mut second, &mut other] {
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut b = [0u8; 1];
        let e = s.read(&mut b).unwrap_err();
        assert!(matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{e}");
    }
}

#[test]
fn per_source_rate_limit() {
    let f = start(|c| {
        c.handshake_rate = 0.01;
        c.handshake_burst = 2;
    });
    assert_eq!(exchange(&f, &[15]).0.cookies.len(), 8);
    assert_eq!(exchange(&f, &[15]).0.cookies.len(), 8);
    let e = Client::connect(f.addr, client_config(&f.pki.ca_pem, Some(ke::ALPN), false));
    assert!(e.is_err());
    assert_eq!(f.server.metrics().failures(FailReason::RateLimited), 1);
}

#[test]
fn certificate_reload() {
    let f = start(|_| {});
    let old_cfg = client_config(&f.pki.ca_pem, Some(ke::ALPN), false);
    // A connection in flight across the reload.
    let mut in_flight = Client::connect(f.addr, Arc::clone(&old_cfg)).unwrap();
    let renewed = make_pki();
    write_pki(&f.dir.0, &renewed);
    f.server.reload_certificates().unwrap();
    let new_cfg = client_config(&renewed.ca_pem, Some(ke::ALPN), false);
    assert!(Client::connect(f.addr, Arc::clone(&old_cfg)).is_err(), "new handshakes use the new certificate");
    assert!(Client::connect(f.addr, Arc::clone(&new_cfg)).is_ok());
    in_flight.send(&request(&[15]));
    assert_eq!(parse_response(&in_flight.read_all()).cookies.len(), 8, "old connection unaffected");

    // Bad reloads keep the current certificate.
    let cert = f.dir.0.join("cert.pem");
    let key = f.dir.0.join("key.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    assert!(matches!(f.server.reload_certificates(), Err(NtsKeError::Certificate { .. })));
    let other = make_pki();
    std::fs::write(&cert, &other.cert_pem).unwrap();
    assert!(matches!(f.server.reload_certificates(), Err(NtsKeError::Key { .. })), "key does not match");
    std::fs::write(&cert, &renewed.cert_pem).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = f.server.reload_certificates().unwrap_err();
    assert!(matches!(e, NtsKeError::Permissions { .. }) && e.to_string().contains("0640"), "{e}");
    let mut c = Client::connect(f.addr, new_cfg).unwrap();
    c.send(&request(&[15]));
    assert_eq!(parse_response(&c.read_all()).cookies.len(), 8);
}

#[test]
fn start_refuses_a_readable_key_and_bad_files() {
    let dir = TempDir::new("refuse");
    let pki = make_pki();
    let (cert, key) = write_pki(&dir.0, &pki);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = NtsKeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        tls_cert: cert,
        tls_key: key.clone(),
        ..NtsKeConfig::default()
    };
    let ring = Arc::new(ArcSwap::from_pointee(ring()));
    let e = NtsKeServer::start(cfg.clone(), Arc::clone(&ring)).unwrap_err();
    assert!(e.to_string().contains("group or others"), "{e}");
    let missing = NtsKeConfig { tls_key: dir.0.join("nope.pem"), ..cfg };
    assert!(matches!(NtsKeServer::start(missing, ring).unwrap_err(), NtsKeError::Read { .. }));
}

/// Exactly the bits 0077 are refused: read, write or execute for group or
/// others; the owner's own bits do not matter.
#[test]
fn read_secret_file_allows_only_the_owner() {
    let dir = TempDir::new("secret-modes");
    let file = dir.0.join("secret");
    write_secret(&file, b"secret bytes");
    for mode in [0o600, 0o400, 0o700] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(read_secret_file(&file).unwrap(), b"secret bytes", "{mode:04o}");
    }
    for mode in [0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o644, 0o666, 0o660] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = read_secret_file(&file).unwrap_err();
        assert!(matches!(e, NtsKeError::Permissions { mode: m, .. } if m == mode), "{mode:04o}: {e:?}");
        let path = file.display();
        assert_eq!(
            e.to_string(),
            format!(
                "{path}: mode {mode:04o} gives group or others access to this secret (any of the bits 0077); it \
                 must be its owner's alone: chmod 600 {path}"
            )
        );
    }
    let missing = dir.0.join("missing");
    let e = read_secret_file(&missing).unwrap_err();
    assert!(matches!(e, NtsKeError::Read { .. }) && e.to_string().contains("missing"), "{e}");
}
