//! Starting, running and stopping chimed: the order of things matters.
//!
//! 1. Read and validate the configuration (nothing is started on error).
//! 2. Install signal handlers, so SIGTERM during start-up is not lost.
//! 3. Start the control thread; it publishes the first clock snapshot
//!    before workers exist, so no reply is ever built from a default.
//! 4. Bind every socket (workers, metrics, NTS-KE) and read the TLS key
//!    while still privileged.
//! 5. Drop to the configured user, keeping only needed capabilities (or,
//!    not started as root, drop the capabilities no longer needed), and
//!    check that no other thread kept any; then install the seccomp filter
//!    in every thread (`server.seccomp`, see [`crate::seccomp`]).
//! 6. Tell systemd `READY=1` (when started by it, see [`crate::sdnotify`]),
//!    and serve until SIGINT/SIGTERM, then stop every thread and exit 0;
//!    SIGHUP reloads the configuration (see [`crate::reload`]), between
//!    `RELOADING=1` and `READY=1`. Meanwhile ping systemd's watchdog while
//!    every worker and the control thread make progress.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chime_nts_ke::{NtsKeConfig, NtsKeServer};
use chime_proto::ClockSnapshot;
use chime_proto::acl::Cidr;
use tracing::{error, info, warn};

use crate::cli::{self, Cli};
use crate::config::{Backend, Config, DenyMode, SeccompMode};
use crate::control::{self, ControlConfig, ControlHandle, ControlUpdate};
use crate::leap::LeapService;
use crate::nts::NtsKeys;
use crate::reload::{self, ReloadPlan};
use crate::sdnotify::{self, Notifier, Watchdog, WatchdogAction};
use crate::shared::{BackendInfo, ReloadOutcome, Shared};
use crate::socket_backend::{self, SocketBackend, SocketBackendConfig};
use crate::stats::WorkerStats;
use crate::upstream::Phase;
use crate::xdp::{self, backend::XdpBackend, backend::XdpBackendConfig};
use crate::{metrics, phc, privdrop, seccomp};

/// How long other threads may take to drop their capabilities after the
/// main thread has dropped its own (they do it first thing when they start).
const THREAD_DROP_WAIT: Duration = Duration::from_secs(5);

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
    let notifier = match Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            warn!("{}: {e}; systemd will not be notified", sdnotify::NOTIFY_SOCKET);
            None
        }
    };
    let reread = || cli.load_config().map_err(|e| e.to_string());
    match serve(cfg, &reread, notifier.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            notify(notifier.as_ref(), &sdnotify::status_line(&format!("failed: {e}")));
            ExitCode::FAILURE
        }
    }
}

/// Sends `state` to systemd if it started chimed; a failure is logged (at
/// debug level after the first, so a vanished manager cannot flood the log).
fn notify(notifier: Option<&Notifier>, state: &str) {
    static FAILED: AtomicBool = AtomicBool::new(false);
    let Some(n) = notifier else { return };
    if let Err(e) = n.notify(state) {
        if FAILED.swap(true, Ordering::Relaxed) {
            tracing::debug!(socket = ?n.target(), error = %e, "sd_notify failed");
        } else {
            warn!(socket = ?n.target(), error = %e, "cannot notify systemd");
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
        max_connections_per_source: n.max_connections_per_source,
        handshake_rate: n.handshake_rate,
        handshake_burst: n.handshake_burst,
        ntp_server: (!n.ntp_server.is_empty()).then(|| n.ntp_server.clone()),
        ntp_port: (n.ntp_port != 0).then_some(n.ntp_port),
        on_thread_start: Some(privdrop::drop_thread_capabilities),
        ..NtsKeConfig::default()
    }
}

/// The packet path chimed runs.
enum Running {
    Socket(SocketBackend),
    Xdp(Box<XdpBackend>),
    /// `server.backend = "none"`: no NTP, only NTS-KE.
    None,
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
            Self::None => {}
        }
    }

    /// What runs, for systemd's `STATUS=` line.
    fn describe(&self, cfg: &Config, workers: usize) -> String {
        match self {
            Self::Socket(_) => format!("socket backend, {workers} workers"),
            Self::Xdp(_) => format!("xdp backend on {}, {workers} queues", cfg.server.interface),
            Self::None => format!("no NTP (NTS-KE front end for {})", cfg.nts.ntp_server),
        }
    }

    /// Capabilities still needed after start-up: detaching the XDP program
    /// at shutdown needs CAP_NET_ADMIN; sockets need nothing once bound.
    fn capabilities(&self) -> &'static [caps::Capability] {
        match self {
            Self::Socket(_) | Self::None => &[],
            Self::Xdp(_) => &[caps::Capability::CAP_NET_ADMIN],
        }
    }
}

/// What [`serve`] decided to start, before anything runs.
enum Plan {
    None,
    Socket { workers: usize },
    Xdp { cfg: Box<XdpBackendConfig>, queues: usize, fallback: bool },
}

fn plan(cfg: &Config) -> Result<Plan, String> {
    let socket = Plan::Socket { workers: cfg.worker_count() };
    match cfg.server.backend {
        Backend::None => Ok(Plan::None),
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
        source_limit: cfg.xdp_source_limit(),
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
                 (applied live: {})",
                restart.join(", "),
                reload::LIVE.join(", ")
            );
            return ReloadOutcome::Refused;
        }
    };
    let acl = match new.acl() {
        Ok(acl) => acl,
        Err(e) => return failed(e.to_string()),
    };
    // The steps that can fail, before anything is published.
    let source_config = new.source_config();
    let source = if source_config != running.source_config() {
        match crate::upstream::open(&source_config) {
            Ok(s) => Some(s),
            Err(e) => return failed(format!("upstream source: {e}")),
        }
    } else {
        None
    };
    // A certificate under new names must load; one under the same names is
    // read again (a renewal), and if that fails the current one is kept
    // and the rest still applies.
    let mut certificate = "";
    if let Some(server) = live.nts_ke.as_mut() {
        let renamed = new.nts.tls_cert != running.nts.tls_cert || new.nts.tls_key != running.nts.tls_key;
        certificate = match server.reload_certificates_from(&new.nts.tls_cert, &new.nts.tls_key) {
            Ok(()) => "; certificate read again",
            Err(e) if renamed => return failed(format!("NTS-KE certificate: {e}")),
            Err(e) => {
                warn!("SIGHUP: NTS-KE certificate not read again, keeping the current one: {e}");
                "; certificate kept"
            }
        };
    }

    live.shared.acl.store(Arc::new(acl));
    if let Running::Xdp(b) = live.backend
        && let Err(e) = b.set_denied(&kernel_deny_list(&new))
    {
        error!("SIGHUP: the XDP program's deny list was not updated (the ACL in the workers was): {e}");
    }
    if let Running::Xdp(b) = live.backend
        && let Err(e) = b.set_source_limit(new.xdp_source_limit())
    {
        error!("SIGHUP: the XDP program's per-source limit was not updated: {e}");
    }
    live.shared.publish_responder_config(new.responder_config(live.shared.workers.len()));
    let update = ControlUpdate {
        cfg: control_config(&new),
        source,
        rotation: live.shared.nts.is_some().then(|| new.nts.key_ring_config()),
    };
    if let Err(e) = live.control.update(update) {
        error!("SIGHUP: upstream settings not applied: {e}");
    }
    if changed.is_empty() {
        info!("SIGHUP: configuration unchanged{certificate}");
    } else {
        info!("SIGHUP: configuration reloaded; changed: {}{certificate}", changed.join(", "));
    }
    *running = new;
    ReloadOutcome::Applied
}

/// Raises the soft open-file limit to the hard one: the NTS-KE server may
/// hold thousands of connections. Warns when the result is below
/// `nts.max_connections` (plus room for everything else).
fn raise_open_file_limit(cfg: &Config) {
    match crate::sys::rlimit::raise_nofile() {
        Ok(((soft, hard), (now, _))) => {
            if now != soft {
                info!("open-file limit raised from {soft} to {now}");
            }
            let wanted = if cfg.nts.enabled { cfg.nts.max_connections as u64 + 256 } else { 0 };
            if now < wanted {
                warn!(
                    "open-file limit {now} (hard {hard}) is below nts.max_connections + 256 = {wanted}; \
                     under a connection flood the oldest NTS-KE connections are closed early"
                );
            }
        }
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
}

fn serve(cfg: Config, reread: &dyn Fn() -> Result<Config, String>, notifier: Option<&Notifier>) -> Result<(), String> {
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))
            .map_err(|e| format!("cannot install signal handler: {e}"))?;
    }
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))
        .map_err(|e| format!("cannot install signal handler: {e}"))?;

    raise_open_file_limit(&cfg);
    let plan = plan(&cfg)?;
    let (workers, cores): (usize, Vec<Option<usize>>) = match &plan {
        Plan::None => (0, Vec::new()),
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
    let phc_thread =
        if cfg.serves_ntp() { phc::spawn_for_interface(&cfg.server.interface, Arc::clone(&shared)) } else { None };

    let socket_cfg = |workers: usize| SocketBackendConfig {
        listen: usable_listen(&cfg),
        workers,
        cores: cfg.server.cores.clone(),
        batch_size: cfg.server.batch_size,
        responder: cfg.responder_config(workers),
        ..SocketBackendConfig::default()
    };
    let started = match plan {
        Plan::None => {
            shared.backend.store(Some(Arc::new(BackendInfo { backend: "none", ..BackendInfo::default() })));
            Ok(Running::None)
        }
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
            stop(&shared, None, Running::None, None, control, phc_thread);
            return Err(e);
        }
    };

    let metrics = if cfg.metrics.enabled {
        match metrics::serve(cfg.metrics.listen, Arc::clone(&shared), control.status()) {
            Ok(m) => Some(m),
            Err(e) => {
                stop(&shared, None, backend, None, control, phc_thread);
                // The error names the endpoint and its address.
                return Err(e.to_string());
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
                stop(&shared, None, backend, metrics, control, phc_thread);
                return Err(format!("NTS-KE: {e}"));
            }
        },
        None => None,
    };

    // Staying root keeps every thread's capabilities, as asked; otherwise
    // no thread but this one may hold any.
    let dropped =
        privdrop::drop_privileges(&cfg.server.user, &cfg.server.group, backend.capabilities()).and_then(|outcome| {
            match outcome {
                privdrop::PrivDropOutcome::StayedRoot => Ok(outcome),
                _ => privdrop::verify_threads(THREAD_DROP_WAIT).map(|()| outcome),
            }
        });
    // Every thread runs by now and nothing starts one later: the filter
    // goes into all of them at once (see [`crate::seccomp`]).
    let needs = seccomp::Needs { xdp: matches!(backend, Running::Xdp(_)) };
    let confined = dropped.map_err(|e| format!("dropping privileges: {e}")).and_then(|outcome| {
        info!("{outcome}");
        let mode = cfg.server.seccomp;
        let allowed = seccomp::install(mode, needs).map_err(|e| e.to_string())?;
        match mode {
            SeccompMode::Enforce => info!(
                allowed,
                "seccomp filter installed in every thread: other system calls fail with EPERM (kernel log: type=1326)"
            ),
            SeccompMode::Log => info!(
                allowed,
                "seccomp filter installed in every thread, logging only: other system calls are allowed and \
                 logged by the kernel (type=1326)"
            ),
            SeccompMode::Off => info!("server.seccomp = \"off\": no system-call filter"),
        }
        let _ = shared.seccomp.set(mode);
        Ok(())
    });
    if let Err(e) = confined {
        stop(&shared, nts_ke, backend, metrics, control, phc_thread);
        return Err(e);
    }

    info!("chimed {} serving", env!("CARGO_PKG_VERSION"));
    let what = backend.describe(&cfg, workers);
    let nts_what = match &nts_ke {
        Some(server) => {
            let addrs: Vec<String> = server.local_addrs().iter().map(ToString::to_string).collect();
            format!("; NTS-KE on {}", addrs.join(", "))
        }
        None => String::new(),
    };
    let clock = control.status();
    let mut phase = clock.load().upstream.phase;
    let mut last_reload = ReloadOutcome::Applied;
    let status = |phase, reload: ReloadOutcome| {
        let reload = match reload {
            ReloadOutcome::Applied => "",
            ReloadOutcome::Refused => "; last reload refused (needs a restart, see the log)",
            ReloadOutcome::Failed => "; last reload failed (see the log)",
        };
        sdnotify::status_line(&format!("serving: {what}{nts_what}; clock {}{reload}", phase_text(phase)))
    };
    notify(notifier, &format!("READY=1\n{}", status(phase, last_reload)));
    let mut ages = Vec::with_capacity(shared.workers.len() + 1);
    let mut watchdog = sdnotify::watchdog_period_from_env().map(|period| {
        info!(period_ms = period.as_millis() as u64, "pinging systemd's watchdog while every thread makes progress");
        Watchdog::new(period, Instant::now())
    });
    let mut running = cfg;
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if hup.swap(false, Ordering::Relaxed) {
            notify(notifier, &sdnotify::reloading_message());
            let live = Live { shared: &shared, control: &control, backend: &mut backend, nts_ke: &mut nts_ke };
            last_reload = reload(&mut running, reread, live);
            shared.count_reload(last_reload);
            // Serving goes on whatever the outcome (a refused or failed
            // reload changes nothing).
            notify(notifier, &format!("READY=1\n{}", status(phase, last_reload)));
        }
        if let Running::Xdp(b) = &mut backend {
            b.tick();
        }
        let now_phase = clock.load().upstream.phase;
        if now_phase != phase {
            phase = now_phase;
            notify(notifier, &status(phase, last_reload));
        }
        if let Some(w) = &mut watchdog {
            let now = Instant::now();
            heartbeat_ages(&shared, now, &mut ages);
            match w.tick(&ages, now) {
                WatchdogAction::Wait => {}
                WatchdogAction::Ping => notify(notifier, "WATCHDOG=1"),
                WatchdogAction::Recovered => {
                    info!("every thread makes progress again; watchdog pings resume");
                    notify(notifier, &format!("WATCHDOG=1\n{}", status(phase, last_reload)));
                }
                WatchdogAction::Withheld(stuck) => {
                    let names: Vec<String> = stuck.iter().map(|&i| heartbeat_name(&shared, i)).collect();
                    let names = names.join(", ");
                    error!(
                        stuck = %names,
                        "no progress for {:?}: withholding watchdog pings, so systemd restarts chimed",
                        w.stall_after()
                    );
                    notify(notifier, &sdnotify::status_line(&format!("stuck: {names}; watchdog pings withheld")));
                }
            }
        }
    }
    info!("shutting down");
    notify(notifier, &format!("STOPPING=1\n{}", sdnotify::status_line("shutting down")));
    stop(&shared, nts_ke, backend, metrics, control, phc_thread);
    info!("stopped");
    Ok(())
}

/// Stops whatever `serve` has started so far, the same way whether it ends
/// normally or a later start-up step failed: raise the shutdown flag, close
/// the NTS-KE listener (no new cookies), then wait for the packet workers,
/// the metrics endpoint, the control thread and the PHC reader to return.
fn stop(
    shared: &Shared,
    nts_ke: Option<NtsKeServer>,
    backend: Running,
    metrics: Option<metrics::MetricsServer>,
    control: ControlHandle,
    phc_thread: Option<std::thread::JoinHandle<()>>,
) {
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
}

/// The ages of the heartbeats the watchdog watches: each worker's, then the
/// control thread's.
fn heartbeat_ages(shared: &Shared, now: Instant, out: &mut Vec<Duration>) {
    out.clear();
    out.extend(shared.workers.iter().map(|w| w.heartbeat_age(now)));
    out.push(shared.control_heartbeat.age(now));
}

/// The thread behind heartbeat `i` of [`heartbeat_ages`].
fn heartbeat_name(shared: &Shared, i: usize) -> String {
    if i < shared.workers.len() { format!("worker {i}") } else { "control thread".to_owned() }
}

/// The clock state in a few words, for systemd's `STATUS=` line.
fn phase_text(phase: Phase) -> &'static str {
    match phase {
        Phase::Synchronized => "synchronized",
        Phase::Holdover => "in holdover (upstream lost)",
        Phase::LocalFallback => "local (local_stratum, upstream lost)",
        Phase::Unsynchronized => "unsynchronized",
    }
}
