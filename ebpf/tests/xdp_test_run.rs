//! The XDP program run by the kernel over a table of frames
//! (`BPF_PROG_TEST_RUN`): expected action and the one verdict counter that
//! moves, plus the metadata written for steered frames. Root only.

mod common;

use std::net::{IpAddr, Ipv6Addr};

use chime_ebpf::loader::{ProgramOptions, XdpProgram};
use chime_ebpf::program::{SourceLimit, XdpConfig, XdpCounter, XdpStats};
use common::*;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

fn program(drop_non_client: bool) -> XdpProgram {
    let config = XdpConfig { drop_non_client, ..XdpConfig::default() };
    let prog =
        XdpProgram::load(&ProgramOptions::software(config)).expect("load chime_xdp (verifier log above if it failed)");
    prog.set_servers(&[SERVER_V4], &[SERVER_V6]).unwrap();
    prog.set_denied(&[("198.51.100.0".parse().unwrap(), 24), ("2001:db8:bad::".parse().unwrap(), 48)]).unwrap();
    prog
}

fn tai_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer for clock_gettime.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_TAI, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `frame` once; asserts the action, that exactly one verdict counter
/// moved (by one) and that it is `counter`; returns the run and the deltas.
fn check(
    prog: &XdpProgram,
    what: &str,
    frame: &[u8],
    action: u32,
    counter: XdpCounter,
) -> (chime_ebpf::loader::TestRun, XdpStats) {
    let before = prog.stats().unwrap();
    let run = prog.test_run(frame).unwrap_or_else(|e| panic!("{what}: {e}"));
    let delta = prog.stats().unwrap().since(&before);
    assert_eq!(run.action, action, "{what}: action");
    let moved: Vec<_> = delta.iter().filter(|(c, v)| c.is_verdict() && *v != 0).collect();
    assert_eq!(moved, vec![(counter, 1)], "{what}: verdict counters");
    (run, delta)
}

/// A steered frame with no socket on queue 0: stamped (counted), and passed
/// to the kernel as it came (the receive header taken off again).
fn check_steered(prog: &XdpProgram, what: &str, frame: &[u8]) {
    let (run, delta) = check(prog, what, frame, XDP_PASS, XdpCounter::PassNoSocket);
    assert_eq!(delta.get(XdpCounter::StampSw), 1, "{what}: software stamp counted");
    assert_eq!(delta.get(XdpCounter::StampHw), 0, "{what}");
    assert_eq!(delta.get(XdpCounter::MetaFailed), 0, "{what}");
    assert_eq!((run.meta, run.meta_len), (None, 0), "{what}: no receive header left on a passed frame");
    assert_eq!(run.data, frame, "{what}: packet unchanged");
}

fn check_passed(prog: &XdpProgram, what: &str, frame: &[u8], counter: XdpCounter) {
    let (run, delta) = check(prog, what, frame, XDP_PASS, counter);
    assert_eq!(run.meta, None, "{what}: no metadata on passed frames");
    assert_eq!(delta.get(XdpCounter::StampSw), 0, "{what}");
}

fn check_dropped(prog: &XdpProgram, what: &str, frame: &[u8], counter: XdpCounter) {
    check(prog, what, frame, XDP_DROP, counter);
}

#[test]
fn verdict_table() {
    if !root_or_skip("verdict_table") {
        return;
    }
    let prog = program(true);
    let good = ntp(3, 48);

    check_steered(&prog, "IPv4 NTP", &Frame::ntp4(good.clone()).build());
    check_steered(&prog, "IPv6 NTP", &Frame::ntp6(good.clone()).build());
    check_steered(&prog, "IPv4 NTP, NTS-sized", &Frame::ntp4(ntp(3, 228)).build());
    let mut f = Frame::ntp4(good.clone());
    f.vlans = vec![100];
    check_steered(&prog, "802.1Q IPv4 NTP", &f.build());
    f.vlans = vec![0x8000 | 100];
    check_steered(&prog, "802.1AD IPv4 NTP", &f.build());
    let mut f = Frame::ntp6(good.clone());
    f.vlans = vec![7];
    check_steered(&prog, "802.1Q IPv6 NTP", &f.build());
    let mut f = Frame::ntp4(good.clone());
    f.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL: IHL 6
    check_steered(&prog, "IPv4 with options", &f.build());

    check_dropped(&prog, "payload 47 bytes", &Frame::ntp4(ntp(3, 47)).build(), XdpCounter::DropShort);
    check_dropped(&prog, "IPv6 payload 47 bytes", &Frame::ntp6(ntp(3, 47)).build(), XdpCounter::DropShort);
    check_dropped(&prog, "empty UDP", &Frame::ntp4(Vec::new()).build(), XdpCounter::DropShort);
    let mut short = Frame::ntp4(good.clone()).build();
    short.truncate(short.len() - 1); // UDP length says 48, frame holds 47
    check_dropped(&prog, "frame shorter than UDP length", &short, XdpCounter::DropShort);

    check_dropped(&prog, "mode 6", &Frame::ntp4(ntp(6, 48)).build(), XdpCounter::DropNotClient);
    check_dropped(&prog, "mode 7 IPv6", &Frame::ntp6(ntp(7, 48)).build(), XdpCounter::DropNotClient);
    check_dropped(&prog, "mode 4 (server)", &Frame::ntp4(ntp(4, 48)).build(), XdpCounter::DropNotClient);

    let denied4 = Frame::udp("198.51.100.77".parse().unwrap(), SERVER_V4.into(), 123, good.clone());
    check_dropped(&prog, "denied IPv4 source", &denied4.build(), XdpCounter::DropDenied);
    let denied6 = Frame::udp("2001:db8:bad:1::9".parse().unwrap(), SERVER_V6.into(), 123, good.clone());
    check_dropped(&prog, "denied IPv6 source", &denied6.build(), XdpCounter::DropDenied);
    let near6 = Frame::udp("2001:db8:bae::9".parse().unwrap(), SERVER_V6.into(), 123, good.clone());
    check_steered(&prog, "IPv6 source just outside the denied /48", &near6.build());

    let other_port = Frame::udp(CLIENT_V4.into(), SERVER_V4.into(), 53, good.clone());
    check_passed(&prog, "UDP to port 53", &other_port.build(), XdpCounter::PassOtherPort);
    let src_port_123 = Frame { sport: 123, ..Frame::udp(CLIENT_V4.into(), SERVER_V4.into(), 40000, good.clone()) };
    check_passed(&prog, "UDP from port 123", &src_port_123.build(), XdpCounter::PassOtherPort);
    let other_dst = Frame::udp(CLIENT_V4.into(), "192.0.2.99".parse().unwrap(), 123, good.clone());
    check_passed(&prog, "NTP to another IPv4 address", &other_dst.build(), XdpCounter::PassOtherDest);
    let other_dst6 = Frame::udp(CLIENT_V6.into(), "2001:db8::2".parse().unwrap(), 123, good.clone());
    check_passed(&prog, "NTP to another IPv6 address", &other_dst6.build(), XdpCounter::PassOtherDest);
    let denied_other_dst =
        Frame::udp("198.51.100.77".parse().unwrap(), "192.0.2.99".parse().unwrap(), 123, good.clone());
    check_passed(&prog, "denied source, not our address", &denied_other_dst.build(), XdpCounter::PassOtherDest);

    let mut frag = Frame::ntp4(good.clone());
    frag.frag_off = 0x2000; // MF
    check_passed(&prog, "IPv4 first fragment", &frag.build(), XdpCounter::PassFragment);
    frag.frag_off = 0x0010; // offset 128 bytes
    check_passed(&prog, "IPv4 later fragment", &frag.build(), XdpCounter::PassFragment);
    frag.frag_off = 0x4000; // DF only: not a fragment
    check_steered(&prog, "IPv4 DF", &frag.build());

    let mut hbh = Frame::ntp6(good.clone());
    hbh.hop_by_hop = true;
    check_passed(&prog, "IPv6 hop-by-hop", &hbh.build(), XdpCounter::PassIpv6Ext);

    check_passed(&prog, "ARP", &arp(), XdpCounter::PassNotIp);
    let mut tcp = Frame::udp(CLIENT_V4.into(), SERVER_V4.into(), 4460, Vec::new());
    tcp.proto = 6;
    check_passed(&prog, "TCP to 4460", &tcp.build(), XdpCounter::PassNotUdp);
    let mut tcp6 = Frame::udp(CLIENT_V6.into(), SERVER_V6.into(), 22, Vec::new());
    tcp6.proto = 6;
    check_passed(&prog, "TCP/IPv6 to 22", &tcp6.build(), XdpCounter::PassNotUdp);
    let mut icmp6 = Frame::udp(CLIENT_V6.into(), "ff02::1:ff00:1".parse::<Ipv6Addr>().unwrap().into(), 0, vec![0; 24]);
    icmp6.proto = 58;
    check_passed(&prog, "ICMPv6 (NDP)", &icmp6.build(), XdpCounter::PassNotUdp);
    let mut qinq = Frame::ntp4(good.clone());
    qinq.vlans = vec![0x8000 | 10, 20];
    check_passed(&prog, "two VLAN tags", &qinq.build(), XdpCounter::PassNotIp);

    // Truncated and invalid headers.
    let full = Frame::ntp4(good.clone()).build();
    // Frames shorter than an Ethernet header: BPF_PROG_TEST_RUN refuses
    // them (EINVAL) before the program runs, and so do real drivers.
    assert!(prog.test_run(&full[..13]).is_err());
    check_passed(&prog, "Ethernet only", &full[..14], XdpCounter::PassMalformed);
    check_passed(&prog, "IPv4 cut", &full[..14 + 19], XdpCounter::PassMalformed);
    check_passed(&prog, "UDP cut", &full[..14 + 20 + 7], XdpCounter::PassMalformed);
    let mut vlan = Frame::ntp4(good.clone());
    vlan.vlans = vec![5];
    check_passed(&prog, "VLAN tag cut", &vlan.build()[..16], XdpCounter::PassMalformed);
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x44;
    check_passed(&prog, "IHL 4", &bad_ihl, XdpCounter::PassMalformed);
    let mut big_ihl = full.clone();
    big_ihl[14] = 0x4f; // 60-byte header: UDP header falls beyond the frame's start of payload
    let big_ihl = &big_ihl[..14 + 60 + 4];
    check_passed(&prog, "IHL 15, frame too short", big_ihl, XdpCounter::PassMalformed);
    let mut bad_version = full.clone();
    bad_version[14] = 0x65;
    check_passed(&prog, "IPv4 ethertype, version 6", &bad_version, XdpCounter::PassMalformed);
    let v6 = Frame::ntp6(good.clone()).build();
    check_passed(&prog, "IPv6 cut", &v6[..14 + 39], XdpCounter::PassMalformed);
}

#[test]
fn mode_filter_can_be_turned_off() {
    if !root_or_skip("mode_filter_can_be_turned_off") {
        return;
    }
    let prog = program(false);
    check_steered(&prog, "mode 6, drop_non_client off", &Frame::ntp4(ntp(6, 48)).build());
    prog.set_config(&XdpConfig::default()).unwrap();
    check_dropped(&prog, "mode 6, drop_non_client on", &Frame::ntp4(ntp(6, 48)).build(), XdpCounter::DropNotClient);
}

#[test]
fn configured_port_and_address_sets_are_replaced() {
    if !root_or_skip("configured_port_and_address_sets_are_replaced") {
        return;
    }
    let prog = program(true);
    prog.set_config(&XdpConfig { port: 1123, ..XdpConfig::default() }).unwrap();
    let on_1123 = Frame::udp(CLIENT_V4.into(), SERVER_V4.into(), 1123, ntp(3, 48));
    check_steered(&prog, "port 1123", &on_1123.build());
    check_passed(&prog, "port 123 when 1123 configured", &Frame::ntp4(ntp(3, 48)).build(), XdpCounter::PassOtherPort);
    prog.set_config(&XdpConfig::default()).unwrap();

    // Replace the server set: the old address passes, the new one is steered.
    let new4 = "192.0.2.50".parse().unwrap();
    prog.set_servers(&[new4], &[]).unwrap();
    check_passed(&prog, "old IPv4 server address", &Frame::ntp4(ntp(3, 48)).build(), XdpCounter::PassOtherDest);
    check_passed(&prog, "removed IPv6 server address", &Frame::ntp6(ntp(3, 48)).build(), XdpCounter::PassOtherDest);
    check_steered(
        &prog,
        "new IPv4 server address",
        &Frame::udp(CLIENT_V4.into(), IpAddr::V4(new4), 123, ntp(3, 48)).build(),
    );

    // Replace the deny list: the /24 is gone, a /32 for the client is in.
    prog.set_denied(&[(IpAddr::V4(CLIENT_V4), 32)]).unwrap();
    let was_denied = Frame::udp("198.51.100.77".parse().unwrap(), IpAddr::V4(new4), 123, ntp(3, 48));
    check_steered(&prog, "no longer denied", &was_denied.build());
    let now_denied = Frame::udp(CLIENT_V4.into(), IpAddr::V4(new4), 123, ntp(3, 48));
    check_dropped(&prog, "newly denied /32", &now_denied.build(), XdpCounter::DropDenied);
    assert!(prog.set_denied(&[(IpAddr::V4(CLIENT_V4), 33)]).is_err());
    prog.set_denied(&[("0.0.0.0".parse().unwrap(), 0)]).unwrap();
    check_dropped(
        &prog,
        "deny all IPv4",
        &Frame::udp(CLIENT_V4.into(), IpAddr::V4(new4), 123, ntp(3, 48)).build(),
        XdpCounter::DropDenied,
    );
}

/// Pseudo-random frames (fixed seed) and every truncation of valid ones: the
/// program never errors, and every run moves exactly one verdict counter.
#[test]
fn garbage_frames_are_counted_once() {
    if !root_or_skip("garbage_frames_are_counted_once") {
        return;
    }
    let prog = program(true);
    let bases = [Frame::ntp4(ntp(3, 48)).build(), Frame::ntp6(ntp(3, 48)).build(), {
        let mut f = Frame::ntp4(ntp(3, 48));
        f.vlans = vec![3];
        f.build()
    }];
    let frames = garbage_frames(&bases, 0x9e37_79b9_7f4a_7c15);
    let before = prog.stats().unwrap();
    for f in &frames {
        let run = prog.test_run(f).expect("test run");
        assert!(matches!(run.action, XDP_PASS | XDP_DROP | XDP_REDIRECT), "action {}", run.action);
    }
    let delta = prog.stats().unwrap().since(&before);
    assert_eq!(delta.packets(), frames.len() as u64, "{delta:?}");
}

/// With a socket in `xsks` for the queue the verdict is XDP_REDIRECT
/// (test runs do not carry the redirect out).
#[test]
fn registered_socket_redirects() {
    if !root_or_skip("registered_socket_redirects") {
        return;
    }
    let prog = program(true);
    // SAFETY: plain socket(2) call; the result is checked and closed below.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket(AF_XDP): {}", std::io::Error::last_os_error());
    let res = prog.register_socket(0, fd);
    match res {
        Ok(()) => {
            let t0 = tai_now_ns();
            let (run, delta) = check(
                &prog,
                "IPv4 NTP with a socket",
                &Frame::ntp4(ntp(3, 48)).build(),
                XDP_REDIRECT,
                XdpCounter::Redirect,
            );
            let t1 = tai_now_ns();
            assert_eq!(delta.get(XdpCounter::StampSw), 1);
            let meta = run.meta.expect("receive header in front of the redirected frame");
            assert!(!meta.is_hw());
            assert!(t0 <= meta.rx_ns && meta.rx_ns <= t1, "rx_ns {} not in [{t0}, {t1}] (CLOCK_TAI)", meta.rx_ns);
            assert_eq!(run.data, Frame::ntp4(ntp(3, 48)).build(), "packet after the header");
            prog.unregister_socket(0).unwrap();
            check(&prog, "after unregister", &Frame::ntp4(ntp(3, 48)).build(), XDP_PASS, XdpCounter::PassNoSocket);
        }
        Err(e) => eprintln!(
            "registered_socket_redirects: kernel refused an unbound AF_XDP socket in the XSKMAP ({e}); REDIRECT covered by the netns tests only"
        ),
    }
    prog.unregister_socket(0).unwrap();
    prog.unregister_socket(7).unwrap();
    // SAFETY: `fd` is ours and not used after this.
    unsafe { libc::close(fd) };
}

/// Pins the calling thread to one CPU: the per-source limit keeps one
/// schedule per CPU, and a test run executes on the CPU of its caller.
fn pin_to_current_cpu() {
    // SAFETY: sched_getcpu has no arguments; a negative result is checked.
    let cpu = unsafe { libc::sched_getcpu() };
    assert!(cpu >= 0, "sched_getcpu: {}", std::io::Error::last_os_error());
    // SAFETY: cpu_set_t is a plain bit set; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of `set`; sched_getcpu's result is below
    // CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(rc, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
}

/// The per-source limit: a source is steered for its burst, then dropped
/// under `drop_flood` while other sources (IPv4 and IPv6) still pass; the
/// refill lets it through again; the limit changes live and turns off.
#[test]
fn a_source_over_its_burst_is_dropped_as_a_flood_and_others_still_pass() {
    if !root_or_skip("a_source_over_its_burst_is_dropped_as_a_flood_and_others_still_pass") {
        return;
    }
    pin_to_current_cpu();
    let limit = SourceLimit { rate: 20, burst: 5 }; // 50 ms per request
    let prog = XdpProgram::load(&ProgramOptions {
        source_entries: 1024,
        ..ProgramOptions::software(XdpConfig { source_limit: Some(limit), ..XdpConfig::default() })
    })
    .unwrap();
    prog.set_servers(&[SERVER_V4], &[SERVER_V6]).unwrap();
    let from = |src: &str, v6: bool| {
        let dst = if v6 { IpAddr::V6(SERVER_V6) } else { IpAddr::V4(SERVER_V4) };
        Frame::udp(src.parse().unwrap(), dst, 123, ntp(3, 48)).build()
    };
    let flood4 = from("203.0.113.66", false);
    let flood6 = from("2001:db8:f100::d", true);
    for (name, frame) in [("IPv4", &flood4), ("IPv6", &flood6)] {
        for i in 0..5 {
            check_steered(&prog, &format!("{name} flood source, request {i} of its burst"), frame);
        }
        check_dropped(&prog, &format!("{name} flood source over its burst"), frame, XdpCounter::DropFlood);
        check_dropped(&prog, &format!("{name} flood source, again"), frame, XdpCounter::DropFlood);
    }
    check_steered(&prog, "another IPv4 source", &from("203.0.113.67", false));
    check_steered(&prog, "another IPv6 source", &from("2001:db8:f100::e", true));
    check_steered(&prog, "the IPv4 flood source's address as IPv6", &from("2001:db8::cb00:7142", true));
    assert_eq!(prog.tracked_sources(), 5);

    // At 20/s a request is due every 50 ms: after 150 ms one passes again.
    std::thread::sleep(std::time::Duration::from_millis(150));
    check_steered(&prog, "IPv4 flood source after a refill", &flood4);

    // Live: a raised limit applies at once, also to a source the old one
    // held back (its schedule was up to 250 ms ahead).
    for _ in 0..5 {
        let _ = prog.test_run(&flood4).unwrap();
    }
    check_dropped(&prog, "IPv4 flood source, held back at 20/s", &flood4, XdpCounter::DropFlood);
    prog.set_source_limit(Some(SourceLimit { rate: 1000, burst: 1 })).unwrap();
    check_steered(&prog, "IPv4 flood source right after the limit was raised", &flood4);
    check_dropped(&prog, "and paced at the new rate", &flood4, XdpCounter::DropFlood);

    // Live: a burst of 1 at 1/s; then no limit at all.
    prog.set_source_limit(Some(SourceLimit { rate: 1, burst: 1 })).unwrap();
    let fresh = from("203.0.113.99", false);
    check_steered(&prog, "new source, burst 1", &fresh);
    check_dropped(&prog, "new source, second request", &fresh, XdpCounter::DropFlood);
    prog.set_source_limit(None).unwrap();
    assert_eq!(prog.config().port, 123, "the rest of the config is kept");
    for i in 0..10 {
        check_steered(&prog, &format!("no limit, request {i}"), &flood4);
    }
}
