//! `chimed`: the chime NTP server. See `chimed --help` and `ops/chimed.toml`.

use std::process::ExitCode;

use clap::Parser;

use chime_server::cli::Cli;
use chime_server::run;

fn main() -> ExitCode {
    let cli = Cli::parse();
    run::main(cli)
}
