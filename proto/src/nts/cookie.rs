//! NTS cookies: the session keys of one client, sealed under a server master
//! key, so that the server keeps no per-client state.
//!
//! # Format (version 2), 100 bytes
//!
//! ```text
//!  offset  len  field
//!  0       4    key id, u32 big-endian        \ associated data: one S2V
//!  4       12   nonce, random                 / component of 16 bytes
//!  16      68   ciphertext of:
//!                 0   2   AEAD id, u16 big-endian (15 or 30)
//!                 2   2   reserved, zero
//!                 4   32  C2S key, zero-padded to 32 bytes
//!                 36  32  S2C key, zero-padded to 32 bytes
//!  84      16   tag (the synthetic IV)
//! ```
//!
//! Sealed with `AEAD_AES_SIV_CMAC_256` (RFC 5297) under the key derived
//! from the master key named by the key id ([`MasterKey`]), with the
//! first 16 bytes (key id and nonce) as the only associated-data
//! component; the tag is stored after the ciphertext. Version 1 used
//! AES-128-GCM-SIV; it was replaced, measured, because GCM-SIV derives a
//! fresh key per message (four AES blocks and a key expansion) and
//! POLYVALs 7 blocks, while SIV with the master key's schedules, CMAC
//! subkeys and `CMAC(0)` computed once at rotation needs only 6 serial
//! CMAC blocks and 5 CTR blocks per cookie: about 1 650 instructions per
//! cookie sealed or opened became about 1 000 (see `bench/README.md`).
//! Cookies of version 1 do not open (the client gets an NTS NAK and
//! redoes NTS-KE).
//!
//! The random 96-bit nonce makes the sealing randomized; SIV is
//! nonce-misuse resistant, so even a repeated nonce would reveal no more
//! than whether two cookies hold the same keys.
//!
//! The length is fixed whatever the AEAD (it is a multiple of 4, so the
//! cookie fills an NTP extension field with no padding, and a cookie's
//! length says nothing), and the key id in the clear lets the server find
//! the master key without trial decryption.

use core::fmt;

use crate::nts::aead::{Aead, AeadError, MAX_KEY_LEN, TAG_LEN};
use crate::nts::keyring::{KeyRing, MasterKey};

/// Length of every cookie chime issues.
pub const COOKIE_LEN: usize = 100;
/// Length of the nonce inside a cookie.
pub const COOKIE_NONCE_LEN: usize = 12;

const KEY_ID_LEN: usize = 4;
const PLAINTEXT_LEN: usize = 68;
const CIPHERTEXT_AT: usize = KEY_ID_LEN + COOKIE_NONCE_LEN;
const TAG_AT: usize = CIPHERTEXT_AT + PLAINTEXT_LEN;
const _: () = assert!(TAG_AT + TAG_LEN == COOKIE_LEN && COOKIE_LEN.is_multiple_of(4));

/// The keys of one NTS session, as exported from the NTS-KE TLS session
/// (RFC 8915 section 4.3) and carried in its cookies. Stack-only.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// The negotiated AEAD.
    pub aead: Aead,
    /// Client-to-server key; only the first [`Aead::key_len`] bytes are
    /// used, the rest are zero.
    pub c2s: [u8; MAX_KEY_LEN],
    /// Server-to-client key, likewise.
    pub s2c: [u8; MAX_KEY_LEN],
}

impl SessionKeys {
    /// Session keys from the two exported keys, each [`Aead::key_len`] bytes.
    pub fn new(aead: Aead, c2s: &[u8], s2c: &[u8]) -> Result<Self, AeadError> {
        let n = aead.key_len();
        if c2s.len() != n || s2c.len() != n {
            return Err(AeadError::KeyLength);
        }
        let mut keys = Self { aead, c2s: [0; MAX_KEY_LEN], s2c: [0; MAX_KEY_LEN] };
        keys.c2s[..n].copy_from_slice(c2s);
        keys.s2c[..n].copy_from_slice(s2c);
        Ok(keys)
    }

    /// The client-to-server key.
    pub fn c2s(&self) -> &[u8] {
        &self.c2s[..self.aead.key_len()]
    }

    /// The server-to-client key.
    pub fn s2c(&self) -> &[u8] {
        &self.s2c[..self.aead.key_len()]
    }
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys").field("aead", &self.aead).finish_non_exhaustive()
    }
}

/// Why a cookie does not open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CookieError {
    /// Not [`COOKIE_LEN`] bytes: not one of ours.
    #[error("cookie has the wrong length")]
    BadLength,
    /// Sealed under a master key the ring no longer (or never) had.
    #[error("cookie key id {0:#010x} is not in the key ring")]
    UnknownKey(u32),
    /// The tag does not verify: forged or damaged.
    #[error("cookie does not authenticate")]
    BadTag,
    /// Authentic, but its contents are not a valid session (cannot happen
    /// for cookies chime sealed, unless the format changed).
    #[error("cookie contents are invalid")]
    BadContents,
}

/// Seals `keys` under `master` with `nonce` into `out`.
pub fn seal_cookie(master: &MasterKey, keys: &SessionKeys, nonce: &[u8; COOKIE_NONCE_LEN], out: &mut [u8; COOKIE_LEN]) {
    let key_id = master.id().to_be_bytes();
    out[..KEY_ID_LEN].copy_from_slice(&key_id);
    out[KEY_ID_LEN..CIPHERTEXT_AT].copy_from_slice(nonce);
    let (ad, rest) = out.split_at_mut(CIPHERTEXT_AT);
    let plain = &mut rest[..PLAINTEXT_LEN];
    plain[..2].copy_from_slice(&keys.aead.id().to_be_bytes());
    plain[2..4].fill(0);
    plain[4..36].copy_from_slice(&keys.c2s);
    plain[36..68].copy_from_slice(&keys.s2c);
    let tag = master.cipher().seal(&[ad], plain);
    out[TAG_AT..].copy_from_slice(&tag);
}

/// Opens a cookie with whichever key of `ring` its key id names.
pub fn open_cookie(ring: &KeyRing, cookie: &[u8]) -> Result<SessionKeys, CookieError> {
    let cookie: &[u8; COOKIE_LEN] = cookie.try_into().map_err(|_| CookieError::BadLength)?;
    let key_id = [cookie[0], cookie[1], cookie[2], cookie[3]];
    let id = u32::from_be_bytes(key_id);
    let master = ring.get(id).ok_or(CookieError::UnknownKey(id))?;
    let mut plain = [0u8; PLAINTEXT_LEN];
    plain.copy_from_slice(&cookie[CIPHERTEXT_AT..TAG_AT]);
    let tag = cookie[TAG_AT..].try_into().map_err(|_| CookieError::BadLength)?;
    if !master.cipher().open(&[&cookie[..CIPHERTEXT_AT]], &mut plain, tag) {
        return Err(CookieError::BadTag);
    }
    let aead = Aead::from_id(u16::from_be_bytes([plain[0], plain[1]])).ok_or(CookieError::BadContents)?;
    let n = aead.key_len();
    let (c2s, s2c) = (&plain[4..36], &plain[36..68]);
    if plain[2..4] != [0, 0] || c2s[n..].iter().chain(&s2c[n..]).any(|b| *b != 0) {
        return Err(CookieError::BadContents);
    }
    let mut keys = SessionKeys { aead, c2s: [0; MAX_KEY_LEN], s2c: [0; MAX_KEY_LEN] };
    keys.c2s.copy_from_slice(c2s);
    keys.s2c.copy_from_slice(s2c);
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(aead: Aead) -> SessionKeys {
        let n = aead.key_len();
        SessionKeys::new(aead, &[0x11; 32][..n], &[0x22; 32][..n]).unwrap()
    }

    fn ring() -> KeyRing {
        KeyRing::new(MasterKey::new(0x0102_0304, [9; 16]), 2, 1_000)
    }

    #[test]
    fn round_trip_both_aeads() {
        let ring = ring();
        for aead in Aead::ALL {
            let mut c = [0u8; COOKIE_LEN];
            seal_cookie(ring.current(), &keys(aead), &[4; COOKIE_NONCE_LEN], &mut c);
            assert_eq!(&c[..4], &[1, 2, 3, 4]);
            let k = open_cookie(&ring, &c).unwrap();
            assert_eq!(k, keys(aead));
            assert_eq!(k.c2s(), &[0x11; 32][..aead.key_len()]);
        }
    }

    #[test]
    fn rejects_bad_cookies() {
        let ring = ring();
        let mut c = [0u8; COOKIE_LEN];
        seal_cookie(ring.current(), &keys(Aead::SivCmac256), &[4; COOKIE_NONCE_LEN], &mut c);
        assert_eq!(open_cookie(&ring, &c[..99]), Err(CookieError::BadLength));
        assert_eq!(open_cookie(&ring, &[]), Err(CookieError::BadLength));
        for i in 0..COOKIE_LEN {
            let mut t = c;
            t[i] ^= 0x40;
            let e = open_cookie(&ring, &t).unwrap_err();
            if i < 4 {
                assert!(matches!(e, CookieError::UnknownKey(_)), "{i}: {e:?}");
            } else {
                assert_eq!(e, CookieError::BadTag, "byte {i}");
            }
        }
        let other = KeyRing::new(MasterKey::new(0x0102_0304, [8; 16]), 2, 1_000);
        assert_eq!(open_cookie(&other, &c), Err(CookieError::BadTag));
        let unknown = KeyRing::new(MasterKey::new(7, [9; 16]), 2, 1_000);
        assert_eq!(open_cookie(&unknown, &c), Err(CookieError::UnknownKey(0x0102_0304)));
    }

    /// The format is exactly what the module documentation says: RFC 5297
    /// AES-SIV (RustCrypto's, here) under HKDF-SHA256(master key, info
    /// "chime cookie aes-siv v2"), AD = the first 16 bytes, tag at 84.
    #[test]
    fn format_is_documented_siv() {
        use aes_siv::KeyInit as _;
        use aes_siv::aead::generic_array::GenericArray;
        use hkdf::Hkdf;
        use sha2::Sha256;

        let mut c = [0u8; COOKIE_LEN];
        seal_cookie(ring().current(), &keys(Aead::GcmSiv128), &[4; COOKIE_NONCE_LEN], &mut c);
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(None, &[9; 16]).expand(b"chime cookie aes-siv v2", &mut key).unwrap();
        let mut siv = aes_siv::siv::Aes128Siv::new(GenericArray::from_slice(&key));
        let mut plain = c[CIPHERTEXT_AT..TAG_AT].to_vec();
        siv.decrypt_in_place_detached([&c[..CIPHERTEXT_AT]], &mut plain, GenericArray::from_slice(&c[TAG_AT..]))
            .unwrap();
        assert_eq!(&plain[..4], &[0, 30, 0, 0]);
        assert_eq!(&plain[4..20], &[0x11; 16]);
        assert_eq!(&plain[20..36], &[0; 16]);
        assert_eq!(&plain[36..52], &[0x22; 16]);
    }
}
