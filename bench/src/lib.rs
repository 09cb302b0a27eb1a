//! chime's benchmarks.
//!
//! The criterion micro-benchmarks live in `benches/` (`cargo bench -p
//! chime-bench`); see `bench/README.md` for how to run them and the latest
//! figures. The end-to-end side-by-side harness (chime-load against chimed and
//! a reference server in a network namespace) arrives with the load-generator
//! issue.
#![forbid(unsafe_code)]
