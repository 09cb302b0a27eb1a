//! chimed's command line: where the configuration comes from, and the few
//! settings worth overriding without editing it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use crate::config::{Backend, Config, ConfigError, MAX_XDP_QUEUES, UpstreamSource, XdpMode};

const LONG_ABOUT: &str = "\
chimed answers NTP (RFC 5905) client requests at line rate, for public time \
servers such as NTP pool members. It serves the time of the kernel clock, \
which something else (chronyd, ntpd, ptp4l + phc2sys) keeps synchronized, and \
announces itself unsynchronized (or goes silent) when that clock is not.

Packets reach the workers through per-core UDP sockets (backend \"socket\", \
runs anywhere) or AF_XDP sockets fed by an XDP program on one network \
interface (backend \"xdp\", kernel bypass; needs root or the systemd unit's \
capabilities); backend \"none\" serves only NTS-KE. Started as root, chimed \
binds its sockets and then switches to an unprivileged user (server.user, \
default \"nobody\"), keeping only the capabilities it still needs; started as \
another user with ambient capabilities (the systemd unit), it drops those it \
no longer needs. Under systemd it reports readiness and watchdog pings \
(sd_notify).

Settings come from a TOML file (-c); without one, the built-in defaults apply \
(ops/chimed.toml documents every key). The options below override the file.";

const AFTER_HELP: &str = "\
Examples:
  chimed -c /etc/chime/chimed.toml
  chimed --check-config /etc/chime/chimed.toml
  chimed --backend socket --listen 127.0.0.1:1123 --no-metrics --log-level debug
  chimed --backend xdp --interface enp1s0f0 --xdp-mode native --queues 4
  chimed --tls-cert /etc/chime/fullchain.pem --tls-key /etc/chime/key.pem
  chimed -c /etc/chime/chimed.toml --print-config
  chimed --upstream-source chrony
  chimed -c /etc/chime/chimed.toml status    (health check: exit 0 serving synchronized time, 1 not, 2 unreachable)";

/// chimed's command line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Parser)]
#[command(
    name = "chimed",
    version,
    about = "chime: a kernel-bypass NTP time server for public pool operators",
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Configuration file (TOML); without it the built-in defaults apply.
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Check FILE (syntax, unknown keys, values) and exit: prints "FILE: ok"
    /// and exits 0, or prints every problem and exits 1. The files FILE
    /// names (certificate, keys, secrets, leap file) are not opened: chimed
    /// checks them when it starts.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "print_config"])]
    pub check_config: Option<PathBuf>,

    /// Serve NTP on ADDR:PORT (IPv6 as [ADDR]:PORT); repeat for several.
    /// Replaces server.listen.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,

    /// Packet path. Overrides server.backend.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub backend: Option<Backend>,

    /// Network interface for the xdp backend. Overrides server.interface.
    #[arg(long, value_name = "IFACE")]
    pub interface: Option<String>,

    /// How the XDP program is attached: native (driver), generic (skb), or
    /// auto (native, else generic with a warning). Overrides xdp.mode.
    #[arg(long, value_enum, value_name = "MODE")]
    pub xdp_mode: Option<XdpMode>,

    /// NIC queues the xdp backend serves, one worker each; 0 = the
    /// interface's channel count. Overrides xdp.queues.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=MAX_XDP_QUEUES as i64))]
    pub queues: Option<u16>,

    /// Serve the local clock at stratum N (1-15) while unsynchronized; 0 =
    /// off. Overrides upstream.local_stratum.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=15))]
    pub local_stratum: Option<u8>,

    /// Number of worker threads; 0 = one per core. Overrides server.workers.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// Serve metrics on ADDR:PORT (and enable them). Overrides
    /// metrics.listen.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "no_metrics")]
    pub metrics_listen: Option<SocketAddr>,

    /// Do not serve metrics. Sets metrics.enabled = false.
    #[arg(long)]
    pub no_metrics: bool,

    /// When started as root, switch to USER after binding ("root" = stay
    /// root). Overrides server.user.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Log level (trace, debug, info, warn, error, off) or a tracing
    /// EnvFilter directive such as "info,chime_server=debug". Overrides
    /// log.level.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Enable NTS with this PEM certificate chain (needs --tls-key).
    /// Sets nts.tls_cert and nts.enabled.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (mode 0600). Sets nts.tls_key.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve NTS-KE on ADDR:PORT (default port 4460); repeat for several.
    /// Replaces nts.listen.
    #[arg(long, value_name = "ADDR:PORT")]
    pub nts_ke_listen: Vec<SocketAddr>,

    /// Print the effective configuration (file plus overrides) as TOML and
    /// exit.
    #[arg(long)]
    pub print_config: bool,

    /// Where the served time's state comes from: kernel (adjtimex), chrony
    /// (the local chronyd) or ptp4l (its management socket). Overrides
    /// upstream.source.
    #[arg(long, value_enum, value_name = "SOURCE")]
    pub upstream_source: Option<UpstreamSource>,

    /// A subcommand; without one, chimed runs the server.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// chimed's subcommands.
#[derive(Clone, Debug, PartialEq, Eq, clap::Subcommand)]
#[non_exhaustive]
pub enum Command {
    /// Summarize a running chimed from its metrics endpoint: clock state,
    /// stratum, reference ID, root distance, upstream, backend, workers and
    /// queues, request rate, drops by reason, the source prefixes
    /// rate-limited most, NTS keys. Exits 0 when synchronized and serving,
    /// 1 when unsynchronized or not serving (a worker stuck, requests
    /// unanswered), 2 when the server cannot be reached (for anycast health
    /// checks).
    Status(StatusArgs),
}

/// `chimed status` options.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct StatusArgs {
    /// The metrics endpoint ADDR:PORT; default: metrics.listen from the
    /// configuration (-c), with a wildcard address read as loopback.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
}

impl Cli {
    /// Applies the command-line overrides to `cfg` (without validating).
    pub fn apply(&self, cfg: &mut Config) {
        if !self.listen.is_empty() {
            cfg.server.listen.clone_from(&self.listen);
        }
        if let Some(backend) = self.backend {
            cfg.server.backend = backend;
        }
        if let Some(interface) = &self.interface {
            cfg.server.interface.clone_from(interface);
        }
        if let Some(mode) = self.xdp_mode {
            cfg.xdp.mode = mode;
        }
        if let Some(queues) = self.queues {
            cfg.xdp.queues = usize::from(queues);
        }
        if let Some(stratum) = self.local_stratum {
            cfg.upstream.local_stratum = stratum;
        }
        if let Some(workers) = self.workers {
            cfg.server.workers = workers;
        }
        if let Some(listen) = self.metrics_listen {
            cfg.metrics.listen = listen;
            cfg.metrics.enabled = true;
        }
        if self.no_metrics {
            cfg.metrics.enabled = false;
        }
        if let Some(user) = &self.user {
            cfg.server.user.clone_from(user);
        }
        if let Some(level) = &self.log_level {
            cfg.log.level.clone_from(level);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            cfg.nts.tls_cert.clone_from(cert);
            cfg.nts.tls_key.clone_from(key);
            cfg.nts.enabled = true;
        }
        if !self.nts_ke_listen.is_empty() {
            cfg.nts.listen.clone_from(&self.nts_ke_listen);
        }
        if let Some(source) = self.upstream_source {
            cfg.upstream.source = source;
        }
    }

    /// The effective configuration: the `--config` file (or the defaults)
    /// with the overrides applied, validated.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        self.apply(&mut cfg);
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `--check-config`: reads, parses and validates the file at `path`. The
/// files it names (TLS certificate and key, key file, fleet secret, leap
/// file) are not opened, so a configuration for another host can be checked
/// anywhere (in CI, on a build machine); chimed checks them at start.
pub fn check_config(path: impl AsRef<Path>) -> Result<(), ConfigError> {
    Config::load(path).map(drop)
}

/// `--check-config` for the binary: prints `FILE: ok` to stdout and returns
/// success, or prints the errors to stderr and returns failure.
pub fn run_check_config(path: impl AsRef<Path>) -> ExitCode {
    let path = path.as_ref();
    match check_config(path) {
        Ok(()) => {
            // Nothing useful to do if stdout is gone; the exit code says it.
            let _ = writeln!(std::io::stdout(), "{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("chimed").chain(args.iter().copied())).unwrap()
    }

    fn parse_err(args: &[&str]) -> clap::Error {
        Cli::try_parse_from(std::iter::once("chimed").chain(args.iter().copied())).unwrap_err()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_arguments_means_defaults() {
        let cli = parse(&[]);
        assert_eq!(cli, Cli::default());
        assert_eq!(cli.load_config().unwrap(), Config::default());
    }

    #[test]
    fn every_override_applies() {
        let cli = parse(&[
            "--listen",
            "127.0.0.1:1123",
            "--listen",
            "[::1]:1123",
            "--backend",
            "socket",
            "--interface",
            "eth1",
            "--xdp-mode",
            "generic",
            "--queues",
            "2",
            "--local-stratum",
            "10",
            "--workers",
            "3",
            "--metrics-listen",
            "127.0.0.1:9999",
            "--user",
            "chime",
            "--log-level",
            "debug",
            "--tls-cert",
            "/etc/chime/cert.pem",
            "--tls-key",
            "/etc/chime/key.pem",
            "--nts-ke-listen",
            "127.0.0.1:4460",
            "--upstream-source",
            "chrony",
        ]);
        let mut cfg = Config::default();
        cfg.metrics.enabled = false;
        cli.apply(&mut cfg);
        assert_eq!(cfg.server.listen, ["127.0.0.1:1123".parse().unwrap(), "[::1]:1123".parse().unwrap()]);
        assert_eq!(cfg.server.backend, Backend::Socket);
        assert_eq!(cfg.server.interface, "eth1");
        assert_eq!(cfg.xdp.mode, XdpMode::Generic);
        assert_eq!(cfg.xdp.queues, 2);
        assert_eq!(cfg.upstream.local_stratum, 10);
        assert_eq!(cfg.server.workers, 3);
        assert!(cfg.metrics.enabled);
        assert_eq!(cfg.metrics.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(cfg.server.user, "chime");
        assert_eq!(cfg.log.level, "debug");
        assert!(cfg.nts.enabled);
        assert_eq!(cfg.nts.tls_cert, Path::new("/etc/chime/cert.pem"));
        assert_eq!(cfg.nts.tls_key, Path::new("/etc/chime/key.pem"));
        assert_eq!(cfg.nts.listen, ["127.0.0.1:4460".parse().unwrap()]);
        assert_eq!(cfg.upstream.source, UpstreamSource::Chrony);
        cfg.validate().unwrap();
    }

    #[test]
    fn unset_options_leave_the_config_alone() {
        let mut cfg = Config::default();
        cfg.server.listen = vec!["192.0.2.1:123".parse().unwrap()];
        cfg.server.workers = 5;
        let before = cfg.clone();
        parse(&["-c", "/etc/chime/chimed.toml"]).apply(&mut cfg);
        assert_eq!(cfg, before);
    }

    #[test]
    fn no_metrics_disables_them() {
        let mut cfg = Config::default();
        parse(&["--no-metrics"]).apply(&mut cfg);
        assert!(!cfg.metrics.enabled);
        assert_eq!(parse_err(&["--no-metrics", "--metrics-listen", "127.0.0.1:1"]).kind(), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn bad_values_are_rejected_by_clap() {
        assert_eq!(parse_err(&["--backend", "dpdk"]).kind(), ErrorKind::InvalidValue);
        assert_eq!(parse_err(&["--local-stratum", "16"]).kind(), ErrorKind::ValueValidation);
        assert_eq!(parse_err(&["--listen", "localhost:123"]).kind(), ErrorKind::ValueValidation);
        assert_eq!(parse_err(&["--workers", "-1"]).kind(), ErrorKind::UnknownArgument);
        assert_eq!(parse_err(&["--bogus"]).kind(), ErrorKind::UnknownArgument);
        assert_eq!(parse_err(&["--xdp-mode", "skb"]).kind(), ErrorKind::InvalidValue);
        assert_eq!(parse_err(&["--queues", "1025"]).kind(), ErrorKind::ValueValidation);
        assert_eq!(parse_err(&["--tls-cert", "c.pem"]).kind(), ErrorKind::MissingRequiredArgument);
        assert_eq!(parse(&["--queues", "1024"]).queues, Some(1024));
        assert_eq!(parse_err(&["--check-config", "a", "-c", "b"]).kind(), ErrorKind::ArgumentConflict);
        assert_eq!(parse_err(&["--check-config", "a", "--print-config"]).kind(), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn short_and_long_config_flags() {
        assert_eq!(parse(&["-c", "x.toml"]).config, Some(PathBuf::from("x.toml")));
        assert_eq!(parse(&["--config=x.toml"]).config, Some(PathBuf::from("x.toml")));
        assert_eq!(parse(&["--check-config", "y.toml"]).check_config, Some(PathBuf::from("y.toml")));
        assert!(parse(&["--print-config"]).print_config);
    }

    #[test]
    fn overrides_are_validated_by_load_config() {
        let e = parse(&["--log-level", "loud"]).load_config().unwrap_err();
        assert_eq!(e.problems()[0].key, "log.level");
        let e = parse(&["--backend", "xdp"]).load_config().unwrap_err();
        assert_eq!(e.problems()[0].key, "server.interface");
    }

    #[test]
    fn help_mentions_every_option() {
        let help = Cli::command().render_long_help().to_string();
        for flag in [
            "--config",
            "--check-config",
            "--listen",
            "--backend",
            "--interface",
            "--xdp-mode",
            "--queues",
            "--local-stratum",
            "--workers",
            "--metrics-listen",
            "--no-metrics",
            "--user",
            "--log-level",
            "--print-config",
            "--tls-cert",
            "--tls-key",
            "--nts-ke-listen",
            "--upstream-source",
            "status",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help");
        }
        assert!(help.contains("[possible values: socket, xdp, auto]") || help.contains("socket"), "{help}");
    }

    #[test]
    fn status_subcommand_keeps_the_server_flags() {
        let cli = parse(&["-c", "x.toml", "status"]);
        assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
        assert_eq!(cli.command, Some(Command::Status(StatusArgs { metrics: None })));
        let cli = parse(&["status", "--metrics", "127.0.0.1:9100"]);
        assert_eq!(cli.command, Some(Command::Status(StatusArgs { metrics: Some("127.0.0.1:9100".parse().unwrap()) })));
        assert_eq!(parse(&["--workers", "2"]).command, None);
        assert_eq!(parse_err(&["--upstream-source", "gps"]).kind(), ErrorKind::InvalidValue);
    }

    #[test]
    fn check_config_on_files() {
        let dir = std::env::temp_dir().join(format!("chime-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "[server]\nworkers = 2\n").unwrap();
        check_config(&good).unwrap();
        assert_eq!(run_check_config(&good), ExitCode::SUCCESS);
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[server]\nworkers = 2\nbatch_size = 0\n[upstream]\nstratum = 0\n").unwrap();
        let e = check_config(&bad).unwrap_err();
        assert_eq!(e.problems().len(), 2);
        assert!(e.to_string().contains("bad.toml"), "{e}");
        assert_eq!(run_check_config(&bad), ExitCode::FAILURE);
        assert!(matches!(check_config(dir.join("missing.toml")), Err(ConfigError::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();

        check_config(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/chimed.toml"))).unwrap();
    }
}
