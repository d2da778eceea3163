#!/usr/bin/env python3
"""Draws wide-growth.svg from the report.json of `causeway-bench wide --json`.

Three panels against the number of peers N: the daemon's resident memory
after every handshake and after traffic (median, min-max bar; the 64 MiB
goal), the time until every peer had a handshake (simulated peers
initiating at once; the daemon initiating, until every peer answered;
median, min-max bar; the 2 s goal) and single-stream TCP to peer #0 over
a 1-peer daemon measured in turn in the same lab (every pair's ratio:
median, min-max bar; the 0.9 goal).
Plain SVG, no dependencies:

    python3 bench/results/wide/plot.py bench/results/wide/report.json \
        bench/results/wide/wide-growth.svg
"""

import json
import statistics
import sys

W, H = 300, 260  # one panel
PAD_L, PAD_R, PAD_T, PAD_B = 52, 12, 34, 40


def panel(x0, title, ns, series, y_max, y_label, goal=None):
    """series: (label, colour, dashed, [(n, median, lo, hi)])."""
    out = []
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    n_max = max(ns) * 1.05
    sx = lambda n: x0 + PAD_L + pw * n / n_max
    sy = lambda v: PAD_T + ph * (1 - v / y_max)
    out.append(f'<text x="{x0 + W / 2}" y="16" text-anchor="middle" font-weight="bold">{title}</text>')
    out.append(f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(n_max)}" y2="{sy(0)}" stroke="#000"/>')
    out.append(f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(0)}" y2="{sy(y_max)}" stroke="#000"/>')
    for i in range(6):
        v = y_max * i / 5
        label = f"{v:.0f}" if y_max >= 10 else f"{v:.1f}"
        out.append(f'<line x1="{sx(0) - 3}" y1="{sy(v)}" x2="{sx(n_max)}" y2="{sy(v)}" stroke="#ddd"/>')
        out.append(f'<text x="{sx(0) - 5}" y="{sy(v) + 4}" text-anchor="end">{label}</text>')
    for n in ns:
        out.append(f'<text x="{sx(n)}" y="{sy(0) + 14}" text-anchor="middle">{n}</text>')
    out.append(f'<text x="{x0 + PAD_L + pw / 2}" y="{H - 6}" text-anchor="middle">peers (N)</text>')
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
    report = json.load(open(sys.argv[1]))
    runs = report["runs"]
    ns = sorted({r["peers"] for r in runs})
    of = lambda n: [r for r in runs if r["peers"] == n]

    def mlh(values):
        return statistics.median(values), min(values), max(values)

    def series(get, ns_=ns):
        points = []
        for n in ns_:
            values = [v for v in (get(r) for r in of(n)) if v is not None]
            if values:
                points.append((n, *mlh(values)))
        return points

    rss_h = series(lambda r: r["rss_after_handshakes_kib"] / 1024)
    rss_t = series(lambda r: r["rss_after_traffic_kib"] / 1024)
    sims_hs = series(lambda r: r["sims_handshakes_ms"] / 1000 if r["sims_handshakes_ms"] is not None else None)
    daemon_hs = series(lambda r: r["daemon_initiated_answered_ms"] / 1000
                       if r["daemon_initiated_answered_ms"] is not None else None)

    ratios = []
    for n in ns:
        values = [x for r in of(n) for x in r["tcp_pair_ratios"]]
        if values:
            ratios.append((n, *mlh(values)))

    top = lambda pts, floor: max(floor, max(p[3] for p in pts) * 1.15)
    body = []
    body += panel(0, "Daemon resident memory", ns,
                  [("after every handshake", "#2ca02c", True, rss_h),
                   ("after traffic (median, min–max)", "#2ca02c", False, rss_t)],
                  70, "MiB", goal=(64.0, "goal at N = 200: 64 MiB"))
    body += panel(W, "Until every peer has a handshake", ns,
                  [("peers initiate at once", "#1f77b4", False, sims_hs),
                   ("daemon initiates (all answered)", "#ff7f0e", True, daemon_hs)],
                  top(sims_hs + daemon_hs, 2.5), "seconds", goal=(2.0, "goal at N = 200: 2 s"))
    body += panel(2 * W, "TCP to peer #0, N peers / 1 peer", ns,
                  [("1 stream, pairs in turn (median, min–max)", "#9467bd", False, ratios)],
                  top(ratios, 1.2), "ratio", goal=(0.9, "goal: within 10 %"))
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{3 * W}" height="{H + 16}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{3 * W}" height="{H + 16}" fill="#fff"/>',
        *body,
        f'<text x="4" y="{H + 12}" fill="#555">causeway-bench wide, {report["date"]}, '
        f'{report["machine"]["nproc"]} cores ({report["machine"]["cpu_model"]}); '
        f'{len(of(ns[0]))} runs per N</text>',
        "</svg>",
    ]
    open(sys.argv[2], "w").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
