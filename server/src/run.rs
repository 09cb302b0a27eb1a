//! Starting, running and stopping chimed: the order of things matters.
//!
//! 1. Read and validate the configuration (nothing is started on error).
//! 2. Install signal handlers, so SIGTERM during start-up is not lost.
//! 3. Start the control thread; it publishes the first clock snapshot
//!    before workers exist, so no reply is ever built from a default.
//! 4. Bind every socket (workers, metrics, NTS-KE) and read the TLS key
//!    while still privileged.
//! 5. Drop to the configured user, keeping only needed capabilities.
//! 6. Serve until SIGINT/SIGTERM, then stop every thread and exit 0;
//!    SIGHUP reloads the configuration (see [`crate::reload`]).

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chime_nts_ke::{NtsKeConfig, NtsKeServer};
use chime_proto::ClockSnapshot;
use chime_proto::acl::Cidr;
use chime_proto::nts::KeyRingConfig;
use tracing::{error, info, warn};

use crate::cli::{self, Cli};
use crate::config::{Backend, Config, DenyMode};
use crate::control::{self, ControlConfig, ControlHandle, ControlUpdate};
use crate::leap::LeapService;
use crate::nts::NtsKeys;
use crate::reload::{self, ReloadPlan};
use crate::shared::{ReloadOutcome, Shared};
use crate::socket_backend::{self, SocketBackend, SocketBackendConfig};
use crate::stats::WorkerStats;
use crate::xdp::{self, backend::XdpBackend, backend::XdpBackendConfig};
use crate::{metrics, phc, privdrop};

/// chimed's entry point: parses nothing itself, returns the exit code.
pub fn main(cli: Cli) -> ExitCode {
    if let Some(path) = &cli.check_config {
        return cli::run_check_config(path);
    }
    if let Some(cli::Command::Status(args)) = &cli.command {
        let addr = match args.metrics {
            Some(addr) => addr,
            None => match cli.load_config() {
                Ok(cfg) => cfg.metrics.listen,
                Err(e) => {
                    eprintln!("chimed status: {e}");
                    return ExitCode::from(crate::status::EXIT_UNREACHABLE);
                }
            },
        };
        return crate::status::run(addr);
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
    let reread = || cli.load_config().map_err(|e| e.to_string());
    match serve(cfg, &reread) {
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

/// The NTS-KE addresses: like [`usable_listen`], the built-in default's
/// `[::]` is dropped on a host without IPv6.
fn usable_nts_listen(cfg: &Config) -> Vec<SocketAddr> {
    let mut listen = cfg.nts.listen.clone();
    if cfg.nts.listen == Config::default().nts.listen && std::net::TcpListener::bind("[::1]:0").is_err() {
        listen.retain(SocketAddr::is_ipv4);
    }
    listen
}

fn nts_ke_config(cfg: &Config) -> NtsKeConfig {
    let n = &cfg.nts;
    NtsKeConfig {
        listen: usable_nts_listen(cfg),
        tls_cert: n.tls_cert.clone(),
        tls_key: n.tls_key.clone(),
        timeout: Duration::from_secs(n.timeout),
        max_connections: n.max_connections,
        handshake_rate: n.handshake_rate,
        handshake_burst: n.handshake_burst,
        ntp_server: (!n.ntp_server.is_empty()).then(|| n.ntp_server.clone()),
        ntp_port: (n.ntp_port != 0).then_some(n.ntp_port),
        ..NtsKeConfig::default()
    }
}

/// The packet path chimed runs.
enum Running {
    Socket(SocketBackend),
    Xdp(Box<XdpBackend>),
}

impl Running {
    fn join(self) {
        match self {
            Self::Socket(b) => {
                if let Err(e) = b.join() {
                    error!("{e}");
                }
            }
            Self::Xdp(b) => b.join(),
        }
    }

    /// Capabilities still needed after start-up: detaching the XDP program
    /// at shutdown needs CAP_NET_ADMIN; sockets need nothing once bound.
    fn capabilities(&self) -> &'static [caps::Capability] {
        match self {
            Self::Socket(_) => &[],
            Self::Xdp(_) => &[caps::Capability::CAP_NET_ADMIN],
        }
    }
}

/// What [`serve`] decided to start, before anything runs.
enum Plan {
    Socket { workers: usize },
    Xdp { cfg: Box<XdpBackendConfig>, queues: usize, fallback: bool },
}

fn plan(cfg: &Config) -> Result<Plan, String> {
    let socket = Plan::Socket { workers: cfg.worker_count() };
    match cfg.server.backend {
        Backend::Socket => Ok(socket),
        Backend::Auto if !cfg.uses_xdp() => {
            info!("backend auto: no server.interface set; using the socket backend");
            Ok(socket)
        }
        backend => {
            let fallback = backend != Backend::Xdp;
            let xcfg = xdp_config(cfg);
            match xdp::backend::plan(&xcfg) {
                Ok((_, queues)) => Ok(Plan::Xdp { cfg: Box::new(xcfg), queues, fallback }),
                Err(e) if fallback => {
                    warn!("backend auto: XDP not possible ({e}); using the socket backend");
                    Ok(socket)
                }
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

fn xdp_config(cfg: &Config) -> XdpBackendConfig {
    XdpBackendConfig {
        interface: cfg.server.interface.clone(),
        listen: cfg.server.listen.clone(),
        queues: cfg.xdp.queues,
        cores: cfg.server.cores.clone(),
        batch_size: cfg.server.batch_size,
        xdp: cfg.xdp.clone(),
        responder: cfg.responder_config(1),
        deny: kernel_deny_list(cfg),
    }
}

/// The ACL's deny prefixes the XDP program may drop in the kernel: only
/// when denied clients get silence (a KoD DENY must come from userspace),
/// and only prefixes with no allow or restrict rule inside them (the
/// program's longest-prefix match knows deny rules only).
fn kernel_deny_list(cfg: &Config) -> Vec<(IpAddr, u8)> {
    if cfg.access.deny_response != DenyMode::Silent {
        return Vec::new();
    }
    let parse = |list: &[String]| -> Vec<Cidr> { list.iter().filter_map(|s| s.parse().ok()).collect() };
    let others: Vec<Cidr> = parse(&cfg.access.allow).into_iter().chain(parse(&cfg.access.restrict)).collect();
    parse(&cfg.access.deny)
        .into_iter()
        .filter(|d| !others.iter().any(|o| o.prefix_len() >= d.prefix_len() && d.contains(o.addr())))
        .map(|d| (d.addr(), d.prefix_len()))
        .collect()
}

fn control_config(cfg: &Config) -> ControlConfig {
    ControlConfig {
        stratum: cfg.upstream.stratum,
        reference_id: cfg.reference_id(),
        source: Some(cfg.source_config()),
        max_unsync_secs: cfg.upstream.max_unsync_secs,
        max_root_distance: cfg.upstream.max_root_distance,
        local_stratum: cfg.local_stratum(),
        update_interval: cfg.update_interval(),
    }
}

fn key_rotation(cfg: &Config) -> KeyRingConfig {
    KeyRingConfig { interval_secs: cfg.nts.rotation_interval, keep: cfg.nts.keep_keys }
}

/// What a reload can reach.
struct Live<'a> {
    shared: &'a Shared,
    control: &'a ControlHandle,
    backend: &'a mut Running,
    nts_ke: &'a mut Option<NtsKeServer>,
}

/// SIGHUP: reads the configuration again and applies it, all or nothing
/// (see [`crate::reload`]). `running` becomes the new configuration when
/// it is applied.
fn reload(running: &mut Config, reread: &dyn Fn() -> Result<Config, String>, live: Live<'_>) -> ReloadOutcome {
    let failed = |e: String| {
        error!("SIGHUP: configuration not reloaded, nothing changed: {e}");
        ReloadOutcome::Failed
    };
    let new = match reread() {
        Ok(cfg) => cfg,
        Err(e) => return failed(e),
    };
    let changed = match reload::plan(running, &new) {
        ReloadPlan::Apply { changed } => changed,
        ReloadPlan::Refuse { restart } => {
            error!(
                "SIGHUP: configuration not reloaded, nothing changed: {} changed, which needs a restart \
                 (live: access, rate_limit, ntp, upstream, nts.tls_cert/tls_key, nts.rotation_interval/keep_keys)",
                restart.join(", ")
            );
            return ReloadOutcome::Refused;
        }
    };
    let acl = match new.acl() {
        Ok(acl) => acl,
        Err(e) => return failed(e.to_string()),
    };
    // The steps that can fail, before anything is published.
    let source = if new.source_config() != running.source_config() {
        match crate::upstream::open(&new.source_config()) {
            Ok(s) => Some(s),
            Err(e) => return failed(format!("upstream source: {e}")),
        }
    } else {
        None
    };
    // A certificate under new names must load; one under the same names is
    // read again (a renewal), and if that fails the current one is kept
    // and the rest still applies.
    if let Some(server) = live.nts_ke.as_mut() {
        let renamed = new.nts.tls_cert != running.nts.tls_cert || new.nts.tls_key != running.nts.tls_key;
        match server.reload_certificates_from(&new.nts.tls_cert, &new.nts.tls_key) {
            Ok(()) => {}
            Err(e) if renamed => return failed(format!("NTS-KE certificate: {e}")),
            Err(e) => warn!("SIGHUP: NTS-KE certificate not read again, keeping the current one: {e}"),
        }
    }

    live.shared.acl.store(Arc::new(acl));
    if let Running::Xdp(b) = live.backend
        && let Err(e) = b.set_denied(&kernel_deny_list(&new))
    {
        error!("SIGHUP: the XDP program's deny list was not updated (the ACL in the workers was): {e}");
    }
    live.shared.publish_responder_config(new.responder_config(live.shared.workers.len()));
    let update = ControlUpdate {
        cfg: control_config(&new),
        source,
        rotation: live.shared.nts.is_some().then(|| key_rotation(&new)),
    };
    if let Err(e) = live.control.update(update) {
        error!("SIGHUP: upstream settings not applied: {e}");
    }
    if changed.is_empty() {
        info!("SIGHUP: configuration unchanged{}", if live.nts_ke.is_some() { "; certificate read again" } else { "" });
    } else {
        info!("SIGHUP: configuration reloaded; changed: {}", changed.join(", "));
    }
    *running = new;
    ReloadOutcome::Applied
}

fn serve(cfg: Config, reread: &dyn Fn() -> Result<Config, String>) -> Result<(), String> {
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))
            .map_err(|e| format!("cannot install signal handler: {e}"))?;
    }
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))
        .map_err(|e| format!("cannot install signal handler: {e}"))?;

    let plan = plan(&cfg)?;
    let (workers, cores): (usize, Vec<Option<usize>>) = match &plan {
        Plan::Socket { workers } => {
            let sc = SocketBackendConfig { cores: cfg.server.cores.clone(), ..SocketBackendConfig::default() };
            (*workers, (0..*workers).map(|i| sc.core_for_worker(i)).collect())
        }
        Plan::Xdp { cfg: x, queues, .. } => {
            (*queues, (0..*queues).map(|i| xdp::backend::core_for_worker(x, i)).collect())
        }
    };
    let stats = cores.iter().enumerate().map(|(i, core)| Arc::new(WorkerStats::new(i, *core))).collect();
    let precision = control::measure_precision();
    let acl = cfg.acl().map_err(|e| e.to_string())?;
    let nts_keys = if cfg.nts.enabled { Some(NtsKeys::load(&cfg.nts, crate::nts::unix_now())?) } else { None };
    let mut shared = Shared::new(ClockSnapshot::unsynchronized(precision), acl, stats);
    shared.nts = nts_keys.as_ref().map(NtsKeys::ring);
    let leap = LeapService::from_config(&cfg.leap, crate::time::now_unix_secs()).map_err(|e| e.to_string())?;
    shared.leap.set(leap).map_err(|_| "leap state set twice".to_owned())?;
    let shared = Arc::new(shared);

    let control = control::spawn_with_nts(control_config(&cfg), Arc::clone(&shared), nts_keys)
        .map_err(|e| format!("control thread: {e}"))?;
    // The NIC clock's mapping to UTC, where the interface has a PHC.
    let phc_thread = phc::spawn_for_interface(&cfg.server.interface, Arc::clone(&shared));
    let fail = |msg: String| {
        shared.shutdown.store(true, Ordering::Relaxed);
        msg
    };

    let socket_cfg = |workers: usize| SocketBackendConfig {
        listen: usable_listen(&cfg),
        workers,
        cores: cfg.server.cores.clone(),
        batch_size: cfg.server.batch_size,
        responder: cfg.responder_config(workers),
        ..SocketBackendConfig::default()
    };
    let started = match plan {
        Plan::Socket { workers } => socket_backend::start(socket_cfg(workers), Arc::clone(&shared))
            .map(Running::Socket)
            .map_err(|e| e.to_string()),
        Plan::Xdp { cfg: mut xcfg, queues, fallback } => {
            xcfg.responder = cfg.responder_config(queues);
            match xdp::backend::start(*xcfg, Arc::clone(&shared)) {
                Ok(b) => Ok(Running::Xdp(Box::new(b))),
                Err(e) if fallback => {
                    warn!("backend auto: XDP failed ({e}); using the socket backend with {workers} workers");
                    shared.xdp_active.store(false, Ordering::Relaxed);
                    socket_backend::start(socket_cfg(workers), Arc::clone(&shared))
                        .map(Running::Socket)
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let mut backend = match started {
        Ok(b) => b,
        Err(e) => {
            let e = fail(e);
            let _ = control.join();
            return Err(e);
        }
    };

    let metrics = if cfg.metrics.enabled {
        match metrics::serve(cfg.metrics.listen, Arc::clone(&shared), control.status()) {
            Ok(m) => Some(m),
            Err(e) => {
                let e = fail(format!("metrics endpoint on {}: {e}", cfg.metrics.listen));
                backend.join();
                let _ = control.join();
                return Err(e);
            }
        }
    } else {
        None
    };

    let mut nts_ke = match &shared.nts {
        Some(ring) => match NtsKeServer::start(nts_ke_config(&cfg), Arc::clone(ring)) {
            Ok(server) => {
                info!(listen = ?server.local_addrs(), "NTS-KE server listening");
                let _ = shared.nts_ke.set(Arc::clone(server.metrics()));
                Some(server)
            }
            Err(e) => {
                let e = fail(format!("NTS-KE: {e}"));
                backend.join();
                if let Some(m) = metrics {
                    let _ = m.join();
                }
                let _ = control.join();
                return Err(e);
            }
        },
        None => None,
    };

    match privdrop::drop_privileges(&cfg.server.user, &cfg.server.group, backend.capabilities()) {
        Ok(outcome) => info!("{outcome}"),
        Err(e) => {
            let e = fail(format!("dropping privileges: {e}"));
            backend.join();
            let _ = control.join();
            return Err(e);
        }
    }

    info!("chimed {} serving", env!("CARGO_PKG_VERSION"));
    let mut running = cfg;
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if hup.swap(false, Ordering::Relaxed) {
            let live = Live { shared: &shared, control: &control, backend: &mut backend, nts_ke: &mut nts_ke };
            let outcome = reload(&mut running, reread, live);
            shared.count_reload(outcome);
        }
        if let Running::Xdp(b) = &mut backend {
            b.tick();
        }
    }
    info!("shutting down");
    shared.shutdown.store(true, Ordering::Relaxed);
    if let Some(server) = nts_ke {
        let _ = server.shutdown();
    }
    backend.join();
    if let Some(m) = metrics {
        let _ = m.join();
    }
    let _ = control.join();
    if let Some(t) = phc_thread {
        let _ = t.join();
    }
    info!("stopped");
    Ok(())
}
