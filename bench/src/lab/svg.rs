//! The chart, written by hand: TCP throughput and tunnel CPU per GB per
//! system (bars with min–max whiskers), and single-stream TCP throughput
//! against one-way delay (lines, log scale).

use std::fmt::Write as _;

use super::results::{Metric, MetricSummary, Results, ScenarioResults, SystemSummary};

const WIDTH: f64 = 960.0;
const PANEL: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

fn color(system: &str) -> &'static str {
    match system {
        "raw" => "#7f7f7f",
        "causeway" => "#1f77b4",
        "causeway-remap" => "#17becf",
        "causeway-nat" => "#9467bd",
        "causeway-relay" => "#8c564b",
        "wireguard-go" => "#d62728",
        "boringtun-cli" => "#ff7f0e",
        _ => "#333333",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn value(sys: &SystemSummary, m: Metric) -> Option<(f64, f64, f64)> {
    match sys.metrics.get(&m) {
        Some(MetricSummary::Value {
            median, min, max, ..
        }) => Some((*median, *min, *max)),
        _ => None,
    }
}

fn status_text(sys: &SystemSummary, m: Metric) -> String {
    match sys.status.as_str() {
        "measured" => match sys.metrics.get(&m) {
            Some(MetricSummary::NotApplicable) => "n/a".into(),
            _ => "failed".into(),
        },
        "not_built" => "not built".into(),
        other => other.into(),
    }
}

/// The whole SVG document.
pub(crate) fn chart(r: &Results) -> String {
    let base = r
        .scenarios
        .iter()
        .find(|s| s.delay_ms == 0.0 && s.loss_percent == 0.0)
        .or(r.scenarios.first());
    let height = 3.0 * PANEL + 20.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    if let Some(sc) = base {
        bars(
            &mut s,
            0.0,
            sc,
            &[
                (Metric::Tcp1Gbps, "1 stream"),
                (Metric::Tcp4Gbps, "4 streams"),
            ],
            &format!(
                "TCP throughput, Gbit/s (scenario {}; median, whiskers min–max)",
                sc.name
            ),
            true,
        );
        bars(
            &mut s,
            PANEL,
            sc,
            &[(Metric::CpuSecondsPerGb, "")],
            &format!(
                "Tunnel CPU-seconds per GB of payload, both sites (scenario {}; lower is better)",
                sc.name
            ),
            false,
        );
    }
    lines(&mut s, 2.0 * PANEL, r);
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" fill=\"#666\">{}</text>",
        LEFT,
        height - 6.0,
        esc(&format!(
            "causeway-bench lab, {}, {} run(s) × {} s",
            r.date, r.runs, r.seconds
        ))
    );
    s += "</svg>\n";
    s
}

/// Grouped bars per system; with `clip`, the largest bars (raw) may be cut
/// at the top of a scale set by the others, with their value written.
fn bars(
    s: &mut String,
    y0: f64,
    sc: &ScenarioResults,
    metrics: &[(Metric, &str)],
    title: &str,
    clip: bool,
) {
    let plot_h = PANEL - TOP - BOTTOM;
    let plot_w = WIDTH - LEFT - RIGHT;
    let _ = writeln!(
        s,
        "<text x=\"{LEFT}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        y0 + 22.0,
        esc(title)
    );
    let all: Vec<f64> = sc
        .summary
        .iter()
        .flat_map(|sys| {
            metrics
                .iter()
                .filter_map(|(m, _)| value(sys, *m))
                .map(|v| v.2)
        })
        .collect();
    let others: Vec<f64> = sc
        .summary
        .iter()
        .filter(|sys| sys.system != "raw")
        .flat_map(|sys| {
            metrics
                .iter()
                .filter_map(|(m, _)| value(sys, *m))
                .map(|v| v.2)
        })
        .collect();
    let top = if clip && !others.is_empty() {
        others.iter().copied().fold(0.0, f64::max)
    } else {
        all.iter().copied().fold(0.0, f64::max)
    };
    let scale_max = nice(if top > 0.0 { top * 1.15 } else { 1.0 });
    let y = |v: f64| y0 + TOP + plot_h - (v.min(scale_max) / scale_max) * plot_h;
    axis(s, y0, plot_h, plot_w, scale_max, |v| format!("{v}"));
    let n = sc.summary.len().max(1) as f64;
    let group = plot_w / n;
    let bar = (group * 0.7 / metrics.len() as f64).min(40.0);
    // Legend: the first metric is solid, the others lighter.
    if metrics.len() > 1 {
        for (j, (_, label)) in metrics.iter().enumerate() {
            let lx = LEFT + plot_w + 20.0;
            let ly = y0 + TOP + 16.0 * j as f64;
            let opacity = if j == 0 { "1" } else { "0.55" };
            let _ = writeln!(
                s,
                "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"#555\" fill-opacity=\"{opacity}\"/>",
                ly - 9.0
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{ly:.1}\">{}</text>",
                lx + 18.0,
                esc(label)
            );
        }
    }
    for (i, sys) in sc.summary.iter().enumerate() {
        let center = LEFT + group * (i as f64 + 0.5);
        let gx = LEFT + group * i as f64 + (group - bar * metrics.len() as f64) / 2.0;
        let _ = writeln!(
            s,
            "<text x=\"{center:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            y0 + TOP + plot_h + 16.0,
            esc(&sys.system)
        );
        if metrics.iter().all(|(m, _)| value(sys, *m).is_none()) {
            let _ = writeln!(
                s,
                "<text x=\"{center:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#999\">{}</text>",
                y0 + TOP + plot_h - 8.0,
                esc(&status_text(sys, metrics[0].0))
            );
            continue;
        }
        for (j, (m, label)) in metrics.iter().enumerate() {
            let x = gx + bar * j as f64;
            let w = bar - 2.0;
            let cx = x + w / 2.0;
            match value(sys, *m) {
                Some((median, min, max)) => {
                    let opacity = if j == 0 { "1" } else { "0.55" };
                    let h = y0 + TOP + plot_h - y(median);
                    let _ = writeln!(
                        s,
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{}\" fill-opacity=\"{opacity}\"><title>{} {label}: {median:.3}</title></rect>",
                        y(median),
                        color(&sys.system),
                        esc(&sys.system)
                    );
                    if median > scale_max {
                        // Off the scale: a break near the top.
                        let by = y(scale_max) + 10.0;
                        let _ = writeln!(
                            s,
                            "<path d=\"M{:.1},{:.1} l{w:.1},-6 v4 l-{w:.1},6 z\" fill=\"white\"/>",
                            x,
                            by + 2.0
                        );
                    } else {
                        let _ = writeln!(
                            s,
                            "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                            y(min),
                            y(max)
                        );
                    }
                    let text = if median > scale_max {
                        format!("{} ↑", format_short(median))
                    } else {
                        format_short(median)
                    };
                    let _ = writeln!(
                        s,
                        "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
                        y(median.max(max).min(scale_max)) - 4.0,
                        esc(&text)
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\" fill=\"#999\">{}</text>",
                        y0 + TOP + plot_h - 6.0,
                        esc(&status_text(sys, *m))
                    );
                }
            }
        }
    }
}

/// Horizontal grid and labels from 0 to `max`.
fn axis(
    s: &mut String,
    y0: f64,
    plot_h: f64,
    plot_w: f64,
    max: f64,
    label: impl Fn(f64) -> String,
) {
    for k in 0..=4 {
        let v = max * f64::from(k) / 4.0;
        let yy = y0 + TOP + plot_h - plot_h * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>",
            LEFT + plot_w
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{}</text>",
            LEFT - 6.0,
            yy + 3.0,
            esc(&label(round3(v)))
        );
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn format_short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A round number ≥ `v`: 1, 2, 2.5 or 5 times a power of ten.
fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

/// Single-stream TCP against one-way delay, one line per system, log y.
fn lines(s: &mut String, y0: f64, r: &Results) {
    let plot_h = PANEL - TOP - BOTTOM;
    let plot_w = WIDTH - LEFT - RIGHT;
    let _ = writeln!(
        s,
        "<text x=\"{LEFT}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">TCP 1 stream, Gbit/s (log scale), against one-way WAN delay (no loss)</text>",
        y0 + 22.0
    );
    let mut delays: Vec<&ScenarioResults> = r
        .scenarios
        .iter()
        .filter(|sc| sc.loss_percent == 0.0)
        .collect();
    delays.sort_by(|a, b| a.delay_ms.total_cmp(&b.delay_ms));
    delays.dedup_by(|a, b| a.delay_ms == b.delay_ms);
    if delays.len() < 2 {
        let _ = writeln!(
            s,
            "<text x=\"{LEFT}\" y=\"{}\" fill=\"#999\">fewer than two delays measured (run the delay scenarios)</text>",
            y0 + TOP + plot_h / 2.0
        );
        return;
    }
    let points: Vec<(f64, f64)> = delays
        .iter()
        .flat_map(|sc| {
            sc.summary
                .iter()
                .filter_map(move |sys| value(sys, Metric::Tcp1Gbps).map(|v| (sc.delay_ms, v.0)))
        })
        .filter(|p| p.1 > 0.0)
        .collect();
    if points.is_empty() {
        return;
    }
    let lo = 10f64.powf(
        points
            .iter()
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min)
            .log10()
            .floor(),
    );
    let hi = 10f64
        .powf(
            points
                .iter()
                .map(|p| p.1)
                .fold(0.0, f64::max)
                .log10()
                .ceil(),
        )
        .max(lo * 10.0);
    let max_delay = delays.last().map_or(1.0, |sc| sc.delay_ms).max(1.0);
    let x = |d: f64| LEFT + d / max_delay * plot_w;
    let y =
        |v: f64| y0 + TOP + plot_h - (v.log10() - lo.log10()) / (hi.log10() - lo.log10()) * plot_h;
    let mut decade = lo;
    while decade <= hi * 1.0001 {
        let yy = y(decade);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>",
            LEFT + plot_w
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{}</text>",
            LEFT - 6.0,
            yy + 3.0,
            decade
        );
        decade *= 10.0;
    }
    for sc in &delays {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{} ms</text>",
            x(sc.delay_ms),
            y0 + TOP + plot_h + 16.0,
            sc.delay_ms
        );
    }
    let systems: Vec<&str> = r.systems.iter().map(|s| s.name.as_str()).collect();
    let mut legend = 0.0;
    for name in systems {
        let pts: Vec<(f64, f64)> = delays
            .iter()
            .filter_map(|sc| {
                sc.summary
                    .iter()
                    .find(|s| s.system == name)
                    .and_then(|sys| value(sys, Metric::Tcp1Gbps))
                    .map(|v| (sc.delay_ms, v.0))
            })
            .filter(|p| p.1 > 0.0)
            .collect();
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts
            .iter()
            .map(|(d, v)| format!("{:.1},{:.1}", x(*d), y(*v)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"/>",
            path.join(" "),
            color(name)
        );
        for (d, v) in &pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"><title>{} at {d} ms: {v:.3} Gbit/s</title></circle>",
                x(*d),
                y(*v),
                color(name),
                esc(name)
            );
        }
        let ly = y0 + TOP + legend * 16.0;
        let lx = LEFT + plot_w + 20.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"{}\" stroke-width=\"3\"/>",
            lx + 18.0,
            color(name)
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            lx + 24.0,
            ly + 4.0,
            esc(name)
        );
        legend += 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_numbers() {
        assert_eq!(nice(0.9), 1.0);
        assert_eq!(nice(1.1), 2.0);
        assert_eq!(nice(2.2), 2.5);
        assert_eq!(nice(3.0), 5.0);
        assert_eq!(nice(7.0), 10.0);
        assert_eq!(nice(23.0), 25.0);
    }
}
