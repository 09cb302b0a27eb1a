//! A hand-written SVG of a run: offered vs answered rate, loss, and p99
//! round-trip time across the steps of a ramp (or the one step of a fixed
//! rate run). Three stacked panels sharing the x axis (step, labelled with
//! the offered rate).

use std::fmt::Write;

use crate::stats::StepReport;

const W: f64 = 760.0;
const PANEL: f64 = 170.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 40.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    values: Vec<f64>,
}

fn panel(out: &mut String, top: f64, title: &str, unit: &str, series: &[Series<'_>], labels: &[String]) {
    let plot_w = W - LEFT - RIGHT;
    let n = labels.len().max(1);
    let max = series.iter().flat_map(|s| s.values.iter().copied()).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let max = if max <= 0.0 { 1.0 } else { max * 1.1 };
    let x = |i: usize| LEFT + if n == 1 { plot_w / 2.0 } else { plot_w * i as f64 / (n - 1) as f64 };
    let y = |v: f64| top + PANEL - PANEL * (v / max).clamp(0.0, 1.0);
    let _ =
        writeln!(out, r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL}" fill="none" stroke="#999"/>"##);
    let _ = writeln!(out, r#"<text x="{LEFT}" y="{}" font-size="13">{}</text>"#, top - 6.0, esc(title));
    for k in 0..=4 {
        let v = max * f64::from(k) / 4.0;
        let yy = y(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{} {}</text>"##,
            W - RIGHT,
            LEFT - 4.0,
            yy + 3.0,
            esc(&fmt_rate(v)),
            esc(unit)
        );
    }
    for (si, s) in series.iter().enumerate() {
        let pts: Vec<String> =
            s.values.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", x(i), y(v.max(0.0)))).collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            s.color,
            pts.join(" ")
        );
        for (i, v) in s.values.iter().enumerate() {
            let _ = writeln!(out, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#, x(i), y(v.max(0.0)), s.color);
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" fill="{}">{}</text>"#,
            W - RIGHT - 150.0,
            top + 14.0 + 14.0 * si as f64,
            s.color,
            esc(s.name)
        );
    }
}

/// The SVG document for `steps`.
pub fn svg(title: &str, steps: &[StepReport], threshold: f64) -> String {
    let height = TOP + 3.0 * (PANEL + GAP) + 30.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{LEFT}" y="20" font-size="15" font-weight="bold">{}</text>"#, esc(title));
    let labels: Vec<String> = steps.iter().map(|s| fmt_rate(s.offered_rate)).collect();
    let rates = [
        Series { name: "offered", color: "#888888", values: steps.iter().map(|s| s.offered_rate).collect() },
        Series { name: "sent", color: "#1f77b4", values: steps.iter().map(|s| s.sent_rate).collect() },
        Series { name: "answered", color: "#2ca02c", values: steps.iter().map(|s| s.answered_rate).collect() },
    ];
    panel(&mut out, TOP + 10.0, "requests per second", "/s", &rates, &labels);
    let loss_top = TOP + 10.0 + PANEL + GAP;
    let loss = [
        Series { name: "loss %", color: "#d62728", values: steps.iter().map(|s| s.loss * 100.0).collect() },
        Series { name: "threshold %", color: "#ff9896", values: vec![threshold * 100.0; steps.len()] },
    ];
    panel(&mut out, loss_top, "loss (%)", "%", &loss, &labels);
    let rtt_top = loss_top + PANEL + GAP;
    let rtt = [Series { name: "p99 RTT", color: "#9467bd", values: steps.iter().map(|s| s.rtt.p99_us).collect() }];
    panel(&mut out, rtt_top, "p99 round-trip time (µs)", "µs", &rtt, &labels);
    // x labels under the last panel
    let n = labels.len().max(1);
    let plot_w = W - LEFT - RIGHT;
    for (i, l) in labels.iter().enumerate() {
        let x = LEFT + if n == 1 { plot_w / 2.0 } else { plot_w * i as f64 / (n - 1) as f64 };
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
            rtt_top + PANEL + 14.0,
            esc(l)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">offered rate (requests/s)</text>"#,
        LEFT + plot_w / 2.0,
        rtt_top + PANEL + 28.0
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny well-formedness check: every tag closes, in order.
    pub(crate) fn well_formed(doc: &str) -> Result<(), String> {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = doc;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').ok_or("unclosed <")? + start;
            let tag = &rest[start + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("stray </{name}>"))?;
                if open != name.trim() {
                    return Err(format!("<{open}> closed by </{name}>"));
                }
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().ok_or("empty tag")?;
                stack.push(name.to_owned());
            }
            if !tag.matches('"').count().is_multiple_of(2) {
                return Err(format!("unbalanced quotes in <{tag}>"));
            }
        }
        if stack.is_empty() { Ok(()) } else { Err(format!("unclosed {stack:?}")) }
    }

    #[test]
    fn svg_is_well_formed() {
        let steps: Vec<StepReport> = (0..5)
            .map(|i| StepReport {
                offered_rate: 1000.0 * 1.25f64.powi(i),
                sent_rate: 1000.0 * 1.25f64.powi(i),
                answered_rate: 990.0 * 1.2f64.powi(i),
                loss: 0.002 * f64::from(i),
                ..StepReport::default()
            })
            .collect();
        let doc = svg("chime-load <test> & co", &steps, 0.01);
        well_formed(&doc).unwrap();
        assert!(doc.contains("&lt;test&gt; &amp; co"));
        assert_eq!(doc.matches("<polyline").count(), 6);
        well_formed(&svg("one", &steps[..1], 0.01)).unwrap();
        well_formed(&svg("none", &[], 0.01)).unwrap();
        assert!(well_formed("<a><b></a>").is_err());
    }
}
