//! `cookie`: NTS cookies opened with the fixed key ring, cookies sealed and
//! opened again, and the key ring file format.

use chime_proto::nts::cookie::COOKIE_NONCE_LEN;
use chime_proto::nts::{Aead, COOKIE_LEN, CookieError, KeyRing, SessionKeys, open_cookie, seal_cookie};

/// Opens `data` as a cookie, seals keys taken from `data` and opens them
/// again, and decodes `data` as a key ring file.
pub fn cookie(data: &[u8]) {
    let ring = crate::key_ring();
    check_open(&ring, data);
    check_seal(&ring, data);
    check_key_ring_file(data);
}

fn check_open(ring: &KeyRing, data: &[u8]) {
    match open_cookie(ring, data) {
        Ok(keys) => {
            assert_eq!(data.len(), COOKIE_LEN);
            let n = keys.aead.key_len();
            assert!(keys.c2s[n..].iter().chain(&keys.s2c[n..]).all(|b| *b == 0), "key padding not zero");
            // Sealed again under the same key and nonce it is the same cookie
            // (SIV is deterministic).
            let mut nonce = [0u8; COOKIE_NONCE_LEN];
            nonce.copy_from_slice(&data[4..16]);
            let mut again = [0u8; COOKIE_LEN];
            let master = ring.get(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
            let master = master.unwrap_or_else(|| panic!("opened with a key the ring does not hold"));
            seal_cookie(master, &keys, &nonce, &mut again);
            assert_eq!(&again[..], data, "cookie re-seal differs");
        }
        Err(CookieError::BadLength) => assert_ne!(data.len(), COOKIE_LEN),
        Err(CookieError::UnknownKey(id)) => {
            assert_eq!(data.len(), COOKIE_LEN);
            assert!(ring.get(id).is_none());
        }
        Err(_) => assert_eq!(data.len(), COOKIE_LEN),
    }
}

/// Session keys made of the input seal into a cookie that opens to them,
/// and that no longer opens with any byte changed.
fn check_seal(ring: &KeyRing, data: &[u8]) {
    let aead = if data.first().is_some_and(|b| b & 1 == 1) { Aead::GcmSiv128 } else { Aead::SivCmac256 };
    let n = aead.key_len();
    let byte = |i: usize| data.get(i).copied().unwrap_or(i as u8);
    let c2s: Vec<u8> = (1..=n).map(byte).collect();
    let s2c: Vec<u8> = (n + 1..=2 * n).map(byte).collect();
    let keys = SessionKeys::new(aead, &c2s, &s2c).unwrap_or_else(|e| panic!("{e:?}"));
    let mut nonce = [0u8; COOKIE_NONCE_LEN];
    for (i, b) in nonce.iter_mut().enumerate() {
        *b = byte(2 * n + 1 + i);
    }
    let mut sealed = [0u8; COOKIE_LEN];
    seal_cookie(ring.current(), &keys, &nonce, &mut sealed);
    assert_eq!(open_cookie(ring, &sealed), Ok(keys));
    let flip = usize::from(byte(0)) % COOKIE_LEN;
    sealed[flip] ^= 0x01;
    assert!(open_cookie(ring, &sealed).is_err(), "a cookie with byte {flip} changed opens");
}

/// A key ring file that decodes encodes to a file that decodes to the same
/// ring, and encoding is stable from there.
fn check_key_ring_file(data: &[u8]) {
    let Ok(ring) = KeyRing::decode(data) else { return };
    let encoded = ring.encode();
    assert_eq!(encoded.len(), data.len());
    // Bytes 5..8 are reserved and not checked on decode; the rest is kept.
    assert_eq!(&encoded[..5], &data[..5]);
    assert_eq!(&encoded[8..], &data[8..]);
    let back = KeyRing::decode(&encoded).unwrap_or_else(|e| panic!("re-encoded key ring does not decode: {e}"));
    assert_eq!(back.ids().collect::<Vec<_>>(), ring.ids().collect::<Vec<_>>());
    assert_eq!((back.keep(), back.rotated_at()), (ring.keep(), ring.rotated_at()));
    assert_eq!(back.encode(), encoded);
}
