//! Counters and latency histograms of one thread and one step, and the
//! report they turn into.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::fuzz::Fuzz;
use crate::request::{Adv, Invalid, KOD_NAMES};

/// Everything one thread counts in one step; merged across threads.
#[derive(Clone, Debug)]
pub struct Counts {
    /// Datagrams sent, all kinds.
    pub sent: u64,
    /// Sent requests a server should answer (loss is counted over these).
    pub expecting: u64,
    /// Valid time replies to those.
    pub valid: u64,
    /// Valid replies that arrived after their request timed out.
    pub late: u64,
    /// Requests that timed out with no reply.
    pub timeouts: u64,
    /// Invalid replies by reason, indexed like [`Invalid::ALL`].
    pub invalid: [u64; Invalid::ALL.len()],
    /// KoD replies by code, indexed like [`KOD_NAMES`].
    pub kod: [u64; KOD_NAMES.len()],
    /// Valid replies from a server that says it is unsynchronized.
    pub unsynchronized: u64,
    /// Interleaved requests answered in basic mode.
    pub interleaved_basic: u64,
    /// Interleaved requests answered in interleaved mode.
    pub interleaved_interleaved: u64,
    /// Adversarial packets sent, by kind.
    pub adv_sent: [u64; Adv::ALL.len()],
    /// Replies (of any sort) to adversarial packets, by kind.
    pub adv_replies: [u64; Adv::ALL.len()],
    /// Fuzz packets sent, by class.
    pub fuzz_sent: [u64; Fuzz::ALL.len()],
    /// Replies (of any sort) to fuzz packets, by class.
    pub fuzz_replies: [u64; Fuzz::ALL.len()],
    /// Replies whose request was found and their lengths compared (a
    /// longer reply counts as invalid `longer_than_request`).
    pub length_checked: u64,
    /// Fresh NTS cookies received.
    pub nts_cookies: u64,
    /// NTS requests sent with a reused cookie (pool dry).
    pub nts_cookie_reuse: u64,
    /// `ECONNREFUSED` (ICMP port unreachable) on send or receive.
    pub econnrefused: u64,
    /// Sends the kernel refused for a full buffer (retried later).
    pub send_would_block: u64,
    /// Other send errors.
    pub send_errors: u64,
    /// AF_XDP: frames that reached the generator's sockets but were no
    /// reply from the target to one of its clients (or found no room on
    /// the way to the thread owning the client).
    pub stray: u64,
    /// Time the thread took to send its share, ns.
    pub send_elapsed_ns: u64,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            sent: 0,
            expecting: 0,
            valid: 0,
            late: 0,
            timeouts: 0,
            invalid: [0; Invalid::ALL.len()],
            kod: [0; KOD_NAMES.len()],
            unsynchronized: 0,
            interleaved_basic: 0,
            interleaved_interleaved: 0,
            adv_sent: [0; Adv::ALL.len()],
            adv_replies: [0; Adv::ALL.len()],
            fuzz_sent: [0; Fuzz::ALL.len()],
            fuzz_replies: [0; Fuzz::ALL.len()],
            length_checked: 0,
            nts_cookies: 0,
            nts_cookie_reuse: 0,
            econnrefused: 0,
            send_would_block: 0,
            send_errors: 0,
            stray: 0,
            send_elapsed_ns: 0,
        }
    }
}

fn add<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

impl Counts {
    /// Adds another thread's counts.
    pub fn merge(&mut self, o: &Self) {
        self.sent += o.sent;
        self.expecting += o.expecting;
        self.valid += o.valid;
        self.late += o.late;
        self.timeouts += o.timeouts;
        add(&mut self.invalid, &o.invalid);
        add(&mut self.kod, &o.kod);
        self.unsynchronized += o.unsynchronized;
        self.interleaved_basic += o.interleaved_basic;
        self.interleaved_interleaved += o.interleaved_interleaved;
        add(&mut self.adv_sent, &o.adv_sent);
        add(&mut self.adv_replies, &o.adv_replies);
        add(&mut self.fuzz_sent, &o.fuzz_sent);
        add(&mut self.fuzz_replies, &o.fuzz_replies);
        self.length_checked += o.length_checked;
        self.nts_cookies += o.nts_cookies;
        self.nts_cookie_reuse += o.nts_cookie_reuse;
        self.econnrefused += o.econnrefused;
        self.send_would_block += o.send_would_block;
        self.send_errors += o.send_errors;
        self.stray += o.stray;
        self.send_elapsed_ns = self.send_elapsed_ns.max(o.send_elapsed_ns);
    }

    /// Every reply received, valid or not (KoD, invalid, late, adversarial).
    pub fn replies_seen(&self) -> u64 {
        self.valid
            + self.late
            + self.invalid.iter().sum::<u64>()
            + self.kod.iter().sum::<u64>()
            + self.adv_replies.iter().sum::<u64>()
            + self.fuzz_replies.iter().sum::<u64>()
    }

    /// Fraction of expecting requests without a valid reply.
    pub fn loss(&self) -> f64 {
        if self.expecting == 0 { 0.0 } else { 1.0 - self.valid as f64 / self.expecting as f64 }
    }
}

/// Round-trip and residence histograms, in ns.
#[derive(Clone, Debug)]
pub struct Latency {
    /// Round-trip time.
    pub rtt: Histogram<u64>,
    /// Server residence T3 - T2.
    pub residence: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        let h = || Histogram::new_with_bounds(1, 120_000_000_000, 3).unwrap_or_else(|e| panic!("histogram: {e}"));
        Self { rtt: h(), residence: h() }
    }
}

impl Latency {
    /// Adds another thread's histograms.
    pub fn merge(&mut self, o: &Self) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.rtt.add(&o.rtt);
        let _ = self.residence.add(&o.residence);
    }
}

/// Percentiles of a histogram, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Percentiles {
    /// From a histogram in ns.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Adversarial counts of one kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AdvCount {
    /// Sent.
    pub sent: u64,
    /// Replies received (a hardened server sends none, a flood gets KoD
    /// RATE or silence).
    pub replies: u64,
}

/// One step (or the whole run at a fixed rate).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepReport {
    /// Target request rate, per second.
    pub offered_rate: f64,
    /// Rate actually sent (sent / sending time).
    pub sent_rate: f64,
    /// Valid replies per second of sending time.
    pub answered_rate: f64,
    /// Seconds spent sending.
    pub duration_secs: f64,
    /// Datagrams sent.
    pub sent: u64,
    /// Requests that expect a reply.
    pub expecting: u64,
    /// Valid replies.
    pub valid: u64,
    /// Loss over the requests that expect a reply (0 to 1).
    pub loss: f64,
    /// Replies after the request timed out.
    pub late: u64,
    /// Requests with no reply before the timeout.
    pub timeouts: u64,
    /// Invalid replies by reason (nonzero ones).
    pub invalid: BTreeMap<String, u64>,
    /// KoD replies by code (nonzero ones).
    pub kod: BTreeMap<String, u64>,
    /// Valid replies that said "unsynchronized".
    pub unsynchronized: u64,
    /// Interleaved requests answered in basic mode.
    pub interleaved_basic: u64,
    /// Interleaved requests answered in interleaved mode.
    pub interleaved_interleaved: u64,
    /// Adversarial packets by kind (kinds sent only).
    pub adversarial: BTreeMap<String, AdvCount>,
    /// `--kind fuzz` packets by class (classes sent only).
    pub fuzz: BTreeMap<String, AdvCount>,
    /// Replies whose request was found and whose length was compared with
    /// it (longer ones are in `invalid` as `longer_than_request`).
    pub length_checked: u64,
    /// Fresh NTS cookies received.
    pub nts_cookies: u64,
    /// NTS requests that reused a cookie.
    pub nts_cookie_reuse: u64,
    /// ICMP errors (port unreachable) seen as ECONNREFUSED.
    pub econnrefused: u64,
    /// Sends refused for a full socket buffer.
    pub send_would_block: u64,
    /// Other send errors.
    pub send_errors: u64,
    /// AF_XDP: frames received that were no reply to one of the clients.
    pub stray: u64,
    /// Whether the generator sent below 95 % of the offered rate (then it,
    /// not the server, was the bottleneck).
    pub generator_limited: bool,
    /// Round-trip time.
    pub rtt: Percentiles,
    /// Server residence (T3 - T2).
    pub residence: Percentiles,
}

impl StepReport {
    /// The report of a step from its merged counts and histograms.
    pub fn new(offered_rate: f64, c: &Counts, l: &Latency) -> Self {
        let secs = (c.send_elapsed_ns as f64 / 1e9).max(1e-9);
        let nonzero = |names: &[&str], v: &[u64]| -> BTreeMap<String, u64> {
            names.iter().zip(v).filter(|(_, n)| **n > 0).map(|(k, n)| ((*k).to_owned(), *n)).collect()
        };
        let inv_names: Vec<&str> = Invalid::ALL.iter().map(|i| i.name()).collect();
        // Per kind sent (and the replies to it), for the kinds sent.
        let sent_kinds = |names: &mut dyn Iterator<Item = &'static str>, sent: &[u64], replies: &[u64]| {
            names
                .zip(sent.iter().zip(replies))
                .filter(|(_, (s, _))| **s > 0)
                .map(|(k, (s, r))| (k.to_owned(), AdvCount { sent: *s, replies: *r }))
                .collect::<BTreeMap<_, _>>()
        };
        let adversarial = sent_kinds(&mut Adv::ALL.iter().map(|a| a.name()), &c.adv_sent, &c.adv_replies);
        let fuzz = sent_kinds(&mut Fuzz::ALL.iter().map(|f| f.name()), &c.fuzz_sent, &c.fuzz_replies);
        let sent_rate = c.sent as f64 / secs;
        Self {
            offered_rate,
            sent_rate,
            answered_rate: c.valid as f64 / secs,
            duration_secs: secs,
            sent: c.sent,
            expecting: c.expecting,
            valid: c.valid,
            loss: c.loss(),
            late: c.late,
            timeouts: c.timeouts,
            invalid: nonzero(&inv_names, &c.invalid),
            kod: nonzero(&KOD_NAMES, &c.kod),
            unsynchronized: c.unsynchronized,
            interleaved_basic: c.interleaved_basic,
            interleaved_interleaved: c.interleaved_interleaved,
            adversarial,
            fuzz,
            length_checked: c.length_checked,
            nts_cookies: c.nts_cookies,
            nts_cookie_reuse: c.nts_cookie_reuse,
            econnrefused: c.econnrefused,
            send_would_block: c.send_would_block,
            send_errors: c.send_errors,
            stray: c.stray,
            generator_limited: sent_rate < 0.95 * offered_rate,
            rtt: Percentiles::of(&l.rtt),
            residence: Percentiles::of(&l.residence),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_values() {
        let mut l = Latency::default();
        for v in 1..=1000u64 {
            l.rtt.record(v * 1000).unwrap();
        }
        let p = Percentiles::of(&l.rtt);
        assert_eq!(p.count, 1000);
        assert!((p.p50_us - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p90_us - 900.0).abs() < 1.0);
        assert!((p.p99_us - 990.0).abs() < 1.0);
        assert!((p.p999_us - 999.0).abs() < 1.0);
        assert!((p.max_us - 1000.0).abs() < 1.0);
        assert_eq!(Percentiles::of(&l.residence), Percentiles::default());
    }

    #[test]
    fn merge_and_loss() {
        let mut a =
            Counts { sent: 100, expecting: 100, valid: 98, send_elapsed_ns: 1_000_000_000, ..Counts::default() };
        let b = Counts { sent: 100, expecting: 100, valid: 100, kod: [1, 0, 0, 0, 0], ..Counts::default() };
        a.merge(&b);
        assert_eq!(a.sent, 200);
        assert!((a.loss() - 0.01).abs() < 1e-12);
        assert_eq!(a.replies_seen(), 199);
        let r = StepReport::new(200.0, &a, &Latency::default());
        assert_eq!(r.kod.get("RATE"), Some(&1));
        assert!((r.sent_rate - 200.0).abs() < 1e-9);
        assert!(!r.generator_limited);
    }
}
