//! `chime-load [OPTIONS] SERVER[:PORT]`: see `chime-load --help` and the
//! crate docs of `chime_loadgen`.

fn main() {
    std::process::exit(chime_loadgen::run::main_exit());
}
