//! [`XskQueue`]: one NIC queue's socket, UMEM and frame accounting, with the
//! receive → answer in place → transmit loop a worker runs.

use std::io;

use super::frames::{FrameCounts, FramePool};
use super::socket::{BindMode, BindOptions, CompRing, FillRing, RxRing, TxRing, XdpStatistics, XskSocket};
use super::sys::{XDP_PACKET_HEADROOM, XdpDesc};
use super::txmd::TxMetadata;
use super::umem::{Umem, UmemConfig};
use crate::program::{META_LEN, XdpMeta};

/// Shape of an [`XskQueue`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XskQueueConfig {
    /// The UMEM and its fill/completion rings.
    pub umem: UmemConfig,
    /// Bind options and RX/TX ring sizes.
    pub bind: BindOptions,
    /// The XDP program prepends a receive header ([`XdpMeta`]) to the
    /// frames it steers: split it off (recognised by its magic) and hand it
    /// to the `poll_rx` callback; the packet starts after it.
    pub rx_meta: bool,
    /// Ask for a TX timestamp on every transmitted frame (needs
    /// `umem.tx_metadata_len` ≥ 16); read them with
    /// [`XskQueue::reap_completions`].
    pub tx_timestamps: bool,
}

impl XskQueueConfig {
    /// Default shapes, receive headers split off, no TX timestamps.
    pub fn new() -> Self {
        Self { rx_meta: true, ..Self::default() }
    }
}

/// What one [`XskQueue::poll_rx`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PollStats {
    /// Frames taken from the RX ring.
    pub received: u32,
    /// Frames answered and placed on the TX ring.
    pub sent: u32,
    /// Frames the callback declined (returned `None`), recycled.
    pub declined: u32,
    /// Answers dropped because the TX ring was full, recycled.
    pub tx_ring_full: u32,
    /// Answers with a length of 0 or longer than the request, recycled.
    pub bad_len: u32,
    /// Transmit completions reaped.
    pub completed: u32,
    /// Frames put on the fill ring.
    pub filled: u32,
}

/// Cumulative counters of an [`XskQueue`], for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueCounters {
    /// Frames received.
    pub rx: u64,
    /// Frames transmitted (placed on the TX ring).
    pub tx: u64,
    /// Frames declined by the callback.
    pub declined: u64,
    /// Answers dropped for a full TX ring.
    pub tx_ring_full: u64,
    /// Answers with an invalid length.
    pub bad_len: u64,
    /// Descriptors the frame accounting refused (kernel handed back an address
    /// it did not own, or an RX descriptor running past its frame). Nonzero
    /// means a bug.
    pub bad_desc: u64,
    /// `sendto` kicks.
    pub tx_kicks: u64,
    /// `recvfrom` wakeups for the fill ring.
    pub rx_wakeups: u64,
}

/// One queue: an [`XskSocket`] (which owns the [`Umem`]) and a
/// [`FramePool`] tracking every frame.
///
/// Frame lifecycle: free → fill ring → (kernel receives) → RX ring → the
/// `poll_rx` callback → either the TX ring (answered, same frame, new
/// length) → completion ring → free, or straight back to free (declined,
/// invalid, TX ring full). Free frames go back on the fill ring in the same
/// call. Every path ends in a pool transition, so no frame leaks: see
/// [`frame_counts`](Self::frame_counts) and [`in_flight`](Self::in_flight).
///
/// Nothing allocates after [`new`](Self::new).
#[derive(Debug)]
pub struct XskQueue {
    sock: XskSocket,
    eng: Engine,
}

impl XskQueue {
    /// Maps the UMEM, binds the socket to `queue_id` of `ifindex` and fills
    /// the fill ring.
    pub fn new(ifindex: u32, queue_id: u32, cfg: XskQueueConfig) -> io::Result<Self> {
        let umem = Umem::new(cfg.umem)?;
        let eng = Engine::new(&umem, &cfg);
        let sock = XskSocket::new(umem, ifindex, queue_id, cfg.bind)?;
        let mut q = Self { sock, eng };
        q.refill()?;
        Ok(q)
    }

    /// The socket (statistics, fd for the XSKMAP, bind mode).
    pub fn socket(&self) -> &XskSocket {
        &self.sock
    }

    /// Zero-copy or copy.
    pub fn bind_mode(&self) -> BindMode {
        self.sock.bind_mode()
    }

    /// The socket's `XDP_STATISTICS`.
    pub fn statistics(&self) -> io::Result<XdpStatistics> {
        self.sock.statistics()
    }

    /// Where the frames are.
    pub fn frame_counts(&self) -> FrameCounts {
        self.eng.pool.counts()
    }

    /// Frames not on the free list (fill ring, RX, TX, completion).
    pub fn in_flight(&self) -> u32 {
        self.eng.pool.in_flight()
    }

    /// The frame pool (for invariant checks).
    pub fn frames(&self) -> &FramePool {
        &self.eng.pool
    }

    /// Cumulative counters.
    pub fn counters(&self) -> QueueCounters {
        self.eng.counters
    }

    /// Waits up to `timeout_ms` for received packets (poll(2)).
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        self.sock.wait_rx(timeout_ms)
    }

    /// Receives up to `max` frames and hands each to `f(packet, meta)`:
    /// `packet` is the received bytes (Ethernet header first), writable in
    /// place; `meta` is the receive header the XDP program prepended
    /// ([`META_LEN`] bytes, see [`XdpMeta::from_frame`]) when configured and
    /// present. `f` returns
    /// `Some(len)` to transmit the frame as rewritten, `len` bytes from the
    /// packet start (1 ≤ `len` ≤ `packet.len()`: a reply is never longer
    /// than its request), or `None` to drop it.
    ///
    /// Also reaps transmit completions, keeps the fill ring topped up and
    /// makes the syscalls need_wakeup asks for (at most one kick per call).
    pub fn poll_rx<F>(&mut self, max: u32, mut f: F) -> io::Result<PollStats>
    where
        F: FnMut(&mut [u8], Option<&[u8]>) -> Option<usize>,
    {
        self.poll_rx_with(max, |_, _| {}, |_, pkt, meta| f(pkt, meta))
    }

    /// [`poll_rx`](Self::poll_rx) that also hands each transmit completion
    /// to `on_complete(addr, tx_timestamp)` (as
    /// [`reap_completions`](Self::reap_completions) does) and tells `f` the
    /// UMEM address of each frame, `f(addr, packet, meta)`: an answered
    /// frame comes back on completion under the same address, so a caller
    /// can match transmit stamps to replies by frame.
    pub fn poll_rx_with<C, F>(&mut self, max: u32, on_complete: C, f: F) -> io::Result<PollStats>
    where
        C: FnMut(u64, Option<u64>),
        F: FnMut(u64, &mut [u8], Option<&[u8]>) -> Option<usize>,
    {
        let mut st = PollStats { completed: self.reap_completions(on_complete), ..PollStats::default() };
        st.filled = self.refill()?;
        let parts = self.sock.parts();
        self.eng.receive(parts.umem, parts.rx, parts.tx, max, f, &mut st);
        st.filled += self.refill()?;
        if st.sent > 0 && (self.sock.tx_needs_wakeup() || self.sock.bind_mode() == BindMode::Copy) {
            self.eng.counters.tx_kicks += 1;
            self.sock.kick_tx()?;
        }
        Ok(st)
    }

    /// Reaps transmit completions, calling `f(addr, tx_timestamp)` for each
    /// (the timestamp when TX timestamps are on and the driver gave one), and
    /// returns the frames to the free list. Returns how many.
    pub fn reap_completions(&mut self, f: impl FnMut(u64, Option<u64>)) -> u32 {
        let parts = self.sock.parts();
        self.eng.reap(parts.umem, parts.comp, f)
    }

    /// Moves free frames onto the fill ring (as many as fit) and wakes the
    /// kernel if it asked; returns how many.
    pub fn refill(&mut self) -> io::Result<u32> {
        let n = self.eng.refill(self.sock.fill());
        if self.sock.fill_needs_wakeup() {
            self.eng.counters.rx_wakeups += 1;
            self.sock.wakeup_rx()?;
        }
        Ok(n)
    }

    /// Takes a free frame to build a packet in: returns its packet address
    /// (frame base + `XDP_PACKET_HEADROOM`, leaving room for TX metadata) and
    /// the writable bytes from there. Hand it to [`send`](Self::send) or give
    /// it back with [`discard`](Self::discard).
    pub fn alloc_tx_frame(&mut self) -> Option<(u64, &mut [u8])> {
        let base = self.eng.pool.alloc()?;
        let addr = base + u64::from(XDP_PACKET_HEADROOM);
        Some((addr, self.sock.umem_mut().frame_mut(addr)))
    }

    /// Returns a frame from [`alloc_tx_frame`](Self::alloc_tx_frame) unused.
    pub fn discard(&mut self, addr: u64) {
        if self.eng.pool.recycle(addr).is_err() {
            self.eng.counters.bad_desc += 1;
        }
    }

    /// Transmits `len` bytes of a frame from
    /// [`alloc_tx_frame`](Self::alloc_tx_frame) and kicks the kernel. Returns
    /// false (frame recycled) when the TX ring is full.
    pub fn send(&mut self, addr: u64, len: u32) -> io::Result<bool> {
        let parts = self.sock.parts();
        let sent = self.eng.send(parts.umem, parts.tx, addr, len)?;
        if sent {
            self.eng.counters.tx_kicks += 1;
            self.sock.kick_tx()?;
        }
        Ok(sent)
    }
}

impl XskQueue {
    /// Builds and transmits new frames in one batch, for a sender (the load
    /// generator): reaps transmit completions first (their TX stamps are
    /// dropped), then, while fewer than `max` are queued and the TX ring
    /// and the free list allow, takes a free frame and calls `build(frame)`
    /// with its writable bytes (from the packet address, leaving the
    /// headroom for TX metadata). `build` returns `Some(len)` to send the
    /// first `len` bytes, or `None` when it has nothing more (the frame goes
    /// back). All descriptors are published at once, then the kernel is
    /// kicked until it has taken them or stops making progress (a copy-mode
    /// kick transmits at most its budget; see
    /// [`XskSocket::set_tx_budget`]). Returns how many were queued.
    pub fn send_batch<F>(&mut self, max: u32, build: F) -> io::Result<u32>
    where
        F: FnMut(&mut [u8]) -> Option<usize>,
    {
        self.reap_completions(|_, _| {});
        let parts = self.sock.parts();
        let n = self.eng.send_batch(parts.umem, parts.tx, max, build);
        if n > 0 {
            self.flush_tx()?;
        }
        Ok(n)
    }

    /// Kicks the kernel until the TX ring is empty or a kick moved nothing
    /// (at most 64 kicks). Without need_wakeup in zero-copy mode one kick
    /// is all it takes; in copy mode each kick transmits a budget's worth.
    pub fn flush_tx(&mut self) -> io::Result<()> {
        if !(self.sock.tx_needs_wakeup() || self.sock.bind_mode() == BindMode::Copy) {
            return Ok(());
        }
        let mut left = self.sock.tx().outstanding();
        for _ in 0..64 {
            self.eng.counters.tx_kicks += 1;
            self.sock.kick_tx()?;
            let now = self.sock.tx().outstanding();
            if now == 0 || now == left || self.sock.bind_mode() == BindMode::ZeroCopy {
                break;
            }
            left = now;
        }
        Ok(())
    }

    /// Frames on the TX ring the kernel has not taken yet.
    pub fn tx_outstanding(&mut self) -> u32 {
        self.sock.tx().outstanding()
    }
}

/// The ring-and-frame logic of [`XskQueue`], apart from the socket so it can
/// run over in-memory rings in tests.
#[derive(Debug)]
struct Engine {
    pool: FramePool,
    rx_meta: bool,
    tx_timestamps: bool,
    counters: QueueCounters,
}

impl Engine {
    fn new(umem: &Umem, cfg: &XskQueueConfig) -> Self {
        Self {
            pool: FramePool::new(umem.frame_count(), umem.frame_size()),
            rx_meta: cfg.rx_meta,
            tx_timestamps: cfg.tx_timestamps && umem.tx_metadata_len() as usize >= TxMetadata::USED,
            counters: QueueCounters::default(),
        }
    }

    fn refill(&mut self, fill: &mut FillRing) -> u32 {
        let want = self.pool.free_count();
        if want == 0 {
            return 0;
        }
        let mut tx = fill.reserve(want);
        while tx.remaining() > 0 {
            let Some(addr) = self.pool.put_in_fill() else { break };
            let pushed = tx.push(addr);
            debug_assert!(pushed.is_ok());
        }
        tx.submit()
    }

    fn reap(&mut self, umem: &Umem, comp: &mut CompRing, mut f: impl FnMut(u64, Option<u64>)) -> u32 {
        let size = comp.size();
        let batch = comp.peek(size);
        for addr in batch.iter() {
            let ts = if self.tx_timestamps && umem.contains(addr) {
                TxMetadata::completion_timestamp_at(umem, addr)
            } else {
                None
            };
            if self.pool.on_complete(addr).is_ok() {
                f(addr, ts);
            } else {
                self.counters.bad_desc += 1;
            }
        }
        batch.release()
    }

    fn receive<F>(&mut self, umem: &mut Umem, rx: &mut RxRing, tx: &mut TxRing, max: u32, mut f: F, st: &mut PollStats)
    where
        F: FnMut(u64, &mut [u8], Option<&[u8]>) -> Option<usize>,
    {
        let batch = rx.peek(max);
        if batch.is_empty() {
            return;
        }
        let mut txr = tx.reserve(batch.len());
        for desc in batch.iter() {
            st.received += 1;
            if self.pool.on_rx(desc.addr).is_err() {
                // Not a frame we gave the kernel (or one it already returned):
                // touching it could corrupt a frame in use. Counted, skipped.
                self.counters.bad_desc += 1;
                continue;
            }
            // The packet starts after the receive header, when there is one;
            // the reply goes out from there, and its completion comes back
            // under that address (same frame).
            let mut pkt_addr = desc.addr;
            let answer = {
                let (chunk, off) = umem.chunk_mut(desc.addr);
                let end = off + desc.len as usize;
                if end > chunk.len() {
                    self.counters.bad_desc += 1;
                    None
                } else {
                    let frame = &mut chunk[off..end];
                    let skip = if self.rx_meta && XdpMeta::from_frame(frame).is_some() { META_LEN } else { 0 };
                    let (meta, pkt) = frame.split_at_mut(skip);
                    pkt_addr += skip as u64;
                    let pkt_len = pkt.len();
                    match f(pkt_addr, pkt, (skip > 0).then_some(&*meta)) {
                        Some(n) if n > 0 && n <= pkt_len => Some(n as u32),
                        Some(_) => {
                            st.bad_len += 1;
                            None
                        }
                        None => {
                            st.declined += 1;
                            None
                        }
                    }
                }
            };
            let Some(len) = answer else {
                let _ = self.pool.recycle(desc.addr);
                continue;
            };
            if txr.remaining() == 0 {
                st.tx_ring_full += 1;
                let _ = self.pool.recycle(desc.addr);
                continue;
            }
            // The receive metadata was read by `f`; the TX metadata may now
            // overwrite the same bytes.
            let options =
                if self.tx_timestamps { TxMetadata::request_timestamp_at(umem, pkt_addr).unwrap_or(0) } else { 0 };
            let pushed = txr.push(XdpDesc { addr: pkt_addr, len, options });
            debug_assert!(pushed.is_ok());
            let _ = self.pool.on_tx(desc.addr);
            st.sent += 1;
        }
        txr.submit();
        batch.release();
        let c = &mut self.counters;
        c.rx += u64::from(st.received);
        c.tx += u64::from(st.sent);
        c.declined += u64::from(st.declined);
        c.tx_ring_full += u64::from(st.tx_ring_full);
        c.bad_len += u64::from(st.bad_len);
    }

    fn send_batch<F>(&mut self, umem: &mut Umem, tx: &mut TxRing, max: u32, mut build: F) -> u32
    where
        F: FnMut(&mut [u8]) -> Option<usize>,
    {
        let mut txr = tx.reserve(max);
        while txr.remaining() > 0 {
            let Some(base) = self.pool.alloc() else { break };
            let addr = base + u64::from(XDP_PACKET_HEADROOM);
            let frame = umem.frame_mut(addr);
            let room = frame.len();
            let len = match build(frame) {
                Some(n) if n > 0 && n <= room => n as u32,
                other => {
                    self.counters.bad_len += u64::from(other.is_some());
                    let _ = self.pool.recycle(addr);
                    break;
                }
            };
            let options =
                if self.tx_timestamps { TxMetadata::request_timestamp_at(umem, addr).unwrap_or(0) } else { 0 };
            let pushed = txr.push(XdpDesc { addr, len, options });
            debug_assert!(pushed.is_ok());
            let _ = self.pool.on_tx(addr);
        }
        let n = txr.submit();
        self.counters.tx += u64::from(n);
        n
    }

    fn send(&mut self, umem: &mut Umem, tx: &mut TxRing, addr: u64, len: u32) -> io::Result<bool> {
        if self.pool.on_tx(addr).is_err() {
            self.counters.bad_desc += 1;
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "send of a frame not allocated"));
        }
        let options = if self.tx_timestamps { TxMetadata::request_timestamp_at(umem, addr).unwrap_or(0) } else { 0 };
        let mut txr = tx.reserve(1);
        if txr.push(XdpDesc { addr, len, options }).is_err() {
            drop(txr);
            let _ = self.pool.untx(addr);
            let _ = self.pool.recycle(addr);
            self.counters.tx_ring_full += 1;
            return Ok(false);
        }
        txr.submit();
        self.counters.tx += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::xsk::ring::tests::MemRing;
    use crate::xsk::ring::{ConsumerRing, ProducerRing};

    /// Plays the kernel against an [`Engine`] over in-memory rings.
    struct Sim {
        umem: Umem,
        fill_mem: MemRing<u64>,
        comp_mem: MemRing<u64>,
        rx_mem: MemRing<XdpDesc>,
        tx_mem: MemRing<XdpDesc>,
        fill: FillRing,
        comp: CompRing,
        rx: RxRing,
        tx: TxRing,
        eng: Engine,
        /// Frames the kernel took from the fill ring and holds for receiving.
        held: VecDeque<u64>,
        /// Frames the kernel took from the TX ring and has not completed.
        sending: VecDeque<u64>,
        rng: u64,
    }

    impl Sim {
        fn new(seed: u64, tx_timestamps: bool) -> Self {
            let ucfg = UmemConfig {
                frame_count: 64,
                frame_size: 2048,
                fill_size: 32,
                comp_size: 32,
                tx_metadata_len: if tx_timestamps { 24 } else { 0 },
                ..UmemConfig::default()
            };
            let umem = Umem::new(ucfg).unwrap();
            let start = u32::MAX - 7; // indices wrap during the run
            let mut fill_mem = MemRing::new(32, start);
            let mut comp_mem = MemRing::new(32, start);
            let mut rx_mem = MemRing::new(16, start);
            let mut tx_mem = MemRing::new(16, start);
            let cfg = XskQueueConfig { umem: ucfg, tx_timestamps, ..XskQueueConfig::new() };
            Self {
                fill: ProducerRing::new(fill_mem.raw()),
                comp: ConsumerRing::new(comp_mem.raw()),
                rx: ConsumerRing::new(rx_mem.raw()),
                tx: ProducerRing::new(tx_mem.raw()),
                eng: Engine::new(&umem, &cfg),
                umem,
                fill_mem,
                comp_mem,
                rx_mem,
                tx_mem,
                held: VecDeque::new(),
                sending: VecDeque::new(),
                rng: seed | 1,
            }
        }

        fn rand(&mut self, n: u64) -> u64 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng % n.max(1)
        }

        fn ring_free<T: Copy + Default>(m: &MemRing<T>) -> u32 {
            let used = m.producer.load(Ordering::Relaxed).wrapping_sub(m.consumer.load(Ordering::Relaxed));
            m.descs.len() as u32 - used
        }

        /// Kernel: take fill entries, deliver up to `n` packets.
        fn kernel_rx(&mut self, n: u32) {
            let took = self.fill_mem.kernel_consume(u32::MAX);
            self.held.extend(took);
            let n = n.min(Self::ring_free(&self.rx_mem)).min(self.held.len() as u32);
            let mut descs = Vec::new();
            for _ in 0..n {
                let base = self.held.pop_front().unwrap();
                let addr = base + 256 + self.rand(64);
                let len = 60 + self.rand(400) as u32;
                let kind = self.rand(4) as u8;
                let (chunk, off) = self.umem.chunk_mut(addr);
                // The XDP program's receive header, then the packet.
                chunk[off..off + META_LEN].copy_from_slice(&XdpMeta { rx_ns: addr, flags: 0 }.to_bytes());
                chunk[off + META_LEN] = kind;
                descs.push(XdpDesc { addr, len: len + META_LEN as u32, options: 0 });
            }
            self.rx_mem.kernel_produce(&descs);
        }

        /// Kernel: transmit up to `n`, complete up to `m`.
        fn kernel_tx(&mut self, n: u32, m: u32) {
            for d in self.tx_mem.kernel_consume(n) {
                let (chunk, off) = self.umem.chunk_mut(d.addr);
                assert_eq!(chunk[off + 1], 0xaa, "reply was written in place");
                assert!(d.len >= 1);
                if d.options & crate::xsk::sys::XDP_TX_METADATA != 0 {
                    // The "driver" stamps the completion.
                    chunk[off - 24 + 8..off - 8].copy_from_slice(&(d.addr + 1).to_ne_bytes());
                }
                self.sending.push_back(d.addr);
            }
            let m = m.min(Self::ring_free(&self.comp_mem)).min(self.sending.len() as u32);
            let done: Vec<u64> = self.sending.drain(..m as usize).collect();
            self.comp_mem.kernel_produce(&done);
        }

        fn poll(&mut self, max: u32) -> PollStats {
            let mut st = PollStats::default();
            let mut stamps = 0;
            st.completed = self.eng.reap(&self.umem, &mut self.comp, |addr, ts| {
                if let Some(ts) = ts {
                    assert_eq!(ts, addr + 1);
                    stamps += 1;
                }
            });
            if self.eng.tx_timestamps {
                assert_eq!(stamps, st.completed, "every reaped completion had its stamp");
            }
            st.filled = self.eng.refill(&mut self.fill);
            self.eng.receive(
                &mut self.umem,
                &mut self.rx,
                &mut self.tx,
                max,
                |addr, pkt, meta| {
                    let meta = meta.expect("receive header split off");
                    let meta = XdpMeta::from_bytes(meta.try_into().unwrap()).unwrap();
                    assert_eq!(meta.rx_ns + META_LEN as u64, addr, "packet right after its header");
                    match pkt[0] {
                        0 => None,
                        1 => Some(pkt.len() + 1), // too long: refused
                        2 => Some(0),             // empty: refused
                        _ => {
                            pkt[1] = 0xaa;
                            Some(pkt.len() / 2)
                        }
                    }
                },
                &mut st,
            );
            st.filled += self.eng.refill(&mut self.fill);
            st
        }

        fn check(&self) {
            let c = self.eng.pool.counts();
            assert!(self.eng.pool.check_invariant(), "{c:?}");
            let in_fill = self
                .fill_mem
                .producer
                .load(Ordering::Relaxed)
                .wrapping_sub(self.fill_mem.consumer.load(Ordering::Relaxed));
            let in_rx =
                self.rx_mem.producer.load(Ordering::Relaxed).wrapping_sub(self.rx_mem.consumer.load(Ordering::Relaxed));
            let in_tx =
                self.tx_mem.producer.load(Ordering::Relaxed).wrapping_sub(self.tx_mem.consumer.load(Ordering::Relaxed));
            let in_comp = self
                .comp_mem
                .producer
                .load(Ordering::Relaxed)
                .wrapping_sub(self.comp_mem.consumer.load(Ordering::Relaxed));
            assert_eq!(c.fill, in_fill + self.held.len() as u32 + in_rx, "fill-side frames: {c:?}");
            assert_eq!(c.tx, in_tx + self.sending.len() as u32 + in_comp, "tx-side frames: {c:?}");
            assert_eq!(c.user, 0, "nothing stays in userspace between polls");
        }
    }

    #[test]
    fn engine_never_leaks_frames() {
        for (seed, ts) in [(1, false), (7, true), (0xdead_beef, false), (42, true)] {
            let mut sim = Sim::new(seed, ts);
            let mut totals = PollStats::default();
            for _ in 0..2000 {
                let (a, b, c, d) = (sim.rand(20) as u32, sim.rand(24) as u32, sim.rand(24) as u32, sim.rand(20) as u32);
                sim.kernel_rx(a);
                let st = sim.poll(b);
                totals.received += st.received;
                totals.sent += st.sent;
                totals.declined += st.declined;
                totals.bad_len += st.bad_len;
                totals.tx_ring_full += st.tx_ring_full;
                sim.check();
                sim.kernel_tx(c, d);
                sim.check();
            }
            // Drain: the kernel hands back everything it holds.
            for _ in 0..200 {
                sim.kernel_tx(u32::MAX, u32::MAX);
                sim.kernel_rx(u32::MAX);
                sim.poll(u32::MAX);
            }
            sim.kernel_tx(u32::MAX, u32::MAX);
            sim.eng.reap(&sim.umem, &mut sim.comp, |_, _| {});
            sim.check();
            let c = sim.eng.pool.counts();
            assert_eq!((c.user, c.tx), (0, 0), "{c:?}");
            assert_eq!(c.free + c.fill, 64);
            assert_eq!(sim.eng.counters.bad_desc, 0);
            assert_eq!(c.refused, 0);
            assert!(totals.sent > 100 && totals.declined > 100 && totals.bad_len > 100, "{totals:?}");
            assert_eq!(
                totals.received,
                totals.sent + totals.declined + totals.bad_len + totals.tx_ring_full,
                "every received frame has one fate"
            );
            assert_eq!(c.completed, sim.eng.counters.tx);
        }
    }

    #[test]
    fn engine_refuses_foreign_descriptors_without_touching_frames() {
        let mut sim = Sim::new(3, false);
        sim.eng.refill(&mut sim.fill);
        // A descriptor for a frame the kernel was never given (still free in
        // the pool would be impossible: all 32 fill slots hold frames 0..32),
        // and one running past its frame.
        let stranger = 40 * 2048 + 256;
        sim.rx_mem.kernel_produce(&[XdpDesc { addr: stranger, len: 100, options: 0 }]);
        let mut called = 0;
        let mut st = PollStats::default();
        sim.eng.receive(
            &mut sim.umem,
            &mut sim.rx,
            &mut sim.tx,
            8,
            |_, _, _| {
                called += 1;
                Some(1)
            },
            &mut st,
        );
        assert_eq!((called, sim.eng.counters.bad_desc), (0, 1));
        let held = sim.fill_mem.kernel_consume(1)[0];
        sim.rx_mem.kernel_produce(&[XdpDesc { addr: held + 2000, len: 100, options: 0 }]);
        sim.eng.receive(
            &mut sim.umem,
            &mut sim.rx,
            &mut sim.tx,
            8,
            |_, _, _| {
                called += 1;
                Some(1)
            },
            &mut st,
        );
        assert_eq!((called, sim.eng.counters.bad_desc), (0, 2));
        assert_eq!(sim.eng.pool.state(held), Some(crate::xsk::FrameState::Free), "recycled");
        assert!(sim.eng.pool.check_invariant());
    }

    #[test]
    fn engine_send_batch_stops_at_ring_frames_and_none() {
        let mut sim = Sim::new(9, false);
        let mut built = 0u32;
        let n = sim.eng.send_batch(&mut sim.umem, &mut sim.tx, 10, |f| {
            built += 1;
            f[0] = built as u8;
            Some(60)
        });
        assert_eq!((n, built), (10, 10), "max honoured");
        let sent = sim.tx_mem.kernel_consume(u32::MAX);
        assert_eq!(sent.len(), 10);
        assert!(sent.iter().all(|d| d.len == 60 && d.addr % 2048 == 256), "packet address after the headroom");
        let (chunk, off) = sim.umem.chunk_mut(sent[3].addr);
        assert_eq!(chunk[off], 4, "built in the frame it was sent from");
        // `None` stops the batch and returns the frame.
        let mut calls = 0;
        let n = sim.eng.send_batch(&mut sim.umem, &mut sim.tx, 10, |_| {
            calls += 1;
            (calls < 4).then_some(42)
        });
        assert_eq!((n, calls), (3, 4));
        // A bad length is refused and counted.
        assert_eq!(sim.eng.send_batch(&mut sim.umem, &mut sim.tx, 10, |f| Some(f.len() + 1)), 0);
        assert_eq!(sim.eng.counters.bad_len, 1);
        // The TX ring (16) holds 3 more than the kernel took: 13 fit.
        assert_eq!(sim.eng.send_batch(&mut sim.umem, &mut sim.tx, 100, |_| Some(60)), 13);
        let c = sim.eng.pool.counts();
        assert_eq!((c.tx, c.user, c.free), (26, 0, 38));
        // Frames run out before the ring does: 64 frames in all.
        sim.tx_mem.kernel_consume(u32::MAX);
        sim.kernel_tx(0, 0);
        assert_eq!(sim.eng.send_batch(&mut sim.umem, &mut sim.tx, 100, |_| Some(60)), 16);
        sim.tx_mem.kernel_consume(u32::MAX);
        assert_eq!(sim.eng.send_batch(&mut sim.umem, &mut sim.tx, 100, |_| Some(60)), 16);
        sim.tx_mem.kernel_consume(u32::MAX);
        assert_eq!(sim.eng.send_batch(&mut sim.umem, &mut sim.tx, 100, |_| Some(60)), 6, "64 - 58 frames left");
        assert_eq!(sim.eng.pool.counts().free, 0);
        assert!(sim.eng.pool.check_invariant());
        assert_eq!(sim.eng.counters.tx, 10 + 3 + 13 + 16 + 16 + 6);
    }

    #[test]
    fn engine_send_recycles_on_full_ring() {
        let mut sim = Sim::new(5, true);
        let mut sent = 0;
        for _ in 0..20 {
            let base = sim.eng.pool.alloc().unwrap();
            let addr = base + 256;
            if sim.eng.send(&mut sim.umem, &mut sim.tx, addr, 60).unwrap() {
                sent += 1;
                let md = TxMetadata::read(sim.umem.frame(base), 256, 24).unwrap();
                assert_eq!(md.flags, 1, "timestamp requested");
            }
        }
        assert_eq!(sent, 16, "TX ring of 16");
        let c = sim.eng.pool.counts();
        assert_eq!((c.tx, c.user, sim.eng.counters.tx_ring_full), (16, 0, 4));
        assert!(sim.eng.send(&mut sim.umem, &mut sim.tx, 63 * 2048, 60).is_err(), "not allocated");
        assert!(sim.eng.pool.check_invariant());
    }
}
