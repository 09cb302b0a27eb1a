//! Single-producer/single-consumer rings shared with the kernel.
//!
//! Each AF_XDP ring is a power-of-two array of descriptors plus a producer and
//! a consumer index (free-running `u32`s, wrapping at `u32::MAX`) and a flags
//! word. Userspace is the producer of the fill and TX rings and the consumer
//! of the RX and completion rings.
//!
//! Memory ordering, as `Documentation/networking/af_xdp.rst` ("Rings") asks:
//! - the producer writes descriptors, then publishes them with a
//!   store-release of the producer index;
//! - the consumer load-acquires the producer index before reading
//!   descriptors, and store-releases the consumer index after it is done with
//!   them, so the producer (load-acquire of the consumer index) never
//!   overwrites an entry still being read.
//!
//! Both sides keep cached copies of the indices and touch the shared ones
//! only when the cache says the ring is full (producer) or empty (consumer),
//! so a batch costs one atomic load and one atomic store.
//!
//! Access goes through `#[must_use]` transactions borrowed from the ring:
//! [`ProdTx`] (fill, TX) and [`ConsTx`] (RX, completion). A transaction
//! publishes only on [`ProdTx::submit`] / [`ConsTx::release`]; dropping it
//! without that publishes nothing (rollback).
//!
//! The logic here works on raw pointers so it can run over an in-memory
//! buffer in unit tests as well as over the kernel's mmapped rings.

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering, fence};

use super::sys::XDP_RING_NEED_WAKEUP;

/// Pointers into one ring's shared memory.
pub(crate) struct RawRing<T> {
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    descs: NonNull<T>,
    size: u32,
    mask: u32,
}

impl<T: Copy> RawRing<T> {
    /// # Safety
    /// `producer`, `consumer` and `flags` point to aligned `u32`s and `descs`
    /// to `size` aligned, initialized `T`s, all valid for reads and writes for
    /// as long as the returned value (and anything built on it) lives, and
    /// accessed by at most one other party (the kernel) following the ring
    /// protocol. `size` is a power of two.
    pub(crate) unsafe fn new(
        producer: NonNull<AtomicU32>,
        consumer: NonNull<AtomicU32>,
        flags: NonNull<AtomicU32>,
        descs: NonNull<T>,
        size: u32,
    ) -> Self {
        assert!(size.is_power_of_two(), "ring size {size} is not a power of two");
        Self { producer, consumer, flags, descs, size, mask: size - 1 }
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: valid and aligned for the ring's lifetime (contract of `new`);
        // only accessed atomically.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.consumer.as_ref() }
    }

    fn flags(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.flags.as_ref() }
    }

    fn slot(&self, idx: u32) -> *mut T {
        // SAFETY: `idx & mask < size`, so the offset stays inside the array of
        // `size` elements (contract of `new`).
        unsafe { self.descs.as_ptr().add((idx & self.mask) as usize) }
    }

    fn read(&self, idx: u32) -> T {
        // SAFETY: in bounds (`slot`); the entry lies between the consumer and
        // the acquired producer index, so the other side does not write it
        // until we release it. Volatile: the memory is shared with the kernel.
        unsafe { self.slot(idx).read_volatile() }
    }

    fn write(&self, idx: u32, value: T) {
        // SAFETY: in bounds (`slot`); the entry lies between our producer and
        // the acquired consumer index + size, so the other side does not read
        // it until we publish it. Volatile: the memory is shared with the kernel.
        unsafe { self.slot(idx).write_volatile(value) }
    }

    fn needs_wakeup(&self) -> bool {
        // Order our earlier producer store before this load (store-load), so we
        // do not read a stale flag the kernel set after it last looked at the
        // ring. One full fence per batch, not per packet.
        fence(Ordering::SeqCst);
        self.flags().load(Ordering::Relaxed) & XDP_RING_NEED_WAKEUP != 0
    }
}

impl<T> fmt::Debug for RawRing<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawRing").field("size", &self.size).finish_non_exhaustive()
    }
}

/// The userspace-producer side of a ring (fill, TX).
#[derive(Debug)]
pub struct ProducerRing<T> {
    raw: RawRing<T>,
    /// Our producer index; equals the shared one outside a transaction.
    cached_prod: u32,
    /// Last seen consumer index plus `size`: we may produce up to here.
    cached_limit: u32,
}

impl<T: Copy> ProducerRing<T> {
    pub(crate) fn new(raw: RawRing<T>) -> Self {
        let cached_prod = raw.producer().load(Ordering::Relaxed);
        let cached_limit = raw.consumer().load(Ordering::Acquire).wrapping_add(raw.size);
        Self { raw, cached_prod, cached_limit }
    }

    /// Number of entries in the ring.
    pub fn size(&self) -> u32 {
        self.raw.size
    }

    /// Free slots, up to `want`; reads the shared consumer index only when the
    /// cache shows fewer than `want`.
    pub fn free(&mut self, want: u32) -> u32 {
        let free = self.cached_limit.wrapping_sub(self.cached_prod);
        if free >= want {
            return want;
        }
        self.cached_limit = self.raw.consumer().load(Ordering::Acquire).wrapping_add(self.raw.size);
        self.cached_limit.wrapping_sub(self.cached_prod).min(want)
    }

    /// Entries produced and not yet consumed by the other side (reads the
    /// shared consumer index).
    pub fn outstanding(&self) -> u32 {
        self.cached_prod.wrapping_sub(self.raw.consumer().load(Ordering::Acquire))
    }

    /// Reserves up to `want` slots (fewer when the ring is fuller). Write them
    /// with [`ProdTx::push`], publish with [`ProdTx::submit`].
    pub fn reserve(&mut self, want: u32) -> ProdTx<'_, T> {
        let len = self.free(want);
        ProdTx { ring: self, len, written: 0 }
    }

    /// Whether the kernel asked to be woken (`XDP_RING_NEED_WAKEUP`). Only
    /// meaningful when the socket was bound with `XDP_USE_NEED_WAKEUP`.
    pub fn needs_wakeup(&self) -> bool {
        self.raw.needs_wakeup()
    }
}

/// Reserved slots of a [`ProducerRing`]: push entries, then
/// [`submit`](Self::submit). Dropping it publishes nothing.
#[must_use = "entries are published only by submit(); dropping rolls back"]
#[derive(Debug)]
pub struct ProdTx<'a, T: Copy> {
    ring: &'a mut ProducerRing<T>,
    len: u32,
    written: u32,
}

impl<T: Copy> ProdTx<'_, T> {
    /// Slots reserved.
    pub fn capacity(&self) -> u32 {
        self.len
    }

    /// Slots written so far.
    pub fn written(&self) -> u32 {
        self.written
    }

    /// Slots still free in this reservation.
    pub fn remaining(&self) -> u32 {
        self.len - self.written
    }

    /// Writes the next reserved slot; gives the value back when all are used.
    pub fn push(&mut self, value: T) -> Result<(), T> {
        if self.written == self.len {
            return Err(value);
        }
        self.ring.raw.write(self.ring.cached_prod.wrapping_add(self.written), value);
        self.written += 1;
        Ok(())
    }

    /// Publishes the written entries (a store-release of the producer index)
    /// and returns how many; reserved but unwritten slots are given back.
    pub fn submit(self) -> u32 {
        let n = self.written;
        if n > 0 {
            self.ring.cached_prod = self.ring.cached_prod.wrapping_add(n);
            self.ring.raw.producer().store(self.ring.cached_prod, Ordering::Release);
        }
        n
    }
}

/// The userspace-consumer side of a ring (RX, completion).
#[derive(Debug)]
pub struct ConsumerRing<T> {
    raw: RawRing<T>,
    /// Last seen producer index.
    cached_prod: u32,
    /// Our consumer index; equals the shared one outside a transaction.
    cached_cons: u32,
}

impl<T: Copy> ConsumerRing<T> {
    pub(crate) fn new(raw: RawRing<T>) -> Self {
        let cached_cons = raw.consumer().load(Ordering::Relaxed);
        let cached_prod = raw.producer().load(Ordering::Acquire);
        Self { raw, cached_prod, cached_cons }
    }

    /// Number of entries in the ring.
    pub fn size(&self) -> u32 {
        self.raw.size
    }

    /// Entries ready, up to `want`; reads the shared producer index only when
    /// the cache shows fewer than `want`.
    pub fn available(&mut self, want: u32) -> u32 {
        let avail = self.cached_prod.wrapping_sub(self.cached_cons);
        if avail >= want {
            return want;
        }
        self.cached_prod = self.raw.producer().load(Ordering::Acquire);
        self.cached_prod.wrapping_sub(self.cached_cons).min(want)
    }

    /// Takes up to `want` ready entries. Read them with [`ConsTx::get`] or
    /// [`ConsTx::iter`], then [`release`](ConsTx::release) them.
    pub fn peek(&mut self, want: u32) -> ConsTx<'_, T> {
        let len = self.available(want);
        ConsTx { ring: self, len }
    }

    /// Whether the kernel asked to be woken (`XDP_RING_NEED_WAKEUP`).
    pub fn needs_wakeup(&self) -> bool {
        self.raw.needs_wakeup()
    }
}

/// Entries taken from a [`ConsumerRing`]: read them, then
/// [`release`](Self::release). Dropping it releases nothing: the same entries
/// are seen again by the next `peek`.
#[must_use = "entries are consumed only by release(); dropping rolls back"]
#[derive(Debug)]
pub struct ConsTx<'a, T: Copy> {
    ring: &'a mut ConsumerRing<T>,
    len: u32,
}

impl<T: Copy> ConsTx<'_, T> {
    /// Entries in this batch.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entry `i` of the batch (`i < len()`).
    pub fn get(&self, i: u32) -> Option<T> {
        (i < self.len).then(|| self.ring.raw.read(self.ring.cached_cons.wrapping_add(i)))
    }

    /// The batch's entries in ring order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = T> + '_ {
        (0..self.len).map(|i| self.ring.raw.read(self.ring.cached_cons.wrapping_add(i)))
    }

    /// Gives all entries back to the producer (a store-release of the consumer
    /// index); returns how many.
    pub fn release(self) -> u32 {
        let n = self.len;
        self.release_first(n)
    }

    /// Gives the first `n` entries back (clamped to `len()`); the rest are
    /// seen again by the next `peek`.
    pub fn release_first(self, n: u32) -> u32 {
        let n = n.min(self.len);
        if n > 0 {
            self.ring.cached_cons = self.ring.cached_cons.wrapping_add(n);
            self.ring.raw.consumer().store(self.ring.cached_cons, Ordering::Release);
        }
        n
    }
}

/// A ring in ordinary memory with both userspace sides attached: the
/// [`ProducerRing`] and [`ConsumerRing`] code the kernel's rings use, run
/// against each other (a single-producer/single-consumer queue). For
/// benchmarks of the ring protocol and for tests; the kernel is not involved.
#[derive(Debug)]
pub struct MemRingPair<T> {
    producer: ProducerRing<T>,
    consumer: ConsumerRing<T>,
    /// Producer, consumer and flags words, each from `Box::leak`.
    indices: [NonNull<AtomicU32>; 3],
    /// The descriptors, from `Box::leak`.
    descs: NonNull<[T]>,
}

impl<T: Copy + Default> MemRingPair<T> {
    /// A ring of `size` entries (a power of two), empty.
    pub fn new(size: u32) -> Self {
        assert!(size.is_power_of_two(), "ring size {size} is not a power of two");
        let indices = [(); 3].map(|()| NonNull::from(Box::leak(Box::new(AtomicU32::new(0)))));
        let descs = NonNull::from(Box::leak(vec![T::default(); size as usize].into_boxed_slice()));
        let raw = || {
            // SAFETY: the three index words and the `size` descriptors are
            // heap allocations owned by the returned value and freed only in
            // its `Drop`, after which neither ring exists; the two rings are
            // the only parties and follow the ring protocol with each other.
            unsafe { RawRing::new(indices[0], indices[1], indices[2], descs.cast::<T>(), size) }
        };
        let producer = ProducerRing::new(raw());
        let consumer = ConsumerRing::new(raw());
        Self { producer, consumer, indices, descs }
    }
}

impl<T> MemRingPair<T> {
    /// Both sides, to use in turn on one thread.
    pub fn split(&mut self) -> (&mut ProducerRing<T>, &mut ConsumerRing<T>) {
        (&mut self.producer, &mut self.consumer)
    }
}

impl<T> Drop for MemRingPair<T> {
    fn drop(&mut self) {
        // The rings (fields of `self`) never touch the memory again: they
        // have no `Drop` and are only reachable through `self`.
        for word in self.indices {
            // SAFETY: from `Box::leak` in `new`, freed once, here.
            drop(unsafe { Box::from_raw(word.as_ptr()) });
        }
        // SAFETY: from `Box::leak` in `new`, freed once, here.
        drop(unsafe { Box::from_raw(self.descs.as_ptr()) });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ring in ordinary memory; the test plays the kernel's side.
    pub(crate) struct MemRing<T> {
        pub producer: Box<AtomicU32>,
        pub consumer: Box<AtomicU32>,
        pub flags: Box<AtomicU32>,
        pub descs: Box<[T]>,
    }

    impl<T: Copy + Default> MemRing<T> {
        pub(crate) fn new(size: u32, start: u32) -> Self {
            Self {
                producer: Box::new(AtomicU32::new(start)),
                consumer: Box::new(AtomicU32::new(start)),
                flags: Box::new(AtomicU32::new(0)),
                descs: vec![T::default(); size as usize].into_boxed_slice(),
            }
        }

        pub(crate) fn raw(&mut self) -> RawRing<T> {
            let size = self.descs.len() as u32;
            // SAFETY: all four allocations are owned by `self`, which every test
            // keeps alive longer than the ring built on it; the test thread is
            // the only other party.
            unsafe {
                RawRing::new(
                    NonNull::from(&*self.producer),
                    NonNull::from(&*self.consumer),
                    NonNull::from(&*self.flags),
                    NonNull::new(self.descs.as_mut_ptr()).unwrap(),
                    size,
                )
            }
        }

        fn mask(&self) -> u32 {
            self.descs.len() as u32 - 1
        }

        /// Kernel side of a consumer ring: produce entries.
        pub(crate) fn kernel_produce(&mut self, values: &[T]) {
            let prod = self.producer.load(Ordering::Relaxed);
            let cons = self.consumer.load(Ordering::Acquire);
            assert!(prod.wrapping_sub(cons) as usize + values.len() <= self.descs.len(), "kernel overfilled");
            for (i, v) in values.iter().enumerate() {
                let idx = prod.wrapping_add(i as u32) & self.mask();
                self.descs[idx as usize] = *v;
            }
            self.producer.store(prod.wrapping_add(values.len() as u32), Ordering::Release);
        }

        /// Kernel side of a producer ring: consume up to `n` entries.
        pub(crate) fn kernel_consume(&mut self, n: u32) -> Vec<T> {
            let prod = self.producer.load(Ordering::Acquire);
            let cons = self.consumer.load(Ordering::Relaxed);
            let n = prod.wrapping_sub(cons).min(n);
            let out = (0..n).map(|i| self.descs[(cons.wrapping_add(i) & self.mask()) as usize]).collect();
            self.consumer.store(cons.wrapping_add(n), Ordering::Release);
            out
        }
    }

    const STARTS: [u32; 4] = [0, 5, u32::MAX - 3, u32::MAX];

    #[test]
    fn mem_ring_pair_passes_entries_in_order_and_fills_up() {
        let mut pair = MemRingPair::<u64>::new(8);
        let (prod, cons) = pair.split();
        let mut next = 0u64;
        let mut expect = 0u64;
        for round in 0..20 {
            let mut tx = prod.reserve(5);
            while tx.push(next).is_ok() {
                next += 1;
            }
            tx.submit();
            let batch = cons.peek(if round % 3 == 0 { 2 } else { 8 });
            for v in batch.iter() {
                assert_eq!(v, expect);
                expect += 1;
            }
            batch.release();
            assert!(prod.outstanding() <= 8);
        }
        assert_eq!(prod.reserve(100).capacity() + prod.outstanding(), 8, "free + in flight = size");
    }

    #[test]
    fn producer_fills_then_is_full_across_wrap() {
        for start in STARTS {
            let mut mem = MemRing::<u64>::new(8, start);
            let mut ring = ProducerRing::new(mem.raw());
            assert_eq!(ring.free(100), 8);
            let mut tx = ring.reserve(5);
            for a in 0..5 {
                tx.push(a).unwrap();
            }
            assert_eq!(tx.push(99), Err(99));
            assert_eq!(tx.submit(), 5);
            assert_eq!(ring.free(8), 3);
            let mut tx = ring.reserve(10);
            assert_eq!(tx.capacity(), 3, "partial reserve");
            for a in 5..8 {
                tx.push(a).unwrap();
            }
            tx.submit();
            assert_eq!(ring.free(1), 0, "full");
            assert_eq!(ring.reserve(1).capacity(), 0);
            assert_eq!(ring.outstanding(), 8);
            assert_eq!(mem.producer.load(Ordering::Relaxed), start.wrapping_add(8));
            assert_eq!(mem.kernel_consume(3), vec![0, 1, 2]);
            assert_eq!(ring.free(8), 3);
            let mut tx = ring.reserve(3);
            for a in 8..11 {
                tx.push(a).unwrap();
            }
            tx.submit();
            assert_eq!(mem.kernel_consume(100), (3..11).collect::<Vec<_>>());
            assert_eq!(ring.free(8), 8, "empty again");
        }
    }

    #[test]
    fn producer_drop_rolls_back_and_partial_submit() {
        for start in STARTS {
            let mut mem = MemRing::<u64>::new(4, start);
            let mut ring = ProducerRing::new(mem.raw());
            {
                let mut tx = ring.reserve(4);
                tx.push(1).unwrap();
                tx.push(2).unwrap();
                // dropped: nothing published
            }
            assert_eq!(mem.producer.load(Ordering::Relaxed), start);
            assert_eq!(ring.free(4), 4);
            let mut tx = ring.reserve(4);
            tx.push(7).unwrap();
            assert_eq!(tx.remaining(), 3);
            assert_eq!(tx.submit(), 1, "only the written slot is published");
            assert_eq!(mem.producer.load(Ordering::Relaxed), start.wrapping_add(1));
            assert_eq!(mem.kernel_consume(4), vec![7]);
            // An empty submit publishes nothing.
            let tx = ring.reserve(2);
            assert_eq!(tx.submit(), 0);
            assert_eq!(mem.producer.load(Ordering::Relaxed), start.wrapping_add(1));
        }
    }

    #[test]
    fn consumer_empty_peek_release_across_wrap() {
        for start in STARTS {
            let mut mem = MemRing::<u64>::new(8, start);
            let mut ring = ConsumerRing::new(mem.raw());
            assert!(ring.peek(4).is_empty(), "empty");
            mem.kernel_produce(&[10, 11, 12, 13, 14, 15, 16, 17]);
            let batch = ring.peek(3);
            assert_eq!(batch.iter().collect::<Vec<_>>(), vec![10, 11, 12]);
            assert_eq!(batch.get(3), None);
            assert_eq!(batch.release(), 3);
            assert_eq!(mem.consumer.load(Ordering::Relaxed), start.wrapping_add(3));
            let batch = ring.peek(100);
            assert_eq!(batch.len(), 5);
            assert_eq!(batch.release_first(2), 2);
            assert_eq!(ring.available(100), 3);
            mem.kernel_produce(&[18, 19, 20, 21, 22]);
            let batch = ring.peek(100);
            assert_eq!(batch.iter().collect::<Vec<_>>(), vec![15, 16, 17, 18, 19, 20, 21, 22]);
            batch.release();
            assert!(ring.peek(1).is_empty());
            assert_eq!(mem.consumer.load(Ordering::Relaxed), start.wrapping_add(13));
        }
    }

    #[test]
    fn consumer_drop_rolls_back() {
        let mut mem = MemRing::<u64>::new(4, u32::MAX - 1);
        let mut ring = ConsumerRing::new(mem.raw());
        mem.kernel_produce(&[1, 2, 3]);
        {
            let batch = ring.peek(3);
            assert_eq!(batch.len(), 3);
        }
        assert_eq!(mem.consumer.load(Ordering::Relaxed), u32::MAX - 1);
        assert_eq!(ring.peek(3).iter().collect::<Vec<_>>(), vec![1, 2, 3], "seen again");
    }

    #[test]
    fn producer_cache_refreshes_only_when_short() {
        let mut mem = MemRing::<u64>::new(4, 0);
        let mut ring = ProducerRing::new(mem.raw());
        let mut tx = ring.reserve(4);
        (0..4).for_each(|a| tx.push(a).unwrap());
        tx.submit();
        mem.kernel_consume(4);
        // The cache still says full until asked for more than it knows of.
        assert_eq!(ring.free(0), 0);
        assert_eq!(ring.free(1), 1);
        assert_eq!(ring.free(4), 4);
    }

    #[test]
    fn need_wakeup_flag() {
        let mut mem = MemRing::<u64>::new(4, 0);
        let ring = ProducerRing::new(mem.raw());
        assert!(!ring.needs_wakeup());
        mem.flags.store(XDP_RING_NEED_WAKEUP, Ordering::Relaxed);
        assert!(ring.needs_wakeup());
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn size_must_be_power_of_two() {
        let mut mem = MemRing::<u64>::new(6, 0);
        let _ = mem.raw();
    }
}
