//! The NTS client side (RFC 8915): NTS-KE over TLS 1.3 (rustls, `ring`
//! provider, ALPN `ntske/1`), per-client cookie pools, authenticated
//! requests, and verification of every reply with the S2C key.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chime_proto::ext::{ExtensionFields, field_type, write_extension_field};
use chime_proto::nts::ke::{self, Direction, KeError, Record, Records, record_type, write_record};
use chime_proto::nts::ntp::seal_authenticator;
use chime_proto::nts::{Aead, NtsKey};
use chime_proto::packet::HEADER_LEN;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::request::{Invalid, VERSION, write_client_header};

/// Cookies a client keeps (what one NTS-KE hands out).
pub const POOL: usize = 8;
/// Longest cookie accepted from a server.
pub const MAX_COOKIE: usize = 256;
/// Length of the Unique Identifier sent.
pub const UID_LEN: usize = 32;

/// What NTS-KE left a client with.
#[derive(Clone, Debug)]
pub struct Session {
    /// Negotiated AEAD.
    pub aead: Aead,
    /// Client-to-server key.
    pub c2s: Vec<u8>,
    /// Server-to-client key.
    pub s2c: Vec<u8>,
    /// The cookies from the NTS-KE response.
    pub cookies: Vec<Vec<u8>>,
    /// Where to send NTP (the server may name another address or port).
    pub ntp: SocketAddr,
}

/// A TLS client configuration for NTS-KE: TLS 1.3 only, ALPN `ntske/1`,
/// trusting the certificates in `ca` (PEM), or the system store.
pub fn tls_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let path = ca.unwrap_or(Path::new("/etc/ssl/certs/ca-certificates.crt"));
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| format!("reading CA file {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("CA file {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("CA file {} holds no certificate", path.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ke::ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// Runs one NTS-KE exchange with `ke_addr`, checking the certificate for
/// `name`; `ntp_default` is where NTP goes unless the server says otherwise.
pub fn key_exchange(
    tls: &Arc<rustls::ClientConfig>,
    name: &str,
    ke_addr: SocketAddr,
    ntp_default: SocketAddr,
    timeout: Duration,
) -> Result<Session, String> {
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| format!("bad server name {name:?}: {e}"))?;
    let conn = rustls::ClientConnection::new(tls.clone(), server_name).map_err(|e| format!("TLS: {e}"))?;
    let tcp = TcpStream::connect_timeout(&ke_addr, timeout).map_err(|e| format!("NTS-KE connect to {ke_addr}: {e}"))?;
    tcp.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    // The request follows the client's Finished in a second small write:
    // with Nagle it would wait for the server's delayed ACK (40 ms).
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut tls_stream = rustls::StreamOwned::new(conn, tcp);
    let mut req = Vec::new();
    write_record(&mut req, true, record_type::NEXT_PROTOCOL, &ke::PROTOCOL_NTPV4.to_be_bytes());
    let aeads: Vec<u8> = [Aead::SivCmac256, Aead::GcmSiv128].iter().flat_map(|a| a.id().to_be_bytes()).collect();
    write_record(&mut req, true, record_type::AEAD_ALGORITHM, &aeads);
    write_record(&mut req, true, record_type::END_OF_MESSAGE, &[]);
    tls_stream.write_all(&req).map_err(|e| format!("NTS-KE with {ke_addr}: {e}"))?;
    tls_stream.flush().map_err(|e| format!("NTS-KE with {ke_addr}: {e}"))?;
    if tls_stream.conn.alpn_protocol() != Some(ke::ALPN) {
        return Err(format!("NTS-KE with {ke_addr}: the server did not agree to ALPN ntske/1"));
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let parsed = loop {
        match parse_response(&buf, ntp_default)? {
            Some(p) => break p,
            None if buf.len() > 65536 => return Err("NTS-KE response too long".into()),
            None => {}
        }
        let n = tls_stream.read(&mut chunk).map_err(|e| format!("NTS-KE with {ke_addr}: {e}"))?;
        if n == 0 {
            return Err(format!("NTS-KE with {ke_addr}: connection closed before End of Message"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (aead, cookies, ntp) = parsed;
    let mut c2s = vec![0u8; aead.key_len()];
    let mut s2c = vec![0u8; aead.key_len()];
    let label = ke::EXPORTER_LABEL.as_bytes();
    for (out, dir) in [(&mut c2s, Direction::C2S), (&mut s2c, Direction::S2C)] {
        let ctx = ke::exporter_context(aead, dir);
        tls_stream
            .conn
            .export_keying_material(out.as_mut_slice(), label, Some(&ctx))
            .map_err(|e| format!("TLS exporter: {e}"))?;
    }
    let _ = tls_stream.sock.shutdown(std::net::Shutdown::Both);
    Ok(Session { aead, c2s, s2c, cookies, ntp })
}

type Parsed = (Aead, Vec<Vec<u8>>, SocketAddr);

/// Reads a complete NTS-KE response; `Ok(None)` if more bytes are needed.
fn parse_response(buf: &[u8], ntp_default: SocketAddr) -> Result<Option<Parsed>, String> {
    let mut aead = None;
    let mut protocol_ok = false;
    let mut cookies = Vec::new();
    let mut host: Option<String> = None;
    let mut port = ntp_default.port();
    for r in Records::new(buf) {
        match r {
            Err(KeError::Truncated) => return Ok(None),
            Err(e) => return Err(format!("NTS-KE response: {e}")),
            Ok((_, Record::EndOfMessage)) => {
                if !protocol_ok {
                    return Err("NTS-KE: the server did not accept NTPv4".into());
                }
                let aead = aead.ok_or("NTS-KE: no AEAD algorithm in the response")?;
                if cookies.is_empty() {
                    return Err("NTS-KE: no cookies in the response".into());
                }
                let ntp = match host {
                    None => SocketAddr::new(ntp_default.ip(), port),
                    Some(h) => (h.as_str(), port)
                        .to_socket_addrs()
                        .ok()
                        .and_then(|mut a| a.next())
                        .ok_or(format!("NTS-KE: cannot resolve the NTP server {h:?} it named"))?,
                };
                return Ok(Some((aead, cookies, ntp)));
            }
            Ok((_, Record::NextProtocol(l))) => protocol_ok = l.iter().any(|p| p == ke::PROTOCOL_NTPV4),
            Ok((_, Record::AeadAlgorithm(l))) => aead = l.iter().next().and_then(Aead::from_id),
            Ok((_, Record::NewCookie(c))) if c.len() <= MAX_COOKIE => cookies.push(c.to_vec()),
            Ok((_, Record::NewCookie(c))) => return Err(format!("NTS-KE: cookie of {} bytes is too long", c.len())),
            Ok((_, Record::Error(code))) => return Err(format!("NTS-KE: the server sent error {code}")),
            Ok((_, Record::Server(s))) => host = Some(String::from_utf8_lossy(s).into_owned()),
            Ok((_, Record::Port(p))) => port = p,
            Ok((true, other)) => return Err(format!("NTS-KE: unexpected critical record {other:?}")),
            Ok(_) => {}
        }
    }
    Ok(None)
}

/// The keys of one session, expanded for one thread.
#[derive(Debug)]
pub struct ThreadKeys {
    /// C2S, seals requests.
    pub c2s: NtsKey,
    /// S2C, opens replies.
    pub s2c: NtsKey,
}

impl ThreadKeys {
    /// Expands a session's keys.
    pub fn new(s: &Session) -> Self {
        // Lengths come from the negotiated AEAD, so these cannot fail.
        Self {
            c2s: NtsKey::new(s.aead, &s.c2s).unwrap_or_else(|e| panic!("C2S key: {e}")),
            s2c: NtsKey::new(s.aead, &s.s2c).unwrap_or_else(|e| panic!("S2C key: {e}")),
        }
    }
}

/// A client's cookies, in fixed storage.
#[derive(Debug)]
pub struct CookiePool {
    data: Box<[u8]>,
    lens: [u16; POOL],
    n: usize,
    /// Requests that had to reuse the last cookie (the pool ran dry).
    pub reused: u64,
}

impl Default for CookiePool {
    fn default() -> Self {
        Self { data: vec![0u8; POOL * MAX_COOKIE].into_boxed_slice(), lens: [0; POOL], n: 0, reused: 0 }
    }
}

impl CookiePool {
    /// Adds a cookie (ignored when full or too long).
    pub fn push(&mut self, c: &[u8]) {
        if self.n < POOL && c.len() <= MAX_COOKIE {
            self.data[self.n * MAX_COOKIE..self.n * MAX_COOKIE + c.len()].copy_from_slice(c);
            self.lens[self.n] = c.len() as u16;
            self.n += 1;
        }
    }

    /// Cookies held.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Takes a cookie; when none is left, the last one taken again
    /// (counted in `reused`); `None` if there never was one.
    pub fn take(&mut self) -> Option<&[u8]> {
        if self.n > 0 {
            self.n -= 1;
        } else if self.lens[0] > 0 {
            self.reused += 1;
        } else {
            return None;
        }
        let i = self.n;
        Some(&self.data[i * MAX_COOKIE..i * MAX_COOKIE + usize::from(self.lens[i])])
    }
}

/// The Unique Identifier of the request with transmit ID `xmt`.
pub fn uid(xmt: u64, salt: &[u8; UID_LEN - 8]) -> [u8; UID_LEN] {
    let mut u = [0u8; UID_LEN];
    u[..8].copy_from_slice(&xmt.to_be_bytes());
    u[8..].copy_from_slice(salt);
    u
}

static ZEROS: [u8; MAX_COOKIE] = [0; MAX_COOKIE];

/// Writes an NTS request into `out`: header with `xmt`, Unique Identifier,
/// a cookie from `pool`, placeholders asking for enough cookies to refill
/// it, and an authenticator sealed with C2S under `nonce`. Returns the
/// length, or `None` with no cookie to send or no room.
pub fn write_request(
    out: &mut [u8],
    xmt: u64,
    salt: &[u8; UID_LEN - 8],
    pool: &mut CookiePool,
    c2s: &mut NtsKey,
    nonce: &[u8],
) -> Option<usize> {
    write_client_header(out, VERSION, 3, 0, 0, xmt);
    let mut at = HEADER_LEN;
    at += write_extension_field(&mut out[at..], field_type::UNIQUE_IDENTIFIER, &uid(xmt, salt)).ok()?;
    let cookie = pool.take()?;
    let cookie_len = cookie.len();
    at += write_extension_field(&mut out[at..], field_type::NTS_COOKIE, cookie).ok()?;
    let field = 4 + cookie_len.next_multiple_of(4);
    let room = out.len().saturating_sub(at + 64) / field;
    let placeholders = (POOL - 1).saturating_sub(pool.len()).min(room);
    for _ in 0..placeholders {
        at += write_extension_field(&mut out[at..], field_type::NTS_COOKIE_PLACEHOLDER, &ZEROS[..cookie_len]).ok()?;
    }
    seal_authenticator(out, at, c2s, &nonce[..c2s.aead().nonce_len()], 0)
}

/// Verifies an NTS reply to the request with transmit ID `xmt`: the Unique
/// Identifier, an authenticator that is the last field and opens with S2C,
/// and the cookies inside it, which go to `pool`. Decrypts in place.
/// Returns the number of fresh cookies. A NAK (KoD NTSN) is not checked
/// here: the header says it.
pub fn verify_reply(
    reply: &mut [u8],
    xmt: u64,
    salt: &[u8; UID_LEN - 8],
    s2c: &mut NtsKey,
    pool: &mut CookiePool,
) -> Result<usize, Invalid> {
    if reply.len() <= HEADER_LEN {
        return Err(Invalid::NtsUnauthenticated);
    }
    let want = uid(xmt, salt);
    let mut uid_ok = false;
    let mut auth_at = None;
    let mut at = HEADER_LEN;
    for f in ExtensionFields::new(&reply[HEADER_LEN..]) {
        let f = f.map_err(|_| Invalid::NtsMalformed)?;
        if auth_at.is_some() {
            return Err(Invalid::NtsMalformed); // nothing may follow it
        }
        match f.field_type {
            field_type::UNIQUE_IDENTIFIER => uid_ok = f.value.starts_with(&want),
            field_type::NTS_AUTHENTICATOR => auth_at = Some(at),
            _ => {}
        }
        at += f.wire_len();
    }
    let auth_at = auth_at.ok_or(Invalid::NtsUnauthenticated)?;
    if !uid_ok {
        return Err(Invalid::NtsMalformed);
    }
    let (ad, field) = reply.split_at_mut(auth_at);
    let v = &mut field[4..];
    if v.len() < 4 {
        return Err(Invalid::NtsMalformed);
    }
    let nl = usize::from(u16::from_be_bytes([v[0], v[1]]));
    let cl = usize::from(u16::from_be_bytes([v[2], v[3]]));
    let ct_at = 4 + nl.next_multiple_of(4);
    if nl != s2c.aead().nonce_len() || cl < 16 || ct_at + cl > v.len() {
        return Err(Invalid::NtsMalformed);
    }
    let (head, ct) = v.split_at_mut(ct_at);
    let nonce = &head[4..4 + nl];
    let ct = &mut ct[..cl];
    let (tag, sealed) = if s2c.aead().tag_first() {
        let (t, s) = ct.split_at_mut(16);
        (<[u8; 16]>::try_from(&*t).map_err(|_| Invalid::NtsMalformed)?, s)
    } else {
        let (s, t) = ct.split_at_mut(cl - 16);
        (<[u8; 16]>::try_from(&*t).map_err(|_| Invalid::NtsMalformed)?, s)
    };
    s2c.open_in_place(nonce, ad, sealed, &tag).map_err(|_| Invalid::NtsAuthFailed)?;
    let mut fresh = 0;
    for f in ExtensionFields::new(sealed) {
        let f = f.map_err(|_| Invalid::NtsMalformed)?;
        if f.field_type == field_type::NTS_COOKIE {
            pool.push(f.value);
            fresh += 1;
        }
    }
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use chime_proto::acl::Acl;
    use chime_proto::nts::ke::{KeResponse, Negotiated};
    use chime_proto::nts::{AesCtrNonces, KeyRing, MasterKey, SessionKeys};
    use chime_proto::packet::{Header, LeapIndicator, RefId};
    use chime_proto::ratelimit::RateLimitConfig;
    use chime_proto::{
        Action, ClockSnapshot, Context, NtpTimestamp, RequestMeta, Responder, ResponderConfig, RxTimestamp, StampKind,
    };

    use super::*;

    const T0: i64 = 1_790_000_000;

    fn session(aead: Aead, ring: &KeyRing) -> Session {
        let n = aead.key_len();
        let keys = SessionKeys::new(aead, &[0x11; 32][..n], &[0x22; 32][..n]).unwrap();
        let mut out = Vec::new();
        KeResponse::for_outcome(Ok(Negotiated::Ntpv4(aead)), &keys, None, Some(4123)).write(
            ring,
            &mut AesCtrNonces::new(&[3; 32]),
            &mut out,
        );
        let dflt = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 123);
        assert_eq!(parse_response(&out[..out.len() - 1], dflt), Ok(None), "truncated: wait for more");
        let (a, cookies, ntp) = parse_response(&out, dflt).unwrap().unwrap();
        assert_eq!((a, cookies.len(), ntp.port()), (aead, 8, 4123));
        Session { aead, c2s: keys.c2s().to_vec(), s2c: keys.s2c().to_vec(), cookies, ntp }
    }

    #[test]
    fn requests_verify_against_the_responder() {
        for aead in Aead::ALL {
            let ring = KeyRing::new(MasterKey::new(1, [0xA5; 16]), 3, T0 as u64);
            let s = session(aead, &ring);
            let mut keys = ThreadKeys::new(&s);
            let mut pool = CookiePool::default();
            for c in &s.cookies {
                pool.push(c);
            }
            let rate_limit = RateLimitConfig { enabled: false, ..RateLimitConfig::default() };
            let mut responder = Responder::new(ResponderConfig { rate_limit, ..ResponderConfig::default() }, 1);
            responder.set_nonce_source(Box::new(AesCtrNonces::new(&[9; 32])));
            let clock = ClockSnapshot {
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
            };
            let acl = Acl::default();
            let ctx = Context { clock: &clock, acl: &acl, nts: Some(&ring) };
            let salt = [7u8; UID_LEN - 8];
            let rx = NtpTimestamp::from_unix(T0 + 1, 0);
            let meta = RequestMeta {
                source: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 40000),
                rx: RxTimestamp { time: rx, kind: StampKind::Userspace },
            };
            let mut req = [0u8; 1280];
            let mut out = [0u8; 1280];
            // Many rounds: the pool stays full as replies refill it.
            for round in 0..40u64 {
                let xmt = 0x1000 + round;
                let n = write_request(&mut req, xmt, &salt, &mut pool, &mut keys.c2s, &[round as u8; 16]).unwrap();
                let Action::Reply(r) = responder.handle(&req[..n], &meta, &ctx, &mut || rx.add_secs(1e-6), &mut out)
                else {
                    panic!("dropped")
                };
                let mut reply = r.to_vec();
                assert_eq!(Header::parse(&reply).unwrap().origin_ts.to_bits(), xmt);
                let fresh = verify_reply(&mut reply, xmt, &salt, &mut keys.s2c, &mut pool).unwrap();
                assert!(fresh >= 1);
                assert_eq!(pool.len(), POOL, "round {round}");
                // A damaged reply does not verify; a wrong UID is caught.
                let Action::Reply(r) = responder.handle(&req[..n], &meta, &ctx, &mut || rx.add_secs(1e-6), &mut out)
                else {
                    panic!("dropped")
                };
                let mut bad = r.to_vec();
                let last = bad.len() - 1;
                bad[last - 20] ^= 1;
                let mut scratch = CookiePool::default();
                assert_eq!(
                    verify_reply(&mut bad, xmt, &salt, &mut keys.s2c, &mut scratch),
                    Err(Invalid::NtsAuthFailed)
                );
                let mut again = r.to_vec();
                assert_eq!(
                    verify_reply(&mut again, xmt + 1, &salt, &mut keys.s2c, &mut scratch),
                    Err(Invalid::NtsMalformed)
                );
            }
            assert_eq!(responder.counters().nts_replies, 80);
        }
    }

    #[test]
    fn pool_reuses_the_last_cookie_when_dry() {
        let mut p = CookiePool::default();
        assert!(p.take().is_none());
        p.push(&[1; 100]);
        p.push(&[2; 104]);
        assert_eq!(p.take().unwrap(), &[2; 104]);
        assert_eq!(p.take().unwrap(), &[1; 100]);
        assert_eq!(p.take().unwrap(), &[1; 100]);
        assert_eq!(p.reused, 1);
    }
}
