//! One sender/receiver thread of the UDP transport.
//!
//! Each thread owns a share of the simulated clients (one connected,
//! non-blocking UDP socket each, so a distinct source port), its own match
//! table, batch buffers and histograms; threads share nothing but a few
//! relaxed counters for the progress line. The loop: send what the pacer
//! says is due (a `sendmmsg` batch per client in turn), drain every socket
//! epoll reports readable (`recvmmsg`), retire timed-out requests, and
//! sleep briefly only when there was nothing to do.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chime_proto::NtpTimestamp;
use chime_proto::packet::Header;
use chime_proto::rng::SplitMix64;

use crate::nts::{self, CookiePool, Session, ThreadKeys, UID_LEN};
use crate::request::{
    Adv, Checked, Invalid, Kind, KindArg, VERSION, check_header, write_adversarial, write_client_header,
};
use crate::stats::{Counts, Latency};
use crate::sys::{self, Batch, Epoll, MAX_BATCH};
use crate::table::{Lookup, MatchTable, Pacer};

/// Wall-clock time, ns since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn ntp_bits(ns: u64) -> u64 {
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
}

struct Client {
    sock: UdpSocket,
    prev_t2: u64,
    prev_rx: u64,
    session: usize,
    pool: CookiePool,
}

/// One thread's clients and buffers, kept across ramp steps.
pub struct Worker {
    cfg: WorkerConfig,
    clients: Vec<Client>,
    epoll: Epoll,
    out: Batch,
    inb: Batch,
    keys: Vec<ThreadKeys>,
    salt: [u8; UID_LEN - 8],
    rng: SplitMix64,
    next_client: usize,
    batches: u64,
    packets: u64,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("clients", &self.clients.len()).finish_non_exhaustive()
    }
}

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

impl Worker {
    /// A thread with `clients` sockets; `first_client` numbers them across
    /// threads (for spreading NTS sessions).
    pub fn new(
        cfg: WorkerConfig,
        id: usize,
        clients: usize,
        first_client: usize,
        sessions: &[Session],
    ) -> Result<Self, String> {
        let epoll = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
        let mut list = Vec::with_capacity(clients);
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
            let session = if sessions.is_empty() { 0 } else { (first_client + i) % sessions.len() };
            let mut pool = CookiePool::default();
            if let Some(s) = sessions.get(session) {
                for c in &s.cookies {
                    pool.push(c);
                }
            }
            list.push(Client { sock, prev_t2: 0, prev_rx: 0, session, pool });
        }
        let mut rng = SplitMix64::new(now_ns() ^ ((id as u64) << 48) ^ u64::from(std::process::id()));
        let mut salt = [0u8; UID_LEN - 8];
        for c in salt.chunks_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_be_bytes()[..c.len()]);
        }
        Ok(Self {
            cfg,
            clients: list,
            epoll,
            out: Batch::new(),
            inb: Batch::new(),
            keys: sessions.iter().map(ThreadKeys::new).collect(),
            salt,
            rng,
            next_client: 0,
            batches: 0,
            packets: 0,
        })
    }

    /// Runs one step: `rate` requests per second from this thread for
    /// `duration` from `start_ns`, then waits up to the timeout for the last
    /// replies. Bounded: sending stops at twice the duration plus a second
    /// even if the thread could not keep up.
    pub fn run_step(&mut self, rate: f64, duration: Duration, start_ns: u64, live: &Live) -> (Counts, Latency) {
        let total = (rate * duration.as_secs_f64()).round() as u64;
        let timeout_ns = self.cfg.timeout.as_nanos() as u64;
        let mut pacer = Pacer::new(start_ns, rate, total);
        let mut table = MatchTable::new((rate * self.cfg.timeout.as_secs_f64() * 2.0) as usize + 1024, timeout_ns);
        let mut c = Counts::default();
        let mut lat = Latency::default();
        let hard_stop = start_ns + 2 * duration.as_nanos() as u64 + 1_000_000_000;
        let mut send_done_at = None;
        let mut iter = 0u64;
        loop {
            let now = now_ns();
            let mut due = 0;
            if send_done_at.is_none() {
                due = pacer.due(now);
                if due > 0 {
                    let n = due.min(MAX_BATCH as u64) as usize;
                    let sent = self.send_batch(n, &mut table, &mut c);
                    pacer.take(sent as u64);
                }
                if pacer.done() || now >= hard_stop {
                    send_done_at = Some(now);
                    c.send_elapsed_ns = now.saturating_sub(start_ns).max(1);
                }
            }
            let got = self.receive(&mut table, &mut c, &mut lat);
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
                && (table.outstanding() == 0 || now >= done.saturating_add(timeout_ns))
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
        }
    }

    /// Builds and sends up to `n` packets from the next client; returns how
    /// many left.
    fn send_batch(&mut self, n: usize, table: &mut MatchTable, c: &mut Counts) -> usize {
        self.batches += 1;
        let flood = self.cfg.kind == KindArg::Adversarial && self.batches.is_multiple_of(4);
        let ci = if flood {
            0
        } else {
            self.next_client = (self.next_client + 1) % self.clients.len();
            self.next_client
        };
        let mut kinds = [Kind::Plain; MAX_BATCH];
        let mut slots = [usize::MAX; MAX_BATCH];
        let sent_ns = now_ns();
        let ntp_now = ntp_bits(sent_ns);
        let mut built = 0;
        for i in 0..n {
            let kind = self.pick_kind(flood);
            let client = &mut self.clients[ci];
            let alt_time = (kind == Kind::Interleaved && client.prev_t2 != 0).then_some(client.prev_rx);
            let (slot, xmt, alt, pushed) =
                table.insert(sent_ns, ntp_now, alt_time, ci as u32, kind.code(), kind.expects_reply());
            if pushed.is_some_and(|p| p.expects_reply) {
                c.timeouts += 1;
            }
            let buf = self.out.slot_mut(i);
            let len = match kind {
                Kind::Plain => {
                    write_client_header(buf, VERSION, 3, 0, 0, xmt);
                    48
                }
                Kind::Interleaved => {
                    let origin = if alt_time.is_some() { client.prev_t2 } else { 0 };
                    write_client_header(buf, VERSION, 3, origin, alt, xmt);
                    48
                }
                Kind::Nts => {
                    let mut nonce = [0u8; 16];
                    nonce[..8].copy_from_slice(&self.rng.next_u64().to_ne_bytes());
                    nonce[8..].copy_from_slice(&self.rng.next_u64().to_ne_bytes());
                    let reused = client.pool.reused;
                    let key = &mut self.keys[client.session].c2s;
                    let len = nts::write_request(buf, xmt, &self.salt, &mut client.pool, key, &nonce);
                    c.nts_cookie_reuse += client.pool.reused - reused;
                    match len {
                        Some(len) => len,
                        None => {
                            table.cancel(slot);
                            continue;
                        }
                    }
                }
                Kind::Adv(a) => write_adversarial(buf, a, xmt),
            };
            // Compact: packet i goes to position `built`.
            if built != i {
                self.out.move_slot(i, built, len);
            }
            self.out.lens[built] = len;
            kinds[built] = kind;
            slots[built] = slot;
            built += 1;
        }
        let fd = self.clients[ci].sock.as_raw_fd();
        let sent = match sys::send_batch(fd, &mut self.out, built) {
            Ok(k) => k,
            Err(e) => {
                match e.kind() {
                    io::ErrorKind::WouldBlock => c.send_would_block += 1,
                    io::ErrorKind::ConnectionRefused => c.econnrefused += 1,
                    _ => c.send_errors += 1,
                }
                0
            }
        };
        if sent < built {
            c.send_would_block += u64::from(sent > 0);
        }
        for i in 0..built {
            if i >= sent {
                table.cancel(slots[i]);
                continue;
            }
            c.sent += 1;
            match kinds[i] {
                Kind::Adv(a) => c.adv_sent[a as usize] += 1,
                _ => c.expecting += 1,
            }
        }
        // An NTS client with no cookie at all sends nothing; count the
        // attempt as sent so pacing moves on.
        sent.max(n - built)
    }

    /// Drains the readable sockets; returns the number of datagrams read.
    fn receive(&mut self, table: &mut MatchTable, c: &mut Counts, lat: &mut Latency) -> usize {
        let mut ready = [0u64; MAX_BATCH];
        let n = match self.epoll.ready(&mut ready) {
            Ok(n) => n,
            Err(_) => return 0,
        };
        let mut total = 0;
        for &ci in &ready[..n] {
            let ci = ci as usize;
            for _ in 0..16 {
                let fd = self.clients[ci].sock.as_raw_fd();
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
                    self.process_reply(ci, i, local, table, c, lat);
                }
                total += got;
                if got < MAX_BATCH {
                    break;
                }
            }
        }
        total
    }

    fn process_reply(
        &mut self,
        ci: usize,
        i: usize,
        local_ns: u64,
        table: &mut MatchTable,
        c: &mut Counts,
        lat: &mut Latency,
    ) {
        let Ok(h) = Header::parse(self.inb.datagram(i)) else {
            c.invalid[Invalid::TooShort as usize] += 1;
            return;
        };
        let (index, interleaved) = match table.lookup(h.origin_ts.to_bits()) {
            Lookup::Match { index, interleaved } => (index, interleaved),
            Lookup::Duplicate => return c.invalid[Invalid::Duplicate as usize] += 1,
            Lookup::Unknown => return c.invalid[Invalid::Unmatched as usize] += 1,
            Lookup::Late => return c.late += 1,
        };
        let slot = *table.slot(index);
        let kind = Kind::from_code(slot.kind);
        if let Kind::Adv(a) = kind {
            c.adv_replies[a as usize] += 1;
            return;
        }
        match check_header(&h, local_ns, self.cfg.window.as_nanos() as u64) {
            Checked::Kod(k) => c.kod[k] += 1,
            Checked::Invalid(r) => c.invalid[r as usize] += 1,
            Checked::Time { residence_ns, unsynchronized, t2 } => {
                let client = &mut self.clients[ci];
                if kind == Kind::Nts {
                    let s2c = &mut self.keys[client.session].s2c;
                    match nts::verify_reply(self.inb.datagram_mut(i), slot.xmt, &self.salt, s2c, &mut client.pool) {
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
                    client.prev_t2 = t2;
                    client.prev_rx = ntp_bits(local_ns);
                }
            }
        }
    }
}
