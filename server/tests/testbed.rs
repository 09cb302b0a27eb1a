//! chimed on the netns test bed (the layout of `ops/testbed/testbed.sh`):
//! a server and a client namespace joined by a veth pair with two queues.
//!
//! - a load run: 1,000,000 requests from 32 source ports (spread over both
//!   queues), at least 99 % answered, requests per second printed;
//! - real clients (`chronyd -Q`, `ntpdate -q`) from the client namespace;
//! - non-NTP traffic (ping, a TCP connection) still reaches the server
//!   namespace.
//!
//! Both backends: the socket backend, and the XDP backend (`--backend xdp
//! --interface <server_dev>`), whose load run is a million requests and ends
//! with every UMEM frame accounted for and no program left attached. Root
//! only (skipped with a printed reason otherwise; CI is root).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::*;

/// The test this binary re-runs inside a namespace as the load client or
/// TCP probe; a no-op in a normal run.
const CHILD: &str = "child";

#[test]
fn child() {
    child_main();
}

fn server_v4() -> SocketAddr {
    VethPair::server_ntp()
}

fn server_v6() -> SocketAddr {
    SocketAddr::new(VethPair::SERVER_V6.parse().unwrap(), 123)
}

/// Where chimed serves metrics in the server namespace (reachable from the
/// client namespace).
fn metrics_addr() -> SocketAddr {
    VethPair::server_metrics()
}

/// A two-queue bed with chimed in the server namespace on the wildcard
/// addresses (port 123), rate limiting off (one client sends everything),
/// metrics on 198.18.0.1:9123; waits until it answers.
fn bed_with_chimed(tag: &str, backend: Backend) -> Option<(VethPair, Chimed)> {
    let pair = VethPair::with_queues(tag, 2)?;
    assert_eq!(pair.server_rx_queues(), 2, "two RX queues on the server end");
    let dir = scratch_dir("testbed");
    let cfg = dir.join("chimed.toml");
    std::fs::write(&cfg, "[rate_limit]\nenabled = false\n").unwrap();
    let chimed = pair.start_chimed(backend, &cfg, &[], CHILD);
    Some((pair, chimed))
}

/// `count` requests over IPv4 (and a tenth of that over IPv6), at least
/// 99 % answered, no KoD, no stray replies; prints the rate.
fn load_run(pair: &VethPair, chimed: &Chimed, backend: Backend, count: u64) -> LoadSummary {
    let load = run_load(&pair.client, CHILD, &LoadParams::new(server_v4(), count));
    eprintln!(
        "{backend:?} backend, veth 2 queues, 2 workers: {} sent, {} answered in {:.3} s = {:.0} requests/s answered \
         ({} invalid)",
        load.sent, load.received, load.duration_s, load.rate, load.invalid
    );
    assert_eq!(load.sent, count);
    assert!(load.answered_fraction() >= 0.99, "{load:?}\nchimed:\n{}", chimed.stderr());
    assert_eq!(load.kod, 0, "rate limiting is off");
    assert_eq!(load.invalid, 0, "every reply echoes a request of this run, once");

    let load6 = run_load(&pair.client, CHILD, &LoadParams::new(server_v6(), count / 10));
    assert!(load6.answered_fraction() >= 0.99, "{load6:?}");
    load
}

#[test]
fn socket_backend_answers_a_million_requests_over_two_queues() {
    let Some((pair, mut chimed)) = bed_with_chimed("load", Backend::Socket) else { return };
    load_run(&pair, &chimed, Backend::Socket, 1_000_000);
    assert_eq!(chimed.terminate().map(|s| s.code()), Some(Some(0)), "clean exit; stderr:\n{}", chimed.stderr());
}

/// Whether an XDP program is attached to `dev` in `ns`.
fn xdp_attached(ns: &NetNs, dev: &str) -> bool {
    let out = ns.run("ip", &["-j", "-d", "link", "show", "dev", dev], Duration::from_secs(10));
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).contains("\"xdp\"")
}

/// The receive-stamp kind of chimed's XDP replies: `xdp_ingress`, or
/// `userspace` where the kernel refused `bpf_xdp_adjust_meta` and chimed
/// loaded `chime_xdp_nometa` (it logs that).
fn xdp_stamp_kind(chimed: &Chimed) -> &'static str {
    if chimed.stderr().contains("chime_xdp_nometa") { "userspace" } else { "xdp_ingress" }
}

#[test]
fn xdp_backend_answers_a_million_requests_and_accounts_for_every_frame() {
    let Some((pair, mut chimed)) = bed_with_chimed("xload", Backend::Xdp) else { return };
    assert!(xdp_attached(&pair.server, &pair.server_dev), "program attached while chimed runs");
    load_run(&pair, &chimed, Backend::Xdp, 1_000_000);

    // Let in-flight frames settle (completions are reaped as the idle
    // workers wake), then check the accounting of both queues.
    std::thread::sleep(Duration::from_millis(1500));
    let m = scrape_from(&pair.client, CHILD, metrics_addr());
    for w in ["0", "1"] {
        let frames = |state: &str| {
            metric_value(&m, &format!("chime_xdp_frames{{worker=\"{w}\",state=\"{state}\"}}"))
                .unwrap_or_else(|| panic!("no frame gauge {state} for worker {w}:\n{m}"))
        };
        assert_eq!(frames("user"), 0.0, "worker {w}: frames left in userspace\n{m}");
        assert_eq!(frames("tx"), 0.0, "worker {w}: frames left in TX\n{m}");
        assert_eq!(frames("free") + frames("fill"), 4096.0, "worker {w}: every UMEM frame accounted for\n{m}");
        let ev = |e: &str| metric_value(&m, &format!("chime_xdp_queue_events_total{{worker=\"{w}\",event=\"{e}\"}}"));
        assert_eq!(ev("bad_desc"), Some(0.0), "worker {w}\n{m}");
        assert!(
            ev("rx").unwrap_or(0.0) > 0.0,
            "worker {w} (queue {w}) received nothing: both queues must be used\n{m}"
        );
        assert_eq!(ev("rx"), ev("tx"), "worker {w}: every request answered in its own frame\n{m}");
    }
    let redirected = metric_sum(&m, "chime_xdp_program_packets_total", Some("counter=\"redirect\""));
    assert!(redirected >= 1_000_000.0, "{redirected} redirected\n{m}");
    let kind = format!("kind=\"{}\"", xdp_stamp_kind(&chimed));
    assert!(metric_sum(&m, "chime_replies_by_stamp_total", Some(&kind)) >= 1_000_000.0, "{m}");

    assert_eq!(chimed.terminate().map(|s| s.code()), Some(Some(0)), "clean exit; stderr:\n{}", chimed.stderr());
    assert!(!xdp_attached(&pair.server, &pair.server_dev), "no XDP program left after chimed exits");
}

fn real_clients_and_other_traffic(backend: Backend) {
    let tag = if backend == Backend::Xdp { "xclients" } else { "clients" };
    let Some((pair, mut chimed)) = bed_with_chimed(tag, backend) else { return };

    // Not NTP: ping (v4 and v6) and TCP reach the server namespace.
    if have("ping") {
        for addr in [VethPair::SERVER_V4, VethPair::SERVER_V6] {
            let out = pair.client.run("ping", &["-c", "2", "-i", "0.2", "-W", "2", addr], Duration::from_secs(20));
            assert!(out.status.success(), "ping {addr}: {}", String::from_utf8_lossy(&out.stdout));
        }
    } else {
        eprintln!("skipping ping: iputils-ping is not installed");
    }
    let tcp_v4 = SocketAddr::new(VethPair::SERVER_V4.parse().unwrap(), 4460);
    tcp_works(&pair.server, &pair.client, CHILD, tcp_v4).unwrap();
    let tcp_v6 = SocketAddr::new(VethPair::SERVER_V6.parse().unwrap(), 22);
    tcp_works(&pair.server, &pair.client, CHILD, tcp_v6).unwrap();

    if have("ntpdate") {
        let out = pair.client.run("ntpdate", &["-q", VethPair::SERVER_V4], Duration::from_secs(30));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "ntpdate -q: {text}\nchimed:\n{}", chimed.stderr());
        assert!(text.contains(VethPair::SERVER_V4) && text.contains(" s10 "), "{text}");
        let out = pair.client.run("ntpdig", &["-6", VethPair::SERVER_V6], Duration::from_secs(30));
        assert!(out.status.success(), "ntpdig -6: {}", String::from_utf8_lossy(&out.stderr));
    } else {
        eprintln!("skipping ntpdate: ntpsec-ntpdate is not installed");
    }

    if have("chronyd") {
        let dir = scratch_dir("tb-chronyd");
        let mut cmd = pair.client.cmd("chronyd");
        cmd.args(["-Q", "-t", "20", "-L", "0"])
            .arg(format!("pidfile {}", dir.join("chronyd.pid").display()))
            .arg(format!("server {} iburst maxsamples 4", VethPair::SERVER_V4));
        let out = run_bounded(&mut cmd, Duration::from_secs(40));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success() && text.contains("System clock wrong by"), "chronyd -Q:\n{text}");
    } else {
        eprintln!("skipping chronyd: chrony is not installed");
    }
    if backend == Backend::Xdp {
        // Those answers came through the XDP path, on both queues' program.
        let m = scrape_from(&pair.client, CHILD, metrics_addr());
        let kind = format!("kind=\"{}\"", xdp_stamp_kind(&chimed));
        assert!(metric_sum(&m, "chime_replies_by_stamp_total", Some(&kind)) >= 3.0, "{m}");
        assert_eq!(metric_sum(&m, "chime_replies_by_stamp_total", Some("kind=\"kernel_software\"")), 0.0, "{m}");
    }
    assert_eq!(chimed.terminate().map(|s| s.code()), Some(Some(0)), "clean exit; stderr:\n{}", chimed.stderr());
}

#[test]
fn real_clients_and_other_traffic_across_the_bed() {
    real_clients_and_other_traffic(Backend::Socket);
}

#[test]
fn real_clients_and_other_traffic_with_xdp() {
    real_clients_and_other_traffic(Backend::Xdp);
}

/// chronyd in interleaved mode (`xleave`) from the client namespace: it
/// synchronizes, and chimed's metrics show interleaved replies fed by
/// transmit stamps. Then a short load run, and the residence-time
/// percentiles (T3 - T2) of the backend are printed.
fn interleaved_chronyd(backend: Backend) {
    if !have("chronyd") {
        eprintln!("skipping: chrony is not installed");
        return;
    }
    let tag = if backend == Backend::Xdp { "xxleave" } else { "xleave" };
    let Some((pair, mut chimed)) = bed_with_chimed(tag, backend) else { return };
    let dir = scratch_dir("tb-xleave");
    let mut cmd = pair.client.cmd("chronyd");
    cmd.args(["-Q", "-t", "30", "-L", "0"])
        .arg(format!("pidfile {}", dir.join("chronyd.pid").display()))
        // One source port, so every request of this client hashes to the
        // same queue and worker, whose table holds its T2 -> T3' entries
        // (each XDP worker has its own table; on a NIC, RSS on addresses
        // only gives the same guarantee, see ops/chimed.toml).
        .arg("acquisitionport 12123")
        .arg(format!("server {} iburst xleave maxsamples 6", VethPair::SERVER_V4));
    let out = run_bounded(&mut cmd, Duration::from_secs(50));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success() && text.contains("System clock wrong by"), "chronyd -Q xleave:\n{text}");

    let m = scrape_from(&pair.client, CHILD, metrics_addr());
    let interleaved = metric_sum(&m, "chime_interleaved_replies_total", None);
    let hits = metric_sum(&m, "chime_interleaved_lookups_total", Some("result=\"hit\""));
    let misses = metric_sum(&m, "chime_interleaved_lookups_total", Some("result=\"miss\""));
    let replies = metric_sum(&m, "chime_replies_sent_total", None);
    let tx_stamps = metric_sum(&m, "chime_tx_stamps_total", None);
    eprintln!(
        "{backend:?} backend, chronyd xleave: {replies} replies, {interleaved} interleaved, lookups {hits} hit / \
         {misses} miss, {tx_stamps} TX stamps"
    );
    assert!(interleaved > 0.0, "no interleaved replies\n{m}\nchronyd:\n{text}");
    assert!(tx_stamps > 0.0, "no transmit stamps\n{m}");
    assert!(metric_sum(&m, "chime_tx_stamps_total", Some("kind=\"software\"")) > 0.0, "{m}");

    // Residence while idle (chronyd's few requests), then under a paced
    // load (20,000 requests/s); the histograms are cumulative, and workers
    // publish them about once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let m = scrape_from(&pair.client, CHILD, metrics_addr());
    print_residence(&m, backend, "idle, chronyd only");
    let mut load = LoadParams::new(server_v4(), 100_000);
    load.rate = 20_000;
    let summary = run_load(&pair.client, CHILD, &load);
    assert!(summary.answered_fraction() >= 0.99, "{summary:?}");
    std::thread::sleep(Duration::from_millis(1500));
    let m = scrape_from(&pair.client, CHILD, metrics_addr());
    print_residence(&m, backend, "after 100k requests at 20k/s");
    for stamp in ["written", "precise"] {
        let count = metric_value(&m, &format!("chime_residence_count{{stamp=\"{stamp}\"}}")).unwrap_or(0.0);
        assert!(count >= 100_000.0, "{count} {stamp} residence samples\n{m}");
    }
    assert_eq!(chimed.terminate().map(|s| s.code()), Some(Some(0)), "clean exit; stderr:\n{}", chimed.stderr());
}

/// Prints the residence-time percentiles scraped in `m`.
fn print_residence(m: &str, backend: Backend, phase: &str) {
    for stamp in ["written", "precise"] {
        let q = |quantile: &str| {
            metric_value(m, &format!("chime_residence_seconds{{stamp=\"{stamp}\",quantile=\"{quantile}\"}}"))
                .unwrap_or(f64::NAN)
                * 1e6
        };
        let count = metric_value(m, &format!("chime_residence_count{{stamp=\"{stamp}\"}}")).unwrap_or(0.0);
        eprintln!(
            "{backend:?} backend residence T3-T2 ({stamp} T3; {phase}; {count} replies; veth, 2 queues, debug build): \
             p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
            q("0.5"),
            q("0.9"),
            q("0.99"),
            q("0.999"),
            q("1")
        );
    }
}

#[test]
fn chronyd_xleave_gets_interleaved_replies_over_sockets() {
    interleaved_chronyd(Backend::Socket);
}

#[test]
fn chronyd_xleave_gets_interleaved_replies_over_xdp() {
    interleaved_chronyd(Backend::Xdp);
}

#[test]
fn load_client_counts_only_matching_replies() {
    // The load client itself, on loopback, against a fake server that
    // answers every other request correctly and sends one stray datagram.
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    server.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let fake = std::thread::spawn(move || {
        let mut buf = [0u8; 128];
        let mut i = 0;
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            assert_eq!(n, 48);
            i += 1;
            if i % 2 == 0 {
                continue;
            }
            let mut reply = [0u8; 48];
            reply[0] = 0x24;
            reply[1] = 2;
            reply[24..32].copy_from_slice(&buf[40..48]);
            server.send_to(&reply, from).unwrap();
            if i == 1 {
                server.send_to(&[0u8; 48], from).unwrap();
            }
        }
    });
    let mut p = LoadParams::new(addr, 200);
    p.sockets = 1;
    p.window = 0;
    p.rate = 20_000;
    p.max_time = Duration::from_secs(10);
    let s = run_load_here(&p);
    fake.join().unwrap();
    assert_eq!((s.sent, s.received, s.kod, s.invalid), (200, 100, 0, 1), "{s:?}");
    assert!((s.answered_fraction() - 0.5).abs() < 1e-9);
    assert_eq!(LoadSummary::from_line(&s.to_line()).unwrap().received, 100);
    assert_eq!(LoadSummary::from_line("{\"sent\":1,\"bogus\":2}"), None);
}

#[test]
fn testbed_script_is_idempotent() {
    if !is_root() || !have("ip") {
        eprintln!("skipping: the test bed script needs root and iproute2");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/testbed/testbed.sh");
    let name = format!("tb{}", std::process::id() % 100_000);
    let run = |arg: &str| Command::new("bash").args([script, arg, &name]).output().unwrap();
    struct Down<'a>(&'a dyn Fn(&str) -> std::process::Output);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = (self.0)("down");
        }
    }
    let _down = Down(&run);
    assert!(run("up").status.success());
    assert!(!run("up").status.success(), "up twice is refused");
    let status = run("status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(text.contains("198.18.0.1/30") && text.contains("fdc4:1e::2/64"), "{text}");
    assert!(text.contains("rx queues 2, tx queues 2"), "{text}");
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("{name}-cli"), "ip", "-6", "route", "get", "fdc4:1e::1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(run("down").status.success());
    assert!(run("down").status.success(), "down twice is fine");
    assert!(!run("status").status.success(), "status of an absent bed fails");
}
