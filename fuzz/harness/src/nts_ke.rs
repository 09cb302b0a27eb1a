//! `nts_ke`: an NTS-KE request through the streaming parser (whole, byte by
//! byte and in chunks, with the default and with tight limits) and the
//! server's response to it (`chime_nts_ke::write_response`, what the event
//! loop writes into TLS), parsed back and checked.

use chime_nts_ke::write_response;
use chime_proto::nts::ke::{
    COOKIES_PER_RESPONSE, ErrorCode, KeError, KeLimits, KeRequest, KeRequestParser, Negotiated, PROTOCOL_NTPV4, Record,
    Records, record_type, write_record,
};
use chime_proto::nts::{Aead, AesCtrNonces, KeyRing, SessionKeys, open_cookie};

/// Parses `data` as a client's NTS-KE request and answers it.
pub fn nts_ke(data: &[u8]) {
    let ring = crate::key_ring();
    for limits in [KeLimits::default(), KeLimits { max_record_body: 16, max_request: 64 }] {
        let whole = parse_chunked(data, limits, usize::MAX);
        if data.len() <= limits.max_request {
            // Where the bytes are split does not change the outcome.
            for chunk in [1, 7] {
                assert_eq!(parse_chunked(data, limits, chunk), whole, "split in chunks of {chunk}");
            }
        } else {
            assert!(whole.is_err());
        }
        if let Ok(req) = &whole {
            check_reencode(req);
        }
        check_response(&ring, whole, None, None, true);
        check_response(&ring, whole, Some(b"ntp.example.net"), Some(1123), true);
        check_response(&ring, whole, None, None, false);
    }
}

fn parse_chunked(data: &[u8], limits: KeLimits, chunk: usize) -> Result<KeRequest, KeError> {
    let mut parser = KeRequestParser::new(limits);
    let mut done = None;
    for piece in data.chunks(chunk.min(data.len().max(1))) {
        match parser.push(piece) {
            Ok(Some(req)) => done = Some(req),
            Ok(None) => assert!(done.is_none(), "a finished parser went back to reading"),
            Err(e) => {
                assert_eq!(parser.finish(), Err(e), "a failed parser forgot its error");
                assert_eq!(parser.push(&[]), Err(e));
                return Err(e);
            }
        }
    }
    let finished = parser.finish();
    if let Some(req) = done {
        assert_eq!(finished, Ok(req));
    }
    finished
}

/// A request written back as records parses to the same request.
fn check_reencode(req: &KeRequest) {
    if req.protocols.truncated() || req.aeads.truncated() {
        return;
    }
    let list = |ids: &[u16]| ids.iter().flat_map(|i| i.to_be_bytes()).collect::<Vec<u8>>();
    let mut out = Vec::new();
    write_record(&mut out, true, record_type::NEXT_PROTOCOL, &list(req.protocols.as_slice()));
    if !req.aeads.as_slice().is_empty() {
        write_record(&mut out, true, record_type::AEAD_ALGORITHM, &list(req.aeads.as_slice()));
    }
    if let Some(server) = &req.server {
        write_record(&mut out, true, record_type::SERVER, server.as_bytes());
    }
    if let Some(port) = req.port {
        write_record(&mut out, true, record_type::PORT, &port.to_be_bytes());
    }
    write_record(&mut out, true, record_type::END_OF_MESSAGE, &[]);
    let back = parse_chunked(&out, KeLimits { max_record_body: u16::MAX, max_request: usize::MAX }, usize::MAX);
    assert_eq!(back.as_ref(), Ok(req), "re-encoded request parses differently");
}

fn exported(aead: Aead) -> SessionKeys {
    let n = aead.key_len();
    SessionKeys::new(aead, &[0xC2; 32][..n], &[0x52; 32][..n]).unwrap_or_else(|e| panic!("{e:?}"))
}

fn check_response(
    ring: &KeyRing,
    req: Result<KeRequest, KeError>,
    server: Option<&[u8]>,
    port: Option<u16>,
    export_ok: bool,
) {
    let mut nonces = AesCtrNonces::new(&[7; 32]);
    let mut out = Vec::new();
    let export = |aead| export_ok.then(|| exported(aead));
    let accepted = write_response(req, export, ring, &mut nonces, server, port, &mut out);
    let records: Vec<(bool, Record<'_>)> = Records::new(&out)
        .map(|r| r.unwrap_or_else(|e| panic!("the server's response does not parse: {e:?}")))
        .collect();
    let (last, body) = records.split_last().unwrap_or_else(|| panic!("empty response"));
    assert_eq!(*last, (true, Record::EndOfMessage));
    assert!(!body.iter().any(|(_, r)| *r == Record::EndOfMessage), "End of Message before the end");
    let error = |code: ErrorCode| {
        assert_eq!(accepted, None);
        assert_eq!(body, &[(true, Record::Error(code.code()))]);
    };
    let outcome = req.and_then(|r| r.negotiate());
    match outcome {
        Err(e) => error(e.code()),
        Ok(Negotiated::NoProtocol) => {
            assert_eq!(accepted, None);
            assert!(matches!(body, [(true, Record::NextProtocol(l))] if l.is_empty()));
        }
        Ok(Negotiated::Ntpv4(_)) if !export_ok => error(ErrorCode::InternalServerError),
        Ok(Negotiated::Ntpv4(aead)) => {
            assert_eq!(accepted, Some(aead));
            check_accept(ring, body, aead, server, port);
        }
        Ok(other) => panic!("unexpected negotiation {other:?}"),
    }
}

fn check_accept(ring: &KeyRing, body: &[(bool, Record<'_>)], aead: Aead, server: Option<&[u8]>, port: Option<u16>) {
    let mut it = body.iter();
    match it.next() {
        Some((true, Record::NextProtocol(l))) => assert_eq!(l.iter().collect::<Vec<_>>(), [PROTOCOL_NTPV4]),
        other => panic!("no Next Protocol first: {other:?}"),
    }
    match it.next() {
        Some((true, Record::AeadAlgorithm(l))) => assert_eq!(l.iter().collect::<Vec<_>>(), [aead.id()]),
        other => panic!("no AEAD Algorithm second: {other:?}"),
    }
    let mut cookies = 0;
    let (mut seen_server, mut seen_port) = (None, None);
    for (critical, record) in it {
        match record {
            Record::Server(s) => seen_server = Some(*s),
            Record::Port(p) => seen_port = Some(*p),
            Record::NewCookie(c) => {
                assert!(!critical);
                assert_eq!(open_cookie(ring, c), Ok(exported(aead)), "an issued cookie does not open to the keys");
                cookies += 1;
            }
            other => panic!("unexpected record in a response: {other:?}"),
        }
    }
    assert_eq!(cookies, COOKIES_PER_RESPONSE);
    assert_eq!((seen_server, seen_port), (server, port));
}
