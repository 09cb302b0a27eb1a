//! The socket backend: the [`Responder`] over ordinary UDP sockets, so chimed
//! runs anywhere, unprivileged.
//!
//! Every worker is one thread, pinned to one core, with one socket per
//! listen address. The sockets of an address form a `SO_REUSEPORT` group,
//! bound in worker order, with a classic BPF program steering each client
//! (by source address only) to the same worker, whose rate limiter thus sees
//! all of that client's requests. A worker receives a batch with
//! `recvmmsg`, loads the clock snapshot and ACL once, answers each datagram
//! into the send batch in place, sends the batch with `sendmmsg` and
//! publishes its counters: no lock, allocation or log line per packet.
//!
//! [`start`] binds every socket before it returns, so the caller can drop
//! privileges afterwards; workers stop within [`POLL_TIMEOUT`] of
//! `Shared::shutdown` being set, and [`SocketBackend::join`] waits for them.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chime_proto::nts::AesCtrNonces;
use chime_proto::{
    Action, Context, NtpTimestamp, ReplyStamps, RequestMeta, Responder, ResponderConfig, RxTimestamp, StampKind,
};
use tracing::{info, warn};

use crate::phc;
use crate::ratelimited::PrefixWindow;
use crate::residence::{Residence, ResidenceKind};
use crate::shared::{BackendInfo, Shared};
use crate::stats::{IoEvent, TxStampKind, WorkerStats};
use crate::sys::random::random_u64;
use crate::sys::udp::{
    BatchSocket, MAX_BATCH, PollSet, RecvBatch, SendBatch, SocketOptions, TimestampMode, TxStamp, TxStampBatch,
};
use crate::time::now_ntp;

/// Replies per socket whose transmit stamp may still be outstanding (a
/// ring indexed by the stamp's `OPT_ID` key).
const TX_PENDING: usize = 4096;
/// Error-queue reads per drain at most.
const TX_DRAIN_ROUNDS: usize = 4;
/// A transmit stamp is believed only this long after the reply's T2 …
const TX_STAMP_MAX_NS: i64 = 1_000_000_000;
/// … and no earlier than this before the transmit time written into it
/// (which is read just before sending, so the stamp should be later).
const TX_STAMP_EARLY_NS: i64 = 1_000_000;

/// How long an idle worker sleeps in `poll` before it looks at the shutdown
/// flag and republishes its counters.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(100);

/// Batches a worker takes from one socket before it turns to the next (and
/// checks the shutdown flag), so one busy address cannot starve another.
const BATCHES_PER_SOCKET: usize = 16;

/// At most one error log line per worker per this interval.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Settings of the socket backend.
#[derive(Clone, Debug, PartialEq)]
pub struct SocketBackendConfig {
    /// Addresses to listen on; each worker gets a socket for each. Port 0
    /// binds the first socket to an ephemeral port and the rest to the same.
    pub listen: Vec<SocketAddr>,
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Cores to pin workers to, worker `i` to `cores[i % len]`; empty pins
    /// worker `i` to available core `i % n`.
    pub cores: Vec<usize>,
    /// Datagrams per `recvmmsg`/`sendmmsg` (1 to [`MAX_BATCH`]).
    pub batch_size: usize,
    /// Settings of every worker's responder.
    pub responder: ResponderConfig,
    /// Socket buffer sizes.
    pub socket: SocketOptions,
}

impl Default for SocketBackendConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 123)), SocketAddr::from(([0u16; 8], 123))],
            workers: 1,
            cores: Vec::new(),
            batch_size: 64,
            responder: ResponderConfig::default(),
            socket: SocketOptions { tx_timestamps: true, ..SocketOptions::default() },
        }
    }
}

/// Why the socket backend did not start or did not finish cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// No listen address configured.
    #[error("no listen address configured")]
    NoListenAddress,
    /// The same listen address twice (its sockets would form one group).
    #[error("listen address {0} configured twice")]
    DuplicateListenAddress(SocketAddr),
    /// Zero workers.
    #[error("the socket backend needs at least one worker")]
    NoWorkers,
    /// A batch size outside 1..=MAX_BATCH.
    #[error("batch size {0} is outside 1..={MAX_BATCH}")]
    BatchSize(usize),
    /// `Shared::workers` does not have one entry per worker.
    #[error("{workers} workers configured but the shared state has statistics for {stats}")]
    StatsMismatch {
        /// Workers configured.
        workers: usize,
        /// Entries in `Shared::workers`.
        stats: usize,
    },
    /// Creating or binding a socket failed (address in use, permission to
    /// bind a port below 1024, address not on this host, …).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The OS random number generator failed.
    #[error("cannot seed the responders: {0}")]
    Random(#[source] io::Error),
    /// A worker thread could not be started.
    #[error("cannot start worker {worker}: {source}")]
    Spawn {
        /// The worker.
        worker: usize,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A worker thread panicked.
    #[error("worker {0} panicked")]
    WorkerPanicked(usize),
}

/// One listen address as bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    /// The bound address (the actual port if 0 was configured).
    pub addr: SocketAddr,
    /// Whether every client of this address reaches one worker: the
    /// steering program is attached, or there is only one worker.
    pub client_steering: bool,
}

/// The running socket backend. Dropping it without [`Self::join`] also
/// stops its workers (they finish on their own within [`POLL_TIMEOUT`]).
#[derive(Debug)]
pub struct SocketBackend {
    threads: Vec<JoinHandle<()>>,
    listeners: Vec<Listener>,
    stop: Arc<AtomicBool>,
}

impl SocketBackend {
    /// The addresses listened on, in configuration order.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// Waits for every worker to finish (set `Shared::shutdown` first).
    pub fn join(mut self) -> Result<(), BackendError> {
        let mut result = Ok(());
        for (i, t) in std::mem::take(&mut self.threads).into_iter().enumerate() {
            if t.join().is_err() && result.is_ok() {
                result = Err(BackendError::WorkerPanicked(i));
            }
        }
        result
    }
}

impl SocketBackendConfig {
    /// The core worker `worker` is pinned to (`None` if the available cores
    /// cannot be read), for building its `WorkerStats`.
    pub fn core_for_worker(&self, worker: usize) -> Option<usize> {
        if self.cores.is_empty() {
            let ids = core_affinity::get_core_ids()?;
            (!ids.is_empty()).then(|| ids[worker % ids.len()].id)
        } else {
            Some(self.cores[worker % self.cores.len()])
        }
    }

    fn validate(&self, shared: &Shared) -> Result<(), BackendError> {
        if self.listen.is_empty() {
            return Err(BackendError::NoListenAddress);
        }
        let mut seen = HashSet::new();
        if let Some(dup) = self.listen.iter().find(|a| !seen.insert(**a)) {
            return Err(BackendError::DuplicateListenAddress(*dup));
        }
        if self.workers == 0 {
            return Err(BackendError::NoWorkers);
        }
        if !(1..=MAX_BATCH).contains(&self.batch_size) {
            return Err(BackendError::BatchSize(self.batch_size));
        }
        if shared.workers.len() != self.workers {
            return Err(BackendError::StatsMismatch { workers: self.workers, stats: shared.workers.len() });
        }
        Ok(())
    }
}

/// Binds every socket and starts the workers. `shared.workers` must hold
/// one `WorkerStats` per worker, in worker order.
pub fn start(cfg: SocketBackendConfig, shared: Arc<Shared>) -> Result<SocketBackend, BackendError> {
    cfg.validate(&shared)?;
    let n = cfg.workers;

    // Bind address by address, worker by worker: socket i of each reuseport
    // group belongs to worker i, which is what the steering program counts on.
    let mut sockets: Vec<Vec<BatchSocket>> = (0..n).map(|_| Vec::with_capacity(cfg.listen.len())).collect();
    let mut listeners = Vec::with_capacity(cfg.listen.len());
    for &configured in &cfg.listen {
        let bind = |addr| BatchSocket::bind(addr, &cfg.socket).map_err(|source| BackendError::Bind { addr, source });
        let first = bind(configured)?;
        let addr = first.local_addr();
        check_socket(&first, &cfg.socket);
        sockets[0].push(first);
        for worker in sockets.iter_mut().skip(1) {
            worker.push(bind(addr)?);
        }
        let client_steering = n == 1
            || match sockets[0].last().map(|s| s.attach_client_steering(n)) {
                Some(Ok(())) => true,
                Some(Err(e)) => {
                    warn!(%addr, error = %e, "cannot attach the client-steering program; the kernel's 4-tuple hash \
                        spreads a client's source ports over workers, weakening per-client rate limiting");
                    false
                }
                None => false,
            };
        listeners.push(Listener { addr, client_steering });
    }

    let seeds = (0..n).map(|_| random_u64()).collect::<Result<Vec<u64>, _>>().map_err(BackendError::Random)?;
    let nonce_seeds = (0..n)
        .map(|_| chime_nts_ke::os_random::<32>())
        .collect::<Result<Vec<[u8; 32]>, _>>()
        .map_err(BackendError::Random)?;
    let cores: Vec<Option<usize>> = (0..n).map(|i| cfg.core_for_worker(i)).collect();
    info!(
        workers = n,
        cores = ?cores,
        addresses = ?listeners.iter().map(|l| l.addr).collect::<Vec<_>>(),
        client_steering = listeners.iter().all(|l| l.client_steering),
        batch_size = cfg.batch_size,
        "socket backend starting"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(n);
    for (i, (((socks, seed), nonce_seed), core)) in
        sockets.into_iter().zip(seeds).zip(nonce_seeds).zip(cores).enumerate()
    {
        let setup = WorkerSetup {
            index: i,
            core,
            sockets: socks,
            seed,
            nonce_seed,
            responder: cfg.responder.clone(),
            batch_size: cfg.batch_size,
            shared: Arc::clone(&shared),
            stop: Arc::clone(&stop),
        };
        match std::thread::Builder::new().name(format!("chime-worker-{i}")).spawn(move || setup.run()) {
            Ok(t) => threads.push(t),
            Err(source) => {
                stop.store(true, Ordering::Relaxed);
                for t in threads {
                    let _ = t.join();
                }
                return Err(BackendError::Spawn { worker: i, source });
            }
        }
    }
    shared.backend.store(Some(Arc::new(BackendInfo {
        backend: "socket",
        queues: vec![None; n],
        xdp_bind: vec![""; n],
        ..BackendInfo::default()
    })));
    Ok(SocketBackend { threads, listeners, stop })
}

impl Drop for SocketBackend {
    /// Dropping the backend without joining stops its workers (they finish
    /// on their own, within [`POLL_TIMEOUT`]).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Logs once, for the first socket of an address, what the kernel made of
/// the socket options.
fn check_socket(sock: &BatchSocket, opts: &SocketOptions) {
    if sock.timestamping() != TimestampMode::Timestamping {
        warn!(addr = %sock.local_addr(), mode = ?sock.timestamping(), "SO_TIMESTAMPING unavailable; receive stamps are worse");
    }
    // The kernel reports twice what it grants; less than asked means capped.
    if opts.recv_buffer > 0 && sock.recv_buffer() / 2 < opts.recv_buffer {
        warn!(
            requested = opts.recv_buffer,
            granted = sock.recv_buffer() / 2,
            "receive buffer capped; raise net.core.rmem_max or run with CAP_NET_ADMIN"
        );
    }
    if opts.send_buffer > 0 && sock.send_buffer() / 2 < opts.send_buffer {
        warn!(
            requested = opts.send_buffer,
            granted = sock.send_buffer() / 2,
            "send buffer capped; raise net.core.wmem_max or run with CAP_NET_ADMIN"
        );
    }
}

/// What a worker thread is given; it builds the rest (responder, batches)
/// itself, so their memory is allocated on its own core's node.
struct WorkerSetup {
    index: usize,
    core: Option<usize>,
    sockets: Vec<BatchSocket>,
    seed: u64,
    /// Seeds the worker's NTS nonce generator.
    nonce_seed: [u8; 32],
    responder: ResponderConfig,
    batch_size: usize,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

impl WorkerSetup {
    fn run(self) {
        crate::privdrop::drop_thread_capabilities();
        if let Some(id) = self.core
            && !core_affinity::set_for_current(core_affinity::CoreId { id })
        {
            warn!(worker = self.index, core = id, "cannot pin worker to its core");
        }
        let stats = Arc::clone(&self.shared.workers[self.index]);
        let mut responder = Responder::new(self.responder, self.seed);
        responder.set_nonce_source(Box::new(AesCtrNonces::new(&self.nonce_seed)));
        let tx = self.sockets.iter().map(|s| TxTrack::new(s.tx_timestamps())).collect();
        let mut worker = Worker {
            index: self.index,
            poll: PollSet::new(&self.sockets),
            tx,
            tx_stamps: TxStampBatch::new(),
            reply_stamps: vec![None; self.batch_size].into_boxed_slice(),
            residence: Residence::new(),
            prefixes: PrefixWindow::new(Instant::now()),
            sockets: self.sockets,
            responder,
            recv: RecvBatch::new(self.batch_size),
            send: SendBatch::new(self.batch_size),
            shared: self.shared,
            stop: self.stop,
            stats,
            errors: ErrorLog::default(),
            config_seen: 0,
        };
        worker.run();
    }
}

/// The replies of one socket waiting for their transmit stamps: slot
/// `key % TX_PENDING` holds the key and the reply's T2 and written T3.
///
/// Keys: with `explicit` (Linux 6.13+, `SCM_TS_OPT_ID`) every datagram is
/// given its key when queued, so a datagram the kernel refuses cannot shift
/// the numbering; otherwise the kernel counts the datagrams it takes and the
/// worker mirrors that count after each send. Either way a stamp is believed
/// only if it is plausible for its reply (after T3 written, within 1 s of T2).
struct TxTrack {
    enabled: bool,
    explicit: bool,
    next_key: u32,
    pending: Box<[(u32, Option<ReplyStamps>)]>,
}

impl TxTrack {
    fn new(enabled: bool) -> Self {
        let n = if enabled { TX_PENDING } else { 0 };
        let explicit = enabled && crate::sys::udp::explicit_tx_keys();
        Self { enabled, explicit, next_key: 0, pending: vec![(0, None); n].into_boxed_slice() }
    }

    /// Remembers a reply under the next key and returns that key.
    fn push(&mut self, stamps: Option<ReplyStamps>) -> Option<u32> {
        if !self.enabled {
            return None;
        }
        let key = self.next_key;
        self.pending[key as usize % TX_PENDING] = (key, stamps);
        self.next_key = key.wrapping_add(1);
        Some(key)
    }

    /// The stamps of the reply with this key, once, if `t3` fits them.
    fn take(&mut self, key: u32, t3: NtpTimestamp) -> Option<ReplyStamps> {
        let slot = self.pending.get_mut(key as usize % TX_PENDING)?;
        if slot.0 != key {
            return None;
        }
        let st = slot.1.take()?;
        let plausible = (0..=TX_STAMP_MAX_NS).contains(&diff_ns(t3, st.rx)) && diff_ns(t3, st.tx) >= -TX_STAMP_EARLY_NS;
        plausible.then_some(st)
    }
}

/// NTP-format difference `later - earlier` in nanoseconds.
pub(crate) fn diff_ns(later: NtpTimestamp, earlier: NtpTimestamp) -> i64 {
    ((i128::from(later.wrapping_diff(earlier)) * 1_000_000_000) >> 32) as i64
}

struct Worker {
    index: usize,
    tx: Vec<TxTrack>,
    tx_stamps: TxStampBatch,
    /// The stamps of each reply queued in `send`, by position.
    reply_stamps: Box<[Option<ReplyStamps>]>,
    residence: Residence,
    /// When the rate-limited prefixes were last published.
    prefixes: PrefixWindow,
    sockets: Vec<BatchSocket>,
    poll: PollSet,
    responder: Responder,
    recv: RecvBatch,
    send: SendBatch,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    stats: Arc<WorkerStats>,
    errors: ErrorLog,
    /// The configuration generation the responder was last set up for.
    config_seen: u64,
}

impl Worker {
    fn should_stop(&self) -> bool {
        self.shared.shutdown.load(Ordering::Relaxed) || self.stop.load(Ordering::Relaxed)
    }

    fn publish(&mut self) {
        self.stats.publish(self.responder.counters(), &self.responder.limiter_stats());
        self.stats.publish_interleave(&self.responder.interleave_stats());
        self.residence.maybe_publish(&self.stats.residence, false);
        let now = Instant::now();
        self.stats.beat(now);
        self.prefixes.maybe_publish(now, &mut self.responder, &self.stats.rate_limited);
    }

    /// Reads socket `s`'s transmit stamps and hands them to the responder
    /// (interleaved mode) and the residence histogram.
    fn drain_tx_stamps(&mut self, s: usize, phc_offset: Option<i64>) {
        if !self.tx[s].enabled {
            return;
        }
        let (mut hw, mut sw) = (0, 0);
        for _ in 0..TX_DRAIN_ROUNDS {
            let n = match self.sockets[s].recv_tx_stamps(&mut self.tx_stamps) {
                Ok(n) => n,
                Err(e) => {
                    self.errors.report(self.index, "reading transmit stamps failed", &e);
                    break;
                }
            };
            for st in self.tx_stamps.iter() {
                let TxStamp { key, sw_ns, hw_ns } = st;
                let (utc_ns, kind) = match (hw_ns, phc_offset, sw_ns) {
                    (Some(h), Some(off), _) => (h + i128::from(off), TxStampKind::Hardware),
                    (_, _, Some(s)) => (s, TxStampKind::Software),
                    _ => continue,
                };
                match kind {
                    TxStampKind::Hardware => hw += 1,
                    _ => sw += 1,
                }
                let t3 = NtpTimestamp::from_unix_nanos(utc_ns);
                let Some(ReplyStamps { rx: t2, .. }) = self.tx[s].take(key, t3) else { continue };
                self.responder.record_tx(t2, t3);
                self.residence.record(ResidenceKind::Precise, diff_ns(t3, t2));
            }
            if n < crate::sys::udp::TX_STAMP_BATCH {
                break;
            }
        }
        if hw > 0 {
            self.stats.count_tx_stamps(TxStampKind::Hardware, hw);
        }
        if sw > 0 {
            self.stats.count_tx_stamps(TxStampKind::Software, sw);
        }
    }

    fn run(&mut self) {
        // After a round that found datagrams, the next round reads again at
        // once; only an idle worker sleeps in poll.
        let mut busy = false;
        while !self.should_stop() {
            // A reload's new settings, before the next batch (an idle
            // worker takes them at its poll timeout).
            self.shared.apply_responder_config(&mut self.config_seen, &mut self.responder);
            if !busy {
                match self.poll.wait(POLL_TIMEOUT) {
                    Ok(0) => {
                        self.publish();
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.errors.report(self.index, "poll failed", &e);
                        std::thread::sleep(POLL_TIMEOUT);
                        continue;
                    }
                }
            }
            busy = false;
            for s in 0..self.sockets.len() {
                for _ in 0..BATCHES_PER_SOCKET {
                    let full = self.serve_batch(s);
                    busy |= full > 0;
                    if full < self.recv.capacity() {
                        break;
                    }
                }
            }
        }
        self.publish();
        self.residence.maybe_publish(&self.stats.residence, true);
    }

    /// Receives, answers and sends one batch on socket `s`; returns how many
    /// datagrams it received.
    fn serve_batch(&mut self, s: usize) -> usize {
        let phc_offset = phc::current_offset(&self.shared);
        self.drain_tx_stamps(s, phc_offset);
        let sock = &mut self.sockets[s];
        let n = match sock.recv_batch(&mut self.recv) {
            Ok(n) => n,
            Err(e) => {
                self.stats.count_io(IoEvent::RecvError, 1);
                self.errors.report(self.index, "receive failed", &e);
                return 0;
            }
        };
        if n == 0 {
            return 0;
        }

        let clock = self.shared.clock.load();
        let acl = self.shared.acl.load();
        let nts = self.shared.nts.as_ref().map(|n| n.load());
        let ctx = Context { clock: &clock, acl: &acl, nts: nts.as_ref().map(|g| &***g) };
        let mut truncated = 0;
        let mut unstamped = 0;
        for dg in self.recv.iter() {
            if dg.truncated {
                truncated += 1;
                continue;
            }
            let rx = dg.stamp(phc_offset).unwrap_or_else(|| {
                unstamped += 1;
                RxTimestamp { time: now_ntp(), kind: StampKind::Userspace }
            });
            let meta = RequestMeta { source: dg.source, rx };
            let Some(out) = self.send.next_buf() else { break };
            if let Action::Reply(reply) = self.responder.handle(dg.payload, &meta, &ctx, &mut now_ntp, out) {
                let len = reply.len();
                let stamps = self.responder.last_reply();
                if let Some(st) = stamps {
                    self.residence.record(ResidenceKind::Written, diff_ns(st.tx, st.rx));
                }
                let track = &mut self.tx[s];
                if track.explicit {
                    let key = track.push(stamps);
                    self.send.commit_keyed(len, &dg.reply_path(), key);
                } else {
                    if let Some(slot) = self.reply_stamps.get_mut(self.send.len()) {
                        *slot = stamps;
                    }
                    self.send.commit(len, &dg.reply_path());
                }
            }
        }
        drop((clock, acl, nts));

        let queued = self.send.len();
        let sock = &mut self.sockets[s];
        if queued > 0 {
            match sock.send_batch(&mut self.send) {
                Ok(sent) if sent == queued => {}
                Ok(sent) => {
                    self.stats.count_io(IoEvent::SendError, (queued - sent) as u64);
                    if let Some(e) = self.send.take_error() {
                        self.errors.report(self.index, "send failed", &e);
                    }
                }
                Err(e) => {
                    self.stats.count_io(IoEvent::SendError, queued as u64);
                    self.errors.report(self.index, "send failed", &e);
                }
            }
            self.send.clear();
            if !self.tx[s].explicit {
                // The kernel numbered the datagrams it took.
                for i in 0..queued {
                    if self.send.was_sent(i) {
                        let stamps = self.reply_stamps.get(i).copied().flatten();
                        self.tx[s].push(stamps);
                    }
                }
            }
            self.drain_tx_stamps(s, phc_offset);
        }
        if truncated > 0 {
            self.stats.count_io(IoEvent::Truncated, truncated);
        }
        if unstamped > 0 {
            self.stats.count_io(IoEvent::NoTimestamp, unstamped);
        }
        self.publish();
        n
    }
}

/// Rate-limited error logging: one line per [`ERROR_LOG_INTERVAL`], saying
/// how many were suppressed since the last.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn report(&mut self, worker: usize, what: &str, err: &io::Error) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < ERROR_LOG_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        warn!(worker, suppressed = self.suppressed, error = %err, "{what}");
        self.last = Some(now);
        self.suppressed = 0;
    }
}
