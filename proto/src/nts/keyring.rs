//! Master keys and the ring of them that cookies are sealed and opened with.
//!
//! The ring has a *current* key, which seals every new cookie, and up to
//! `keep` *previous* keys, which still open cookies sealed before the last
//! rotations. With a rotation every `interval`, a cookie is accepted for at
//! least `interval × keep` after it was issued (and at most
//! `interval × (keep + 1)`): that is its documented lifetime
//! ([`KeyRingConfig::cookie_lifetime_secs`]). A client that polls less often
//! than that gets an NTS NAK and goes back to NTS-KE.
//!
//! Two ways to get keys, both sans-IO (time is an argument, randomness comes
//! from the caller):
//!
//! - **Standalone**: the server draws a random 16-byte key at every rotation
//!   and calls [`KeyRing::rotate`]; it persists [`KeyRing::encode`]'s bytes
//!   (mode 0600, written to a temporary file and renamed over the old one)
//!   and reloads them with [`KeyRing::decode`] at start, so cookies issued
//!   before a restart still open after it.
//! - **Fleet**: every server of a fleet holds the same secret;
//!   [`KeyRing::for_fleet`] derives the key of each rotation epoch
//!   (`unix_time / interval`) with HKDF-SHA256, so all of them seal and open
//!   the same cookies with no coordination and nothing to persist. The ring
//!   also accepts the *next* epoch's key, so that a server whose clock is a
//!   little behind accepts cookies from one that has already rotated.

use core::fmt;

use hkdf::Hkdf;
use sha2::Sha256;

use crate::nts::siv::{self, SivKey};

/// Length of a master key (128 bits of secret; the cookie AEAD key is
/// derived from it, see [`MasterKey`]).
pub const MASTER_KEY_LEN: usize = 16;

/// The shortest fleet secret accepted.
pub const MIN_FLEET_SECRET_LEN: usize = 16;

/// HKDF salt of fleet key derivation: fixed, names chime and the scheme's
/// version.
const FLEET_SALT: &[u8] = b"chime NTS fleet master key v1";
/// HKDF info prefix of fleet key derivation; the epoch (u64 big-endian)
/// follows it.
const FLEET_INFO: &[u8] = b"chime nts master key";

/// HKDF info of the cookie AEAD key derived from a master key.
const COOKIE_KEY_INFO: &[u8] = b"chime cookie aes-siv v2";

/// First bytes of an encoded ring.
const MAGIC: [u8; 4] = *b"CHKR";
/// The encoding [`KeyRing::encode`] writes.
const FORMAT_VERSION: u8 = 0x01;
const ENCODED_HEADER_LEN: usize = 20;
const ENCODED_KEY_LEN: usize = 4 + MASTER_KEY_LEN;
/// The most previous keys a ring keeps (and a file may hold).
pub const MAX_KEEP: usize = 1024;

/// A master key: its id (sent in the clear in every cookie) and the
/// expanded `AEAD_AES_SIV_CMAC_256` key that seals cookies (see
/// [`crate::nts::cookie`]), derived from the 16 secret bytes with
/// HKDF-SHA256 (info `"chime cookie aes-siv v2"`, no salt) and expanded
/// once, when made: the CMAC subkeys, `CMAC(0)` and both AES schedules are
/// shared, read-only, by every worker.
#[derive(Clone)]
pub struct MasterKey {
    id: u32,
    key: [u8; MASTER_KEY_LEN],
    cipher: SivKey,
}

impl MasterKey {
    /// A master key from its id and 16 secret random bytes.
    pub fn new(id: u32, key: [u8; MASTER_KEY_LEN]) -> Self {
        let mut siv_key = [0u8; siv::KEY_LEN];
        // 32 bytes are far below HKDF-SHA256's output limit: cannot fail.
        let _ = Hkdf::<Sha256>::new(None, &key).expand(COOKIE_KEY_INFO, &mut siv_key);
        let cipher = SivKey::new(&siv_key);
        Self { id, key, cipher }
    }

    /// The key id.
    pub fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn cipher(&self) -> &SivKey {
        &self.cipher
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey").field("id", &format_args!("{:#010x}", self.id)).finish_non_exhaustive()
    }
}

/// How often keys rotate and how many old ones are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRingConfig {
    /// Seconds between rotations.
    pub interval_secs: u64,
    /// Previous keys kept after a rotation.
    pub keep: usize,
}

impl KeyRingConfig {
    /// The guaranteed lifetime of a cookie: `interval × keep` seconds.
    pub fn cookie_lifetime_secs(&self) -> u64 {
        self.interval_secs.saturating_mul(self.keep as u64)
    }
}

impl Default for KeyRingConfig {
    /// Daily rotation, a week of old keys: chrony, polling at most every 36
    /// hours or so with eight cookies, never runs out.
    fn default() -> Self {
        Self { interval_secs: 86_400, keep: 7 }
    }
}

/// Why a ring cannot be built, rotated or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyRingError {
    /// The bytes end before the header or a key does.
    #[error("key ring file is truncated")]
    Truncated,
    /// The bytes do not start with chime's key ring magic.
    #[error("not a chime key ring file (bad magic)")]
    BadMagic,
    /// A format version this chime does not read.
    #[error("key ring file format version {0} is not supported")]
    UnsupportedVersion(u8),
    /// Bytes after the last key.
    #[error("key ring file has trailing bytes")]
    TrailingBytes,
    /// No key at all.
    #[error("key ring holds no key")]
    NoKeys,
    /// More keys than `keep + 1`, or `keep` above [`MAX_KEEP`].
    #[error("key ring holds too many keys")]
    TooManyKeys,
    /// Two keys with one id.
    #[error("key id {0:#010x} appears twice")]
    DuplicateId(u32),
    /// A fleet secret shorter than [`MIN_FLEET_SECRET_LEN`].
    #[error("fleet secret is shorter than {MIN_FLEET_SECRET_LEN} bytes")]
    ShortSecret,
    /// A rotation interval of zero.
    #[error("rotation interval must be at least one second")]
    ZeroInterval,
}

/// The master keys a server seals cookies with (the current one) and
/// accepts cookies under (all of them).
#[derive(Clone, Debug)]
pub struct KeyRing {
    current: MasterKey,
    /// Newest first; at most `keep`.
    previous: Vec<MasterKey>,
    /// Accepted but never used to seal (fleet mode: the next epoch's key).
    next: Option<MasterKey>,
    keep: usize,
    rotated_at: u64,
}

impl KeyRing {
    /// A ring with one key, installed at `now_unix_secs`, that will keep
    /// `keep` previous keys (at most [`MAX_KEEP`]).
    pub fn new(current: MasterKey, keep: usize, now_unix_secs: u64) -> Self {
        let keep = keep.min(MAX_KEEP);
        Self { current, previous: Vec::with_capacity(keep), next: None, keep, rotated_at: now_unix_secs }
    }

    /// Changes how many previous keys the ring keeps (at most
    /// [`MAX_KEEP`]); with fewer, the oldest are forgotten now.
    pub fn set_keep(&mut self, keep: usize) {
        self.keep = keep.min(MAX_KEEP);
        self.previous.truncate(self.keep);
    }

    /// How many previous keys the ring keeps.
    pub fn keep(&self) -> usize {
        self.keep
    }

    /// The key that seals new cookies.
    pub fn current(&self) -> &MasterKey {
        &self.current
    }

    /// The key with this id, if the ring accepts it.
    pub fn get(&self, id: u32) -> Option<&MasterKey> {
        if self.current.id == id {
            return Some(&self.current);
        }
        self.previous.iter().chain(&self.next).find(|k| k.id == id)
    }

    /// Ids of every accepted key, current first.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        core::iter::once(&self.current).chain(&self.previous).chain(&self.next).map(|k| k.id)
    }

    /// When the current key was installed (Unix seconds).
    pub fn rotated_at(&self) -> u64 {
        self.rotated_at
    }

    /// Whether a rotation is due at `now_unix_secs`.
    pub fn rotation_due(&self, now_unix_secs: u64, interval_secs: u64) -> bool {
        now_unix_secs >= self.rotated_at.saturating_add(interval_secs)
    }

    /// Makes a new key current; the old one becomes the newest previous key
    /// and the oldest beyond `keep` is forgotten (cookies under it get a
    /// NAK from now on). `id` must differ from every key still held.
    pub fn rotate(&mut self, key: [u8; MASTER_KEY_LEN], id: u32, now_unix_secs: u64) -> Result<(), KeyRingError> {
        if self.ids().any(|held| held == id) {
            return Err(KeyRingError::DuplicateId(id));
        }
        let old = core::mem::replace(&mut self.current, MasterKey::new(id, key));
        self.previous.insert(0, old);
        self.previous.truncate(self.keep);
        self.rotated_at = now_unix_secs;
        Ok(())
    }

    /// A fleet ring at `now_unix_secs`: the current epoch's key
    /// (`epoch = now / interval`), the `keep` epochs before it, and the next
    /// epoch's (accepted only). Every server with the same secret and
    /// configuration builds the same ring.
    pub fn for_fleet(secret: &[u8], now_unix_secs: u64, cfg: KeyRingConfig) -> Result<Self, KeyRingError> {
        if secret.len() < MIN_FLEET_SECRET_LEN {
            return Err(KeyRingError::ShortSecret);
        }
        if cfg.interval_secs == 0 {
            return Err(KeyRingError::ZeroInterval);
        }
        let epoch = now_unix_secs / cfg.interval_secs;
        let mut ring = Self::new(fleet_key(secret, epoch), cfg.keep, epoch * cfg.interval_secs);
        ring.previous
            .extend((1..=ring.keep as u64).map_while(|back| epoch.checked_sub(back)).map(|e| fleet_key(secret, e)));
        ring.next = epoch.checked_add(1).map(|e| fleet_key(secret, e));
        Ok(ring)
    }

    /// The ring as bytes for the server to persist (the next-epoch key of a
    /// fleet ring is not included: fleet rings are derived, not stored):
    ///
    /// ```text
    /// "CHKR" | version 0x01 | 3 zero bytes | rotated_at u64 | keep u16 | count u16
    /// count × (id u32 | key 16 bytes), current first, then previous newest first
    /// ```
    /// (integers big-endian).
    pub fn encode(&self) -> Vec<u8> {
        let keys: Vec<&MasterKey> = core::iter::once(&self.current).chain(&self.previous).collect();
        let mut out = Vec::with_capacity(ENCODED_HEADER_LEN + keys.len() * ENCODED_KEY_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[FORMAT_VERSION, 0, 0, 0]);
        out.extend_from_slice(&self.rotated_at.to_be_bytes());
        // keep <= MAX_KEEP and the key count <= keep + 1 fit in u16.
        out.extend_from_slice(&(self.keep as u16).to_be_bytes());
        out.extend_from_slice(&(keys.len() as u16).to_be_bytes());
        for k in keys {
            out.extend_from_slice(&k.id.to_be_bytes());
            out.extend_from_slice(&k.key);
        }
        out
    }

    /// Reads what [`KeyRing::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, KeyRingError> {
        let header = bytes.get(..ENCODED_HEADER_LEN).ok_or(if bytes.starts_with(&MAGIC) || bytes.len() < 4 {
            KeyRingError::Truncated
        } else {
            KeyRingError::BadMagic
        })?;
        if header[..4] != MAGIC {
            return Err(KeyRingError::BadMagic);
        }
        if header[4] != FORMAT_VERSION {
            return Err(KeyRingError::UnsupportedVersion(header[4]));
        }
        let rotated_at = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
        let keep = usize::from(u16::from_be_bytes([header[16], header[17]]));
        let count = usize::from(u16::from_be_bytes([header[18], header[19]]));
        if count == 0 {
            return Err(KeyRingError::NoKeys);
        }
        if keep > MAX_KEEP || count > keep + 1 {
            return Err(KeyRingError::TooManyKeys);
        }
        let body = &bytes[ENCODED_HEADER_LEN..];
        let need = count * ENCODED_KEY_LEN;
        if body.len() < need {
            return Err(KeyRingError::Truncated);
        }
        if body.len() > need {
            return Err(KeyRingError::TrailingBytes);
        }
        let mut keys = body.chunks_exact(ENCODED_KEY_LEN).map(|c| {
            let mut key = [0u8; MASTER_KEY_LEN];
            key.copy_from_slice(&c[4..]);
            MasterKey::new(u32::from_be_bytes([c[0], c[1], c[2], c[3]]), key)
        });
        let current = keys.next().ok_or(KeyRingError::NoKeys)?;
        let mut ring = Self::new(current, keep, rotated_at);
        for k in keys {
            if ring.get(k.id).is_some() {
                return Err(KeyRingError::DuplicateId(k.id));
            }
            ring.previous.push(k);
        }
        Ok(ring)
    }
}

/// The master key of fleet epoch `epoch`: HKDF-SHA256 with a fixed chime
/// salt, the shared secret as input key material, and info
/// `"chime nts master key" || epoch (u64 big-endian)`; its id is the low 32
/// bits of the epoch (unique for 2^32 rotations).
pub fn fleet_key(secret: &[u8], epoch: u64) -> MasterKey {
    let hk = Hkdf::<Sha256>::new(Some(FLEET_SALT), secret);
    let mut key = [0u8; MASTER_KEY_LEN];
    // 16 bytes are far below HKDF-SHA256's 8160-byte limit.
    let _ = hk.expand_multi_info(&[FLEET_INFO, &epoch.to_be_bytes()], &mut key);
    MasterKey::new(epoch as u32, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_and_forgets() {
        let mut ring = KeyRing::new(MasterKey::new(1, [1; 16]), 2, 100);
        assert!(!ring.rotation_due(150, 100));
        assert!(ring.rotation_due(200, 100));
        ring.rotate([2; 16], 2, 200).unwrap();
        ring.rotate([3; 16], 3, 300).unwrap();
        assert_eq!(ring.ids().collect::<Vec<_>>(), [3, 2, 1]);
        ring.rotate([4; 16], 4, 400).unwrap();
        assert_eq!(ring.ids().collect::<Vec<_>>(), [4, 3, 2]);
        assert!(ring.get(1).is_none());
        assert_eq!(ring.rotate([5; 16], 3, 500), Err(KeyRingError::DuplicateId(3)));
        assert_eq!(ring.rotated_at(), 400);
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut ring = KeyRing::new(MasterKey::new(10, [1; 16]), 3, 5);
        ring.rotate([2; 16], 11, 6).unwrap();
        let bytes = ring.encode();
        assert_eq!(bytes.len(), 20 + 2 * 20);
        let back = KeyRing::decode(&bytes).unwrap();
        assert_eq!(back.ids().collect::<Vec<_>>(), [11, 10]);
        assert_eq!(back.rotated_at(), 6);
        assert_eq!(back.encode(), bytes);
        assert_eq!(back.get(10).unwrap().key, [1; 16]);
    }

    #[test]
    fn decode_errors() {
        let ring = KeyRing::new(MasterKey::new(10, [1; 16]), 1, 5);
        let good = ring.encode();
        assert_eq!(KeyRing::decode(&good[..good.len() - 1]).unwrap_err(), KeyRingError::Truncated);
        assert_eq!(KeyRing::decode(&good[..10]).unwrap_err(), KeyRingError::Truncated);
        assert_eq!(KeyRing::decode(b"").unwrap_err(), KeyRingError::Truncated);
        assert_eq!(KeyRing::decode(b"hello, this is not a key ring").unwrap_err(), KeyRingError::BadMagic);
        let mut long = good.clone();
        long.push(0);
        assert_eq!(KeyRing::decode(&long).unwrap_err(), KeyRingError::TrailingBytes);
        let mut v2 = good.clone();
        v2[4] = 2;
        assert_eq!(KeyRing::decode(&v2).unwrap_err(), KeyRingError::UnsupportedVersion(2));
        let mut none = good[..20].to_vec();
        none[19] = 0;
        assert_eq!(KeyRing::decode(&none).unwrap_err(), KeyRingError::NoKeys);
        let mut many = good.clone();
        many[19] = 3; // keep is 1: at most 2 keys
        assert_eq!(KeyRing::decode(&many).unwrap_err(), KeyRingError::TooManyKeys);
        let mut dup = good.clone();
        dup[19] = 2;
        dup.extend_from_slice(&good[20..]);
        assert_eq!(KeyRing::decode(&dup).unwrap_err(), KeyRingError::DuplicateId(10));
    }

    #[test]
    fn fleet_epochs() {
        let cfg = KeyRingConfig { interval_secs: 3600, keep: 3 };
        assert_eq!(cfg.cookie_lifetime_secs(), 10_800);
        let ring = KeyRing::for_fleet(&[7; 32], 10 * 3600 + 5, cfg).unwrap();
        assert_eq!(ring.ids().collect::<Vec<_>>(), [10, 9, 8, 7, 11]);
        assert_eq!(ring.rotated_at(), 36_000);
        let early = KeyRing::for_fleet(&[7; 32], 3600, cfg).unwrap();
        assert_eq!(early.ids().collect::<Vec<_>>(), [1, 0, 2]);
        assert_eq!(fleet_key(&[7; 32], 10).key, ring.current().key);
        assert_ne!(fleet_key(&[7; 32], 10).key, fleet_key(&[7; 32], 11).key);
        assert_ne!(fleet_key(&[7; 32], 10).key, fleet_key(&[8; 32], 10).key);
        assert_eq!(KeyRing::for_fleet(&[7; 15], 0, cfg).unwrap_err(), KeyRingError::ShortSecret);
        let zero = KeyRingConfig { interval_secs: 0, keep: 1 };
        assert_eq!(KeyRing::for_fleet(&[7; 32], 0, zero).unwrap_err(), KeyRingError::ZeroInterval);
    }
}
