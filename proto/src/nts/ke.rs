//! NTS Key Establishment records (RFC 8915 section 4), over byte buffers.
//!
//! The NTS-KE server (crate `chime-nts-ke`) runs TLS; this module is what it
//! says inside: [`KeRequestParser`] reads a client's request as it arrives,
//! a record possibly split over several TLS reads, within size limits, into
//! a [`KeRequest`]; [`KeRequest::negotiate`] picks the protocol and AEAD;
//! [`KeResponse`] writes the reply (or an Error record) into the caller's
//! buffer. [`exporter_context`] gives the TLS exporter context of the two
//! session keys.
//!
//! A record on the wire:
//!
//! ```text
//! | C (1 bit) | record type (15 bits) | body length (16 bits) | body |
//! ```
//!
//! An unknown record with the critical bit C set fails the request with
//! Error 0 (unrecognized critical record); an unknown non-critical one is
//! skipped. Critical bits the RFC requires of *clients* are not enforced on
//! requests (being lenient there harms no one); the responses set them as
//! the RFC says.

use crate::nts::aead::Aead;
use crate::nts::cookie::{COOKIE_LEN, COOKIE_NONCE_LEN, SessionKeys, seal_cookie};
use crate::nts::keyring::KeyRing;
use crate::nts::nonce::NonceSource;

/// The critical bit of the record header.
pub const CRITICAL_BIT: u16 = 0x8000;

/// Record types of RFC 8915 section 4 (IANA "NTS Key Establishment Record
/// Types").
pub mod record_type {
    /// End of Message.
    pub const END_OF_MESSAGE: u16 = 0x0000;
    /// NTS Next Protocol Negotiation.
    pub const NEXT_PROTOCOL: u16 = 0x0001;
    /// Error.
    pub const ERROR: u16 = 0x0002;
    /// Warning.
    pub const WARNING: u16 = 0x0003;
    /// AEAD Algorithm Negotiation.
    pub const AEAD_ALGORITHM: u16 = 0x0004;
    /// New Cookie for NTPv4.
    pub const NEW_COOKIE: u16 = 0x0005;
    /// NTPv4 Server Negotiation.
    pub const SERVER: u16 = 0x0006;
    /// NTPv4 Port Negotiation.
    pub const PORT: u16 = 0x0007;
}

/// Protocol id of NTPv4 in the Next Protocol record.
pub const PROTOCOL_NTPV4: u16 = 0x0000;

/// The TLS exporter label of RFC 8915 section 4.3.
pub const EXPORTER_LABEL: &str = "EXPORTER-network-time-security";

/// The TLS ALPN protocol id of NTS-KE.
pub const ALPN: &[u8] = b"ntske/1";

/// The NTS-KE TCP port.
pub const DEFAULT_PORT: u16 = 4460;

/// Cookies in a successful response (RFC 8915 recommends eight).
pub const COOKIES_PER_RESPONSE: usize = 8;

/// The longest Server Negotiation body kept (a DNS name is at most 253
/// characters).
pub const MAX_SERVER_NAME: usize = 255;

/// Ids kept from a Next Protocol or AEAD record (negotiation itself looks at
/// every id sent).
pub const MAX_LISTED_IDS: usize = 16;

/// The two directions of an NTS session's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Direction {
    /// Client to server.
    C2S,
    /// Server to client.
    S2C,
}

/// The TLS exporter context of one session key (RFC 8915 section 4.3): the
/// protocol id (NTPv4), the AEAD id, and 0x00 for C2S or 0x01 for S2C. The
/// key is `exporter(EXPORTER_LABEL, context, aead.key_len())`.
pub const fn exporter_context(aead: Aead, direction: Direction) -> [u8; 5] {
    let [p0, p1] = PROTOCOL_NTPV4.to_be_bytes();
    let [a0, a1] = aead.id().to_be_bytes();
    let d = match direction {
        Direction::C2S => 0x00,
        Direction::S2C => 0x01,
    };
    [p0, p1, a0, a1, d]
}

/// The error codes of the Error record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 0: the request had a critical record the server does not know.
    UnrecognizedCriticalRecord,
    /// 1: the request is malformed.
    BadRequest,
    /// 2: the server failed.
    InternalServerError,
}

impl ErrorCode {
    /// The code on the wire.
    pub const fn code(self) -> u16 {
        match self {
            Self::UnrecognizedCriticalRecord => 0x0000,
            Self::BadRequest => 0x0001,
            Self::InternalServerError => 0x0002,
        }
    }

    /// From the wire; `None` for codes RFC 8915 does not define.
    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            0x0000 => Some(Self::UnrecognizedCriticalRecord),
            0x0001 => Some(Self::BadRequest),
            0x0002 => Some(Self::InternalServerError),
            _ => None,
        }
    }
}

/// Why a request is refused; [`KeError::code`] is what to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeError {
    /// A critical record of a type chime does not know.
    #[error("unrecognized critical record type {0:#06x}")]
    UnrecognizedCritical(u16),
    /// A record body longer than the configured maximum.
    #[error("record of {0} bytes exceeds the maximum record size")]
    RecordTooLarge(u16),
    /// The request grew past the configured maximum before End of Message.
    #[error("request exceeds the maximum request size")]
    RequestTooLarge,
    /// A record whose body does not fit its type.
    #[error("malformed record of type {0:#06x}")]
    MalformedRecord(u16),
    /// A record a client must not send, or must send once, sent again.
    #[error("unexpected or repeated record of type {0:#06x}")]
    UnexpectedRecord(u16),
    /// No Next Protocol record before End of Message.
    #[error("request has no Next Protocol record")]
    MissingNextProtocol,
    /// NTPv4 offered without an AEAD record.
    #[error("request has no AEAD Algorithm record")]
    MissingAead,
    /// No AEAD in the client's list that chime supports.
    #[error("no AEAD algorithm in common")]
    NoCommonAead,
    /// Bytes after End of Message, or input after the request was complete.
    #[error("data after End of Message")]
    TrailingData,
    /// The connection ended mid-request (the server calls
    /// [`KeRequestParser::finish`] at EOF).
    #[error("request truncated")]
    Truncated,
}

impl KeError {
    /// The Error record code to answer with.
    pub const fn code(self) -> ErrorCode {
        match self {
            Self::UnrecognizedCritical(_) => ErrorCode::UnrecognizedCriticalRecord,
            _ => ErrorCode::BadRequest,
        }
    }
}

/// A record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// The critical bit.
    pub critical: bool,
    /// The 15-bit record type.
    pub record_type: u16,
    /// Length of the body that follows.
    pub body_len: u16,
}

impl RecordHeader {
    /// Reads a header.
    pub const fn parse(b: [u8; 4]) -> Self {
        let t = u16::from_be_bytes([b[0], b[1]]);
        Self {
            critical: t & CRITICAL_BIT != 0,
            record_type: t & !CRITICAL_BIT,
            body_len: u16::from_be_bytes([b[2], b[3]]),
        }
    }

    /// The four wire bytes.
    pub const fn to_bytes(self) -> [u8; 4] {
        let t = (self.record_type & !CRITICAL_BIT) | if self.critical { CRITICAL_BIT } else { 0 };
        let [t0, t1] = t.to_be_bytes();
        let [l0, l1] = self.body_len.to_be_bytes();
        [t0, t1, l0, l1]
    }
}

/// Appends one record to `out`. Bodies longer than 65535 bytes cannot be
/// encoded; chime never writes one (the longest is a cookie).
pub fn write_record(out: &mut Vec<u8>, critical: bool, record_type: u16, body: &[u8]) {
    let body_len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&RecordHeader { critical, record_type, body_len }.to_bytes());
    out.extend_from_slice(&body[..usize::from(body_len)]);
}

/// One record, decoded; bodies are borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record<'a> {
    /// End of Message.
    EndOfMessage,
    /// NTS Next Protocol Negotiation: a list of protocol ids.
    NextProtocol(U16List<'a>),
    /// Error, with its code.
    Error(u16),
    /// Warning, with its code.
    Warning(u16),
    /// AEAD Algorithm Negotiation: a list of AEAD ids.
    AeadAlgorithm(U16List<'a>),
    /// New Cookie for NTPv4.
    NewCookie(&'a [u8]),
    /// NTPv4 Server Negotiation: an ASCII host name or address.
    Server(&'a [u8]),
    /// NTPv4 Port Negotiation.
    Port(u16),
    /// Any other type.
    Unknown {
        /// The record type.
        record_type: u16,
        /// The body.
        body: &'a [u8],
    },
}

impl<'a> Record<'a> {
    /// Decodes a body of the given type; malformed bodies are errors.
    pub fn decode(record_type: u16, body: &'a [u8]) -> Result<Self, KeError> {
        let bad = KeError::MalformedRecord(record_type);
        let u16_body = || match body {
            [a, b] => Ok(u16::from_be_bytes([*a, *b])),
            _ => Err(bad),
        };
        Ok(match record_type {
            record_type::END_OF_MESSAGE if body.is_empty() => Self::EndOfMessage,
            record_type::NEXT_PROTOCOL => Self::NextProtocol(U16List::new(body).ok_or(bad)?),
            record_type::ERROR => Self::Error(u16_body()?),
            record_type::WARNING => Self::Warning(u16_body()?),
            record_type::AEAD_ALGORITHM => Self::AeadAlgorithm(U16List::new(body).ok_or(bad)?),
            record_type::NEW_COOKIE => Self::NewCookie(body),
            record_type::SERVER => Self::Server(body),
            record_type::PORT => Self::Port(u16_body()?),
            record_type::END_OF_MESSAGE => return Err(bad),
            _ => Self::Unknown { record_type, body },
        })
    }
}

/// A body of big-endian u16s, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct U16List<'a>(&'a [u8]);

impl<'a> U16List<'a> {
    /// `None` if the length is odd.
    pub fn new(body: &'a [u8]) -> Option<Self> {
        body.len().is_multiple_of(2).then_some(Self(body))
    }

    /// The ids in order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + 'a {
        self.0.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Iterates the records of a complete message (a client reading a
/// response, tests); yields `(critical, record)`, and stops after the first
/// error. A record cut off by the end of the buffer is [`KeError::Truncated`].
#[derive(Clone, Debug)]
pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Records<'a> {
    /// Records in `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(bool, Record<'a>), KeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = self.rest;
        self.rest = &[];
        let Some(&[a, b, c, d]) = rest.get(..4) else { return Some(Err(KeError::Truncated)) };
        let h = RecordHeader::parse([a, b, c, d]);
        let Some(body) = rest.get(4..4 + usize::from(h.body_len)) else { return Some(Err(KeError::Truncated)) };
        let record = Record::decode(h.record_type, body);
        if record.is_ok() {
            self.rest = &rest[4 + body.len()..];
        }
        Some(record.map(|r| (h.critical, r)))
    }
}

/// Up to [`MAX_LISTED_IDS`] ids of a list record, in the client's order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdList {
    ids: [u16; MAX_LISTED_IDS],
    len: usize,
    truncated: bool,
}

impl IdList {
    fn push(&mut self, id: u16) {
        if self.len < MAX_LISTED_IDS {
            self.ids[self.len] = id;
            self.len += 1;
        } else {
            self.truncated = true;
        }
    }

    /// The ids kept, in order.
    pub fn as_slice(&self) -> &[u16] {
        &self.ids[..self.len]
    }

    /// Whether the client sent more than [`MAX_LISTED_IDS`].
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

/// The Server Negotiation body of a request, bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerName {
    bytes: [u8; MAX_SERVER_NAME],
    len: usize,
}

impl ServerName {
    /// The name's bytes (ASCII by the RFC, not checked).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A complete, well-formed NTS-KE request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeRequest {
    /// Protocol ids offered (Next Protocol record), client order.
    pub protocols: IdList,
    /// AEAD ids offered, client order.
    pub aeads: IdList,
    /// Whether NTPv4 was among the protocols.
    pub offers_ntpv4: bool,
    /// The first AEAD in the client's order that chime supports.
    pub preferred_aead: Option<Aead>,
    /// The NTP server the client asked for (Server Negotiation), if any.
    pub server: Option<ServerName>,
    /// The NTP port the client asked for (Port Negotiation), if any.
    pub port: Option<u16>,
}

impl KeRequest {
    /// Whether the client sent a Server Negotiation record.
    pub fn wants_server(&self) -> bool {
        self.server.is_some()
    }

    /// Whether the client sent a Port Negotiation record.
    pub fn wants_port(&self) -> bool {
        self.port.is_some()
    }

    /// What to answer: NTPv4 with the client's most preferred AEAD that
    /// chime supports; no protocol if NTPv4 was not offered; an error if it
    /// was but no AEAD is in common.
    pub fn negotiate(&self) -> Result<Negotiated, KeError> {
        if !self.offers_ntpv4 {
            return Ok(Negotiated::NoProtocol);
        }
        self.preferred_aead.map(Negotiated::Ntpv4).ok_or(KeError::NoCommonAead)
    }
}

/// The outcome of negotiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Negotiated {
    /// NTPv4 with this AEAD: the server exports the keys and answers with
    /// cookies.
    Ntpv4(Aead),
    /// No protocol in common: the answer is an empty Next Protocol record.
    NoProtocol,
}

/// Size limits of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeLimits {
    /// The largest record body accepted (of a record chime reads; unknown
    /// non-critical records are skipped without buffering, but still count
    /// towards `max_request`).
    pub max_record_body: u16,
    /// The largest whole request, headers included.
    pub max_request: usize,
}

impl Default for KeLimits {
    fn default() -> Self {
        Self { max_record_body: 1024, max_request: 8192 }
    }
}

/// A streaming request parser: feed it bytes as TLS yields them. It keeps
/// one record body at a time, in a buffer allocated once.
#[derive(Debug)]
pub struct KeRequestParser {
    limits: KeLimits,
    total: usize,
    header: [u8; 4],
    header_len: usize,
    /// The record being read, once its header is complete, and whether its
    /// body is kept (known types) or skipped (unknown non-critical ones).
    record: Option<(RecordHeader, bool)>,
    /// Body bytes of that record read so far.
    read: usize,
    body: Vec<u8>,
    seen_protocols: bool,
    seen_aead: bool,
    request: KeRequest,
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Reading,
    Done,
    Failed(KeError),
}

impl KeRequestParser {
    /// A parser with these limits.
    pub fn new(limits: KeLimits) -> Self {
        Self {
            limits,
            total: 0,
            header: [0; 4],
            header_len: 0,
            record: None,
            read: 0,
            body: Vec::with_capacity(usize::from(limits.max_record_body)),
            seen_protocols: false,
            seen_aead: false,
            request: KeRequest {
                protocols: IdList::default(),
                aeads: IdList::default(),
                offers_ntpv4: false,
                preferred_aead: None,
                server: None,
                port: None,
            },
            state: State::Reading,
        }
    }

    /// Consumes bytes. `Ok(None)`: more needed; `Ok(Some(request))`: End of
    /// Message reached (exactly at the end of `bytes`); `Err`: answer with
    /// [`KeError::code`] and close. Once it returned a request or an error,
    /// every further call is an error.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<KeRequest>, KeError> {
        match self.state {
            State::Reading => {}
            State::Done if bytes.is_empty() => return Ok(Some(self.request)),
            State::Done => return Err(self.fail(KeError::TrailingData)),
            State::Failed(e) => return Err(e),
        }
        match self.step(bytes) {
            Ok(()) => Ok((self.state == State::Done).then_some(self.request)),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Tells the parser the peer closed its side: an error unless the
    /// request was complete.
    pub fn finish(&mut self) -> Result<KeRequest, KeError> {
        match self.state {
            State::Done => Ok(self.request),
            State::Failed(e) => Err(e),
            State::Reading => Err(self.fail(KeError::Truncated)),
        }
    }

    fn fail(&mut self, e: KeError) -> KeError {
        self.state = State::Failed(e);
        e
    }

    fn step(&mut self, mut bytes: &[u8]) -> Result<(), KeError> {
        self.total = self.total.saturating_add(bytes.len());
        if self.total > self.limits.max_request {
            return Err(KeError::RequestTooLarge);
        }
        while !bytes.is_empty() {
            if self.state == State::Done {
                return Err(KeError::TrailingData);
            }
            let Some((h, keep)) = self.record else {
                let n = (4 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == 4 {
                    self.header_len = 0;
                    self.start_record(RecordHeader::parse(self.header))?;
                }
                continue;
            };
            let n = (usize::from(h.body_len) - self.read).min(bytes.len());
            if keep {
                self.body.extend_from_slice(&bytes[..n]);
            }
            self.read += n;
            bytes = &bytes[n..];
            if self.read == usize::from(h.body_len) {
                self.end_record(h, keep)?;
            }
        }
        Ok(())
    }

    fn start_record(&mut self, h: RecordHeader) -> Result<(), KeError> {
        let known = h.record_type <= record_type::PORT;
        if !known && h.critical {
            return Err(KeError::UnrecognizedCritical(h.record_type));
        }
        if known && h.body_len > self.limits.max_record_body {
            return Err(KeError::RecordTooLarge(h.body_len));
        }
        self.record = Some((h, known));
        self.read = 0;
        self.body.clear();
        if h.body_len == 0 {
            self.end_record(h, known)?;
        }
        Ok(())
    }

    fn end_record(&mut self, h: RecordHeader, keep: bool) -> Result<(), KeError> {
        self.record = None;
        if !keep {
            return Ok(());
        }
        // Taken out and put back so the buffer keeps its capacity.
        let body = core::mem::take(&mut self.body);
        let result = self.apply(h.record_type, &body);
        self.body = body;
        result
    }

    fn apply(&mut self, record_type: u16, body: &[u8]) -> Result<(), KeError> {
        let req = &mut self.request;
        match Record::decode(record_type, body)? {
            Record::EndOfMessage => {
                if !self.seen_protocols {
                    return Err(KeError::MissingNextProtocol);
                }
                if req.offers_ntpv4 && !self.seen_aead {
                    return Err(KeError::MissingAead);
                }
                self.state = State::Done;
            }
            Record::NextProtocol(list) => {
                if self.seen_protocols {
                    return Err(KeError::UnexpectedRecord(record_type));
                }
                if list.is_empty() {
                    return Err(KeError::MalformedRecord(record_type));
                }
                self.seen_protocols = true;
                for id in list.iter() {
                    req.protocols.push(id);
                    req.offers_ntpv4 |= id == PROTOCOL_NTPV4;
                }
            }
            Record::AeadAlgorithm(list) => {
                if self.seen_aead {
                    return Err(KeError::UnexpectedRecord(record_type));
                }
                if list.is_empty() {
                    return Err(KeError::MalformedRecord(record_type));
                }
                self.seen_aead = true;
                for id in list.iter() {
                    req.aeads.push(id);
                    if req.preferred_aead.is_none() {
                        req.preferred_aead = Aead::from_id(id);
                    }
                }
            }
            // Servers send these, clients must not.
            Record::Error(_) | Record::Warning(_) => return Err(KeError::UnexpectedRecord(record_type)),
            // Meaningless in a request; harmless.
            Record::NewCookie(_) | Record::Unknown { .. } => {}
            Record::Server(name) => {
                if req.server.is_some() || name.is_empty() || name.len() > MAX_SERVER_NAME {
                    return Err(KeError::MalformedRecord(record_type));
                }
                let mut s = ServerName { bytes: [0; MAX_SERVER_NAME], len: name.len() };
                s.bytes[..name.len()].copy_from_slice(name);
                req.server = Some(s);
            }
            Record::Port(port) => {
                if req.port.is_some() {
                    return Err(KeError::UnexpectedRecord(record_type));
                }
                req.port = Some(port);
            }
        }
        Ok(())
    }
}

/// A server response.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum KeResponse<'a> {
    /// NTPv4 with `aead`: Next Protocol, AEAD, optional Server and Port
    /// records, [`COOKIES_PER_RESPONSE`] New Cookie records holding `keys`
    /// sealed under the ring's current key, End of Message.
    Accept {
        /// The negotiated AEAD (the same as `keys.aead`).
        aead: Aead,
        /// The session keys exported from TLS.
        keys: &'a SessionKeys,
        /// The NTP server to send the client to, if not this host.
        server: Option<&'a [u8]>,
        /// The NTP port to send the client to, if not 123.
        port: Option<u16>,
    },
    /// No protocol in common: an empty Next Protocol record, End of Message.
    NoProtocol,
    /// An Error record and End of Message.
    Error(ErrorCode),
}

impl KeResponse<'_> {
    /// The response for a negotiation outcome or a parse error; `keys` are
    /// needed only for [`Negotiated::Ntpv4`] (and must be of its AEAD).
    pub fn for_outcome<'a>(
        outcome: Result<Negotiated, KeError>,
        keys: &'a SessionKeys,
        server: Option<&'a [u8]>,
        port: Option<u16>,
    ) -> KeResponse<'a> {
        match outcome {
            Ok(Negotiated::Ntpv4(aead)) if keys.aead == aead => KeResponse::Accept { aead, keys, server, port },
            Ok(Negotiated::Ntpv4(_)) => KeResponse::Error(ErrorCode::InternalServerError),
            Ok(Negotiated::NoProtocol) => KeResponse::NoProtocol,
            Err(e) => KeResponse::Error(e.code()),
        }
    }

    /// Appends the response's records to `out`. Only [`KeResponse::Accept`]
    /// uses `ring` and `nonces`.
    pub fn write(&self, ring: &KeyRing, nonces: &mut dyn NonceSource, out: &mut Vec<u8>) {
        match *self {
            Self::Accept { aead, keys, server, port } => {
                write_record(out, true, record_type::NEXT_PROTOCOL, &PROTOCOL_NTPV4.to_be_bytes());
                write_record(out, true, record_type::AEAD_ALGORITHM, &aead.id().to_be_bytes());
                if let Some(server) = server {
                    write_record(out, true, record_type::SERVER, server);
                }
                if let Some(port) = port {
                    write_record(out, true, record_type::PORT, &port.to_be_bytes());
                }
                let mut cookie = [0u8; COOKIE_LEN];
                let mut nonce = [0u8; COOKIE_NONCE_LEN];
                for _ in 0..COOKIES_PER_RESPONSE {
                    nonces.fill(&mut nonce);
                    seal_cookie(ring.current(), keys, &nonce, &mut cookie);
                    write_record(out, false, record_type::NEW_COOKIE, &cookie);
                }
            }
            Self::NoProtocol => write_record(out, true, record_type::NEXT_PROTOCOL, &[]),
            Self::Error(code) => write_record(out, true, record_type::ERROR, &code.code().to_be_bytes()),
        }
        write_record(out, true, record_type::END_OF_MESSAGE, &[]);
    }
}
