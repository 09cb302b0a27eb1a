//! [`XskQueue`]: one NIC queue's socket, UMEM and frame accounting, with the
//! receive → answer in place → transmit loop a worker runs.

use std::io;

use super::frames::{FrameCounts, FramePool};
use super::socket::{BindMode, BindOptions, XdpStatistics, XskSocket};
use super::sys::{XDP_PACKET_HEADROOM, XdpDesc};
use super::txmd::TxMetadata;
use super::umem::{Umem, UmemConfig};

/// Shape of an [`XskQueue`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct XskQueueConfig {
    /// The UMEM and its fill/completion rings.
    pub umem: UmemConfig,
    /// Bind options and RX/TX ring sizes.
    pub bind: BindOptions,
    /// Bytes of XDP receive metadata in front of each packet, handed to the
    /// `poll_rx` callback (chime's XDP program writes 16). 0: none.
    pub rx_meta_len: usize,
    /// Ask for a TX timestamp on every transmitted frame (needs
    /// `umem.tx_metadata_len` ≥ 16); read them with
    /// [`XskQueue::reap_completions`].
    pub tx_timestamps: bool,
}

impl XskQueueConfig {
    /// Default shapes, 16 bytes of receive metadata, no TX timestamps.
    pub fn new() -> Self {
        Self { rx_meta_len: 16, ..Self::default() }
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
    pool: FramePool,
    rx_meta_len: usize,
    tx_timestamps: bool,
    counters: QueueCounters,
}

impl XskQueue {
    /// Maps the UMEM, binds the socket to `queue_id` of `ifindex` and fills
    /// the fill ring.
    pub fn new(ifindex: u32, queue_id: u32, cfg: XskQueueConfig) -> io::Result<Self> {
        let umem = Umem::new(cfg.umem)?;
        let pool = FramePool::new(umem.frame_count(), umem.frame_size());
        let sock = XskSocket::new(umem, ifindex, queue_id, cfg.bind)?;
        let tx_timestamps = cfg.tx_timestamps && cfg.umem.tx_metadata_len as usize >= TxMetadata::USED;
        let mut q =
            Self { sock, pool, rx_meta_len: cfg.rx_meta_len, tx_timestamps, counters: QueueCounters::default() };
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
        self.pool.counts()
    }

    /// Frames not on the free list (fill ring, RX, TX, completion).
    pub fn in_flight(&self) -> u32 {
        self.pool.in_flight()
    }

    /// The frame pool (for invariant checks).
    pub fn frames(&self) -> &FramePool {
        &self.pool
    }

    /// Cumulative counters.
    pub fn counters(&self) -> QueueCounters {
        self.counters
    }

    /// Waits up to `timeout_ms` for received packets (poll(2)).
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        self.sock.wait_rx(timeout_ms)
    }

    /// Receives up to `max` frames and hands each to `f(packet, meta)`:
    /// `packet` is the received bytes (Ethernet header first), writable in
    /// place; `meta` is the `rx_meta_len` bytes in front of it (the XDP
    /// program's metadata) when configured and present. `f` returns
    /// `Some(len)` to transmit the frame as rewritten, `len` bytes from the
    /// packet start (1 ≤ `len` ≤ `packet.len()`: a reply is never longer
    /// than its request), or `None` to drop it.
    ///
    /// Also reaps transmit completions, keeps the fill ring topped up and
    /// makes the syscalls need_wakeup asks for (at most one kick per call).
    pub fn poll_rx<F>(&mut self, max: u32, f: F) -> io::Result<PollStats>
    where
        F: FnMut(&mut [u8], Option<&[u8]>) -> Option<usize>,
    {
        let mut st = PollStats { completed: self.reap_completions(|_, _| {}), ..PollStats::default() };
        st.filled = self.refill()?;
        self.receive(max, f, &mut st);
        st.filled += self.refill()?;
        if st.sent > 0 && (self.sock.tx_needs_wakeup() || self.sock.bind_mode() == BindMode::Copy) {
            self.counters.tx_kicks += 1;
            self.sock.kick_tx()?;
        }
        Ok(st)
    }

    fn receive<F>(&mut self, max: u32, mut f: F, st: &mut PollStats)
    where
        F: FnMut(&mut [u8], Option<&[u8]>) -> Option<usize>,
    {
        let parts = self.sock.parts();
        let batch = parts.rx.peek(max);
        if batch.is_empty() {
            return;
        }
        let mut tx = parts.tx.reserve(batch.len());
        for desc in batch.iter() {
            st.received += 1;
            if self.pool.on_rx(desc.addr).is_err() {
                // Not a frame we gave the kernel (or one it already returned):
                // touching it could corrupt a frame in use. Counted, skipped.
                self.counters.bad_desc += 1;
                continue;
            }
            let answer = {
                let (chunk, off) = parts.umem.chunk_mut(desc.addr);
                let end = off + desc.len as usize;
                if end > chunk.len() {
                    self.counters.bad_desc += 1;
                    None
                } else {
                    let (head, rest) = chunk.split_at_mut(off);
                    let meta =
                        (self.rx_meta_len > 0 && off >= self.rx_meta_len).then(|| &head[off - self.rx_meta_len..]);
                    match f(&mut rest[..desc.len as usize], meta) {
                        Some(n) if n > 0 && n <= desc.len as usize => Some(n as u32),
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
            if tx.remaining() == 0 {
                st.tx_ring_full += 1;
                let _ = self.pool.recycle(desc.addr);
                continue;
            }
            // The receive metadata was read by `f`; the TX metadata may now
            // overwrite the same bytes.
            let options = if self.tx_timestamps {
                TxMetadata::request_timestamp_at(parts.umem, desc.addr).unwrap_or(0)
            } else {
                0
            };
            let pushed = tx.push(XdpDesc { addr: desc.addr, len, options });
            debug_assert!(pushed.is_ok());
            let _ = self.pool.on_tx(desc.addr);
            st.sent += 1;
        }
        tx.submit();
        batch.release();
        let c = &mut self.counters;
        c.rx += u64::from(st.received);
        c.tx += u64::from(st.sent);
        c.declined += u64::from(st.declined);
        c.tx_ring_full += u64::from(st.tx_ring_full);
        c.bad_len += u64::from(st.bad_len);
    }

    /// Reaps transmit completions, calling `f(addr, tx_timestamp)` for each
    /// (the timestamp when TX timestamps are on and the driver gave one), and
    /// returns the frames to the free list. Returns how many.
    pub fn reap_completions(&mut self, mut f: impl FnMut(u64, Option<u64>)) -> u32 {
        let parts = self.sock.parts();
        let size = parts.comp.size();
        let batch = parts.comp.peek(size);
        for addr in batch.iter() {
            let ts = if self.tx_timestamps && parts.umem.contains(addr) {
                TxMetadata::completion_timestamp_at(parts.umem, addr)
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

    /// Moves free frames onto the fill ring (as many as fit) and wakes the
    /// kernel if it asked; returns how many.
    pub fn refill(&mut self) -> io::Result<u32> {
        let want = self.pool.free_count();
        let mut n = 0;
        if want > 0 {
            let mut fill = self.sock.fill().reserve(want);
            while fill.remaining() > 0 {
                let Some(addr) = self.pool.put_in_fill() else { break };
                let pushed = fill.push(addr);
                debug_assert!(pushed.is_ok());
            }
            n = fill.submit();
        }
        if self.sock.fill_needs_wakeup() {
            self.counters.rx_wakeups += 1;
            self.sock.wakeup_rx()?;
        }
        Ok(n)
    }

    /// Takes a free frame to build a packet in: returns its packet address
    /// (frame base + `XDP_PACKET_HEADROOM`, leaving room for TX metadata) and
    /// the writable bytes from there. Hand it to [`send`](Self::send) or give
    /// it back with [`discard`](Self::discard).
    pub fn alloc_tx_frame(&mut self) -> Option<(u64, &mut [u8])> {
        let base = self.pool.alloc()?;
        let addr = base + u64::from(XDP_PACKET_HEADROOM);
        Some((addr, self.sock.umem_mut().frame_mut(addr)))
    }

    /// Returns a frame from [`alloc_tx_frame`](Self::alloc_tx_frame) unused.
    pub fn discard(&mut self, addr: u64) {
        if self.pool.recycle(addr).is_err() {
            self.counters.bad_desc += 1;
        }
    }

    /// Transmits `len` bytes of a frame from
    /// [`alloc_tx_frame`](Self::alloc_tx_frame) and kicks the kernel. Returns
    /// false (frame recycled) when the TX ring is full.
    pub fn send(&mut self, addr: u64, len: u32) -> io::Result<bool> {
        if self.pool.on_tx(addr).is_err() {
            self.counters.bad_desc += 1;
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "send of a frame not allocated"));
        }
        let options = if self.tx_timestamps {
            TxMetadata::request_timestamp_at(self.sock.umem_mut(), addr).unwrap_or(0)
        } else {
            0
        };
        let mut tx = self.sock.tx().reserve(1);
        if tx.push(XdpDesc { addr, len, options }).is_err() {
            drop(tx);
            let _ = self.pool.untx(addr);
            let _ = self.pool.recycle(addr);
            self.counters.tx_ring_full += 1;
            return Ok(false);
        }
        tx.submit();
        self.counters.tx += 1;
        self.counters.tx_kicks += 1;
        self.sock.kick_tx()?;
        Ok(true)
    }
}
