//! The event loop: listeners, connections, deadlines.
//!
//! One thread, one `mio::Poll`, edge-triggered: every event drains what it
//! can (reads until `WouldBlock`, writes until done or `WouldBlock`). A
//! connection goes through
//!
//! 1. **Hello**: a rustls [`Acceptor`] reads the ClientHello; a client that
//!    does not offer ALPN `ntske/1` gets a `no_application_protocol` alert
//!    (rustls accepts clients with no ALPN at all, RFC 8915 does not);
//! 2. **Tls**: the handshake, then the request fed to the streaming
//!    [`KeRequestParser`] as it arrives; the response (cookies, or an Error
//!    record) is written with a close_notify after it;
//! 3. **Linger**: the write side is shut and the rest read and discarded
//!    until the peer closes (so the kernel does not reset the connection
//!    under the response), for a short while at most;
//! 4. **Flush**: raw bytes (an alert) written before closing.
//!
//! Every connection has one deadline; a sweep closes those past it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chime_proto::nts::ke::{
    Direction, EXPORTER_LABEL, KeError, KeLimits, KeRequestParser, MAX_SERVER_NAME, exporter_context,
};
use chime_proto::nts::{Aead, AesCtrNonces, KeyRing, SessionKeys};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::ServerConfig;
use rustls::server::{Acceptor, ServerConnection};
use tracing::{debug, warn};

use crate::ratelimit::{HandshakeLimiter, source_key};
use crate::table::ConnTable;
use crate::{CertResolver, FailReason, KeMetrics, NtsKeConfig, NtsKeError, load_certified_key, os_random, provider};

const WAKER: Token = Token(usize::MAX);
/// How often deadlines are checked (and the longest `poll` waits).
const SWEEP: Duration = Duration::from_millis(50);
/// Longest a connection lingers after its response, waiting for the peer
/// to close.
const LINGER: Duration = Duration::from_secs(2);
/// A fatal `no_application_protocol` alert as a plaintext TLS record (the
/// server has sent nothing yet, so it is not encrypted).
const ALERT_NO_APPLICATION_PROTOCOL: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x78];
/// Connections the kernel queues before accept (capped by
/// `net.core.somaxconn`): a burst of connections must not overflow it, or
/// a client's SYN is dropped and it retries only a second later.
const LISTEN_BACKLOG: i32 = 4096;
/// Most connections accepted in one go before the open ones get a turn.
const ACCEPT_BATCH: usize = 256;

/// A running NTS-KE server. Dropping it stops the event loop.
#[derive(Debug)]
pub struct NtsKeServer {
    local_addrs: Vec<SocketAddr>,
    resolver: Arc<CertResolver>,
    cert_paths: (PathBuf, PathBuf),
    metrics: Arc<KeMetrics>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl NtsKeServer {
    /// Loads the certificate, binds every listen address and starts the
    /// event loop thread. Cookies are sealed under the current key of
    /// `keys`, read for each response.
    pub fn start(cfg: NtsKeConfig, keys: Arc<ArcSwap<KeyRing>>) -> Result<Self, NtsKeError> {
        validate(&cfg)?;
        let resolver = Arc::new(CertResolver::new(load_certified_key(&cfg.tls_cert, &cfg.tls_key)?));
        let tls = server_config(Arc::clone(&resolver))?;
        let poll = Poll::new().map_err(NtsKeError::EventLoop)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(NtsKeError::EventLoop)?);
        let mut listeners = Vec::with_capacity(cfg.listen.len());
        let mut local_addrs = Vec::with_capacity(cfg.listen.len());
        for (i, addr) in cfg.listen.iter().enumerate() {
            let mut l = bind(*addr).map_err(|source| NtsKeError::Bind { addr: *addr, source })?;
            local_addrs.push(l.local_addr().map_err(|source| NtsKeError::Bind { addr: *addr, source })?);
            poll.registry().register(&mut l, Token(i), Interest::READABLE).map_err(NtsKeError::EventLoop)?;
            listeners.push(l);
        }
        let seed = os_random::<32>().map_err(NtsKeError::EventLoop)?;
        let metrics = Arc::new(KeMetrics::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut el = EventLoop {
            poll,
            conns: ConnTable::new(listeners.len(), cfg.max_connections, cfg.max_connections_per_source),
            listeners,
            accept_pending: false,
            accept_paused_until: None,
            tls,
            keys,
            nonces: AesCtrNonces::new(&seed),
            limiter: HandshakeLimiter::new(cfg.handshake_rate, cfg.handshake_burst),
            metrics: Arc::clone(&metrics),
            stop: Arc::clone(&stop),
            timeout: cfg.timeout,
            limits: cfg.limits,
            server: cfg.ntp_server.clone().map(String::into_bytes),
            port: cfg.ntp_port,
            out: Vec::with_capacity(2048),
            buf: vec![0; 4096],
        };
        let on_start = cfg.on_thread_start;
        let thread = thread::Builder::new()
            .name("nts-ke".to_owned())
            .spawn(move || {
                if let Some(f) = on_start {
                    f();
                }
                el.run();
            })
            .map_err(NtsKeError::EventLoop)?;
        Ok(Self {
            local_addrs,
            resolver,
            cert_paths: (cfg.tls_cert, cfg.tls_key),
            metrics,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// The bound addresses (with the port the kernel chose for port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The server's counters.
    pub fn metrics(&self) -> &Arc<KeMetrics> {
        &self.metrics
    }

    /// Reads the certificate and key files again and serves them from the
    /// next handshake on. On error the old certificate stays.
    pub fn reload_certificates(&self) -> Result<(), NtsKeError> {
        let key = load_certified_key(&self.cert_paths.0, &self.cert_paths.1)?;
        self.resolver.replace(key);
        Ok(())
    }

    /// Reads a certificate and key from new paths and serves them from the
    /// next handshake on; later [`Self::reload_certificates`] calls read
    /// these paths. On error nothing changes.
    pub fn reload_certificates_from(&mut self, tls_cert: &Path, tls_key: &Path) -> Result<(), NtsKeError> {
        let key = load_certified_key(tls_cert, tls_key)?;
        self.resolver.replace(key);
        self.cert_paths = (tls_cert.to_owned(), tls_key.to_owned());
        Ok(())
    }

    /// Stops the event loop and waits for it; open connections are closed.
    pub fn shutdown(mut self) -> thread::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> thread::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        self.thread.take().map_or(Ok(()), JoinHandle::join)
    }
}

impl Drop for NtsKeServer {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

fn validate(cfg: &NtsKeConfig) -> Result<(), NtsKeError> {
    let bad = |s: &str| Err(NtsKeError::Config(s.to_owned()));
    if cfg.listen.is_empty() {
        return bad("no listen address");
    }
    if cfg.max_connections == 0 {
        return bad("max_connections must be at least 1");
    }
    if cfg.max_connections_per_source == 0 {
        return bad("max_connections_per_source must be at least 1");
    }
    if cfg.timeout.is_zero() {
        return bad("timeout must be more than zero");
    }
    if !cfg.handshake_rate.is_finite() || cfg.handshake_rate < 0.0 {
        return bad("handshake_rate must be a finite number >= 0");
    }
    if let Some(s) = &cfg.ntp_server
        && (s.is_empty() || s.len() > MAX_SERVER_NAME || !s.is_ascii())
    {
        return bad("ntp_server must be an ASCII host name or address of 1 to 255 characters");
    }
    Ok(())
}

/// TLS 1.3 only, ALPN `ntske/1`, no session tickets or early data (a
/// client makes one exchange and goes).
fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>, NtsKeError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![crate::ALPN.to_vec()];
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    Ok(Arc::new(cfg))
}

/// A non-blocking listener; IPv6 addresses are bound v6-only.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(LISTEN_BACKLOG)?;
    Ok(TcpListener::from_std(sock.into()))
}

enum Phase {
    Hello(Box<Acceptor>),
    Tls { tls: Box<ServerConnection>, parser: Box<KeRequestParser>, responded: bool },
    Linger,
    Flush(Vec<u8>),
}

struct Conn {
    sock: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    phase: Phase,
    /// Whether the outcome was counted already.
    counted: bool,
}

/// What a step left the connection in.
#[derive(PartialEq, Eq)]
enum Next {
    Keep,
    Close,
}

struct EventLoop {
    poll: Poll,
    listeners: Vec<TcpListener>,
    conns: ConnTable<Conn>,
    /// A listener may have connections waiting that no event will announce
    /// (accepting stopped early): accept again on the next turn.
    accept_pending: bool,
    /// Out of file descriptors with nothing to evict: no accepting before
    /// this.
    accept_paused_until: Option<Instant>,
    tls: Arc<ServerConfig>,
    keys: Arc<ArcSwap<KeyRing>>,
    nonces: AesCtrNonces,
    limiter: HandshakeLimiter,
    metrics: Arc<KeMetrics>,
    stop: Arc<AtomicBool>,
    timeout: Duration,
    limits: KeLimits,
    server: Option<Vec<u8>>,
    port: Option<u16>,
    out: Vec<u8>,
    buf: Vec<u8>,
}

impl EventLoop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut next_sweep = Instant::now() + SWEEP;
        while !self.stop.load(Ordering::Relaxed) {
            let wait = if self.accept_pending && self.accept_paused_until.is_none() { Duration::ZERO } else { SWEEP };
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!(error = %e, "NTS-KE poll failed");
                    thread::sleep(SWEEP);
                }
                continue;
            }
            for ev in &events {
                match ev.token() {
                    WAKER => {}
                    Token(i) if i < self.listeners.len() => self.accept(i),
                    token => self.drive(token),
                }
            }
            let now = Instant::now();
            if self.accept_paused_until.is_some_and(|t| now >= t) {
                self.accept_paused_until = None;
            }
            if self.accept_pending && self.accept_paused_until.is_none() {
                self.accept_pending = false;
                for i in 0..self.listeners.len() {
                    self.accept(i);
                }
            }
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + SWEEP;
            }
        }
        for t in self.conns.tokens() {
            self.close(t, FailReason::Io);
        }
    }

    /// Accepts what listener `i` has waiting, at most [`ACCEPT_BATCH`]
    /// connections (the rest on the next turn, so a connection flood cannot
    /// starve the connections already open).
    fn accept(&mut self, i: usize) {
        if self.accept_paused_until.is_some() {
            self.accept_pending = true;
            return;
        }
        for _ in 0..ACCEPT_BATCH {
            let (mut sock, peer) = match self.listeners[i].accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of descriptors: the oldest connection makes room.
                    // With none to close, wait a sweep before trying again
                    // (the listener stays readable, so retrying now would
                    // spin).
                    match self.conns.oldest() {
                        Some(t) => self.evict(t),
                        None => return self.pause_accepting(&e),
                    }
                    continue;
                }
                Err(e) => return self.pause_accepting(&e),
            };
            let now = Instant::now();
            if !self.limiter.allow(peer.ip(), now) {
                self.metrics.fail(FailReason::RateLimited);
                continue;
            }
            let source = source_key(peer.ip());
            if let Some(victim) = self.conns.victim(source) {
                self.evict(victim);
            }
            let _ = sock.set_nodelay(true);
            let token = self.conns.next_token();
            if let Err(e) = self.poll.registry().register(&mut sock, token, Interest::READABLE | Interest::WRITABLE) {
                debug!(error = %e, "NTS-KE register failed");
                self.metrics.fail(FailReason::Io);
                continue;
            }
            let conn =
                Conn { sock, peer, deadline: now + self.timeout, phase: Phase::Hello(Box::default()), counted: false };
            self.conns.insert(source, conn);
            self.metrics.connections_accepted.fetch_add(1, Ordering::Relaxed);
            self.gauge();
            // Data may already be there.
            self.drive(token);
        }
        self.accept_pending = true;
    }

    fn pause_accepting(&mut self, e: &io::Error) {
        debug!(error = %e, "NTS-KE accept failed; pausing accepts");
        self.accept_pending = true;
        self.accept_paused_until = Some(Instant::now() + SWEEP);
    }

    /// Closes a connection to make room for a new one.
    fn evict(&mut self, token: Token) {
        self.metrics.connections_evicted.fetch_add(1, Ordering::Relaxed);
        self.close(token, FailReason::TooManyConnections);
    }

    fn gauge(&self) {
        self.metrics.connections_open.store(self.conns.len() as u64, Ordering::Relaxed);
    }

    fn sweep(&mut self, now: Instant) {
        for t in self.conns.select(|c| c.deadline <= now) {
            self.close(t, FailReason::Timeout);
        }
    }

    /// Closes the connection; counts `reason` unless its outcome was
    /// counted already.
    fn close(&mut self, token: Token, reason: FailReason) {
        if let Some(mut c) = self.conns.remove(token) {
            if !c.counted {
                self.metrics.fail(reason);
                debug!(peer = %c.peer, reason = reason.name(), "NTS-KE connection failed");
            }
            let _ = self.poll.registry().deregister(&mut c.sock);
            self.gauge();
        }
    }

    fn drive(&mut self, token: Token) {
        let Some((source, mut conn)) = self.conns.take(token) else { return };
        let next = self.step(&mut conn);
        self.conns.restore(token, (source, conn));
        if let Err(reason) = next {
            self.close(token, reason);
        } else if next == Ok(Next::Close) {
            self.close(token, FailReason::Io);
        }
    }

    /// Advances a connection as far as it goes; `Err` closes it counting
    /// the reason (if nothing was counted yet).
    fn step(&mut self, c: &mut Conn) -> Result<Next, FailReason> {
        loop {
            match &mut c.phase {
                Phase::Hello(acceptor) => match self.read_hello(&mut c.sock, acceptor)? {
                    None => return Ok(Next::Keep),
                    Some(phase) => c.phase = phase,
                },
                Phase::Tls { .. } => return self.step_tls(c),
                Phase::Linger => return linger(&mut c.sock, &mut self.buf),
                Phase::Flush(bytes) => {
                    return match write_raw(&mut c.sock, bytes) {
                        Ok(true) => Ok(Next::Close),
                        Ok(false) => Ok(Next::Keep),
                        Err(_) => Ok(Next::Close),
                    };
                }
            }
            // A failed hello moved to Flush having counted its reason.
            if matches!(c.phase, Phase::Flush(_)) {
                c.counted = true;
            }
        }
    }

    /// Reads the ClientHello; `Some(phase)` once it is decided.
    fn read_hello(&mut self, sock: &mut TcpStream, acceptor: &mut Acceptor) -> Result<Option<Phase>, FailReason> {
        loop {
            match acceptor.read_tls(sock) {
                Ok(0) => return Err(FailReason::Io),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::Other => return Err(FailReason::Tls),
                Err(_) => return Err(FailReason::Io),
            }
            match acceptor.accept() {
                Ok(None) => continue,
                Ok(Some(accepted)) => {
                    let alpn_ok = accepted.client_hello().alpn().is_some_and(|mut a| a.any(|p| p == crate::ALPN));
                    if !alpn_ok {
                        self.metrics.fail(FailReason::Alpn);
                        return Ok(Some(Phase::Flush(ALERT_NO_APPLICATION_PROTOCOL.to_vec())));
                    }
                    return match accepted.into_connection(Arc::clone(&self.tls)) {
                        Ok(tls) => Ok(Some(Phase::Tls {
                            tls: Box::new(tls),
                            parser: Box::new(KeRequestParser::new(self.limits)),
                            responded: false,
                        })),
                        Err((_, mut alert)) => {
                            self.metrics.fail(FailReason::Tls);
                            let mut bytes = Vec::new();
                            let _ = alert.write_all(&mut bytes);
                            Ok(Some(Phase::Flush(bytes)))
                        }
                    };
                }
                Err((_, mut alert)) => {
                    self.metrics.fail(FailReason::Tls);
                    let mut bytes = Vec::new();
                    let _ = alert.write_all(&mut bytes);
                    return Ok(Some(Phase::Flush(bytes)));
                }
            }
        }
    }

    fn step_tls(&mut self, c: &mut Conn) -> Result<Next, FailReason> {
        let Phase::Tls { tls, parser, responded } = &mut c.phase else { return Ok(Next::Keep) };
        let mut eof = false;
        // Read and process everything there is.
        loop {
            let mut blocked = false;
            match tls.read_tls(&mut c.sock) {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => blocked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::Other => return Err(FailReason::Tls),
                Err(_) => return Err(FailReason::Io),
            }
            let state = match tls.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    // Send the alert rustls queued, then close.
                    let _ = tls.write_tls(&mut c.sock);
                    return Err(match e {
                        rustls::Error::NoApplicationProtocol => FailReason::Alpn,
                        _ => FailReason::Tls,
                    });
                }
            };
            eof |= state.peer_has_closed();
            let mut plaintext = state.plaintext_bytes_to_read();
            while plaintext > 0 {
                let n = tls.reader().read(&mut self.buf).map_err(|_| FailReason::Tls)?;
                if n == 0 {
                    break;
                }
                plaintext = plaintext.saturating_sub(n);
                if !*responded {
                    let parsed = match parser.push(&self.buf[..n]) {
                        Ok(None) => None,
                        Ok(Some(req)) => Some(Ok(req)),
                        Err(e) => Some(Err(e)),
                    };
                    if let Some(parsed) = parsed {
                        *responded = true;
                        respond(self, tls, parsed, &mut c.counted);
                    }
                }
            }
            if eof || blocked {
                break;
            }
        }
        if eof && !*responded {
            if tls.is_handshaking() {
                return Err(FailReason::Io);
            }
            let e = parser.finish().err().unwrap_or(KeError::Truncated);
            respond(self, tls, Err(e), &mut c.counted);
            *responded = true;
        }
        // Write what there is to write.
        while tls.wants_write() {
            match tls.write_tls(&mut c.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Next::Keep),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(FailReason::Io),
            }
        }
        if *responded {
            let _ = c.sock.shutdown(Shutdown::Write);
            c.deadline = c.deadline.min(Instant::now() + LINGER);
            c.phase = Phase::Linger;
            return linger(&mut c.sock, &mut self.buf);
        }
        if eof {
            return Err(FailReason::Io);
        }
        Ok(Next::Keep)
    }
}

/// Writes the response (or Error record) and a close_notify into `tls`,
/// counting the outcome.
fn respond(
    el: &mut EventLoop,
    tls: &mut ServerConnection,
    req: Result<chime_proto::nts::ke::KeRequest, KeError>,
    counted: &mut bool,
) {
    el.out.clear();
    let ring = el.keys.load();
    let accepted = crate::write_response(
        req,
        |aead| export_keys(tls, aead),
        &ring,
        &mut el.nonces,
        el.server.as_deref(),
        el.port,
        &mut el.out,
    );
    drop(ring);
    let _ = tls.writer().write_all(&el.out);
    tls.send_close_notify();
    *counted = true;
    match accepted {
        Some(aead) => {
            el.metrics.handshakes_ok.fetch_add(1, Ordering::Relaxed);
            el.metrics.cookies_issued.fetch_add(chime_proto::nts::ke::COOKIES_PER_RESPONSE as u64, Ordering::Relaxed);
            if let Some(i) = Aead::ALL.iter().position(|a| *a == aead) {
                el.metrics.responses_by_aead[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        None => el.metrics.fail(FailReason::BadRequest),
    }
}

/// The two session keys of RFC 8915 section 4.3, exported from TLS.
fn export_keys(tls: &ServerConnection, aead: Aead) -> Option<SessionKeys> {
    let n = aead.key_len();
    let mut c2s = [0u8; 32];
    let mut s2c = [0u8; 32];
    let label = EXPORTER_LABEL.as_bytes();
    tls.export_keying_material(&mut c2s[..n], label, Some(&exporter_context(aead, Direction::C2S))).ok()?;
    tls.export_keying_material(&mut s2c[..n], label, Some(&exporter_context(aead, Direction::S2C))).ok()?;
    SessionKeys::new(aead, &c2s[..n], &s2c[..n]).ok()
}

/// Reads and discards until the peer closes.
fn linger(sock: &mut TcpStream, buf: &mut [u8]) -> Result<Next, FailReason> {
    loop {
        match sock.read(buf) {
            Ok(0) => return Ok(Next::Close),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Next::Keep),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(Next::Close),
        }
    }
}

/// Writes `bytes` (consuming them); `true` once all are written.
fn write_raw(sock: &mut TcpStream, bytes: &mut Vec<u8>) -> io::Result<bool> {
    while !bytes.is_empty() {
        match sock.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
