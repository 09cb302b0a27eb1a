//! Starting, running and stopping chimed: the order of things matters.
//!
//! 1. Read and validate the configuration (nothing is started on error).
//! 2. Install signal handlers, so SIGTERM during start-up is not lost.
//! 3. Start the control thread; it publishes the first clock snapshot
//!    before workers exist, so no reply is ever built from a default.
//! 4. Bind every socket (workers, metrics) while still privileged.
//! 5. Drop to the configured user, keeping only needed capabilities.
//! 6. Serve until SIGINT/SIGTERM, then stop every thread and exit 0.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chime_proto::ClockSnapshot;
use tracing::{error, info, warn};

use crate::cli::{self, Cli};
use crate::config::{Backend, Config};
use crate::control::{self, ControlConfig};
use crate::shared::Shared;
use crate::socket_backend::{self, SocketBackendConfig};
use crate::stats::WorkerStats;
use crate::{metrics, privdrop};

/// chimed's entry point: parses nothing itself, returns the exit code.
pub fn main(cli: Cli) -> ExitCode {
    if let Some(path) = &cli.check_config {
        return cli::run_check_config(path);
    }
    let cfg = match cli.load_config() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("chimed: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.print_config {
        return match cfg.to_toml_string() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chimed: cannot render the configuration: {e}");
                ExitCode::FAILURE
            }
        };
    }
    init_logging(&cfg.log.level);
    match serve(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// The default listen list includes `[::]:123`; on a host without IPv6 that
/// address cannot be bound. Only for the built-in default (never for
/// addresses the operator named), drop it with a warning.
fn usable_listen(cfg: &Config) -> Vec<SocketAddr> {
    let mut listen = cfg.server.listen.clone();
    if cfg.server.listen == Config::default().server.listen && std::net::UdpSocket::bind("[::1]:0").is_err() {
        warn!("IPv6 is not available on this host; listening on IPv4 only");
        listen.retain(SocketAddr::is_ipv4);
    }
    listen
}

fn serve(cfg: Config) -> Result<(), String> {
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))
            .map_err(|e| format!("cannot install signal handler: {e}"))?;
    }

    match cfg.server.backend {
        Backend::Xdp => {
            return Err("the xdp backend is not available in this build yet (it arrives with the XDP issue); \
                        use --backend socket or auto"
                .into());
        }
        Backend::Auto if cfg.uses_xdp() => info!(
            "backend auto: server.interface {:?} is set, but this build has no XDP backend yet; \
             using the socket backend",
            cfg.server.interface
        ),
        Backend::Auto => info!("backend auto: no server.interface set; using the socket backend"),
        Backend::Socket => {}
    }

    let workers = cfg.worker_count();
    let backend_cfg = SocketBackendConfig {
        listen: usable_listen(&cfg),
        workers,
        cores: cfg.server.cores.clone(),
        batch_size: cfg.server.batch_size,
        responder: cfg.responder_config(workers),
        ..SocketBackendConfig::default()
    };
    let stats = (0..workers).map(|i| Arc::new(WorkerStats::new(i, backend_cfg.core_for_worker(i)))).collect();
    let precision = control::measure_precision();
    let acl = cfg.acl().map_err(|e| e.to_string())?;
    let shared = Arc::new(Shared::new(ClockSnapshot::unsynchronized(precision), acl, stats));

    let control_cfg = ControlConfig {
        stratum: cfg.upstream.stratum,
        reference_id: cfg.reference_id(),
        local_stratum: cfg.local_stratum(),
        update_interval: cfg.update_interval(),
    };
    let control = control::spawn(control_cfg, Arc::clone(&shared)).map_err(|e| format!("control thread: {e}"))?;

    let backend = socket_backend::start(backend_cfg, Arc::clone(&shared));
    let backend = match backend {
        Ok(b) => b,
        Err(e) => {
            shared.shutdown.store(true, Ordering::Relaxed);
            let _ = control.join();
            return Err(e.to_string());
        }
    };

    let metrics = if cfg.metrics.enabled {
        match metrics::serve(cfg.metrics.listen, Arc::clone(&shared), control.status()) {
            Ok(m) => Some(m),
            Err(e) => {
                shared.shutdown.store(true, Ordering::Relaxed);
                let _ = backend.join();
                let _ = control.join();
                return Err(format!("metrics endpoint on {}: {e}", cfg.metrics.listen));
            }
        }
    } else {
        None
    };

    match privdrop::drop_privileges(&cfg.server.user, &cfg.server.group, &[]) {
        Ok(outcome) => info!("{outcome}"),
        Err(e) => {
            shared.shutdown.store(true, Ordering::Relaxed);
            let _ = backend.join();
            let _ = control.join();
            return Err(format!("dropping privileges: {e}"));
        }
    }

    info!("chimed {} serving", env!("CARGO_PKG_VERSION"));
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    info!("shutting down");
    shared.shutdown.store(true, Ordering::Relaxed);
    if let Err(e) = backend.join() {
        error!("{e}");
    }
    if let Some(m) = metrics {
        let _ = m.join();
    }
    let _ = control.join();
    info!("stopped");
    Ok(())
}
