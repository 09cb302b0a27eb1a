//! Where every UMEM frame is: frame accounting without allocation.
//!
//! A frame is always in exactly one [`FrameState`]:
//!
//! ```text
//!            put_in_fill            on_rx               on_tx
//!   Free ───────────────► Fill ───────────► User ───────────────► Tx
//!    ▲  ◄──────────────── (kernel)         │  ▲                   │
//!    │     (never: the kernel returns      │  │ alloc             │
//!    │      fill frames only via RX)       │  │                   │
//!    ├──────────────────── recycle ◄───────┘  │                   │
//!    ├────────────────────────────────────────┘                   │
//!    └────────────────────── on_complete ◄────────────────────────┘
//! ```
//!
//! `Fill` covers the fill ring and frames the kernel holds for receiving;
//! `User` frames are in userspace's hands (received, or allocated for a
//! transmit); `Tx` covers the TX ring, the NIC and the completion ring.
//! Every transition checks the frame's current state, so a double free or an
//! address the kernel should never have returned is refused (and counted), and
//! `free + fill + user + tx == frame_count` holds after every call.

use core::fmt;

/// Where a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameState {
    /// On the pool's free list.
    Free,
    /// Given to the kernel through the fill ring.
    Fill,
    /// In userspace: received and not yet recycled or sent, or allocated.
    User,
    /// Given to the kernel through the TX ring, awaiting completion.
    Tx,
}

/// A refused transition: the frame was not where the caller said.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The address is outside the UMEM.
    #[error("frame address {0:#x} outside the UMEM")]
    OutOfRange(u64),
    /// The frame is in another state than the transition needs.
    #[error("frame {addr:#x} is {found:?}, expected {expected:?}")]
    WrongState {
        /// The frame's base address.
        addr: u64,
        /// Its state.
        found: FrameState,
        /// The state the transition starts from.
        expected: FrameState,
    },
}

/// Counters of a [`FramePool`], for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FrameCounts {
    /// On the free list.
    pub free: u32,
    /// In the fill ring or held by the kernel for receiving.
    pub fill: u32,
    /// In userspace.
    pub user: u32,
    /// In the TX ring or the NIC, awaiting completion.
    pub tx: u32,
    /// Transmit completions so far (cumulative).
    pub completed: u64,
    /// Transitions refused so far (cumulative); nonzero means a bug.
    pub refused: u64,
}

/// Free list and per-frame state of one UMEM's frames. Frames are named by
/// their base address (`index * frame_size`); the transitions accept any
/// address inside a frame (an RX descriptor's address points past the
/// headroom) and work on its base.
pub struct FramePool {
    frame_size: u32,
    shift: u32,
    state: Box<[FrameState]>,
    /// Stack of free frame base addresses; `free[..free_len]` are valid.
    free: Box<[u64]>,
    free_len: u32,
    counts: FrameCounts,
}

impl FramePool {
    /// A pool of `frame_count` frames of `frame_size` bytes (a power of two),
    /// all free. The only allocation the pool ever makes.
    pub fn new(frame_count: u32, frame_size: u32) -> Self {
        assert!(frame_size.is_power_of_two(), "frame size must be a power of two");
        // Pop order = ascending addresses.
        let free: Box<[u64]> = (0..frame_count).rev().map(|i| u64::from(i) * u64::from(frame_size)).collect();
        Self {
            frame_size,
            shift: frame_size.trailing_zeros(),
            state: vec![FrameState::Free; frame_count as usize].into_boxed_slice(),
            free,
            free_len: frame_count,
            counts: FrameCounts { free: frame_count, ..FrameCounts::default() },
        }
    }

    /// Total frames.
    pub fn frame_count(&self) -> u32 {
        self.state.len() as u32
    }

    /// Bytes per frame.
    pub fn frame_size(&self) -> u32 {
        self.frame_size
    }

    /// The base address of the frame holding `addr`.
    pub fn base(&self, addr: u64) -> u64 {
        addr & !(u64::from(self.frame_size) - 1)
    }

    /// The counters.
    pub fn counts(&self) -> FrameCounts {
        self.counts
    }

    /// Frames on the free list.
    pub fn free_count(&self) -> u32 {
        self.counts.free
    }

    /// Frames not on the free list (fill + user + tx).
    pub fn in_flight(&self) -> u32 {
        self.frame_count() - self.counts.free
    }

    /// The state of the frame holding `addr`.
    pub fn state(&self, addr: u64) -> Option<FrameState> {
        self.index(addr).ok().map(|i| self.state[i])
    }

    /// Whether `free + fill + user + tx == frame_count` and the counters agree
    /// with the per-frame states (O(frame_count); for tests and shutdown).
    pub fn check_invariant(&self) -> bool {
        let c = self.counts;
        let mut seen = [0u32; 4];
        for s in self.state.iter() {
            seen[*s as usize] += 1;
        }
        c.free + c.fill + c.user + c.tx == self.frame_count()
            && seen == [c.free, c.fill, c.user, c.tx]
            && c.free == self.free_len
    }

    /// Takes a free frame for the fill ring (Free → Fill).
    pub fn put_in_fill(&mut self) -> Option<u64> {
        let addr = self.pop()?;
        self.set(addr, FrameState::Fill);
        self.counts.fill += 1;
        Some(addr)
    }

    /// Gives back a frame taken with [`put_in_fill`](Self::put_in_fill) that
    /// did not make it into the ring (Fill → Free).
    pub fn unfill(&mut self, addr: u64) -> Result<(), FrameError> {
        self.transition(addr, FrameState::Fill, FrameState::Free)
    }

    /// Takes a free frame for userspace, e.g. to build a packet to send
    /// (Free → User).
    pub fn alloc(&mut self) -> Option<u64> {
        let addr = self.pop()?;
        self.set(addr, FrameState::User);
        self.counts.user += 1;
        Some(addr)
    }

    /// A frame arrived on the RX ring (Fill → User).
    pub fn on_rx(&mut self, addr: u64) -> Result<(), FrameError> {
        self.transition(addr, FrameState::Fill, FrameState::User)
    }

    /// Userspace is done with a frame (User → Free).
    pub fn recycle(&mut self, addr: u64) -> Result<(), FrameError> {
        self.transition(addr, FrameState::User, FrameState::Free)
    }

    /// A frame was placed on the TX ring (User → Tx).
    pub fn on_tx(&mut self, addr: u64) -> Result<(), FrameError> {
        self.transition(addr, FrameState::User, FrameState::Tx)
    }

    /// A TX descriptor could not be published after all (Tx → User).
    pub fn untx(&mut self, addr: u64) -> Result<(), FrameError> {
        self.transition(addr, FrameState::Tx, FrameState::User)
    }

    /// A frame came back on the completion ring (Tx → Free).
    pub fn on_complete(&mut self, addr: u64) -> Result<(), FrameError> {
        self.transition(addr, FrameState::Tx, FrameState::Free)?;
        self.counts.completed += 1;
        Ok(())
    }

    fn index(&self, addr: u64) -> Result<usize, FrameError> {
        let i = addr >> self.shift;
        if i < self.state.len() as u64 { Ok(i as usize) } else { Err(FrameError::OutOfRange(addr)) }
    }

    fn transition(&mut self, addr: u64, from: FrameState, to: FrameState) -> Result<(), FrameError> {
        let i = match self.index(addr) {
            Ok(i) => i,
            Err(e) => {
                self.counts.refused += 1;
                return Err(e);
            }
        };
        let found = self.state[i];
        if found != from {
            self.counts.refused += 1;
            return Err(FrameError::WrongState { addr: self.base(addr), found, expected: from });
        }
        *self.counter(from) -= 1;
        *self.counter(to) += 1;
        self.state[i] = to;
        if to == FrameState::Free {
            // Cannot overflow: a frame enters Free only from another state, so
            // at most frame_count addresses are ever on the stack.
            self.free[self.free_len as usize] = self.base(addr);
            self.free_len += 1;
        }
        Ok(())
    }

    fn pop(&mut self) -> Option<u64> {
        self.free_len = self.free_len.checked_sub(1)?;
        self.counts.free -= 1;
        Some(self.free[self.free_len as usize])
    }

    fn set(&mut self, addr: u64, to: FrameState) {
        let i = (addr >> self.shift) as usize;
        debug_assert_eq!(self.state[i], FrameState::Free);
        self.state[i] = to;
    }

    fn counter(&mut self, s: FrameState) -> &mut u32 {
        match s {
            FrameState::Free => &mut self.counts.free,
            FrameState::Fill => &mut self.counts.fill,
            FrameState::User => &mut self.counts.user,
            FrameState::Tx => &mut self.counts.tx,
        }
    }
}

impl fmt::Debug for FramePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FramePool")
            .field("frame_count", &self.frame_count())
            .field("frame_size", &self.frame_size)
            .field("counts", &self.counts)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn lifecycle_and_counts() {
        let mut p = FramePool::new(4, 2048);
        assert_eq!(p.counts().free, 4);
        let a = p.put_in_fill().unwrap();
        assert_eq!(a, 0);
        let b = p.put_in_fill().unwrap();
        assert_eq!(b, 2048);
        // RX descriptors point past the headroom; the pool works on the base.
        p.on_rx(b + 256).unwrap();
        assert_eq!(p.state(b), Some(FrameState::User));
        p.on_tx(b + 256).unwrap();
        assert_eq!(p.in_flight(), 2);
        p.on_complete(b + 256).unwrap();
        assert_eq!(p.counts().completed, 1);
        p.on_rx(a + 300).unwrap();
        p.recycle(a + 300).unwrap();
        assert_eq!(p.in_flight(), 0);
        assert!(p.check_invariant());
    }

    #[test]
    fn refuses_double_free_and_strangers() {
        let mut p = FramePool::new(2, 4096);
        let a = p.alloc().unwrap();
        p.recycle(a).unwrap();
        assert_eq!(
            p.recycle(a),
            Err(FrameError::WrongState { addr: a, found: FrameState::Free, expected: FrameState::User })
        );
        assert_eq!(
            p.on_complete(a),
            Err(FrameError::WrongState { addr: a, found: FrameState::Free, expected: FrameState::Tx })
        );
        assert_eq!(p.on_rx(2 * 4096), Err(FrameError::OutOfRange(2 * 4096)));
        assert_eq!(p.counts().refused, 3);
        assert_eq!(p.free_count(), 2);
        assert!(p.check_invariant());
    }

    #[test]
    fn exhausts_cleanly() {
        let mut p = FramePool::new(3, 2048);
        assert!(p.put_in_fill().is_some());
        assert!(p.alloc().is_some());
        assert!(p.put_in_fill().is_some());
        assert_eq!(p.put_in_fill(), None);
        assert_eq!(p.alloc(), None);
        assert_eq!(p.in_flight(), 3);
        assert!(p.check_invariant());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Fill,
        Alloc,
        Rx(usize),
        Recycle(usize),
        Tx(usize),
        Complete(usize),
        Untx(usize),
        Unfill(usize),
        Stray(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Fill),
            Just(Op::Alloc),
            any::<usize>().prop_map(Op::Rx),
            any::<usize>().prop_map(Op::Recycle),
            any::<usize>().prop_map(Op::Tx),
            any::<usize>().prop_map(Op::Complete),
            any::<usize>().prop_map(Op::Untx),
            any::<usize>().prop_map(Op::Unfill),
            any::<u64>().prop_map(Op::Stray),
        ]
    }

    proptest! {
        /// Random sequences, right and wrong, against a model: the pool agrees
        /// with the model's states, refuses exactly the wrong transitions and
        /// never loses or duplicates a frame.
        #[test]
        fn never_leaks_never_double_frees(ops in proptest::collection::vec(op(), 0..400)) {
            const N: u32 = 16;
            const FS: u32 = 2048;
            let mut p = FramePool::new(N, FS);
            let mut model = vec![FrameState::Free; N as usize];
            let pick = |i: usize| (i % N as usize, (i % N as usize) as u64 * u64::from(FS) + (i as u64 % 1000));
            for op in ops {
                let (from, to, addr) = match op {
                    Op::Fill | Op::Alloc => {
                        let to = if matches!(op, Op::Fill) { FrameState::Fill } else { FrameState::User };
                        let got = if matches!(op, Op::Fill) { p.put_in_fill() } else { p.alloc() };
                        let any_free = model.contains(&FrameState::Free);
                        prop_assert_eq!(got.is_some(), any_free);
                        if let Some(a) = got {
                            let i = (a / u64::from(FS)) as usize;
                            prop_assert_eq!(model[i], FrameState::Free);
                            model[i] = to;
                        }
                        prop_assert!(p.check_invariant());
                        continue;
                    }
                    Op::Stray(a) => {
                        let a = a | (u64::from(N) * u64::from(FS));
                        prop_assert_eq!(p.recycle(a), Err(FrameError::OutOfRange(a)));
                        continue;
                    }
                    Op::Rx(i) => (FrameState::Fill, FrameState::User, i),
                    Op::Recycle(i) => (FrameState::User, FrameState::Free, i),
                    Op::Tx(i) => (FrameState::User, FrameState::Tx, i),
                    Op::Complete(i) => (FrameState::Tx, FrameState::Free, i),
                    Op::Untx(i) => (FrameState::Tx, FrameState::User, i),
                    Op::Unfill(i) => (FrameState::Fill, FrameState::Free, i),
                };
                let (i, a) = pick(addr);
                let r = match op {
                    Op::Rx(_) => p.on_rx(a),
                    Op::Recycle(_) => p.recycle(a),
                    Op::Tx(_) => p.on_tx(a),
                    Op::Complete(_) => p.on_complete(a),
                    Op::Untx(_) => p.untx(a),
                    _ => p.unfill(a),
                };
                prop_assert_eq!(r.is_ok(), model[i] == from);
                if r.is_ok() {
                    model[i] = to;
                }
                prop_assert!(p.check_invariant());
            }
            for (i, s) in model.iter().enumerate() {
                prop_assert_eq!(p.state(i as u64 * u64::from(FS)), Some(*s));
            }
        }
    }
}
