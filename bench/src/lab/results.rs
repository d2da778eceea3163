//! What the lab measured: per cell (scenario × system × run), and the
//! summary per scenario and system (median, min–max, ratio to
//! wireguard-go measured in the same run).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::procfs::Machine;
use super::system::System;
use crate::client;
use crate::stats;

/// One number the lab reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Metric {
    Tcp1Gbps,
    Tcp4Gbps,
    UdpGbps,
    UdpLossPercent,
    UdpJitterMs,
    RttIdleP50Ms,
    RttIdleP99Ms,
    RttIdleP999Ms,
    RttLoadedP50Ms,
    RttLoadedP99Ms,
    CpuSecondsPerGb,
    PeakRssMib,
    SetupMs,
    WanCpuSeconds,
}

impl Metric {
    pub(crate) const ALL: [Metric; 14] = [
        Metric::Tcp1Gbps,
        Metric::Tcp4Gbps,
        Metric::UdpGbps,
        Metric::UdpLossPercent,
        Metric::UdpJitterMs,
        Metric::RttIdleP50Ms,
        Metric::RttIdleP99Ms,
        Metric::RttIdleP999Ms,
        Metric::RttLoadedP50Ms,
        Metric::RttLoadedP99Ms,
        Metric::CpuSecondsPerGb,
        Metric::PeakRssMib,
        Metric::SetupMs,
        Metric::WanCpuSeconds,
    ];

    /// Column header in the Markdown tables.
    pub(crate) fn header(self) -> &'static str {
        match self {
            Metric::Tcp1Gbps => "TCP 1 stream Gbit/s",
            Metric::Tcp4Gbps => "TCP 4 streams Gbit/s",
            Metric::UdpGbps => "UDP Gbit/s",
            Metric::UdpLossPercent => "UDP loss %",
            Metric::UdpJitterMs => "UDP jitter ms",
            Metric::RttIdleP50Ms => "RTT p50 idle ms",
            Metric::RttIdleP99Ms => "RTT p99 idle ms",
            Metric::RttIdleP999Ms => "RTT p99.9 idle ms",
            Metric::RttLoadedP50Ms => "RTT p50 loaded ms",
            Metric::RttLoadedP99Ms => "RTT p99 loaded ms",
            Metric::CpuSecondsPerGb => "tunnel CPU-s per GB",
            Metric::PeakRssMib => "peak RSS MiB",
            Metric::SetupMs => "setup ms",
            Metric::WanCpuSeconds => "WAN emulator CPU-s",
        }
    }

    /// Whether the Markdown tables show it (JSON has every metric).
    pub(crate) fn in_table(self) -> bool {
        !matches!(self, Metric::UdpJitterMs | Metric::RttIdleP999Ms)
    }

    /// `v` with about three significant digits (no more than three
    /// after the point, none for large memory and setup times).
    pub(crate) fn format(self, v: f64) -> String {
        // Decide on the rounded value, so 0.99996 is "1.00", not "1.000".
        let a = (v.abs() * 1000.0).round() / 1000.0;
        let digits = match self {
            Metric::PeakRssMib | Metric::SetupMs if a >= 10.0 => 0,
            _ if a >= 100.0 => 0,
            _ if a >= 10.0 => 1,
            _ if a >= 1.0 => 2,
            _ => 3,
        };
        format!("{v:.digits$}")
    }
}

/// One metric of one cell.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MetricValue {
    Value(f64),
    /// Means nothing for this system or scenario (e.g. setup time of raw).
    NotApplicable,
    /// The test that gives it failed.
    Failed(String),
}

/// One cell: a system in a scenario, one run. `NotBuilt` (a system Causeway
/// did not have yet) is only in reports written before NAT traversal
/// existed; it stays so that `causeway-bench report` reads them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum Outcome {
    Measured(Box<Measured>),
    Skipped { reason: String },
    NotBuilt { reason: String },
    Failed { reason: String },
}

/// The numbers of a measured cell and what they came from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Measured {
    pub(crate) metrics: BTreeMap<Metric, MetricValue>,
    /// The client's report of each test.
    pub(crate) tests: BTreeMap<String, client::Report>,
    /// CPU-seconds of the tunnel processes of both sites during the TCP
    /// tests, and the payload bytes those tests delivered.
    pub(crate) tunnel_cpu_seconds: f64,
    pub(crate) tunnel_payload_bytes: u64,
    /// The WAN emulator over the whole cell after establishment.
    pub(crate) wan: WanRecord,
    /// The tunnel threads busy at least 5 % of a CPU during the TCP
    /// 1-stream test (wall time of the client run), busiest first: shows
    /// which thread a direction's throughput waits on.
    #[serde(default)]
    pub(crate) tcp1_busy_threads: Vec<super::procfs::ThreadLoad>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct WanRecord {
    pub(crate) cpu_seconds: f64,
    pub(crate) forwarded: u64,
    pub(crate) lost: u64,
    pub(crate) dropped: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct CellRecord {
    pub(crate) system: String,
    pub(crate) run: u32,
    /// Wall-clock seconds the cell took, lab build and teardown included.
    pub(crate) wall_seconds: f64,
    #[serde(flatten)]
    pub(crate) outcome: Outcome,
}

/// Everything a lab run produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Results {
    pub(crate) command: String,
    pub(crate) date: String,
    pub(crate) machine: Machine,
    pub(crate) runs: u32,
    pub(crate) seconds: f64,
    pub(crate) udp_bitrate: u64,
    pub(crate) mtu: u16,
    pub(crate) versions: BTreeMap<String, String>,
    /// Remarks on this particular report (added by hand, shown under the header).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) notes: Vec<String>,
    pub(crate) systems: Vec<SystemInfo>,
    pub(crate) scenarios: Vec<ScenarioResults>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SystemInfo {
    pub(crate) name: String,
    pub(crate) description: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ScenarioResults {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) delay_ms: f64,
    pub(crate) loss_percent: f64,
    pub(crate) cells: Vec<CellRecord>,
    pub(crate) summary: Vec<SystemSummary>,
}

/// One system in one scenario over all runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SystemSummary {
    pub(crate) system: String,
    /// `measured`, `skipped`, `not_built` or `failed` (every run failed).
    pub(crate) status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    pub(crate) metrics: BTreeMap<Metric, MetricSummary>,
}

/// A metric over the runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum MetricSummary {
    Value {
        median: f64,
        min: f64,
        max: f64,
        runs: usize,
        /// Runs in which this metric failed.
        failed_runs: usize,
        /// Median over runs of this run's value over wireguard-go's value in
        /// the same run; absent without a wireguard-go value.
        #[serde(skip_serializing_if = "Option::is_none")]
        ratio_to_wireguard_go: Option<f64>,
    },
    NotApplicable,
    Failed {
        reason: String,
    },
}

impl ScenarioResults {
    /// Computes the summary from the cells.
    pub(crate) fn summarize(&mut self, systems: &[System]) {
        let baseline: BTreeMap<u32, &Measured> = self
            .cells
            .iter()
            .filter(|c| c.system == System::WireguardGo.name())
            .filter_map(|c| match &c.outcome {
                Outcome::Measured(m) => Some((c.run, m.as_ref())),
                _ => None,
            })
            .collect();
        let mut summary = Vec::new();
        for system in systems {
            let cells: Vec<&CellRecord> = self
                .cells
                .iter()
                .filter(|c| c.system == system.name())
                .collect();
            let measured: Vec<(u32, &Measured)> = cells
                .iter()
                .filter_map(|c| match &c.outcome {
                    Outcome::Measured(m) => Some((c.run, m.as_ref())),
                    _ => None,
                })
                .collect();
            let (status, reason) = if !measured.is_empty() {
                ("measured", None)
            } else {
                match cells.first().map(|c| &c.outcome) {
                    Some(Outcome::Skipped { reason }) => ("skipped", Some(reason.clone())),
                    Some(Outcome::NotBuilt { reason }) => ("not_built", Some(reason.clone())),
                    Some(Outcome::Failed { reason }) => ("failed", Some(reason.clone())),
                    _ => ("failed", Some("no run".into())),
                }
            };
            let failed_cells = cells
                .iter()
                .filter(|c| matches!(c.outcome, Outcome::Failed { .. }))
                .count();
            let mut metrics = BTreeMap::new();
            if !measured.is_empty() {
                for metric in Metric::ALL {
                    metrics.insert(
                        metric,
                        summarize_metric(metric, &measured, failed_cells, &baseline),
                    );
                }
            }
            summary.push(SystemSummary {
                system: system.name().into(),
                status: status.into(),
                reason,
                metrics,
            });
        }
        self.summary = summary;
    }
}

fn summarize_metric(
    metric: Metric,
    measured: &[(u32, &Measured)],
    failed_cells: usize,
    baseline: &BTreeMap<u32, &Measured>,
) -> MetricSummary {
    let mut values = Vec::new();
    let mut ratios = Vec::new();
    let mut failures = Vec::new();
    let mut not_applicable = 0;
    for (run, m) in measured {
        match m.metrics.get(&metric) {
            Some(MetricValue::Value(v)) => {
                values.push(*v);
                let base = baseline
                    .get(run)
                    .and_then(|b| match b.metrics.get(&metric) {
                        Some(MetricValue::Value(b)) if *b != 0.0 => Some(*b),
                        _ => None,
                    });
                if let Some(b) = base {
                    ratios.push(v / b);
                }
            }
            Some(MetricValue::Failed(why)) => failures.push(why.clone()),
            Some(MetricValue::NotApplicable) | None => not_applicable += 1,
        }
    }
    match stats::median_min_max(&values) {
        Some((median, min, max)) => MetricSummary::Value {
            median,
            min,
            max,
            runs: values.len(),
            failed_runs: failures.len() + failed_cells,
            ratio_to_wireguard_go: stats::median_min_max(&ratios).map(|r| r.0),
        },
        None if not_applicable == measured.len() => MetricSummary::NotApplicable,
        None => MetricSummary::Failed {
            reason: failures
                .first()
                .cloned()
                .unwrap_or_else(|| "no value".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(system: System, run: u32, tcp1: Option<f64>) -> CellRecord {
        let mut m = Measured::default();
        m.metrics.insert(
            Metric::Tcp1Gbps,
            tcp1.map_or(MetricValue::Failed("boom".into()), MetricValue::Value),
        );
        m.metrics
            .insert(Metric::SetupMs, MetricValue::NotApplicable);
        CellRecord {
            system: system.name().into(),
            run,
            wall_seconds: 1.0,
            outcome: Outcome::Measured(Box::new(m)),
        }
    }

    #[test]
    fn ratios_pair_runs() {
        let mut s = ScenarioResults {
            name: "lan".into(),
            description: String::new(),
            delay_ms: 0.0,
            loss_percent: 0.0,
            cells: vec![
                cell(System::WireguardGo, 0, Some(1.0)),
                cell(System::Causeway, 0, Some(3.0)),
                cell(System::WireguardGo, 1, Some(2.0)),
                cell(System::Causeway, 1, Some(4.0)),
                cell(System::WireguardGo, 2, None),
                cell(System::Causeway, 2, Some(5.0)),
                CellRecord {
                    system: "boringtun-cli".into(),
                    run: 0,
                    wall_seconds: 0.0,
                    outcome: Outcome::Skipped {
                        reason: "missing".into(),
                    },
                },
            ],
            summary: Vec::new(),
        };
        s.summarize(&[System::Causeway, System::WireguardGo, System::BoringtunCli]);
        let cw = &s.summary[0].metrics[&Metric::Tcp1Gbps];
        assert_eq!(
            cw,
            &MetricSummary::Value {
                median: 4.0,
                min: 3.0,
                max: 5.0,
                runs: 3,
                failed_runs: 0,
                ratio_to_wireguard_go: Some(2.5)
            }
        );
        let wg = &s.summary[1].metrics[&Metric::Tcp1Gbps];
        assert!(matches!(
            wg,
            MetricSummary::Value {
                failed_runs: 1,
                runs: 2,
                ..
            }
        ));
        assert_eq!(
            s.summary[0].metrics[&Metric::SetupMs],
            MetricSummary::NotApplicable
        );
        assert_eq!(s.summary[2].status, "skipped");
        assert!(s.summary[2].metrics.is_empty());
    }
}
