#!/usr/bin/env python3
"""Turns a soak run's directory (bench/soak/run.sh) into minutes.csv,
report.md and soak.svg: per minute the clients' sent/answered/loss and RTT
percentiles, over time chimed's RSS and its request/reply/drop counters."""
import csv
import glob
import json
import os
import sys


def load(out):
    minutes = []
    for path in sorted(glob.glob(os.path.join(out, "minute-*.json"))):
        step = json.load(open(path))["steps"][0]
        rtt = step.get("rtt") or {}
        minutes.append({
            "minute": int(os.path.basename(path)[7:-5]),
            "sent": step["sent"],
            "answered": step["valid"],
            "loss_pct": 100.0 * step["loss"],
            "timeouts": step["timeouts"],
            "late": step.get("late", 0),
            "p50_us": rtt.get("p50_us", 0.0),
            "p90_us": rtt.get("p90_us", 0.0),
            "p99_us": rtt.get("p99_us", 0.0),
            "p999_us": rtt.get("p999_us", 0.0),
            "max_us": rtt.get("max_us", 0.0),
        })
    with open(os.path.join(out, "samples.csv")) as f:
        samples = [r for r in csv.DictReader(f) if r["rss_kib"] and r["requests"]]
    for r in samples:
        for k in r:
            r[k] = float(r[k]) if k == "loadavg1" else int(float(r[k]))
    return minutes, samples


def polyline(points, x0, y0, w, h, xmax, ymax, color):
    if not points or xmax <= 0 or ymax <= 0:
        return ""
    pts = " ".join(f"{x0 + w * x / xmax:.1f},{y0 + h - h * min(y, ymax) / ymax:.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>'


def panel(y0, title, series, xmax, unit):
    ymax = max((y for _, pts, _ in series for _, y in pts), default=1) * 1.15 or 1
    out = [f'<text x="60" y="{y0 - 8}" font-size="13">{title}</text>',
           f'<rect x="60" y="{y0}" width="700" height="160" fill="none" stroke="#999"/>',
           f'<text x="55" y="{y0 + 10}" font-size="10" text-anchor="end">{ymax:.3g}{unit}</text>',
           f'<text x="55" y="{y0 + 160}" font-size="10" text-anchor="end">0</text>']
    for i, (name, pts, color) in enumerate(series):
        out.append(polyline(pts, 60, y0, 700, 160, xmax, ymax, color))
        out.append(f'<text x="{770}" y="{y0 + 14 + 14 * i}" font-size="11" fill="{color}">{name}</text>')
    return "\n".join(out)


def main(out):
    minutes, samples = load(out)
    if not minutes or not samples:
        sys.exit(f"{out}: no minutes or samples")
    rate = open(os.path.join(out, "rate.txt")).read().strip()
    with open(os.path.join(out, "minutes.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(minutes[0]))
        w.writeheader()
        w.writerows(minutes)

    t0 = samples[0]["unix_s"]
    span_min = (samples[-1]["unix_s"] - t0) / 60
    rss = [((r["unix_s"] - t0) / 60, r["rss_kib"] / 1024) for r in samples]
    xmax = max(len(minutes), span_min)
    svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="880" height="640" font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="60" y="22" font-size="15">chime soak: {len(minutes)} min at {rate}/s (x axis: minutes)</text>',
           panel(50, "chimed RSS", [("RSS MiB", rss, "#1f77b4")], xmax, " MiB"),
           panel(250, "loss per minute", [("loss %", [(m["minute"], m["loss_pct"]) for m in minutes], "#d62728")],
                 xmax, " %"),
           panel(450, "client round-trip time per minute",
                 [("p50 µs", [(m["minute"], m["p50_us"]) for m in minutes], "#2ca02c"),
                  ("p99 µs", [(m["minute"], m["p99_us"]) for m in minutes], "#ff7f0e"),
                  ("p99.9 µs", [(m["minute"], m["p999_us"]) for m in minutes], "#9467bd")], xmax, " µs"),
           '</svg>']
    open(os.path.join(out, "soak.svg"), "w").write("\n".join(svg))

    sent = sum(m["sent"] for m in minutes)
    answered = sum(m["answered"] for m in minutes)
    first, last = samples[0], samples[-1]
    rss_kib = [r["rss_kib"] for r in samples]
    settled = [r["rss_kib"] for r in samples if (r["unix_s"] - t0) >= 300]
    lines = [
        f"# Soak run: {len(minutes)} minutes at {rate} requests/s",
        "",
        f"- clients (chime-load): sent {sent:,}, answered {answered:,}, "
        f"loss {100.0 * (sent - answered) / max(sent, 1):.3f} %",
        f"- chimed counters over the run: requests {last['requests'] - first['requests']:,}, "
        f"replies {last['replies'] - first['replies']:,}, drops {last['drops'] - first['drops']:,}, "
        f"KoD {last['kod'] - first['kod']:,}",
        f"- chimed RSS: first sample {rss_kib[0] / 1024:.1f} MiB, min {min(rss_kib) / 1024:.1f}, "
        f"max {max(rss_kib) / 1024:.1f}, last {rss_kib[-1] / 1024:.1f} MiB"
        + (f"; after minute 5: {min(settled) / 1024:.1f}..{max(settled) / 1024:.1f} MiB" if settled else ""),
        f"- machine load average (1 min) over the run: mean "
        f"{sum(r.get('loadavg1', 0.0) for r in samples) / len(samples):.2f}, "
        f"max {max(r.get('loadavg1', 0.0) for r in samples):.2f} (2 cores)",
        f"- samples: {len(samples)} (every 10 s), minutes: {len(minutes)}",
        "",
        "| minutes | sent | answered | loss % | p50 µs | p99 µs | p99.9 µs | max µs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i in range(0, len(minutes), 10):
        chunk = minutes[i:i + 10]
        s = sum(m["sent"] for m in chunk)
        a = sum(m["answered"] for m in chunk)
        lines.append(
            f"| {chunk[0]['minute']}-{chunk[-1]['minute']} | {s:,} | {a:,} | {100.0 * (s - a) / max(s, 1):.3f} "
            f"| {max(m['p50_us'] for m in chunk):.0f} | {max(m['p99_us'] for m in chunk):.0f} "
            f"| {max(m['p999_us'] for m in chunk):.0f} | {max(m['max_us'] for m in chunk):.0f} |")
    lines += ["", "Percentiles per 10 minutes are the worst minute's. Per minute: minutes.csv; "
              "RSS and counters every 10 s: samples.csv; plot: soak.svg."]
    open(os.path.join(out, "report.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
