//! `chimed status`: a human summary of a running chimed, read from its
//! metrics endpoint, with an exit code an anycast health check can act on:
//! [`EXIT_OK`] synchronized and serving, [`EXIT_UNSYNCHRONIZED`],
//! [`EXIT_UNREACHABLE`].
//!
//! Two scrapes one second apart give the request rate. The summary is built
//! by [`summarize`], a pure function over parsed samples, so it is tested
//! without a server.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Exit code: synchronized and serving.
pub const EXIT_OK: u8 = 0;
/// Exit code: reachable, but unsynchronized (or not serving).
pub const EXIT_UNSYNCHRONIZED: u8 = 1;
/// Exit code: the metrics endpoint cannot be reached or read.
pub const EXIT_UNREACHABLE: u8 = 2;

const TIMEOUT: Duration = Duration::from_secs(2);
const SAMPLE: Duration = Duration::from_secs(1);

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

fn label<'a>(s: &'a [Sample], name: &str, label: &str) -> Option<&'a str> {
    s.iter().find(|x| x.name == name).and_then(|x| x.labels.get(label)).map(String::as_str)
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

/// The summary text and exit code from two scrapes `elapsed` seconds apart.
pub fn summarize(before: &[Sample], after: &[Sample], elapsed: f64) -> (String, u8) {
    let mut t = String::new();
    let synced = value(after, "chime_clock_synchronized") == Some(1.0);
    let stratum = value(after, "chime_clock_stratum").unwrap_or(f64::NAN);
    let leap = value(after, "chime_clock_leap").unwrap_or(f64::NAN);
    let refid = label(after, "chime_clock_reference_info", "reference_id").unwrap_or("?");
    let delay = value(after, "chime_clock_root_delay_seconds").unwrap_or(f64::NAN);
    let disp = value(after, "chime_clock_root_dispersion_seconds").unwrap_or(f64::NAN);
    let workers: std::collections::BTreeSet<&str> = after
        .iter()
        .filter(|x| x.name == "chime_requests_received_total")
        .filter_map(|x| x.labels.get("worker").map(String::as_str))
        .collect();
    let state = if synced { "synchronized" } else { "UNSYNCHRONIZED" };
    let _ = writeln!(t, "clock:      {state}, stratum {stratum}, reference {refid}, leap {leap}");
    let _ = writeln!(
        t,
        "root:       distance {} (delay {}, dispersion {})",
        secs(delay / 2.0 + disp),
        secs(delay),
        secs(disp)
    );
    let source = label(after, "chime_upstream_source_info", "source").unwrap_or("?");
    let up = value(after, "chime_upstream_up") == Some(1.0);
    let age = value(after, "chime_upstream_last_success_age_seconds").unwrap_or(f64::NAN);
    let holdover = value(after, "chime_upstream_holdover") == Some(1.0);
    let offset = value(after, "chime_upstream_offset_seconds").unwrap_or(f64::NAN);
    let upstate = if up {
        "up"
    } else if holdover {
        "LOST (holdover)"
    } else {
        "LOST"
    };
    let age = if age.is_nan() { "never".to_owned() } else { format!("{age:.1} s ago") };
    let _ = writeln!(t, "upstream:   {source}, {upstate}, last good {age}, offset {}", secs(offset));
    let rate = |name| (sum(after, name) - sum(before, name)).max(0.0) / elapsed.max(1e-3);
    let _ = writeln!(
        t,
        "traffic:    {:.1} requests/s, {:.1} replies/s",
        rate("chime_requests_received_total"),
        rate("chime_replies_sent_total")
    );
    let mut drops: BTreeMap<&str, f64> = BTreeMap::new();
    for x in after.iter().filter(|x| x.name == "chime_drops_total") {
        if let Some(r) = x.labels.get("reason") {
            *drops.entry(r.as_str()).or_default() += x.value;
        }
    }
    let nonzero: Vec<String> = drops.iter().filter(|(_, n)| **n > 0.0).map(|(r, n)| format!("{r} {n}")).collect();
    let _ = writeln!(t, "drops:      {}", if nonzero.is_empty() { "none".to_owned() } else { nonzero.join(", ") });
    let _ = writeln!(t, "workers:    {}", workers.len());
    let code = if synced && !workers.is_empty() { EXIT_OK } else { EXIT_UNSYNCHRONIZED };
    (t, code)
}

/// GET /metrics from `addr`, bounded in time.
pub fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").map_err(|e| format!("{addr}: {e}"))?;
    let mut resp = Vec::new();
    s.take(64 << 20).read_to_end(&mut resp).map_err(|e| format!("{addr}: {e}"))?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp.split_once("\r\n\r\n").ok_or_else(|| format!("{addr}: truncated HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("{addr}: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_owned())
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
    if value(&second, "chime_clock_synchronized").is_none() {
        eprintln!("chimed status: {addr} does not look like chimed's metrics endpoint");
        return ExitCode::from(EXIT_UNREACHABLE);
    }
    let (text, code) = summarize(&first, &second, start.elapsed().as_secs_f64());
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
        chime_upstream_holdover 0\n";

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
        let (text, code) = summarize(&parse(BEFORE), &parse(AFTER), 1.0);
        assert_eq!(code, EXIT_OK, "{text}");
        assert!(text.contains("synchronized, stratum 3, reference 192.0.2.1"), "{text}");
        assert!(text.contains("distance 2.000 ms"), "{text}");
        assert!(text.contains("chrony, up, last good 0.5 s ago"), "{text}");
        assert!(text.contains("100.0 requests/s, 100.0 replies/s"), "{text}");
        assert!(text.contains("drops:      rate_limited 7\n"), "{text}");
        assert!(text.contains("workers:    2"), "{text}");
        let unsync = AFTER.replace("chime_clock_synchronized 1", "chime_clock_synchronized 0");
        let (text, code) = summarize(&parse(BEFORE), &parse(&unsync), 1.0);
        assert_eq!(code, EXIT_UNSYNCHRONIZED);
        assert!(text.contains("UNSYNCHRONIZED"), "{text}");
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
