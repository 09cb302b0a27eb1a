//! One sender/receiver thread, and what every transport shares.
//!
//! A thread owns a share of the simulated clients, its own match table,
//! buffers and histograms; threads share nothing but a few relaxed counters
//! for the progress line. [`Worker::run_step`] is the loop, the same for
//! every transport: send what the pacer says is due, take in what arrived,
//! retire timed-out requests, and sleep briefly only when there was nothing
//! to do. [`Core`] is the protocol side, also the same for every transport:
//! which kind to send, the request bytes (the NTP payload), the match table
//! entry, and the validation of every reply. An [`Io`] moves the payloads:
//! [`UdpIo`] here (one connected UDP socket per client, `sendmmsg` /
//! `recvmmsg`), `crate::xdp::XdpIo` over AF_XDP.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chime_proto::NtpTimestamp;
use chime_proto::packet::Header;
use chime_proto::rng::SplitMix64;

use crate::fuzz::{Fuzz, write_fuzz};
use crate::nts::{self, CookiePool, Session, ThreadKeys, UID_LEN};
use crate::request::{
    Adv, Checked, ClientPicker, Invalid, Kind, KindArg, PollPattern, VERSION, check_header, write_adversarial,
    write_client_header,
};
use crate::stats::{Counts, Latency};
use crate::sys::{self, Batch, Epoll, MAX_BATCH};
use crate::table::{Lookup, MatchTable, Pacer};

/// Wall-clock time, ns since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// `ns` since the Unix epoch as NTP timestamp bits.
pub fn ntp_bits(ns: u64) -> u64 {
    NtpTimestamp::from_unix_nanos(i128::from(ns)).to_bits()
}

/// Counters the progress line reads while a step runs.
#[derive(Debug, Default)]
pub struct Live {
    /// Datagrams sent.
    pub sent: AtomicU64,
    /// Valid replies.
    pub valid: AtomicU64,
}

/// Settings every thread shares.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Where requests go.
    pub target: SocketAddr,
    /// What to send.
    pub kind: KindArg,
    /// Per-request timeout.
    pub timeout: Duration,
    /// How far server time may be from local time.
    pub window: Duration,
    /// How requests are spread over the clients.
    pub poll: PollPattern,
    /// Seed of the `--kind fuzz` packets (each thread mixes in its number).
    pub seed: u64,
    /// Largest UDP payload to send (the path's MTU less the headers).
    pub max_payload: usize,
}

/// A request [`Core::build`] wrote and registered.
#[derive(Clone, Copy, Debug)]
pub struct Built {
    /// Payload length.
    pub len: usize,
    /// Its kind.
    pub kind: Kind,
    /// Its match-table slot.
    pub slot: usize,
}

/// An NTS client's session and cookies.
#[derive(Debug)]
struct Pool {
    session: usize,
    cookies: CookiePool,
}

/// One thread's protocol state: kinds, request bytes, NTS keys and cookie
/// pools, interleaved state per client, reply validation. Kept across ramp
/// steps; allocation-free after [`Core::new`].
#[derive(Debug)]
pub struct Core {
    cfg: WorkerConfig,
    clients: usize,
    /// Per client, for interleaved follow-ups: the last T2 from the server
    /// and the local receive time of that reply (NTP bits). Empty unless
    /// interleaved requests are sent.
    prev: Vec<(u64, u64)>,
    /// NTS cookie pools; client `ci` uses `pools[ci % pools.len()]`. Empty
    /// unless NTS requests are sent.
    pools: Vec<Pool>,
    keys: Vec<ThreadKeys>,
    salt: [u8; UID_LEN - 8],
    rng: SplitMix64,
    /// The `--kind fuzz` stream: from the seed, so runs repeat.
    fuzz_rng: SplitMix64,
    picker: ClientPicker,
    batches: u64,
    packets: u64,
}

impl Core {
    /// The state of thread `id` with `clients` clients, the first numbered
    /// `first_client` across threads (for spreading NTS sessions), and at
    /// most `max_pools` NTS cookie pools (one per client up to that).
    pub fn new(
        cfg: WorkerConfig,
        id: usize,
        clients: usize,
        first_client: usize,
        sessions: &[Session],
        max_pools: usize,
    ) -> Self {
        let clients = clients.max(1);
        let prev =
            if matches!(cfg.kind, KindArg::Interleaved | KindArg::Mix) { vec![(0, 0); clients] } else { Vec::new() };
        let npools = if sessions.is_empty() { 0 } else { clients.min(max_pools.max(1)) };
        let pools = (0..npools)
            .map(|i| {
                let session = (first_client + i) % sessions.len();
                let mut cookies = CookiePool::default();
                for c in &sessions[session].cookies {
                    cookies.push(c);
                }
                Pool { session, cookies }
            })
            .collect();
        let mut rng = SplitMix64::new(now_ns() ^ ((id as u64) << 48) ^ u64::from(std::process::id()));
        let mut salt = [0u8; UID_LEN - 8];
        for c in salt.chunks_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_be_bytes()[..c.len()]);
        }
        let picker = ClientPicker::new(cfg.poll);
        let fuzz_rng = SplitMix64::new(cfg.seed ^ (id as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
        Self {
            cfg,
            clients,
            prev,
            pools,
            keys: sessions.iter().map(ThreadKeys::new).collect(),
            salt,
            rng,
            fuzz_rng,
            picker,
            batches: 0,
            packets: 0,
        }
    }

    /// The shared settings.
    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    /// Clients of this thread.
    pub fn clients(&self) -> usize {
        self.clients
    }

    /// Starts a batch; true when it is a single-source flood (every fourth
    /// batch of `--kind adversarial`, all from client 0).
    pub fn flood_batch(&mut self) -> bool {
        self.batches += 1;
        self.cfg.kind == KindArg::Adversarial && self.batches.is_multiple_of(4)
    }

    /// The client of the next request, per the poll pattern.
    pub fn next_client(&mut self) -> usize {
        let random = self.rng.next_u64();
        self.picker.next(self.clients, random)
    }

    fn pick_kind(&mut self, flood_batch: bool) -> Kind {
        let k = self.packets;
        self.packets += 1;
        match self.cfg.kind {
            KindArg::Plain => Kind::Plain,
            KindArg::Interleaved => Kind::Interleaved,
            KindArg::Nts => Kind::Nts,
            KindArg::Adversarial if flood_batch => Kind::Adv(Adv::Flood),
            KindArg::Adversarial => Kind::Adv(Adv::CYCLE[(k % Adv::CYCLE.len() as u64) as usize]),
            KindArg::Mix => match k % 10 {
                0 => Kind::Adv(Adv::CYCLE[((k / 10) % Adv::CYCLE.len() as u64) as usize]),
                1 => Kind::Interleaved,
                _ => Kind::Plain,
            },
            KindArg::Fuzz => Kind::Fuzz(Fuzz::pick(&mut self.fuzz_rng)),
        }
    }

    /// Writes the next request of client `ci` (the UDP payload) into `buf`
    /// and registers it in `table` as sent at `sent_ns` (`ntp_now` its NTP
    /// bits). `None` when there was nothing to send: an NTS client with no
    /// cookie at all (the slot is given back).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        &mut self,
        ci: usize,
        flood: bool,
        sent_ns: u64,
        ntp_now: u64,
        table: &mut MatchTable,
        c: &mut Counts,
        buf: &mut [u8],
    ) -> Option<Built> {
        let kind = self.pick_kind(flood);
        let prev = self.prev.get(ci).copied().unwrap_or((0, 0));
        let alt_time = (kind == Kind::Interleaved && prev.0 != 0).then_some(prev.1);
        let (slot, xmt, alt, pushed) =
            table.insert(sent_ns, ntp_now, alt_time, ci as u32, kind.code(), kind.expects_reply());
        if pushed.is_some_and(|p| p.expects_reply) {
            c.timeouts += 1;
        }
        if alt_time.is_some() {
            table.set_origin(slot, prev.0);
        }
        let len = match kind {
            Kind::Plain => {
                write_client_header(buf, VERSION, 3, 0, 0, xmt);
                48
            }
            Kind::Interleaved => {
                let origin = if alt_time.is_some() { prev.0 } else { 0 };
                write_client_header(buf, VERSION, 3, origin, alt, xmt);
                48
            }
            Kind::Nts => {
                let mut nonce = [0u8; 16];
                nonce[..8].copy_from_slice(&self.rng.next_u64().to_ne_bytes());
                nonce[8..].copy_from_slice(&self.rng.next_u64().to_ne_bytes());
                let npools = self.pools.len().max(1);
                let written = self.pools.get_mut(ci % npools).and_then(|pool| {
                    let reused = pool.cookies.reused;
                    let key = &mut self.keys[pool.session].c2s;
                    let len = nts::write_request(buf, xmt, &self.salt, &mut pool.cookies, key, &nonce);
                    c.nts_cookie_reuse += pool.cookies.reused - reused;
                    len
                });
                match written {
                    Some(len) => len,
                    None => {
                        table.cancel(slot);
                        return None;
                    }
                }
            }
            Kind::Adv(a) => write_adversarial(buf, a, xmt),
            Kind::Fuzz(f) => write_fuzz(buf, f, xmt, self.cfg.max_payload, &mut self.fuzz_rng),
        };
        table.set_len(slot, len);
        Some(Built { len, kind, slot })
    }

    /// Counts a built request as sent, or gives its slot back when the
    /// transport could not send it.
    pub fn account(&self, b: &Built, sent: bool, table: &mut MatchTable, c: &mut Counts) {
        if !sent {
            table.cancel(b.slot);
            return;
        }
        c.sent += 1;
        match b.kind {
            Kind::Adv(a) => c.adv_sent[a as usize] += 1,
            Kind::Fuzz(f) => c.fuzz_sent[f as usize] += 1,
            _ => c.expecting += 1,
        }
    }

    /// Validates a reply to client `ci` (its UDP payload, decrypted in place
    /// for NTS) received at `local_ns` and counts it. Whatever its request
    /// (while it is in the match table), a reply longer than it is invalid
    /// (`longer_than_request`), before any other check.
    pub fn process_reply(
        &mut self,
        ci: usize,
        payload: &mut [u8],
        local_ns: u64,
        table: &mut MatchTable,
        c: &mut Counts,
        lat: &mut Latency,
    ) {
        let Ok(h) = Header::parse(payload) else {
            c.invalid[Invalid::TooShort as usize] += 1;
            return;
        };
        if let Some(asked) = table.request_len(h.origin_ts.to_bits()) {
            c.length_checked += 1;
            if payload.len() > asked {
                c.invalid[Invalid::LongerThanRequest as usize] += 1;
                return;
            }
        }
        let (index, interleaved) = match table.lookup(h.origin_ts.to_bits()) {
            Lookup::Match { index, interleaved } => (index, interleaved),
            Lookup::Duplicate => return c.invalid[Invalid::Duplicate as usize] += 1,
            Lookup::Unknown => return c.invalid[Invalid::Unmatched as usize] += 1,
            Lookup::Late => return c.late += 1,
        };
        let slot = *table.slot(index);
        if slot.client as usize != ci {
            // The origin names another client's request: a reply sent to
            // the wrong client.
            return c.invalid[Invalid::Unmatched as usize] += 1;
        }
        let kind = Kind::from_code(slot.kind);
        if let Kind::Adv(a) = kind {
            c.adv_replies[a as usize] += 1;
            return;
        }
        if let Kind::Fuzz(f) = kind {
            // Anything may be answered, with a KoD or time, as long as it
            // is a server reply no longer than the request.
            c.fuzz_replies[f as usize] += 1;
            if h.mode != chime_proto::packet::Mode::Server {
                c.invalid[Invalid::BadMode as usize] += 1;
            }
            return;
        }
        let earlier_t2 = interleaved.then_some(slot.origin);
        match check_header(&h, local_ns, self.cfg.window.as_nanos() as u64, earlier_t2) {
            Checked::Kod(k) => c.kod[k] += 1,
            Checked::Invalid(r) => c.invalid[r as usize] += 1,
            Checked::Time { residence_ns, unsynchronized, t2 } => {
                if kind == Kind::Nts {
                    let npools = self.pools.len().max(1);
                    let Some(pool) = self.pools.get_mut(ci % npools) else {
                        return c.invalid[Invalid::NtsUnauthenticated as usize] += 1;
                    };
                    let s2c = &mut self.keys[pool.session].s2c;
                    match nts::verify_reply(payload, slot.xmt, &self.salt, s2c, &mut pool.cookies) {
                        Ok(n) => c.nts_cookies += n as u64,
                        Err(r) => return c.invalid[r as usize] += 1,
                    }
                }
                c.valid += 1;
                c.unsynchronized += u64::from(unsynchronized);
                lat.rtt.saturating_record(local_ns.saturating_sub(slot.sent_ns).max(1));
                lat.residence.saturating_record(residence_ns.max(1));
                if kind == Kind::Interleaved {
                    if interleaved {
                        c.interleaved_interleaved += 1;
                    } else {
                        c.interleaved_basic += 1;
                    }
                    if let Some(p) = self.prev.get_mut(ci) {
                        *p = (t2, ntp_bits(local_ns));
                    }
                }
            }
        }
    }
}

/// How requests leave and replies arrive: the one part that differs
/// between transports.
pub trait Io: Send {
    /// Sends up to `n` requests `core` builds (registering each in
    /// `table`); returns how many the pacer may count as taken (sent, or
    /// skipped for want of an NTS cookie).
    fn send(&mut self, core: &mut Core, n: usize, table: &mut MatchTable, c: &mut Counts) -> usize;

    /// Takes in what arrived and hands each reply to
    /// [`Core::process_reply`]; returns how many datagrams.
    fn receive(&mut self, core: &mut Core, table: &mut MatchTable, c: &mut Counts, lat: &mut Latency) -> usize;

    /// Called before a step starts (a new match table): anything left over
    /// from the previous step is dropped, counted as late.
    fn start_step(&mut self, _c: &mut Counts) {}

    /// Most requests one [`send`](Self::send) call is given.
    fn max_batch(&self) -> usize {
        MAX_BATCH
    }
}

/// One thread: its [`Core`] and its transport, kept across ramp steps.
#[derive(Debug)]
pub struct Worker<T> {
    core: Core,
    io: T,
}

impl<T: Io> Worker<T> {
    /// A thread from its protocol state and transport.
    pub fn from_parts(core: Core, io: T) -> Self {
        Self { core, io }
    }

    /// The transport.
    pub fn io(&self) -> &T {
        &self.io
    }

    /// Runs one step: `rate` requests per second from this thread for
    /// `duration` from `start_ns`, then waits up to the timeout for the last
    /// replies. Bounded: sending stops at twice the duration plus a second
    /// even if the thread could not keep up, and at once when `stop` is set
    /// (Ctrl-C).
    pub fn run_step(
        &mut self,
        rate: f64,
        duration: Duration,
        start_ns: u64,
        live: &Live,
        stop: &AtomicBool,
    ) -> (Counts, Latency) {
        let cfg = self.core.config();
        let total = (rate * duration.as_secs_f64()).round() as u64;
        let timeout_ns = cfg.timeout.as_nanos() as u64;
        let mut pacer = Pacer::new(start_ns, rate, total);
        let mut table = MatchTable::new((rate * cfg.timeout.as_secs_f64() * 2.0) as usize + 1024, timeout_ns);
        let mut c = Counts::default();
        let mut lat = Latency::default();
        self.io.start_step(&mut c);
        let hard_stop = start_ns + 2 * duration.as_nanos() as u64 + 1_000_000_000;
        let mut send_done_at = None;
        let mut iter = 0u64;
        loop {
            let now = now_ns();
            let mut due = 0;
            if send_done_at.is_none() {
                due = pacer.due(now);
                if due > 0 {
                    let n = due.min(self.io.max_batch() as u64) as usize;
                    let sent = self.io.send(&mut self.core, n, &mut table, &mut c);
                    pacer.take(sent as u64);
                }
                if pacer.done() || now >= hard_stop || stop.load(Ordering::Relaxed) {
                    send_done_at = Some(now);
                    c.send_elapsed_ns = now.saturating_sub(start_ns).max(1);
                }
            }
            let got = self.io.receive(&mut self.core, &mut table, &mut c, &mut lat);
            table.sweep(now, 4096, |e| {
                if e.expects_reply {
                    c.timeouts += 1;
                }
            });
            iter += 1;
            if iter.is_multiple_of(64) {
                live.sent.store(c.sent, Ordering::Relaxed);
                live.valid.store(c.valid, Ordering::Relaxed);
            }
            if let Some(done) = send_done_at
                && (table.outstanding() == 0 || now >= done.saturating_add(timeout_ns) || stop.load(Ordering::Relaxed))
            {
                break;
            }
            if due == 0 && got == 0 {
                let gap = pacer.next_at().map_or(200_000, |t| t.saturating_sub(now));
                if gap > 30_000 || send_done_at.is_some() {
                    std::thread::sleep(Duration::from_nanos(gap.clamp(1_000, 200_000)));
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        // Whatever is still outstanding timed out.
        table.sweep(u64::MAX, usize::MAX, |e| {
            if e.expects_reply {
                c.timeouts += 1;
            }
        });
        live.sent.store(c.sent, Ordering::Relaxed);
        live.valid.store(c.valid, Ordering::Relaxed);
        (c, lat)
    }
}

/// The UDP transport of one thread: one connected, non-blocking UDP socket
/// per client (a distinct source port each), `sendmmsg` batches from one
/// client in turn, `recvmmsg` from every socket epoll reports readable,
/// kernel receive stamps.
pub struct UdpIo {
    socks: Vec<UdpSocket>,
    epoll: Epoll,
    out: Batch,
    inb: Batch,
}

impl std::fmt::Debug for UdpIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpIo").field("sockets", &self.socks.len()).finish_non_exhaustive()
    }
}

/// A thread of the UDP transport.
pub type UdpWorker = Worker<UdpIo>;

/// Opens a connected, non-blocking, timestamping UDP socket to `target`.
pub fn client_socket(target: SocketAddr) -> io::Result<UdpSocket> {
    let any = match target.ip() {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let s = UdpSocket::bind(any)?;
    s.connect(target)?;
    s.set_nonblocking(true)?;
    sys::tune_socket(&s, 4 << 20, 4 << 20)?;
    Ok(s)
}

impl UdpWorker {
    /// A UDP thread with `clients` sockets; `first_client` numbers them
    /// across threads (for spreading NTS sessions).
    pub fn udp(
        cfg: WorkerConfig,
        id: usize,
        clients: usize,
        first_client: usize,
        sessions: &[Session],
    ) -> Result<Self, String> {
        let epoll = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
        let mut socks = Vec::with_capacity(clients);
        for i in 0..clients {
            let sock = client_socket(cfg.target).map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EMFILE) {
                    " (too many open files: lower --clients or raise `ulimit -n`)"
                } else {
                    ""
                };
                format!("socket to {}: {e}{hint}", cfg.target)
            })?;
            epoll.add(&sock, i as u64).map_err(|e| format!("epoll: {e}"))?;
            socks.push(sock);
        }
        // One cookie pool per client, as before.
        let core = Core::new(cfg, id, clients, first_client, sessions, clients);
        Ok(Self::from_parts(core, UdpIo { socks, epoll, out: Batch::new(), inb: Batch::new() }))
    }
}

impl Io for UdpIo {
    /// Builds and sends up to `n` packets from the next client.
    fn send(&mut self, core: &mut Core, n: usize, table: &mut MatchTable, c: &mut Counts) -> usize {
        let flood = core.flood_batch();
        let ci = if flood { 0 } else { core.next_client() };
        let mut built = [None; MAX_BATCH];
        let sent_ns = now_ns();
        let ntp_now = ntp_bits(sent_ns);
        let mut k = 0;
        for _ in 0..n.min(MAX_BATCH) {
            if let Some(b) = core.build(ci, flood, sent_ns, ntp_now, table, c, self.out.slot_mut(k)) {
                self.out.lens[k] = b.len;
                built[k] = Some(b);
                k += 1;
            }
        }
        let fd = self.socks[ci].as_raw_fd();
        let sent = match sys::send_batch(fd, &mut self.out, k) {
            Ok(s) => s,
            Err(e) => {
                match e.kind() {
                    io::ErrorKind::WouldBlock => c.send_would_block += 1,
                    io::ErrorKind::ConnectionRefused => c.econnrefused += 1,
                    _ => c.send_errors += 1,
                }
                0
            }
        };
        if sent < k {
            c.send_would_block += u64::from(sent > 0);
        }
        for (i, b) in built.iter().take(k).enumerate() {
            if let Some(b) = b {
                core.account(b, i < sent, table, c);
            }
        }
        // An NTS client with no cookie at all sends nothing; count the
        // attempt as sent so pacing moves on.
        sent.max(n - k)
    }

    /// Drains the readable sockets.
    fn receive(&mut self, core: &mut Core, table: &mut MatchTable, c: &mut Counts, lat: &mut Latency) -> usize {
        let mut ready = [0u64; MAX_BATCH];
        let n = match self.epoll.ready(&mut ready) {
            Ok(n) => n,
            Err(_) => return 0,
        };
        let mut total = 0;
        for &ci in &ready[..n] {
            let ci = ci as usize;
            for _ in 0..16 {
                let fd = self.socks[ci].as_raw_fd();
                let got = match sys::recv_batch(fd, &mut self.inb) {
                    Ok(k) => k,
                    Err(e) => {
                        if e.kind() == io::ErrorKind::ConnectionRefused {
                            c.econnrefused += 1;
                        }
                        break;
                    }
                };
                let now = now_ns();
                for i in 0..got {
                    let local = if self.inb.stamps[i] != 0 { self.inb.stamps[i] } else { now };
                    core.process_reply(ci, self.inb.datagram_mut(i), local, table, c, lat);
                }
                total += got;
                if got < MAX_BATCH {
                    break;
                }
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::test_reply;

    /// Fuzz requests are registered with their length; a reply (a time
    /// reply or KoD alike) longer than its request is counted invalid,
    /// one as long is counted as a fuzz reply.
    #[test]
    fn replies_longer_than_their_request_are_caught() {
        let cfg = WorkerConfig {
            target: "127.0.0.1:123".parse().unwrap(),
            kind: KindArg::Fuzz,
            timeout: Duration::from_secs(1),
            window: Duration::from_secs(60),
            poll: PollPattern::Even,
            seed: 3,
            max_payload: 1472,
        };
        let mut core = Core::new(cfg, 0, 4, 0, &[], 1);
        let mut table = MatchTable::new(256, 1_000_000_000);
        let (mut c, mut lat) = (Counts::default(), Latency::default());
        let now = now_ns();
        let mut checked = 0;
        for _ in 0..200 {
            let mut buf = [0u8; 1472];
            let b = core.build(0, false, now, ntp_bits(now), &mut table, &mut c, &mut buf).unwrap();
            core.account(&b, true, &mut table, &mut c);
            if b.len < 48 {
                continue;
            }
            let mut h = test_reply(now);
            h.origin_ts = NtpTimestamp::from_bits(table.slot(b.slot).xmt);
            let mut reply = vec![0u8; b.len + usize::from(checked % 2 == 0)];
            h.write(&mut reply[..48]);
            core.process_reply(0, &mut reply, now, &mut table, &mut c, &mut lat);
            checked += 1;
        }
        assert_eq!(c.sent, 200);
        assert_eq!(c.fuzz_sent.iter().sum::<u64>(), 200);
        assert_eq!(c.length_checked, checked);
        assert_eq!(c.invalid[Invalid::LongerThanRequest as usize], checked.div_ceil(2));
        assert_eq!(c.fuzz_replies.iter().sum::<u64>(), checked / 2);
    }
}
