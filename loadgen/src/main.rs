//! `chime-load`, chime's load generator (filled in by the load-generator issue).
//!
//! It will drive an NTP/NTS server at a target request rate or along a ramp
//! (open loop, `sendmmsg`/`recvmmsg` or AF_XDP raw frames from many simulated
//! client addresses inside test namespaces), validate every reply and report
//! loss and latency percentiles. Until then it only says so.

fn main() {
    eprintln!("chime-load: not built yet; see the load-generator issue");
    std::process::exit(2);
}
