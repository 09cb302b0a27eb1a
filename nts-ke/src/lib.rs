//! chime's NTS-KE server (RFC 8915 section 4).
//!
//! TLS 1.3 only (rustls with the `ring` provider) on TCP port 4460, ALPN
//! `ntske/1` required, in a mio event loop on one thread of its own. The
//! protocol inside TLS is `chime_proto::nts::ke` (sans-IO): a streaming
//! request parser, negotiation and the response writer; this crate adds the
//! sockets, TLS, limits and counters around it.
//!
//! - [`NtsKeServer::start`] binds, loads the certificate and spawns the
//!   event loop; [`NtsKeServer::reload_certificates`] swaps in a renewed
//!   certificate (chimed calls it on SIGHUP) with no dropped service: new
//!   handshakes use the new one, connections in flight keep theirs, and a
//!   bad new certificate or key leaves the old one in place.
//! - Cookies are sealed under the current key of the [`KeyRing`] read from
//!   the shared `Arc<ArcSwap<KeyRing>>` for each response, so a rotation
//!   by the owner of the ring (chimed's control thread) applies at once.
//! - Every connection has one deadline for handshake, request and response
//!   ([`NtsKeConfig::timeout`]); at most [`NtsKeConfig::max_connections`]
//!   are open, at most [`NtsKeConfig::max_connections_per_source`] from one
//!   source address (IPv4 address, IPv6 /64). A new connection over either
//!   limit is not refused: the oldest connection (of all, or of that
//!   source) is closed to make room, so idle connections cannot lock
//!   clients out. Running out of file descriptors evicts the same way.
//!   Each source also gets a token bucket of handshakes.
//! - [`KeMetrics`] counts outcomes: handshakes ok, failures by
//!   [`FailReason`], cookies issued, responses by AEAD.
#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use chime_proto::nts::ke::{ErrorCode, KeError, KeLimits, KeRequest, KeResponse, Negotiated};
use chime_proto::nts::{Aead, NonceSource, SessionKeys};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

mod ratelimit;
mod server;
mod table;

pub use chime_proto::nts::KeyRing;
pub use chime_proto::nts::ke::{ALPN, DEFAULT_PORT};
pub use server::NtsKeServer;

/// Everything the server is configured with. (Not `PartialEq`: it holds a
/// function pointer, whose comparison means nothing.)
#[derive(Clone, Debug)]
pub struct NtsKeConfig {
    /// TCP addresses to listen on (IPv6 ones are bound v6-only, so
    /// `0.0.0.0:4460` and `[::]:4460` can both be listed).
    pub listen: Vec<SocketAddr>,
    /// PEM file with the certificate chain, end-entity certificate first.
    pub tls_cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1); must not be
    /// readable by group or others.
    pub tls_key: PathBuf,
    /// Longest a connection may take for handshake, request and response.
    pub timeout: Duration,
    /// Most connections open at once; a new one over the limit evicts the
    /// oldest.
    pub max_connections: usize,
    /// Most connections open at once from one source (IPv4 address, IPv6
    /// /64); a new one over the limit evicts that source's oldest.
    pub max_connections_per_source: usize,
    /// Handshakes per second each source address (IPv4 address, IPv6 /64)
    /// may start, on average; 0 = no limit.
    pub handshake_rate: f64,
    /// Handshakes a source may start in a burst.
    pub handshake_burst: u32,
    /// Size limits of a request.
    pub limits: KeLimits,
    /// NTPv4 Server Negotiation record to send (the NTP host the clients
    /// should use, if not this one).
    pub ntp_server: Option<String>,
    /// NTPv4 Port Negotiation record to send (if not 123).
    pub ntp_port: Option<u16>,
    /// Called first thing on the event loop's thread (chimed drops that
    /// thread's capabilities with it).
    pub on_thread_start: Option<fn()>,
}

impl Default for NtsKeConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)), SocketAddr::from(([0u16; 8], DEFAULT_PORT))],
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_connections_per_source: 16,
            handshake_rate: 20.0,
            handshake_burst: 40,
            limits: KeLimits::default(),
            ntp_server: None,
            ntp_port: None,
            on_thread_start: None,
        }
    }
}

/// What can go wrong starting the server or reloading its certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NtsKeError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A secret file that group or others may read, write or execute.
    #[error(
        "{path}: mode {mode:04o} gives group or others access to this secret (any of the bits 0077); it must \
         be its owner's alone: chmod 600 {path}"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The certificate file holds no certificate, or is not PEM.
    #[error("{path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file holds no usable key, or it does not match the
    /// certificate.
    #[error("{path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// TLS configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A listening socket.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The event loop (poll, waker, thread).
    #[error("event loop: {0}")]
    EventLoop(io::Error),
    /// A configuration value.
    #[error("{0}")]
    Config(String),
}

/// Writes the response to a request (or to the parser's error) into `out`:
/// the bytes the event loop sends inside TLS, with no socket involved.
/// `export` gives the session keys of the negotiated AEAD from the TLS
/// exporter (`None`: an Internal Server Error record). Cookies are sealed
/// under `ring`'s current key. Returns the AEAD of a response with cookies,
/// `None` for an Error record or a negative (no protocol) response.
pub fn write_response(
    request: Result<KeRequest, KeError>,
    export: impl FnOnce(Aead) -> Option<SessionKeys>,
    ring: &KeyRing,
    nonces: &mut dyn NonceSource,
    server: Option<&[u8]>,
    port: Option<u16>,
    out: &mut Vec<u8>,
) -> Option<Aead> {
    let outcome = request.and_then(|r| r.negotiate());
    let keys = match outcome {
        Ok(Negotiated::Ntpv4(aead)) => export(aead),
        _ => None,
    };
    let dummy = SessionKeys { aead: Aead::SivCmac256, c2s: [0; 32], s2c: [0; 32] };
    let response = match (&outcome, &keys) {
        (Ok(Negotiated::Ntpv4(_)), None) => KeResponse::Error(ErrorCode::InternalServerError),
        _ => KeResponse::for_outcome(outcome, keys.as_ref().unwrap_or(&dummy), server, port),
    };
    response.write(ring, nonces, out);
    match response {
        KeResponse::Accept { aead, .. } => Some(aead),
        _ => None,
    }
}

/// Reads a secret file (a TLS private key, NTS master keys, a fleet
/// secret), refusing it unless only its owner has access: any permission
/// bit for group or others (`mode & 0o077`) is refused. Read and write
/// bits both matter (a secret others can replace is as bad as one they can
/// read); an execute bit on a key file only ever comes from a careless
/// `chmod`, and refusing it keeps the rule one number. The mode is that of
/// the file opened (not of the path looked up earlier), so the check and
/// the bytes read cannot differ.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, NtsKeError> {
    use std::os::unix::fs::PermissionsExt;
    let read_err = |source| NtsKeError::Read { path: path.to_owned(), source };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(NtsKeError::Permissions { path: path.to_owned(), mode });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(read_err)?;
    Ok(bytes)
}

/// `N` bytes from the operating system's random source.
pub fn os_random<const N: usize>() -> io::Result<[u8; N]> {
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

/// The crypto provider every TLS object of the server uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a certificate chain and its private key from PEM files, checking
/// the key file's permissions and that key and certificate match.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, NtsKeError> {
    let cert_err = |reason: String| NtsKeError::Certificate { path: cert.to_owned(), reason };
    let key_err = |reason: String| NtsKeError::Key { path: key.to_owned(), reason };
    let cert_pem = std::fs::read(cert).map_err(|source| NtsKeError::Read { path: cert.to_owned(), source })?;
    let key_pem = read_secret_file(key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err("no certificate in the file".to_owned()));
    }
    let private =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| key_err(format!("no usable private key: {e}")))?;
    CertifiedKey::from_der(chain, private, &provider()).map_err(|e| key_err(format!("{e}")))
}

/// The certificate every new handshake gets: held in an [`ArcSwap`] so a
/// reload replaces it without touching connections in flight.
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    /// A resolver serving `key`.
    pub fn new(key: CertifiedKey) -> Self {
        Self { current: ArcSwap::from_pointee(key) }
    }

    /// Serves `key` from the next handshake on.
    pub fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    /// The certificate being served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

/// Why an NTS-KE connection did not end with cookies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailReason {
    /// TLS failed: handshake error, bad record, unexpected message.
    Tls,
    /// The client did not offer ALPN `ntske/1`.
    Alpn,
    /// The connection's deadline passed before the response was written.
    Timeout,
    /// The request was malformed, incomplete or negotiated nothing (the
    /// client got an Error record, or an empty Next Protocol record).
    BadRequest,
    /// The source had used up its handshakes (closed at accept).
    RateLimited,
    /// Evicted: the oldest connection (of all, or of its source), closed
    /// to make room for a new one when a connection limit was reached or
    /// file descriptors ran out.
    TooManyConnections,
    /// A socket error or the peer closing mid-exchange.
    Io,
}

impl FailReason {
    /// Every reason, in the order of [`KeMetrics::failed`].
    pub const ALL: [Self; 7] =
        [Self::Tls, Self::Alpn, Self::Timeout, Self::BadRequest, Self::RateLimited, Self::TooManyConnections, Self::Io];

    /// The name used in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Alpn => "alpn",
            Self::Timeout => "timeout",
            Self::BadRequest => "bad_request",
            Self::RateLimited => "rate_limited",
            Self::TooManyConnections => "too_many_connections",
            Self::Io => "io",
        }
    }

    /// Position in [`FailReason::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Self::Tls => 0,
            Self::Alpn => 1,
            Self::Timeout => 2,
            Self::BadRequest => 3,
            Self::RateLimited => 4,
            Self::TooManyConnections => 5,
            Self::Io => 6,
        }
    }
}

/// The server's counters, updated by the event loop, read by anyone.
#[derive(Debug, Default)]
pub struct KeMetrics {
    /// Exchanges that ended with cookies sent.
    pub handshakes_ok: AtomicU64,
    /// Connections that did not, by [`FailReason::index`].
    pub failed: [AtomicU64; FailReason::ALL.len()],
    /// Cookies sent.
    pub cookies_issued: AtomicU64,
    /// Successful responses by AEAD, in the order of [`Aead::ALL`].
    pub responses_by_aead: [AtomicU64; Aead::ALL.len()],
    /// Connections open now (a gauge).
    pub connections_open: AtomicU64,
    /// Connections accepted (past the handshake rate limit) since start.
    pub connections_accepted: AtomicU64,
    /// Connections evicted to make room (also counted as failures
    /// [`FailReason::TooManyConnections`] unless they had been answered).
    pub connections_evicted: AtomicU64,
}

impl KeMetrics {
    /// Failures for one reason.
    pub fn failures(&self, reason: FailReason) -> u64 {
        self.failed[reason.index()].load(Ordering::Relaxed)
    }

    /// Successful responses that negotiated `aead`.
    pub fn responses(&self, aead: Aead) -> u64 {
        Aead::ALL.iter().position(|a| *a == aead).map_or(0, |i| self.responses_by_aead[i].load(Ordering::Relaxed))
    }

    /// Successful exchanges.
    pub fn ok(&self) -> u64 {
        self.handshakes_ok.load(Ordering::Relaxed)
    }

    /// Cookies sent.
    pub fn cookies(&self) -> u64 {
        self.cookies_issued.load(Ordering::Relaxed)
    }

    pub(crate) fn fail(&self, reason: FailReason) {
        self.failed[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}
