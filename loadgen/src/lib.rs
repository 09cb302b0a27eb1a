//! chime-load, chime's NTP/NTS load generator, as a library so its pieces
//! are unit-tested; `main.rs` only calls [`run::main_exit`].
//!
//! - [`run`]: command line, steps and ramp, summary, JSON and plot output.
//! - [`worker`]: a sender/receiver thread, the protocol side every
//!   transport shares ([`worker::Core`]) and the UDP transport.
//! - [`xdp`]: the AF_XDP transport (raw frames from a source prefix).
//! - [`table`]: open-loop pacing and the reply match table.
//! - [`request`]: request kinds, adversarial packets, reply validation.
//! - [`fuzz`]: `--kind fuzz` packets (random and mutated, from a seed).
//! - [`nts`]: NTS-KE client, cookie pools, NTS requests and reply checks.
//! - [`stats`]: counters, hdrhistogram latencies, the per-step report.
//! - [`plot`]: the SVG.
//! - [`sys`]: `sendmmsg`/`recvmmsg`/epoll wrappers (the only `unsafe`).

pub mod fuzz;
pub mod nts;
pub mod plot;
pub mod request;
pub mod run;
pub mod stats;
pub mod sys;
pub mod table;
pub mod worker;
pub mod xdp;
