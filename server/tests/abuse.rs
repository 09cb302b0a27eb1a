//! Abuse on the netns test bed (root only; skipped with a printed reason
//! otherwise; CI is root).
//!
//! One source floods chimed's XDP backend at the generator's maximum while
//! 1,000 well-behaved simulated clients poll:
//!
//! - the flood: chime-load's UDP generator from the client namespace's own
//!   address, one socket, `--send-only`, offered 1,000,000 requests/s: more
//!   than it can send, so it sends at its maximum until its hard stop (twice
//!   the duration plus a second), at least [`FLOOD_SECS`]. (The AF_XDP
//!   generator cannot be the flood: the well-behaved clients need it, and
//!   an interface takes one XDP program.)
//! - the clients: chime-load's AF_XDP generator, 1,000 addresses of
//!   198.19.0.0/22 polling 1,500 requests/s in all (each every 0.67 s),
//!   started once the flood runs and finished before it can stop.
//!
//! Asserted: the clients lose under 1 %; the flood is rate limited (the XDP
//! program's `drop_flood` took most of it, the AF_XDP sockets saw no more of
//! it than the per-source budget, and it got few answers); chimed's RSS
//! stays flat. The figures of each run are printed, including the veth's
//! own drops, which happen before XDP and are no fault of chimed's.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The test this binary re-runs inside a namespace as chime-load or a
/// metrics probe; a no-op in a normal run.
const CHILD: &str = "child";

#[test]
fn child() {
    child_main();
}

/// The flood's duration: it sends for at least this long (at most twice
/// as long plus a second).
const FLOOD_SECS: f64 = 8.0;
/// The rate offered to the flood generator: more than it reaches.
const FLOOD_RATE: &str = "1000000";
/// The well-behaved clients start this long after the flood...
const HONEST_DELAY: Duration = Duration::from_secs(2);
/// ...and poll this long (then wait up to a second for the last replies),
/// so their whole run is under the flood.
const HONEST_SECS: f64 = 5.0;
/// Well-behaved clients, and their requests per second in all.
const HONEST_CLIENTS: u64 = 1000;
const HONEST_RATE: f64 = 1500.0;
/// The XDP program's per-source limit in this test (the defaults).
const SOURCE_RATE: f64 = 1000.0;
const SOURCE_BURST: f64 = 2000.0;
/// Most RSS growth allowed while the flood runs, KiB. Everything chimed
/// needs per packet is allocated at start (UMEM, rings, the rate limiter's
/// table, interleaved state), so what may grow is the rate limiter's and
/// the interleaved table's use for 1,001 sources (about 100 KiB), allocator
/// and stack noise, and the metrics endpoint's buffers: far below 8 MiB. A
/// leak of 200 bytes per request the workers handle (over 40,000 in a run)
/// would cross it.
const RSS_GROWTH_MAX_KIB: u64 = 8 * 1024;

const CONFIG: &str = "\
[rate_limit]
# Well-behaved clients poll every 0.67 s: well inside the limiter.
enabled = true
average_interval = 0.25
burst = 16
[xdp]
source_rate = 1000
source_burst = 2000
";

/// chimed's resident set, KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("chimed's /proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value")
}

/// (RX dropped, TX dropped) of `dev` in `ns` (`ip -s link`).
fn link_drops(ns: &NetNs, dev: &str) -> (u64, u64) {
    let out = ns.run("ip", &["-j", "-s", "link", "show", "dev", dev], Duration::from_secs(10));
    assert!(out.status.success(), "ip -s link: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let stats = &v[0]["stats64"];
    (stats["rx"]["dropped"].as_u64().unwrap_or(0), stats["tx"]["dropped"].as_u64().unwrap_or(0))
}

/// The veth driver's own counters of `dev` that name drops or errors
/// (`ethtool -S`), nonzero ones only; empty without ethtool.
fn veth_drop_counters(ns: &NetNs, dev: &str) -> Vec<(String, u64)> {
    if !have("ethtool") {
        return Vec::new();
    }
    let out = ns.run("ethtool", &["-S", dev], Duration::from_secs(10));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            let n: u64 = v.trim().parse().ok()?;
            (n > 0 && (k.contains("drop") || k.contains("err"))).then(|| (k.to_owned(), n))
        })
        .collect()
}

fn step(report: &serde_json::Value) -> &serde_json::Value {
    &report["steps"][0]
}

fn count(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn program_counter(metrics: &str, counter: &str) -> f64 {
    metric_sum(metrics, "chime_xdp_program_packets_total", Some(&format!("counter=\"{counter}\"")))
}

#[test]
fn one_source_flooding_does_not_cost_a_thousand_honest_clients_their_answers() {
    let Some(pair) = VethPair::with_queues("flood", 2) else { return };
    let dir = scratch_dir("abuse-flood");
    let cfg = dir.join("chimed.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let mut chimed = pair.start_chimed(Backend::Xdp, &cfg, &[], CHILD);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;

    let m0 = scrape_from(&pair.client, CHILD, VethPair::server_metrics());
    let redirect0 = program_counter(&m0, "redirect");
    let client_drops0 = link_drops(&pair.client, &pair.client_dev);
    let server_drops0 = link_drops(&pair.server, &pair.server_dev);
    let rss_before = rss_kib(chimed.pid());

    let server = VethPair::SERVER_V4;
    let flood_duration = FLOOD_SECS.to_string();
    let flood_args = [
        server,
        "--rate",
        FLOOD_RATE,
        "--duration",
        &flood_duration,
        "--send-only",
        "--threads",
        "1",
        "--clients",
        "1",
        "--timeout",
        "0.5",
    ];
    let honest_secs = HONEST_SECS.to_string();
    let honest_rate = HONEST_RATE.to_string();
    let honest_clients = HONEST_CLIENTS.to_string();
    let honest_args = [
        server,
        "--xdp",
        &pair.client_dev,
        "--src-prefix",
        "198.19.0.0/22",
        "--clients",
        &honest_clients,
        "--rate",
        &honest_rate,
        "--duration",
        &honest_secs,
        "--timeout",
        "1",
    ];
    let limit = Duration::from_secs(60);
    let pid = chimed.pid();
    let (flood, honest, rss_peak) = std::thread::scope(|s| {
        let flood = s.spawn(|| chime_load(&pair.client, CHILD, &flood_args, &dir.join("flood.json"), limit));
        let honest = s.spawn(|| {
            std::thread::sleep(HONEST_DELAY);
            chime_load(&pair.client, CHILD, &honest_args, &dir.join("honest.json"), limit)
        });
        // RSS every 200 ms while the load runs (bounded by the runs' own
        // limits: both threads end within `limit`).
        let mut peak = rss_before;
        let start = Instant::now();
        while !(flood.is_finished() && honest.is_finished()) && start.elapsed() < limit * 2 {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(200));
        }
        (flood.join().expect("flood run"), honest.join().expect("honest run"), peak)
    });
    std::thread::sleep(Duration::from_millis(1500)); // counters are published about once a second
    let rss_after = rss_kib(pid);
    let m = scrape_from(&pair.client, CHILD, VethPair::server_metrics());
    let client_drops = link_drops(&pair.client, &pair.client_dev);
    let server_drops = link_drops(&pair.server, &pair.server_dev);

    let (f, h) = (step(&flood), step(&honest));
    let flood_sent = count(&f["sent"]);
    let flood_answered = count(&f["valid"]) + f["kod"].as_object().map_or(0, |k| k.values().map(count).sum());
    let honest_sent = count(&h["sent"]);
    let honest_loss = h["loss"].as_f64().unwrap();
    let drop_flood = program_counter(&m, "drop_flood");
    let redirected = program_counter(&m, "redirect") - redirect0;
    let rate_limited = metric_sum(&m, "chime_drops_total", Some("reason=\"rate_limited\""));
    let rx_ring_full = metric_sum(&m, "chime_xdp_queue_events_total", Some("event=\"kernel_rx_ring_full\""));
    // What the per-source limit lets through in the flood's time (plus a
    // second of slack), on each CPU the flood's packets may be handled on.
    let flood_secs = f["duration_secs"].as_f64().unwrap();
    let budget = (SOURCE_BURST + SOURCE_RATE * (flood_secs + 1.0)) * cpus;
    eprintln!(
        "ABUSE flood: honest {honest_sent} sent, loss {:.3} % (timeouts {}, generator_limited {}); flood {flood_sent} \
         sent in {flood_secs:.1} s ({:.0}/s, send errors {}), {flood_answered} answered; XDP drop_flood {drop_flood}, redirected \
         {redirected} (honest {honest_sent} + flood), rate_limited {rate_limited}, AF_XDP rx ring full \
         {rx_ring_full}; veth drops before XDP: client (rx, tx) {:?} -> {client_drops:?}, server {:?} -> \
         {server_drops:?}, client ethtool {:?}, server ethtool {:?}; RSS {rss_before} KiB before, peak {rss_peak}, \
         after {rss_after}",
        honest_loss * 100.0,
        h["timeouts"],
        h["generator_limited"],
        f["sent_rate"].as_f64().unwrap_or(0.0),
        f["send_errors"],
        client_drops0,
        server_drops0,
        veth_drop_counters(&pair.client, &pair.client_dev),
        veth_drop_counters(&pair.server, &pair.server_dev),
    );

    // The well-behaved clients.
    assert_eq!(honest["clients"].as_u64(), Some(HONEST_CLIENTS), "one client per address");
    assert!(honest_sent as f64 >= HONEST_RATE * HONEST_SECS * 0.5, "the clients sent too little: {h}");
    assert!(honest_loss < 0.01, "well-behaved clients lost {:.3} % under the flood: {h}", honest_loss * 100.0);
    assert_eq!(h["invalid"], serde_json::json!({}), "invalid replies: {h}");
    assert_eq!(h["kod"], serde_json::json!({}), "well-behaved clients got KoD: {h}");

    // The flood: far more than the per-source budget was sent, the XDP
    // program dropped most of it, and the workers saw no more of it than
    // the budget.
    assert!(flood_sent as f64 > 4.0 * budget, "the flood ({flood_sent}) is not much above the budget {budget}: {f}");
    assert!(drop_flood >= 0.5 * flood_sent as f64, "drop_flood {drop_flood} of {flood_sent} flood requests\n{m}");
    let flood_redirected = redirected - honest_sent as f64;
    assert!(flood_redirected <= budget, "{flood_redirected} flood requests reached the workers, budget {budget}\n{m}");
    assert!(rate_limited > 0.0, "the flood's share reached the RFC 8633 limiter, which dropped some\n{m}");
    assert!(
        (flood_answered as f64) < 0.05 * flood_sent as f64,
        "the flood got {flood_answered} answers to {flood_sent} requests"
    );

    // Memory.
    let growth = rss_peak.max(rss_after).saturating_sub(rss_before);
    assert!(growth < RSS_GROWTH_MAX_KIB, "RSS grew by {growth} KiB ({rss_before} -> peak {rss_peak}, {rss_after})");

    assert_eq!(chimed.terminate().map(|s| s.code()), Some(Some(0)), "clean exit; stderr:\n{}", chimed.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The flood guard follows SIGHUP: a tight `xdp.source_burst` drops most
/// of a burst from one source; raised, it drops none of the next burst;
/// `rate_limit.enabled = false` turns it off.
#[test]
fn the_flood_guard_follows_a_reload() {
    let Some(pair) = VethPair::new("guardhup") else { return };
    let dir = scratch_dir("abuse-guard");
    let cfg = dir.join("chimed.toml");
    let write = |limiting: bool, rate: u32, burst: u32| {
        let text = format!(
            "[rate_limit]\nenabled = {limiting}\naverage_interval = 0.001\nburst = 1000\n[xdp]\nsource_rate = \
             {rate}\nsource_burst = {burst}\n"
        );
        std::fs::write(&cfg, text).unwrap();
    };
    write(true, 1, 50);
    let mut chimed = pair.start_chimed(Backend::Xdp, &cfg, &[], CHILD);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let scrape = || scrape_from(&pair.client, CHILD, VethPair::server_metrics());
    // 400 requests as fast as one socket sends them, from the client's
    // own address; the counters are published about once a second.
    let burst = |what: &str| {
        let mut p = LoadParams::new(VethPair::server_ntp(), 400);
        p.sockets = 1;
        p.max_time = Duration::from_secs(20);
        let load = run_load(&pair.client, CHILD, &p);
        std::thread::sleep(Duration::from_millis(1500));
        let m = scrape();
        eprintln!("{what}: {load:?}, drop_flood {}", program_counter(&m, "drop_flood"));
        (load, m)
    };
    let reload = |n: f64| {
        assert!(Command::new("kill").args(["-HUP", &chimed.pid().to_string()]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let m = scrape();
            if metric_sum(&m, "chime_config_reloads_total", Some("result=\"applied\"")) >= n {
                break;
            }
            assert!(Instant::now() < deadline, "reload {n} not applied:\n{m}\n{}", chimed.stderr());
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    let (load, m) = burst("source_burst 50");
    let dropped = program_counter(&m, "drop_flood");
    assert!(dropped >= 400.0 - 60.0 * cpus, "burst 50 per CPU: {dropped} of 400 dropped\n{m}");
    assert!(load.received <= (60.0 * cpus) as u64, "{load:?}");

    write(true, 100_000, 100_000);
    reload(1.0);
    let (load, m) = burst("source_burst 100000");
    assert_eq!(program_counter(&m, "drop_flood"), dropped, "raised live: nothing more dropped\n{m}");
    assert!(load.answered_fraction() >= 0.99, "{load:?}");

    write(false, 1, 1);
    reload(2.0);
    let (load, m) = burst("rate_limit.enabled = false, source_burst 1");
    assert_eq!(program_counter(&m, "drop_flood"), dropped, "the guard is off with rate limiting\n{m}");
    assert!(load.answered_fraction() >= 0.99, "{load:?}");

    assert_eq!(chimed.terminate().map(|s| s.code()), Some(Some(0)), "clean exit; stderr:\n{}", chimed.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}
