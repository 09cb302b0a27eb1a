//! The AF_XDP layer: UMEM, the four rings, sockets, frame accounting, TX
//! metadata, written on `libc` from the kernel's
//! `Documentation/networking/af_xdp.rst` and `xsk-tx-metadata.rst`.
//!
//! Layers, bottom up:
//! - [`sys`]: the uapi (`if_xdp.h`) — libc's definitions plus what it lacks;
//! - [`ring`]: lock-free single-producer/single-consumer rings with
//!   `#[must_use]` transactions ([`ProdTx`], [`ConsTx`]) that publish on
//!   `submit`/`release` and roll back when dropped;
//! - [`Umem`], [`XskSocket`]: the mapping, registration, bind (zero-copy with
//!   fallback to copy mode), need_wakeup, statistics;
//! - [`FramePool`]: where each frame is, with checked transitions;
//! - [`TxMetadata`]: per-packet TX timestamp requests and their results;
//! - [`XskQueue`]: all of the above for one NIC queue, with the
//!   receive → answer in place → transmit loop ([`XskQueue::poll_rx`]).
//!
//! One UMEM per socket, one socket per NIC queue, one worker thread per
//! socket: every ring has exactly one userspace party, so no locks. UMEM
//! frames are "aligned chunks" (`frame_size`, a power of two); a frame is
//! named by its UMEM offset.

mod frames;
mod queue;
pub mod ring;
mod socket;
pub mod sys;
mod txmd;
mod umem;

pub use frames::{FrameCounts, FrameError, FramePool, FrameState};
pub use queue::{PollStats, QueueCounters, XskQueue, XskQueueConfig};
pub use ring::{ConsTx, ConsumerRing, MemRingPair, ProdTx, ProducerRing};
pub use socket::{
    BindMode, BindOptions, CompBatch, CompRing, FillRing, FillTx, RxBatch, RxRing, TxRing, TxTx, XdpStatistics,
    XskParts, XskSocket, ZeroCopy, if_index,
};
pub use sys::{XSK_TX_METADATA_SIZE, XdpDesc};
pub use txmd::TxMetadata;
pub use umem::{Umem, UmemConfig};
