//! `causeway-bench lab`: every system in every scenario, interleaved run
//! by run (A B C A B C …) so that drift of a noisy machine hits all systems
//! alike; then a Markdown table, a JSON file and an SVG chart.

mod cell;
pub(crate) mod daemon;
pub(crate) mod procfs;
mod report;
mod results;
mod svg;
mod system;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use causeway_testbed::Wan;

use crate::interrupt;
use cell::Ctx;
pub(crate) use cell::UDP_LEN;
use results::{CellRecord, Metric, MetricValue, Outcome, Results, ScenarioResults, SystemInfo};
use system::{System, Tools};

/// Scenarios run when `--scenario` is not given.
pub(crate) const DEFAULT_SCENARIOS: &str = "lan,delay20,delay50,delay100,loss1";

/// `causeway-bench lab` options.
#[derive(Clone, Debug)]
pub(crate) struct Args {
    pub(crate) scenarios: Vec<String>,
    pub(crate) systems: Option<Vec<String>>,
    pub(crate) runs: u32,
    pub(crate) seconds: f64,
    pub(crate) out: PathBuf,
    pub(crate) doc: Option<PathBuf>,
    pub(crate) causeway: Option<PathBuf>,
    pub(crate) baseline: Option<PathBuf>,
    pub(crate) boringtun: Option<PathBuf>,
    pub(crate) udp_bitrate: u64,
    /// Restrict the tunnel processes to these CPUs once they are up.
    pub(crate) tunnel_cpus: Option<Vec<usize>>,
}

/// A network condition between the two sites.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Scenario {
    pub(crate) name: String,
    /// Applied on site `a`'s access link, each direction.
    pub(crate) wan: Wan,
}

impl Scenario {
    /// `lan`, `delay<ms>`, `loss<percent>`, or parts joined by `+`
    /// (`delay50+loss1`).
    pub(crate) fn parse(name: &str) -> anyhow::Result<Scenario> {
        let mut wan = Wan::default();
        for part in name.split('+') {
            if part == "lan" {
                continue;
            }
            if let Some(ms) = part.strip_prefix("delay") {
                let ms: f64 = ms
                    .parse()
                    .ok()
                    .filter(|m: &f64| (0.0..=10_000.0).contains(m))
                    .with_context(|| bad(name))?;
                wan.delay = Duration::from_secs_f64(ms / 1e3);
            } else if let Some(pct) = part.strip_prefix("loss") {
                let pct: f64 = pct
                    .parse()
                    .ok()
                    .filter(|p: &f64| (0.0..=100.0).contains(p))
                    .with_context(|| bad(name))?;
                wan.loss = pct / 100.0;
            } else {
                bail!(bad(name));
            }
        }
        Ok(Scenario {
            name: name.to_owned(),
            wan,
        })
    }

    pub(crate) fn description(&self) -> String {
        if self.wan.is_none() {
            return "two sites joined by plain veth links through the internet router (no WAN emulation)".into();
        }
        let mut parts = Vec::new();
        if !self.wan.delay.is_zero() {
            parts.push(format!(
                "{} ms one-way delay",
                self.wan.delay.as_secs_f64() * 1e3
            ));
        }
        if self.wan.loss > 0.0 {
            parts.push(format!("{} % loss each way", self.wan.loss * 100.0));
        }
        format!(
            "{} on site a's access link (user-space WAN emulator)",
            parts.join(" and ")
        )
    }
}

fn bad(name: &str) -> String {
    format!(
        "unknown scenario {name:?}: use lan, delay<ms> (delay20), loss<percent> (loss1), or parts joined by + (delay50+loss1)"
    )
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    interrupt::install();
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the lab needs root (network namespaces, TUN devices, nftables); run it with sudo"
    );
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(args.seconds > 0.0, "--seconds must be positive");
    let scenarios: Vec<Scenario> = args
        .scenarios
        .iter()
        .map(|s| Scenario::parse(s))
        .collect::<anyhow::Result<_>>()?;
    let systems: Vec<System> = match &args.systems {
        // Every system but the baseline, which needs --baseline.
        None => System::ALL
            .into_iter()
            .filter(|s| *s != System::CausewayBaseline || args.baseline.is_some())
            .collect(),
        Some(names) => names
            .iter()
            .map(|n| {
                System::parse(n).with_context(|| {
                    format!(
                        "unknown system {n:?}; the systems are {}",
                        System::ALL.map(System::name).join(", ")
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let tools = Tools::find(
        args.causeway.clone(),
        args.baseline.clone(),
        args.boringtun.clone(),
    );
    for (name, tool) in [
        ("causeway", &tools.causeway),
        ("wireguard-go", &tools.wireguard_go),
        ("wg", &tools.wg),
        ("boringtun-cli", &tools.boringtun),
    ] {
        if let Err(how) = tool {
            println!("note    {how}; the cells that need {name} are shown as skipped");
        }
    }
    let versions: BTreeMap<String, String> = tools.versions().into_iter().collect();
    let ctx = Ctx {
        exe: std::env::current_exe()?,
        tools,
        seconds: args.seconds,
        udp_bitrate: args.udp_bitrate,
        tunnel_cpus: args.tunnel_cpus.clone(),
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let mut results = Results {
        command: command_line(),
        date: procfs::utc_now(),
        machine: procfs::Machine::this(),
        runs: args.runs,
        seconds: args.seconds,
        udp_bitrate: args.udp_bitrate,
        mtu: system::MTU,
        versions,
        notes: args
            .tunnel_cpus
            .iter()
            .map(|cpus| {
                format!(
                    "The tunnel processes (every thread) were restricted to CPU(s) {} once up; \
                     the pods, the WAN emulator and the kernel's softirq work were not.",
                    cpus.iter()
                        .map(usize::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                )
            })
            .collect(),
        systems: systems
            .iter()
            .map(|s| SystemInfo {
                name: s.name().into(),
                description: s.description().into(),
            })
            .collect(),
        scenarios: Vec::new(),
    };
    let started = Instant::now();
    for scenario in &scenarios {
        let mut sr = ScenarioResults {
            name: scenario.name.clone(),
            description: scenario.description(),
            delay_ms: scenario.wan.delay.as_secs_f64() * 1e3,
            loss_percent: scenario.wan.loss * 100.0,
            cells: Vec::new(),
            summary: Vec::new(),
        };
        for run in 0..args.runs {
            for &system in &systems {
                interrupt::check()?;
                let t = Instant::now();
                let outcome = cell::measure(&ctx, scenario, system);
                interrupt::check()?;
                let wall_seconds = t.elapsed().as_secs_f64();
                println!(
                    "{}",
                    progress_line(scenario, run, args.runs, system, &outcome, wall_seconds)
                );
                std::io::stdout().flush()?;
                sr.cells.push(CellRecord {
                    system: system.name().into(),
                    run,
                    wall_seconds,
                    outcome,
                });
            }
        }
        sr.summarize(&systems);
        results.scenarios.push(sr);
    }
    write_reports(&results, &args.out, args.doc.as_deref())?;
    println!(
        "done    {} cells in {:.0} s; reports in {}",
        results
            .scenarios
            .iter()
            .map(|s| s.cells.len())
            .sum::<usize>(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// `causeway-bench report`: writes the Markdown, SVG (and `--doc` page)
/// again from a `report.json`, e.g. after the report's layout changed or a
/// note was added to it; the numbers are those in the file.
pub(crate) fn rerender(
    json: &Path,
    out: Option<PathBuf>,
    doc: Option<PathBuf>,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let mut results: Results = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a lab report", json.display()))?;
    let systems: Vec<System> = results
        .systems
        .iter()
        .filter_map(|s| System::parse(&s.name))
        .collect();
    for sc in &mut results.scenarios {
        sc.summarize(&systems);
    }
    let out = out.unwrap_or_else(|| json.parent().unwrap_or(Path::new(".")).to_path_buf());
    std::fs::create_dir_all(&out)?;
    write_reports(&results, &out, doc.as_deref())
}

fn write_reports(results: &Results, out: &Path, doc: Option<&Path>) -> anyhow::Result<()> {
    let json = out.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let svg_path = out.join("report.svg");
    std::fs::write(&svg_path, svg::chart(results))
        .with_context(|| format!("writing {}", svg_path.display()))?;
    let md = report::markdown(results, Some("report.svg"));
    std::fs::write(out.join("report.md"), &md)?;
    if let Some(doc) = doc {
        let link = relative(doc.parent().unwrap_or(Path::new(".")), &svg_path);
        let old = std::fs::read_to_string(doc).unwrap_or_default();
        let text = keep_abuse_section(report::document(results, &link), &old);
        std::fs::write(doc, text).with_context(|| format!("writing {}", doc.display()))?;
    }
    println!();
    print!("{}", report::tables(results));
    Ok(())
}

/// The heading of the section `causeway-bench abuse` figures go under; the
/// lab does not measure them, so it keeps that section of the page as it
/// was.
const ABUSE_HEADING: &str = "\n## Abuse\n";

/// `new` with the "Abuse" section of `old` (to its end) appended, if
/// `old` has one.
fn keep_abuse_section(mut new: String, old: &str) -> String {
    if let Some(at) = old.find(ABUSE_HEADING) {
        if !new.ends_with('\n') {
            new.push('\n');
        }
        new.push_str(&old[at..]);
    }
    new
}

/// `to` relative to directory `from` (both made absolute first), for links.
fn relative(from: &Path, to: &Path) -> String {
    let abs = |p: &Path| {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        p.canonicalize().unwrap_or(p)
    };
    let (from, to) = (abs(from), abs(to));
    let (f, t): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".into(); f.len() - common];
    parts.extend(
        t[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut() {
        *first = Path::new(first.as_str())
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
    args.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn progress_line(
    scenario: &Scenario,
    run: u32,
    runs: u32,
    system: System,
    outcome: &Outcome,
    wall: f64,
) -> String {
    let head = format!(
        "{:<9} run {}/{} {:<15}",
        scenario.name,
        run + 1,
        runs,
        system.name()
    );
    match outcome {
        Outcome::Skipped { reason } => format!("{head} skipped: {reason}"),
        Outcome::NotBuilt { reason } => format!("{head} not built: {reason}"),
        Outcome::Failed { reason } => format!(
            "{head} FAILED ({wall:.0} s): {}",
            reason.lines().next().unwrap_or("")
        ),
        Outcome::Measured(m) => {
            let v = |metric: Metric| match m.metrics.get(&metric) {
                Some(MetricValue::Value(v)) => metric.format(*v),
                Some(MetricValue::NotApplicable) | None => "—".into(),
                Some(MetricValue::Failed(_)) => "failed".into(),
            };
            format!(
                "{head} tcp {}/{} Gbit/s, udp {} Gbit/s ({} % loss), rtt {}/{} ms, loaded {} ms, {} CPU-s/GB, setup {} ms, wan cpu {:.2} s ({wall:.0} s)",
                v(Metric::Tcp1Gbps),
                v(Metric::Tcp4Gbps),
                v(Metric::UdpGbps),
                v(Metric::UdpLossPercent),
                v(Metric::RttIdleP50Ms),
                v(Metric::RttIdleP99Ms),
                v(Metric::RttLoadedP50Ms),
                v(Metric::CpuSecondsPerGb),
                v(Metric::SetupMs),
                m.wan.cpu_seconds,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse() {
        assert_eq!(Scenario::parse("lan").expect("lan").wan, Wan::default());
        let s = Scenario::parse("delay50+loss1").expect("combo");
        assert_eq!(s.wan.delay, Duration::from_millis(50));
        assert!((s.wan.loss - 0.01).abs() < 1e-12);
        assert!(Scenario::parse("delay").is_err());
        assert!(Scenario::parse("jitter5").is_err());
        assert!(Scenario::parse("loss200").is_err());
        for name in DEFAULT_SCENARIOS.split(',') {
            assert!(Scenario::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn the_abuse_section_survives_a_new_report() {
        let old = "# Performance\nold numbers\n\n## Abuse\n\nfigures\n";
        assert_eq!(
            keep_abuse_section("# Performance\nnew numbers\n".into(), old),
            "# Performance\nnew numbers\n\n## Abuse\n\nfigures\n"
        );
        assert_eq!(keep_abuse_section("x\n".into(), "no section"), "x\n");
    }

    #[test]
    fn relative_links() {
        assert_eq!(
            relative(
                Path::new("/a/docs"),
                Path::new("/a/bench/results/report.svg")
            ),
            "../bench/results/report.svg"
        );
        assert_eq!(relative(Path::new("/a"), Path::new("/a/x.svg")), "x.svg");
    }
}
