//! NTS end to end with chimed: chrony as an NTS client on the test bed
//! (socket and XDP backends), cookies across a restart, a fleet of two
//! chimeds, and secret files with loose permissions refused.
//!
//! Test certificates (a CA and a server certificate for `ntp.chime.test`)
//! are made with rcgen at test time. chrony in the client namespace finds
//! `ntp.chime.test` through `/etc/netns/<ns>/hosts`, which `ip netns exec`
//! bind-mounts over `/etc/hosts` (removed by a guard). The loopback tests
//! use a small NTS client built from chime-proto over a rustls NTS-KE
//! exchange.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chime_proto::ext::{ExtensionFields, field_type, write_extension_field};
use chime_proto::nts::ke::{self, Direction, EXPORTER_LABEL, Record, Records, exporter_context, record_type};
use chime_proto::nts::ntp::seal_authenticator;
use chime_proto::nts::{Aead, NtsKey, SessionKeys};
use chime_proto::packet::{Header, Mode, RefId};
use common::*;

const CHILD: &str = "child";
const NAME: &str = NTS_NAME;

#[test]
fn child() {
    child_main();
}

// ------------------------------------------------------------ fixtures

/// `/etc/netns/<ns>/hosts`, which `ip netns exec <ns>` mounts over
/// `/etc/hosts`; removed on drop.
struct NetnsHosts {
    dir: PathBuf,
}

impl NetnsHosts {
    fn new(ns: &NetNs, text: &str) -> Self {
        let dir = PathBuf::from("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{text}")).unwrap();
        Self { dir }
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // Leave /etc/netns itself only if something else is in it.
        let _ = std::fs::remove_dir("/etc/netns");
    }
}

// ------------------------------------------------------------ chrony on the test bed

fn chrony_nts_on_the_bed(tag: &str, backend: Backend) {
    if !have("chronyd") {
        eprintln!("skipping: chronyd (Debian package chrony) is not installed");
        return;
    }
    let Some(pair) = VethPair::with_queues(tag, 2) else { return };
    let pki = Pki::new();
    let dir = scratch_dir("nts-bed");
    let cfg = dir.join("chimed.toml");
    std::fs::write(
        &cfg,
        format!("[rate_limit]\nenabled = false\n[nts]\nkey_file = \"{}\"\n", dir.join("nts-keys").display()),
    )
    .unwrap();
    let maddr = VethPair::server_metrics();
    let (cert, key) = (pki.cert(), pki.key());
    let chimed = pair.start_chimed(backend, &cfg, &["--tls-cert", &cert, "--tls-key", &key], CHILD);

    let _hosts = NetnsHosts::new(&pair.client, &format!("{} {NAME}\n", VethPair::SERVER_V4));
    let cdir = scratch_dir("chrony-nts");
    let out = run_bounded(
        pair.client
            .cmd("chronyd")
            .args(["-Q", "-t", "30", "-L", "0", "-u", "root"])
            .arg(format!("server {NAME} iburst nts maxsamples 4"))
            .arg(format!("ntstrustedcerts {}", pki.ca().display()))
            .arg(format!("ntsdumpdir {}", cdir.display()))
            .arg(format!("pidfile {}", cdir.join("chronyd.pid").display())),
        Duration::from_secs(60),
    );
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&cdir);
    assert!(
        out.status.success() && text.contains("System clock wrong by"),
        "chronyd -Q with NTS:\n{text}\nchimed:\n{}",
        chimed.stderr()
    );
    let line = text.lines().find(|l| l.contains("System clock wrong by")).unwrap_or_default();
    eprintln!("{backend:?} backend, chrony NTS: {line}");

    let metrics = scrape_from(&pair.client, CHILD, maddr);
    let nts_replies = metric_sum(&metrics, "chime_nts_replies_total", None);
    let auth_failures = metric_sum(&metrics, "chime_nts_auth_failures_total", None);
    let ke_ok = metric_sum(&metrics, "chime_nts_ke_handshakes_total", Some("result=\"ok\""));
    eprintln!("{backend:?} backend: NTS replies {nts_replies}, auth failures {auth_failures}, NTS-KE ok {ke_ok}");
    assert!(nts_replies > 0.0, "no NTS replies:\n{metrics}");
    assert_eq!(auth_failures, 0.0, "{metrics}");
    assert!(ke_ok >= 1.0, "{metrics}");
    assert_eq!(metric_sum(&metrics, "chime_nts_naks_total", None), 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chrony_nts_socket_backend_on_the_test_bed() {
    chrony_nts_on_the_bed("ntss", Backend::Socket);
}

#[test]
fn chrony_nts_xdp_backend_on_the_test_bed() {
    chrony_nts_on_the_bed("ntsx", Backend::Xdp);
}

// ------------------------------------------------------------ a small NTS client

/// What NTS-KE left the client with.
struct Session {
    keys: SessionKeys,
    cookies: Vec<Vec<u8>>,
    /// The Server Negotiation record, if any.
    server: Option<String>,
    /// The Port Negotiation record, if any.
    port: Option<u16>,
}

fn nts_ke(addr: SocketAddr, ca: &Path) -> Session {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ke::ALPN.to_vec()];
    let mut tls = rustls::ClientConnection::new(Arc::new(cfg), NAME.try_into().unwrap()).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = Vec::new();
    ke::write_record(&mut req, true, record_type::NEXT_PROTOCOL, &[0, 0]);
    ke::write_record(&mut req, true, record_type::AEAD_ALGORITHM, &15u16.to_be_bytes());
    ke::write_record(&mut req, true, record_type::END_OF_MESSAGE, &[]);
    let mut stream = rustls::Stream::new(&mut tls, &mut sock);
    stream.write_all(&req).unwrap();
    let mut resp = Vec::new();
    let _ = stream.read_to_end(&mut resp);
    let aead = Aead::SivCmac256;
    let export = |dir| {
        let mut k = [0u8; 32];
        tls.export_keying_material(&mut k, EXPORTER_LABEL.as_bytes(), Some(&exporter_context(aead, dir))).unwrap();
        k
    };
    let keys = SessionKeys::new(aead, &export(Direction::C2S), &export(Direction::S2C)).unwrap();
    let (mut cookies, mut server, mut port) = (Vec::new(), None, None);
    for r in Records::new(&resp) {
        match r.unwrap().1 {
            Record::NewCookie(c) => cookies.push(c.to_vec()),
            Record::Server(s) => server = Some(String::from_utf8(s.to_vec()).unwrap()),
            Record::Port(p) => port = Some(p),
            _ => {}
        }
    }
    assert_eq!(cookies.len(), 8, "NTS-KE response: {resp:?}");
    Session { keys, cookies, server, port }
}

/// An NTS request with `cookie`, as chrony builds it (no placeholders).
fn nts_request(keys: &SessionKeys, cookie: &[u8], uid: &[u8; 32]) -> Vec<u8> {
    let mut b = vec![0u8; 1024];
    b[0] = 0x23;
    b[2] = 6;
    b[40..48].copy_from_slice(&now_bits().to_be_bytes());
    let mut at = 48;
    at += write_extension_field(&mut b[at..], field_type::UNIQUE_IDENTIFIER, uid).unwrap();
    at += write_extension_field(&mut b[at..], field_type::NTS_COOKIE, cookie).unwrap();
    let key = NtsKey::new(keys.aead, keys.c2s()).unwrap();
    let nonce = [0x3C; 16];
    let end = seal_authenticator(&mut b, at, &key, &nonce[..keys.aead.nonce_len()], 0).unwrap();
    b.truncate(end);
    b
}

/// Whether `reply` is an authenticated answer to `uid` (not a NAK).
fn authenticated(keys: &SessionKeys, reply: &[u8], uid: &[u8; 32]) -> Result<(), String> {
    let h = Header::parse(reply).map_err(|e| format!("{e:?}"))?;
    if h.stratum == 0 && h.reference_id == RefId::NTSN {
        return Err("NTS NAK".to_owned());
    }
    if h.mode != Mode::Server {
        return Err(format!("mode {:?}", h.mode));
    }
    let mut fields = ExtensionFields::new(&reply[48..]).map(Result::unwrap);
    let u = fields.next().ok_or("no fields")?;
    if u.field_type != field_type::UNIQUE_IDENTIFIER || u.value != uid {
        return Err("unique identifier".to_owned());
    }
    let auth = fields.next().ok_or("no authenticator")?;
    let ad = &reply[..reply.len() - auth.wire_len()];
    let v = auth.value;
    let nl = usize::from(u16::from_be_bytes([v[0], v[1]]));
    let cl = usize::from(u16::from_be_bytes([v[2], v[3]]));
    let nonce = &v[4..4 + nl];
    let ct = &v[4 + nl.next_multiple_of(4)..][..cl];
    let (tag, sealed) = (&ct[..16], &ct[16..]);
    let mut plain = sealed.to_vec();
    let key = NtsKey::new(keys.aead, keys.s2c()).unwrap();
    key.open_in_place(nonce, ad, &mut plain, tag.try_into().unwrap()).map_err(|e| format!("{e:?}"))
}

fn nts_exchange(ntp: SocketAddr, s: &Session, cookie: usize) -> Result<(), String> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let uid = [cookie as u8 ^ 0xA5; 32];
    let req = nts_request(&s.keys, &s.cookies[cookie], &uid);
    let reply = query(&sock, ntp, &req, Duration::from_secs(2)).ok_or("no reply")?;
    authenticated(&s.keys, &reply, &uid)
}

/// chimed on loopback with NTS-KE on a free port and these `[nts]` lines.
fn chimed_with_nts(pki: &Pki, nts_toml: &str) -> (Chimed, SocketAddr, PathBuf) {
    let dir = scratch_dir("nts-lo");
    let cfg = dir.join("chimed.toml");
    std::fs::write(&cfg, format!("[rate_limit]\nenabled = false\n[nts]\n{nts_toml}\n")).unwrap();
    let ke: SocketAddr = (Ipv4Addr::LOCALHOST, free_tcp_port()).into();
    let (cert, key, k) = (pki.cert(), pki.key(), ke.to_string());
    let args = ["-c", cfg.to_str().unwrap(), "--local-stratum", "10", "--tls-cert", &cert, "--tls-key", &key];
    let mut all = args.to_vec();
    all.extend_from_slice(&["--nts-ke-listen", &k]);
    (Chimed::start(&all), ke, dir)
}

#[test]
fn cookies_survive_a_restart_with_the_same_key_file() {
    let pki = Pki::new();
    let keys_dir = scratch_dir("nts-keys");
    let key_file = keys_dir.join("nts-keys");
    let toml = format!("key_file = \"{}\"", key_file.display());
    let (mut a, ke, d1) = chimed_with_nts(&pki, &toml);
    let s = nts_ke(ke, &pki.ca());
    nts_exchange(a.ntp, &s, 0).unwrap_or_else(|e| panic!("{e}\n{}", a.stderr()));
    assert!(a.terminate().is_some_and(|st| st.success()));
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);

    let (b, _, d2) = chimed_with_nts(&pki, &toml);
    nts_exchange(b.ntp, &s, 1).unwrap_or_else(|e| panic!("after restart: {e}\n{}", b.stderr()));
    // Without the key file, the same cookie gets a NAK.
    let (c, _, d3) = chimed_with_nts(&pki, "key_file = \"\"");
    assert_eq!(nts_exchange(c.ntp, &s, 2), Err("NTS NAK".to_owned()));
    let m = c.scrape();
    assert_eq!(metric_sum(&m, "chime_nts_naks_total", None), 1.0, "{m}");
    for d in [d1, d2, d3, keys_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_fleet_accepts_each_others_cookies() {
    let pki = Pki::new();
    let dir = scratch_dir("nts-fleet");
    let secret = dir.join("fleet-secret");
    write_secret(&secret, b"an example fleet secret of enough length");
    let toml = format!("fleet_secret = \"{}\"\nrotation_interval = 3600", secret.display());
    let (a, ke_a, d1) = chimed_with_nts(&pki, &toml);
    let (b, ke_b, d2) = chimed_with_nts(&pki, &toml);
    let from_a = nts_ke(ke_a, &pki.ca());
    let from_b = nts_ke(ke_b, &pki.ca());
    nts_exchange(b.ntp, &from_a, 0).unwrap_or_else(|e| panic!("B with A's cookie: {e}\n{}", b.stderr()));
    nts_exchange(a.ntp, &from_b, 0).unwrap_or_else(|e| panic!("A with B's cookie: {e}\n{}", a.stderr()));
    let m = a.scrape();
    assert_eq!(metric_sum(&m, "chime_nts_replies_total", None), 1.0, "{m}");
    assert_eq!(metric_sum(&m, "chime_nts_ke_handshakes_total", Some("result=\"ok\"")), 1.0, "{m}");
    assert_eq!(metric_sum(&m, "chime_nts_ke_cookies_issued_total", None), 8.0, "{m}");
    assert!(m.contains("chime_nts_key_age_seconds{key_id="), "{m}");
    for d in [d1, d2, dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// `server.backend = "none"`: an NTS-KE front end that serves no NTP sends
/// clients to an NTP host of its fleet, whose workers open its cookies.
#[test]
fn an_nts_ke_front_end_sends_clients_to_an_ntp_host() {
    let pki = Pki::new();
    let dir = scratch_dir("nts-front");
    let secret = dir.join("fleet-secret");
    write_secret(&secret, b"an example fleet secret of enough length");
    let fleet = format!("fleet_secret = \"{}\"\nrotation_interval = 3600", secret.display());
    let (ntp_host, _, d1) = chimed_with_nts(&pki, &fleet);

    let ke: SocketAddr = (Ipv4Addr::LOCALHOST, free_tcp_port()).into();
    let mport = free_tcp_port();
    let cfg = dir.join("front.toml");
    let text = format!(
        "[server]\nbackend = \"none\"\n[metrics]\nlisten = \"127.0.0.1:{mport}\"\n[nts]\nenabled = true\n\
         tls_cert = \"{}\"\ntls_key = \"{}\"\nlisten = [\"{ke}\"]\n{fleet}\nntp_server = \"127.0.0.1\"\n\
         ntp_port = {}\n",
        pki.cert(),
        pki.key(),
        ntp_host.ntp.port()
    );
    std::fs::write(&cfg, text).unwrap();
    let check = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_chimed")).args(["--check-config", cfg.to_str().unwrap()]),
        Duration::from_secs(10),
    );
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let front = Chimed::spawn(None, &["-c", cfg.to_str().unwrap()], ntp_host.ntp, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(ke).is_err() {
        assert!(std::time::Instant::now() < deadline, "front end not listening:\n{}", front.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }

    let s = nts_ke(ke, &pki.ca());
    assert_eq!(s.server.as_deref(), Some("127.0.0.1"));
    assert_eq!(s.port, Some(ntp_host.ntp.port()));
    nts_exchange(ntp_host.ntp, &s, 0).unwrap_or_else(|e| panic!("NTP host with the front end's cookie: {e}"));
    let m = http_get((Ipv4Addr::LOCALHOST, mport).into(), "/metrics");
    assert_eq!(metric_sum(&m, "chime_nts_ke_cookies_issued_total", None), 8.0, "{m}");
    assert!(!m.contains("chime_requests_received_total{"), "the front end has no NTP workers:\n{m}");
    assert!(front.stderr().contains("NTS-KE server listening"), "{}", front.stderr());
    drop(front);
    for d in [d1, dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Each secret file with a mode that lets group or others in (read, or
/// only write) keeps chimed from starting, with an error that names the
/// setting, the file, its mode and the fix.
#[test]
fn secret_files_open_to_group_or_others_are_refused_at_start() {
    let pki = Pki::new();
    let dir = scratch_dir("nts-perm");
    let key_file = dir.join("keys");
    write_secret(&key_file, b"not read: refused before decoding");
    let fleet = dir.join("fleet-secret");
    write_secret(&fleet, b"an example fleet secret of enough length");
    let key = PathBuf::from(pki.key());
    let no_file = "key_file = \"\"\n".to_owned();
    let with_file = format!("key_file = \"{}\"\n", key_file.display());
    let with_fleet = format!("fleet_secret = \"{}\"\n", fleet.display());
    let cases: [(&str, &Path, &str, u32); 4] = [
        ("nts.tls_key", &key, &no_file, 0o640),
        ("nts.key_file", &key_file, &with_file, 0o604),
        ("nts.fleet_secret", &fleet, &with_fleet, 0o644),
        ("nts.fleet_secret", &fleet, &with_fleet, 0o620),
    ];
    for (setting, file, nts, mode) in cases {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).unwrap();
        let cfg = dir.join("chimed.toml");
        std::fs::write(&cfg, format!("[nts]\n{nts}")).unwrap();
        let listen = format!("127.0.0.1:{}", free_udp_port());
        let ke = format!("127.0.0.1:{}", free_tcp_port());
        let out = run_bounded(
            Command::new(env!("CARGO_BIN_EXE_chimed")).args([
                "-c",
                cfg.to_str().unwrap(),
                "--listen",
                &listen,
                "--no-metrics",
                "--tls-cert",
                &pki.cert(),
                "--tls-key",
                &pki.key(),
                "--nts-ke-listen",
                &ke,
            ]),
            Duration::from_secs(20),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{setting} with mode {mode:04o}: started\n{err}");
        let path = file.display().to_string();
        for want in [format!("{path}: mode {mode:04o}"), "group or others".to_owned(), format!("chmod 600 {path}")] {
            assert!(err.contains(&want), "{setting} {mode:04o}: no {want:?} in\n{err}");
        }
        if setting != "nts.tls_key" {
            assert!(err.contains(&format!("{setting}: {path}")), "{setting}: {err}");
        }
        println!("{setting} at mode {mode:04o} refused");
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A start-up step after the packet workers fails (metrics port, NTS-KE
/// port taken): chimed names the address, stops the threads it started and
/// exits non-zero instead of hanging or serving half a configuration.
#[test]
fn a_taken_metrics_or_nts_ke_port_stops_chimed_with_the_address() {
    let pki = Pki::new();
    let (cert, key) = (pki.cert(), pki.key());
    // Held for the whole test: chimed cannot bind these.
    let taken_metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_ke = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = taken_metrics.local_addr().unwrap().to_string();
    let ke = taken_ke.local_addr().unwrap().to_string();
    let free_metrics = format!("127.0.0.1:{}", free_tcp_port());
    // Ephemeral master keys: nothing written outside the scratch directory.
    let dir = scratch_dir("nts-taken-port");
    let cfg = dir.join("chimed.toml");
    std::fs::write(&cfg, "[nts]\nkey_file = \"\"\n").unwrap();
    let cfg = cfg.to_str().unwrap();
    let cases: [(&str, Vec<&str>, String); 2] = [
        (
            "metrics",
            vec!["--metrics-listen", &metrics],
            format!("metrics endpoint on {metrics}: Address already in use"),
        ),
        (
            "NTS-KE",
            vec!["--metrics-listen", &free_metrics, "--tls-cert", &cert, "--tls-key", &key, "--nts-ke-listen", &ke],
            "NTS-KE: ".to_owned(),
        ),
    ];
    for (what, extra, want) in cases {
        let listen = format!("127.0.0.1:{}", free_udp_port());
        let mut args = vec!["-c", cfg, "--listen", &listen, "--workers", "1", "--local-stratum", "10"];
        args.extend(extra);
        let out = run_bounded(Command::new(env!("CARGO_BIN_EXE_chimed")).args(&args), Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} port taken: chimed did not fail\n{err}");
        assert!(err.contains(&want), "{what}: no {want:?} in\n{err}");
        if what == "NTS-KE" {
            assert!(err.contains(&ke), "{what}: the address {ke} is not named in\n{err}");
        }
        let error_line = err.lines().find(|l| l.contains(&want)).unwrap();
        assert_eq!(error_line.matches(&want).count(), 1, "{what}: said more than once: {error_line}");
        let served = err.lines().any(|l| l.contains("chime_server::run: chimed ") && l.ends_with(" serving"));
        assert!(!served, "{what}: chimed reported serving\n{err}");
        println!("{what} port taken: chimed exited with {:?}", out.status.code());
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The current master key's id, from `chime_nts_key_age_seconds{key_id}`.
fn current_key_id(chimed: &Chimed) -> String {
    let m = chimed.scrape();
    let line = m.lines().find(|l| l.starts_with("chime_nts_key_age_seconds{")).unwrap_or_else(|| panic!("{m}"));
    line.split('"').nth(1).unwrap().to_owned()
}

#[test]
fn sighup_applies_key_rotation_settings_and_a_renewed_certificate() {
    let pki = Pki::new();
    if is_root() {
        // chimed drops to `nobody` and reads the key again on SIGHUP as
        // that user: the key belongs to the service user, as in production.
        assert!(Command::new("chown").args(["nobody", &pki.key()]).status().unwrap().success());
    }
    let (chimed, ke, dir) = chimed_with_nts(&pki, "key_file = \"\"\nrotation_interval = 86400");
    let s = nts_ke(ke, &pki.ca());
    nts_exchange(chimed.ntp, &s, 0).unwrap_or_else(|e| panic!("{e}\n{}", chimed.stderr()));
    let first = current_key_id(&chimed);

    // Rotation every second from now on: the key changes, and cookies
    // sealed under the old key still open (it is kept as a previous key).
    let cfg = dir.join("chimed.toml");
    std::fs::write(&cfg, "[rate_limit]\nenabled = false\n[nts]\nkey_file = \"\"\nrotation_interval = 1\n").unwrap();
    let hup = || assert!(Command::new("kill").args(["-HUP", &chimed.pid().to_string()]).status().unwrap().success());
    hup();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while current_key_id(&chimed) == first {
        assert!(std::time::Instant::now() < deadline, "no rotation after the reload:\n{}", chimed.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    nts_exchange(chimed.ntp, &s, 1).unwrap_or_else(|e| panic!("old cookie after rotation: {e}\n{}", chimed.stderr()));

    // A renewed certificate under the same file names, from another CA:
    // served from the next handshake after SIGHUP.
    let renewed = Pki::new();
    std::fs::copy(renewed.dir.join("cert.pem"), pki.cert()).unwrap();
    std::fs::copy(renewed.dir.join("key.pem"), pki.key()).unwrap();
    hup();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = chimed.scrape();
        if metric_sum(&m, "chime_config_reloads_total", Some("result=\"applied\"")) >= 2.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "second reload not applied:\n{m}\n{}", chimed.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let s2 = nts_ke(ke, &renewed.ca());
    nts_exchange(chimed.ntp, &s2, 0).unwrap_or_else(|e| panic!("with the renewed certificate: {e}"));
    nts_exchange(chimed.ntp, &s, 2).unwrap_or_else(|e| panic!("older session's cookie: {e}"));
    let m = chimed.scrape();
    assert_eq!(metric_sum(&m, "chime_nts_auth_failures_total", None), 0.0, "{m}");
    assert_eq!(metric_sum(&m, "chime_nts_naks_total", None), 0.0, "{m}");

    // The key opened to its group: the reload refuses to read it, says
    // which file, its mode and the fix, and keeps serving the certificate
    // it has.
    std::fs::set_permissions(pki.key(), std::fs::Permissions::from_mode(0o640)).unwrap();
    hup();
    let key = pki.key();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !chimed.stderr().contains(&format!("chmod 600 {key}")) {
        assert!(std::time::Instant::now() < deadline, "no refusal of the key:\n{}", chimed.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = chimed.stderr();
    assert!(log.contains(&format!("{key}: mode 0640 gives group or others access")), "{log}");
    assert!(log.contains("keeping the current one"), "{log}");
    assert!(log.contains("certificate kept"), "{log}");
    let s3 = nts_ke(ke, &renewed.ca());
    nts_exchange(chimed.ntp, &s3, 0).unwrap_or_else(|e| panic!("after the refused key: {e}"));

    // All of that under the seccomp filter, in every thread.
    assert_confined(chimed.pid());
    assert_eq!(metric_value(&chimed.scrape(), "chime_seccomp_info{mode=\"enforce\"}"), Some(1.0));
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------ anycast

/// `chimed status` inside `ns` against its metrics on 127.0.0.1:9123: the
/// exit code a BIRD health check acts on.
fn status_in(ns: &NetNs) -> Option<i32> {
    let out = ns.run(env!("CARGO_BIN_EXE_chimed"), &["status", "--metrics", "127.0.0.1:9123"], Duration::from_secs(20));
    out.status.code()
}

fn wait_status(ns: &NetNs, want: i32, what: &str, chimed: &Chimed) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let code = status_in(ns);
        if code == Some(want) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: chimed status exits {code:?}\n{}", chimed.stderr());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// chronyd -Q as an NTS client of `NAME` from `client`, keeping its cookies
/// in `dump` between runs.
fn chrony_nts_query(client: &NetNs, ca: &Path, dump: &Path) -> Result<String, String> {
    let out = run_bounded(
        client
            .cmd("chronyd")
            .args(["-Q", "-t", "30", "-L", "0", "-u", "root"])
            .arg(format!("server {NAME} iburst nts maxsamples 2"))
            .arg(format!("ntstrustedcerts {}", ca.display()))
            .arg(format!("ntsdumpdir {}", dump.display()))
            .arg(format!("pidfile {}", dump.join("chronyd.pid").display())),
        Duration::from_secs(60),
    );
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && text.contains("System clock wrong by") { Ok(text) } else { Err(text) }
}

/// Two chimeds of one fleet behind one service address (198.18.3.123 on
/// both servers' loopback), the client namespace routing it to one or the
/// other as BGP would: cookies from one open on the other, and when one
/// goes unsynchronized its health check fails while the other's passes.
#[test]
fn anycast_pair_shares_cookies_and_health_check_follows_sync() {
    if !have("chronyd") {
        eprintln!("skipping: chronyd (Debian package chrony) is not installed");
        return;
    }
    let Some(client) = NetNs::new("anyc") else { return };
    let (Some(a), Some(b)) = (NetNs::new("anya"), NetNs::new("anyb")) else { return };
    const SERVICE: &str = "198.18.3.123";
    let n = std::process::id() % 10000;
    for (srv, link, cdev, sdev) in
        [(&a, 1, format!("cya{n}"), format!("sya{n}")), (&b, 2, format!("cyb{n}"), format!("syb{n}"))]
    {
        ip(&["link", "add", &cdev, "netns", &client.name, "type", "veth", "peer", "name", &sdev, "netns", &srv.name]);
        ip(&["-n", &client.name, "addr", "add", &format!("198.18.{link}.2/30"), "dev", &cdev]);
        ip(&["-n", &srv.name, "addr", "add", &format!("198.18.{link}.1/30"), "dev", &sdev]);
        ip(&["-n", &srv.name, "addr", "add", &format!("{SERVICE}/32"), "dev", "lo"]);
        ip(&["-n", &client.name, "link", "set", &cdev, "up"]);
        ip(&["-n", &srv.name, "link", "set", &sdev, "up"]);
    }
    let route_to = |link: u8| {
        ip(&["-n", &client.name, "route", "replace", &format!("{SERVICE}/32"), "via", &format!("198.18.{link}.1")]);
    };
    route_to(1);

    let pki = Pki::new();
    let dir = scratch_dir("anycast");
    let secret = dir.join("fleet-secret");
    write_secret(&secret, b"the anycast fleet's shared secret, 41 bytes");
    let config = |name: &str, upstream: &str| {
        let path = dir.join(format!("{name}.toml"));
        let text = format!(
            "[server]\nbackend = \"socket\"\nworkers = 1\n[upstream]\n{upstream}\n[metrics]\nlisten = \"127.0.0.1:9123\"\n\
             [nts]\nenabled = true\ntls_cert = \"{}\"\ntls_key = \"{}\"\nfleet_secret = \"{}\"\nrotation_interval = 3600\n",
            pki.cert(),
            pki.key(),
            secret.display()
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let synced = "local_stratum = 10";
    let (cfg_a, cfg_b) = (config("a", synced), config("b", synced));
    let service: SocketAddr = (SERVICE.parse::<Ipv4Addr>().unwrap(), 123).into();
    let chimed_a = Chimed::spawn(Some(&a.name), &["-c", cfg_a.to_str().unwrap()], service, None);
    let chimed_b = Chimed::spawn(Some(&b.name), &["-c", cfg_b.to_str().unwrap()], service, None);
    wait_status(&a, 0, "A healthy", &chimed_a);
    wait_status(&b, 0, "B healthy", &chimed_b);

    let _hosts = NetnsHosts::new(&client, &format!("{SERVICE} {NAME}\n"));
    let dump = scratch_dir("anycast-chrony");
    let first = chrony_nts_query(&client, &pki.ca(), &dump);
    assert!(first.is_ok(), "NTS via A: {first:?}\nA:\n{}", chimed_a.stderr());
    let scrape = |ns: &NetNs| scrape_from(ns, CHILD, "127.0.0.1:9123".parse().unwrap());
    let ma = scrape(&a);
    assert!(metric_sum(&ma, "chime_nts_ke_handshakes_total", Some("result=\"ok\"")) >= 1.0, "{ma}");
    assert!(metric_sum(&ma, "chime_nts_replies_total", None) >= 1.0, "{ma}");

    // The route moves to B: chrony goes on with the cookies A issued (from
    // its dump), no new NTS-KE, and B accepts them.
    route_to(2);
    let second = chrony_nts_query(&client, &pki.ca(), &dump);
    assert!(second.is_ok(), "NTS via B with A's cookies: {second:?}\nB:\n{}", chimed_b.stderr());
    let mb = scrape(&b);
    assert!(metric_sum(&mb, "chime_nts_replies_total", None) >= 1.0, "B answered NTS: {mb}");
    assert_eq!(metric_sum(&mb, "chime_nts_ke_handshakes_total", Some("result=\"ok\"")), 0.0, "no NTS-KE with B: {mb}");
    assert_eq!(metric_sum(&mb, "chime_nts_naks_total", None), 0.0, "{mb}");
    assert_eq!(metric_sum(&mb, "chime_nts_auth_failures_total", None), 0.0, "{mb}");

    // B loses its upstream (a chrony that is not there, no local stratum,
    // holdover of one second): its health check fails, A's still passes.
    config("b", "source = \"chrony\"\nchrony_address = \"127.0.0.1:1\"\nmax_unsync_secs = 1.0");
    assert!(Command::new("kill").args(["-HUP", &chimed_b.pid().to_string()]).status().unwrap().success());
    wait_status(&b, 1, "B unsynchronized", &chimed_b);
    assert_eq!(status_in(&a), Some(0), "A stays healthy");
    // ops/bird/chime-healthcheck.sh turns that into BIRD commands (a stub
    // birdc records them): B's routes withdrawn, A's announced.
    let birdc = dir.join("birdc");
    let log = dir.join("birdc.log");
    std::fs::write(&birdc, format!("#!/bin/sh\necho \"$@\" >>{}\n", log.display())).unwrap();
    std::fs::set_permissions(&birdc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/bird/chime-healthcheck.sh");
    let check = |ns: &NetNs, cfg: &Path| {
        let _ = std::fs::remove_file(&log);
        let args = format!("netns exec {} {} -c {}", ns.name, env!("CARGO_BIN_EXE_chimed"), cfg.display());
        let out = run_bounded(
            Command::new(script).arg("--once").env("CHIMED", "ip").env("CHIMED_ARGS", args).env("BIRDC", &birdc),
            Duration::from_secs(30),
        );
        (out.status.code(), std::fs::read_to_string(&log).unwrap_or_default())
    };
    assert_eq!(check(&b, &cfg_b), (Some(1), "disable chime_anycast\ndisable chime_anycast6\n".to_owned()));
    assert_eq!(check(&a, &cfg_a), (Some(0), "enable chime_anycast\nenable chime_anycast6\n".to_owned()));
    // The route is withdrawn from B (as BIRD would on the failed check):
    // clients are served by A again.
    route_to(1);
    let third = chrony_nts_query(&client, &pki.ca(), &dump);
    assert!(third.is_ok(), "NTS via A again: {third:?}");

    drop((chimed_a, chimed_b));
    for d in [dir, dump] {
        let _ = std::fs::remove_dir_all(d);
    }
}
