//! chimed's library: configuration, backends, workers, control thread and
//! metrics. The binary in `main.rs` is a thin shell around it.

pub mod shared;
pub mod socket_backend;
pub mod stats;
pub mod sys;
pub mod time;
