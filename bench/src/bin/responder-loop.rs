//! Runs `Responder::handle` N times on a plain request, for counting
//! instructions per response with callgrind (stable on a noisy machine):
//!
//! ```sh
//! cargo build --release -p chime-bench --bin responder-loop
//! for n in 100000 200000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/responder-loop $n limiter-on 2>&1 | grep 'Collected'
//! done
//! ```
//! The difference of the two totals divided by 100000 is the cost of one
//! response, with start-up cost cancelled out. Modes: `limiter-on` (a new
//! client address per request: table miss and insert), `limiter-off`, and
//! `nts` (limiter off, one NTS request with AEAD_AES_SIV_CMAC_256: cookie
//! opened, authenticator verified, one fresh cookie, reply sealed) or
//! `nts-gcm-siv` (the same session with AEAD_AES_128_GCM_SIV), and
//! `rate-limited` (1024 sources in 1024 different /24s taking turns, all
//! over their limit after the first 16 rounds: the limiter's hit path, and
//! the top-prefix sketch's worst case, every request a full scan and a
//! replacement).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use chime_bench::{nts_request, nts_ring, plain_request, synced_clock};
use chime_proto::acl::Acl;
use chime_proto::nts::{Aead, AesCtrNonces};
use chime_proto::{Action, Context, NtpTimestamp, RequestMeta, Responder, ResponderConfig, RxTimestamp, StampKind};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let mode = args.next().unwrap_or_else(|| "limiter-on".into());
    let mut cfg = ResponderConfig::default();
    let nts = match mode.as_str() {
        "nts" => Some(Aead::SivCmac256),
        "nts-gcm-siv" => Some(Aead::GcmSiv128),
        _ => None,
    };
    let flood = mode == "rate-limited";
    cfg.rate_limit.enabled = mode == "limiter-on" || flood;
    // A small table keeps start-up (allocation and zeroing) out of the way.
    cfg.rate_limit.capacity = 1 << 16;
    let mut r = Responder::new(cfg, 7);
    r.set_nonce_source(Box::new(AesCtrNonces::new(&[7; 32])));
    let clock = synced_clock();
    let acl = Acl::default();
    let ring = nts_ring();
    let req = match nts {
        Some(aead) => nts_request(aead, 0),
        None => plain_request().to_vec(),
    };
    let rx = NtpTimestamp::from_unix(1_790_000_100, 0);
    let mut out = [0u8; 2048];
    let mut bytes = 0usize;
    for i in 0..n {
        // NTS modes: one client (every request answered); the flood: 1024
        // clients in turn; otherwise a new address each time (a few land on
        // unanswerable ones).
        let source = if nts.is_some() {
            0xC000_0201
        } else if flood {
            0x0A00_0001 | ((i % 1024) << 8)
        } else {
            i.wrapping_mul(0x9E37_79B9) | 1
        };
        let meta = RequestMeta {
            source: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(source)), 40000),
            rx: RxTimestamp { time: rx, kind: StampKind::KernelSoftware },
        };
        let ctx = Context { clock: &clock, acl: &acl, nts: nts.map(|_| &ring) };
        if let Action::Reply(b) = r.handle(black_box(&req), &meta, &ctx, &mut || rx, &mut out) {
            bytes += b.len();
        }
    }
    println!("{n} requests, {bytes} reply bytes");
}
