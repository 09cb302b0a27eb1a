//! The Prometheus/OpenMetrics endpoint.
//!
//! A tiny blocking HTTP/1.1 server on its own thread (`chime-metrics`),
//! one connection at a time: `GET /metrics` renders every worker's
//! counters and the clock state at scrape time, from the same atomics the
//! workers publish into; nothing here touches the packet path.
//! `GET /ratelimit` lists the source prefixes rate-limited most (see
//! [`crate::ratelimited`] for why they are not metric labels).
//!
//! Every metric is declared once in [`METRICS`] (name, kind, labels, help),
//! so documentation and dashboards can be checked against it.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use chime_ebpf::program::XdpCounter;
use chime_nts_ke::FailReason;
use chime_proto::nts::Aead;
use chime_proto::{DropReason, KissCode, StampKind};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tracing::{debug, info, warn};

use crate::control::SharedClockStatus;
use crate::leap::LeapService;
use crate::ratelimited;
use crate::residence::{self, QUANTILES, ResidenceKind};
use crate::shared::{ReloadOutcome, Shared};
use crate::stats::{IoEvent, TxStampKind, WorkerSnapshot, XDP_FRAME_STATES, XdpQueueEvent};
use crate::time::now_ntp;

/// Longest the accept loop sleeps before looking at the shutdown flag.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// Time a client has to send its whole request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// How long, at most, a response waits for the client to close.
const LINGER: Duration = Duration::from_millis(200);
/// How much unread request, at most, is drained before closing.
const LINGER_BYTES: usize = 64 * 1024;
/// What `/metrics` returns.
const CONTENT_TYPE_METRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The kind of a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricKind {
    /// A monotonically increasing count; the name ends in `_total`.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A constant 1 carrying labels; the name ends in `_info`.
    Info,
}

/// One metric family the endpoint exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricDef {
    /// The sample name as scraped (what dashboards query).
    pub name: &'static str,
    /// Kind.
    pub kind: MetricKind,
    /// Label names, in order.
    pub labels: &'static [&'static str],
    /// One line of help.
    pub help: &'static str,
}

const fn def(name: &'static str, kind: MetricKind, labels: &'static [&'static str], help: &'static str) -> MetricDef {
    MetricDef { name, kind, labels, help }
}

use MetricKind::{Counter, Gauge, Info};

/// Every metric the endpoint exports.
pub const METRICS: [MetricDef; 59] = [
    def(
        "chime_requests_received_total",
        Counter,
        &["worker"],
        "Requests the worker handed to the responder; each ends as a time reply, a KoD or a drop.",
    ),
    def(
        "chime_replies_sent_total",
        Counter,
        &["worker"],
        "Time replies built and handed to the kernel or NIC (KoD not included; refused sends also count as \
         chime_io_events_total send_error or chime_xdp_queue_events_total tx_ring_full).",
    ),
    def("chime_drops_total", Counter, &["worker", "reason"], "Requests answered with nothing, by reason."),
    def(
        "chime_kod_sent_total",
        Counter,
        &["worker", "code"],
        "Kiss-o'-Death replies sent, by kiss code (RATE: over the rate limit; DENY, RSTR: access control; NTSN: \
         NTS cookie not accepted).",
    ),
    def(
        "chime_replies_by_stamp_total",
        Counter,
        &["worker", "kind"],
        "Time replies by how the request's receive timestamp was taken (hardware best, userspace worst).",
    ),
    def(
        "chime_io_events_total",
        Counter,
        &["worker", "event"],
        "Transport events outside the responder: failed receives and sends, truncated datagrams, requests \
         without a kernel receive stamp, malformed XDP frames.",
    ),
    def("chime_ratelimit_entries", Gauge, &["worker"], "Rate-limiter table entries holding a client."),
    def(
        "chime_ratelimit_capacity",
        Gauge,
        &["worker"],
        "Rate-limiter table size in entries (each worker limits the clients steered to it).",
    ),
    def(
        "chime_ratelimit_evictions_total",
        Counter,
        &["worker"],
        "Rate-limiter entries that held state and were taken over by another client.",
    ),
    def(
        "chime_ratelimit_memory_bytes",
        Gauge,
        &["worker"],
        "Bytes of the rate-limiter table, allocated once at start and never grown by new sources: 16 per entry \
         of chime_ratelimit_capacity (the worker's share of rate_limit.table_entries, rounded up to a power of \
         two).",
    ),
    def("chime_clock_synchronized", Gauge, &[], "1 if replies announce a synchronized clock, else 0."),
    def("chime_clock_stratum", Gauge, &[], "Stratum announced in replies (16: unsynchronized)."),
    def("chime_clock_leap", Gauge, &[], "Leap indicator announced in replies (0-3; 3: unsynchronized)."),
    def("chime_clock_root_delay_seconds", Gauge, &[], "Root delay announced in replies."),
    def(
        "chime_clock_root_dispersion_seconds",
        Gauge,
        &[],
        "Root dispersion of the served snapshot when it was taken (each reply adds the growth since).",
    ),
    def("chime_clock_kernel_maxerror_seconds", Gauge, &[], "Kernel maximum error (adjtimex); NaN if unreadable."),
    def("chime_clock_kernel_esterror_seconds", Gauge, &[], "Kernel estimated error (adjtimex); NaN if unreadable."),
    def("chime_clock_tai_offset_seconds", Gauge, &[], "TAI - UTC as the kernel knows it; NaN if unreadable."),
    def(
        "chime_leap_file_expiry_seconds",
        Gauge,
        &[],
        "Unix time the leap-second file expires ([leap] file); NaN if none is loaded.",
    ),
    def(
        "chime_leap_next_event_seconds",
        Gauge,
        &[],
        "Unix time of the next known leap second (file, or upstream on its last day); NaN if none.",
    ),
    def(
        "chime_clock_snapshot_age_seconds",
        Gauge,
        &[],
        "Age of the clock snapshot workers serve; NaN if none was published.",
    ),
    def(
        "chime_clock_local_stratum_mode",
        Gauge,
        &[],
        "1 while the undisciplined local clock is served (local_stratum fallback), else 0.",
    ),
    def(
        "chime_xdp_program_packets_total",
        Counter,
        &["counter"],
        "XDP program verdicts (one per packet seen) and receive stamps, summed over CPUs (XDP backend; zero \
         otherwise).",
    ),
    def(
        "chime_xdp_queue_events_total",
        Counter,
        &["worker", "event"],
        "AF_XDP queue events of the worker's socket and the kernel's XDP_STATISTICS for it (XDP backend; zero \
         otherwise).",
    ),
    def(
        "chime_xdp_frames",
        Gauge,
        &["worker", "state"],
        "UMEM frames of the worker's AF_XDP queue by where they are: free, on the fill ring, being answered \
         (user), on the TX ring (XDP backend; zero otherwise).",
    ),
    def("chime_nts_replies_total", Counter, &["worker"], "Authenticated (NTS) time replies sent."),
    def("chime_nts_cookies_sent_total", Counter, &["worker"], "Fresh NTS cookies sent in NTP replies."),
    def(
        "chime_nts_naks_total",
        Counter,
        &["worker"],
        "NTS NAKs sent (KoD NTSN: cookie unknown or not opening), also in chime_kod_sent_total.",
    ),
    def(
        "chime_nts_auth_failures_total",
        Counter,
        &["worker", "cause"],
        "NTS requests dropped: authenticator failed, malformed NTS fields, no nonce source.",
    ),
    def(
        "chime_nts_ke_handshakes_total",
        Counter,
        &["result"],
        "NTS-KE connections by outcome: ok, or why the connection failed.",
    ),
    def("chime_nts_ke_cookies_issued_total", Counter, &[], "Cookies handed out by NTS-KE."),
    def("chime_nts_ke_responses_total", Counter, &["aead"], "Successful NTS-KE responses by negotiated AEAD."),
    def("chime_nts_ke_connections", Gauge, &[], "NTS-KE connections open now."),
    def(
        "chime_nts_key_age_seconds",
        Gauge,
        &["key_id"],
        "Seconds since the current NTS master key was made (or its fleet epoch began), labelled with its id; \
         absent without NTS.",
    ),
    def(
        "chime_nts_key_rotation_interval_seconds",
        Gauge,
        &[],
        "Configured seconds between NTS master key rotations (nts.rotation_interval); absent without NTS.",
    ),
    def(
        "chime_nts_key_info",
        Info,
        &["key_id", "role"],
        "NTS master keys held: the current one (seals new cookies) and the retired ones still opening cookies; \
         absent without NTS.",
    ),
    def("chime_interleaved_replies_total", Counter, &["worker"], "Time replies sent in interleaved mode (RFC 9769)."),
    def(
        "chime_interleaved_lookups_total",
        Counter,
        &["worker", "result"],
        "Requests that looked interleaved, by whether their origin was a remembered T2 (hit) or not (miss).",
    ),
    def(
        "chime_interleaved_evictions_total",
        Counter,
        &["worker"],
        "Remembered replies pushed out of the interleaved-mode table by newer ones.",
    ),
    def("chime_interleaved_entries", Gauge, &["worker"], "Interleaved-mode table entries in use."),
    def("chime_interleaved_memory_bytes", Gauge, &["worker"], "Memory of the interleaved-mode table."),
    def(
        "chime_tx_stamps_total",
        Counter,
        &["worker", "kind"],
        "Transmit timestamps received from the kernel or NIC, by kind (hardware, software).",
    ),
    def(
        "chime_tx_stamps_unmatched_total",
        Counter,
        &["worker"],
        "Transmit timestamps whose reply was no longer in the interleaved-mode table.",
    ),
    def(
        "chime_residence_seconds",
        Gauge,
        &["stamp", "quantile"],
        "Server residence time T3 - T2 over all workers since start, by transmit stamp (written: the \
         transmit timestamp in the reply; precise: the kernel/NIC transmit stamp).",
    ),
    def("chime_residence_count", Gauge, &["stamp"], "Replies in the residence-time histogram."),
    def(
        "chime_phc_offset_seconds",
        Gauge,
        &[],
        "UTC minus the NIC clock (PHC) as last fitted; NaN without a PHC mapping.",
    ),
    def("chime_phc_age_seconds", Gauge, &[], "Age of the PHC mapping; NaN without a PHC mapping."),
    def("chime_build_info", Info, &["version"], "chimed build information."),
    def(
        "chime_seccomp_info",
        Info,
        &["mode"],
        "The system-call filter chimed serves under (server.seccomp): enforce, log or off; absent until \
         start-up is over.",
    ),
    def(
        "chime_config_reloads_total",
        Counter,
        &["result"],
        "SIGHUP configuration reloads by outcome: applied, refused (a setting that needs a restart changed; \
         nothing applied) or failed (unreadable or invalid; nothing applied).",
    ),
    def(
        "chime_backend_info",
        Info,
        &["backend", "interface", "xdp_attach"],
        "The packet path serving (socket or xdp), its interface and XDP attach mode (empty for sockets); \
         absent until the backend has started.",
    ),
    def(
        "chime_worker_info",
        Info,
        &["worker", "core", "queue", "xdp_bind"],
        "Each worker: the core it is pinned to, the NIC queue and AF_XDP bind mode it serves (XDP; empty for \
         sockets).",
    ),
    def(
        "chime_worker_heartbeat_age_seconds",
        Gauge,
        &["worker"],
        "Seconds since the worker last went round its loop; it does at least every 0.1 s even when idle, so a \
         growing value means the worker is stuck.",
    ),
    // Upstream state and health (issue 5).
    def("chime_upstream_up", Gauge, &[], "1 if the latest upstream reading was synchronized and usable, else 0."),
    def(
        "chime_upstream_last_success_age_seconds",
        Gauge,
        &[],
        "Seconds since the upstream was last synchronized and usable; NaN if never.",
    ),
    def("chime_upstream_source_info", Info, &["source"], "The configured upstream source (kernel, chrony, ptp4l)."),
    def(
        "chime_upstream_offset_seconds",
        Gauge,
        &[],
        "Upstream's offset from its reference (kernel offset, ptp4l master offset); NaN where unknown.",
    ),
    def(
        "chime_upstream_holdover",
        Gauge,
        &[],
        "1 while a lost upstream's last good state is served (dispersion growing), else 0.",
    ),
    def("chime_clock_reference_info", Info, &["reference_id"], "Reference ID announced in replies."),
];

/// The name of every metric in [`METRICS`], in the same order.
pub const METRIC_NAMES: &[&str] = &{
    let mut names = [""; METRICS.len()];
    let mut i = 0;
    while i < METRICS.len() {
        names[i] = METRICS[i].name;
        i += 1;
    }
    names
};

/// The running metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    thread: JoinHandle<()>,
}

impl MetricsServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits for the thread to finish (after `shared.shutdown` is set; it
    /// notices within about 100 ms plus any connection in progress).
    pub fn join(self) -> thread::Result<()> {
        self.thread.join()
    }
}

/// Binds `listen` (before returning, so a bad address fails startup) and
/// serves the metrics from a `chime-metrics` thread until
/// `shared.shutdown` is set.
pub fn serve(listen: SocketAddr, shared: Arc<Shared>, clock_status: SharedClockStatus) -> io::Result<MetricsServer> {
    let with_addr = |e: io::Error| io::Error::new(e.kind(), format!("metrics endpoint on {listen}: {e}"));
    let listener = TcpListener::bind(listen).map_err(with_addr)?;
    listener.set_nonblocking(true).map_err(with_addr)?;
    let local_addr = listener.local_addr().map_err(with_addr)?;

    let mut registry = Registry::default();
    registry.register_collector(Box::new(ChimeCollector { shared: Arc::clone(&shared), clock_status }));

    let thread = thread::Builder::new().name("chime-metrics".into()).spawn(move || {
        crate::privdrop::drop_thread_capabilities();
        accept_loop(&listener, &registry, &shared);
    });
    let thread = thread.map_err(with_addr)?;
    info!(%local_addr, "metrics endpoint listening");
    Ok(MetricsServer { local_addr, thread })
}

/// Renders the metrics as the endpoint would (OpenMetrics text).
pub fn render(shared: Arc<Shared>, clock_status: SharedClockStatus) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ChimeCollector { shared, clock_status }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

fn accept_loop(listener: &TcpListener, registry: &Registry, shared: &Shared) {
    let mut accept_failing = false;
    while !shared.shutdown.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                accept_failing = false;
                if let Err(e) = handle_connection(stream, registry, shared) {
                    debug!(%peer, error = %e, "metrics connection failed");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if !accept_failing {
                    warn!(error = %e, "metrics endpoint: accept failed");
                    accept_failing = true;
                }
                thread::sleep(ACCEPT_POLL);
            }
        }
    }
    info!("metrics endpoint stopped");
}

/// A response: status, content type, body.
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Self {
        Self { status, content_type: "text/plain; charset=utf-8", body: body.to_owned(), allow: false }
    }
}

/// Reads one request head and answers it.
fn handle_connection(mut stream: TcpStream, registry: &Registry, shared: &Shared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    let head = loop {
        if let Some(end) = head_end(&buf[..len]) {
            break Some(&buf[..end]);
        }
        if len == buf.len() {
            let r = Response::text("431 Request Header Fields Too Large", "request too large\n");
            return write_response(&mut stream, &r, false);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return write_response(&mut stream, &Response::text("408 Request Timeout", "timeout\n"), false);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[len..]) {
            Ok(0) => break None,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return write_response(&mut stream, &Response::text("408 Request Timeout", "timeout\n"), false);
            }
            Err(e) => return Err(e),
        }
    };
    let Some(head) = head else {
        // The peer closed before finishing its request.
        if len == 0 {
            return Ok(());
        }
        return write_response(&mut stream, &Response::text("400 Bad Request", "bad request\n"), false);
    };
    let (response, head_only) = match parse_request_line(head) {
        Err(()) => (Response::text("400 Bad Request", "bad request\n"), false),
        Ok((method, path)) => {
            let head_only = method == "HEAD";
            let response = if method != "GET" && method != "HEAD" {
                Response { allow: true, ..Response::text("405 Method Not Allowed", "method not allowed\n") }
            } else {
                route(path, registry, shared)
            };
            (response, head_only)
        }
    };
    write_response(&mut stream, &response, head_only)
}

fn route(path: &str, registry: &Registry, shared: &Shared) -> Response {
    match path {
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => Response { status: "200 OK", content_type: CONTENT_TYPE_METRICS, body, allow: false },
                Err(fmt::Error) => {
                    warn!("metrics endpoint: encoding the metrics failed");
                    Response::text("500 Internal Server Error", "encoding failed\n")
                }
            }
        }
        "/ratelimit" => {
            let report = ratelimited::report(shared.workers.iter().map(|w| &w.rate_limited), Instant::now());
            Response::text("200 OK", &report.to_text())
        }
        "/" => Response::text(
            "200 OK",
            "chimed metrics endpoint\n\n/metrics    OpenMetrics text\n/ratelimit  the source prefixes rate-limited most\n",
        ),
        _ => Response::text("404 Not Found", "not found\n"),
    }
}

/// The length of the request head including its blank line, once complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        return Some(i + 4);
    }
    buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

/// `(method, path)` from a request head, the query string removed.
fn parse_request_line(head: &[u8]) -> Result<(&str, &str), ()> {
    let line_end = head.iter().position(|&b| b == b'\n').ok_or(())?;
    let line = head[..line_end].strip_suffix(b"\r").unwrap_or(&head[..line_end]);
    let line = std::str::from_utf8(line).map_err(|_| ())?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(());
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(());
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(());
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(());
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Ok((method, path))
}

fn write_response(stream: &mut TcpStream, r: &Response, head_only: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    if r.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&r.body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()?;
    // Half-close, then drain (briefly, boundedly) what the client sent
    // beyond what was read: closing with unread data would reset the
    // connection and could destroy the response before the client reads it.
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

/// Renders [`METRICS`] from the shared state at scrape time.
#[derive(Debug)]
struct ChimeCollector {
    shared: Arc<Shared>,
    clock_status: SharedClockStatus,
}

/// Starts a metric family, looked up by name in [`METRICS`].
fn family<'a>(enc: &'a mut DescriptorEncoder<'_>, name: &'static str) -> Result<MetricEncoder<'a>, fmt::Error> {
    let d = METRICS.iter().find(|d| d.name == name).ok_or(fmt::Error)?;
    let (base, ty) = match d.kind {
        Counter => (d.name.strip_suffix("_total").ok_or(fmt::Error)?, MetricType::Counter),
        Gauge => (d.name, MetricType::Gauge),
        Info => (d.name.strip_suffix("_info").ok_or(fmt::Error)?, MetricType::Info),
    };
    enc.encode_descriptor(base, d.help, None, ty)
}

fn value(m: MetricEncoder<'_>, counter: bool, v: u64) -> Result<(), fmt::Error> {
    if counter { ConstCounter::new(v).encode(m) } else { ConstGauge::new(v).encode(m) }
}

fn gauge(enc: &mut DescriptorEncoder<'_>, name: &'static str, v: f64) -> Result<(), fmt::Error> {
    ConstGauge::new(v).encode(family(enc, name)?)
}

type Worker = (String, WorkerSnapshot);

/// One sample per worker.
fn per_worker(
    enc: &mut DescriptorEncoder<'_>,
    name: &'static str,
    workers: &[Worker],
    f: impl Fn(&WorkerSnapshot) -> u64,
) -> Result<(), fmt::Error> {
    let counter = name.ends_with("_total");
    let mut m = family(enc, name)?;
    for (w, s) in workers {
        let labels = [("worker", w.as_str())];
        value(m.encode_family(&labels)?, counter, f(s))?;
    }
    Ok(())
}

/// One sample per worker and label value (all values, zeros included).
fn per_worker_labeled(
    enc: &mut DescriptorEncoder<'_>,
    name: &'static str,
    label: &'static str,
    values: &[&'static str],
    workers: &[Worker],
    f: impl Fn(&WorkerSnapshot) -> &[u64],
) -> Result<(), fmt::Error> {
    let mut m = family(enc, name)?;
    for (w, s) in workers {
        for (v, n) in values.iter().zip(f(s)) {
            let labels = [("worker", w.as_str()), (label, v)];
            value(m.encode_family(&labels)?, true, *n)?;
        }
    }
    Ok(())
}

impl ChimeCollector {
    fn encode_upstream(
        &self,
        e: &mut DescriptorEncoder<'_>,
        status: &crate::control::ClockStatus,
        snap: &chime_proto::ClockSnapshot,
    ) -> Result<(), fmt::Error> {
        let u = &status.upstream;
        let age = u.last_success.map_or(f64::NAN, |t| now_ntp().diff_secs(t).max(0.0));
        gauge(e, "chime_upstream_up", f64::from(u8::from(u.up)))?;
        gauge(e, "chime_upstream_last_success_age_seconds", age)?;
        family(e, "chime_upstream_source_info")?.encode_info(&[("source", u.source)])?;
        gauge(e, "chime_upstream_offset_seconds", u.offset.unwrap_or(f64::NAN))?;
        let holdover = u.phase == crate::upstream::Phase::Holdover;
        gauge(e, "chime_upstream_holdover", f64::from(u8::from(holdover)))?;
        let refid = crate::upstream::refid_text(snap.reference_id);
        family(e, "chime_clock_reference_info")?.encode_info(&[("reference_id", refid.as_str())])?;
        Ok(())
    }

    fn encode_stamps(&self, e: &mut DescriptorEncoder<'_>, workers: &[Worker]) -> Result<(), fmt::Error> {
        per_worker(e, "chime_interleaved_replies_total", workers, |s| s.counters.interleaved_replies)?;
        let mut m = family(e, "chime_interleaved_lookups_total")?;
        for (w, s) in workers {
            for (result, n) in [("hit", s.counters.interleaved_hits), ("miss", s.counters.interleaved_misses)] {
                value(m.encode_family(&[("worker", w.as_str()), ("result", result)])?, true, n)?;
            }
        }
        per_worker(e, "chime_interleaved_evictions_total", workers, |s| s.counters.interleaved_evictions)?;
        per_worker(e, "chime_interleaved_entries", workers, |s| s.interleave.occupied)?;
        per_worker(e, "chime_interleaved_memory_bytes", workers, |s| s.interleave.memory_bytes)?;
        let kinds = TxStampKind::ALL.map(TxStampKind::name);
        per_worker_labeled(e, "chime_tx_stamps_total", "kind", &kinds, workers, |s| &s.tx_stamps)?;
        per_worker(e, "chime_tx_stamps_unmatched_total", workers, |s| s.counters.tx_stamps_unmatched)?;

        let merged = ResidenceKind::ALL.map(|kind| {
            let mut h = residence::new_histogram();
            for w in &self.shared.workers {
                w.residence.merge_into(kind, &mut h);
            }
            h
        });
        let mut m = family(e, "chime_residence_seconds")?;
        for (kind, h) in ResidenceKind::ALL.iter().zip(&merged) {
            for (q, label) in QUANTILES {
                let v = if h.is_empty() { f64::NAN } else { h.value_at_quantile(q) as f64 / 1e9 };
                ConstGauge::new(v).encode(m.encode_family(&[("stamp", kind.name()), ("quantile", label)])?)?;
            }
        }
        let mut m = family(e, "chime_residence_count")?;
        for (kind, h) in ResidenceKind::ALL.iter().zip(&merged) {
            value(m.encode_family(&[("stamp", kind.name())])?, false, h.len())?;
        }

        let phc = self.shared.phc.load();
        let now_ns = crate::phc::sys_now_ns();
        let (offset, age) = match phc.as_deref() {
            Some(p) => (p.offset_at(now_ns) as f64 / 1e9, p.age_secs(now_ns)),
            None => (f64::NAN, f64::NAN),
        };
        gauge(e, "chime_phc_offset_seconds", offset)?;
        gauge(e, "chime_phc_age_seconds", age)
    }

    fn encode_nts(&self, e: &mut DescriptorEncoder<'_>, workers: &[Worker]) -> Result<(), fmt::Error> {
        per_worker(e, "chime_nts_replies_total", workers, |s| s.counters.nts_replies)?;
        per_worker(e, "chime_nts_cookies_sent_total", workers, |s| s.counters.nts_cookies)?;
        per_worker(e, "chime_nts_naks_total", workers, |s| s.counters.kod_sent(KissCode::Ntsn))?;
        let causes = [
            ("authenticator", DropReason::NtsAuthFailed),
            ("malformed", DropReason::NtsMalformed),
            ("no_nonce_source", DropReason::NtsNoNonceSource),
        ];
        let mut m = family(e, "chime_nts_auth_failures_total")?;
        for (w, s) in workers {
            for (cause, reason) in causes {
                value(m.encode_family(&[("worker", w.as_str()), ("cause", cause)])?, true, s.counters.dropped(reason))?;
            }
        }
        let ke = self.shared.nts_ke.get();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut m = family(e, "chime_nts_ke_handshakes_total")?;
        value(m.encode_family(&[("result", "ok")])?, true, ke.map_or(0, |k| k.ok()))?;
        for reason in FailReason::ALL {
            value(m.encode_family(&[("result", reason.name())])?, true, ke.map_or(0, |k| k.failures(reason)))?;
        }
        value(family(e, "chime_nts_ke_cookies_issued_total")?, true, ke.map_or(0, |k| k.cookies()))?;
        let mut m = family(e, "chime_nts_ke_responses_total")?;
        for aead in Aead::ALL {
            let name = match aead {
                Aead::SivCmac256 => "AEAD_AES_SIV_CMAC_256",
                Aead::GcmSiv128 => "AEAD_AES_128_GCM_SIV",
                _ => "other",
            };
            value(m.encode_family(&[("aead", name)])?, true, ke.map_or(0, |k| k.responses(aead)))?;
        }
        value(family(e, "chime_nts_ke_connections")?, false, ke.map_or(0, |k| load(&k.connections_open)))?;
        let ring = self.shared.nts.as_ref().map(|r| r.load_full());
        let mut m = family(e, "chime_nts_key_age_seconds")?;
        if let Some(ring) = &ring {
            let id = key_id(ring.current().id());
            let age = crate::nts::unix_now().saturating_sub(ring.rotated_at());
            ConstGauge::new(age as f64).encode(m.encode_family(&[("key_id", id.as_str())])?)?;
        }
        let m = family(e, "chime_nts_key_rotation_interval_seconds")?;
        let interval = self.shared.nts_rotation_secs.load(Ordering::Relaxed);
        if ring.is_some() && interval > 0 {
            value(m, false, interval)?;
        }
        let mut m = family(e, "chime_nts_key_info")?;
        if let Some(ring) = &ring {
            let current = ring.current().id();
            for id in ring.ids() {
                let role = if id == current { "current" } else { "retired" };
                m.encode_info(&[("key_id", key_id(id).as_str()), ("role", role)])?;
            }
        }
        Ok(())
    }

    fn encode_process(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let mut m = family(e, "chime_build_info")?;
        m.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        let mut m = family(e, "chime_seccomp_info")?;
        if let Some(mode) = self.shared.seccomp.get() {
            m.encode_info(&[("mode", mode.name())])?;
        }
        let backend = self.shared.backend.load_full();
        let mut m = family(e, "chime_backend_info")?;
        if let Some(b) = &backend {
            m.encode_info(&[
                ("backend", b.backend),
                ("interface", b.interface.as_str()),
                ("xdp_attach", b.xdp_attach.as_str()),
            ])?;
        }
        let mut m = family(e, "chime_worker_info")?;
        for w in &self.shared.workers {
            let worker = w.worker.to_string();
            let core = w.core.map(|c| c.to_string()).unwrap_or_default();
            let queue = backend.as_ref().and_then(|b| b.queues.get(w.worker).copied().flatten());
            let queue = queue.map(|q| q.to_string()).unwrap_or_default();
            let bind = backend.as_ref().and_then(|b| b.xdp_bind.get(w.worker).copied()).unwrap_or("");
            m.encode_info(&[
                ("worker", worker.as_str()),
                ("core", core.as_str()),
                ("queue", queue.as_str()),
                ("xdp_bind", bind),
            ])?;
        }
        let now = Instant::now();
        let mut m = family(e, "chime_worker_heartbeat_age_seconds")?;
        for w in &self.shared.workers {
            let age = w.heartbeat_age(now).as_secs_f64();
            ConstGauge::new(age).encode(m.encode_family(&[("worker", w.worker.to_string().as_str())])?)?;
        }
        Ok(())
    }
}

impl Collector for ChimeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let workers: Vec<Worker> = self.shared.workers.iter().map(|w| (w.worker.to_string(), w.snapshot())).collect();
        let drop_names = DropReason::ALL.map(DropReason::name);
        let kod_names = KissCode::ALL.map(KissCode::name);
        let stamp_names = StampKind::ALL.map(StampKind::name);
        let io_names = IoEvent::ALL.map(IoEvent::name);

        let e = &mut enc;
        per_worker(e, "chime_requests_received_total", &workers, |s| s.counters.received)?;
        per_worker(e, "chime_replies_sent_total", &workers, |s| s.counters.replies)?;
        per_worker_labeled(e, "chime_drops_total", "reason", &drop_names, &workers, |s| &s.counters.drops)?;
        per_worker_labeled(e, "chime_kod_sent_total", "code", &kod_names, &workers, |s| &s.counters.kod)?;
        per_worker_labeled(e, "chime_replies_by_stamp_total", "kind", &stamp_names, &workers, |s| &s.counters.stamps)?;
        per_worker_labeled(e, "chime_io_events_total", "event", &io_names, &workers, |s| &s.io)?;
        per_worker(e, "chime_ratelimit_entries", &workers, |s| s.limiter.occupied)?;
        per_worker(e, "chime_ratelimit_capacity", &workers, |s| s.limiter.capacity)?;
        per_worker(e, "chime_ratelimit_evictions_total", &workers, |s| s.limiter.evictions)?;
        per_worker(e, "chime_ratelimit_memory_bytes", &workers, |s| s.limiter.memory_bytes)?;

        let xdp_names = XdpCounter::ALL.map(XdpCounter::name);
        let mut m = family(e, "chime_xdp_program_packets_total")?;
        for (name, n) in xdp_names.iter().zip(&self.shared.xdp_program) {
            value(m.encode_family(&[("counter", *name)])?, true, n.load(Ordering::Relaxed))?;
        }
        let xq_names = XdpQueueEvent::ALL.map(XdpQueueEvent::name);
        per_worker_labeled(e, "chime_xdp_queue_events_total", "event", &xq_names, &workers, |s| &s.xdp_events)?;
        let mut m = family(e, "chime_xdp_frames")?;
        for (w, s) in &workers {
            for (state, n) in XDP_FRAME_STATES.iter().zip(&s.xdp_frames) {
                value(m.encode_family(&[("worker", w.as_str()), ("state", state)])?, false, *n)?;
            }
        }

        // The snapshot workers serve right now, and the control thread's
        // richer picture of where it came from.
        let snap = **self.shared.clock.load();
        let status = **self.clock_status.load();
        let kernel = status.kernel;
        let leap = if snap.synchronized { snap.leap.to_bits() } else { 3 };
        let age = if snap.updated_at.is_zero() { f64::NAN } else { now_ntp().diff_secs(snap.updated_at) };
        gauge(e, "chime_clock_synchronized", f64::from(u8::from(snap.synchronized)))?;
        gauge(e, "chime_clock_stratum", f64::from(snap.stratum))?;
        gauge(e, "chime_clock_leap", f64::from(leap))?;
        gauge(e, "chime_clock_root_delay_seconds", snap.root_delay)?;
        gauge(e, "chime_clock_root_dispersion_seconds", snap.root_dispersion)?;
        gauge(e, "chime_clock_kernel_maxerror_seconds", kernel.map_or(f64::NAN, |k| k.maxerror_secs()))?;
        gauge(e, "chime_clock_kernel_esterror_seconds", kernel.map_or(f64::NAN, |k| k.esterror_secs()))?;
        gauge(e, "chime_clock_tai_offset_seconds", kernel.map_or(f64::NAN, |k| f64::from(k.tai_offset)))?;
        gauge(e, "chime_clock_snapshot_age_seconds", age)?;
        gauge(e, "chime_clock_local_stratum_mode", f64::from(u8::from(status.local_fallback)))?;
        let leap_state = self.shared.leap.get();
        let unix = |t: Option<i64>| t.map_or(f64::NAN, |t| t as f64);
        gauge(e, "chime_leap_file_expiry_seconds", unix(leap_state.and_then(LeapService::file_expiry)))?;
        gauge(e, "chime_leap_next_event_seconds", unix(leap_state.and_then(LeapService::next_event)))?;

        self.encode_upstream(e, &status, &snap)?;
        self.encode_nts(e, &workers)?;
        self.encode_stamps(e, &workers)?;

        let mut m = family(e, "chime_config_reloads_total")?;
        for outcome in ReloadOutcome::ALL {
            let n = self.shared.reloads[outcome as usize].load(Ordering::Relaxed);
            value(m.encode_family(&[("result", outcome.label())])?, true, n)?;
        }
        self.encode_process(e)
    }
}

/// An NTS key id as a label value.
fn key_id(id: u32) -> String {
    format!("{id:#010x}")
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use arc_swap::ArcSwap;
    use chime_proto::acl::Acl;
    use chime_proto::packet::{LeapIndicator, RefId};
    use chime_proto::ratelimit::RateLimiterStats;
    use chime_proto::{ClockSnapshot, Counters};

    use super::*;
    use crate::control::ClockStatus;
    use crate::stats::WorkerStats;
    use crate::sys::adjtime::{ClockState, KernelClock};

    pub(crate) fn setup() -> (Arc<Shared>, SharedClockStatus) {
        let workers = (0..2).map(|i| Arc::new(WorkerStats::new(i, None))).collect();
        let now = now_ntp();
        let snap = ClockSnapshot {
            synchronized: true,
            leap: LeapIndicator::InsertSecond,
            stratum: 2,
            reference_id: RefId([192, 0, 2, 1]),
            reference_time: now,
            root_delay: 0.0,
            root_dispersion: 0.0025,
            precision: -24,
            updated_at: now,
            smear: None,
        };
        let mut shared = Shared::new(snap, Acl::default(), workers);
        let ring = chime_proto::nts::KeyRing::new(chime_proto::nts::MasterKey::new(0x1234, [1; 16]), 2, 0);
        shared.nts = Some(Arc::new(ArcSwap::from_pointee(ring)));
        *shared.nts_rotation_secs.get_mut() = 86_400;
        shared.backend.store(Some(Arc::new(crate::shared::BackendInfo {
            backend: "xdp",
            interface: "eth0".into(),
            xdp_attach: "native".into(),
            queues: vec![Some(0), Some(1)],
            xdp_bind: vec!["zero-copy", "copy"],
        })));
        shared.seccomp.set(crate::config::SeccompMode::Enforce).unwrap();
        let shared = Arc::new(shared);
        let kernel = KernelClock {
            state: ClockState::InsertLeap,
            status: 0x10,
            maxerror_us: 2500,
            esterror_us: 40,
            tai_offset: 37,
            offset_ns: 0,
            freq_ppm: 1.5,
            precision_us: 1,
            constant: 2,
            time_secs: 0,
            time_nanos: 0,
        };
        let status = ClockStatus {
            kernel: Some(kernel),
            upstream: crate::control::UpstreamHealth::unknown(),
            snapshot: snap,
            local_fallback: false,
            taken_at: now,
        };
        (shared, Arc::new(ArcSwap::from_pointee(status)))
    }

    fn get(addr: SocketAddr, request: &[u8]) -> (String, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let resp = String::from_utf8(resp).unwrap();
        let (head, body) = resp.split_once("\r\n\r\n").expect("complete response");
        (head.to_owned(), body.to_owned())
    }

    /// `name{labels}` → value, for every sample line.
    fn samples(body: &str) -> HashMap<String, f64> {
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_owned(), v.parse::<f64>().unwrap())
            })
            .collect()
    }

    #[test]
    fn names_table_is_consistent() {
        assert_eq!(METRIC_NAMES.len(), METRICS.len());
        for (i, d) in METRICS.iter().enumerate() {
            assert_eq!(METRIC_NAMES[i], d.name);
            assert!(d.name.starts_with("chime_"));
            assert_eq!(d.kind == Counter, d.name.ends_with("_total"), "{}", d.name);
            assert_eq!(d.kind == Info, d.name.ends_with("_info"), "{}", d.name);
            assert!(!d.help.is_empty() && !d.help.contains('\n'));
            assert_eq!(METRIC_NAMES.iter().filter(|n| **n == d.name).count(), 1, "duplicate {}", d.name);
        }
    }

    #[test]
    fn render_contains_every_metric_with_declared_labels() {
        let (shared, status) = setup();
        let text = render(shared, status).unwrap();
        assert!(text.ends_with("# EOF\n"));
        for d in &METRICS {
            let line = text
                .lines()
                .find(|l| l.starts_with(d.name) && matches!(l.as_bytes().get(d.name.len()), Some(b'{' | b' ')))
                .unwrap_or_else(|| panic!("{} missing in\n{text}", d.name));
            for label in d.labels {
                assert!(line.contains(&format!("{label}=\"")), "{line} lacks {label}");
            }
        }
    }

    #[test]
    fn serves_metrics_over_http() {
        let (shared, status) = setup();
        let mut c = Counters { received: 1000, replies: 900, ..Counters::default() };
        c.drops[0] = 7;
        c.drops[DropReason::ALL.len() - 1] = 3;
        c.kod[0] = 5;
        c.stamps[1] = 880;
        let l = RateLimiterStats { capacity: 4096, occupied: 12, evictions: 2, memory_bytes: 65536 };
        shared.workers[1].publish(&c, &l);
        shared.workers[1].count_io(IoEvent::SendError, 4);

        let server = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&shared), status).unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);

        let (head, body) = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(CONTENT_TYPE_METRICS), "{head}");
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");
        for name in METRIC_NAMES {
            assert!(body.contains(&format!("\n{name}")), "{name} missing");
        }
        let s = samples(&body);
        let v = |k: &str| *s.get(k).unwrap_or_else(|| panic!("no sample {k}"));
        assert_eq!(v(r#"chime_requests_received_total{worker="1"}"#), 1000.0);
        assert_eq!(v(r#"chime_requests_received_total{worker="0"}"#), 0.0);
        assert_eq!(v(r#"chime_replies_sent_total{worker="1"}"#), 900.0);
        let first = DropReason::ALL[0].name();
        let last = DropReason::ALL[DropReason::ALL.len() - 1].name();
        assert_eq!(v(&format!(r#"chime_drops_total{{worker="1",reason="{first}"}}"#)), 7.0);
        assert_eq!(v(&format!(r#"chime_drops_total{{worker="1",reason="{last}"}}"#)), 3.0);
        for w in 0..2 {
            for r in DropReason::ALL {
                assert!(s.contains_key(&format!(r#"chime_drops_total{{worker="{w}",reason="{}"}}"#, r.name())));
            }
        }
        let kod = KissCode::ALL[0].name();
        assert_eq!(v(&format!(r#"chime_kod_sent_total{{worker="1",code="{kod}"}}"#)), 5.0);
        let stamp = StampKind::ALL[1].name();
        assert_eq!(v(&format!(r#"chime_replies_by_stamp_total{{worker="1",kind="{stamp}"}}"#)), 880.0);
        assert_eq!(v(r#"chime_io_events_total{worker="1",event="send_error"}"#), 4.0);
        assert_eq!(v(r#"chime_ratelimit_entries{worker="1"}"#), 12.0);
        assert_eq!(v(r#"chime_ratelimit_capacity{worker="1"}"#), 4096.0);
        assert_eq!(v(r#"chime_ratelimit_evictions_total{worker="1"}"#), 2.0);
        assert_eq!(v(r#"chime_ratelimit_memory_bytes{worker="1"}"#), 65536.0);
        assert_eq!(v("chime_clock_synchronized"), 1.0);
        assert_eq!(v("chime_clock_stratum"), 2.0);
        assert_eq!(v("chime_clock_leap"), 1.0);
        assert_eq!(v("chime_clock_root_dispersion_seconds"), 0.0025);
        assert_eq!(v("chime_clock_kernel_maxerror_seconds"), 0.0025);
        assert_eq!(v("chime_clock_tai_offset_seconds"), 37.0);
        assert_eq!(v("chime_clock_local_stratum_mode"), 0.0);
        let age = v("chime_clock_snapshot_age_seconds");
        assert!((0.0..60.0).contains(&age), "{age}");
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(v(&format!(r#"chime_build_info{{version="{version}"}}"#)), 1.0);
        assert_eq!(v(r#"chime_backend_info{backend="xdp",interface="eth0",xdp_attach="native"}"#), 1.0);
        assert_eq!(v(r#"chime_seccomp_info{mode="enforce"}"#), 1.0);
        assert_eq!(v(r#"chime_worker_info{worker="1",core="",queue="1",xdp_bind="copy"}"#), 1.0);
        assert_eq!(v(r#"chime_nts_key_info{key_id="0x00001234",role="current"}"#), 1.0);
        assert_eq!(v("chime_nts_key_rotation_interval_seconds"), 86_400.0);
        assert!(v(r#"chime_nts_key_age_seconds{key_id="0x00001234"}"#) > 0.0);
        assert!(v(r#"chime_worker_heartbeat_age_seconds{worker="0"}"#) >= 0.0);

        // Counters move between scrapes.
        c.received = 1001;
        shared.workers[1].publish(&c, &l);
        let (_, body) = get(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert_eq!(samples(&body)[r#"chime_requests_received_total{worker="1"}"#], 1001.0);

        let (head, body) = get(addr, b"GET / HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(body.contains("/metrics") && body.contains("/ratelimit"));
        let (head, body) = get(addr, b"GET /ratelimit HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK") && head.contains("text/plain"), "{head}");
        assert!(body.starts_with("# rate-limited requests") && body.lines().count() == 1, "{body}");
        let (head, body) = get(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(body.is_empty());
        let (head, _) = get(addr, b"GET /nope HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
        let (head, _) = get(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 405 ") && head.contains("Allow: GET, HEAD"), "{head}");
        for garbage in [&b"\x00\x01\xff garbage\r\n\r\n"[..], b"GET\r\n\r\n", b"GET metrics HTTP/1.1\r\n\r\n"] {
            let (head, _) = get(addr, garbage);
            assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        }
        let (head, _) = get(addr, b"SSH-2.0-OpenSSH_9.2p1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_REQUEST + 100, b'a');
        let (head, _) = get(addr, &big);
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");

        shared.shutdown.store(true, Ordering::Relaxed);
        let start = Instant::now();
        server.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    }

    #[test]
    fn slow_client_times_out() {
        let (shared, status) = setup();
        let server = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&shared), status).unwrap();
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        let start = Instant::now();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 408 "), "{resp}");
        assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
        shared.shutdown.store(true, Ordering::Relaxed);
        server.join().unwrap();
    }

    #[test]
    fn bind_error_names_the_address() {
        let (shared, status) = setup();
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve(addr, shared, status).unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
