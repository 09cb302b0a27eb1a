//! Observability against the real chimed: `chimed status` names the source
//! prefix a burst was rate-limited from; every metric the Grafana dashboard
//! (`ops/grafana/chime.json`) and the Prometheus rules
//! (`ops/prometheus/*.yml`) use is in the endpoint's output, with the label
//! values they select; and the rules pass `promtool check rules` and
//! `promtool test rules` where promtool is installed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The test this binary re-runs inside a namespace (load client, scrape);
/// a no-op in a normal run.
const CHILD: &str = "child";

#[test]
fn child() {
    child_main();
}

fn status(metrics: SocketAddr) -> (i32, String) {
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_chimed")).args(["status", "--metrics", &metrics.to_string()]),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn status_lists_the_rate_limited_prefix_of_a_burst() {
    // Default rate limit: a burst of 16, then one request per 2 s.
    let chimed = Chimed::start(&["--local-stratum", "10"]);
    let metrics = chimed.metrics.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let mut buf = [0u8; 128];
    for i in 0..200 {
        sock.send_to(&client_request(now_bits() + i), chimed.ntp).unwrap();
        // Keep the socket's receive queue short; replies do not matter.
        while sock.recv_from(&mut buf).is_ok() {}
    }
    // Workers publish about once a second: wait (bounded) until it shows.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = http_get(metrics, "/ratelimit");
        if text.contains("\n127.0.0.0/24 ") {
            break;
        }
        assert!(Instant::now() < deadline, "/ratelimit never listed 127.0.0.0/24:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, text) = status(metrics);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("rate-limited prefixes (last "), "{text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("127.0.0.0/24 ")), "{text}");
    assert!(text.contains("backend:    socket, 2 workers"), "{text}");
    assert!(text.contains("rate_limited "), "{text}");
    assert!(text.contains("serving:    yes"), "{text}");
}

// ------------------------------------------------ dashboard and rules against the endpoint

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// What a scrape exports: the sample names each `# TYPE` line allows, and
/// every sample's labels.
struct Exported {
    /// Sample name → the family's OpenMetrics type.
    names: BTreeMap<String, String>,
    /// Sample name → label name → values seen.
    labels: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

impl Exported {
    fn parse(text: &str) -> Self {
        let mut names = BTreeMap::new();
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (family, ty) = line.split_once(' ').unwrap();
            // The sample names each OpenMetrics type has.
            let suffixes: &[&str] = match ty {
                "counter" => &["_total", "_created"],
                "info" => &["_info"],
                "histogram" | "gaugehistogram" => &["_bucket", "_count", "_sum", "_gcount", "_gsum", "_created"],
                "summary" => &["", "_count", "_sum", "_created"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{family}{s}"), ty.to_owned());
            }
        }
        let mut labels: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
        for sample in chime_server::status::parse(text) {
            let entry = labels.entry(sample.name).or_default();
            for (k, v) in sample.labels {
                entry.entry(k).or_default().insert(v);
            }
        }
        Self { names, labels }
    }
}

/// A metric selector in a PromQL expression: the name and its label
/// matchers `(label, op, value)`.
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

/// The `chime_*` selectors of a PromQL expression (string literals are
/// skipped, so label values never count as names).
fn selectors(expr: &str) -> Vec<Selector> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            c if ident(c) && !c.is_ascii_digit() => {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                let name = &expr[start..i];
                if !name.starts_with("chime_") {
                    continue;
                }
                let mut j = i;
                while j < b.len() && b[j] == b' ' {
                    j += 1;
                }
                let mut matchers = Vec::new();
                if j < b.len() && b[j] == b'{' {
                    let end = expr[j..].find('}').map(|e| j + e).expect("unclosed selector");
                    for m in expr[j + 1..end].split(',').map(str::trim).filter(|m| !m.is_empty()) {
                        let op_at = m.find(['=', '!']).unwrap_or_else(|| panic!("bad matcher {m:?} in {expr}"));
                        let (label, rest) = m.split_at(op_at);
                        let op_len = if rest.starts_with("=~") || rest.starts_with("!~") || rest.starts_with("!=") {
                            2
                        } else {
                            1
                        };
                        let value = rest[op_len..].trim().trim_matches('"');
                        matchers.push((label.trim().to_owned(), rest[..op_len].to_owned(), value.to_owned()));
                    }
                    i = end + 1;
                }
                out.push(Selector { name: name.to_owned(), matchers });
            }
            _ => i += 1,
        }
    }
    out
}

/// The `expr` values of a Prometheus rules file (single-line or `|` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else { continue };
        let rest = rest.trim();
        if rest == "|" || rest == ">" {
            let indent = line.len() - line.trim_start().len();
            let body: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(body.join(" "));
        } else {
            out.push(rest.trim_matches('\'').to_owned());
        }
    }
    out
}

/// Every `expr` in a Grafana dashboard, and the template variables' queries.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// Checks every selector of `exprs` against `exported`; returns the
/// problems, one line each.
fn check_exprs(what: &str, exprs: &[String], exported: &Exported) -> Vec<String> {
    let mut problems = Vec::new();
    for expr in exprs {
        for sel in selectors(expr) {
            if !exported.names.contains_key(&sel.name) {
                problems.push(format!("{what}: {} is not exported (in `{expr}`)", sel.name));
                continue;
            }
            let Some(labels) = exported.labels.get(&sel.name) else {
                problems.push(format!("{what}: {} has no samples (in `{expr}`)", sel.name));
                continue;
            };
            for (label, op, value) in &sel.matchers {
                // Grafana variables and the scrape's own labels are the
                // deployment's business.
                if matches!(label.as_str(), "job" | "instance") || value.contains('$') {
                    continue;
                }
                let Some(seen) = labels.get(label) else {
                    problems.push(format!("{what}: {} has no label {label} (in `{expr}`)", sel.name));
                    continue;
                };
                let wanted: Vec<&str> = if op.contains('~') { value.split('|').collect() } else { vec![value] };
                for w in wanted {
                    assert!(
                        w.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.'),
                        "{what}: matcher {label}{op}\"{value}\" is not a list of literal values; extend this test"
                    );
                    if !seen.contains(w) {
                        problems.push(format!("{what}: {}{{{label}=\"{w}\"}} never appears (in `{expr}`)", sel.name));
                    }
                }
            }
        }
    }
    problems
}

/// chimed on loopback with NTS (so the NTS key metrics have samples), its
/// key file in a scratch directory.
fn chimed_with_nts(pki: &Pki) -> (Chimed, PathBuf) {
    let dir = scratch_dir("observe-nts");
    let cfg = dir.join("chimed.toml");
    std::fs::write(&cfg, format!("[nts]\nkey_file = \"{}\"\n", dir.join("nts-keys").display())).unwrap();
    let ke = format!("127.0.0.1:{}", free_tcp_port());
    let (cert, key) = (pki.cert(), pki.key());
    let args = [
        "-c",
        cfg.to_str().unwrap(),
        "--local-stratum",
        "10",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--nts-ke-listen",
        &ke,
    ];
    (Chimed::start(&args), dir)
}

#[test]
fn dashboard_and_rules_use_only_exported_metrics() {
    let pki = Pki::new();
    let (chimed, dir) = chimed_with_nts(&pki);
    let exported = Exported::parse(&chimed.scrape());
    drop(chimed);
    let _ = std::fs::remove_dir_all(&dir);
    // XDP families are exported by the socket backend too (as zeros).
    for name in ["chime_xdp_program_packets_total", "chime_xdp_queue_events_total", "chime_xdp_frames"] {
        assert!(exported.labels.contains_key(name), "{name} missing with the socket backend");
    }

    let dashboard: serde_json::Value = serde_json::from_str(&read("ops/grafana/chime.json")).expect("dashboard JSON");
    let mut dash = Vec::new();
    dashboard_exprs(&dashboard, &mut dash);
    let rules = rule_exprs(&read("ops/prometheus/chime-alerts.yml"));
    assert!(dash.len() > 40 && rules.len() > 15, "{} dashboard and {} rule expressions", dash.len(), rules.len());

    let mut problems = check_exprs("ops/grafana/chime.json", &dash, &exported);
    problems.extend(check_exprs("ops/prometheus/chime-alerts.yml", &rules, &exported));
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The things issue 7 asks the dashboard and the rules to show.
    let used = |exprs: &[String], name: &str| exprs.iter().any(|e| selectors(e).iter().any(|s| s.name == name));
    for name in [
        "chime_requests_received_total",
        "chime_replies_sent_total",
        "chime_drops_total",
        "chime_kod_sent_total",
        "chime_ratelimit_entries",
        "chime_nts_replies_total",
        "chime_nts_auth_failures_total",
        "chime_nts_naks_total",
        "chime_nts_cookies_sent_total",
        "chime_nts_ke_handshakes_total",
        "chime_upstream_up",
        "chime_upstream_offset_seconds",
        "chime_clock_root_dispersion_seconds",
        "chime_upstream_holdover",
        "chime_residence_seconds",
        "chime_xdp_queue_events_total",
        "chime_xdp_frames",
        "chime_nts_key_age_seconds",
        "chime_backend_info",
    ] {
        assert!(used(&dash, name), "the dashboard does not show {name}");
    }
    for name in [
        "chime_clock_synchronized",
        "chime_upstream_up",
        "chime_drops_total",
        "chime_nts_naks_total",
        "chime_nts_auth_failures_total",
        "chime_xdp_queue_events_total",
        "chime_nts_key_age_seconds",
        "chime_nts_key_rotation_interval_seconds",
        "chime_worker_heartbeat_age_seconds",
    ] {
        assert!(used(&rules, name), "no alert rule uses {name}");
    }
}

#[test]
fn expression_parsing() {
    let s = selectors(r#"sum by (reason) (rate(chime_drops_total{job=~"$job",reason="rate_limited"}[5m])) / chime_x"#);
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].name, "chime_drops_total");
    assert_eq!(s[0].matchers[1], ("reason".into(), "=".into(), "rate_limited".into()));
    assert_eq!(s[1].name, "chime_x");
    assert!(selectors(r#"up{job="chime_total"}"#).is_empty(), "label values are not names");
    let yaml = "  - alert: A\n    expr: chime_a > 1\n  - alert: B\n    expr: |\n      chime_b\n      and\n      chime_c\n    for: 1m\n";
    assert_eq!(rule_exprs(yaml), ["chime_a > 1", "chime_b and chime_c"]);
    let e = Exported::parse("# TYPE chime_x counter\nchime_x_total{a=\"1\"} 3\n# TYPE chime_y_seconds histogram\n");
    assert!(e.names.contains_key("chime_x_total") && !e.names.contains_key("chime_x"));
    assert!(e.names.contains_key("chime_y_seconds_bucket") && e.names.contains_key("chime_y_seconds_count"));
}

/// The same with the XDP backend on the two-queue test bed (root only):
/// `chimed status` shows the XDP backend, its queues and the client's
/// rate-limited prefix; the dashboard's and rules' metrics are all there.
#[test]
fn xdp_backend_status_and_metrics_on_the_test_bed() {
    let Some(pair) = VethPair::with_queues("obsx", 2) else { return };
    let pki = Pki::new();
    let dir = scratch_dir("observe-xdp");
    let cfg = dir.join("chimed.toml");
    // Default rate limiting: the one client address gets limited.
    std::fs::write(&cfg, format!("[nts]\nkey_file = \"{}\"\n", dir.join("nts-keys").display())).unwrap();
    let (cert, key) = (pki.cert(), pki.key());
    let chimed = pair.start_chimed(Backend::Xdp, &cfg, &["--tls-cert", &cert, "--tls-key", &key], CHILD);
    let mut burst = LoadParams::new(VethPair::server_ntp(), 2000);
    burst.max_time = Duration::from_secs(20);
    let load = run_load(&pair.client, CHILD, &burst);
    assert!(load.received >= 16 && load.kod > 0, "{load:?}");

    let metrics = VethPair::server_metrics().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (code, text) = loop {
        let out = run_bounded(
            pair.client.cmd(env!("CARGO_BIN_EXE_chimed")).args(["status", "--metrics", &metrics]),
            Duration::from_secs(30),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        if text.contains("198.18.0.0/24") || Instant::now() > deadline {
            break (out.status.code().unwrap_or(-1), text);
        }
    };
    eprintln!("{text}");
    assert_eq!(code, 0, "{text}\nchimed:\n{}", chimed.stderr());
    assert!(text.contains(&format!("backend:    xdp on {} (", pair.server_dev)), "{text}");
    assert!(text.contains(", 2 workers"), "{text}");
    assert!(text.contains(", queue 0 (") && text.contains(", queue 1 ("), "{text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("198.18.0.0/24 ")), "{text}");
    assert!(text.contains("nts keys:   current 0x"), "{text}");
    assert!(text.contains("serving:    yes"), "{text}");

    let exported = Exported::parse(&scrape_from(&pair.client, CHILD, VethPair::server_metrics()));
    let dashboard: serde_json::Value = serde_json::from_str(&read("ops/grafana/chime.json")).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    exprs.extend(rule_exprs(&read("ops/prometheus/chime-alerts.yml")));
    let problems = check_exprs("XDP backend", &exprs, &exported);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    drop(chimed);
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------ promtool

/// promtool from `$PROMTOOL` or PATH (`scripts/promtool.sh` fetches one);
/// `None` with a printed reason, unless `CHIME_REQUIRE_PROMTOOL` is set (CI).
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PROMTOOL").map(PathBuf::from).filter(|p| p.exists()).or_else(|| which("promtool"));
    if found.is_none() {
        let why = "promtool not found (set PROMTOOL, or run scripts/promtool.sh, which extracts it from Debian's \
                   prometheus package)";
        assert!(std::env::var_os("CHIME_REQUIRE_PROMTOOL").is_none(), "{why}");
        eprintln!("skipping: {why}");
    }
    found
}

fn run_promtool(promtool: &Path, args: &[&str]) -> String {
    let out = run_bounded(
        Command::new(promtool).args(args).current_dir(repo().join("ops/prometheus")),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn rules_pass_promtool_and_every_alert_is_tested() {
    let Some(promtool) = promtool() else { return };
    run_promtool(&promtool, &["check", "rules", "chime-alerts.yml"]);
    let text = run_promtool(&promtool, &["test", "rules", "chime-alerts.test.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
    run_promtool(&promtool, &["check", "config", "prometheus.yml"]);

    // Every alert has a test in which it fires.
    let rules = read("ops/prometheus/chime-alerts.yml");
    let tests = read("ops/prometheus/chime-alerts.test.yml");
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert:")).map(str::trim).collect();
    assert!(alerts.len() > 15);
    for alert in alerts {
        let fires = tests.split("alertname:").skip(1).any(|chunk| {
            let chunk = chunk.split("- eval_time").next().unwrap_or("");
            chunk.trim_start().starts_with(alert)
                && chunk.trim_start()[alert.len()..].starts_with(|c: char| !c.is_alphanumeric())
                && chunk.contains("exp_labels")
        });
        assert!(fires, "no test in chime-alerts.test.yml makes {alert} fire");
    }

    // The dashboard's queries parse: as recording rules, with Grafana's
    // variables filled in.
    let dashboard: serde_json::Value = serde_json::from_str(&read("ops/grafana/chime.json")).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let dir = scratch_dir("dashboard-rules");
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().filter(|e| !e.starts_with("label_values(")).enumerate() {
        let e = ["$__rate_interval", "$__interval", "$__range"].iter().fold(e.clone(), |e, v| e.replace(v, "1m"));
        let e = e.replace("$job", ".*").replace("$instance", ".*");
        yaml.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let file = dir.join("dashboard-rules.yml");
    std::fs::write(&file, yaml).unwrap();
    run_promtool(&promtool, &["check", "rules", file.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
}
