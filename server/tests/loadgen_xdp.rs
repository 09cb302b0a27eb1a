//! chime-load's AF_XDP transport on the netns test bed (root only; skipped
//! with a printed reason otherwise):
//!
//! - against chimed's XDP backend with rate limiting on (generous): 200,000
//!   requests from the 65,534 addresses of a /16 that no host owns; less
//!   than 1 % lost, nothing invalid, no KoD, chimed's rate limiter tracks
//!   more than 10,000 clients, and chime-load leaves no XDP program behind;
//! - against chimed's socket backend, which needs the route back to the
//!   prefix, over IPv4 and IPv6.
//!
//! chime-load runs in the client namespace as a child of this test binary
//! (`chime_loadgen::run::run`, the library behind the binary). Traffic
//! stays between the two namespaces the test makes; they are removed, with
//! anything left inside, even when the test fails.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;

/// The test this binary re-runs inside a namespace as chime-load (or as
/// common's probes); a no-op in a normal run.
const CHILD: &str = "child";

#[test]
fn child() {
    child_main();
}

fn metrics_addr() -> SocketAddr {
    SocketAddr::new(VethPair::SERVER_V4.parse().unwrap(), 9123)
}

/// Runs chime-load with `args` in the client namespace, bounded; returns
/// its JSON report.
fn chime_load(pair: &VethPair, args: &[&str], dir: &Path) -> serde_json::Value {
    let json = dir.join(format!("load-{}.json", args.join("_").replace(['/', ':', '.'], "-")));
    common::chime_load(&pair.client, CHILD, args, &json, Duration::from_secs(120))
}

/// The one step of a fixed-rate run, checked: every request sent, loss
/// below 1 %, nothing invalid, no KoD, no stray frames.
fn check_step(r: &serde_json::Value, requests: u64) {
    assert_eq!(r["transport"], "xdp");
    let s = &r["steps"][0];
    assert_eq!(s["sent"].as_u64(), Some(requests), "{s}");
    assert!(s["loss"].as_f64().unwrap() < 0.01, "loss: {s}");
    assert_eq!(s["invalid"], serde_json::json!({}), "invalid replies: {s}");
    assert_eq!(s["kod"], serde_json::json!({}), "KoD: {s}");
    assert_eq!(s["stray"].as_u64(), Some(0), "{s}");
}

fn xdp_attached(ns: &NetNs, dev: &str) -> bool {
    let out = ns.run("ip", &["-j", "-d", "link", "show", "dev", dev], Duration::from_secs(10));
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).contains("\"xdp\"")
}

fn chimed_on(pair: &VethPair, config: &str, backend: &[&str], dir: &Path) -> Chimed {
    let cfg = dir.join("chimed.toml");
    std::fs::write(&cfg, config).unwrap();
    let maddr = metrics_addr().to_string();
    let mut args = vec!["-c", cfg.to_str().unwrap(), "--local-stratum", "10", "--metrics-listen", &maddr];
    args.extend_from_slice(backend);
    let target = SocketAddr::new(VethPair::SERVER_V4.parse().unwrap(), 123);
    let chimed = Chimed::spawn(Some(&pair.server.name), &args, target, None);
    wait_ready_from(&pair.client, CHILD, target, &chimed);
    chimed
}

#[test]
fn xdp_generator_plays_tens_of_thousands_of_clients_against_the_xdp_backend() {
    let Some(pair) = VethPair::with_queues("lgx", 2) else { return };
    let dir = scratch_dir("loadgen-xdp");
    // Rate limiting on, generous: each of the 65,534 addresses sends about
    // three requests in the run, well inside a burst of 64.
    let config = "[rate_limit]\nenabled = true\nburst = 64\naverage_interval = 0.05\n";
    let mut chimed = chimed_on(&pair, config, &["--backend", "xdp", "--interface", &pair.server_dev], &dir);

    let requests = 200_000u64;
    let r = chime_load(
        &pair,
        &[
            "198.18.0.1",
            "--xdp",
            &pair.client_dev,
            "--src-prefix",
            "198.19.0.0/16",
            "--rate",
            "40000",
            "--duration",
            "5",
            "--timeout",
            "2",
        ],
        &dir,
    );
    check_step(&r, requests);
    assert_eq!(r["clients"].as_u64(), Some(65_534), "one client per address of the /16");
    assert_eq!(r["xdp"]["program"]["redirect"].as_u64(), r["steps"][0]["valid"].as_u64(), "{}", r["xdp"]);
    assert!(!xdp_attached(&pair.client, &pair.client_dev), "chime-load detached its program");

    std::thread::sleep(Duration::from_millis(1500)); // workers publish about once a second
    let m = scrape_from(&pair.client, CHILD, metrics_addr());
    let entries = metric_sum(&m, "chime_ratelimit_entries", None);
    eprintln!("chimed's rate limiter tracks {entries} clients");
    assert!(entries >= 10_000.0, "rate limiter entries {entries}\n{m}");
    assert_eq!(metric_sum(&m, "chime_drops_total", Some("reason=\"rate_limited\"")), 0.0, "{m}");
    assert!(metric_sum(&m, "chime_replies_sent_total", None) >= requests as f64 * 0.99, "{m}");
    assert_eq!(chimed.terminate().map(|s| s.code()), Some(Some(0)), "clean exit; stderr:\n{}", chimed.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn xdp_generator_against_the_socket_backend_with_a_route_back() {
    let Some(pair) = VethPair::with_queues("lgs", 2) else { return };
    let dir = scratch_dir("loadgen-sock");
    for route in [
        &["route", "add", "198.19.0.0/16", "via", "198.18.0.2"][..],
        &["-6", "route", "add", "fdc4:1e:100::/48", "via", "fdc4:1e::2"],
    ] {
        let out = pair.server.run("ip", route, Duration::from_secs(10));
        assert!(out.status.success(), "ip {route:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let config = "[rate_limit]\nenabled = false\n";
    let mut chimed = chimed_on(&pair, config, &["--backend", "socket", "--workers", "2"], &dir);
    let prefix =
        |p| ["--xdp", &pair.client_dev, "--src-prefix", p, "--rate", "20000", "--duration", "3"].map(String::from);
    let v4 = prefix("198.19.0.0/16");
    let mut args: Vec<&str> = vec!["198.18.0.1"];
    args.extend(v4.iter().map(String::as_str));
    let r = chime_load(&pair, &args, &dir);
    check_step(&r, 60_000);
    let v6 = prefix("fdc4:1e:100::/48");
    let mut args: Vec<&str> = vec!["fdc4:1e::1", "--kind", "interleaved", "--clients", "64"];
    args.extend(v6.iter().map(String::as_str));
    let r = chime_load(&pair, &args, &dir);
    check_step(&r, 60_000);
    assert!(r["steps"][0]["interleaved_interleaved"].as_u64().unwrap() > 0, "interleaved replies: {}", r["steps"][0]);
    assert!(!xdp_attached(&pair.client, &pair.client_dev), "chime-load detached its program");
    assert_eq!(chimed.terminate().map(|s| s.code()), Some(Some(0)), "clean exit; stderr:\n{}", chimed.stderr());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Outside a namespace made with `ip netns add` (here: a fresh unnamed one,
/// so even a broken guard could reach no network) --xdp refuses to start.
#[test]
fn xdp_generator_refuses_an_unnamed_namespace() {
    if !is_root() || !have("unshare") {
        eprintln!("skipping: needs root and unshare(1)");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new("unshare");
    cmd.arg("-n").arg(exe).args([CHILD, "--exact", "--nocapture", "--test-threads=1"]);
    cmd.env(XLOAD_ENV, ["127.0.0.1", "--xdp", "lo", "--src-prefix", "10.0.0.0/8", "--no-progress"].join("\x1f"));
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && !text.contains(XLOAD_DONE), "{text}");
    assert!(text.contains("runs only inside a test network namespace"), "{text}");
}
