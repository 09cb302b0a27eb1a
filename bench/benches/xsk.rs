//! The AF_XDP ring protocol and frame accounting, per packet, without the
//! kernel: the same `ProducerRing`/`ConsumerRing`/`FramePool` code the XDP
//! worker runs, over rings in ordinary memory ([`MemRingPair`]), with the
//! benchmark playing the kernel's side.
//!
//! - `xsk/ring_batch64`: produce a batch of 64 descriptors, consume them;
//!   per descriptor (both sides).
//! - `xsk/worker_cycle_batch64`: the worker's whole per-packet ring work in
//!   a batch of 64 — fill ring → (kernel) → RX ring → answer in place → TX
//!   ring → (kernel) → completion ring → back to the fill ring, with every
//!   frame transition checked — and the kernel's ring work alongside. The
//!   kernel's copy, the XDP program and the syscalls are not in it (the
//!   end-to-end harness measures those).
//!
//! - `frame/checksum_{48,90,1500}`: the Internet checksum (RFC 1071) over
//!   that many bytes.
//! - `frame/reply_in_place_{v4,v6}`: the XDP worker's frame work per
//!   reply, around the responder: parse the request frame (Ethernet,
//!   IPv4/IPv6, UDP), then turn it into the reply in place (swap MACs,
//!   addresses and ports, IPv4 header checksum, UDP checksum over the
//!   pseudo-header and the 48-byte reply).
//!
//! Run with `cargo bench -p chime-bench --bench xsk`.

use std::hint::black_box;
use std::net::SocketAddr;

use chime_ebpf::checksum::Checksum;
use chime_ebpf::frame::{IpFamily, MacPair, build_reply_in_place, parse_request, udp_payload_offset, write_udp_frame};
use chime_ebpf::xsk::{FramePool, MemRingPair, XdpDesc};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BATCH: u32 = 64;
const FRAMES: u32 = 4096;
const FRAME_SIZE: u32 = 2048;
const RING: u32 = 2048;

fn ring_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("xsk");
    g.throughput(Throughput::Elements(u64::from(BATCH)));
    let mut pair = MemRingPair::<XdpDesc>::new(RING);
    let mut addr = 0u64;
    g.bench_function("ring_batch64", |b| {
        b.iter(|| {
            let (prod, cons) = pair.split();
            let mut tx = prod.reserve(BATCH);
            while tx.push(XdpDesc { addr, len: 90, options: 0 }).is_ok() {
                addr = addr.wrapping_add(u64::from(FRAME_SIZE));
            }
            tx.submit();
            let rx = cons.peek(BATCH);
            let sum: u64 = rx.iter().map(|d| d.addr ^ u64::from(d.len)).sum();
            rx.release();
            black_box(sum)
        })
    });
    g.finish();
}

/// The four rings of one socket and its frame pool, the kernel's side
/// played by the benchmark.
struct Socket {
    pool: FramePool,
    fill: MemRingPair<u64>,
    rx: MemRingPair<XdpDesc>,
    tx: MemRingPair<XdpDesc>,
    comp: MemRingPair<u64>,
}

impl Socket {
    fn new() -> Self {
        let mut s = Self {
            pool: FramePool::new(FRAMES, FRAME_SIZE),
            fill: MemRingPair::new(RING),
            rx: MemRingPair::new(RING),
            tx: MemRingPair::new(RING),
            comp: MemRingPair::new(RING),
        };
        s.refill();
        s
    }

    /// Worker: free frames into the fill ring.
    fn refill(&mut self) {
        let (prod, _) = self.fill.split();
        let mut tx = prod.reserve(self.pool.free_count());
        while tx.remaining() > 0 {
            let Some(a) = self.pool.put_in_fill() else { break };
            tx.push(a).expect("reserved");
        }
        tx.submit();
    }

    /// Kernel: `n` packets arrive in fill-ring frames.
    fn kernel_receive(&mut self, n: u32) {
        let (_, fill) = self.fill.split();
        let (rx, _) = self.rx.split();
        let frames = fill.peek(n);
        let mut out = rx.reserve(frames.len());
        for a in frames.iter() {
            out.push(XdpDesc { addr: a + 256, len: 90, options: 0 }).expect("reserved");
        }
        out.submit();
        frames.release();
    }

    /// Worker: take the RX batch, answer each in place, queue on TX.
    fn worker_answer(&mut self) -> u32 {
        let (_, rx) = self.rx.split();
        let (tx, _) = self.tx.split();
        let batch = rx.peek(BATCH);
        let mut out = tx.reserve(batch.len());
        for d in batch.iter() {
            let base = self.pool.base(d.addr);
            self.pool.on_rx(base).expect("frame was in the fill ring");
            self.pool.on_tx(base).expect("frame is ours");
            out.push(d).expect("reserved");
        }
        let n = out.submit();
        batch.release();
        n
    }

    /// Kernel: transmit the TX ring, complete the frames.
    fn kernel_transmit(&mut self) {
        let (_, tx) = self.tx.split();
        let (comp, _) = self.comp.split();
        let sent = tx.peek(RING);
        let mut done = comp.reserve(sent.len());
        for d in sent.iter() {
            done.push(d.addr).expect("reserved");
        }
        done.submit();
        sent.release();
    }

    /// Worker: reap completions back to the pool.
    fn worker_reap(&mut self) {
        let (_, comp) = self.comp.split();
        let done = comp.peek(RING);
        for a in done.iter() {
            let base = self.pool.base(a);
            self.pool.on_complete(base).expect("frame was on TX");
        }
        done.release();
    }
}

fn worker_cycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("xsk");
    g.throughput(Throughput::Elements(u64::from(BATCH)));
    let mut s = Socket::new();
    g.bench_function("worker_cycle_batch64", |b| {
        b.iter(|| {
            s.kernel_receive(BATCH);
            let n = s.worker_answer();
            s.kernel_transmit();
            s.worker_reap();
            s.refill();
            black_box(n)
        })
    });
    assert!(s.pool.check_invariant(), "frame accounting broke");
    let counts = s.pool.counts();
    assert_eq!((counts.user, counts.tx), (0, 0), "every frame came back");
    g.finish();
}

fn checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    let data: Vec<u8> = (0..1500u32).map(|i| (i * 7 + 3) as u8).collect();
    for len in [48usize, 90, 1500] {
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("checksum_{len}"), |b| {
            b.iter(|| Checksum::new().add_bytes(black_box(&data[..len])).finish())
        });
    }
    g.finish();
}

fn reply_in_place(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    let macs = MacPair { src: [2, 0, 0, 0, 0, 1], dst: [2, 0, 0, 0, 0, 2] };
    for (name, client, server) in [
        ("reply_in_place_v4", "198.51.100.7:40000", "192.0.2.1:123"),
        ("reply_in_place_v6", "[2001:db8::7]:40000", "[2001:db8::1]:123"),
    ] {
        let (client, server): (SocketAddr, SocketAddr) = (client.parse().unwrap(), server.parse().unwrap());
        let mut request = [0u8; 256];
        let off = udp_payload_offset(if client.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 });
        request[off] = 0x23;
        let len = write_udp_frame(&mut request, &macs, client, server, 48, 1).unwrap();
        let mut frame = [0u8; 256];
        g.bench_function(name, |b| {
            b.iter(|| {
                // A fresh copy of the request each time (64 bytes of
                // memcpy, as the kernel's copy into the frame would leave it).
                frame[..len].copy_from_slice(&request[..len]);
                let req = parse_request(black_box(&frame[..len])).unwrap();
                build_reply_in_place(&mut frame, &req, 48).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, ring_batch, worker_cycle, checksum, reply_in_place);
criterion_main!(benches);
