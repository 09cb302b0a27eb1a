//! `chimed status`: a human summary of a running chimed, read from its
//! metrics endpoint, with an exit code an anycast health check can act on:
//! [`EXIT_OK`] synchronized and serving, [`EXIT_UNSYNCHRONIZED`] (also: not
//! serving), [`EXIT_UNREACHABLE`].
//!
//! Two scrapes of `/metrics` one second apart give the rates; `/ratelimit`
//! gives the source prefixes rate-limited most. The summary is built by
//! [`summarize`], a pure function over parsed samples, so it is tested
//! without a server.
//!
//! "Not serving" ([`not_serving`]) means any of: no workers (unless the
//! backend is `none`, an NTS-KE-only front end); a worker that
//! has not gone round its loop for [`STALL_SECS`] (it does every 0.1 s even
//! when idle); requests during the sample that should have been answered
//! but nothing was sent; or, with XDP, packets steered to the AF_XDP
//! sockets that no worker received.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chime_proto::DropReason;

use crate::ratelimited;

/// Exit code: synchronized and serving.
pub const EXIT_OK: u8 = 0;
/// Exit code: reachable, but unsynchronized or not serving.
pub const EXIT_UNSYNCHRONIZED: u8 = 1;
/// Exit code: the metrics endpoint cannot be reached or read.
pub const EXIT_UNREACHABLE: u8 = 2;

/// A worker whose heartbeat is older than this is stuck.
pub const STALL_SECS: f64 = 5.0;
/// Rate-limited prefixes shown at most.
const TOP_SHOWN: usize = 5;

const TIMEOUT: Duration = Duration::from_secs(2);
const SAMPLE: Duration = Duration::from_secs(1);

/// Drop reasons that are the client's doing (or policy), not a failure to
/// serve: a request dropped for one of these was not owed a reply.
const CLIENT_DROPS: [DropReason; 14] = [
    DropReason::TooShort,
    DropReason::MalformedExtension,
    DropReason::BadVersion,
    DropReason::Mode6,
    DropReason::Mode7,
    DropReason::KissOfDeath,
    DropReason::NotClient,
    DropReason::LegacyMac,
    DropReason::BadSource,
    DropReason::Denied,
    DropReason::RateLimited,
    DropReason::NtsMalformed,
    DropReason::NtsAuthFailed,
    // Unsynchronized and silent: reported as unsynchronized instead.
    DropReason::Unsynchronized,
];

/// One scraped sample: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Label pairs.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parses OpenMetrics text into samples (comments skipped, unreadable
/// lines ignored).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match key.split_once('{') {
            Some((name, rest)) => {
                let mut labels = BTreeMap::new();
                for pair in rest.trim_end_matches('}').split("\",") {
                    if let Some((k, v)) = pair.split_once("=\"") {
                        labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                    }
                }
                (name, labels)
            }
            None => (key, BTreeMap::new()),
        };
        out.push(Sample { name: name.to_owned(), labels, value });
    }
    out
}

fn value(s: &[Sample], name: &str) -> Option<f64> {
    s.iter().find(|x| x.name == name).map(|x| x.value)
}

fn sum(s: &[Sample], name: &str) -> f64 {
    s.iter().filter(|x| x.name == name).map(|x| x.value).sum()
}

/// The sum of the samples of `name` whose label `label` is `want`.
fn sum_where(s: &[Sample], name: &str, label: &str, want: &str) -> f64 {
    s.iter().filter(|x| x.name == name && x.labels.get(label).is_some_and(|v| v == want)).map(|x| x.value).sum()
}

fn label<'a>(s: &'a [Sample], name: &str, label: &str) -> Option<&'a str> {
    s.iter().find(|x| x.name == name).and_then(|x| x.labels.get(label)).map(String::as_str)
}

/// The samples of `name` for worker `w`.
fn of_worker<'a>(s: &'a [Sample], name: &'a str, w: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
    s.iter().filter(move |x| x.name == name && x.labels.get("worker").is_some_and(|v| v == w))
}

fn secs(v: f64) -> String {
    if v.is_nan() {
        "unknown".to_owned()
    } else if v.abs() < 1e-3 {
        format!("{:.3} µs", v * 1e6)
    } else if v.abs() < 1.0 {
        format!("{:.3} ms", v * 1e3)
    } else {
        format!("{v:.3} s")
    }
}

/// A duration in the largest unit that keeps it readable.
fn age(v: f64) -> String {
    if v.is_nan() {
        "unknown".to_owned()
    } else if v < 120.0 {
        format!("{v:.0} s")
    } else if v < 7200.0 {
        format!("{:.0} min", v / 60.0)
    } else if v < 172_800.0 {
        format!("{:.1} h", v / 3600.0)
    } else {
        format!("{:.1} d", v / 86_400.0)
    }
}

/// Two scrapes `elapsed` seconds apart.
struct Sampled<'a> {
    before: &'a [Sample],
    after: &'a [Sample],
    elapsed: f64,
}

impl Sampled<'_> {
    /// Growth of the sum of `name` over the sample (0 if it went back: a
    /// restart between the scrapes).
    fn delta(&self, name: &str) -> f64 {
        (sum(self.after, name) - sum(self.before, name)).max(0.0)
    }

    fn delta_where(&self, name: &str, label: &str, want: &str) -> f64 {
        (sum_where(self.after, name, label, want) - sum_where(self.before, name, label, want)).max(0.0)
    }

    fn rate(&self, name: &str) -> f64 {
        self.delta(name) / self.elapsed.max(1e-3)
    }
}

/// Why the server is not serving, if it is not (see the module docs).
pub fn not_serving(before: &[Sample], after: &[Sample], elapsed: f64) -> Option<String> {
    let s = Sampled { before, after, elapsed };
    let workers: BTreeSet<&str> = after
        .iter()
        .filter(|x| x.name == "chime_requests_received_total")
        .filter_map(|x| x.labels.get("worker").map(String::as_str))
        .collect();
    // An NTS-KE-only front end (`server.backend = "none"`) has no workers
    // by design.
    let front_end = label(after, "chime_backend_info", "backend") == Some("none");
    if workers.is_empty() && !front_end {
        return Some("no workers".into());
    }
    let stalled: Vec<String> = after
        .iter()
        .filter(|x| x.name == "chime_worker_heartbeat_age_seconds" && x.value > STALL_SECS)
        .map(|x| format!("worker {} stuck for {}", x.labels.get("worker").map_or("?", String::as_str), age(x.value)))
        .collect();
    if !stalled.is_empty() {
        return Some(stalled.join(", "));
    }
    let received = s.delta("chime_requests_received_total");
    let excused: f64 = CLIENT_DROPS.iter().map(|r| s.delta_where("chime_drops_total", "reason", r.name())).sum::<f64>();
    let sent = s.delta("chime_replies_sent_total") + s.delta("chime_kod_sent_total")
        - s.delta_where("chime_io_events_total", "event", "send_error")
        - s.delta_where("chime_xdp_queue_events_total", "event", "tx_ring_full");
    let owed = received - excused;
    if owed > 0.0 && sent <= 0.0 {
        return Some(format!("{owed:.0} requests to answer in {elapsed:.1} s, none answered"));
    }
    let steered = sum_where(after, "chime_xdp_program_packets_total", "counter", "redirect");
    let taken = sum_where(after, "chime_xdp_queue_events_total", "event", "rx");
    let steered_now = s.delta_where("chime_xdp_program_packets_total", "counter", "redirect");
    if steered_now > 0.0 && s.delta_where("chime_xdp_queue_events_total", "event", "rx") == 0.0 && steered > taken {
        return Some(format!(
            "the XDP program steered {steered_now:.0} packets to the AF_XDP sockets, no worker received any"
        ));
    }
    None
}

/// The summary text and exit code from two scrapes `elapsed` seconds
/// apart, and the text of `/ratelimit` if it could be read.
pub fn summarize(before: &[Sample], after: &[Sample], elapsed: f64, ratelimit: Option<&str>) -> (String, u8) {
    let s = Sampled { before, after, elapsed };
    let mut t = String::new();
    let synced = value(after, "chime_clock_synchronized") == Some(1.0);
    let stratum = value(after, "chime_clock_stratum").unwrap_or(f64::NAN);
    let leap = value(after, "chime_clock_leap").unwrap_or(f64::NAN);
    let refid = label(after, "chime_clock_reference_info", "reference_id").unwrap_or("?");
    let delay = value(after, "chime_clock_root_delay_seconds").unwrap_or(f64::NAN);
    let disp = value(after, "chime_clock_root_dispersion_seconds").unwrap_or(f64::NAN);
    let state = if synced { "synchronized" } else { "UNSYNCHRONIZED" };
    let _ = write!(t, "clock:      {state}, stratum {stratum}, reference {refid}, leap {leap}");
    if value(after, "chime_clock_local_stratum_mode") == Some(1.0) {
        let _ = write!(t, " (LOCAL CLOCK: local_stratum, no upstream)");
    }
    t.push('\n');
    let _ = writeln!(
        t,
        "root:       distance {} (delay {}, dispersion {})",
        secs(delay / 2.0 + disp),
        secs(delay),
        secs(disp)
    );
    let source = label(after, "chime_upstream_source_info", "source").unwrap_or("?");
    let up = value(after, "chime_upstream_up") == Some(1.0);
    let last_good = value(after, "chime_upstream_last_success_age_seconds").unwrap_or(f64::NAN);
    let holdover = value(after, "chime_upstream_holdover") == Some(1.0);
    let offset = value(after, "chime_upstream_offset_seconds").unwrap_or(f64::NAN);
    let upstate = if up {
        "up"
    } else if holdover {
        "LOST (holdover)"
    } else {
        "LOST"
    };
    let last_good = if last_good.is_nan() { "never".to_owned() } else { format!("{last_good:.1} s ago") };
    let _ = writeln!(t, "upstream:   {source}, {upstate}, last good {last_good}, offset {}", secs(offset));

    backend_lines(&mut t, &s);
    let _ = writeln!(
        t,
        "traffic:    {:.1} requests/s, {:.1} replies/s, {:.1} KoD/s",
        s.rate("chime_requests_received_total"),
        s.rate("chime_replies_sent_total"),
        s.rate("chime_kod_sent_total")
    );
    drop_lines(&mut t, &s);
    ratelimit_lines(&mut t, ratelimit);
    nts_lines(&mut t, &s);

    let problem = not_serving(before, after, elapsed);
    let code = if synced && problem.is_none() { EXIT_OK } else { EXIT_UNSYNCHRONIZED };
    match problem {
        Some(why) => {
            let _ = writeln!(t, "serving:    NO: {why}");
        }
        None => t.push_str("serving:    yes\n"),
    }
    (t, code)
}

/// The backend, and one line per worker (core, queue, rate, heartbeat).
fn backend_lines(t: &mut String, s: &Sampled<'_>) {
    let after = s.after;
    let workers: BTreeSet<&str> = after
        .iter()
        .filter(|x| x.name == "chime_requests_received_total")
        .filter_map(|x| x.labels.get("worker").map(String::as_str))
        .collect();
    let mut workers: Vec<&str> = workers.into_iter().collect();
    workers.sort_by_key(|w| w.parse::<u64>().unwrap_or(u64::MAX));
    let backend = after.iter().find(|x| x.name == "chime_backend_info");
    let get = |x: Option<&Sample>, k: &str| x.and_then(|x| x.labels.get(k)).map_or("", String::as_str).to_owned();
    let name = get(backend, "backend");
    let mut line = if name.is_empty() { "unknown".to_owned() } else { name };
    let interface = get(backend, "interface");
    if !interface.is_empty() {
        let _ = write!(line, " on {interface}");
        let attach = get(backend, "xdp_attach");
        if !attach.is_empty() {
            let _ = write!(line, " ({attach} mode)");
        }
    }
    let _ = writeln!(t, "backend:    {line}, {} workers", workers.len());
    for w in workers {
        let info =
            after.iter().find(|x| x.name == "chime_worker_info" && x.labels.get("worker").is_some_and(|v| v == w));
        let mut line = format!("worker {w}:");
        let core = get(info, "core");
        let _ = write!(line, " core {}", if core.is_empty() { "-" } else { &core });
        let queue = get(info, "queue");
        if !queue.is_empty() {
            let _ = write!(line, ", queue {queue}");
            let bind = get(info, "xdp_bind");
            if !bind.is_empty() {
                let _ = write!(line, " ({bind})");
            }
        }
        let rx = |x: &[Sample]| of_worker(x, "chime_requests_received_total", w).map(|x| x.value).sum::<f64>();
        let rate = (rx(after) - rx(s.before)).max(0.0) / s.elapsed.max(1e-3);
        let _ = write!(line, ", {rate:.1} requests/s");
        let limiter = |name| of_worker(after, name, w).map(|x| x.value).sum::<f64>();
        let (used, cap) = (limiter("chime_ratelimit_entries"), limiter("chime_ratelimit_capacity"));
        if cap > 0.0 {
            let _ = write!(line, ", rate limiter {:.1} % full", 100.0 * used / cap);
        }
        if let Some(hb) = of_worker(after, "chime_worker_heartbeat_age_seconds", w).next() {
            let _ = write!(line, ", last loop {} ago", secs(hb.value));
        }
        let frames: Vec<String> = of_worker(after, "chime_xdp_frames", w)
            .filter(|x| x.value > 0.0)
            .filter_map(|x| Some(format!("{} {}", x.labels.get("state")?, x.value)))
            .collect();
        if !frames.is_empty() {
            let _ = write!(line, "; frames {}", frames.join(", "));
        }
        let _ = writeln!(t, "  {line}");
    }
    let ring_full = s.delta_where("chime_xdp_queue_events_total", "event", "kernel_rx_ring_full");
    let fill_empty = s.delta_where("chime_xdp_queue_events_total", "event", "kernel_fill_ring_empty_descs");
    let tx_full = s.delta_where("chime_xdp_queue_events_total", "event", "tx_ring_full");
    if ring_full + fill_empty + tx_full > 0.0 {
        let _ = writeln!(
            t,
            "xdp rings:  in the last {:.1} s: rx ring full {ring_full}, fill ring empty {fill_empty}, tx ring full \
             {tx_full}",
            s.elapsed
        );
    }
}

/// Drops by reason: totals since start and the rate over the sample.
fn drop_lines(t: &mut String, s: &Sampled<'_>) {
    let mut drops: BTreeMap<&str, f64> = BTreeMap::new();
    for x in s.after.iter().filter(|x| x.name == "chime_drops_total") {
        if let Some(r) = x.labels.get("reason") {
            *drops.entry(r.as_str()).or_default() += x.value;
        }
    }
    let nonzero: Vec<String> = drops
        .iter()
        .filter(|(_, n)| **n > 0.0)
        .map(|(r, n)| {
            let rate = s.delta_where("chime_drops_total", "reason", r) / s.elapsed.max(1e-3);
            format!("{r} {n} ({rate:.1}/s)")
        })
        .collect();
    let _ = writeln!(t, "drops:      {}", if nonzero.is_empty() { "none".to_owned() } else { nonzero.join(", ") });
}

/// The prefixes rate-limited most, from `/ratelimit`.
fn ratelimit_lines(t: &mut String, ratelimit: Option<&str>) {
    let Some(text) = ratelimit else {
        t.push_str("rate-limited prefixes: unknown (no /ratelimit on this server)\n");
        return;
    };
    let top = ratelimited::parse_report(text);
    if top.is_empty() {
        t.push_str("rate-limited prefixes: none recently\n");
        return;
    }
    let span = text.split(" in the last ").nth(1).and_then(|r| r.split(" s").next()).unwrap_or("?");
    let _ = writeln!(t, "rate-limited prefixes (last {span} s, approximate):");
    for (prefix, n) in top.iter().take(TOP_SHOWN) {
        let _ = writeln!(t, "  {prefix:<24} {n}");
    }
}

/// NTS keys and counters, or "off".
fn nts_lines(t: &mut String, s: &Sampled<'_>) {
    let after = s.after;
    let keys: Vec<&Sample> = after.iter().filter(|x| x.name == "chime_nts_key_info").collect();
    if keys.is_empty() {
        t.push_str("nts:        off\n");
        return;
    }
    let role = |r: &str| -> Vec<&str> {
        keys.iter()
            .filter(|x| x.labels.get("role").is_some_and(|v| v == r))
            .filter_map(|x| x.labels.get("key_id").map(String::as_str))
            .collect()
    };
    let current = role("current");
    let retired = role("retired");
    let key_age = value(after, "chime_nts_key_age_seconds").unwrap_or(f64::NAN);
    let interval = value(after, "chime_nts_key_rotation_interval_seconds").unwrap_or(f64::NAN);
    let _ = writeln!(
        t,
        "nts keys:   current {} (age {}, rotated every {}); retired {}",
        current.join(", "),
        age(key_age),
        age(interval),
        if retired.is_empty() { "none".to_owned() } else { retired.join(", ") }
    );
    let handshakes = |x: &[Sample]| {
        let all = sum(x, "chime_nts_ke_handshakes_total");
        let ok = sum_where(x, "chime_nts_ke_handshakes_total", "result", "ok");
        (ok, all - ok)
    };
    let (ok, failed) = handshakes(after);
    let _ = writeln!(
        t,
        "nts:        {:.1} replies/s, {:.1} NAKs/s, {:.1} auth failures/s; NTS-KE {ok} ok, {failed} failed, {} open",
        s.rate("chime_nts_replies_total"),
        s.rate("chime_nts_naks_total"),
        s.rate("chime_nts_auth_failures_total"),
        value(after, "chime_nts_ke_connections").unwrap_or(0.0)
    );
}

/// GET `path` from `addr`, bounded in time; the body of a 200 response.
pub fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).map_err(|e| format!("{addr}: {e}"))?;
    let mut resp = Vec::new();
    s.take(64 << 20).read_to_end(&mut resp).map_err(|e| format!("{addr}: {e}"))?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp.split_once("\r\n\r\n").ok_or_else(|| format!("{addr}: truncated HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("{addr}{path}: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_owned())
}

/// GET /metrics from `addr`, bounded in time.
pub fn scrape(addr: SocketAddr) -> Result<String, String> {
    get(addr, "/metrics")
}

/// A wildcard listen address read as loopback of the same family.
pub fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(a) if a.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(a) if a.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// `chimed status` against the metrics endpoint `addr`.
pub fn run(addr: SocketAddr) -> ExitCode {
    let addr = connectable(addr);
    let first = match scrape(addr) {
        Ok(b) => parse(&b),
        Err(e) => {
            eprintln!("chimed status: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let start = Instant::now();
    std::thread::sleep(SAMPLE);
    let second = match scrape(addr) {
        Ok(b) => parse(&b),
        Err(e) => {
            eprintln!("chimed status: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let elapsed = start.elapsed().as_secs_f64();
    if value(&second, "chime_clock_synchronized").is_none() {
        eprintln!("chimed status: {addr} does not look like chimed's metrics endpoint");
        return ExitCode::from(EXIT_UNREACHABLE);
    }
    let ratelimit = get(addr, "/ratelimit").ok();
    let (text, code) = summarize(&first, &second, elapsed, ratelimit.as_deref());
    print!("chimed at {addr}\n{text}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# HELP x\n\
        chime_requests_received_total{worker=\"0\"} 100\n\
        chime_requests_received_total{worker=\"1\"} 100\n\
        chime_replies_sent_total{worker=\"0\"} 90\n\
        chime_drops_total{worker=\"0\",reason=\"rate_limited\"} 5\n";

    const AFTER: &str = "chime_requests_received_total{worker=\"0\"} 150\n\
        chime_requests_received_total{worker=\"1\"} 150\n\
        chime_replies_sent_total{worker=\"0\"} 190\n\
        chime_drops_total{worker=\"0\",reason=\"rate_limited\"} 7\n\
        chime_drops_total{worker=\"1\",reason=\"mode6\"} 0\n\
        chime_clock_synchronized 1\n\
        chime_clock_stratum 3\n\
        chime_clock_leap 0\n\
        chime_clock_root_delay_seconds 0.002\n\
        chime_clock_root_dispersion_seconds 0.001\n\
        chime_clock_reference_info{reference_id=\"192.0.2.1\"} 1\n\
        chime_upstream_up 1\n\
        chime_upstream_last_success_age_seconds 0.5\n\
        chime_upstream_source_info{source=\"chrony\"} 1\n\
        chime_upstream_offset_seconds NaN\n\
        chime_upstream_holdover 0\n\
        chime_backend_info{backend=\"xdp\",interface=\"eth0\",xdp_attach=\"native\"} 1\n\
        chime_worker_info{worker=\"0\",core=\"2\",queue=\"0\",xdp_bind=\"zero-copy\"} 1\n\
        chime_worker_info{worker=\"1\",core=\"3\",queue=\"1\",xdp_bind=\"zero-copy\"} 1\n\
        chime_worker_heartbeat_age_seconds{worker=\"0\"} 0.01\n\
        chime_worker_heartbeat_age_seconds{worker=\"1\"} 0.02\n\
        chime_ratelimit_entries{worker=\"0\"} 256\n\
        chime_ratelimit_capacity{worker=\"0\"} 1024\n\
        chime_xdp_frames{worker=\"0\",state=\"fill\"} 2048\n\
        chime_xdp_frames{worker=\"0\",state=\"tx\"} 0\n\
        chime_nts_key_info{key_id=\"0x0000abcd\",role=\"current\"} 1\n\
        chime_nts_key_info{key_id=\"0x00001234\",role=\"retired\"} 1\n\
        chime_nts_key_age_seconds{key_id=\"0x0000abcd\"} 7200\n\
        chime_nts_key_rotation_interval_seconds 86400\n\
        chime_nts_ke_handshakes_total{result=\"ok\"} 12\n\
        chime_nts_ke_handshakes_total{result=\"tls\"} 1\n";

    const RATELIMIT: &str = "# rate-limited requests by source prefix (IPv4 /24, IPv6 /48) in the last 14 s: 2 in all; \
        top 10 (approximate counts)\n198.51.100.0/24 2\n";

    fn summary(after: &str) -> (String, u8) {
        summarize(&parse(BEFORE), &parse(after), 1.0, Some(RATELIMIT))
    }

    #[test]
    fn parses_labels_and_values() {
        let s = parse(AFTER);
        assert_eq!(label(&s, "chime_upstream_source_info", "source"), Some("chrony"));
        assert_eq!(sum(&s, "chime_requests_received_total"), 300.0);
        assert!(value(&s, "chime_upstream_offset_seconds").unwrap().is_nan());
        assert_eq!(s.iter().find(|x| x.name == "chime_drops_total").unwrap().labels["reason"], "rate_limited");
    }

    #[test]
    fn summary_and_exit_codes() {
        let (text, code) = summary(AFTER);
        assert_eq!(code, EXIT_OK, "{text}");
        assert!(text.contains("synchronized, stratum 3, reference 192.0.2.1"), "{text}");
        assert!(text.contains("distance 2.000 ms"), "{text}");
        assert!(text.contains("chrony, up, last good 0.5 s ago"), "{text}");
        assert!(text.contains("100.0 requests/s, 100.0 replies/s"), "{text}");
        assert!(text.contains("drops:      rate_limited 7 (2.0/s)\n"), "{text}");
        assert!(text.contains("backend:    xdp on eth0 (native mode), 2 workers"), "{text}");
        assert!(text.contains("worker 0: core 2, queue 0 (zero-copy), 50.0 requests/s, rate limiter 25.0 % full"));
        assert!(text.contains("frames fill 2048\n"), "{text}");
        assert!(text.contains("rate-limited prefixes (last 14 s, approximate):\n  198.51.100.0/24"), "{text}");
        assert!(text.contains("current 0x0000abcd (age 2.0 h, rotated every 24.0 h); retired 0x00001234"), "{text}");
        assert!(text.contains("NTS-KE 12 ok, 1 failed"), "{text}");
        assert!(text.contains("serving:    yes"), "{text}");

        let unsync = AFTER.replace("chime_clock_synchronized 1", "chime_clock_synchronized 0");
        let (text, code) = summary(&unsync);
        assert_eq!(code, EXIT_UNSYNCHRONIZED);
        assert!(text.contains("UNSYNCHRONIZED"), "{text}");

        let (text, _) = summarize(&parse(BEFORE), &parse(AFTER), 1.0, None);
        assert!(text.contains("rate-limited prefixes: unknown"), "{text}");
        let no_nts: String =
            AFTER.lines().filter(|l| !l.starts_with("chime_nts_key_info")).collect::<Vec<_>>().join("\n");
        assert!(summary(&no_nts).0.contains("nts:        off"));
    }

    #[test]
    fn not_serving_is_not_ok() {
        // A stuck worker.
        let stuck = AFTER.replace("heartbeat_age_seconds{worker=\"1\"} 0.02", "heartbeat_age_seconds{worker=\"1\"} 12");
        let (text, code) = summary(&stuck);
        assert_eq!(code, EXIT_UNSYNCHRONIZED, "{text}");
        assert!(text.contains("serving:    NO: worker 1 stuck for 12 s"), "{text}");
        // No workers …
        let none: String =
            AFTER.lines().filter(|l| !l.starts_with("chime_requests_received")).collect::<Vec<_>>().join("\n");
        assert_eq!(summary(&none).1, EXIT_UNSYNCHRONIZED);
        // … unless this is an NTS-KE-only front end.
        let front = none.replace("backend=\"xdp\",interface=\"eth0\",xdp_attach=\"native\"", "backend=\"none\"");
        assert_eq!(summary(&front).1, EXIT_OK, "{}", summary(&front).0);
        // Requests arrive, nothing goes out.
        let mute =
            AFTER.replace("chime_replies_sent_total{worker=\"0\"} 190", "chime_replies_sent_total{worker=\"0\"} 90");
        let (text, code) = summary(&mute);
        assert_eq!(code, EXIT_UNSYNCHRONIZED, "{text}");
        assert!(text.contains("98 requests to answer in 1.0 s, none answered"), "{text}");
        // … unless they were all the clients' fault (here: rate-limited).
        let excused = mute.replace("reason=\"rate_limited\"} 7", "reason=\"rate_limited\"} 105");
        assert_eq!(summary(&excused).1, EXIT_OK, "{}", summary(&excused).0);
        // XDP: steered to the sockets, never received.
        let xdp = |redirect: u64, rx: u64| {
            format!(
                "chime_xdp_program_packets_total{{counter=\"redirect\"}} {redirect}\n\
                 chime_xdp_queue_events_total{{worker=\"0\",event=\"rx\"}} {rx}\n"
            )
        };
        let lost = summarize(
            &parse(&(BEFORE.to_owned() + &xdp(10, 10))),
            &parse(&(AFTER.to_owned() + &xdp(500, 10))),
            1.0,
            None,
        );
        assert_eq!(lost.1, EXIT_UNSYNCHRONIZED, "{}", lost.0);
        assert!(lost.0.contains("steered 490 packets"), "{}", lost.0);
        // The program's counters lag (read once a second): packets steered
        // and already received before the first scrape are fine.
        let lagging = summarize(
            &parse(&(BEFORE.to_owned() + &xdp(10, 600))),
            &parse(&(AFTER.to_owned() + &xdp(500, 600))),
            1.0,
            None,
        );
        assert_eq!(lagging.1, EXIT_OK, "{}", lagging.0);
    }

    #[test]
    fn unreachable_and_wildcards() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(scrape(free).is_err());
        assert_eq!(run(free), ExitCode::from(EXIT_UNREACHABLE));
        assert_eq!(connectable("0.0.0.0:9100".parse().unwrap()), "127.0.0.1:9100".parse().unwrap());
        assert_eq!(connectable("[::]:9100".parse().unwrap()), "[::1]:9100".parse().unwrap());
    }
}
