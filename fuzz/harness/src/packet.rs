//! `ntp_packet`: the NTP header, extension fields and the NTS field parser.

use chime_proto::ext::{ExtensionError, ExtensionFields, write_extension_field};
use chime_proto::nts::ntp::{NtsRequest, has_nts_fields};
use chime_proto::packet::{HEADER_LEN, Header, Packet, ParseError, Trailer};

/// Parses `data` as an NTP datagram and checks the parse against the bytes.
pub fn ntp_packet(data: &[u8]) {
    check_header(data);
    check_fields(data.get(HEADER_LEN..).unwrap_or(&[]));
    match Packet::parse(data) {
        Ok(packet) => check_packet(data, &packet),
        Err(ParseError::TooShort) => assert!(data.len() < HEADER_LEN),
        Err(ParseError::Extension(e)) => {
            assert!(data.len() > HEADER_LEN);
            let first_error = ExtensionFields::new(&data[HEADER_LEN..]).find_map(Result::err);
            assert_eq!(first_error, Some(e), "the packet error is the first field error");
        }
        Err(e) => panic!("unexpected parse error {e:?}"),
    }
    check_nts_fields(data);
}

/// The header is every bit of the first 48 bytes: writing it back gives
/// them unchanged.
fn check_header(data: &[u8]) {
    let Ok(header) = Header::parse(data) else {
        assert!(data.len() < HEADER_LEN);
        return;
    };
    let mut out = [0u8; HEADER_LEN];
    header.write(&mut out);
    assert_eq!(&out[..], &data[..HEADER_LEN], "header round trip");
    assert_eq!(Header::parse(&out), Ok(header));
}

/// The extension field iterator ends, stops after its first error, and
/// every field it yields lies within the input, is written back unchanged,
/// and tiles the input from its start.
fn check_fields(bytes: &[u8]) {
    let mut it = ExtensionFields::new(bytes);
    let mut at = 0;
    let mut steps = 0;
    while let Some(item) = it.next() {
        steps += 1;
        assert!(steps <= bytes.len() / 16 + 1, "iterator does not advance");
        match item {
            Ok(f) => {
                let wire = &bytes[at..at + f.wire_len()];
                assert_eq!(&wire[4..], f.value);
                let mut out = vec![0u8; f.wire_len()];
                assert_eq!(write_extension_field(&mut out, f.field_type, f.value), Ok(f.wire_len()));
                assert_eq!(out, wire, "extension field round trip");
                at += f.wire_len();
            }
            Err(e) => {
                let rest = &bytes[at..];
                match e {
                    ExtensionError::TruncatedHeader => assert!(rest.len() < 4),
                    ExtensionError::BadLength(len) => assert!(len < 16 || len % 4 != 0),
                    ExtensionError::Overrun(len) => assert!(usize::from(len) > rest.len()),
                    _ => panic!("unexpected extension error {e:?}"),
                }
                assert_eq!(it.next(), None, "iterator stops after an error");
                return;
            }
        }
    }
    assert_eq!(at, bytes.len(), "fields cover the input");
}

fn check_packet(data: &[u8], packet: &Packet<'_>) {
    let rest = &data[HEADER_LEN..];
    let extensions = match packet.trailer {
        Trailer::None => {
            assert!(rest.is_empty());
            &[][..]
        }
        Trailer::Extensions(e) => {
            assert_eq!(e, rest);
            assert!(!e.is_empty());
            e
        }
        Trailer::Mac { extensions, mac } => {
            assert!(matches!(mac.len(), 4 | 20 | 24), "MAC of {} bytes", mac.len());
            assert_eq!(extensions.len() + mac.len(), rest.len());
            assert_eq!(&rest[..extensions.len()], extensions);
            assert_eq!(&rest[extensions.len()..], mac);
            extensions
        }
    };
    let total: usize = packet
        .extension_fields()
        .map(|f| match f {
            Ok(f) => f.wire_len(),
            Err(e) => panic!("a parsed packet's fields do not parse: {e:?}"),
        })
        .sum();
    assert_eq!(total, extensions.len());
}

/// The NTS request parser's views all point into the request where the
/// RFC 8915 layout says.
fn check_nts_fields(data: &[u8]) {
    let has = has_nts_fields(data);
    let Ok(req) = NtsRequest::parse(data) else { return };
    assert!(has, "an NTS request without NTS fields");
    assert!(data.starts_with(req.associated_data));
    assert!(req.associated_data.len() >= HEADER_LEN + req.unique_id_field.len());
    assert!(req.unique_id_field.len() >= 4 + 32);
    assert_eq!(&req.unique_id_field[..2], &[0x01, 0x04]);
    assert!(req.ciphertext.len() >= 16, "ciphertext shorter than a tag");
    let within = |s: &[u8]| {
        let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
        let p = s.as_ptr() as usize;
        p >= start && p + s.len() <= end
    };
    for part in [req.unique_id_field, req.cookie, req.nonce, req.ciphertext] {
        assert!(within(part), "a view outside the request");
    }
    // Everything from the authenticator on is after the associated data.
    let auth_at = req.associated_data.len();
    assert!(req.nonce.as_ptr() as usize >= data.as_ptr() as usize + auth_at);
}
