//! The AF_XDP transport (`--xdp IFACE --src-prefix PREFIX`): raw frames
//! from addresses of a prefix no host owns, so one generator plays millions
//! of distinct clients. Only for addresses inside test namespaces the user
//! made: the frames carry spoofed sources.
//!
//! - Client `g` (numbered across threads) is the address `g mod H` of the
//!   prefix's `H` usable hosts and port `1024 + g / H` ([`SourcePrefix`]).
//! - Sending: [`XdpIo`] builds each request in a free UMEM frame — the NTP
//!   payload from the shared [`Core`], then Ethernet, IP and UDP headers
//!   with checksums ([`chime_ebpf::frame::write_udp_frame`]) — puts a
//!   whole batch on the TX ring and kicks once (or a few times: a
//!   copy-mode kick transmits a budget's worth), alternating over the
//!   thread's queues so the server's queues all get work.
//! - Receiving: `chime_load_xdp` on the interface redirects UDP from the
//!   server's port to the prefix into the queue's socket, stamped with
//!   `bpf_ktime_get_tai_ns()`; the frame is parsed
//!   ([`chime_ebpf::frame::parse_request`]) and its payload validated by
//!   [`Core::process_reply`], exactly as the UDP transport does. Replies
//!   may come back on another queue than the request went out on (a
//!   kernel-stack server picks its transmit queue itself); a thread that
//!   receives a reply for another thread's client passes the payload on
//!   through a bounded channel.
//! - Next hop: `--xdp-dst-mac`, or the kernel's neighbour entry for the
//!   target (or its gateway) on the interface, primed with one ordinary
//!   datagram to the discard port when missing.
//!
//! A kernel-stack server (chimed's socket backend, chronyd) needs a route
//! back to the prefix through the generator's address (`ip route add
//! PREFIX via GENERATOR`); chimed's XDP backend answers by swapping the
//! Ethernet addresses and needs none.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use chime_ebpf::ethtool;
use chime_ebpf::frame::{IpFamily, MacPair, parse_request, udp_payload_offset, write_udp_frame};
use chime_ebpf::load_xdp::{LoadCounter, LoadXdp, LoadXdpConfig};
use chime_ebpf::loader::XdpMode;
use chime_ebpf::program::XdpMeta;
use chime_ebpf::xsk::{BindMode, BindOptions, UmemConfig, XskQueue, XskQueueConfig};
use serde::Serialize;

use crate::nts::Session;
use crate::stats::{Counts, Latency};
use crate::sys::{self, SLOT};
use crate::table::MatchTable;
use crate::worker::{Core, Io, Worker, WorkerConfig, now_ns, ntp_bits};

/// First source port of the simulated clients.
pub const BASE_PORT: u16 = 1024;
/// Source ports per address.
pub const PORTS: u64 = 65536 - BASE_PORT as u64;

/// Frames one receive poll takes from a queue.
const RX_BATCH: u32 = 256;
/// Most frames one send builds and transmits (one TX reservation, one kick
/// where the kernel takes a budget that large).
const TX_BATCH: usize = 256;
/// Replies in flight from one thread to another (each a [`SLOT`]-byte copy).
const FORWARD_DEPTH: usize = 4096;
/// Ring and UMEM shape of each socket: 2048-entry rings, 8192 frames of
/// 2 KiB (fill + RX, TX + completion, all full at once).
const RING: u32 = 2048;

/// The simulated clients' addresses: a prefix and its usable hosts.
///
/// Host `i` of an IPv4 prefix is the address `i + 1` into it (network and
/// broadcast addresses left out from /30 on). Servers rate-limit IPv6
/// clients per /64, so host `i` of an IPv6 prefix shorter than /64 is
/// `::1` in the `i`-th /64 of it, one client per /64; in a /64 or longer,
/// the address `i` into it. At most 2^48 hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourcePrefix {
    network: IpAddr,
    len: u8,
    first: u128,
    hosts: u64,
    /// Where the host index sits: 64 for IPv6 prefixes shorter than /64
    /// (the subnet bits), else 0.
    shift: u32,
}

impl SourcePrefix {
    /// Parses `ADDR/LEN` (see the type's docs for the addresses it names).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').ok_or_else(|| format!("--src-prefix {s:?}: want ADDR/LEN"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("--src-prefix {s:?}: bad address"))?;
        let len: u8 = len.parse().map_err(|_| format!("--src-prefix {s:?}: bad length"))?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        if len > width {
            return Err(format!("--src-prefix {s:?}: length above {width}"));
        }
        let bits = u32::from(width - len);
        let (network, first, hosts, shift) = match addr {
            IpAddr::V4(a) => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                let (first, hosts) = if bits >= 2 { (1, (1u64 << bits) - 2) } else { (0, 1u64 << bits) };
                (IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)), first, hosts, 0)
            }
            IpAddr::V6(a) => {
                let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
                let network = IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask));
                if len < 64 {
                    (network, 0, 1u64 << (64 - u32::from(len)).min(48), 64)
                } else {
                    (network, 0, 1u64 << bits.min(48), 0)
                }
            }
        };
        Ok(Self { network, len, first, hosts, shift })
    }

    /// The prefix as (network address, length).
    pub fn prefix(&self) -> (IpAddr, u8) {
        (self.network, self.len)
    }

    /// Usable addresses.
    pub fn hosts(&self) -> u64 {
        self.hosts
    }

    /// Distinct clients (address, port) it can name.
    pub fn capacity(&self) -> u64 {
        self.hosts.saturating_mul(PORTS)
    }

    /// Whether `ip` lies inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - self.len) };
                u32::from(a) & mask == u32::from(n)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - self.len) };
                u128::from(a) & mask == u128::from(n)
            }
            _ => false,
        }
    }

    /// Client `g`'s address and port (`g` below [`capacity`](Self::capacity)).
    pub fn client(&self, g: u64) -> SocketAddr {
        let host = self.first + u128::from(g % self.hosts);
        let port = BASE_PORT + (g / self.hosts) as u16;
        let ip = match self.network {
            IpAddr::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n) + host as u32)),
            IpAddr::V6(n) if self.shift > 0 => IpAddr::V6(Ipv6Addr::from(u128::from(n) | host << self.shift | 1)),
            IpAddr::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n) + host)),
        };
        SocketAddr::new(ip, port)
    }

    /// The client number of `addr`, if it names one.
    pub fn index_of(&self, addr: SocketAddr) -> Option<u64> {
        if !self.contains(addr.ip()) || addr.port() < BASE_PORT {
            return None;
        }
        let offset = match (self.network, addr.ip()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u128::from(u32::from(a) - u32::from(n)),
            (IpAddr::V6(n), IpAddr::V6(a)) if self.shift > 0 => {
                let off = u128::from(a) - u128::from(n);
                if off as u64 != 1 {
                    return None;
                }
                off >> self.shift
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) - u128::from(n),
            _ => return None,
        };
        let host = offset.checked_sub(self.first).filter(|h| *h < u128::from(self.hosts))? as u64;
        Some(u64::from(addr.port() - BASE_PORT) * self.hosts + host)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut out = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut out {
        let p = parts.next().ok_or_else(|| format!("MAC address {s:?}: want six hex bytes"))?;
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("MAC address {s:?}: bad byte {p:?}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("MAC address {s:?}: want six hex bytes"));
    }
    Ok(out)
}

fn ip_json(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new("ip").arg("-j").args(args).output().map_err(|e| format!("running `ip`: {e}"))?;
    if !out.status.success() {
        return Err(format!("`ip {}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("`ip -j {}` output: {e}", args.join(" ")))
}

/// The next hop towards `target` (the target, or its gateway), checked to
/// go out through `iface`.
fn next_hop(target: IpAddr, iface: &str) -> Result<IpAddr, String> {
    let route = ip_json(&["route", "get", &target.to_string()])?;
    let r = &route[0];
    let dev = r["dev"].as_str().unwrap_or("");
    if dev != iface {
        return Err(format!(
            "{target} is reached through {dev:?}, not {iface:?}: --xdp must name the interface towards the target"
        ));
    }
    match r["gateway"].as_str() {
        Some(g) => g.parse().map_err(|_| format!("gateway {g:?} of {target}")),
        None => Ok(target),
    }
}

fn neighbour(hop: IpAddr, iface: &str) -> Result<Option<[u8; 6]>, String> {
    let v = ip_json(&["neigh", "show", "to", &hop.to_string(), "dev", iface])?;
    let Some(mac) = v.as_array().into_iter().flatten().find_map(|n| n["lladdr"].as_str()) else { return Ok(None) };
    parse_mac(mac).map(Some)
}

/// The Ethernet address of the next hop towards `target` on `iface`, from
/// the kernel's neighbour table; when there is no entry yet, one ordinary
/// datagram to the next hop's discard port (9) makes the kernel resolve it
/// (waits up to 3 s).
pub fn resolve_dst_mac(target: IpAddr, iface: &str, ifindex: u32) -> Result<[u8; 6], String> {
    let hop = next_hop(target, iface)?;
    if let Some(mac) = neighbour(hop, iface)? {
        return Ok(mac);
    }
    let (bind, to): (SocketAddr, SocketAddr) = match hop {
        IpAddr::V4(a) => ((Ipv4Addr::UNSPECIFIED, 0).into(), (a, 9).into()),
        IpAddr::V6(a) => {
            let scope = if a.is_unicast_link_local() { ifindex } else { 0 };
            ((Ipv6Addr::UNSPECIFIED, 0).into(), SocketAddrV6::new(a, 9, 0, scope).into())
        }
    };
    let sock = UdpSocket::bind(bind).map_err(|e| format!("socket to prime the neighbour table: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut next_probe = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_probe {
            let _ = sock.send_to(b"chime-load: resolving the next hop", to);
            next_probe = Instant::now() + Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(20));
        if let Some(mac) = neighbour(hop, iface)? {
            return Ok(mac);
        }
    }
    Err(format!("no neighbour entry for {hop} on {iface} (is {target} up and reachable there?); give --xdp-dst-mac"))
}

/// `iface`'s own Ethernet address.
pub fn iface_mac(iface: &str) -> Result<[u8; 6], String> {
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    parse_mac(&text)
}

/// The name under which this process's network namespace is mounted in
/// `/run/netns` (made with `ip netns add`, entered with `ip netns exec`),
/// or `None`: then it is the host's own namespace or one nobody named,
/// and the AF_XDP transport refuses to run. Fails closed: anything that
/// cannot be read counts as "not a test namespace".
pub fn named_netns() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata("/proc/self/ns/net").ok()?;
    std::fs::read_dir("/run/netns").ok()?.flatten().find_map(|e| {
        let m = std::fs::metadata(e.path()).ok()?;
        (m.dev() == ours.dev() && m.ino() == ours.ino()).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

/// A reply a thread took in for another thread's client.
#[derive(Debug)]
pub struct Forwarded {
    client: u32,
    local_ns: u64,
    len: u16,
    data: [u8; SLOT],
}

/// Where a thread's clients start, for finding the owner of a reply.
#[derive(Clone, Debug)]
struct Owners {
    /// `firsts[t]`: the first client of thread `t`; then the total.
    firsts: Vec<u64>,
}

impl Owners {
    fn of(&self, g: u64) -> Option<usize> {
        let t = self.firsts.partition_point(|&f| f <= g);
        (t > 0 && t < self.firsts.len()).then_some(t - 1)
    }
}

/// Counters of the AF_XDP side for the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct XdpReport {
    /// The interface.
    pub interface: String,
    /// How the program is attached (native or generic).
    pub attach_mode: String,
    /// Per queue: zero-copy or copy.
    pub bind_modes: Vec<String>,
    /// The source prefix.
    pub src_prefix: String,
    /// The program's counters, by name (nonzero ones).
    pub program: std::collections::BTreeMap<String, u64>,
    /// Replies handed from one thread to another (they arrived on another
    /// thread's queue).
    pub forwarded: u64,
    /// Sockets: received frames dropped by the kernel (`rx_dropped`).
    pub rx_dropped: u64,
    /// Sockets: frames dropped for a full RX ring.
    pub rx_ring_full: u64,
    /// Sockets: times the fill ring was found empty.
    pub rx_fill_ring_empty: u64,
    /// Sockets: invalid TX descriptors.
    pub tx_invalid_descs: u64,
}

/// Where a received reply goes: the client it names, validated by this
/// thread or passed on to the thread that owns it.
struct Dispatch {
    prefix: SourcePrefix,
    target: SocketAddr,
    /// This thread's first client (global number) and client count.
    first: u64,
    clients: u64,
    owners: Owners,
    id: usize,
    to: Vec<SyncSender<Forwarded>>,
    tai_offset_ns: i64,
    forwarded: u64,
}

/// One thread's AF_XDP sockets and what it needs to build and read frames.
pub struct XdpIo {
    queues: Vec<XskQueue>,
    next_tx: usize,
    /// Per queue, the next client to send from: client `ci` always goes
    /// out on queue `ci mod queues` (as RSS keeps a client on one queue),
    /// so a server's per-queue interleaved-mode table sees all of it.
    cursor: Vec<usize>,
    family: IpFamily,
    macs: MacPair,
    ipv4_id: u16,
    inbox: Receiver<Forwarded>,
    d: Dispatch,
}

impl std::fmt::Debug for XdpIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpIo")
            .field("queues", &self.queues.len())
            .field("first", &self.d.first)
            .finish_non_exhaustive()
    }
}

/// A thread of the AF_XDP transport.
pub type XdpWorker = Worker<XdpIo>;

/// What [`setup`] needs.
#[derive(Clone, Debug)]
pub struct XdpOptions {
    /// The interface to send from.
    pub iface: String,
    /// Queues to bind (0: all of the interface's).
    pub queues: usize,
    /// The simulated clients' prefix.
    pub prefix: SourcePrefix,
    /// The next hop's MAC, if given.
    pub dst_mac: Option<[u8; 6]>,
    /// Attach mode of the program.
    pub mode: XdpMode,
}

/// The program attached and one worker per thread, each owning its share
/// of the queues' sockets. Dropping the program detaches it; dropping the
/// workers closes the sockets.
pub struct XdpSetup {
    /// The attached program (detached on drop).
    pub program: LoadXdp,
    /// The threads.
    pub workers: Vec<XdpWorker>,
    /// For the report.
    pub report: XdpReport,
}

impl std::fmt::Debug for XdpSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpSetup").field("workers", &self.workers.len()).finish_non_exhaustive()
    }
}

/// Attaches chime-load's program to `opts.iface`, binds one AF_XDP socket
/// per queue and makes `threads` workers (at most one per queue) sharing
/// `clients` clients of the prefix.
pub fn setup(
    opts: &XdpOptions,
    cfg: &WorkerConfig,
    threads: usize,
    clients: u64,
    sessions: &[Session],
) -> Result<XdpSetup, String> {
    let iface = &opts.iface;
    let target = cfg.target;
    let ifindex = ethtool::ifindex(iface).map_err(|e| format!("interface {iface:?}: {e}"))?;
    let all = ethtool::queue_count(iface).map_err(|e| format!("queues of {iface:?}: {e}"))?.max(1) as usize;
    let nqueues = if opts.queues == 0 { all } else { opts.queues.min(all) };
    let threads = threads.clamp(1, nqueues);
    let src_mac = iface_mac(iface)?;
    let dst_mac = match opts.dst_mac {
        Some(m) => m,
        None => resolve_dst_mac(target.ip(), iface, ifindex)?,
    };
    let (net, len) = opts.prefix.prefix();
    let pcfg = LoadXdpConfig {
        port: target.port(),
        v4: if let IpAddr::V4(a) = net { Some((a, len)) } else { None },
        v6: if let IpAddr::V6(a) = net { Some((a, len)) } else { None },
    };
    let program = LoadXdp::attach(ifindex, opts.mode, &pcfg).map_err(|e| {
        let hint = if e.to_string().contains("ermission") || e.to_string().contains("EPERM") {
            " (needs root: CAP_NET_ADMIN and CAP_BPF)"
        } else {
            ""
        };
        format!("XDP program on {iface:?}: {e}{hint}")
    })?;
    let qcfg = XskQueueConfig {
        umem: UmemConfig {
            frame_count: 4 * RING,
            frame_size: 2048,
            fill_size: RING,
            comp_size: RING,
            ..UmemConfig::default()
        },
        bind: BindOptions { rx_size: RING, tx_size: RING, ..BindOptions::default() },
        rx_meta: true,
        tx_timestamps: false,
    };
    let mut sockets = Vec::with_capacity(nqueues);
    let mut bind_modes = Vec::with_capacity(nqueues);
    for q in 0..nqueues as u32 {
        let queue =
            XskQueue::new(ifindex, q, qcfg).map_err(|e| format!("AF_XDP socket on {iface:?} queue {q}: {e}"))?;
        // Linux 6.17+: one kick sends a whole batch; older kernels refuse
        // and take 32 a kick.
        let _ = queue.socket().set_tx_budget(RING);
        program
            .program()
            .register_socket(q, queue.socket().as_raw_fd())
            .map_err(|e| format!("XDP socket map on {iface:?}: {e}"))?;
        bind_modes.push(if queue.bind_mode() == BindMode::ZeroCopy { "zero-copy" } else { "copy" }.to_owned());
        sockets.push(queue);
    }

    // Clients split like the UDP transport's: contiguous ranges per thread.
    let mut firsts = Vec::with_capacity(threads + 1);
    let mut first = 0u64;
    for t in 0..threads as u64 {
        firsts.push(first);
        first += clients / threads as u64 + u64::from(t < clients % threads as u64);
    }
    firsts.push(first);
    let owners = Owners { firsts };
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..threads).map(|_| sync_channel(FORWARD_DEPTH)).unzip();
    let mut per_thread: Vec<Vec<XskQueue>> = (0..threads).map(|_| Vec::new()).collect();
    for (q, s) in sockets.into_iter().enumerate() {
        per_thread[q % threads].push(s);
    }
    let family = if target.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 };
    let tai_offset_ns = sys::tai_offset_ns();
    let mut workers = Vec::with_capacity(threads);
    for (t, (queues, inbox)) in per_thread.into_iter().zip(inboxes).enumerate() {
        let first = owners.firsts[t];
        let n = owners.firsts[t + 1] - first;
        let core = Core::new(cfg.clone(), t, n as usize, first as usize, sessions, 1024);
        let io = XdpIo {
            cursor: (0..queues.len()).collect(),
            queues,
            next_tx: 0,
            family,
            macs: MacPair { src: src_mac, dst: dst_mac },
            ipv4_id: (t as u16) << 12,
            inbox,
            d: Dispatch {
                prefix: opts.prefix,
                target,
                first,
                clients: n,
                owners: owners.clone(),
                id: t,
                to: senders.clone(),
                tai_offset_ns,
                forwarded: 0,
            },
        };
        workers.push(Worker::from_parts(core, io));
    }
    let report = XdpReport {
        interface: iface.clone(),
        attach_mode: program.mode().to_string(),
        bind_modes,
        src_prefix: format!("{net}/{len}"),
        ..XdpReport::default()
    };
    Ok(XdpSetup { program, workers, report })
}

impl XdpSetup {
    /// Fills the report's counters from the program and the sockets.
    pub fn finish_report(&mut self) -> XdpReport {
        let mut r = self.report.clone();
        if let Ok(stats) = self.program.program().stats() {
            r.program = LoadCounter::ALL
                .iter()
                .filter(|c| stats[c.index()] > 0)
                .map(|c| (c.name().to_owned(), stats[c.index()]))
                .collect();
        }
        for w in &self.workers {
            r.forwarded += w.io().d.forwarded;
            for q in &w.io().queues {
                if let Ok(s) = q.statistics() {
                    r.rx_dropped += s.rx_dropped;
                    r.rx_ring_full += s.rx_ring_full;
                    r.rx_fill_ring_empty += s.rx_fill_ring_empty_descs;
                    r.tx_invalid_descs += s.tx_invalid_descs;
                }
            }
        }
        r
    }
}

impl Dispatch {
    /// Handles one received frame: a reply from the target to one of the
    /// clients, validated here or passed to the thread that owns it.
    #[allow(clippy::too_many_arguments)]
    fn take_frame(
        &mut self,
        core: &mut Core,
        pkt: &mut [u8],
        meta: Option<&[u8]>,
        now: u64,
        table: &mut MatchTable,
        c: &mut Counts,
        lat: &mut Latency,
    ) {
        let Ok(f) = parse_request(pkt) else { return c.stray += 1 };
        let Some(g) = (f.src() == self.target).then(|| self.prefix.index_of(f.dst())).flatten() else {
            return c.stray += 1;
        };
        let local_ns = meta
            .and_then(|m| m.try_into().ok())
            .and_then(XdpMeta::from_bytes)
            .map_or(now, |m| (m.rx_ns as i64 - self.tai_offset_ns) as u64);
        let payload = &mut pkt[f.payload_offset()..f.len()];
        if g >= self.first && g < self.first + self.clients {
            core.process_reply((g - self.first) as usize, payload, local_ns, table, c, lat);
            return;
        }
        let Some(owner) = self.owners.of(g).filter(|&t| t != self.id) else { return c.stray += 1 };
        let Ok(len) = u16::try_from(payload.len()) else { return c.stray += 1 };
        if payload.len() > SLOT {
            return c.stray += 1;
        }
        let mut m = Forwarded { client: (g - self.owners.firsts[owner]) as u32, local_ns, len, data: [0; SLOT] };
        m.data[..payload.len()].copy_from_slice(payload);
        match self.to[owner].try_send(m) {
            Ok(()) => self.forwarded += 1,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => c.stray += 1,
        }
    }
}

impl Io for XdpIo {
    /// Builds up to `n` requests, each from the next client, straight into
    /// UMEM frames of the next queue, and transmits them as one batch.
    fn send(&mut self, core: &mut Core, n: usize, table: &mut MatchTable, c: &mut Counts) -> usize {
        let flood = core.flood_batch();
        let nq = self.queues.len();
        let qi = self.next_tx;
        self.next_tx = (qi + 1) % nq;
        let clients = core.clients();
        let cursor = &mut self.cursor[qi];
        let sent_ns = now_ns();
        let ntp_now = ntp_bits(sent_ns);
        let at = udp_payload_offset(self.family);
        let (mut attempts, mut queued) = (0usize, 0usize);
        let (prefix, first, macs, target) = (self.d.prefix, self.d.first, self.macs, self.d.target);
        let ipv4_id = &mut self.ipv4_id;
        let result = self.queues[qi].send_batch(n.min(TX_BATCH) as u32, |frame| {
            while attempts < n {
                attempts += 1;
                let ci = if flood {
                    0
                } else {
                    let ci = *cursor % clients;
                    *cursor = if *cursor + nq < clients { *cursor + nq } else { qi };
                    ci
                };
                let Some(b) =
                    frame.get_mut(at..).and_then(|buf| core.build(ci, flood, sent_ns, ntp_now, table, c, buf))
                else {
                    continue;
                };
                let src = prefix.client(first + ci as u64);
                *ipv4_id = ipv4_id.wrapping_add(1);
                match write_udp_frame(frame, &macs, src, target, b.len, *ipv4_id) {
                    Ok(len) => {
                        core.account(&b, true, table, c);
                        queued += 1;
                        return Some(len);
                    }
                    Err(_) => {
                        core.account(&b, false, table, c);
                        c.send_errors += 1;
                    }
                }
            }
            None
        });
        if result.is_err() {
            c.send_errors += 1;
        }
        if attempts < n {
            // The TX ring or the frames ran out: the rest is retried.
            c.send_would_block += 1;
        }
        // Attempts that built nothing (an NTS client without a cookie) are
        // taken too, so pacing moves on.
        attempts.max(queued)
    }

    /// Polls every queue of the thread, then the replies other threads
    /// passed on; keeps the TX rings moving.
    fn receive(&mut self, core: &mut Core, table: &mut MatchTable, c: &mut Counts, lat: &mut Latency) -> usize {
        let mut total = 0;
        let now = now_ns();
        let d = &mut self.d;
        for queue in &mut self.queues {
            let got = queue.poll_rx(RX_BATCH, |pkt, meta| {
                d.take_frame(core, pkt, meta, now, table, c, lat);
                None
            });
            if queue.tx_outstanding() > 0 {
                let _ = queue.flush_tx();
            }
            match got {
                Ok(st) => total += st.received as usize,
                Err(_) => c.send_errors += 1,
            }
        }
        while let Ok(mut m) = self.inbox.try_recv() {
            let len = usize::from(m.len);
            core.process_reply(m.client as usize, &mut m.data[..len], m.local_ns, table, c, lat);
            total += 1;
        }
        total
    }

    fn start_step(&mut self, c: &mut Counts) {
        while self.inbox.try_recv().is_ok() {
            c.late += 1;
        }
    }

    fn max_batch(&self) -> usize {
        TX_BATCH
    }
}

#[cfg(test)]
mod tests {
    use chime_ebpf::frame::build_reply_in_place;
    use chime_proto::packet::{HEADER_LEN, Header};

    use super::*;
    use crate::request::{Invalid, KindArg, test_reply};

    #[test]
    fn ipv4_prefix_names_clients() {
        let p = SourcePrefix::parse("198.19.7.7/16").unwrap();
        assert_eq!(p.prefix(), ("198.19.0.0".parse().unwrap(), 16));
        assert_eq!(p.hosts(), 65534, "network and broadcast left out");
        assert_eq!(p.capacity(), 65534 * 64512);
        assert_eq!(p.client(0), "198.19.0.1:1024".parse().unwrap());
        assert_eq!(p.client(65533), "198.19.255.254:1024".parse().unwrap());
        assert_eq!(p.client(65534), "198.19.0.1:1025".parse().unwrap());
        for g in [0, 1, 255, 65533, 65534, 1_000_000, p.capacity() - 1] {
            assert_eq!(p.index_of(p.client(g)), Some(g), "{g}");
        }
        assert_eq!(p.client(p.capacity() - 1), "198.19.255.254:65535".parse().unwrap());
        for outside in ["198.19.0.0:1024", "198.19.255.255:1024", "198.20.0.1:1024", "198.19.0.1:1023", "[::1]:1024"] {
            assert_eq!(p.index_of(outside.parse().unwrap()), None, "{outside}");
        }
        assert!(p.contains("198.19.255.255".parse().unwrap()) && !p.contains("198.18.0.1".parse().unwrap()));
        let one = SourcePrefix::parse("10.1.2.3/32").unwrap();
        assert_eq!((one.hosts(), one.client(1)), (1, "10.1.2.3:1025".parse().unwrap()));
        let two = SourcePrefix::parse("10.1.2.2/31").unwrap();
        assert_eq!((two.hosts(), two.client(1)), (2, "10.1.2.3:1024".parse().unwrap()));
    }

    #[test]
    fn ipv6_prefix_names_clients() {
        let p = SourcePrefix::parse("fdc4:1e:1::77/64").unwrap();
        assert_eq!(p.hosts(), 1 << 48);
        assert_eq!(p.client(0), "[fdc4:1e:1::]:1024".parse().unwrap());
        assert_eq!(p.client(0x1_0001), "[fdc4:1e:1::1:1]:1024".parse().unwrap());
        for g in [0, 7, 1 << 40, (1 << 48) + 3] {
            assert_eq!(p.index_of(p.client(g)), Some(g), "{g}");
        }
        assert_eq!(p.index_of("[fdc4:1e:2::1]:2000".parse().unwrap()), None);
        // Shorter than /64: one client per /64, interface ID ::1.
        let p = SourcePrefix::parse("fdc4:1e:100::/40").unwrap();
        assert_eq!(p.hosts(), 1 << 24);
        assert_eq!(p.client(0), "[fdc4:1e:100::1]:1024".parse().unwrap());
        assert_eq!(p.client(1), "[fdc4:1e:100:1::1]:1024".parse().unwrap());
        assert_eq!(p.client(0x12_3456), "[fdc4:1e:112:3456::1]:1024".parse().unwrap());
        assert_eq!(p.client(1 << 24), "[fdc4:1e:100::1]:1025".parse().unwrap());
        for g in [0, 1, 0x12_3456, (1 << 24) - 1, 1 << 24, 5 << 24] {
            assert_eq!(p.index_of(p.client(g)), Some(g), "{g}");
        }
        assert_eq!(p.index_of("[fdc4:1e:100:1::2]:1024".parse().unwrap()), None, "only ::1 in each /64");
        let wide = SourcePrefix::parse("fd00::/8").unwrap();
        assert_eq!(wide.hosts(), 1 << 48);
        assert_eq!(wide.index_of(wide.client((1 << 48) - 1)), Some((1 << 48) - 1));
    }

    #[test]
    fn bad_prefixes_and_macs() {
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "::/129", "10.0.0.0/"] {
            assert!(SourcePrefix::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_mac("02:00:0a:ff:00:01\n").unwrap(), [2, 0, 0x0a, 0xff, 0, 1]);
        for bad in ["02:00:00:00:01", "02:00:00:00:00:01:02", "zz:00:00:00:00:01", ""] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn owners_of_clients() {
        let o = Owners { firsts: vec![0, 5, 9, 12] };
        let got: Vec<_> = (0..13).map(|g| o.of(g)).collect();
        let want: Vec<_> = [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2].into_iter().map(Some).chain([None]).collect();
        assert_eq!(got, want);
    }

    /// A reply frame to `request` (a frame as the generator sent it), as a
    /// server writing in place would make it.
    fn answer(request: &[u8], now_ns: u64) -> Vec<u8> {
        let mut f = request.to_vec();
        let req = parse_request(&f).unwrap();
        let payload = &f[req.payload_offset()..req.len()];
        let asked = Header::parse(payload).unwrap();
        let mut h = test_reply(now_ns);
        h.origin_ts = asked.transmit_ts;
        let at = req.payload_offset();
        h.write(&mut f[at..at + HEADER_LEN]);
        let n = build_reply_in_place(&mut f, &req, HEADER_LEN).unwrap();
        f.truncate(n);
        f
    }

    /// Requests built the way [`XdpIo::send`] builds them, answered, and
    /// taken back in by [`Dispatch`]: valid replies for this thread's
    /// clients, one passed to the thread owning the other, strays counted.
    #[test]
    fn frames_out_and_back_are_validated_like_udp() {
        for (prefix, target) in [("198.19.0.0/16", "198.18.0.1:123"), ("fdc4:1e:1::/64", "[fdc4:1e::1]:123")] {
            let prefix = SourcePrefix::parse(prefix).unwrap();
            let target: SocketAddr = target.parse().unwrap();
            let cfg = WorkerConfig {
                target,
                kind: KindArg::Plain,
                timeout: Duration::from_secs(1),
                window: Duration::from_secs(60),
                poll: crate::request::PollPattern::Even,
                seed: 1,
                max_payload: 1472,
            };
            let mut core = Core::new(cfg, 0, 10, 0, &[], 1);
            let (tx0, _rx0) = sync_channel(4);
            let (tx1, rx1) = sync_channel(4);
            let mut d = Dispatch {
                prefix,
                target,
                first: 0,
                clients: 10,
                owners: Owners { firsts: vec![0, 10, 20] },
                id: 0,
                to: vec![tx0, tx1],
                tai_offset_ns: 0,
                forwarded: 0,
            };
            let family = if target.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 };
            let macs = MacPair { src: [2, 0, 0, 0, 0, 2], dst: [2, 0, 0, 0, 0, 1] };
            let mut table = MatchTable::new(256, 1_000_000_000);
            let (mut c, mut lat) = (Counts::default(), Latency::default());
            let now = now_ns();
            let mut frames = Vec::new();
            for ci in 0..3 {
                let mut f = vec![0u8; 2048];
                let at = udp_payload_offset(family);
                let b = core.build(ci, false, now, ntp_bits(now), &mut table, &mut c, &mut f[at..]).unwrap();
                let len = write_udp_frame(&mut f, &macs, prefix.client(ci as u64), target, b.len, 1).unwrap();
                core.account(&b, true, &mut table, &mut c);
                f.truncate(len);
                frames.push(f);
            }
            for f in &frames {
                let mut r = answer(f, now + 50_000);
                d.take_frame(&mut core, &mut r, None, now + 80_000, &mut table, &mut c, &mut lat);
            }
            assert_eq!((c.sent, c.expecting, c.valid, c.stray), (3, 3, 3, 0), "{c:?}");
            assert_eq!(lat.rtt.len(), 3);
            assert!(lat.rtt.max() >= 80_000 && lat.rtt.max() < 81_000, "RTT from the given receive time");
            // The same reply again: a duplicate, counted invalid.
            let mut again = answer(&frames[0], now + 50_000);
            d.take_frame(&mut core, &mut again, None, now, &mut table, &mut c, &mut lat);
            assert_eq!(c.invalid[Invalid::Duplicate as usize], 1);
            // A reply to client 12 belongs to thread 1: passed on, with the
            // XDP program's stamp (CLOCK_TAI, offset 0 here).
            let mut other = frames[1].clone();
            let fr = parse_request(&other).unwrap();
            let src = prefix.client(12);
            let at = fr.payload_offset();
            let payload = other[at..fr.len()].to_vec();
            other = vec![0u8; 2048];
            other[at..at + payload.len()].copy_from_slice(&payload);
            let len = write_udp_frame(&mut other, &macs, src, target, payload.len(), 1).unwrap();
            let mut r = answer(&other[..len], now);
            let meta = XdpMeta { rx_ns: now + 7, flags: 0 }.to_bytes();
            d.take_frame(&mut core, &mut r, Some(&meta), now, &mut table, &mut c, &mut lat);
            let m = rx1.try_recv().expect("passed to thread 1");
            assert_eq!((m.client, m.local_ns, usize::from(m.len)), (2, now + 7, HEADER_LEN));
            assert_eq!(d.forwarded, 1);
            // Strays: not from the target, not to a client, not a frame.
            let mut from_elsewhere = answer(&frames[2], now);
            let r = parse_request(&from_elsewhere).unwrap();
            let sport = r.l4_offset();
            from_elsewhere[sport..sport + 2].copy_from_slice(&124u16.to_be_bytes());
            d.take_frame(&mut core, &mut from_elsewhere, None, now, &mut table, &mut c, &mut lat);
            let mut beyond = answer(&frames[2], now);
            let r = parse_request(&beyond).unwrap();
            let dport = r.l4_offset() + 2;
            beyond[dport..dport + 2].copy_from_slice(&80u16.to_be_bytes());
            d.take_frame(&mut core, &mut beyond, None, now, &mut table, &mut c, &mut lat);
            d.take_frame(&mut core, &mut [0u8; 20], None, now, &mut table, &mut c, &mut lat);
            assert_eq!(c.stray, 3);
            assert_eq!(c.valid, 3);
        }
    }
}
