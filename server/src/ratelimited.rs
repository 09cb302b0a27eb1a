//! The source prefixes rate-limited most, from the workers to the metrics
//! thread (`GET /ratelimit`, and `chimed status`).
//!
//! Each worker's [`Responder`] keeps a fixed-size top-k sketch of the
//! prefixes (IPv4 /24, IPv6 /48) whose requests were over the rate limit
//! ([`chime_proto::topk`]). About once a second ([`PUBLISH_INTERVAL`]) the
//! worker copies it into its [`PrefixCell`] with `try_lock`: a worker never
//! waits (if the metrics thread holds the cell it tries again next batch),
//! and no packet touches the lock. Every [`WINDOW`] the worker moves the
//! current window to "previous" and clears its sketch, so the report covers
//! the last 10 to 20 seconds: recent enough to be "now", long enough that
//! a burst just before the scrape is not lost to a window boundary.
//!
//! The prefixes are served on their own endpoint, not as Prometheus labels:
//! a top list of client networks churns (under a spoofed flood, new
//! prefixes every window), and each one would become a new time series kept
//! for the retention period; it also keeps client addresses out of a
//! long-lived metrics store. How much is rate-limited in all is in
//! `chime_drops_total{reason="rate_limited"}` and `chime_kod_sent_total{code="RATE"}`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chime_proto::Responder;
use chime_proto::topk::{Prefix, TopPrefixes};

/// How often a worker publishes its sketch.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);
/// How long one window lasts.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Prefixes listed by [`report`] at most.
pub const REPORT_TOP: usize = 10;

/// What one worker last published.
#[derive(Clone, Debug)]
struct Published {
    /// The window in progress, as of the last publication.
    current: TopPrefixes,
    current_start: Instant,
    /// The last complete window and its length (zero: none yet).
    previous: TopPrefixes,
    previous_span: Duration,
}

/// One worker's published prefixes, read by the metrics thread.
#[derive(Debug)]
pub struct PrefixCell {
    inner: Mutex<Published>,
}

impl Default for PrefixCell {
    fn default() -> Self {
        let now = Instant::now();
        let empty = TopPrefixes::default();
        Self {
            inner: Mutex::new(Published {
                current: empty.clone(),
                current_start: now,
                previous: empty,
                previous_span: Duration::ZERO,
            }),
        }
    }
}

/// The worker's side: when it last published and when its window started.
#[derive(Debug)]
pub struct PrefixWindow {
    last_publish: Instant,
    window_start: Instant,
}

impl PrefixWindow {
    /// A window starting `now`.
    pub fn new(now: Instant) -> Self {
        Self { last_publish: now, window_start: now }
    }

    /// Publishes `responder`'s sketch into `cell` if [`PUBLISH_INTERVAL`]
    /// has passed and the cell is free; at the end of a window, also moves
    /// it to "previous" and clears the responder's sketch. Never blocks.
    pub fn maybe_publish(&mut self, now: Instant, responder: &mut Responder, cell: &PrefixCell) {
        if now.saturating_duration_since(self.last_publish) < PUBLISH_INTERVAL {
            return;
        }
        let Ok(mut p) = cell.inner.try_lock() else { return };
        self.last_publish = now;
        p.current.clone_from(responder.rate_limited());
        p.current_start = self.window_start;
        let span = now.saturating_duration_since(self.window_start);
        if span >= WINDOW {
            let p = &mut *p;
            std::mem::swap(&mut p.previous, &mut p.current);
            p.previous_span = span;
            p.current.clear();
            p.current_start = now;
            responder.clear_rate_limited();
            self.window_start = now;
        }
    }
}

/// The prefixes rate-limited most over all workers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// The time covered (the longest of any worker's).
    pub span: Duration,
    /// Rate-limited requests in the span, all prefixes.
    pub total: u64,
    /// The top prefixes with their (approximate, at most over-) counts,
    /// largest first.
    pub top: Vec<(Prefix, u64)>,
}

impl Report {
    /// The text `GET /ratelimit` serves: a comment line, then one line per
    /// prefix, `PREFIX COUNT`.
    pub fn to_text(&self) -> String {
        let mut t = format!(
            "# rate-limited requests by source prefix (IPv4 /24, IPv6 /48) in the last {:.0} s: {} in all; \
             top {} (approximate counts)\n",
            self.span.as_secs_f64(),
            self.total,
            REPORT_TOP
        );
        for (prefix, n) in &self.top {
            let _ = writeln!(t, "{prefix} {n}");
        }
        t
    }
}

/// Merges every worker's last two windows (a client's /24 may be spread
/// over workers).
pub fn report<'a>(cells: impl IntoIterator<Item = &'a PrefixCell>, now: Instant) -> Report {
    let mut sums: HashMap<Prefix, u64> = HashMap::new();
    let mut r = Report::default();
    for cell in cells {
        let p = cell.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        r.span = r.span.max(p.previous_span + now.saturating_duration_since(p.current_start));
        r.total += p.previous.total() + p.current.total();
        for e in p.previous.entries().chain(p.current.entries()) {
            *sums.entry(e.prefix).or_default() += e.count;
        }
    }
    let mut top: Vec<(Prefix, u64)> = sums.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(REPORT_TOP);
    r.top = top;
    r
}

/// Parses [`Report::to_text`] back (for `chimed status`): the prefix lines.
pub fn parse_report(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (prefix, n) = l.split_once(' ')?;
            Some((prefix.to_owned(), n.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use chime_proto::acl::Acl;
    use chime_proto::ratelimit::RateLimitConfig;
    use chime_proto::{ClockSnapshot, Context, NtpTimestamp, RequestMeta, ResponderConfig, RxTimestamp, StampKind};

    use super::*;

    /// A responder with a burst of 1 that has seen `n` requests from `ip`
    /// (so `n - 1` were rate-limited).
    fn flooded(r: &mut Responder, ip: &str, n: usize) {
        let clock = ClockSnapshot::unsynchronized(-20);
        let acl = Acl::default();
        let ctx = Context { clock: &clock, acl: &acl, nts: None };
        let t = NtpTimestamp::from_unix(1_800_000_000, 0);
        let meta = RequestMeta {
            source: SocketAddr::new(ip.parse::<IpAddr>().unwrap(), 123),
            rx: RxTimestamp { time: t, kind: StampKind::Userspace },
        };
        let mut req = [0u8; 48];
        req[0] = 0x23;
        let mut out = [0u8; 64];
        for _ in 0..n {
            let _ = r.handle(&req, &meta, &ctx, &mut || t, &mut out);
        }
    }

    fn responder() -> Responder {
        let rate_limit = RateLimitConfig { burst: 1, ..RateLimitConfig::default() };
        Responder::new(ResponderConfig { rate_limit, ..ResponderConfig::default() }, 1)
    }

    #[test]
    fn windows_publish_merge_and_expire() {
        let t0 = Instant::now();
        let (mut a, mut b) = (responder(), responder());
        let (ca, cb) = (PrefixCell::default(), PrefixCell::default());
        let (mut wa, mut wb) = (PrefixWindow::new(t0), PrefixWindow::new(t0));
        flooded(&mut a, "198.51.100.7", 101);
        flooded(&mut b, "198.51.100.9", 51);
        flooded(&mut b, "2001:db8:5::1", 11);

        // Not yet a second: nothing published.
        wa.maybe_publish(t0 + Duration::from_millis(500), &mut a, &ca);
        assert!(report([&ca, &cb], t0).top.is_empty());

        let t1 = t0 + Duration::from_secs(1);
        wa.maybe_publish(t1, &mut a, &ca);
        wb.maybe_publish(t1, &mut b, &cb);
        let r = report([&ca, &cb], t1);
        assert_eq!(r.total, 160);
        let top: Vec<(String, u64)> = r.top.iter().map(|(p, n)| (p.to_string(), *n)).collect();
        assert_eq!(top, [("198.51.100.0/24".to_owned(), 150), ("2001:db8:5::/48".to_owned(), 10)]);
        assert_eq!(parse_report(&r.to_text()), top);

        // A held cell: the worker skips, and publishes on a later batch.
        {
            let _guard = ca.inner.lock().unwrap();
            flooded(&mut a, "203.0.113.1", 3);
            wa.maybe_publish(t0 + Duration::from_secs(2), &mut a, &ca);
        }
        assert!(report([&ca], t1).top.iter().all(|(p, _)| p.to_string() != "203.0.113.0/24"));
        wa.maybe_publish(t0 + Duration::from_millis(2100), &mut a, &ca);
        assert!(report([&ca], t1).top.iter().any(|(p, n)| p.to_string() == "203.0.113.0/24" && *n == 2));

        // The window closes: still reported (as the previous window) …
        let t10 = t0 + Duration::from_secs(10);
        wa.maybe_publish(t10, &mut a, &ca);
        assert_eq!(a.rate_limited().total(), 0, "the responder's sketch starts over");
        let r = report([&ca], t10);
        assert_eq!(r.total, 102);
        assert_eq!(r.span, Duration::from_secs(10));
        // … and gone one more window later.
        wa.maybe_publish(t0 + Duration::from_secs(20), &mut a, &ca);
        let r = report([&ca], t0 + Duration::from_secs(20));
        assert_eq!((r.total, r.top.len()), (0, 0));
        assert!(r.to_text().starts_with("# rate-limited requests"));
    }
}
