//! Small, documented wrappers around the system calls chimed needs beyond
//! `std`: the only place in `chime-server` with `unsafe`, each block with a
//! `// SAFETY:` comment.

pub mod adjtime;
pub mod clock;
pub mod ifaddrs;
pub mod ptp;
pub mod random;
pub mod rlimit;
pub mod seccomp;
pub mod udp;
pub mod users;
