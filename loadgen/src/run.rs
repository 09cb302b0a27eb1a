//! The command line and the run: resolve the target, NTS-KE if asked,
//! start the threads for each step (a fixed rate, or a ramp), show
//! progress, and report.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;

use crate::nts::{self, Session};
use crate::plot;
use crate::request::{Invalid, KindArg, PollPattern};
use crate::stats::{Counts, Latency, StepReport};
use crate::worker::{Io, Live, UdpWorker, Worker, WorkerConfig, now_ns};
use crate::xdp::{self, SourcePrefix, XdpOptions, XdpReport};

/// chime-load: an open-loop NTP/NTS load generator.
///
/// Sends requests at a fixed rate (or along a ramp), validates every reply,
/// and reports loss, KoD, invalid replies and latency percentiles.
///
/// Only point it at servers you run: loopback, or addresses inside network
/// namespaces you made yourself. The AF_XDP transport (--xdp) sends raw
/// frames with spoofed source addresses from --src-prefix: use it only
/// towards addresses inside test namespaces you made (it runs only inside a
/// namespace made with `ip netns add`).
#[derive(Debug, Parser)]
#[command(name = "chime-load", version)]
pub struct Args {
    /// Target server: HOST, HOST:PORT, IP, IP:PORT or [IPv6]:PORT (port 123
    /// by default).
    #[arg(value_name = "SERVER[:PORT]")]
    pub server: String,
    /// Requests per second (the start rate with --ramp).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds to send for (without --ramp).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Simulated clients. UDP: distinct sockets (source ports), at least
    /// one per thread (default 1). --xdp: distinct (address, port) pairs
    /// from --src-prefix, up to 16777216 (default: one per address of the
    /// prefix, at most 1000000).
    #[arg(long)]
    pub clients: Option<usize>,
    /// Multiply the rate by --ramp-factor each step until loss reaches
    /// --loss-threshold; report the highest rate below it.
    #[arg(long)]
    pub ramp: bool,
    /// Rate factor per ramp step.
    #[arg(long, default_value_t = 1.25)]
    pub ramp_factor: f64,
    /// Seconds per ramp step.
    #[arg(long, default_value_t = 2.0)]
    pub step_secs: f64,
    /// Loss at which the ramp stops (0.01 = 1 %).
    #[arg(long, default_value_t = 0.01)]
    pub loss_threshold: f64,
    /// Most ramp steps.
    #[arg(long, default_value_t = 40)]
    pub max_steps: u32,
    /// Highest rate the ramp tries.
    #[arg(long)]
    pub max_rate: Option<f64>,
    /// Sender/receiver threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Each client's poll pattern: "even" (round robin: with C clients at
    /// R requests/s every client polls every C/R s), "random" (each request
    /// from a random client: irregular gaps, mean C/R) or "burst:N" (N
    /// requests back to back per client, like iburst, then the next).
    #[arg(long, default_value = "even", value_name = "PATTERN")]
    pub poll_pattern: PollPattern,
    /// What to send.
    #[arg(long, value_enum, default_value_t = KindArg::Plain)]
    pub kind: KindArg,
    /// Same as --kind nts.
    #[arg(long)]
    pub nts: bool,
    /// Seed of --kind fuzz packets: the same seed, threads and request
    /// count send the same packets (default: from the clock; the report
    /// names it).
    #[arg(long)]
    pub seed: Option<u64>,
    /// NTS-KE port on the server.
    #[arg(long, default_value_t = 4460)]
    pub nts_ke_port: u16,
    /// NTS-KE sessions to establish (clients share them round-robin, each
    /// with its own cookie pool).
    #[arg(long, default_value_t = 4)]
    pub nts_ke_sessions: usize,
    /// PEM file of CA certificates trusted for NTS-KE (default: the system
    /// store).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Name to check in the NTS-KE server's certificate (default: SERVER's
    /// host).
    #[arg(long)]
    pub tls_name: Option<String>,
    /// Seconds a request waits for its reply before it counts as lost.
    #[arg(long, default_value_t = 1.0)]
    pub timeout: f64,
    /// Seconds the server's time may differ from local time.
    #[arg(long, default_value_t = 60.0)]
    pub sanity_window: f64,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an SVG plot (offered/answered rate, loss, p99 RTT per step).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    pub no_progress: bool,
    /// Measure only the sending side: a target that answers nothing is not
    /// an error (for checking the generator's own ceiling against a target
    /// that drops everything).
    #[arg(long)]
    pub send_only: bool,
    /// AF_XDP transport: raw frames sent from IFACE (the interface towards
    /// SERVER) with source addresses from --src-prefix, replies taken in by
    /// an XDP program on IFACE. Root only. ONLY towards addresses inside
    /// test namespaces you made: the sources are spoofed. A kernel-stack
    /// server needs a route back, e.g. `ip route add PREFIX via
    /// <this host's address>` in its namespace.
    #[arg(long, value_name = "IFACE", requires = "src_prefix")]
    pub xdp: Option<String>,
    /// Source prefix of the simulated clients for --xdp, e.g.
    /// 198.19.0.0/16 or fdc4:1e:1::/64; no host may own it, and it must be
    /// of SERVER's family.
    #[arg(long, value_name = "PREFIX", requires = "xdp")]
    pub src_prefix: Option<String>,
    /// --xdp: queues of IFACE to bind (default: all; replies arriving on
    /// another queue are lost).
    #[arg(long, value_name = "N")]
    pub xdp_queues: Option<usize>,
    /// --xdp: the next hop's Ethernet address (default: the kernel's
    /// neighbour entry for SERVER or its gateway).
    #[arg(long, value_name = "MAC")]
    pub xdp_dst_mac: Option<String>,
    /// --xdp: how to attach the XDP program.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    /// --xdp: run outside a network namespace made with `ip netns add`.
    /// Dangerous: spoofed-source floods must not reach a real network.
    #[arg(long)]
    pub dangerous_xdp_outside_netns: bool,
}

/// `--xdp-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeArg {
    /// Native, else generic.
    Auto,
    /// In the driver.
    Native,
    /// Generic (skb) mode.
    Generic,
}

/// Why a run failed, and its exit code.
#[derive(Debug)]
pub struct Failure {
    /// What to tell the user.
    pub message: String,
    /// 2 for usage errors, 1 for everything else.
    pub code: i32,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Self { message: message.into(), code: 2 }
    }
    fn run(message: impl Into<String>) -> Self {
        Self { message: message.into(), code: 1 }
    }
}

/// The whole run's report (`--json`).
#[derive(Debug, Serialize)]
pub struct Report {
    /// The target as resolved.
    pub target: String,
    /// Transport used.
    pub transport: &'static str,
    /// Request kind.
    pub kind: KindArg,
    /// Threads.
    pub threads: usize,
    /// Simulated clients.
    pub clients: usize,
    /// Each client's poll pattern (`--poll-pattern`).
    pub poll_pattern: String,
    /// Whether this was a ramp.
    pub ramp: bool,
    /// Loss threshold of the ramp.
    pub loss_threshold: f64,
    /// The highest offered rate with loss below the threshold (ramp), or
    /// the rate if the fixed-rate run stayed below it.
    pub highest_rate_below_threshold: Option<f64>,
    /// Why the ramp stopped.
    pub stop_reason: String,
    /// Every step.
    pub steps: Vec<StepReport>,
    /// The AF_XDP transport's side (with --xdp).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp: Option<XdpReport>,
    /// The seed of the --kind fuzz packets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// What makes the run fail though the target answered: replies longer
    /// than their request (chime-load then exits with 1).
    pub failures: Vec<String>,
}

/// Splits SERVER[:PORT] and resolves it.
pub fn resolve(spec: &str) -> Result<(SocketAddr, String), String> {
    if let Ok(sa) = spec.parse::<SocketAddr>() {
        return Ok((sa, sa.ip().to_string()));
    }
    if let Ok(ip) = spec.parse::<IpAddr>() {
        return Ok((SocketAddr::new(ip, 123), ip.to_string()));
    }
    let (host, port) = match spec.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse::<u16>().map_err(|_| format!("bad port {p:?} in {spec:?}"))?),
        _ => (spec, 123),
    };
    if host.is_empty() {
        return Err(format!("no host in {spec:?}"));
    }
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or(format!("{host:?} has no address"))?;
    Ok((addr, host.trim_start_matches('[').trim_end_matches(']').to_owned()))
}

fn check_args(a: &Args) -> Result<(), Failure> {
    let pos = |v: f64, name: &str| {
        if v.is_finite() && v > 0.0 { Ok(()) } else { Err(Failure::usage(format!("{name} must be above zero"))) }
    };
    pos(a.rate, "--rate")?;
    pos(a.duration, "--duration")?;
    pos(a.step_secs, "--step-secs")?;
    pos(a.timeout, "--timeout")?;
    pos(a.sanity_window, "--sanity-window")?;
    if !(a.ramp_factor.is_finite() && a.ramp_factor > 1.0) {
        return Err(Failure::usage("--ramp-factor must be above 1"));
    }
    if !(a.loss_threshold > 0.0 && a.loss_threshold < 1.0) {
        return Err(Failure::usage("--loss-threshold must be between 0 and 1"));
    }
    if a.threads == 0 || a.threads > 256 {
        return Err(Failure::usage("--threads must be 1 to 256"));
    }
    let max_clients = if a.xdp.is_some() { 1 << 24 } else { 1_000_000 };
    if a.clients.is_some_and(|c| c == 0 || c > max_clients) {
        return Err(Failure::usage(format!("--clients must be 1 to {max_clients}")));
    }
    if a.rate > 1e9 {
        return Err(Failure::usage("--rate above 1e9 is not a rate this generator can offer"));
    }
    if a.xdp.is_none() && (a.xdp_queues.is_some() || a.xdp_dst_mac.is_some() || a.xdp_mode != XdpModeArg::Auto) {
        return Err(Failure::usage("--xdp-queues, --xdp-dst-mac and --xdp-mode need --xdp"));
    }
    if a.xdp_queues.is_some_and(|q| q == 0 || q > 256) {
        return Err(Failure::usage("--xdp-queues must be 1 to 256"));
    }
    if let Some(m) = &a.xdp_dst_mac {
        xdp::parse_mac(m).map_err(Failure::usage)?;
    }
    if let Some(p) = &a.src_prefix {
        SourcePrefix::parse(p).map_err(Failure::usage)?;
    }
    Ok(())
}

/// Sets `stop` on SIGINT/SIGTERM (a second one ends the process at once),
/// so a run stops, reports and, with --xdp, detaches its program.
fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop));
        let _ = signal_hook::flag::register(sig, Arc::clone(&stop));
    }
    stop
}

/// The steps of a run (a fixed rate, or a ramp), the highest rate below
/// the loss threshold, and why it stopped.
struct Steps {
    steps: Vec<StepReport>,
    highest: Option<f64>,
    stop_reason: String,
}

/// Runs chime-load with parsed arguments; prints the summary and writes
/// the files asked for.
pub fn run(args: &Args) -> Result<Report, Failure> {
    check_args(args)?;
    let kind = if args.nts { KindArg::Nts } else { args.kind };
    let (mut target, host) = resolve(&args.server).map_err(Failure::usage)?;
    let mut sessions = Vec::new();
    if kind == KindArg::Nts {
        let tls = nts::tls_config(args.ca.as_deref()).map_err(Failure::run)?;
        let name = args.tls_name.clone().unwrap_or(host);
        let ke_addr = SocketAddr::new(target.ip(), args.nts_ke_port);
        for _ in 0..args.nts_ke_sessions.clamp(1, 64) {
            let s = nts::key_exchange(&tls, &name, ke_addr, target, Duration::from_secs(5)).map_err(Failure::run)?;
            sessions.push(s);
        }
        target = sessions[0].ntp;
    }
    let seed = args.seed.unwrap_or_else(|| now_ns() ^ u64::from(std::process::id()) << 32);
    let cfg = WorkerConfig {
        target,
        kind,
        timeout: Duration::from_secs_f64(args.timeout),
        window: Duration::from_secs_f64(args.sanity_window),
        poll: args.poll_pattern,
        seed,
        max_payload: max_payload(target),
    };
    let stop = stop_on_signals();
    let (transport, threads, clients, steps, xdp_report) = match &args.xdp {
        None => {
            let threads = args.threads;
            let clients = args.clients.unwrap_or(1).max(threads);
            let mut workers = make_workers(&cfg, threads, clients, &sessions)?;
            let steps = drive(args, target, &mut workers, &stop, "")?;
            ("udp", threads, clients, steps, None)
        }
        Some(iface) => {
            let (opts, clients) = xdp_options(args, iface, target)?;
            let mut setup = xdp::setup(&opts, &cfg, args.threads, clients as u64, &sessions).map_err(Failure::run)?;
            if setup.workers.len() < args.threads {
                eprintln!("chime-load: {} threads, one per queue of {iface}", setup.workers.len());
            }
            let hint = format!(
                " (a kernel-stack server needs a route back: ip route add {} via <this host's address>)",
                opts.prefix.prefix().0
            );
            let steps = drive(args, target, &mut setup.workers, &stop, &hint);
            let report = setup.finish_report();
            let threads = setup.workers.len();
            // Sockets closed, program detached, also when the run failed.
            drop(setup);
            ("xdp", threads, clients, steps?, Some(report))
        }
    };
    let Steps { steps, highest, stop_reason } = steps;
    let longer: u64 = steps.iter().filter_map(|s| s.invalid.get(Invalid::LongerThanRequest.name())).copied().sum();
    let failures = if longer > 0 {
        vec![format!("{longer} replies were longer than their request (amplification)")]
    } else {
        Vec::new()
    };
    let report = Report {
        target: target.to_string(),
        transport,
        kind,
        threads,
        clients,
        poll_pattern: args.poll_pattern.to_string(),
        ramp: args.ramp,
        loss_threshold: args.loss_threshold,
        highest_rate_below_threshold: highest,
        stop_reason,
        steps,
        xdp: xdp_report,
        seed: (kind == KindArg::Fuzz).then_some(seed),
        failures,
    };
    print_summary(&report);
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| Failure::run(format!("JSON: {e}")))?;
        std::fs::write(p, text + "\n").map_err(|e| Failure::run(format!("writing {}: {e}", p.display())))?;
    }
    if let Some(p) = &args.plot {
        let title = format!("chime-load → {} ({:?})", report.target, report.kind);
        let doc = plot::svg(&title, &report.steps, args.loss_threshold);
        std::fs::write(p, doc).map_err(|e| Failure::run(format!("writing {}: {e}", p.display())))?;
    }
    if !report.failures.is_empty() {
        return Err(Failure::run(report.failures.join("; ")));
    }
    Ok(report)
}

/// The largest UDP payload towards `target` on a 1500-byte MTU path, and
/// what a receive slot holds.
fn max_payload(target: SocketAddr) -> usize {
    let headers = if target.is_ipv4() { 20 + 8 } else { 40 + 8 };
    (1500 - headers).min(crate::sys::SLOT)
}

/// The AF_XDP settings from the command line, checked against the target;
/// and the number of clients.
fn xdp_options(args: &Args, iface: &str, target: SocketAddr) -> Result<(XdpOptions, usize), Failure> {
    if !args.dangerous_xdp_outside_netns && xdp::named_netns().is_none() {
        return Err(Failure::usage(
            "--xdp sends spoofed-source frames and runs only inside a test network namespace you made \
             (ip netns add NAME; ip netns exec NAME chime-load ...); this process is not in one listed \
             in /run/netns. On an isolated test network, --dangerous-xdp-outside-netns overrides this",
        ));
    }
    let spec = args.src_prefix.as_deref().unwrap_or_default();
    let prefix = SourcePrefix::parse(spec).map_err(Failure::usage)?;
    if prefix.prefix().0.is_ipv4() != target.is_ipv4() {
        return Err(Failure::usage(format!("--src-prefix {spec} and the target {target} differ in address family")));
    }
    if prefix.contains(target.ip()) {
        return Err(Failure::usage(format!("the target {target} lies inside --src-prefix {spec}")));
    }
    let clients = args.clients.unwrap_or_else(|| prefix.hosts().min(1_000_000) as usize);
    if clients as u64 > prefix.capacity() {
        return Err(Failure::usage(format!(
            "--clients {clients}: --src-prefix {spec} names at most {} (address, port) pairs",
            prefix.capacity()
        )));
    }
    let dst_mac = args.xdp_dst_mac.as_deref().map(xdp::parse_mac).transpose().map_err(Failure::usage)?;
    let mode = match args.xdp_mode {
        XdpModeArg::Auto => chime_ebpf::loader::XdpMode::Auto,
        XdpModeArg::Native => chime_ebpf::loader::XdpMode::Native,
        XdpModeArg::Generic => chime_ebpf::loader::XdpMode::Generic,
    };
    let opts = XdpOptions { iface: iface.to_owned(), queues: args.xdp_queues.unwrap_or(0), prefix, dst_mac, mode };
    Ok((opts, clients))
}

/// Runs the steps (a fixed rate, or the ramp) on `workers`; `hint` is added
/// to the error when the target answers nothing.
fn drive<T: Io>(
    args: &Args,
    target: SocketAddr,
    workers: &mut [Worker<T>],
    stop: &AtomicBool,
    hint: &str,
) -> Result<Steps, Failure> {
    let progress = !args.no_progress && std::io::stderr().is_terminal();
    let mut steps = Vec::new();
    let mut highest = None;
    let stop_reason;
    let mut rate = args.rate;
    let mut step_no = 0u32;
    loop {
        let secs = if args.ramp { args.step_secs } else { args.duration };
        let (counts, lat) = run_step(workers, rate, Duration::from_secs_f64(secs), progress, step_no, stop);
        if !args.send_only && steps.is_empty() && counts.expecting > 0 && counts.replies_seen() == 0 {
            let icmp = if counts.econnrefused > 0 {
                format!(" (ICMP port unreachable seen {} times: nothing listens on that port)", counts.econnrefused)
            } else {
                hint.to_owned()
            };
            return Err(Failure::run(format!(
                "{target} answered none of {} requests{icmp}; is an NTP server running there?",
                counts.sent
            )));
        }
        let report = StepReport::new(rate, &counts, &lat);
        if args.ramp {
            eprintln!(
                "step {:>2}: offered {:>10.0}/s sent {:>10.0}/s answered {:>10.0}/s loss {:>6.2} % p99 RTT {:>8.1} µs",
                step_no + 1,
                report.offered_rate,
                report.sent_rate,
                report.answered_rate,
                report.loss * 100.0,
                report.rtt.p99_us
            );
        }
        let ok = report.loss < args.loss_threshold;
        let limited = report.generator_limited;
        steps.push(report);
        if stop.load(Ordering::Relaxed) {
            highest = (ok && !args.ramp).then_some(rate).or(highest);
            stop_reason = "interrupted".to_owned();
            break;
        }
        if !args.ramp {
            highest = ok.then_some(rate);
            stop_reason = "fixed rate".to_owned();
            break;
        }
        if !ok {
            stop_reason = format!("loss reached {:.2} % at {rate:.0}/s", steps[steps.len() - 1].loss * 100.0);
            break;
        }
        if limited {
            highest = Some(rate);
            stop_reason = format!("the generator could not offer {rate:.0}/s (add --threads)");
            break;
        }
        highest = Some(rate);
        step_no += 1;
        let next = rate * args.ramp_factor;
        if step_no >= args.max_steps || args.max_rate.is_some_and(|m| next > m) {
            stop_reason = "reached --max-steps or --max-rate".to_owned();
            break;
        }
        rate = next;
    }
    Ok(Steps { steps, highest, stop_reason })
}

fn make_workers(
    cfg: &WorkerConfig,
    threads: usize,
    clients: usize,
    sessions: &[Session],
) -> Result<Vec<UdpWorker>, Failure> {
    let mut out = Vec::with_capacity(threads);
    let mut first = 0;
    for t in 0..threads {
        let n = clients / threads + usize::from(t < clients % threads);
        out.push(UdpWorker::udp(cfg.clone(), t, n, first, sessions).map_err(Failure::run)?);
        first += n;
    }
    Ok(out)
}

fn run_step<T: Io>(
    workers: &mut [Worker<T>],
    rate: f64,
    duration: Duration,
    progress: bool,
    step: u32,
    stop: &AtomicBool,
) -> (Counts, Latency) {
    let per_thread = rate / workers.len() as f64;
    let live: Vec<Live> = workers.iter().map(|_| Live::default()).collect();
    let start_ns = now_ns() + 2_000_000;
    let mut counts = Counts::default();
    let mut lat = Latency::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter_mut()
            .zip(&live)
            .map(|(w, l)| s.spawn(move || w.run_step(per_thread, duration, start_ns, l, stop)))
            .collect();
        let t0 = Instant::now();
        let mut last = Instant::now();
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            if progress && last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                let sent: u64 = live.iter().map(|l| l.sent.load(Ordering::Relaxed)).sum();
                let valid: u64 = live.iter().map(|l| l.valid.load(Ordering::Relaxed)).sum();
                let el = t0.elapsed().as_secs_f64();
                eprint!(
                    "\r[step {}] {el:>5.1}/{:.0} s  sent {sent:>10} ({:>9.0}/s)  answered {valid:>10}   ",
                    step + 1,
                    duration.as_secs_f64(),
                    sent as f64 / el.max(1e-3)
                );
            }
        }
        if progress {
            eprint!("\r{:100}\r", "");
        }
        for h in handles {
            match h.join() {
                Ok((c, l)) => {
                    counts.merge(&c);
                    lat.merge(&l);
                }
                Err(p) => std::panic::resume_unwind(p),
            }
        }
    });
    (counts, lat)
}

fn print_summary(r: &Report) {
    let mut o = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        o,
        "chime-load: {} {:?} via {}, {} threads, {} clients",
        r.target, r.kind, r.transport, r.threads, r.clients
    );
    let Some(s) = r.steps.last() else { return };
    if r.ramp {
        match r.highest_rate_below_threshold {
            Some(h) => {
                let _ = writeln!(
                    o,
                    "highest rate with loss < {:.2} %: {h:.0}/s ({})",
                    r.loss_threshold * 100.0,
                    r.stop_reason
                );
            }
            None => {
                let _ = writeln!(o, "no step had loss < {:.2} % ({})", r.loss_threshold * 100.0, r.stop_reason);
            }
        }
        let _ = writeln!(o, "last step:");
    }
    let _ = writeln!(
        o,
        "  offered {:.0}/s, sent {} in {:.2} s ({:.0}/s){}",
        s.offered_rate,
        s.sent,
        s.duration_secs,
        s.sent_rate,
        if s.generator_limited { " — generator-limited" } else { "" }
    );
    let _ = writeln!(
        o,
        "  answered {} of {} ({:.0}/s), loss {:.3} %, late {}, timeouts {}",
        s.valid,
        s.expecting,
        s.answered_rate,
        s.loss * 100.0,
        s.late,
        s.timeouts
    );
    if !s.kod.is_empty() {
        let _ = writeln!(o, "  KoD: {:?}", s.kod);
    }
    if !s.invalid.is_empty() {
        let _ = writeln!(o, "  invalid: {:?}", s.invalid);
    }
    if s.unsynchronized > 0 {
        let _ = writeln!(o, "  replies saying unsynchronized: {}", s.unsynchronized);
    }
    if s.interleaved_basic + s.interleaved_interleaved > 0 {
        let _ = writeln!(
            o,
            "  interleaved requests: {} basic replies, {} interleaved",
            s.interleaved_basic, s.interleaved_interleaved
        );
    }
    for (title, map) in [("adversarial", &s.adversarial), ("fuzz", &s.fuzz)] {
        if !map.is_empty() {
            let _ = writeln!(o, "  {title} (sent/replies):");
            for (k, v) in map {
                let _ = writeln!(o, "    {k:<13} {:>10} {:>8}", v.sent, v.replies);
            }
        }
    }
    if let Some(seed) = r.seed {
        let _ = writeln!(o, "  fuzz seed {seed}; reply lengths checked {}", s.length_checked);
    }
    for f in &r.failures {
        let _ = writeln!(o, "  FAILED: {f}");
    }
    if r.kind == KindArg::Nts {
        let _ = writeln!(o, "  NTS: {} fresh cookies, {} requests reused a cookie", s.nts_cookies, s.nts_cookie_reuse);
    }
    if s.econnrefused + s.send_errors + s.send_would_block > 0 {
        let _ = writeln!(
            o,
            "  ICMP unreachable {}, send errors {}, send buffer full {}",
            s.econnrefused, s.send_errors, s.send_would_block
        );
    }
    let p = |name: &str, x: &crate::stats::Percentiles, o: &mut String| {
        let _ = writeln!(
            o,
            "  {name:<10} p50 {:>9.1} µs  p90 {:>9.1}  p99 {:>9.1}  p99.9 {:>9.1}  max {:>9.1}",
            x.p50_us, x.p90_us, x.p99_us, x.p999_us, x.max_us
        );
    };
    p("RTT", &s.rtt, &mut o);
    p("residence", &s.residence, &mut o);
    if let Some(x) = &r.xdp {
        let program: Vec<String> = x.program.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            o,
            "  AF_XDP on {} ({} XDP, {} queues {}), clients from {}: program {}; replies passed between threads {}",
            x.interface,
            x.attach_mode,
            x.bind_modes.len(),
            x.bind_modes.join("/"),
            x.src_prefix,
            program.join(", "),
            x.forwarded
        );
        if x.rx_dropped + x.rx_ring_full + x.tx_invalid_descs + s.stray > 0 {
            let _ = writeln!(
                o,
                "  AF_XDP losses: kernel dropped {} (RX ring full {}), invalid TX descriptors {}, stray frames {}",
                x.rx_dropped, x.rx_ring_full, x.tx_invalid_descs, s.stray
            );
        }
    }
    print!("{o}");
}

/// Parses the process arguments and runs; returns the exit code.
pub fn main_exit() -> i32 {
    let args = Args::parse();
    match run(&args) {
        Ok(_) => 0,
        Err(f) => {
            eprintln!("chime-load: {}", f.message);
            f.code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_forms() {
        assert_eq!(resolve("127.0.0.1").unwrap().0, "127.0.0.1:123".parse().unwrap());
        assert_eq!(resolve("127.0.0.1:4123").unwrap().0, "127.0.0.1:4123".parse().unwrap());
        assert_eq!(resolve("::1").unwrap().0, "[::1]:123".parse().unwrap());
        assert_eq!(resolve("[::1]:99").unwrap().0, "[::1]:99".parse().unwrap());
        let (a, host) = resolve("localhost:124").unwrap();
        assert_eq!((a.port(), host.as_str()), (124, "localhost"));
        assert!(resolve("localhost:notaport").is_err());
        assert!(resolve("no-such-host.invalid").is_err());
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        let parse = |extra: &[&str]| {
            let mut v = vec!["chime-load", "127.0.0.1"];
            v.extend_from_slice(extra);
            check_args(&Args::parse_from(v))
        };
        assert!(parse(&[]).is_ok());
        for bad in [
            &["--rate", "0"][..],
            &["--rate=-5"],
            &["--ramp-factor", "1"],
            &["--loss-threshold", "1.5"],
            &["--threads", "0"],
            &["--clients", "0"],
            &["--xdp", "veth0", "--src-prefix", "10.0.0.0/33"],
            &["--xdp", "veth0", "--src-prefix", "10.0.0.0"],
            &["--xdp-queues", "2"],
            &["--xdp", "veth0", "--src-prefix", "10.0.0.0/16", "--xdp-dst-mac", "02:00:00:00:01"],
            &["--xdp", "veth0", "--src-prefix", "10.0.0.0/16", "--xdp-queues", "0"],
            &["--xdp", "veth0", "--src-prefix", "10.0.0.0/16", "--clients", "16777217"],
            &["--clients", "1000001"],
        ] {
            assert_eq!(parse(bad).unwrap_err().code, 2, "{bad:?}");
        }
    }

    #[test]
    fn json_shape() {
        let r = Report {
            target: "127.0.0.1:123".into(),
            transport: "udp",
            kind: KindArg::Plain,
            threads: 1,
            clients: 1,
            poll_pattern: "even".into(),
            ramp: true,
            loss_threshold: 0.01,
            highest_rate_below_threshold: Some(1000.0),
            stop_reason: "x".into(),
            steps: vec![StepReport::new(1000.0, &Counts::default(), &Latency::default())],
            xdp: None,
            seed: None,
            failures: Vec::new(),
        };
        let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(v["kind"], "plain");
        assert_eq!(v["highest_rate_below_threshold"], 1000.0);
        let s = &v["steps"][0];
        for key in ["offered_rate", "sent", "valid", "loss", "kod", "invalid", "adversarial", "generator_limited"] {
            assert!(!s[key].is_null(), "{key}");
        }
        for key in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
            assert!(s["rtt"][key].is_number() && s["residence"][key].is_number(), "{key}");
        }
    }
}
