//! The XDP backend: chime's XDP program on one interface, one AF_XDP socket
//! and one pinned worker per NIC queue, each answering in place in the
//! request's own UMEM frame (see the module docs of [`super`]).
//!
//! Start-up order, all before [`start`] returns (so the caller can drop
//! privileges afterwards): resolve the interface and its queue count, derive
//! the server addresses, load and attach the program (replacing a stale
//! chime program, refusing a foreign one), create and bind one AF_XDP socket
//! per queue and register it in the program's `xsks` map, then start the
//! workers. [`XdpBackend::join`] (or dropping it) stops the workers, removes
//! the sockets from the map and detaches the program.

use std::cell::Cell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use chime_ebpf::loader::{self, LoadError, LoadOptions, LoadedXdp};
use chime_ebpf::program::{SourceLimit, XdpStats};
use chime_ebpf::xsk::{BindMode, BindOptions, UmemConfig, XSK_TX_METADATA_SIZE, XskQueue, XskQueueConfig};
use chime_ebpf::{ethtool, xsk};
use chime_proto::{Action, Context, NtpTimestamp, RequestMeta, Responder, ResponderConfig, RxTimestamp, StampKind};
use tracing::{info, warn};

use super::frame::{self, build_reply_in_place, parse_request, stage_request};
use super::{StampOffsets, XdpMetaExt, parse_meta, server_addresses, tai_to_utc_ns};
use crate::config::{XdpMode, XdpSection, ZeroCopy};
use crate::phc;
use crate::ratelimited::PrefixWindow;
use crate::residence::{Residence, ResidenceKind};
use crate::shared::{BackendInfo, Shared};
use crate::socket_backend::diff_ns;
use crate::stats::{IoEvent, TxStampKind, WorkerStats, XDP_FRAME_STATES, XdpQueueEvent};
use crate::sys::{ifaddrs, random};
use crate::time::now_ntp;

/// How long an idle worker waits for the RX ring before checking for
/// shutdown and publishing its counters.
const IDLE_WAIT_MS: i32 = 100;
/// A completion stamp is believed only this long after the reply's T2.
const TX_STAMP_MAX_NS: i64 = 1_000_000_000;
/// How often a worker reads its socket's `XDP_STATISTICS` (a syscall).
const KERNEL_STATS_INTERVAL: Duration = Duration::from_secs(1);

/// What the XDP backend needs from the configuration.
#[derive(Clone, Debug)]
pub struct XdpBackendConfig {
    /// The interface the program is attached to.
    pub interface: String,
    /// `server.listen`: explicit addresses, or wildcards meaning every
    /// address of the interface; one port.
    pub listen: Vec<SocketAddr>,
    /// Queues to serve; 0 = the interface's channel count.
    pub queues: usize,
    /// Cores to pin worker i to (`cores[i % len]`); empty = core i % n.
    pub cores: Vec<usize>,
    /// Frames per RX batch.
    pub batch_size: usize,
    /// The `[xdp]` section.
    pub xdp: XdpSection,
    /// Each worker's responder.
    pub responder: ResponderConfig,
    /// Source prefixes the program drops in the kernel (the ACL's deny
    /// rules, when denied clients get silence).
    pub deny: Vec<(IpAddr, u8)>,
    /// The program's per-source flood guard (`None`: off).
    pub source_limit: Option<SourceLimit>,
}

/// Why the XDP backend could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XdpBackendError {
    /// No interface configured.
    #[error("the xdp backend needs server.interface (or --interface)")]
    NoInterface,
    /// The interface does not exist.
    #[error("interface {name:?}: {source}")]
    Interface {
        /// Interface name.
        name: String,
        /// What failed.
        source: io::Error,
    },
    /// The server addresses could not be derived.
    #[error("server addresses on {interface:?}: {reason}")]
    Addresses {
        /// Interface name.
        interface: String,
        /// What is wrong.
        reason: String,
    },
    /// Loading or attaching the XDP program failed.
    #[error("XDP program on {interface:?}: {source}")]
    Program {
        /// Interface name.
        interface: String,
        /// What failed.
        source: LoadError,
    },
    /// An AF_XDP socket could not be created or bound.
    #[error("AF_XDP socket for queue {queue} of {interface:?}: {source}")]
    Socket {
        /// Interface name.
        interface: String,
        /// Queue index.
        queue: u32,
        /// What failed.
        source: io::Error,
    },
    /// `shared.workers` does not have one entry per queue.
    #[error("{stats} worker stats for {queues} queues")]
    StatsMismatch {
        /// Entries in `shared.workers`.
        stats: usize,
        /// Queues served.
        queues: usize,
    },
    /// A worker thread could not be started.
    #[error("cannot start worker thread: {0}")]
    Spawn(io::Error),
    /// The OS random generator failed.
    #[error("cannot read random seed: {0}")]
    Random(io::Error),
}

/// The queue count and interface index [`start`] will use: what the
/// caller needs to create one `WorkerStats` per queue first.
pub fn plan(cfg: &XdpBackendConfig) -> Result<(u32, usize), XdpBackendError> {
    if cfg.interface.is_empty() {
        return Err(XdpBackendError::NoInterface);
    }
    let iface_err = |source| XdpBackendError::Interface { name: cfg.interface.clone(), source };
    let ifindex = ethtool::ifindex(&cfg.interface).map_err(iface_err)?;
    let queues = if cfg.queues > 0 {
        cfg.queues
    } else {
        ethtool::queue_count(&cfg.interface).map_err(iface_err)?.max(1) as usize
    };
    Ok((ifindex, queues))
}

/// The core worker `i` is pinned to.
pub fn core_for_worker(cfg: &XdpBackendConfig, i: usize) -> Option<usize> {
    if cfg.cores.is_empty() {
        let ids = core_affinity::get_core_ids()?;
        (!ids.is_empty()).then(|| ids[i % ids.len()].id)
    } else {
        Some(cfg.cores[i % cfg.cores.len()])
    }
}

/// A running XDP backend.
#[derive(Debug)]
pub struct XdpBackend {
    program: Option<LoadedXdp>,
    workers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    interface: String,
    last_stats: Instant,
}

/// Loads the program, binds the sockets and starts one worker per queue;
/// `shared.workers` must have one entry per queue (see [`plan`]).
pub fn start(cfg: XdpBackendConfig, shared: Arc<Shared>) -> Result<XdpBackend, XdpBackendError> {
    let (ifindex, queues) = plan(&cfg)?;
    if shared.workers.len() != queues {
        return Err(XdpBackendError::StatsMismatch { stats: shared.workers.len(), queues });
    }
    let iface = cfg.interface.clone();
    let addr_err = |reason: String| XdpBackendError::Addresses { interface: iface.clone(), reason };
    let iface_addrs = ifaddrs::interface_addresses(&cfg.interface).map_err(|e| addr_err(e.to_string()))?;
    let (addrs, port) = server_addresses(&cfg.listen, &iface_addrs).map_err(|e| addr_err(e.to_string()))?;
    let v4: Vec<_> = addrs.iter().filter_map(|a| if let IpAddr::V4(a) = a { Some(*a) } else { None }).collect();
    let v6: Vec<_> = addrs.iter().filter_map(|a| if let IpAddr::V6(a) = a { Some(*a) } else { None }).collect();

    let prog_err = |source| XdpBackendError::Program { interface: iface.clone(), source };
    let opts = LoadOptions {
        ifindex,
        mode: match cfg.xdp.mode {
            XdpMode::Native => loader::XdpMode::Native,
            XdpMode::Generic => loader::XdpMode::Generic,
            _ => loader::XdpMode::Auto,
        },
        hw_timestamps: cfg.xdp.hw_timestamps,
        port,
        drop_non_client: cfg.xdp.drop_non_client,
        source_limit: cfg.source_limit,
        source_entries: cfg.xdp.source_table_entries,
        replace_foreign: cfg.xdp.replace_foreign,
    };
    let program = loader::load(&opts).map_err(prog_err)?;
    program.set_servers(&v4, &v6).map_err(prog_err)?;
    program.set_denied(&cfg.deny).map_err(prog_err)?;

    let queue_cfg = XskQueueConfig {
        umem: UmemConfig {
            frame_count: cfg.xdp.frame_count,
            frame_size: cfg.xdp.frame_size,
            fill_size: cfg.xdp.ring_size,
            comp_size: cfg.xdp.ring_size,
            // Room for a TX timestamp request in front of every reply.
            tx_metadata_len: XSK_TX_METADATA_SIZE,
            ..UmemConfig::default()
        },
        bind: BindOptions {
            zero_copy: match cfg.xdp.zero_copy {
                ZeroCopy::Required => xsk::ZeroCopy::Required,
                ZeroCopy::Off => xsk::ZeroCopy::Off,
                _ => xsk::ZeroCopy::Auto,
            },
            need_wakeup: true,
            rx_size: cfg.xdp.ring_size,
            tx_size: cfg.xdp.ring_size,
        },
        rx_meta: true,
        tx_timestamps: true,
    };
    // Kernels before 6.8 refuse a UMEM with TX metadata: then without.
    let plain_cfg =
        XskQueueConfig { umem: UmemConfig { tx_metadata_len: 0, ..queue_cfg.umem }, tx_timestamps: false, ..queue_cfg };
    let mut sockets = Vec::with_capacity(queues);
    for q in 0..queues as u32 {
        let sock_err = |source| XdpBackendError::Socket { interface: iface.clone(), queue: q, source };
        let queue = match XskQueue::new(ifindex, q, queue_cfg) {
            Ok(queue) => queue,
            Err(e) => {
                warn!(queue = q, error = %e, "AF_XDP socket with TX metadata refused; no transmit stamps");
                XskQueue::new(ifindex, q, plain_cfg).map_err(sock_err)?
            }
        };
        program.register_socket(q, queue.socket().as_raw_fd()).map_err(prog_err)?;
        sockets.push(queue);
    }
    let modes: Vec<&str> =
        sockets.iter().map(|q| if q.bind_mode() == BindMode::ZeroCopy { "zero-copy" } else { "copy" }).collect();
    info!(
        interface = %cfg.interface,
        queues,
        attach = ?program.mode(),
        hw_timestamps = program.hw_timestamps(),
        bind = ?modes,
        servers = ?addrs,
        port,
        "xdp backend starting"
    );
    shared.xdp_active.store(true, Ordering::Relaxed);
    let info = BackendInfo {
        backend: "xdp",
        interface: cfg.interface.clone(),
        xdp_attach: match program.mode() {
            loader::XdpMode::Native => "native",
            loader::XdpMode::Generic => "generic",
            _ => "auto",
        }
        .to_owned(),
        queues: (0..queues as u32).map(Some).collect(),
        xdp_bind: modes.clone(),
    };

    let mut backend = XdpBackend {
        program: Some(program),
        workers: Vec::with_capacity(queues),
        shared: Arc::clone(&shared),
        interface: cfg.interface.clone(),
        last_stats: Instant::now(),
    };
    for (i, queue) in sockets.into_iter().enumerate() {
        let seed = random::random_u64().map_err(XdpBackendError::Random)?;
        let mut responder = Responder::new(cfg.responder.clone(), seed);
        let nonce_seed = chime_nts_ke::os_random::<32>().map_err(XdpBackendError::Random)?;
        responder.set_nonce_source(Box::new(chime_proto::nts::AesCtrNonces::new(&nonce_seed)));
        let frames = cfg.xdp.frame_count as usize;
        let worker = Worker {
            index: i,
            core: core_for_worker(&cfg, i),
            frame_size: u64::from(cfg.xdp.frame_size),
            frame_t2: (0..frames).map(|_| Cell::new(0)).collect(),
            completions: Vec::with_capacity(cfg.xdp.ring_size as usize),
            residence: Residence::new(),
            prefixes: PrefixWindow::new(Instant::now()),
            queue,
            responder,
            batch: cfg.batch_size.clamp(1, cfg.xdp.ring_size as usize) as u32,
            shared: Arc::clone(&shared),
            stats: Arc::clone(&shared.workers[i]),
            events: [0; XdpQueueEvent::ALL.len()],
            config_seen: 0,
        };
        let handle = thread::Builder::new()
            .name(format!("chime-xdp-{i}"))
            .spawn(move || worker.run())
            .map_err(XdpBackendError::Spawn)?;
        backend.workers.push(handle);
    }
    backend.publish_program_stats();
    shared.backend.store(Some(Arc::new(info)));
    Ok(backend)
}

impl XdpBackend {
    /// Copies the program's counters into `shared` (call about once a
    /// second from the main thread).
    pub fn publish_program_stats(&mut self) {
        let Some(program) = &self.program else { return };
        match program.stats() {
            Ok(stats) => store_program_stats(&self.shared, &stats),
            Err(e) => warn!(error = %e, "cannot read the XDP program's counters"),
        }
        self.last_stats = Instant::now();
    }

    /// Refreshes the program's counters if a second has passed.
    pub fn tick(&mut self) {
        if self.last_stats.elapsed() >= KERNEL_STATS_INTERVAL {
            self.publish_program_stats();
        }
    }

    /// Replaces the source prefixes the program drops (ACL reload).
    pub fn set_denied(&mut self, deny: &[(IpAddr, u8)]) -> Result<(), LoadError> {
        match &mut self.program {
            Some(p) => p.set_denied(deny),
            None => Ok(()),
        }
    }

    /// Replaces the program's per-source limit (reload; `None`: off).
    pub fn set_source_limit(&mut self, limit: Option<SourceLimit>) -> Result<(), LoadError> {
        match &mut self.program {
            Some(p) => p.set_source_limit(limit),
            None => Ok(()),
        }
    }

    /// Stops the workers (they exit when `shared.shutdown` is set), then
    /// takes the sockets out of the program's map and detaches it.
    pub fn join(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                warn!("an XDP worker panicked");
            }
        }
        if let Some(mut program) = self.program.take() {
            // Final counters, then detach: after this no XDP program of ours
            // is left on the interface.
            if let Ok(stats) = program.stats() {
                store_program_stats(&self.shared, &stats);
            }
            match program.detach() {
                Ok(true) => info!(interface = %self.interface, "XDP program detached"),
                Ok(false) => warn!(interface = %self.interface, "XDP program was already replaced; left alone"),
                Err(e) => warn!(interface = %self.interface, error = %e, "cannot detach the XDP program"),
            }
        }
    }
}

fn store_program_stats(shared: &Shared, stats: &XdpStats) {
    for (counter, n) in stats.iter() {
        if let Some(slot) = shared.xdp_program.get(counter.index() as usize) {
            slot.store(n, Ordering::Relaxed);
        }
    }
}

impl Drop for XdpBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One queue's worker: owns the queue (socket, UMEM, frames) and a
/// responder; shares nothing writable with other threads.
struct Worker {
    index: usize,
    core: Option<usize>,
    frame_size: u64,
    /// Per UMEM frame: the T2 (NTP bits) of the reply last sent in it, so a
    /// transmit completion (which names the frame) finds its reply; 0: none.
    frame_t2: Box<[Cell<u64>]>,
    /// (T2, completion stamp) pairs of one poll, handled after it.
    completions: Vec<(u64, u64)>,
    residence: Residence,
    /// When the rate-limited prefixes were last published.
    prefixes: PrefixWindow,
    queue: XskQueue,
    responder: Responder,
    batch: u32,
    shared: Arc<Shared>,
    stats: Arc<WorkerStats>,
    /// The queue's figures as last published; the kernel's
    /// `XDP_STATISTICS` part is refreshed only about once a second.
    events: [u64; XdpQueueEvent::ALL.len()],
    /// The configuration generation the responder was last set up for.
    config_seen: u64,
}

/// Per-batch figures the worker accumulates outside the responder.
#[derive(Default)]
struct BatchCounts {
    bad_frames: u64,
    unstamped: u64,
}

impl Worker {
    fn run(mut self) {
        crate::privdrop::drop_thread_capabilities();
        if let Some(id) = self.core
            && !core_affinity::set_for_current(core_affinity::CoreId { id })
        {
            warn!(worker = self.index, core = id, "cannot pin XDP worker to its core");
        }
        // The request payload is copied here so the responder can write the
        // reply over it in the frame (a reply is never longer).
        let mut scratch = [0u8; 2048];
        let mut last_kernel_stats = Instant::now() - KERNEL_STATS_INTERVAL;
        let mut errors_logged = 0u32;
        while !self.shared.shutdown.load(Ordering::Relaxed) {
            self.shared.apply_responder_config(&mut self.config_seen, &mut self.responder);
            let clock = self.shared.clock.load();
            let acl = self.shared.acl.load();
            let nts = self.shared.nts.as_ref().map(|n| n.load());
            let ctx = Context { clock: &clock, acl: &acl, nts: nts.as_ref().map(|g| &***g) };
            let offsets = StampOffsets {
                tai_offset_s: self.shared.tai_offset_s.load(Ordering::Relaxed),
                phc_to_utc_ns: phc::current_offset(&self.shared),
            };
            let mut counts = BatchCounts::default();
            let responder = &mut self.responder;
            let residence = &mut self.residence;
            let (frame_t2, frame_size) = (&self.frame_t2, self.frame_size);
            let completions = &mut self.completions;
            completions.clear();
            let slot = |addr: u64| frame_t2.get((addr / frame_size) as usize);
            let result = self.queue.poll_rx_with(
                self.batch,
                |addr, ts| {
                    if let (Some(cell), Some(ts)) = (slot(addr), ts)
                        && completions.len() < completions.capacity()
                    {
                        completions.push((cell.replace(0), ts));
                    }
                },
                |addr, pkt, meta| {
                    let len = answer(responder, &ctx, &offsets, pkt, meta, &mut scratch, &mut counts)?;
                    if let Some(st) = responder.last_reply() {
                        residence.record(ResidenceKind::Written, diff_ns(st.tx, st.rx));
                        if let Some(cell) = slot(addr) {
                            cell.set(st.rx.to_bits());
                        }
                    }
                    Some(len)
                },
            );
            drop((clock, acl, nts));
            self.take_tx_stamps(&offsets);
            let received = match result {
                Ok(st) => st.received,
                Err(e) => {
                    self.stats.count_io(IoEvent::RecvError, 1);
                    if errors_logged < 10 {
                        errors_logged += 1;
                        warn!(worker = self.index, error = %e, "AF_XDP queue error");
                    }
                    0
                }
            };
            if counts.bad_frames > 0 {
                self.stats.count_io(IoEvent::BadFrame, counts.bad_frames);
            }
            if counts.unstamped > 0 {
                self.stats.count_io(IoEvent::NoTimestamp, counts.unstamped);
            }
            self.stats.publish(self.responder.counters(), &self.responder.limiter_stats());
            self.stats.publish_interleave(&self.responder.interleave_stats());
            self.residence.maybe_publish(&self.stats.residence, false);
            let now = Instant::now();
            self.stats.beat(now);
            self.prefixes.maybe_publish(now, &mut self.responder, &self.stats.rate_limited);
            let kernel_due = last_kernel_stats.elapsed() >= KERNEL_STATS_INTERVAL;
            if kernel_due {
                last_kernel_stats = Instant::now();
            }
            self.publish_queue(kernel_due);
            if received == 0 {
                let _ = self.queue.wait(IDLE_WAIT_MS);
            }
        }
        // Give back what is still in flight so the final accounting is
        // exact: reap completions once more.
        let _ = self.queue.reap_completions(|_, _| {});
        self.publish_queue(true);
        self.residence.maybe_publish(&self.stats.residence, true);
    }

    /// Hands the completion stamps of the last poll to the responder
    /// (interleaved mode) and the residence histogram. Zero-copy: the NIC's
    /// clock, through the PHC mapping; copy mode: CLOCK_TAI, less the TAI
    /// offset.
    fn take_tx_stamps(&mut self, offsets: &StampOffsets) {
        let hardware = self.queue.bind_mode() == BindMode::ZeroCopy;
        let mut n = 0;
        for &(t2, ts) in &self.completions {
            let utc_ns = if hardware {
                match offsets.phc_to_utc_ns {
                    Some(off) => i128::from(ts) + i128::from(off),
                    None => continue,
                }
            } else {
                tai_to_utc_ns(ts, offsets.tai_offset_s)
            };
            n += 1;
            if t2 == 0 {
                continue;
            }
            let (t2, t3) = (NtpTimestamp::from_bits(t2), NtpTimestamp::from_unix_nanos(utc_ns));
            // A stamp that does not fit its reply (a wrong TAI offset or PHC
            // mapping) is not served.
            let residence = diff_ns(t3, t2);
            if !(0..=TX_STAMP_MAX_NS).contains(&residence) {
                continue;
            }
            self.responder.record_tx(t2, t3);
            self.residence.record(ResidenceKind::Precise, residence);
        }
        if n > 0 {
            let kind = if hardware { TxStampKind::Hardware } else { TxStampKind::Software };
            self.stats.count_tx_stamps(kind, n);
        }
        self.completions.clear();
    }

    fn publish_queue(&mut self, with_kernel: bool) {
        let c = self.queue.counters();
        let ev = &mut self.events;
        ev[0] = c.rx;
        ev[1] = c.tx;
        ev[2] = c.tx_ring_full;
        ev[3] = c.bad_desc;
        ev[4] = c.tx_kicks;
        ev[5] = c.rx_wakeups;
        if with_kernel && let Ok(k) = self.queue.statistics() {
            ev[6] = k.rx_dropped;
            ev[7] = k.rx_invalid_descs;
            ev[8] = k.tx_invalid_descs;
            ev[9] = k.rx_ring_full;
            ev[10] = k.rx_fill_ring_empty_descs;
            ev[11] = k.tx_ring_empty_descs;
        }
        let f = self.queue.frame_counts();
        let frames = [u64::from(f.free), u64::from(f.fill), u64::from(f.user), u64::from(f.tx)];
        debug_assert_eq!(frames.len(), XDP_FRAME_STATES.len());
        self.stats.publish_xdp(&self.events, &frames);
    }
}

/// Answers one frame in place: the reply length from the packet start, or
/// `None` to drop it (counted by the responder or in `counts`).
fn answer(
    responder: &mut Responder,
    ctx: &Context<'_>,
    offsets: &StampOffsets,
    pkt: &mut [u8],
    meta: Option<&[u8]>,
    scratch: &mut [u8],
    counts: &mut BatchCounts,
) -> Option<usize> {
    let rx = meta.and_then(parse_meta).and_then(|m| m.rx_timestamp(offsets)).unwrap_or_else(|| {
        counts.unstamped += 1;
        RxTimestamp { time: now_ntp(), kind: StampKind::Userspace }
    });
    let req = match parse_request(pkt) {
        Ok(req) => req,
        Err(_) => {
            counts.bad_frames += 1;
            return None;
        }
    };
    let meta = RequestMeta { source: req.src(), rx };
    let (request, slot) = stage_request(pkt, &req, scratch).ok()?;
    let reply_len = match responder.handle(request, &meta, ctx, &mut now_ntp, slot) {
        Action::Reply(reply) => reply.len(),
        Action::Drop(_) => return None,
    };
    match build_reply_in_place(pkt, &req, reply_len) {
        Ok(len) => Some(len),
        Err(_) => {
            counts.bad_frames += 1;
            None
        }
    }
}

/// Error kinds of [`frame`] for logs and tests.
pub fn frame_error_name(e: &frame::FrameError) -> &'static str {
    e.name()
}
