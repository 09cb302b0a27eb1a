//! The bodies of chime's fuzz targets.
//!
//! Each public function takes the fuzzer's bytes, runs one parser or the
//! responder on them, and asserts the invariants that matter (a panic is a
//! finding): no reply longer than its request, every unanswered packet
//! counted under one drop reason, parse → encode round trips. The cargo-fuzz
//! targets in `fuzz/fuzz_targets/` only call these; `tests/corpus.rs`
//! replays the committed corpus and regression inputs through them on
//! stable Rust.

mod config;
mod cookie;
mod leap;
mod nts_ke;
mod packet;
mod responder;

pub use config::config;
pub use cookie::cookie;
pub use leap::leap;
pub use nts_ke::nts_ke;
pub use packet::ntp_packet;
pub use responder::{nts_authenticates, responder_nts, responder_plain};

use chime_proto::nts::KeyRing;

/// A target body: the fuzzer's bytes in, a panic for a finding.
pub type Body = fn(&[u8]);

/// Every target: its name (the folder of its corpus) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("ntp_packet", ntp_packet),
    ("responder_plain", responder_plain),
    ("responder_nts", responder_nts),
    ("nts_ke", nts_ke),
    ("cookie", cookie),
    ("config", config),
    ("leap", leap),
];

/// The key ring file the NTS targets use, and the seed capture script hands
/// to chimed, so captured cookies open here.
pub const KEY_FILE: &[u8] = include_bytes!("../data/nts-keys");

/// The fixed key ring of [`KEY_FILE`].
pub fn key_ring() -> KeyRing {
    match KeyRing::decode(KEY_FILE) {
        Ok(ring) => ring,
        Err(e) => panic!("fuzz/harness/data/nts-keys does not decode: {e}"),
    }
}
