#!/usr/bin/env python3
"""Draws mesh-growth.svg from the report.json of `causeway-bench mesh --json`.

Three panels against the number of sites N: time to full reachability
(median, min-max bar; the median pair dashed; the 5 s goal), memory
(median daemon RSS, rendezvous RSS) and idle underlay traffic per site
(median, min-max bar). Plain SVG, no dependencies:

    python3 bench/results/mesh/plot.py bench/results/mesh/report.json \
        bench/results/mesh/mesh-growth.svg
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
    out.append(f'<text x="{x0 + PAD_L + pw / 2}" y="{H - 6}" text-anchor="middle">sites (N)</text>')
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
    ns = sorted({r["sites"] for r in runs})
    of = lambda n: [r for r in runs if r["sites"] == n]

    def mlh(values):
        return statistics.median(values), min(values), max(values)

    reach = [(n, *mlh([r["reachable_ms"] / 1000 for r in of(n) if r["reachable_ms"] is not None])) for n in ns]
    pair = [(n, *mlh([r["pair_median_ms"] / 1000 for r in of(n)])) for n in ns]
    rss = [(n, *mlh([k / 1024 for r in of(n) for k in r["daemon_rss_kib"]])) for n in ns]
    rdv = [(n, *mlh([r["rendezvous_rss_kib"] / 1024 for r in of(n)])) for n in ns]
    traffic = [(n, *mlh([b / 1000 for r in of(n) for b in r["idle_bytes_per_s"]])) for n in ns]

    top = lambda pts, floor: max(floor, max(p[3] for p in pts) * 1.15)
    body = []
    body += panel(0, "Time to full reachability", ns,
                  [("last pair (median, min–max)", "#1f77b4", False, reach),
                   ("median pair", "#1f77b4", True, pair)],
                  top(reach, 5.5), "seconds", goal=(5.0, "goal at N = 20: 5 s"))
    body += panel(W, "Resident memory", ns,
                  [("each daemon (median, min–max)", "#2ca02c", False, rss),
                   ("rendezvous", "#9467bd", True, rdv)],
                  top(rss + rdv, 1), "MiB")
    body += panel(2 * W, "Idle underlay traffic per site", ns,
                  [("rx + tx on wan0 (median, min–max)", "#ff7f0e", False, traffic)],
                  top(traffic, 1), "kB/s")
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{3 * W}" height="{H + 16}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{3 * W}" height="{H + 16}" fill="#fff"/>',
        *body,
        f'<text x="4" y="{H + 12}" fill="#555">causeway-bench mesh, {report["date"]}, '
        f'{report["machine"]["nproc"]} cores ({report["machine"]["cpu_model"]}); '
        f'{len(of(ns[0]))} runs per N</text>',
        "</svg>",
    ]
    open(sys.argv[2], "w").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
