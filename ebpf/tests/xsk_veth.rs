//! AF_XDP on a veth pair in throwaway network namespaces (root only).
//!
//! Namespace A holds `xa` (the AF_XDP side), namespace B holds `xb` with an
//! ordinary UDP socket. Without chime's XDP program, the RX test loads a
//! minimal one assembled here (test only): it prepends a 16-byte receive
//! header in chime's layout to the packet and redirects everything to the XSKMAP slot of the
//! receive queue.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::time::{Duration, Instant};

use chime_ebpf::program::{META_MAGIC, XdpMeta};
use chime_ebpf::xsk::{
    BindMode, BindOptions, TxMetadata, Umem, UmemConfig, XskQueue, XskQueueConfig, XskSocket, ZeroCopy, if_index,
};

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
    };
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two namespaces joined by a veth pair; deleted on drop (also on panic).
struct TestBed {
    a: String,
    b: String,
}

impl TestBed {
    fn new(tag: &str) -> Self {
        let pid = std::process::id();
        let bed = Self { a: format!("chime-xsk-{tag}-{pid}-a"), b: format!("chime-xsk-{tag}-{pid}-b") };
        ip(&["netns", "add", &bed.a]);
        ip(&["netns", "add", &bed.b]);
        ip(&["-n", &bed.a, "link", "add", "xa", "address", "02:00:00:00:00:0a", "type", "veth", "peer", "name", "xb"]);
        ip(&["-n", &bed.a, "link", "set", "xb", "netns", &bed.b]);
        ip(&["-n", &bed.b, "link", "set", "xb", "address", "02:00:00:00:00:0b"]);
        ip(&["-n", &bed.a, "addr", "add", "10.201.0.1/24", "dev", "xa"]);
        ip(&["-n", &bed.b, "addr", "add", "10.201.0.2/24", "dev", "xb"]);
        ip(&["-n", &bed.a, "link", "set", "xa", "up"]);
        ip(&["-n", &bed.b, "link", "set", "xb", "up"]);
        ip(&["-n", &bed.a, "link", "set", "lo", "up"]);
        ip(&["-n", &bed.b, "link", "set", "lo", "up"]);
        // The test program redirects ARP too: B learns A's address statically.
        ip(&[
            "-n",
            &bed.b,
            "neigh",
            "add",
            "10.201.0.1",
            "lladdr",
            "02:00:00:00:00:0a",
            "dev",
            "xb",
            "nud",
            "permanent",
        ]);
        bed
    }

    /// Runs `f` on a thread that joined namespace `ns`.
    fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a valid netns fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn checksum(sum: u32, data: &[u8]) -> u32 {
    let mut s = sum;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Writes an Ethernet/IPv4/UDP packet into `buf`; returns its length.
fn build_udp(buf: &mut [u8], src: (&[u8; 6], Ipv4Addr, u16), dst: (&[u8; 6], Ipv4Addr, u16), payload: &[u8]) -> usize {
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    buf[0..6].copy_from_slice(dst.0);
    buf[6..12].copy_from_slice(src.0);
    buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let iph = &mut buf[14..34];
    iph.copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    iph[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    iph[12..16].copy_from_slice(&src.1.octets());
    iph[16..20].copy_from_slice(&dst.1.octets());
    let c = fold(checksum(0, iph));
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut buf[34..34 + udp_len];
    udp[0..2].copy_from_slice(&src.2.to_be_bytes());
    udp[2..4].copy_from_slice(&dst.2.to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    udp[8..].copy_from_slice(payload);
    fix_udp_checksum(&mut buf[..14 + ip_len]);
    14 + ip_len
}

fn fix_udp_checksum(pkt: &mut [u8]) {
    let udp_len = pkt.len() - 34;
    pkt[40..42].fill(0);
    let mut s = checksum(0, &pkt[26..34]); // source and destination address
    s += 17 + udp_len as u32;
    let c = fold(checksum(s, &pkt[34..]));
    pkt[40..42].copy_from_slice(&if c == 0 { 0xffff } else { c }.to_be_bytes());
}

fn recv_until(sock: &UdpSocket, deadline: Duration) -> Option<(Vec<u8>, std::net::SocketAddr)> {
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let end = Instant::now() + deadline;
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            return Some((buf[..n].to_vec(), from));
        }
    }
    None
}

#[test]
fn bind_copy_mode_stats_fill_and_tx_to_peer() {
    need_root!();
    let bed = TestBed::new("tx");
    // B: a UDP socket waiting for what A sends through the TX ring.
    let b_ns = bed.b.clone();
    let receiver = std::thread::spawn(move || {
        TestBed::in_ns(&b_ns, || {
            let sock = UdpSocket::bind(SocketAddrV4::new(IP_B, 4123)).unwrap();
            recv_until(&sock, Duration::from_secs(5))
        })
    });
    std::thread::sleep(Duration::from_millis(200));

    let report = TestBed::in_ns(&bed.a, || {
        let ifindex = if_index("xa").unwrap();
        // Zero-copy on veth?
        let zc = XskSocket::new(
            Umem::new(UmemConfig { frame_count: 64, ..UmemConfig::default() }).unwrap(),
            ifindex,
            0,
            BindOptions { zero_copy: ZeroCopy::Required, ..BindOptions::default() },
        );
        let zc = match zc {
            Ok(s) => format!("zero-copy bind: ok ({:?})", s.bind_mode()),
            Err(e) => format!("zero-copy bind: {e}"),
        };

        let cfg = XskQueueConfig {
            umem: UmemConfig { frame_count: 256, fill_size: 128, comp_size: 128, ..UmemConfig::default() }
                .with_tx_metadata(),
            bind: BindOptions { rx_size: 128, tx_size: 128, ..BindOptions::default() },
            tx_timestamps: true,
            ..XskQueueConfig::new()
        };
        let mut q = XskQueue::new(ifindex, 0, cfg).unwrap();
        assert_eq!(q.bind_mode(), BindMode::Copy, "veth has no AF_XDP zero-copy");
        let stats = q.statistics().unwrap();
        assert_eq!(stats.rx_invalid_descs + stats.tx_invalid_descs, 0, "{stats:?}");
        let c = q.frame_counts();
        assert_eq!((c.fill, c.free), (128, 128), "fill ring populated: {c:?}");

        let (addr, buf) = q.alloc_tx_frame().unwrap();
        let len = build_udp(buf, (&MAC_A, IP_A, 4000), (&MAC_B, IP_B, 4123), b"chime xsk tx");
        assert!(q.send(addr, len as u32).unwrap());
        let mut stamp = None;
        let end = Instant::now() + Duration::from_secs(2);
        while q.frame_counts().tx > 0 && Instant::now() < end {
            q.reap_completions(|a, ts| {
                assert_eq!(a, addr);
                stamp = ts;
            });
            std::thread::sleep(Duration::from_millis(5));
        }
        let c = q.frame_counts();
        assert_eq!(c.tx, 0, "completion came back: {c:?}");
        assert_eq!(c.completed, 1);
        assert!(q.frames().check_invariant());
        let stats = q.statistics().unwrap();
        assert_eq!(stats.tx_invalid_descs, 0, "{stats:?}");
        // In copy mode the kernel may fill a software (CLOCK_TAI) completion
        // stamp; report what this kernel does.
        let md = TxMetadata::read(q.socket().umem().frame(addr & !4095), 256, 24);
        format!("{zc}; TX metadata completion timestamp in copy mode: {stamp:?} (area {md:?}); stats {stats:?}")
    });
    eprintln!("{report}");
    let got = receiver.join().unwrap();
    let (payload, from) = got.expect("peer received the frame sent through the TX ring");
    assert_eq!(payload, b"chime xsk tx");
    assert_eq!(from, SocketAddrV4::new(IP_A, 4000).into());
}

// --- A minimal XDP program, assembled here (test only) -------------------

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<RawFd> {
    // SAFETY: `attr` is a live, zero-padded bpf_attr prefix of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc as RawFd) }
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by bpf(2) and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapUpdate {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code) | u64::from(dst | (src << 4)) << 8 | u64::from(off as u16) << 16 | u64::from(imm as u32) << 32
}

/// XDP program: `bpf_xdp_adjust_head(ctx, -16)`, write a 16-byte receive
/// header in chime's layout (rx_ns 0x5a5a5a5a, flags 0, the magic) in front
/// of the packet, `return bpf_redirect_map(xsks, rx_queue_index, XDP_PASS)`.
fn xdp_redirect_prog(map_fd: RawFd) -> Vec<u64> {
    vec![
        insn(0xbf, 6, 1, 0, 0),                  // r6 = r1 (ctx)
        insn(0xb7, 2, 0, 0, -16),                // r2 = -16
        insn(0x85, 0, 0, 0, 44),                 // call bpf_xdp_adjust_head
        insn(0x55, 0, 0, 9, 0),                  // if r0 != 0 goto redirect (+9)
        insn(0x61, 2, 6, 0, 0),                  // r2 = ctx->data
        insn(0x61, 3, 6, 4, 0),                  // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),                  // r4 = r2
        insn(0x07, 4, 0, 0, 16),                 // r4 += 16
        insn(0x2d, 4, 3, 4, 0),                  // if r4 > r3 goto redirect (+4)
        insn(0xb7, 5, 0, 0, 0x5a5a_5a5a),        // r5 = 0x5a5a5a5a
        insn(0x7b, 2, 5, 0, 0),                  // *(u64 *)(r2 + 0) = r5 (rx_ns)
        insn(0x62, 2, 0, 8, 0),                  // *(u32 *)(r2 + 8) = 0 (flags)
        insn(0x62, 2, 0, 12, META_MAGIC as i32), // *(u32 *)(r2 + 12) = magic
        // redirect:
        insn(0x61, 2, 6, 16, 0),     // r2 = ctx->rx_queue_index
        insn(0x18, 1, 1, 0, map_fd), // r1 = map (ld_imm64, BPF_PSEUDO_MAP_FD)
        0,
        insn(0xb7, 3, 0, 0, 2),  // r3 = XDP_PASS (action on a missing slot)
        insn(0x85, 0, 0, 0, 51), // call bpf_redirect_map
        insn(0x95, 0, 0, 0, 0),  // exit
    ]
}

/// Loads the program with an XSKMAP holding `xsk_fd` at `queue` and attaches
/// it to `ifindex` through a BPF link (detached when the link fd closes).
/// Returns (link, prog, map) fds and the mode used.
fn attach_redirect(ifindex: u32, queue: u32, xsk_fd: RawFd) -> io::Result<([OwnedFd; 3], &'static str)> {
    let map = owned(bpf(
        BPF_MAP_CREATE,
        &mut MapCreate { map_type: BPF_MAP_TYPE_XSKMAP, key_size: 4, value_size: 4, max_entries: 4, map_flags: 0 },
    )?);
    let (key, value) = (queue, xsk_fd as u32);
    bpf(
        BPF_MAP_UPDATE_ELEM,
        &mut MapUpdate {
            map_fd: map.as_raw_fd() as u32,
            key: &raw const key as u64,
            value: &raw const value as u64,
            ..MapUpdate::default()
        },
    )?;
    let insns = xdp_redirect_prog(map.as_raw_fd());
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 65536];
    let prog = bpf(
        BPF_PROG_LOAD,
        &mut ProgLoad {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            ..ProgLoad::default()
        },
    )
    .map_err(|e| io::Error::new(e.kind(), format!("{e}: {}", String::from_utf8_lossy(&log).trim_end_matches('\0'))))?;
    let prog = owned(prog);
    let mut last = None;
    for (flags, mode) in [(XDP_FLAGS_DRV_MODE, "native"), (XDP_FLAGS_SKB_MODE, "generic")] {
        match bpf(
            BPF_LINK_CREATE,
            &mut LinkCreate { prog_fd: prog.as_raw_fd() as u32, target_ifindex: ifindex, attach_type: BPF_XDP, flags },
        ) {
            Ok(link) => return Ok(([owned(link), prog, map], mode)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap())
}

fn swap_reply(pkt: &mut [u8]) -> Option<usize> {
    if pkt.len() < 42 || pkt[12..14] != [0x08, 0x00] || pkt[23] != 17 {
        return None;
    }
    let (dst, src) = pkt[..12].split_at_mut(6);
    dst.swap_with_slice(src);
    let (s, d) = pkt[26..34].split_at_mut(4);
    s.swap_with_slice(d);
    let (sp, dp) = pkt[34..38].split_at_mut(2);
    sp.swap_with_slice(dp);
    let ulen = u16::from_be_bytes([pkt[38], pkt[39]]) as usize;
    let len = 34 + ulen;
    pkt[42..len].make_ascii_uppercase();
    fix_udp_checksum(&mut pkt[..len]);
    Some(len)
}

#[test]
fn rx_poll_answers_in_place_over_xdp_redirect() {
    need_root!();
    let bed = TestBed::new("rx");
    let a_ns = bed.a.clone();
    let (tx_ready, rx_ready) = std::sync::mpsc::channel();
    let (tx_done, rx_done) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        TestBed::in_ns(&a_ns, move || {
            let ifindex = if_index("xa").unwrap();
            let cfg = XskQueueConfig {
                umem: UmemConfig { frame_count: 128, fill_size: 64, comp_size: 64, ..UmemConfig::default() },
                bind: BindOptions { rx_size: 64, tx_size: 64, ..BindOptions::default() },
                ..XskQueueConfig::new()
            };
            let mut q = XskQueue::new(ifindex, 0, cfg).unwrap();
            let (_fds, mode) = attach_redirect(ifindex, 0, q.socket().as_raw_fd()).expect("attach test XDP program");
            tx_ready.send(mode).unwrap();
            let mut metas = Vec::new();
            let end = Instant::now() + Duration::from_secs(10);
            while rx_done.try_recv().is_err() && Instant::now() < end {
                q.wait(20).unwrap();
                q.poll_rx(32, |pkt, meta| {
                    if let Some(m) = meta {
                        metas.push(m.to_vec());
                    }
                    swap_reply(pkt)
                })
                .unwrap();
            }
            // Let the last completions come back.
            for _ in 0..50 {
                q.poll_rx(32, |_, _| None).unwrap();
                if q.frame_counts().tx == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let c = q.frame_counts();
            assert!(q.frames().check_invariant(), "{c:?}");
            assert_eq!((c.user, c.tx, c.free + c.fill), (0, 0, 128), "every frame accounted for: {c:?}");
            (mode, q.counters(), q.statistics().unwrap(), metas)
        })
    });
    let mode = rx_ready.recv_timeout(Duration::from_secs(10)).expect("server ready");
    let b_ns = bed.b.clone();
    let replies = TestBed::in_ns(&b_ns, || {
        let sock = UdpSocket::bind(SocketAddrV4::new(IP_B, 0)).unwrap();
        let mut ok = 0;
        for i in 0..200u32 {
            let msg = format!("ping {i}");
            sock.send_to(msg.as_bytes(), SocketAddrV4::new(IP_A, 123)).unwrap();
            if let Some((data, from)) = recv_until(&sock, Duration::from_secs(1)) {
                assert_eq!(from, SocketAddrV4::new(IP_A, 123).into());
                assert_eq!(data, msg.to_uppercase().as_bytes());
                ok += 1;
            }
        }
        ok
    });
    tx_done.send(()).unwrap();
    let (mode2, counters, stats, metas) = server.join().unwrap();
    eprintln!("XDP {mode}/{mode2}: {replies}/200 replies; {counters:?}; {stats:?}; {} with metadata", metas.len());
    assert!(replies >= 195, "{replies}/200 answered");
    assert!(counters.tx >= 195);
    assert_eq!(counters.bad_desc, 0);
    assert!(!metas.is_empty(), "the receive header in front of the packet reached userspace");
    let want = XdpMeta { rx_ns: 0x5a5a_5a5a, flags: 0 }.to_bytes();
    assert!(metas.iter().all(|m| *m == want), "receive header as the program wrote it: {:02x?}", metas[0]);
}
