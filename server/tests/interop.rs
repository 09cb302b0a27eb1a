//! chimed end to end: real NTP clients from Debian's packages (chrony's
//! `chronyd -Q`, ntpsec's `ntpdate -q`) and chime-proto's own client, on
//! loopback and inside private network namespaces.
//!
//! Tests that need a real client skip with a printed reason when it is not
//! installed (`scripts/deps.sh` installs them; CI always has them); tests
//! that need namespaces skip when not root (CI is root).

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use chime_proto::packet::{LeapIndicator, Mode, RefId};
use common::*;

fn chronyd_cmd(ns: Option<&NetNs>) -> Option<Command> {
    if !have("chronyd") {
        eprintln!("skipping: chronyd (Debian package chrony) is not installed");
        return None;
    }
    Some(match ns {
        Some(ns) => ns.cmd("chronyd"),
        None => Command::new(which("chronyd").unwrap()),
    })
}

/// Runs `chronyd -Q` against `server:port`; returns its combined output
/// after asserting success and the offset line.
fn chronyd_accepts(mut cmd: Command, server: &str, port: u16) -> String {
    let dir = scratch_dir("chronyd");
    cmd.args(["-Q", "-t", "20", "-L", "0"])
        .arg(format!("pidfile {}", dir.join("chronyd.pid").display()))
        .arg(format!("server {server} port {port} iburst maxsamples 4"));
    let out = run_bounded(&mut cmd, Duration::from_secs(40));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "chronyd -Q failed ({}):\n{text}", out.status);
    assert!(text.contains("System clock wrong by"), "no offset reported:\n{text}");
    text
}

/// Parses the offset chronyd -Q reports ("System clock wrong by X seconds").
fn chrony_offset(text: &str) -> f64 {
    let rest = text.split("System clock wrong by ").nth(1).expect("offset line");
    rest.split_whitespace().next().unwrap().parse().expect("offset number")
}

#[test]
fn chronyd_accepts_chimed_on_loopback() {
    let Some(cmd) = chronyd_cmd(None) else { return };
    let chimed = Chimed::start(&["--local-stratum", "10"]);
    let text = chronyd_accepts(cmd, "127.0.0.1", chimed.ntp.port());
    // Same host, same clock: the offset is tiny.
    let offset = chrony_offset(&text);
    assert!(offset.abs() < 0.01, "offset {offset} s:\n{text}");
}

#[test]
fn chronyd_and_ntpdate_accept_chimed_in_a_namespace() {
    let Some(ns) = NetNs::new("interop") else { return };
    if !have("ntpdig") {
        eprintln!("skipping: ntpdate/ntpdig (Debian package ntpsec-ntpdate) is not installed");
        return;
    }
    // Inside a fresh namespace port 123 is ours: chimed runs on its real
    // port with the built-in defaults, except metrics off and local stratum.
    let ntp: SocketAddr = (Ipv4Addr::LOCALHOST, 123).into();
    let mut chimed = Chimed::spawn(
        Some(&ns.name),
        &["--local-stratum", "10", "--no-metrics", "--listen", "127.0.0.1:123", "--listen", "[::1]:123"],
        ntp,
        None,
    );
    // Readiness: poll with ntpdig itself (the namespace is not reachable
    // from the test process).
    let mut last = String::new();
    let mut ok = false;
    for _ in 0..40 {
        let out = run_bounded(ns.cmd("ntpdate").args(["-q", "127.0.0.1"]), Duration::from_secs(20));
        last = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(ok, "ntpdate -q never succeeded; last output:\n{last}\nchimed:\n{}", chimed.stderr());
    // ntpdig prints "... +0.000012 +/- 0.000123 127.0.0.1 s10 no-leap".
    assert!(last.contains(" s10 "), "stratum 10 expected:\n{last}");

    let out = run_bounded(ns.cmd("ntpdig").args(["-6", "::1"]), Duration::from_secs(20));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ntpdig over IPv6 failed: {text} {}", String::from_utf8_lossy(&out.stderr));

    let Some(cmd) = chronyd_cmd(Some(&ns)) else { return };
    chronyd_accepts(cmd, "127.0.0.1", 123);
    assert_eq!(chimed.terminate().map(|s| s.code()), Some(Some(0)), "clean exit; stderr:\n{}", chimed.stderr());
}

#[test]
fn clients_across_a_veth_pair_get_answers_from_the_right_address() {
    let Some(pair) = VethPair::new("veth") else { return };
    if !have("ntpdig") {
        eprintln!("skipping: ntpdig (Debian package ntpsec-ntpdate) is not installed");
        return;
    }
    // chimed binds the wildcard addresses (the defaults); replies must come
    // from the address each request was sent to, v4 and v6.
    let ntp: SocketAddr = (Ipv4Addr::LOCALHOST, 123).into();
    let chimed = Chimed::spawn(Some(&pair.server.name), &["--local-stratum", "3", "--no-metrics"], ntp, None);
    let mut last = String::new();
    let mut ok = false;
    for _ in 0..40 {
        let out = run_bounded(pair.client.cmd("ntpdig").arg(VethPair::SERVER_V4), Duration::from_secs(20));
        last = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(ok, "ntpdig across the veth never succeeded:\n{last}\nchimed:\n{}", chimed.stderr());
    assert!(last.contains(VethPair::SERVER_V4) && last.contains(" s3 "), "{last}");

    let out = run_bounded(pair.client.cmd("ntpdig").args(["-6", VethPair::SERVER_V6]), Duration::from_secs(20));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ntpdig over IPv6 across the veth failed:\n{text}");

    let Some(cmd) = chronyd_cmd(Some(&pair.client)) else { return };
    chronyd_accepts(cmd, VethPair::SERVER_V4, 123);
}

#[test]
fn mode6_and_mode7_get_no_reply() {
    let chimed = Chimed::start(&["--local-stratum", "10"]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    // ntpq "readvar" (mode 6, opcode 2) and an ntpdc monlist (mode 7, 42).
    let mut mode6 = [0u8; 12];
    mode6[0] = 0x16;
    mode6[1] = 0x02;
    mode6[3] = 1;
    let mut mode7 = [0u8; 48];
    mode7[0] = 0x17;
    mode7[3] = 42;
    for req in [&mode6[..], &mode7[..]] {
        assert_eq!(query(&sock, chimed.ntp, req, Duration::from_millis(500)), None);
    }
    // And a 48-byte mode 6 too, so the drop is by mode, not by length.
    let mut long6 = client_request(1);
    long6[0] = 0x16;
    assert_eq!(query(&sock, chimed.ntp, &long6, Duration::from_millis(500)), None);
    let m = chimed.scrape();
    assert!(metric_sum(&m, "chime_drops_total", Some("reason=\"mode6\"")) >= 1.0, "{m}");
    assert!(metric_sum(&m, "chime_drops_total", Some("reason=\"mode7\"")) >= 1.0, "{m}");
    assert!(metric_sum(&m, "chime_drops_total", Some("reason=\"too_short\"")) >= 1.0, "{m}");
    // A normal request still works.
    let reply = query(&sock, chimed.ntp, &client_request(5), Duration::from_secs(2)).unwrap();
    assert_eq!(header(&reply).mode, Mode::Server);
}

#[test]
fn reply_fields_from_proto_client() {
    let chimed = Chimed::start(&["--local-stratum", "7"]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for version in [1u8, 2, 3, 4] {
        let mut req = client_request(now_bits());
        req[0] = (version << 3) | 3;
        let xmt = u64::from_be_bytes(req[40..48].try_into().unwrap());
        let reply = query(&sock, chimed.ntp, &req, Duration::from_secs(2)).expect("reply");
        assert_eq!(reply.len(), 48);
        let h = header(&reply);
        assert_eq!(h.version, version);
        assert_eq!(h.mode, Mode::Server);
        assert_eq!(h.stratum, 7);
        assert_eq!(h.leap, LeapIndicator::NoWarning);
        assert_eq!(h.reference_id, RefId::LOCAL);
        assert_eq!(h.origin_ts.to_bits(), xmt);
        assert!(h.transmit_ts.wrapping_diff(h.receive_ts) >= 0, "T3 >= T2");
        // Server stamps are within a second of ours (same clock).
        assert!(h.receive_ts.diff_secs(chime_proto::NtpTimestamp::from_bits(xmt)).abs() < 1.0);
    }
}

#[test]
fn single_source_burst_gets_kod_rate_and_limiter_memory_is_bounded() {
    let dir = scratch_dir("ratecfg");
    let cfg = dir.join("chimed.toml");
    std::fs::write(
        &cfg,
        "[rate_limit]\nburst = 4\naverage_interval = 8.0\nkod_probability = 1.0\ntable_entries = 512\n",
    )
    .unwrap();
    let chimed = Chimed::start(&["--local-stratum", "10", "--config", cfg.to_str().unwrap()]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (mut time, mut rate) = (0, 0);
    for i in 0..40 {
        let Some(reply) = query(&sock, chimed.ntp, &client_request(1000 + i), Duration::from_secs(1)) else {
            continue;
        };
        let h = header(&reply);
        if h.stratum == 0 {
            assert_eq!(h.reference_id, RefId::RATE);
            rate += 1;
        } else {
            time += 1;
        }
    }
    // The readiness probe spent one token already.
    assert!(time <= 4, "{time} time replies");
    assert!(rate >= 30, "{rate} KoD RATE");

    // Thousands of distinct sources (127.0.0.0/8 is all ours): the table
    // stays within its fixed size.
    let before = chimed.scrape();
    let mem0 = metric_sum(&before, "chime_ratelimit_memory_bytes", None);
    let cap = metric_sum(&before, "chime_ratelimit_capacity", None);
    assert!(mem0 > 0.0 && cap >= 512.0);
    for i in 0..3000u32 {
        let ip = Ipv4Addr::new(127, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
        let Ok(s) = UdpSocket::bind((ip, 0)) else { continue };
        let _ = s.send_to(&client_request(u64::from(i)), chimed.ntp);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let after = chimed.scrape();
    assert_eq!(metric_sum(&after, "chime_ratelimit_memory_bytes", None), mem0, "limiter memory changed");
    let entries = metric_sum(&after, "chime_ratelimit_entries", None);
    assert!(entries <= cap, "{entries} entries > capacity {cap}");
    assert!(metric_sum(&after, "chime_requests_received_total", None) >= 3000.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_config_rejects_a_broken_file_with_the_key() {
    let dir = scratch_dir("badcfg");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[rate_limit]\nburst = 0\n[access]\ndeny = [\"10.0.0.0/33\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chimed")).arg("--check-config").arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("rate_limit.burst"), "{err}");
    assert!(err.contains("access.deny"), "{err}");

    std::fs::write(&bad, "[server]\nlisten = [\"0.0.0.0:123\"]\nfrobnicate = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chimed")).arg("--check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("frobnicate"));

    let good = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/chimed.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_chimed")).arg("--check-config").arg(good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let out = Command::new(env!("CARGO_BIN_EXE_chimed")).arg("--check-config").arg(dir.join("missing.toml")).output();
    assert!(!out.unwrap().status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn xdp_backend_errors_are_clear_and_auto_falls_back() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_chimed")).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = run(&["--backend", "xdp", "--listen", "127.0.0.1:12399", "--no-metrics"]);
    assert!(!ok);
    assert!(err.contains("server.interface"), "{err}");
    let (ok, err) = run(&["--backend", "xdp", "--interface", "nosuch0", "--listen", "127.0.0.1:12399", "--no-metrics"]);
    assert!(!ok);
    assert!(err.contains("nosuch0"), "{err}");

    // auto with an interface XDP cannot use: the socket backend serves, and
    // the log says why.
    let chimed = Chimed::start(&["--local-stratum", "10", "--backend", "auto", "--interface", "nosuch0"]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(query(&sock, chimed.ntp, &client_request(9), Duration::from_secs(2)).is_some());
    assert!(chimed.stderr().contains("using the socket backend"), "{}", chimed.stderr());
}

#[test]
fn sigterm_stops_cleanly() {
    let mut chimed = Chimed::start(&["--local-stratum", "10"]);
    let status = chimed.terminate().expect("exited within the bound");
    assert_eq!(status.code(), Some(0));
}
