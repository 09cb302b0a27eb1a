//! `ops/METRICS.md`, generated from [`METRICS`] and from what the endpoint
//! actually renders (the label values), so the document cannot drift from
//! the code: the test `metrics_md_is_current` fails when the committed file
//! differs from what this produces, and says how to regenerate it:
//!
//! ```sh
//! CHIME_BLESS=1 cargo test -p chime-server --lib metrics_md_is_current
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::metrics::{METRICS, MetricDef, MetricKind};

/// Sections of the document: the first whose prefix a metric name starts
/// with takes it.
const SECTIONS: &[(&str, &str)] = &[
    ("chime_requests_", "Requests and replies"),
    ("chime_replies_", "Requests and replies"),
    ("chime_drops_", "Requests and replies"),
    ("chime_kod_", "Requests and replies"),
    ("chime_io_", "Requests and replies"),
    ("chime_ratelimit_", "Rate limiting"),
    ("chime_clock_", "Clock and upstream"),
    ("chime_upstream_", "Clock and upstream"),
    ("chime_leap_", "Clock and upstream"),
    ("chime_phc_", "Clock and upstream"),
    ("chime_nts_ke_", "NTS-KE"),
    ("chime_nts_", "NTS"),
    ("chime_xdp_", "AF_XDP (XDP backend)"),
    ("chime_interleaved_", "Interleaved mode and timestamps"),
    ("chime_tx_stamps_", "Interleaved mode and timestamps"),
    ("chime_residence_", "Interleaved mode and timestamps"),
    ("chime_build_", "Process, backend and workers"),
    ("chime_config_", "Process, backend and workers"),
    ("chime_seccomp_", "Process, backend and workers"),
    ("chime_backend_", "Process, backend and workers"),
    ("chime_worker_", "Process, backend and workers"),
];

/// Labels whose values depend on the deployment: described, not listed.
const FREE_LABELS: &[(&str, &str)] = &[
    ("worker", "worker index, `0` to workers − 1 (XDP: worker *i* serves NIC queue *i*)"),
    ("core", "the CPU core the worker is pinned to; empty if unknown"),
    ("queue", "the NIC queue the worker serves (XDP); empty for sockets"),
    ("xdp_bind", "how the worker's AF_XDP socket is bound: `zero-copy` or `copy`; empty for sockets"),
    ("backend", "`socket` or `xdp`"),
    ("interface", "the interface the XDP program is attached to; empty for sockets"),
    ("xdp_attach", "`native` (in the driver) or `generic` (after the kernel built the skb); empty for sockets"),
    ("key_id", "an NTS master key id, `0x` and 8 hex digits"),
    ("role", "`current` (seals new cookies) or `retired` (kept to open cookies issued under it)"),
    ("version", "chimed's version"),
    ("source", "`kernel`, `chrony` or `ptp4l` (`upstream.source`)"),
    ("mode", "`enforce`, `log` or `off` (`server.seccomp`)"),
    ("reference_id", "as in replies: a dotted IPv4 address, or a code such as `GPS` or `LOCL`"),
];

/// The meanings of one enumerated label's values: (metric, label, [(value,
/// meaning)]).
type ValueDocs = (&'static str, &'static str, &'static [(&'static str, &'static str)]);

/// Meanings of enumerated label values, per (metric, label). The test
/// checks these are exactly the values the endpoint renders.
const VALUE_DOCS: &[ValueDocs] = &[
    (
        "chime_drops_total",
        "reason",
        &[
            ("too_short", "shorter than the 48-byte NTP header"),
            ("malformed_extension", "bytes after the header that are neither extension fields nor a MAC"),
            ("bad_version", "NTP version 0 or above 4"),
            ("mode6", "an ntpq control query (never answered)"),
            ("mode7", "an ntpdc private query (never answered: the classic amplifier)"),
            ("kiss_of_death", "a KoD sent to us, often our own reflected"),
            ("not_client_mode", "any other mode but 3 (client)"),
            ("legacy_mac", "a symmetric-key MAC; chime has no symmetric keys"),
            ("bad_source", "source port 0, or a source address no reply can go to"),
            ("denied", "denied by the ACL, with `access.deny_response = \"silent\"`"),
            ("rate_limited", "over the client's rate limit and not chosen for a KoD RATE"),
            ("unsynchronized", "the clock is unsynchronized and `upstream.unsynchronized = \"silent\"`"),
            ("reply_too_long", "the reply would be longer than the request (never sent)"),
            ("buffer_too_small", "the reply does not fit the output buffer (a bug if nonzero)"),
            ("nts_malformed", "NTS fields that do not parse"),
            ("nts_auth_failed", "the NTS authenticator does not verify"),
            ("nts_no_nonce_source", "an NTS request reached a responder without a nonce source (a bug if nonzero)"),
        ],
    ),
    (
        "chime_io_events_total",
        "event",
        &[
            ("recv_error", "a receive call failed"),
            ("send_error", "a reply the kernel refused (sendmmsg failed or sent fewer)"),
            ("truncated", "a datagram larger than the receive buffer (dropped)"),
            ("no_timestamp", "a request without a kernel or XDP receive stamp (stamped in userspace instead)"),
            ("bad_frame", "an XDP frame that is not a well-formed Ethernet/IP/UDP request (dropped)"),
        ],
    ),
    (
        "chime_xdp_queue_events_total",
        "event",
        &[
            ("rx", "frames taken from the RX ring"),
            ("tx", "replies put on the TX ring"),
            ("tx_ring_full", "replies dropped because the TX ring was full"),
            ("bad_desc", "descriptors the frame accounting refused (a bug if nonzero)"),
            ("tx_kicks", "`sendto` kicks of the TX path"),
            ("rx_wakeups", "wake-ups of the fill ring"),
            ("kernel_rx_dropped", "kernel: packets dropped for other reasons"),
            ("kernel_rx_invalid_descs", "kernel: invalid fill-ring descriptors"),
            ("kernel_tx_invalid_descs", "kernel: invalid TX-ring descriptors"),
            ("kernel_rx_ring_full", "kernel: packets dropped because the RX ring was full (the worker is behind)"),
            ("kernel_fill_ring_empty_descs", "kernel: times the fill ring was empty (no frame for a packet)"),
            ("kernel_tx_ring_empty_descs", "kernel: times the TX ring was found empty"),
        ],
    ),
    (
        "chime_xdp_program_packets_total",
        "counter",
        &[
            ("pass_not_ip", "not IPv4/IPv6 (ARP, LLDP, …): passed to the kernel"),
            ("pass_not_udp", "IP but not UDP: passed"),
            ("pass_fragment", "an IPv4 fragment: passed"),
            ("pass_ipv6_ext", "IPv6 with an extension header: passed"),
            ("pass_other_port", "UDP to another port: passed"),
            ("pass_other_dest", "the NTP port, but not one of the server addresses: passed"),
            ("pass_malformed", "truncated or invalid headers: passed (the kernel counts and drops them)"),
            ("pass_no_socket", "steered, but no AF_XDP socket on the queue: passed"),
            ("drop_short", "UDP payload shorter than 48 bytes: dropped"),
            ("drop_not_client", "NTP mode other than 3: dropped (`xdp.drop_non_client`)"),
            ("drop_denied", "source in the ACL's deny list: dropped"),
            ("redirect", "redirected to the queue's AF_XDP socket"),
            ("meta_failed", "no room for metadata: steered without a stamp"),
            ("stamp_hw", "stamped with the NIC's clock"),
            ("stamp_sw", "stamped with `bpf_ktime_get_tai_ns()`"),
            ("drop_flood", "source over its per-source rate (`xdp.source_rate`, `xdp.source_burst`): dropped"),
        ],
    ),
    (
        "chime_nts_ke_handshakes_total",
        "result",
        &[
            ("ok", "cookies sent"),
            ("tls", "TLS failed: handshake error, bad record, unexpected message"),
            ("alpn", "the client did not offer ALPN `ntske/1`"),
            ("timeout", "the connection's deadline passed before the response was written"),
            ("bad_request", "malformed or incomplete request, or nothing negotiated"),
            ("rate_limited", "the source had used up its handshakes (closed at accept)"),
            (
                "too_many_connections",
                "evicted: the oldest connection (of all, or of its source) closed to make room at the connection limit",
            ),
            ("io", "a socket error, or the peer closed mid-exchange"),
        ],
    ),
];

fn section(name: &str) -> &'static str {
    SECTIONS.iter().find(|(p, _)| name.starts_with(p)).map_or("Other", |(_, s)| s)
}

fn kind(d: &MetricDef) -> &'static str {
    match d.kind {
        MetricKind::Counter => "counter",
        MetricKind::Gauge => "gauge",
        MetricKind::Info => "info",
    }
}

/// Label values seen in `rendered`, per (sample name, label).
pub fn label_values(rendered: &str) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for s in crate::status::parse(rendered) {
        for (k, v) in s.labels {
            out.entry((s.name.clone(), k)).or_default().insert(v);
        }
    }
    out
}

/// The document, from [`METRICS`] and a render of the endpoint (for the
/// values of enumerated labels).
pub fn markdown(rendered: &str) -> String {
    let values = label_values(rendered);
    let mut t = String::new();
    t.push_str(
        "# chimed metrics\n\n\
         <!-- Generated from METRICS in server/src/metrics.rs; do not edit. Regenerate with\n     \
         CHIME_BLESS=1 cargo test -p chime-server --lib metrics_md_is_current -->\n\n\
         chimed serves its metrics at `http://<metrics.listen>/metrics` (default `127.0.0.1:9123`) as \
         OpenMetrics 1.0 text. Every value is read at scrape time from counters the workers publish once per \
         batch; scraping costs the packet path nothing. `GET /ratelimit` on the same listener lists the source \
         prefixes (IPv4 /24, IPv6 /48) rate-limited most in the last 10–20 s, one `PREFIX COUNT` line each; \
         they are not metric labels, since a top list of client networks churns and each would become a time \
         series of its own. `chimed status` summarizes both.\n\n\
         Conventions:\n\n\
         - A counter's samples end in `_total` (the `# TYPE` line names the family without it); an info \
         metric's end in `_info` and are always 1, the information being in the labels. These are the names \
         to query.\n\
         - Counters start at zero when chimed starts; use `rate()`/`increase()`.\n\
         - Per-worker metrics carry `worker`; sum them for the server.\n\
         - `NaN` means unknown (no reading yet, or not applicable), not zero.\n\
         - Every family always has samples, so a dashboard or rule never silently reads nothing: the XDP \
         families are zero with the socket backend. Exceptions, with no samples until they apply: the NTS key \
         metrics (without NTS), `chime_backend_info` (before the backend has started) and `chime_seccomp_info` \
         (before start-up is over).\n\
         - The dashboard `ops/grafana/chime.json` and the rules `ops/prometheus/chime-alerts.yml` use only \
         these names; `server/tests/observe.rs` checks them against a running chimed.\n",
    );
    let mut sections: Vec<&str> = Vec::new();
    for d in &METRICS {
        let s = section(d.name);
        if !sections.contains(&s) {
            sections.push(s);
        }
    }
    for s in sections {
        let _ = write!(t, "\n## {s}\n\n| metric | type | labels | meaning |\n|---|---|---|---|\n");
        for d in METRICS.iter().filter(|d| section(d.name) == s) {
            let labels: Vec<String> = d.labels.iter().map(|l| format!("`{l}`")).collect();
            let _ = writeln!(t, "| `{}` | {} | {} | {} |", d.name, kind(d), labels.join(", "), d.help);
        }
    }
    t.push_str("\n## Label values\n\n");
    let mut free_used: BTreeSet<&str> = BTreeSet::new();
    for d in &METRICS {
        for label in d.labels {
            if FREE_LABELS.iter().any(|(l, _)| l == label) {
                free_used.insert(label);
            }
        }
    }
    for (label, text) in FREE_LABELS.iter().filter(|(l, _)| free_used.contains(l)) {
        let _ = writeln!(t, "- `{label}`: {text}.");
    }
    for d in &METRICS {
        for label in d.labels.iter().filter(|l| !FREE_LABELS.iter().any(|(f, _)| f == *l)) {
            let seen = values.get(&(d.name.to_owned(), (*label).to_owned())).cloned().unwrap_or_default();
            match VALUE_DOCS.iter().find(|(m, l, _)| *m == d.name && l == label) {
                Some((_, _, docs)) => {
                    let _ = writeln!(t, "- `{label}` of `{}`:", d.name);
                    for (v, meaning) in *docs {
                        let _ = writeln!(t, "  - `{v}`: {meaning}");
                    }
                }
                None => {
                    let list: Vec<String> = seen.iter().map(|v| format!("`{v}`")).collect();
                    let _ = writeln!(t, "- `{label}` of `{}`: {}", d.name, list.join(", "));
                }
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics;

    fn rendered() -> String {
        let (shared, status) = metrics::tests::setup();
        metrics::render(shared, status).unwrap()
    }

    #[test]
    fn every_metric_has_a_section_and_every_label_is_documented() {
        let values = label_values(&rendered());
        for d in &METRICS {
            assert_ne!(section(d.name), "Other", "{} has no section", d.name);
            for label in d.labels {
                if FREE_LABELS.iter().any(|(l, _)| l == label) {
                    continue;
                }
                let seen = values.get(&(d.name.to_owned(), (*label).to_owned()));
                let seen = seen.unwrap_or_else(|| panic!("{} renders no {label}", d.name));
                if let Some((_, _, docs)) = VALUE_DOCS.iter().find(|(m, l, _)| *m == d.name && l == label) {
                    let documented: BTreeSet<String> = docs.iter().map(|(v, _)| (*v).to_owned()).collect();
                    assert_eq!(&documented, seen, "documented values of {label} of {} differ from the render", d.name);
                }
            }
        }
        for (m, l, _) in VALUE_DOCS {
            assert!(METRICS.iter().any(|d| d.name == *m && d.labels.contains(l)), "{m} {l} documented, not exported");
        }
    }

    #[test]
    fn metrics_md_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/METRICS.md");
        let want = markdown(&rendered());
        if std::env::var_os("CHIME_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
            return;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is not what METRICS in server/src/metrics.rs produces; regenerate it with\n  \
             CHIME_BLESS=1 cargo test -p chime-server --lib metrics_md_is_current",
            path.display()
        );
    }
}
