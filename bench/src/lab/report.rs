//! The Markdown report.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::results::{Metric, MetricSummary, Results, ScenarioResults, SystemSummary};
use super::system::System;
use crate::stats;

/// `docs/performance.md`: how the numbers are made, then the report.
pub(crate) fn document(r: &Results, svg_link: &str) -> String {
    let mut s = String::new();
    s += "# Performance\n\n";
    s += "This page is written by `causeway-bench lab` (see [bench/](../bench/)); rerun the command below to refresh it.\n";
    s += "Every number is measured on the machine named below, between two pods of two sites in network namespaces,\n";
    s += "with our own iperf-style client and server (`causeway-bench client`/`server`).\n\n";
    s += METHOD;
    s += "\n";
    s += &markdown(r, Some(svg_link))
        .replacen("# Causeway benchmark report\n\n", "## Latest report\n\n", 1)
        .replace("\n## ", "\n### ");
    s
}

const METHOD: &str = "## How it is measured

- **Topology** (the testbed crate): sites `a` and `b`, a gateway each, one pod behind each gateway, both
  gateways on an \"internet\" router namespace. The tunnel runs on the gateways; traffic goes from
  site `a`'s pod to site `b`'s pod. Every system gets a freshly built lab for every cell.
- **Systems**: *raw* routes the pod CIDRs through the same routers with no tunnel (the ceiling; its
  links keep their 1500-byte MTU and offloads). Every tunnel uses MTU 1420. *causeway* has static
  endpoints and distinct pod CIDRs; *causeway-remap* has both sites on `10.0.0.0/16`, and site `a`'s
  pod reaches site `b`'s pod through the view CIDR read from `causeway status --json`.
  *wireguard-go* (Debian) and *boringtun-cli* (`cargo install boringtun-cli --locked`, 4 threads)
  are configured with `wg` exactly like each other. *causeway-nat* puts both gateways behind
  port-preserving NATs (nftables `masquerade`), *causeway-relay* behind symmetric ones
  (`masquerade random,fully-random`); their peers have no endpoints, only a `[[rendezvous]]`: a
  `causeway rendezvous` on the internet router, started before the cell's clock, introduces the
  sites, which then punch a direct path (nat) or send through its relay: its UDP relay port
  (relay) or, with `relay_ports = \"off\"`, its QUIC relay (relay-quic). *causeway-tcp* puts both
  gateways behind NATs whose egress firewall drops every outbound UDP datagram: the sites reach the
  rendezvous over TLS on TCP (port 443) and relay over those connections. Those labs take the
  gateways' IPv6 addresses away (the testbed routes IPv6 without NAT). Before and after the tests
  both daemons must show their peer on the system's path (`static`, `direct` or `relay` in
  `causeway status --json`), and on a `direct` path at most 1 % of the tests' traffic may have
  gone through the relay; otherwise the cell fails.
- **Interleaving**: run 1 measures every system in turn, then run 2, and so on, so that the drift of a
  shared, noisy 2-core machine hits every system alike. Cells show the **median (min–max)** over
  the runs; the ratio table divides each run's value by wireguard-go's value *in the same run* and
  shows the median of those ratios.
- **Tests** (each for the given seconds): TCP bulk with 1 and with 4 streams (payload received by the
  server over its receive window); UDP at a fixed offered rate (payload received, loss counted by
  sequence number); RTT = round trips of 64-byte messages over one TCP connection (`TCP_NODELAY`),
  back to back, p50/p99, idle and beside one bulk TCP stream (\"loaded\").
- **Tunnel CPU-s per GB**: user + system CPU time of the tunnel processes of *both* sites (all threads,
  `/proc/<pid>/stat`; for causeway-relay(-quic) also the rendezvous, which carries the traffic, but not for
  causeway-nat, where it only introduces the sites) during the two TCP tests, divided by the payload gigabytes (10⁹ bytes) those
  tests delivered. Kernel work that Linux does not charge to those processes (packet processing
  in softirq context, depending on the kernel's accounting) is not included, for any system.
  **Peak RSS**: the largest `VmHWM` of those processes at the end of the cell.
- **Setup**: from just before both tunnel processes are spawned (then configured, for the `wg`-based
  ones) to the first answered UDP probe between the pods, whichever path it took (for causeway-nat
  usually still the relay: the direct path is awaited after that, before the tests); probes are
  sent every 0.5 ms, so the resolution is 0.5 ms. The handshake is included. Before the clock starts, the gateways ping each
  other over the underlay, so that neighbour resolution (ARP) across the emulated WAN is not counted.
- **WAN scenarios**: the testbed's user-space WAN emulator on site `a`'s access link, each direction
  (so `delay20` adds 40 ms to the RTT). Its own CPU time over the cell is always reported next to
  the results: the emulator shares the 2 CPUs with everything else, and at high packet rates it
  can be the bottleneck. Over long delays a TCP test of a few seconds includes slow start, and
  one stream is also bounded by the namespaces' default socket buffers (`tcp_rmem`/`tcp_wmem`).
- **UDP** is offered at a fixed rate, so a system that keeps up shows that rate and no loss; one that
  cannot shows what it delivered and the loss (the sender is not slowed down).
- **Micro-benchmarks** of the per-packet work (boringtun encapsulate/decapsulate, remap, MSS clamp,
  allow check, whole batches) run without the lab: `cargo bench -p causeway-bench --bench datapath`.
";

/// The full report: header, one table (and one ratio table) per scenario,
/// the design targets, and the chart.
pub(crate) fn markdown(r: &Results, svg_link: Option<&str>) -> String {
    let mut s = String::new();
    s += "# Causeway benchmark report\n\n";
    let _ = writeln!(s, "- command: `{}`", r.command);
    let _ = writeln!(s, "- date: {}", r.date);
    let _ = writeln!(
        s,
        "- machine: {} × {} (nproc {}), kernel {}, {} GiB memory",
        r.machine.nproc,
        r.machine.cpu_model,
        r.machine.nproc,
        r.machine.kernel,
        r.machine.memory_gib
    );
    let versions: Vec<String> = r
        .versions
        .iter()
        .map(|(k, v)| format!("{k}: `{v}`"))
        .collect();
    if !versions.is_empty() {
        let _ = writeln!(s, "- versions: {}", versions.join(", "));
    }
    let _ = writeln!(
        s,
        "- {} run(s) per cell, interleaved; {} s per test; tunnel MTU {}; UDP offered at {} in {}-byte datagrams",
        r.runs,
        r.seconds,
        r.mtu,
        stats::rate(r.udp_bitrate as f64),
        super::cell::UDP_LEN
    );
    for note in &r.notes {
        let _ = writeln!(s, "- note: {note}");
    }
    s += "\nSystems:\n\n";
    for sys in &r.systems {
        let _ = writeln!(s, "- **{}**: {}", sys.name, sys.description);
    }
    s += "\nEach cell is the median over the runs, with the minimum and maximum in parentheses. \
          `skipped`, `not built` and `failed` cells are never numbers; the notes under each table say why.\n\n";
    s += &tables(r);
    if let Some(link) = svg_link {
        let _ = writeln!(
            s,
            "## Chart\n\n![throughput, CPU per GB, throughput vs delay]({link})\n"
        );
    }
    s
}

/// The per-scenario tables and the design targets (also printed by the lab).
pub(crate) fn tables(r: &Results) -> String {
    let mut s = String::new();
    for sc in &r.scenarios {
        s += &scenario_tables(sc);
    }
    if let Some(lan) = r
        .scenarios
        .iter()
        .find(|sc| sc.delay_ms == 0.0 && sc.loss_percent == 0.0)
    {
        s += &targets(lan);
    }
    s
}

fn scenario_tables(sc: &ScenarioResults) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Scenario `{}`: {}\n", sc.name, sc.description);
    // Columns that say something for at least one system; all of them when
    // none does (nothing measured), so that every row still says why.
    let all = Metric::ALL.into_iter().filter(|m| m.in_table());
    let mut metrics: Vec<Metric> = all
        .clone()
        .filter(|m| {
            sc.summary.iter().any(|sys| {
                sys.metrics
                    .get(m)
                    .is_some_and(|v| !matches!(v, MetricSummary::NotApplicable))
            })
        })
        .collect();
    if metrics.is_empty() {
        metrics = all.collect();
    }
    let header = |s: &mut String| {
        s.push_str("| system |");
        for m in &metrics {
            let _ = write!(s, " {} |", m.header());
        }
        s.push_str("\n|---|");
        for _ in &metrics {
            s.push_str("---:|");
        }
        s.push('\n');
    };
    header(&mut s);
    let mut notes = BTreeSet::new();
    for sys in &sc.summary {
        let _ = write!(s, "| {} |", sys.system);
        for m in &metrics {
            let _ = write!(s, " {} |", cell(sys, *m, &mut notes));
        }
        s.push('\n');
    }
    let has_baseline = sc
        .summary
        .iter()
        .any(|sys| sys.system == System::WireguardGo.name() && sys.status == "measured");
    if has_baseline {
        s += "\nRatio to wireguard-go, measured in the same run (median of the per-run ratios; throughput: higher is better, the rest: lower is better):\n\n";
        header(&mut s);
        for sys in &sc.summary {
            let _ = write!(s, "| {} |", sys.system);
            for m in &metrics {
                let text = match sys.metrics.get(m) {
                    // The emulator's CPU is not the system's doing.
                    Some(MetricSummary::Value { .. }) if *m == Metric::WanCpuSeconds => "—".into(),
                    Some(MetricSummary::Value {
                        ratio_to_wireguard_go: Some(ratio),
                        ..
                    }) => ratio_text(*ratio),
                    Some(MetricSummary::Value { .. } | MetricSummary::NotApplicable) => "—".into(),
                    Some(MetricSummary::Failed { .. }) => "failed".into(),
                    None => status_word(sys).into(),
                };
                let _ = write!(s, " {text} |");
            }
            s.push('\n');
        }
    } else {
        s += "\nNo ratios to wireguard-go: it was not measured in this scenario.\n";
    }
    if !notes.is_empty() {
        s += "\nNotes:\n\n";
        for n in &notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    if sc.delay_ms > 0.0 || sc.loss_percent > 0.0 {
        s += "\nThe WAN emulator's own CPU time is in the `WAN emulator CPU-s` column (whole cell, all tests).\n";
    }
    s.push('\n');
    s
}

fn ratio_text(ratio: f64) -> String {
    if ratio >= 0.1 {
        format!("×{ratio:.2}")
    } else {
        format!("×{ratio:.3}")
    }
}

fn status_word(sys: &SystemSummary) -> &'static str {
    match sys.status.as_str() {
        "skipped" => "skipped",
        "not_built" => "not built",
        "measured" => "—",
        _ => "failed",
    }
}

fn cell(sys: &SystemSummary, m: Metric, notes: &mut BTreeSet<String>) -> String {
    if sys.status != "measured" {
        let word = status_word(sys);
        if let Some(reason) = &sys.reason {
            notes.insert(format!("`{}` {word}: {}", sys.system, shorten(reason)));
        }
        return word.into();
    }
    match sys.metrics.get(&m) {
        Some(MetricSummary::Value {
            median,
            min,
            max,
            runs,
            failed_runs,
            ..
        }) => {
            let mut t = m.format(*median);
            let (lo, hi) = (m.format(*min), m.format(*max));
            if *runs > 1 && lo != hi {
                let _ = write!(t, " ({lo}–{hi})");
            }
            if *failed_runs > 0 {
                let _ = write!(t, " ⚠ {failed_runs} run(s) failed");
                notes.insert(format!("`{}`: some runs failed; the value is over the {runs} that worked (see report.json)", sys.system));
            }
            t
        }
        Some(MetricSummary::NotApplicable) => "—".into(),
        Some(MetricSummary::Failed { reason }) => {
            notes.insert(format!(
                "`{}` {}: failed: {}",
                sys.system,
                m.header(),
                shorten(reason)
            ));
            "failed".into()
        }
        None => "failed".into(),
    }
}

fn shorten(reason: &str) -> String {
    let one_line = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 300 {
        format!("{}…", one_line.chars().take(300).collect::<String>())
    } else {
        one_line
    }
}

/// The design brief's targets, as measured in scenario `lan`.
fn targets(lan: &ScenarioResults) -> String {
    let get = |system: System, m: Metric| {
        lan.summary
            .iter()
            .find(|s| s.system == system.name())
            .and_then(|s| match s.metrics.get(&m) {
                Some(MetricSummary::Value {
                    median,
                    ratio_to_wireguard_go,
                    ..
                }) => Some((*median, *ratio_to_wireguard_go)),
                _ => None,
            })
    };
    let mut s = format!(
        "## Against the design targets (scenario `{}`)\n\n| target | causeway | met |\n|---|---:|:---:|\n",
        lan.name
    );
    let yes = |ok: bool| if ok { "yes" } else { "no" };
    match get(System::Causeway, Metric::Tcp1Gbps).and_then(|v| v.1) {
        Some(r) => {
            s += &format!(
                "| single-stream TCP ≥ 5× wireguard-go | {} | {} |\n",
                ratio_text(r),
                yes(r >= 5.0)
            )
        }
        None => s += "| single-stream TCP ≥ 5× wireguard-go | not measured | — |\n",
    }
    match get(System::Causeway, Metric::CpuSecondsPerGb).and_then(|v| v.1) {
        Some(r) => {
            s += &format!(
                "| tunnel CPU per GB ≤ 0.25× wireguard-go | {} | {} |\n",
                ratio_text(r),
                yes(r <= 0.25)
            )
        }
        None => s += "| tunnel CPU per GB ≤ 0.25× wireguard-go | not measured | — |\n",
    }
    match (
        get(System::Causeway, Metric::RttIdleP50Ms),
        get(System::Raw, Metric::RttIdleP50Ms),
    ) {
        (Some((cw, _)), Some((raw, _))) => {
            let extra_us = (cw - raw) * 1e3;
            s += &format!(
                "| idle RTT ≤ raw + 60 µs (p50) | raw + {extra_us:.0} µs | {} |\n",
                yes(extra_us <= 60.0)
            );
        }
        _ => s += "| idle RTT ≤ raw + 60 µs (p50) | not measured | — |\n",
    }
    let nat = lan
        .summary
        .iter()
        .find(|s| s.system == System::CausewayNat.name());
    match nat.and_then(|n| n.metrics.get(&Metric::SetupMs)) {
        Some(MetricSummary::Value { median, .. }) => {
            s += &format!(
                "| setup through NATs via the rendezvous ≤ 500 ms | {median:.0} ms | {} |\n",
                yes(*median <= 500.0)
            );
        }
        _ => {
            let word = nat.map_or("not measured", |n| status_word(n));
            s += &format!("| setup through NATs via the rendezvous ≤ 500 ms | {word} | — |\n");
        }
    }
    s.push('\n');
    s
}
