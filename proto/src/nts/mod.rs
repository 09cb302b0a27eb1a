//! Network Time Security (RFC 8915), sans-IO.
//!
//! - [`ke`]: NTS-KE records, the streaming request parser, negotiation and
//!   the response writer (the TLS server around it is `chime-nts-ke`).
//! - [`aead`]: `AEAD_AES_SIV_CMAC_256` and `AEAD_AES_128_GCM_SIV` behind one
//!   in-place interface.
//! - [`cookie`]: the cookie format, sealed under a master key.
//! - [`keyring`]: master keys, rotation, persistence bytes, fleet mode.
//! - [`ntp`]: the NTS extension fields of an NTP request and the reply.
//! - [`nonce`]: where nonces come from.
//!
//! The [`Responder`](crate::Responder) uses these when its
//! [`Context`](crate::Context) has a [`KeyRing`].

pub mod aead;
pub mod cookie;
mod gcm_siv;
pub mod ke;
pub mod keyring;
pub mod nonce;
pub mod ntp;
mod siv;

pub use aead::{Aead, AeadError, NtsKey, open_once, seal_once};
pub use cookie::{COOKIE_LEN, CookieError, SessionKeys, open_cookie, seal_cookie};
pub use keyring::{KeyRing, KeyRingConfig, KeyRingError, MasterKey, fleet_key};
pub use nonce::{AesCtrNonces, NonceSource};
