//! chimed's library: configuration, backends, workers, control thread and
//! metrics. The binary in `main.rs` is a thin shell around it.

pub mod cli;
pub mod config;
pub mod control;
pub mod leap;
pub mod metrics;
#[cfg(test)]
mod metrics_doc;
pub mod nts;
pub mod phc;
pub mod privdrop;
pub mod ratelimited;
pub mod reload;
pub mod residence;
pub mod run;
pub mod sdnotify;
pub mod seccomp;
pub mod shared;
pub mod socket_backend;
pub mod stats;
pub mod status;
pub mod sys;
pub mod time;
pub mod upstream;
pub mod xdp;
