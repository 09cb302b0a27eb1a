//! chime's benchmarks.
//!
//! The criterion micro-benchmarks live in `benches/` (`cargo bench -p
//! chime-bench`); see `bench/README.md` for how to run them and the latest
//! figures. The end-to-end side-by-side harness (chime-load against chimed,
//! chronyd and NTPsec in network namespaces) is `bench/e2e/run.sh`. This
//! library holds the fixtures the benchmarks share.
#![forbid(unsafe_code)]

use chime_proto::ext::{field_type, write_extension_field};
use chime_proto::nts::ntp::{AuthLayout, seal_authenticator};
use chime_proto::nts::{Aead, COOKIE_LEN, KeyRing, MasterKey, NtsKey, SessionKeys, seal_cookie};
use chime_proto::packet::{LeapIndicator, RefId};
use chime_proto::{ClockSnapshot, NtpTimestamp};

/// Unix time the fixtures are anchored at (2026-09).
pub const T0_UNIX: i64 = 1_790_000_000;

/// A synchronized stratum-1 clock, as the benchmarks serve it.
pub fn synced_clock() -> ClockSnapshot {
    ClockSnapshot {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 1,
        reference_id: RefId(*b"GPS\0"),
        reference_time: NtpTimestamp::from_unix(T0_UNIX, 0),
        root_delay: 0.0,
        root_dispersion: 0.000_01,
        precision: -24,
        updated_at: NtpTimestamp::from_unix(T0_UNIX, 0),
        smear: None,
    }
}

/// A plain 48-byte NTPv4 client request.
pub fn plain_request() -> [u8; 48] {
    let mut r = [0u8; 48];
    r[0] = 0x23;
    r[2] = 6;
    r[40..48].copy_from_slice(&0x1234_5678_9ABC_DEF0u64.to_be_bytes());
    r
}

/// A key ring with one master key, as the NTS benchmarks serve with.
pub fn nts_ring() -> KeyRing {
    KeyRing::new(MasterKey::new(1, [0xA5; 16]), 7, T0_UNIX as u64)
}

/// An NTS request as chrony sends it in steady state: the plain request's
/// header, a 32-byte Unique Identifier, one cookie sealed under
/// [`nts_ring`]'s key, `placeholders` cookie placeholders, and the
/// authenticator sealed with the C2S key of an `aead` session.
pub fn nts_request(aead: Aead, placeholders: usize) -> Vec<u8> {
    let n = aead.key_len();
    let keys = SessionKeys::new(aead, &[0x11; 32][..n], &[0x22; 32][..n]).expect("key lengths match");
    let mut cookie = [0u8; COOKIE_LEN];
    seal_cookie(nts_ring().current(), &keys, &[0x33; 12], &mut cookie);
    let mut b = vec![0u8; 2048];
    b[..48].copy_from_slice(&plain_request());
    let mut at = 48;
    let field = |b: &mut Vec<u8>, at: &mut usize, t: u16, v: &[u8]| {
        *at += write_extension_field(&mut b[*at..], t, v).expect("room");
    };
    field(&mut b, &mut at, field_type::UNIQUE_IDENTIFIER, &[0x44; 32]);
    field(&mut b, &mut at, field_type::NTS_COOKIE, &cookie);
    for _ in 0..placeholders {
        field(&mut b, &mut at, field_type::NTS_COOKIE_PLACEHOLDER, &[0; COOKIE_LEN]);
    }
    let key = NtsKey::new(aead, keys.c2s()).expect("key length");
    let nonce = [0x55; 16];
    let nonce = &nonce[..aead.nonce_len()];
    debug_assert!(AuthLayout::new(aead.tag_first(), at, nonce.len(), 0).end <= b.len());
    let end = seal_authenticator(&mut b, at, &key, nonce, 0).expect("room");
    b.truncate(end);
    b
}
