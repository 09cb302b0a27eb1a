//! Per-packet cost of the protocol core: one `Responder::handle` call for a
//! plain request and for an NTS request, and the rate limiter alone on its
//! hit and miss paths.
//!
//! Run with `cargo bench -p chime-bench`; figures and the machine they were
//! measured on are in `bench/README.md`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use chime_bench::{nts_request, nts_ring, plain_request, synced_clock};
use chime_proto::acl::Acl;
use chime_proto::nts::{Aead, AesCtrNonces};
use chime_proto::ratelimit::{RateLimitConfig, RateLimiter};
use chime_proto::{Action, Context, NtpTimestamp, RequestMeta, Responder, ResponderConfig, RxTimestamp, StampKind};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn plain_reply(c: &mut Criterion) {
    let mut g = c.benchmark_group("responder");
    g.throughput(Throughput::Elements(1));
    let clock = synced_clock();
    let acl = Acl::default();
    let req = plain_request();
    let rx = NtpTimestamp::from_unix(1_790_000_100, 0);
    let mut out = [0u8; 2048];

    // Rate limiting on, each request from a new address (a table miss and
    // insert, the pool server's common case).
    let mut r = Responder::new(ResponderConfig::default(), 7);
    let mut n: u32 = 0;
    g.bench_function("plain_reply_limiter_on", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let meta = RequestMeta {
                source: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(n | 0x0100_0000)), 40000),
                rx: RxTimestamp { time: rx, kind: StampKind::KernelSoftware },
            };
            let ctx = Context { clock: &clock, acl: &acl, nts: None };
            match r.handle(black_box(&req), &meta, &ctx, &mut || rx, &mut out) {
                Action::Reply(b) => b.len(),
                Action::Drop(_) => 0,
            }
        })
    });

    let mut cfg = ResponderConfig::default();
    cfg.rate_limit.enabled = false;
    let mut r = Responder::new(cfg, 7);
    let meta = RequestMeta {
        source: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 40000),
        rx: RxTimestamp { time: rx, kind: StampKind::KernelSoftware },
    };
    g.bench_function("plain_reply_limiter_off", |b| {
        b.iter(|| {
            let ctx = Context { clock: &clock, acl: &acl, nts: None };
            match r.handle(black_box(&req), &meta, &ctx, &mut || rx, &mut out) {
                Action::Reply(b) => b.len(),
                Action::Drop(_) => 0,
            }
        })
    });

    let mut bad = req;
    bad[0] = 0x16; // mode 6
    g.bench_function("mode6_drop", |b| {
        b.iter(|| {
            let ctx = Context { clock: &clock, acl: &acl, nts: None };
            matches!(r.handle(black_box(&bad), &meta, &ctx, &mut || rx, &mut out), Action::Drop(_))
        })
    });
    g.finish();
}

/// One NTS request (UID, cookie, authenticator; no placeholders, so one
/// fresh cookie back) to one authenticated reply: open the cookie, verify
/// the authenticator with C2S, seal a fresh cookie, seal the reply with S2C.
fn nts_reply(c: &mut Criterion) {
    let mut g = c.benchmark_group("responder");
    g.throughput(Throughput::Elements(1));
    let clock = synced_clock();
    let acl = Acl::default();
    let ring = nts_ring();
    let rx = NtpTimestamp::from_unix(1_790_000_100, 0);
    let meta = RequestMeta {
        source: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 40000),
        rx: RxTimestamp { time: rx, kind: StampKind::KernelSoftware },
    };
    let mut out = [0u8; 2048];
    for (name, aead) in [("nts_reply", Aead::SivCmac256), ("nts_reply_gcm_siv", Aead::GcmSiv128)] {
        let req = nts_request(aead, 0);
        let mut cfg = ResponderConfig::default();
        cfg.rate_limit.enabled = false;
        let mut r = Responder::new(cfg, 7);
        r.set_nonce_source(Box::new(AesCtrNonces::new(&[7; 32])));
        g.bench_function(name, |b| {
            b.iter(|| {
                let ctx = Context { clock: &clock, acl: &acl, nts: Some(&ring) };
                match r.handle(black_box(&req), &meta, &ctx, &mut || rx, &mut out) {
                    Action::Reply(b) => b.len(),
                    Action::Drop(_) => 0,
                }
            })
        });
        assert_eq!(r.counters().nts_replies, r.counters().received, "{name}: every request answered");
    }
    g.finish();
}

fn rate_limiter(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratelimit");
    g.throughput(Throughput::Elements(1));
    let cfg = RateLimitConfig::default();
    let t0 = NtpTimestamp::from_unix(1_790_000_000, 0);

    // Hit: a few hundred known clients polling in turn (their entries stay
    // in the table and in cache).
    let mut rl = RateLimiter::new(&cfg, [1, 2]);
    let mut i: u32 = 0;
    let mut t = t0;
    g.bench_function("hit", |b| {
        b.iter(|| {
            i = (i + 1) % 256;
            t = t.add_secs(0.01);
            rl.check(black_box(IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | i))), t)
        })
    });

    // Miss: a new IPv4 source every time (spoofed-source flood).
    let mut rl = RateLimiter::new(&cfg, [1, 2]);
    let mut n: u32 = 0;
    g.bench_function("miss_ipv4", |b| {
        b.iter(|| {
            n = n.wrapping_add(0x9E37_79B9);
            rl.check(black_box(IpAddr::V4(Ipv4Addr::from(n))), t0)
        })
    });

    let mut rl = RateLimiter::new(&cfg, [1, 2]);
    let mut m: u128 = 0;
    g.bench_function("miss_ipv6", |b| {
        b.iter(|| {
            m = m.wrapping_add(0x9E37_79B9_7F4A_7C15 << 64);
            rl.check(black_box(IpAddr::V6(Ipv6Addr::from(m))), t0)
        })
    });
    g.finish();
}

criterion_group!(benches, plain_reply, nts_reply, rate_limiter);
criterion_main!(benches);
