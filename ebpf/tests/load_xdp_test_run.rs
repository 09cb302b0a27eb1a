//! chime-load's XDP program run by the kernel over a table of frames
//! (`BPF_PROG_TEST_RUN`): the server's replies to the source prefix are
//! steered (stamped), everything else passes, and exactly one counter moves
//! per frame. Root only.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use chime_ebpf::load_xdp::{LoadCounter, LoadStats, LoadXdpConfig, LoadXdpProgram, PROG_NOMETA};
use chime_ebpf::loader::TestRun;
use common::*;

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// The simulated clients' prefixes.
const PREFIX_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
const PREFIX_V6: Ipv6Addr = Ipv6Addr::new(0xfdc4, 0x1e, 0x1, 0, 0, 0, 0, 0);

fn config() -> LoadXdpConfig {
    LoadXdpConfig { port: 123, v4: Some((PREFIX_V4, 16)), v6: Some((PREFIX_V6, 64)) }
}

fn program() -> LoadXdpProgram {
    LoadXdpProgram::load(&config()).expect("load chime_load_xdp (verifier log above if it failed)")
}

/// A reply from the server's port 123 to `client`, port 40123.
fn reply(client: IpAddr) -> Frame {
    let server: IpAddr = if client.is_ipv4() { SERVER_V4.into() } else { SERVER_V6.into() };
    Frame { sport: 123, ..Frame::udp(server, client, 40123, ntp(4, 48)) }
}

fn delta(after: &LoadStats, before: &LoadStats) -> Vec<(LoadCounter, u64)> {
    LoadCounter::ALL.iter().map(|&c| (c, after[c.index()] - before[c.index()])).filter(|(_, v)| *v != 0).collect()
}

/// Runs `frame` once; asserts the action and that exactly `counter` moved.
fn check(prog: &LoadXdpProgram, what: &str, frame: &[u8], action: u32, counter: LoadCounter) -> TestRun {
    let before = prog.stats().unwrap();
    let run = prog.test_run(frame).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(run.action, action, "{what}: action");
    assert_eq!(delta(&prog.stats().unwrap(), &before), vec![(counter, 1)], "{what}: counters");
    assert_eq!(run.data, frame, "{what}: packet unchanged");
    run
}

fn check_steered(prog: &LoadXdpProgram, what: &str, frame: &[u8]) {
    let run = check(prog, what, frame, XDP_PASS, LoadCounter::PassNoSocket);
    if prog.name() == PROG_NOMETA {
        // A kernel that refuses bpf_xdp_adjust_meta: no stamp, by design.
        assert_eq!((run.meta_len, run.meta), (0, None), "{what}");
        return;
    }
    let meta = run.meta.unwrap_or_else(|| panic!("{what}: no receive stamp"));
    assert!(!meta.is_hw() && meta.rx_ns > 0, "{what}: {meta:?}");
}

fn check_passed(prog: &LoadXdpProgram, what: &str, frame: &[u8], counter: LoadCounter) {
    let run = check(prog, what, frame, XDP_PASS, counter);
    assert_eq!(run.meta, None, "{what}: no metadata on passed frames");
}

#[test]
fn load_verdict_table() {
    if !root_or_skip("load_verdict_table") {
        return;
    }
    let prog = program();
    let in4: IpAddr = "198.19.200.7".parse().unwrap();
    let in6: IpAddr = "fdc4:1e:1::abcd".parse().unwrap();
    check_steered(&prog, "IPv4 reply to the prefix", &reply(in4).build());
    check_steered(&prog, "IPv4 reply, first address", &reply("198.19.0.0".parse().unwrap()).build());
    check_steered(&prog, "IPv4 reply, last address", &reply("198.19.255.255".parse().unwrap()).build());
    check_steered(&prog, "IPv6 reply to the prefix", &reply(in6).build());
    check_steered(&prog, "NTS-sized reply", &Frame { payload: ntp(4, 228), ..reply(in4) }.build());
    let mut opts = reply(in4);
    opts.ip_options = vec![1, 1, 1, 0];
    check_steered(&prog, "IPv4 with options", &opts.build());

    let other = LoadCounter::PassOther;
    check_passed(&prog, "IPv4 reply outside the /16", &reply("198.20.0.1".parse().unwrap()).build(), other);
    check_passed(&prog, "IPv4 reply to the host address", &reply("198.18.0.2".parse().unwrap()).build(), other);
    check_passed(&prog, "IPv6 reply outside the /64", &reply("fdc4:1e:2::1".parse().unwrap()).build(), other);
    check_passed(&prog, "IPv6 reply to the host address", &reply(CLIENT_V6.into()).build(), other);
    check_passed(&prog, "from port 124", &Frame { sport: 124, ..reply(in4) }.build(), other);
    let request = Frame::udp(in4, SERVER_V4.into(), 123, ntp(3, 48));
    check_passed(&prog, "a request to port 123", &request.build(), other);

    check_passed(&prog, "ARP", &arp(), LoadCounter::PassNotIp);
    let mut tagged = reply(in4);
    tagged.vlans = vec![5];
    check_passed(&prog, "VLAN-tagged reply", &tagged.build(), LoadCounter::PassNotIp);
    let mut icmp6 = Frame::udp(SERVER_V6.into(), "ff02::1:ff00:2".parse().unwrap(), 0, vec![0; 24]);
    icmp6.proto = 58;
    check_passed(&prog, "ICMPv6 (NDP)", &icmp6.build(), LoadCounter::PassNotUdp);
    let mut tcp = Frame::udp(SERVER_V4.into(), CLIENT_V4.into(), 40000, Vec::new());
    tcp.proto = 6;
    tcp.sport = 4460;
    check_passed(&prog, "TCP from NTS-KE", &tcp.build(), LoadCounter::PassNotUdp);
    let mut hbh = reply(in6);
    hbh.hop_by_hop = true;
    check_passed(&prog, "IPv6 hop-by-hop", &hbh.build(), LoadCounter::PassNotUdp);
    let mut frag = reply(in4);
    frag.frag_off = 0x2000;
    check_passed(&prog, "IPv4 fragment", &frag.build(), LoadCounter::PassFragment);

    let full = reply(in4).build();
    check_passed(&prog, "Ethernet only", &full[..14], LoadCounter::PassMalformed);
    check_passed(&prog, "IPv4 cut", &full[..14 + 19], LoadCounter::PassMalformed);
    check_passed(&prog, "UDP cut", &full[..14 + 20 + 7], LoadCounter::PassMalformed);
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x44;
    check_passed(&prog, "IHL 4", &bad_ihl, LoadCounter::PassMalformed);
    let v6 = reply(in6).build();
    check_passed(&prog, "IPv6 cut", &v6[..14 + 39], LoadCounter::PassMalformed);

    // A family without a prefix is never steered; another port is.
    prog.set_config(&LoadXdpConfig { port: 4123, v4: Some((PREFIX_V4, 16)), v6: None }).unwrap();
    check_passed(&prog, "IPv6 with no v6 prefix", &Frame { sport: 4123, ..reply(in6) }.build(), other);
    check_passed(&prog, "port 123 when 4123 configured", &reply(in4).build(), other);
    check_steered(&prog, "port 4123", &Frame { sport: 4123, ..reply(in4) }.build());
}

/// Pseudo-random frames and every truncation of a reply: each run moves
/// exactly one counter.
#[test]
fn load_garbage_frames_are_counted_once() {
    if !root_or_skip("load_garbage_frames_are_counted_once") {
        return;
    }
    let prog = program();
    let bases = [reply("198.19.1.1".parse().unwrap()).build(), reply("fdc4:1e:1::1".parse().unwrap()).build()];
    let frames = garbage_frames(&bases, 0x2545_f491_4f6c_dd1d);
    let before = prog.stats().unwrap();
    for f in &frames {
        let run = prog.test_run(f).expect("test run");
        assert!(matches!(run.action, XDP_PASS | XDP_REDIRECT), "action {}", run.action);
    }
    let after = prog.stats().unwrap();
    let moved: u64 = delta(&after, &before).iter().map(|(_, v)| v).sum();
    assert_eq!(moved, frames.len() as u64);
}

/// With a socket in `xsks` for the queue a reply is redirected.
#[test]
fn load_registered_socket_redirects() {
    if !root_or_skip("load_registered_socket_redirects") {
        return;
    }
    let prog = program();
    // SAFETY: plain socket(2) call; the result is checked and closed below.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket(AF_XDP): {}", std::io::Error::last_os_error());
    match prog.register_socket(0, fd) {
        Ok(()) => {
            let run = check(
                &prog,
                "reply with a socket",
                &reply("198.19.1.1".parse().unwrap()).build(),
                XDP_REDIRECT,
                LoadCounter::Redirect,
            );
            assert_eq!(run.meta.is_some(), prog.name() != PROG_NOMETA);
            prog.unregister_socket(0).unwrap();
        }
        Err(e) => eprintln!("kernel refused an unbound AF_XDP socket in the XSKMAP ({e}); covered by the netns tests"),
    }
    prog.unregister_socket(0).unwrap();
    // SAFETY: `fd` is ours and not used after this.
    unsafe { libc::close(fd) };
}
