//! chime's sans-IO protocol core.
//!
//! Everything here is deterministic: time and randomness come in as
//! arguments, nothing reads a clock, opens a socket or starts a thread, and
//! the per-packet path allocates nothing. The backends in `chime-server`
//! (sockets, AF_XDP) feed datagrams to a [`Responder`] and send what it
//! writes.
//!
//! - [`time`]: NTP timestamp formats and Unix conversion across eras.
//! - [`packet`] and [`ext`]: the NTPv4 header and RFC 7822 extension fields.
//! - [`clock`]: the [`ClockSnapshot`] the control thread publishes.
//! - [`leap`]: the `leap-seconds.list` file, the leap indicator, leap smearing.
//! - [`ratelimit`] and [`acl`]: RFC 8633 rate limiting and access control.
//! - [`nts`]: Network Time Security: NTS-KE records, cookies, key ring, and
//!   the authenticated request path.
//! - [`responder`]: the per-packet pipeline and its counters.
//! - [`interleave`]: the bounded T2 → T3' table of interleaved mode (RFC 9769).
//! - [`topk`]: the source prefixes rate-limited most, in fixed memory.
#![forbid(unsafe_code)]

pub mod acl;
pub mod clock;
pub mod ext;
pub mod interleave;
pub mod leap;
pub mod nts;
pub mod packet;
pub mod ratelimit;
pub mod responder;
pub mod rng;
pub mod time;
pub mod topk;

pub use clock::ClockSnapshot;
pub use responder::{
    Action, Context, Counters, DenyResponse, DropReason, InterleaveStats, KissCode, ReplyStamps, RequestMeta,
    Responder, ResponderConfig, RxTimestamp, StampKind, TxClock, UnsyncPolicy,
};
pub use time::{NtpShort, NtpTimestamp};
