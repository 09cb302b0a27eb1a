//! SIGHUP reloads the configuration while chimed serves: live settings
//! take effect without restarting workers or losing requests; a changed
//! setting that needs a restart, or a broken file, changes nothing and
//! says why.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chime_proto::packet::{Header, RefId};
use common::*;

/// The configuration file, with the parts the test changes.
fn write_config(path: &Path, ntp: SocketAddr, metrics: SocketAddr, extra: &str) {
    let text = format!(
        "[server]\nlisten = [\"{ntp}\"]\nworkers = 2\n[metrics]\nlisten = \"{metrics}\"\n\
         [upstream]\nlocal_stratum = 10\n{extra}\n"
    );
    std::fs::write(path, text).unwrap();
}

fn sighup(pid: u32) {
    assert!(Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
}

/// Waits (bounded) until `chime_config_reloads_total{result=...}` reaches
/// `want`; returns the scrape.
fn wait_reloads(chimed: &Chimed, result: &str, want: f64) -> String {
    let label = format!("result=\"{result}\"");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = chimed.scrape();
        if metric_sum(&m, "chime_config_reloads_total", Some(&label)) >= want {
            return m;
        }
        assert!(Instant::now() < deadline, "no {result} reload counted:\n{m}\n{}", chimed.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ids of chimed's worker threads, by name.
fn worker_threads(pid: u32) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let entry = entry.unwrap();
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.starts_with("chime-worker") {
            out.insert(comm.trim().to_owned(), entry.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// One request from `source` with poll 10; the reply's header, if any.
fn probe(source: Ipv4Addr, to: SocketAddr) -> Option<Header> {
    let sock = UdpSocket::bind((source, 0)).unwrap();
    let mut req = client_request(now_bits());
    req[2] = 10;
    query(&sock, to, &req, Duration::from_secs(1)).map(|r| header(&r))
}

/// Polls `probe` (bounded) until `pred` holds for its reply.
fn probe_until(source: Ipv4Addr, to: SocketAddr, what: &str, pred: impl Fn(&Option<Header>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = probe(source, to);
        if pred(&h) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: last reply {h:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_applies_live_settings_without_losing_requests_and_refuses_restart_settings() {
    let dir = scratch_dir("reload");
    let cfg = dir.join("chimed.toml");
    let ntp: SocketAddr = (Ipv4Addr::LOCALHOST, free_udp_port()).into();
    let metrics: SocketAddr = (Ipv4Addr::LOCALHOST, free_tcp_port()).into();
    // Rate limiting stays off for 127.0.0.1 (the load) throughout: every
    // change below must leave its requests answered.
    write_config(&cfg, ntp, metrics, "[rate_limit]\nenabled = false\n");
    let chimed = Chimed::spawn(None, &["-c", cfg.to_str().unwrap(), "--log-level", "info"], ntp, Some(metrics));
    chimed.wait_ready();
    let before = worker_threads(chimed.pid());
    assert_eq!(before.len(), 2, "two workers: {before:?}");
    let m = chimed.scrape();
    assert_eq!(metric_sum(&m, "chime_ratelimit_capacity", None), 1_048_576.0, "{m}");

    // Well-behaved load, 20,000 requests/s for 4 s, while the reloads run.
    let load = std::thread::spawn(move || {
        let mut p = LoadParams::new(ntp, 80_000);
        p.rate = 20_000;
        p.max_time = Duration::from_secs(30);
        run_load_here(&p)
    });
    std::thread::sleep(Duration::from_millis(500));

    // 1. ACL: deny 127.0.0.99 (KoD DENY); the reply's max poll lowered.
    write_config(
        &cfg,
        ntp,
        metrics,
        "[rate_limit]\nenabled = false\n[access]\ndeny = [\"127.0.0.99/32\"]\n[ntp]\nmax_poll = 6\n",
    );
    sighup(chimed.pid());
    wait_reloads(&chimed, "applied", 1.0);
    probe_until(Ipv4Addr::new(127, 0, 0, 99), ntp, "KoD DENY after the ACL reload", |h| {
        h.as_ref().is_some_and(|h| h.stratum == 0 && h.reference_id == RefId::DENY)
    });
    probe_until(Ipv4Addr::new(127, 0, 0, 98), ntp, "max_poll 6", |h| h.as_ref().is_some_and(|h| h.poll == 6));

    // 2. Upstream: local stratum 10 -> 9; rate-limit table resized.
    std::thread::sleep(Duration::from_millis(300));
    let text = std::fs::read_to_string(&cfg).unwrap().replace("local_stratum = 10", "local_stratum = 9");
    let text = text.replace("enabled = false\n", "enabled = false\ntable_entries = 65536\n");
    std::fs::write(&cfg, text).unwrap();
    sighup(chimed.pid());
    wait_reloads(&chimed, "applied", 2.0);
    probe_until(Ipv4Addr::new(127, 0, 0, 98), ntp, "stratum 9", |h| h.as_ref().is_some_and(|h| h.stratum == 9));

    let summary = load.join().unwrap();
    assert_eq!(summary.sent, 80_000);
    assert_eq!(summary.kod, 0, "{summary:?}");
    assert_eq!(summary.invalid, 0, "{summary:?}");
    assert_eq!(summary.received, summary.sent, "every well-behaved request answered across the reloads: {summary:?}");
    assert_eq!(worker_threads(chimed.pid()), before, "the same worker threads serve");
    let m = chimed.scrape();
    // Both workers have published the new table size (the idle one at its
    // next poll timeout).
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_sum(&chimed.scrape(), "chime_ratelimit_capacity", None) != 65_536.0 {
        assert!(Instant::now() < deadline, "table not resized:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 3. A setting that needs a restart: refused, nothing applied (the
    //    ACL change in the same file does not take effect either).
    let live = std::fs::read_to_string(&cfg).unwrap();
    let text = live.replace("workers = 2", "workers = 3").replace("127.0.0.99/32", "127.0.0.98/32");
    std::fs::write(&cfg, text).unwrap();
    sighup(chimed.pid());
    wait_reloads(&chimed, "refused", 1.0);
    let err = chimed.stderr();
    assert!(err.contains("server.workers changed, which needs a restart"), "{err}");
    assert_eq!(probe(Ipv4Addr::new(127, 0, 0, 98), ntp).map(|h| h.stratum), Some(9), "old settings stay");
    assert_eq!(worker_threads(chimed.pid()), before);

    // 4. A broken file: failed, nothing applied, the error names the key.
    std::fs::write(&cfg, live.replace("max_poll = 6", "max_poll = 99")).unwrap();
    sighup(chimed.pid());
    wait_reloads(&chimed, "failed", 1.0);
    let err = chimed.stderr();
    assert!(err.contains("configuration not reloaded") && err.contains("ntp.max_poll"), "{err}");
    assert_eq!(probe(Ipv4Addr::new(127, 0, 0, 98), ntp).map(|h| h.poll), Some(6));

    let mut chimed = chimed;
    assert!(chimed.terminate().is_some_and(|s| s.success()), "{}", chimed.stderr());
    let _ = std::fs::remove_dir_all(dir);
}
