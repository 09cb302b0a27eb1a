//! The AEAD algorithms NTS negotiates, behind one in-place, detached-tag
//! interface.
//!
//! - `AEAD_AES_SIV_CMAC_256` (15, RFC 5297): mandatory for every NTS
//!   implementation. Two AES-128 keys (32 bytes); any nonce length, passed
//!   to S2V as the last associated-data component after the packet, as RFC
//!   8915 section 5.6 requires. On the wire the tag (the synthetic IV) comes
//!   first: `V || C`.
//! - `AEAD_AES_128_GCM_SIV` (30, RFC 8452): offered by chrony. One 16-byte
//!   key and a 12-byte nonce. On the wire the tag comes last: `C || T`.
//!
//! [`NtsKey`] holds the expanded key (the CMAC subkeys, `CMAC(0)` and both
//! AES round-key schedules for SIV, the key-generating key's schedule for
//! GCM-SIV), so a key used for several messages pays its key schedule once;
//! [`seal_once`] and [`open_once`] serve a key used for one message (the
//! session keys out of a cookie) without building one. The constructions
//! themselves are in `siv.rs` and `gcm_siv.rs`, on the `aes` crate's block
//! cipher (AES-NI picked at run time) and the `polyval` crate (PCLMULQDQ
//! likewise); RustCrypto's `aes-siv` and `aes-gcm-siv` check them in the
//! tests. Nothing here allocates.

use core::fmt;

use crate::nts::gcm_siv::{self, GcmSivKey};
use crate::nts::siv::{self, SivKey};

/// Length of the authentication tag of both AEADs.
pub const TAG_LEN: usize = 16;

/// The longest key of any supported AEAD.
pub const MAX_KEY_LEN: usize = 32;

/// An AEAD algorithm from the IANA "AEAD Algorithms" registry that chime
/// implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Aead {
    /// `AEAD_AES_SIV_CMAC_256`, numeric identifier 15.
    SivCmac256,
    /// `AEAD_AES_128_GCM_SIV`, numeric identifier 30.
    GcmSiv128,
}

impl Aead {
    /// Every supported algorithm.
    pub const ALL: [Self; 2] = [Self::SivCmac256, Self::GcmSiv128];

    /// The IANA numeric identifier.
    pub const fn id(self) -> u16 {
        match self {
            Self::SivCmac256 => 0x000F,
            Self::GcmSiv128 => 0x001E,
        }
    }

    /// The algorithm with this IANA identifier, if chime supports it.
    pub const fn from_id(id: u16) -> Option<Self> {
        match id {
            0x000F => Some(Self::SivCmac256),
            0x001E => Some(Self::GcmSiv128),
            _ => None,
        }
    }

    /// Key length in bytes (also the length of each key exported from TLS).
    pub const fn key_len(self) -> usize {
        match self {
            Self::SivCmac256 => 32,
            Self::GcmSiv128 => 16,
        }
    }

    /// The nonce length chime uses when it seals: 16 bytes for SIV (RFC 8915
    /// recommends at least 16), 12 for GCM-SIV (the only length it takes).
    pub const fn nonce_len(self) -> usize {
        match self {
            Self::SivCmac256 => 16,
            Self::GcmSiv128 => 12,
        }
    }

    /// Whether the tag precedes the ciphertext on the wire (SIV's `V || C`)
    /// rather than following it (GCM-SIV's `C || T`).
    pub const fn tag_first(self) -> bool {
        matches!(self, Self::SivCmac256)
    }
}

/// An AEAD operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AeadError {
    /// The key has the wrong length for the algorithm.
    #[error("wrong key length for the AEAD")]
    KeyLength,
    /// The nonce has a length the algorithm does not take.
    #[error("wrong nonce length for the AEAD")]
    NonceLength,
    /// The tag does not match: the message is forged, damaged, or sealed
    /// under another key.
    #[error("authentication failed")]
    Authentication,
}

// Not boxed: a key is built once and used by reference; a box would be an
// allocation per key made on the request path.
#[allow(clippy::large_enum_variant)]
enum Cipher {
    Siv(SivKey),
    GcmSiv(GcmSivKey),
}

/// A key of one AEAD with its key schedule computed.
pub struct NtsKey {
    aead: Aead,
    cipher: Cipher,
}

impl NtsKey {
    /// Expands `key`, which must be [`Aead::key_len`] bytes.
    pub fn new(aead: Aead, key: &[u8]) -> Result<Self, AeadError> {
        let cipher = match aead {
            Aead::SivCmac256 => Cipher::Siv(SivKey::new(key.try_into().map_err(|_| AeadError::KeyLength)?)),
            Aead::GcmSiv128 => Cipher::GcmSiv(GcmSivKey::new(key.try_into().map_err(|_| AeadError::KeyLength)?)),
        };
        Ok(Self { aead, cipher })
    }

    /// The algorithm.
    pub fn aead(&self) -> Aead {
        self.aead
    }

    /// Encrypts `buf` in place and returns the tag, authenticating `ad` and
    /// `nonce` with it.
    pub fn seal_in_place(&self, nonce: &[u8], ad: &[u8], buf: &mut [u8]) -> Result<[u8; TAG_LEN], AeadError> {
        match &self.cipher {
            Cipher::Siv(siv) => Ok(siv.seal(&[ad, nonce], buf)),
            Cipher::GcmSiv(gcm) => Ok(gcm.seal(gcm_nonce(nonce)?, ad, buf)),
        }
    }

    /// Checks `tag` over `ad`, `nonce` and the ciphertext in `buf`, and
    /// decrypts `buf` in place. On failure `buf` is left encrypted.
    pub fn open_in_place(&self, nonce: &[u8], ad: &[u8], buf: &mut [u8], tag: &[u8; TAG_LEN]) -> Result<(), AeadError> {
        let ok = match &self.cipher {
            Cipher::Siv(siv) => siv.open(&[ad, nonce], buf, tag),
            Cipher::GcmSiv(gcm) => gcm.open(gcm_nonce(nonce)?, ad, buf, tag),
        };
        if ok { Ok(()) } else { Err(AeadError::Authentication) }
    }
}

/// [`NtsKey::seal_in_place`] for a key used for one message (a session key
/// out of a cookie): no key object is built, and with SIV the CTR schedule
/// is expanded only if `buf` is not empty.
pub fn seal_once(aead: Aead, key: &[u8], nonce: &[u8], ad: &[u8], buf: &mut [u8]) -> Result<[u8; TAG_LEN], AeadError> {
    match aead {
        Aead::SivCmac256 => Ok(siv::seal_once(key.try_into().map_err(|_| AeadError::KeyLength)?, &[ad, nonce], buf)),
        Aead::GcmSiv128 => {
            let key = GcmSivKey::new(key.try_into().map_err(|_| AeadError::KeyLength)?);
            Ok(key.seal(gcm_nonce(nonce)?, ad, buf))
        }
    }
}

/// [`NtsKey::open_in_place`] for a key used for one message.
pub fn open_once(
    aead: Aead,
    key: &[u8],
    nonce: &[u8],
    ad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AeadError> {
    let ok = match aead {
        Aead::SivCmac256 => siv::open_once(key.try_into().map_err(|_| AeadError::KeyLength)?, &[ad, nonce], buf, tag),
        Aead::GcmSiv128 => {
            let nonce = gcm_nonce(nonce)?;
            GcmSivKey::new(key.try_into().map_err(|_| AeadError::KeyLength)?).open(nonce, ad, buf, tag)
        }
    };
    if ok { Ok(()) } else { Err(AeadError::Authentication) }
}

fn gcm_nonce(nonce: &[u8]) -> Result<&[u8; gcm_siv::NONCE_LEN], AeadError> {
    nonce.try_into().map_err(|_| AeadError::NonceLength)
}

impl fmt::Debug for NtsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NtsKey").field("aead", &self.aead).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use aes_gcm_siv::aead::AeadInPlace as _;
    use aes_gcm_siv::{Aes128GcmSiv, KeyInit as _};
    use aes_siv::aead::generic_array::GenericArray;
    use aes_siv::siv::Aes128Siv;

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 5297 appendix A.1: deterministic authenticated encryption.
    #[test]
    fn rfc5297_a1() {
        let key = hex("fffefdfc fbfaf9f8 f7f6f5f4 f3f2f1f0 f0f1f2f3 f4f5f6f7 f8f9fafb fcfdfeff");
        let ad = hex("10111213 14151617 18191a1b 1c1d1e1f 20212223 24252627");
        let plain = hex("11223344 55667788 99aabbcc ddee");
        let out = hex("85632d07 c6e8f37f 950acd32 0a2ecc93 40c02b96 90c4dc04 daef7f6a fe5c");
        let mut siv = Aes128Siv::new(GenericArray::from_slice(&key));
        let mut buf = plain.clone();
        let tag = siv.encrypt_in_place_detached([&ad[..]], &mut buf).unwrap();
        assert_eq!(&tag[..], &out[..16]);
        assert_eq!(buf, &out[16..]);
        siv.decrypt_in_place_detached([&ad[..]], &mut buf, &tag).unwrap();
        assert_eq!(buf, plain);
    }

    /// RFC 5297 appendix A.2: nonce-based, the nonce as the last header; the
    /// same through [`NtsKey`] with the two AD components joined is *not*
    /// the same S2V input, so that path is checked against the raw `Siv`
    /// with the NTS layout `[ad, nonce]` below.
    #[test]
    fn rfc5297_a2() {
        let key = hex("7f7e7d7c 7b7a7978 77767574 73727170 40414243 44454647 48494a4b 4c4d4e4f");
        let ad1 = hex("00112233 44556677 8899aabb ccddeeff deaddada deaddada ffeeddcc bbaa9988 77665544 33221100");
        let ad2 = hex("10203040 50607080 90a0");
        let nonce = hex("09f91102 9d74e35b d84156c5 635688c0");
        let plain = hex(
            "74686973 20697320 736f6d65 20706c61 696e7465 78742074 6f20656e 63727970 74207573 696e6720 5349562d 414553",
        );
        let out = hex("7bdb6e3b 432667eb 06f4d14b ff2fbd0f cb900f2f ddbe4043 26601965 c889bf17 dba77ceb 094fa663
             b7a3f748 ba8af829 ea64ad54 4a272e9c 485b62a3 fd5c0d");
        let mut siv = Aes128Siv::new(GenericArray::from_slice(&key));
        let mut buf = plain.clone();
        let tag = siv.encrypt_in_place_detached([&ad1[..], &ad2[..], &nonce[..]], &mut buf).unwrap();
        assert_eq!(&tag[..], &out[..16]);
        assert_eq!(buf, &out[16..]);
        siv.decrypt_in_place_detached([&ad1[..], &ad2[..], &nonce[..]], &mut buf, &tag).unwrap();
        assert_eq!(buf, plain);
        let mut bad = tag;
        bad[3] ^= 1;
        assert!(siv.decrypt_in_place_detached([&ad1[..], &ad2[..], &nonce[..]], &mut buf, &bad).is_err());
    }

    /// `NtsKey` for SIV is S2V over `[ad, nonce]`, exactly the raw
    /// construction with those two headers.
    #[test]
    fn siv_nts_layout_matches_raw_siv() {
        let key = [0x42u8; 32];
        let (ad, nonce) = (b"packet header and fields".as_slice(), [9u8; 16]);
        let a = NtsKey::new(Aead::SivCmac256, &key).unwrap();
        let mut b = Aes128Siv::new(GenericArray::from_slice(&key));
        let mut x = *b"encrypted extension fields";
        let mut y = x;
        let t1 = a.seal_in_place(&nonce, ad, &mut x).unwrap();
        let t2 = b.encrypt_in_place_detached([ad, &nonce[..]], &mut y).unwrap();
        assert_eq!(&t1[..], &t2[..]);
        assert_eq!(x, y);
    }

    /// RFC 8452 appendix C.1, the first AEAD_AES_128_GCM_SIV vector with
    /// plaintext and AD (8-byte plaintext, 1-byte AD).
    #[test]
    fn rfc8452_vector() {
        let key = hex("01000000000000000000000000000000");
        let nonce = hex("030000000000000000000000");
        let ad = hex("01");
        let mut buf = hex("0200000000000000");
        let k = NtsKey::new(Aead::GcmSiv128, &key).unwrap();
        let tag = k.seal_in_place(&nonce, &ad, &mut buf).unwrap();
        assert_eq!(buf, hex("1e6daba35669f427"));
        assert_eq!(tag.to_vec(), hex("3b0a1a2560969cdf790d99759abd1508"));
        k.open_in_place(&nonce, &ad, &mut buf, &tag).unwrap();
        assert_eq!(buf, hex("0200000000000000"));
    }

    #[test]
    fn round_trips_and_rejects() {
        for aead in Aead::ALL {
            assert_eq!(Aead::from_id(aead.id()), Some(aead));
            let k = NtsKey::new(aead, &[5u8; 32][..aead.key_len()]).unwrap();
            let nonce = [1u8; 16];
            let nonce = &nonce[..aead.nonce_len()];
            let mut buf = [3u8; 40];
            let tag = k.seal_in_place(nonce, b"ad", &mut buf).unwrap();
            assert_ne!(buf, [3u8; 40]);
            let sealed = buf;
            assert_eq!(k.open_in_place(nonce, b"ad!", &mut buf, &tag), Err(AeadError::Authentication));
            assert_eq!(buf, sealed, "left encrypted on failure");
            k.open_in_place(nonce, b"ad", &mut buf, &tag).unwrap();
            assert_eq!(buf, [3u8; 40]);
        }
        assert_eq!(NtsKey::new(Aead::GcmSiv128, &[0; 32]).unwrap_err(), AeadError::KeyLength);
        let k = NtsKey::new(Aead::GcmSiv128, &[0; 16]).unwrap();
        assert_eq!(k.seal_in_place(&[0; 16], b"", &mut []), Err(AeadError::NonceLength));
        assert_eq!(Aead::from_id(17), None);
    }

    /// A deterministic byte pattern (no RNG dependency in unit tests).
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed).rotate_left(3)).collect()
    }

    /// chime's SIV and GCM-SIV against RustCrypto's `aes-siv` and
    /// `aes-gcm-siv`, for every plaintext and AD length around the block
    /// boundaries and the lengths NTS uses, through both the keyed and the
    /// one-shot forms.
    #[test]
    fn matches_rustcrypto() {
        let ad_lens = [0, 1, 4, 15, 16, 17, 31, 32, 33, 84, 188, 200];
        for seed in 0..3u8 {
            let key = pattern(32, seed);
            let siv_key = NtsKey::new(Aead::SivCmac256, &key).unwrap();
            let gcm_key = NtsKey::new(Aead::GcmSiv128, &key[..16]).unwrap();
            let mut rc_siv = Aes128Siv::new(GenericArray::from_slice(&key));
            let rc_gcm = Aes128GcmSiv::new(GenericArray::from_slice(&key[..16]));
            for pt_len in (0..=70).chain([104, 128, 129, 208, 300, 848]) {
                for &ad_len in &ad_lens {
                    let pt = pattern(pt_len, seed ^ 0x5A);
                    let ad = pattern(ad_len, seed ^ 0xC3);
                    let nonce = pattern(16, seed ^ 0x99);

                    let mut want = pt.clone();
                    let want_tag = rc_siv.encrypt_in_place_detached([&ad[..], &nonce[..]], &mut want).unwrap();
                    for once in [false, true] {
                        let mut got = pt.clone();
                        let tag = if once {
                            seal_once(Aead::SivCmac256, &key, &nonce, &ad, &mut got).unwrap()
                        } else {
                            siv_key.seal_in_place(&nonce, &ad, &mut got).unwrap()
                        };
                        assert_eq!((&tag[..], &got), (&want_tag[..], &want), "siv pt {pt_len} ad {ad_len}");
                        let r = if once {
                            open_once(Aead::SivCmac256, &key, &nonce, &ad, &mut got, &tag)
                        } else {
                            siv_key.open_in_place(&nonce, &ad, &mut got, &tag)
                        };
                        assert_eq!((r, &got), (Ok(()), &pt));
                        let mut bad = tag;
                        bad[pt_len % 16] ^= 0x01;
                        let mut sealed = want.clone();
                        let r = if once {
                            open_once(Aead::SivCmac256, &key, &nonce, &ad, &mut sealed, &bad)
                        } else {
                            siv_key.open_in_place(&nonce, &ad, &mut sealed, &bad)
                        };
                        assert_eq!((r, &sealed), (Err(AeadError::Authentication), &want));
                    }

                    let nonce = &nonce[..12];
                    let mut want = pt.clone();
                    let want_tag =
                        rc_gcm.encrypt_in_place_detached(GenericArray::from_slice(nonce), &ad, &mut want).unwrap();
                    for once in [false, true] {
                        let mut got = pt.clone();
                        let tag = if once {
                            seal_once(Aead::GcmSiv128, &key[..16], nonce, &ad, &mut got).unwrap()
                        } else {
                            gcm_key.seal_in_place(nonce, &ad, &mut got).unwrap()
                        };
                        assert_eq!((&tag[..], &got), (&want_tag[..], &want), "gcm-siv pt {pt_len} ad {ad_len}");
                        let r = if once {
                            open_once(Aead::GcmSiv128, &key[..16], nonce, &ad, &mut got, &tag)
                        } else {
                            gcm_key.open_in_place(nonce, &ad, &mut got, &tag)
                        };
                        assert_eq!((r, &got), (Ok(()), &pt));
                        let mut bad = tag;
                        bad[ad_len % 16] ^= 0x80;
                        let mut sealed = want.clone();
                        assert_eq!(
                            gcm_key.open_in_place(nonce, &ad, &mut sealed, &bad),
                            Err(AeadError::Authentication)
                        );
                        assert_eq!(sealed, want, "left encrypted on failure");
                    }
                }
            }
        }
    }
}
