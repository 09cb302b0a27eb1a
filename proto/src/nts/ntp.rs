//! NTS for NTPv4 (RFC 8915 section 5): the extension fields of a request,
//! their verification, and the authenticated reply.
//!
//! A request carries, after the 48-byte header:
//!
//! - Unique Identifier (0x0104): at least 32 random bytes, echoed in the
//!   reply (replay protection on the client's side);
//! - NTS Cookie (0x0204): exactly one, from NTS-KE or an earlier reply;
//! - NTS Cookie Placeholder (0x0304): zero or more, each asking for one more
//!   cookie and making the request long enough to carry it back;
//! - NTS Authenticator and Encrypted Extension Fields (0x0404), last:
//!
//! ```text
//! | nonce length u16 | ciphertext length u16 | nonce, padded to 4 |
//! | ciphertext (tag included), padded to 4 | additional padding |
//! ```
//!
//! sealed with the C2S key over everything before the field (the
//! associated data). The reply is the header, a copy of the Unique
//! Identifier field, and an authenticator sealed with the S2C key whose
//! encrypted part is fresh cookies, as many as were asked for and fit
//! without the reply growing longer than the request.

use crate::ext::{ExtensionFields, field_type};
use crate::nts::aead::{AeadError, NtsKey, TAG_LEN, open_once, seal_once};
use crate::nts::cookie::{COOKIE_LEN, COOKIE_NONCE_LEN, CookieError, SessionKeys, open_cookie, seal_cookie};
use crate::nts::keyring::KeyRing;
use crate::nts::nonce::NonceSource;
use crate::packet::HEADER_LEN;

/// The shortest Unique Identifier body RFC 8915 allows.
pub const MIN_UNIQUE_ID_LEN: usize = 32;

/// The most cookies one reply carries (one per cookie and placeholder
/// received, and a client keeps eight).
pub const MAX_REPLY_COOKIES: usize = 8;

/// Bytes of one cookie extension field in a reply's encrypted part.
pub const COOKIE_FIELD_LEN: usize = 4 + COOKIE_LEN;

/// Bytes of the authenticator field before the nonce: field header and
/// the two length words.
const AUTH_FIXED_LEN: usize = 8;

const fn padded4(n: usize) -> usize {
    (n + 3) & !3
}

/// Why a request's NTS fields are unusable (the request is dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NtsFieldError {
    /// The extension fields do not parse.
    #[error("malformed extension fields")]
    Fields,
    /// No Unique Identifier, a short one, or two.
    #[error("missing, short or repeated Unique Identifier")]
    UniqueId,
    /// No cookie, or two.
    #[error("missing or repeated NTS cookie")]
    Cookie,
    /// No authenticator, or fields after it.
    #[error("missing authenticator, or fields after it")]
    AuthenticatorPlacement,
    /// The authenticator's lengths do not fit its field.
    #[error("malformed authenticator field")]
    AuthenticatorBody,
}

/// The NTS fields of a request, borrowed from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NtsRequest<'a> {
    /// The whole Unique Identifier field (header included), to be copied
    /// into the reply as is.
    pub unique_id_field: &'a [u8],
    /// The cookie (the field's value; chime's cookies need no padding).
    pub cookie: &'a [u8],
    /// Placeholders outside the encrypted part.
    pub placeholders: usize,
    /// Everything before the authenticator field: its associated data.
    pub associated_data: &'a [u8],
    /// The authenticator's nonce.
    pub nonce: &'a [u8],
    /// The authenticator's ciphertext, tag included.
    pub ciphertext: &'a [u8],
}

/// Whether a datagram's extension fields include any NTS field (a cheap
/// scan; the request path goes NTS only then).
pub fn has_nts_fields(request: &[u8]) -> bool {
    let Some(fields) = request.get(HEADER_LEN..) else { return false };
    ExtensionFields::new(fields).map_while(Result::ok).any(|f| {
        matches!(
            f.field_type,
            field_type::UNIQUE_IDENTIFIER
                | field_type::NTS_COOKIE
                | field_type::NTS_COOKIE_PLACEHOLDER
                | field_type::NTS_AUTHENTICATOR
        )
    })
}

impl<'a> NtsRequest<'a> {
    /// Finds and checks the NTS fields of a whole request datagram.
    pub fn parse(request: &'a [u8]) -> Result<Self, NtsFieldError> {
        let fields = request.get(HEADER_LEN..).ok_or(NtsFieldError::Fields)?;
        let mut at = HEADER_LEN;
        let mut unique_id_field = None;
        let mut cookie = None;
        let mut placeholders = 0;
        let mut auth = None;
        for f in ExtensionFields::new(fields) {
            let f = f.map_err(|_| NtsFieldError::Fields)?;
            if auth.is_some() {
                return Err(NtsFieldError::AuthenticatorPlacement);
            }
            let wire = &request[at..at + f.wire_len()];
            match f.field_type {
                field_type::UNIQUE_IDENTIFIER => {
                    if unique_id_field.is_some() || f.value.len() < MIN_UNIQUE_ID_LEN {
                        return Err(NtsFieldError::UniqueId);
                    }
                    unique_id_field = Some(wire);
                }
                field_type::NTS_COOKIE if cookie.replace(f.value).is_some() => return Err(NtsFieldError::Cookie),
                field_type::NTS_COOKIE => {}
                field_type::NTS_COOKIE_PLACEHOLDER => placeholders += 1,
                field_type::NTS_AUTHENTICATOR => auth = Some((at, f.value)),
                // Other fields are authenticated with the rest and ignored.
                _ => {}
            }
            at += f.wire_len();
        }
        let (auth_at, body) = auth.ok_or(NtsFieldError::AuthenticatorPlacement)?;
        let (nonce, ciphertext) = split_authenticator(body).ok_or(NtsFieldError::AuthenticatorBody)?;
        Ok(Self {
            unique_id_field: unique_id_field.ok_or(NtsFieldError::UniqueId)?,
            cookie: cookie.ok_or(NtsFieldError::Cookie)?,
            placeholders,
            associated_data: &request[..auth_at],
            nonce,
            ciphertext,
        })
    }

    /// Opens the cookie: the session's keys, or why the client gets a NAK.
    pub fn session_keys(&self, ring: &KeyRing) -> Result<SessionKeys, CookieError> {
        open_cookie(ring, self.cookie)
    }

    /// Verifies the authenticator with the C2S key and decrypts its
    /// encrypted extension fields into `scratch` (at least as long as the
    /// ciphertext); returns the number of cookie placeholders among them.
    pub fn verify(&self, keys: &SessionKeys, scratch: &mut [u8]) -> Result<usize, VerifyError> {
        let plain_len = self.ciphertext.len() - TAG_LEN;
        let (tag, sealed) = if keys.aead.tag_first() {
            let (t, c) = self.ciphertext.split_at(TAG_LEN);
            (t, c)
        } else {
            let (c, t) = self.ciphertext.split_at(plain_len);
            (t, c)
        };
        let plain = scratch.get_mut(..plain_len).ok_or(VerifyError::Scratch)?;
        plain.copy_from_slice(sealed);
        let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| VerifyError::Aead(AeadError::Authentication))?;
        // The C2S key serves this one message: no key object, and with SIV
        // no CTR schedule when there is nothing to decrypt (the usual case).
        open_once(keys.aead, keys.c2s(), self.nonce, self.associated_data, plain, tag).map_err(VerifyError::Aead)?;
        let mut placeholders = 0;
        for f in ExtensionFields::new(plain) {
            let f = f.map_err(|_| VerifyError::EncryptedFields)?;
            if f.field_type == field_type::NTS_COOKIE_PLACEHOLDER {
                placeholders += 1;
            }
        }
        Ok(placeholders)
    }
}

/// Splits an authenticator body into nonce and ciphertext (tag included).
fn split_authenticator(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let nonce_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let ct_len = usize::from(u16::from_be_bytes([*body.get(2)?, *body.get(3)?]));
    if ct_len < TAG_LEN {
        return None;
    }
    let nonce = body.get(4..4 + nonce_len)?;
    let ct_at = 4 + padded4(nonce_len);
    let ciphertext = body.get(ct_at..ct_at + ct_len)?;
    // The padding of the ciphertext must be inside the field too.
    (ct_at + padded4(ct_len) <= body.len()).then_some((nonce, ciphertext))
}

/// Why an authenticator does not verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The AEAD rejected it (forged, or the nonce length is wrong for the
    /// AEAD).
    #[error("authenticator: {0}")]
    Aead(AeadError),
    /// The decrypted extension fields do not parse.
    #[error("encrypted extension fields are malformed")]
    EncryptedFields,
    /// The caller's scratch buffer is too short.
    #[error("scratch buffer too short")]
    Scratch,
}

/// Where the parts of an authenticator field go, for a field starting at
/// `at` whose plaintext is `plain_len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthLayout {
    /// Start of the nonce.
    pub nonce_at: usize,
    /// Start of the plaintext (encrypted in place).
    pub plain_at: usize,
    /// Start of the tag.
    pub tag_at: usize,
    /// End of the field.
    pub end: usize,
}

impl AuthLayout {
    /// The layout for `key`'s AEAD and a nonce of `nonce_len` bytes.
    pub fn new(tag_first: bool, at: usize, nonce_len: usize, plain_len: usize) -> Self {
        let nonce_at = at + AUTH_FIXED_LEN;
        let ct_at = nonce_at + padded4(nonce_len);
        let (plain_at, tag_at) = if tag_first { (ct_at + TAG_LEN, ct_at) } else { (ct_at, ct_at + plain_len) };
        Self { nonce_at, plain_at, tag_at, end: ct_at + padded4(plain_len + TAG_LEN) }
    }
}

/// Seals an authenticator field at `out[at..]`: the plaintext must already
/// be at [`AuthLayout::plain_at`]; the associated data is `out[..at]`.
/// Returns the end of the field, or `None` if `out` is too short or the
/// field too long for its 16-bit length.
pub fn seal_authenticator(out: &mut [u8], at: usize, key: &NtsKey, nonce: &[u8], plain_len: usize) -> Option<usize> {
    seal_authenticator_with(out, at, key.aead().tag_first(), nonce, plain_len, |ad, plain| {
        key.seal_in_place(nonce, ad, plain)
    })
}

/// [`seal_authenticator`] with the sealing done by `seal(ad, plain)`.
fn seal_authenticator_with(
    out: &mut [u8],
    at: usize,
    tag_first: bool,
    nonce: &[u8],
    plain_len: usize,
    seal: impl FnOnce(&[u8], &mut [u8]) -> Result<[u8; TAG_LEN], AeadError>,
) -> Option<usize> {
    let layout = AuthLayout::new(tag_first, at, nonce.len(), plain_len);
    let field_len = u16::try_from(layout.end - at).ok()?;
    let (ad, field) = out.get_mut(..layout.end)?.split_at_mut(at);
    let rel = |x: usize| x - at;
    field[..2].copy_from_slice(&field_type::NTS_AUTHENTICATOR.to_be_bytes());
    field[2..4].copy_from_slice(&field_len.to_be_bytes());
    field[4..6].copy_from_slice(&u16::try_from(nonce.len()).ok()?.to_be_bytes());
    field[6..8].copy_from_slice(&u16::try_from(plain_len + TAG_LEN).ok()?.to_be_bytes());
    let nonce_end = rel(layout.nonce_at) + nonce.len();
    field[rel(layout.nonce_at)..nonce_end].copy_from_slice(nonce);
    let ct_at = rel(layout.nonce_at) + padded4(nonce.len());
    field[nonce_end..ct_at].fill(0);
    let ct_end = ct_at + plain_len + TAG_LEN;
    field[ct_end..].fill(0);
    let plain = &mut field[rel(layout.plain_at)..rel(layout.plain_at) + plain_len];
    let tag = seal(ad, plain).ok()?;
    field[rel(layout.tag_at)..rel(layout.tag_at) + TAG_LEN].copy_from_slice(&tag);
    Some(layout.end)
}

/// Writes the NTS part of a reply after the 48-byte header already in
/// `out` (transmit timestamp included: it is authenticated): the Unique
/// Identifier copy and an authenticator sealed with the S2C key carrying
/// up to `wanted` fresh cookies (capped at [`MAX_REPLY_COOKIES`]), as many
/// as keep the reply within `max_len` bytes. Returns the reply length and
/// the number of cookies, or `None` if not even a reply without cookies
/// fits.
pub fn write_reply(
    out: &mut [u8],
    req: &NtsRequest<'_>,
    keys: &SessionKeys,
    ring: &KeyRing,
    nonces: &mut dyn NonceSource,
    wanted: usize,
    max_len: usize,
) -> Option<(usize, usize)> {
    let aead = keys.aead;
    let nonce_len = aead.nonce_len();
    let uid_end = HEADER_LEN + req.unique_id_field.len();
    let max_len = max_len.min(out.len());
    let base = AuthLayout::new(aead.tag_first(), uid_end, nonce_len, 0).end;
    if base > max_len {
        return None;
    }
    let cookies = wanted.min(MAX_REPLY_COOKIES).min((max_len - base) / COOKIE_FIELD_LEN);
    let plain_len = cookies * COOKIE_FIELD_LEN;
    out[HEADER_LEN..uid_end].copy_from_slice(req.unique_id_field);
    let layout = AuthLayout::new(aead.tag_first(), uid_end, nonce_len, plain_len);
    let master = ring.current();
    let mut cookie_nonce = [0u8; COOKIE_NONCE_LEN];
    for field in out[layout.plain_at..layout.plain_at + plain_len].chunks_exact_mut(COOKIE_FIELD_LEN) {
        field[..2].copy_from_slice(&field_type::NTS_COOKIE.to_be_bytes());
        field[2..4].copy_from_slice(&(COOKIE_FIELD_LEN as u16).to_be_bytes());
        nonces.fill(&mut cookie_nonce);
        let cookie: &mut [u8; COOKIE_LEN] = (&mut field[4..]).try_into().ok()?;
        seal_cookie(master, keys, &cookie_nonce, cookie);
    }
    let mut nonce = [0u8; 16];
    let nonce = &mut nonce[..nonce_len];
    nonces.fill(nonce);
    // The S2C key serves this one message: no key object is built.
    let nonce = &*nonce;
    let end = seal_authenticator_with(out, uid_end, aead.tag_first(), nonce, plain_len, |ad, plain| {
        seal_once(aead, keys.s2c(), nonce, ad, plain)
    })?;
    Some((end, cookies))
}

/// Writes the Unique Identifier copy of an NTS NAK after the KoD header
/// already in `out`; returns the reply length.
pub fn write_nak(out: &mut [u8], req: &NtsRequest<'_>) -> Option<usize> {
    let end = HEADER_LEN + req.unique_id_field.len();
    out.get_mut(HEADER_LEN..end)?.copy_from_slice(req.unique_id_field);
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authenticator_split() {
        // nonce 3 bytes (padded to 4), ciphertext 16 bytes.
        let mut body = vec![0, 3, 0, 16, 1, 2, 3, 0];
        body.extend_from_slice(&[9; 16]);
        let (n, c) = split_authenticator(&body).unwrap();
        assert_eq!(n, &[1, 2, 3]);
        assert_eq!(c, &[9; 16]);
        assert!(split_authenticator(&body[..body.len() - 1]).is_none());
        assert!(split_authenticator(&[0, 0, 0, 15, 0, 0, 0, 0]).is_none(), "shorter than a tag");
        assert!(split_authenticator(&[0, 0]).is_none());
        assert!(split_authenticator(&[0xFF, 0xFF, 0, 16]).is_none());
    }

    #[test]
    fn layouts() {
        let siv = AuthLayout::new(true, 100, 16, 104);
        assert_eq!((siv.nonce_at, siv.tag_at, siv.plain_at, siv.end), (108, 124, 140, 244));
        let gcm = AuthLayout::new(false, 100, 12, 104);
        assert_eq!((gcm.nonce_at, gcm.plain_at, gcm.tag_at, gcm.end), (108, 120, 224, 240));
    }
}
