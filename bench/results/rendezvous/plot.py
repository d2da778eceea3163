#!/usr/bin/env python3
"""Draws rendezvous-growth.svg from the report.json of `causeway-bench
rendezvous --json` (and, optionally, the report of the same command run
with the rendezvous before the fixes, drawn dashed).

Three panels against the number of sites: register -> peer_update latency
during churn (p99, and p50 dashed; log scale; the 100 ms goal), rendezvous RSS
per registered site (the 20 KiB goal) and rendezvous CPU (idle, churn).
One run per size, so there are no min-max bars. Plain SVG, no
dependencies:

    python3 bench/results/rendezvous/plot.py bench/results/rendezvous/report.json \
        bench/results/rendezvous/rendezvous-growth.svg \
        [bench/results/rendezvous/report-before.json \
         [bench/results/rendezvous/busy/before-0540.json bench/results/rendezvous/busy/after-0543.json]]

The last two are runs of the same command while other work loaded the
machine (drawn light: before the fix dashed, fixed solid).
"""

import json
import math
import sys

W, H = 300, 260  # one panel
PAD_L, PAD_R, PAD_T, PAD_B = 52, 12, 34, 40


def panel(x0, title, ns, series, y_max, y_label, goal=None, log=False):
    """series: (label, colour, dashed, [(n, median, lo, hi)]); log: a
    logarithmic axis from 0.1 to y_max."""
    out = []
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    n_max = max(ns) * 1.05
    sx = lambda n: x0 + PAD_L + pw * n / n_max
    if log:
        log_lo, log_hi = math.log10(0.1), math.log10(y_max)
        sy = lambda v: PAD_T + ph * (1 - (math.log10(max(v, 0.1)) - log_lo) / (log_hi - log_lo))
    else:
        sy = lambda v: PAD_T + ph * (1 - v / y_max)
    out.append(f'<text x="{x0 + W / 2}" y="16" text-anchor="middle" font-weight="bold">{title}</text>')
    out.append(f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(n_max)}" y2="{sy(0)}" stroke="#000"/>')
    out.append(f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(0)}" y2="{sy(y_max)}" stroke="#000"/>')
    ticks = [10 ** k for k in range(-1, 6) if 10 ** k <= y_max] if log else [y_max * i / 5 for i in range(6)]
    for v in ticks:
        label = f"{v:g}" if log else (f"{v:.0f}" if y_max >= 10 else f"{v:.1f}")
        out.append(f'<line x1="{sx(0) - 3}" y1="{sy(v)}" x2="{sx(n_max)}" y2="{sy(v)}" stroke="#ddd"/>')
        out.append(f'<text x="{sx(0) - 5}" y="{sy(v) + 4}" text-anchor="end">{label}</text>')
    for n in ns:
        out.append(f'<text x="{sx(n)}" y="{sy(0) + 14}" text-anchor="middle">{n}</text>')
    out.append(f'<text x="{x0 + PAD_L + pw / 2}" y="{H - 6}" text-anchor="middle">sites</text>')
    out.append(
        f'<text x="{x0 + 12}" y="{PAD_T + ph / 2}" text-anchor="middle" '
        f'transform="rotate(-90 {x0 + 12} {PAD_T + ph / 2})">{y_label}</text>'
    )
    if goal is not None:
        value, text = goal
        out.append(
            f'<line x1="{sx(0)}" y1="{sy(value)}" x2="{sx(n_max)}" y2="{sy(value)}" '
            f'stroke="#c00" stroke-dasharray="2,3"/>'
        )
        out.append(f'<text x="{sx(n_max) - 2}" y="{sy(value) - 4}" text-anchor="end" fill="#c00">{text}</text>')
    legend_y = PAD_T + 4
    for label, colour, dashed, points in series:
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        path = " ".join(f"{sx(n):.1f},{sy(m):.1f}" for n, m, _, _ in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for n, m, lo, hi in points:
            if hi > lo:
                out.append(f'<line x1="{sx(n)}" y1="{sy(lo)}" x2="{sx(n)}" y2="{sy(hi)}" stroke="{colour}"/>')
            out.append(f'<circle cx="{sx(n)}" cy="{sy(m)}" r="3" fill="{colour}"/>')
        out.append(f'<line x1="{sx(0) + 8}" y1="{legend_y}" x2="{sx(0) + 24}" y2="{legend_y}" stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{sx(0) + 28}" y="{legend_y + 4}">{label}</text>')
        legend_y += 14
    return out


def main():
    after = json.load(open(sys.argv[1]))
    before = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else None
    busy = [json.load(open(f)) for f in sys.argv[4:6]]
    ns = [s["sites"] for s in after["sizes"]]

    def series(report, f):
        return [(s["sites"], f(s), f(s), f(s)) for s in report["sizes"]]

    p99 = lambda s: s["generator"]["churn_latency"]["p99_ms"]
    p50 = lambda s: s["generator"]["churn_latency"]["p50_ms"]
    lat = [("p99, fixed", "#1f77b4", False, series(after, p99)),
           ("p50, fixed", "#aec7e8", True, series(after, p50))]
    if before:
        lat.append(("p99, before the fix", "#d62728", True, series(before, p99)))
    if len(busy) == 2:
        lat.append(("p99, busy machine, before", "#ff9896", True, series(busy[0], p99)))
        lat.append(("p99, busy machine, fixed", "#17becf", False, series(busy[1], p99)))
    rss = [("fixed", "#2ca02c", False, series(after, lambda s: s["rss_per_site_kib"]))]
    if before:
        rss.append(("before the fix", "#d62728", True, series(before, lambda s: s["rss_per_site_kib"])))
    cpu = [("churn (1 %/s)", "#ff7f0e", False, series(after, lambda s: s["cpu_churn_percent"])),
           ("idle", "#9467bd", True, series(after, lambda s: s["cpu_idle_percent"]))]

    top = lambda groups, floor: max(floor, max(p[3] for g in groups for p in g[3]) * 1.15)
    body = []
    body += panel(0, "register → peer_update (churn)", ns, lat,
                  top(lat, 120), "ms (log)", goal=(100.0, "goal at 10,000: 100 ms"), log=True)
    body += panel(W, "Rendezvous RSS per site", ns, rss,
                  top(rss, 24), "KiB", goal=(20.0, "goal: 20 KiB"))
    body += panel(2 * W, "Rendezvous CPU (one core)", ns, cpu,
                  top(cpu, 10), "% of a core")
    m = after["machine"]
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{3 * W}" height="{H + 16}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{3 * W}" height="{H + 16}" fill="#fff"/>',
        *body,
        f'<text x="4" y="{H + 12}" fill="#555">causeway-bench rendezvous, {after["date"]}, '
        f'{m["nproc"]} cores ({m["cpu_model"]}), shared; rendezvous pinned to one core; one run per size</text>',
        "</svg>",
    ]
    open(sys.argv[2], "w").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
