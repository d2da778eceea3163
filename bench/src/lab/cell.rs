//! One cell: build the lab, start a system, time its establishment, run
//! the client tests between the two pods, read the tunnel processes' CPU and
//! memory, tear it all down.

use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use causeway_testbed::{ChildGuard, Lab, Netns};

use super::Scenario;
use super::procfs;
use super::results::{Measured, Metric, MetricValue, Outcome, WanRecord};
use super::system::{Readiness, System, Tools, Tunnel, real_cidr_b};
use crate::client;
use crate::interrupt;
use crate::proto::{DEFAULT_PORT, Datagram, DatagramKind};

/// How often the establishment probe is sent.
const PROBE_INTERVAL: Duration = Duration::from_micros(500);
/// UDP payload size: fits the 1420-byte tunnel MTU over IPv6 too.
pub(crate) const UDP_LEN: u32 = 1372;
/// Round-trip message size.
const RR_LEN: u32 = 64;

/// What every cell needs.
pub(crate) struct Ctx {
    /// This program (runs as client and server in the pods).
    pub(crate) exe: PathBuf,
    pub(crate) tools: Tools,
    pub(crate) seconds: f64,
    pub(crate) udp_bitrate: u64,
    /// CPUs the tunnel processes are restricted to once up (all if `None`).
    pub(crate) tunnel_cpus: Option<Vec<usize>>,
}

/// The client tests of a cell, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Test {
    RrIdle,
    Tcp1,
    Tcp4,
    Udp,
    RrLoaded,
}

impl Test {
    const ALL: [Test; 5] = [
        Test::RrIdle,
        Test::Tcp1,
        Test::Tcp4,
        Test::Udp,
        Test::RrLoaded,
    ];

    fn name(self) -> &'static str {
        match self {
            Test::RrIdle => "rr_idle",
            Test::Tcp1 => "tcp_1",
            Test::Tcp4 => "tcp_4",
            Test::Udp => "udp",
            Test::RrLoaded => "rr_loaded",
        }
    }

    fn args(self, ctx: &Ctx) -> Vec<String> {
        let v = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match self {
            Test::RrIdle => v(&["--rr", "--len", &RR_LEN.to_string()]),
            Test::Tcp1 => v(&["--tcp", "--streams", "1"]),
            Test::Tcp4 => v(&["--tcp", "--streams", "4"]),
            Test::Udp => v(&[
                "--udp",
                "--bitrate",
                &ctx.udp_bitrate.to_string(),
                "--len",
                &UDP_LEN.to_string(),
            ]),
            Test::RrLoaded => v(&["--rr", "--len", &RR_LEN.to_string(), "--load-streams", "1"]),
        }
    }

    /// The metrics this test gives.
    fn metrics(self) -> &'static [Metric] {
        match self {
            Test::RrIdle => &[
                Metric::RttIdleP50Ms,
                Metric::RttIdleP99Ms,
                Metric::RttIdleP999Ms,
            ],
            Test::Tcp1 => &[Metric::Tcp1Gbps],
            Test::Tcp4 => &[Metric::Tcp4Gbps],
            Test::Udp => &[Metric::UdpGbps, Metric::UdpLossPercent, Metric::UdpJitterMs],
            Test::RrLoaded => &[Metric::RttLoadedP50Ms, Metric::RttLoadedP99Ms],
        }
    }

    fn values(self, r: &client::Report) -> Vec<f64> {
        let lat = |f: fn(&client::Latency) -> f64| r.latency.as_ref().map_or(f64::NAN, f);
        let udp = |f: fn(&client::UdpReport) -> f64| r.udp.as_ref().map_or(f64::NAN, f);
        match self {
            Test::RrIdle => vec![lat(|l| l.p50_ms), lat(|l| l.p99_ms), lat(|l| l.p999_ms)],
            Test::Tcp1 | Test::Tcp4 => vec![r.bits_per_second / 1e9],
            Test::Udp => vec![
                r.bits_per_second / 1e9,
                udp(|u| u.loss_percent),
                udp(|u| u.jitter_ms),
            ],
            Test::RrLoaded => vec![lat(|l| l.p50_ms), lat(|l| l.p99_ms)],
        }
    }
}

/// Measures `system` in `scenario` once.
pub(crate) fn measure(ctx: &Ctx, scenario: &Scenario, system: System) -> Outcome {
    match system.readiness(&ctx.tools) {
        Readiness::Ready => {}
        Readiness::Skipped(reason) => return Outcome::Skipped { reason },
    }
    match try_measure(ctx, scenario, system) {
        Ok(m) => Outcome::Measured(Box::new(m)),
        Err(e) => Outcome::Failed {
            reason: format!("{e:#}"),
        },
    }
}

fn try_measure(ctx: &Ctx, scenario: &Scenario, system: System) -> anyhow::Result<Measured> {
    let dir = tempfile::Builder::new()
        .prefix("causeway-bench-")
        .tempdir()?;
    let lab =
        Lab::build(&system.lab_spec(scenario.wan)?).context("building the lab (are you root?)")?;
    let (site_a, site_b) = (&lab.sites()[0], &lab.sites()[1]);
    let (pod_a, pod_b) = (&site_a.pods[0], &site_b.pods[0]);
    let _server = start_server(&pod_b.ns, &ctx.exe)?;
    let target = system.target(&lab)?;
    let prepared = system.prepare(&ctx.tools, &lab, dir.path())?;
    interrupt::check()?;

    warm_up_underlay(&lab, scenario);
    // Establishment: both ends started → first probe answered.
    let wait = Duration::from_secs(10) + scenario.wan.delay * 8;
    let prober = Prober::start(&pod_a.ns, SocketAddr::new(target.into(), DEFAULT_PORT))?;
    let t0 = Instant::now();
    let started = prepared.start(&lab);
    let first = prober.wait(wait);
    let mut tunnel = started?;
    let Some(first) = first else {
        bail!(
            "no probe from site a's pod reached {target} and came back within {wait:?}{}",
            tunnel.log_tails()
        );
    };
    let setup_ms = first.saturating_duration_since(t0).as_secs_f64() * 1e3;
    // Punching a hole takes a few round trips, more when some are lost.
    let path_wait = Duration::from_secs(10) + scenario.wan.delay * 40;
    tunnel
        .settle(pod_b.addr, real_cidr_b(&lab)?, target, path_wait)
        .map_err(|e| anyhow::anyhow!("{e:#}{}", tunnel.log_tails()))?;

    if let Some(cpus) = &ctx.tunnel_cpus {
        for p in &tunnel.processes {
            procfs::pin_threads(p.pid(), cpus)?;
        }
    }

    let mut m = Measured::default();
    let na_unless = |cond: bool, v: f64| {
        if cond {
            MetricValue::Value(v)
        } else {
            MetricValue::NotApplicable
        }
    };
    m.metrics
        .insert(Metric::SetupMs, na_unless(system.is_tunnel(), setup_ms));
    let wan_before = (lab.wan_cpu_time(), lab.wan_stats());
    let client_timeout =
        Duration::from_secs_f64(ctx.seconds) + Duration::from_secs(30) + scenario.wan.delay * 20;
    let mut cpu_failed = None;
    for test in Test::ALL {
        interrupt::check()?;
        let cpu_before = tunnel_cpu(&tunnel);
        // Which threads carry one stream: read for that test only.
        let threads_before =
            (test == Test::Tcp1).then(|| (tunnel_threads(&tunnel), Instant::now()));
        let result = run_client(
            &pod_a.ns,
            &ctx.exe,
            target,
            &test.args(ctx),
            ctx.seconds,
            scenario,
            client_timeout,
        );
        let cpu_after = tunnel_cpu(&tunnel);
        if let Some((before, t)) = &threads_before {
            m.tcp1_busy_threads = busy_threads(before, &tunnel_threads(&tunnel), t.elapsed());
        }
        interrupt::check()?;
        match result {
            Ok(report) => {
                for (metric, value) in test.metrics().iter().zip(test.values(&report)) {
                    let v = if value.is_finite() {
                        MetricValue::Value(value)
                    } else {
                        MetricValue::Failed("missing in the client's report".into())
                    };
                    m.metrics.insert(*metric, v);
                }
                if matches!(test, Test::Tcp1 | Test::Tcp4) {
                    match (cpu_before, cpu_after) {
                        (Some(b), Some(a)) => {
                            m.tunnel_cpu_seconds += a - b;
                            m.tunnel_payload_bytes += report.bytes;
                        }
                        _ if system.is_tunnel() => {
                            cpu_failed = Some("a tunnel process exited during the test".to_owned())
                        }
                        _ => {}
                    }
                }
                m.tests.insert(test.name().into(), report);
            }
            Err(e) => {
                let why = format!("{e:#}{}", tunnel.log_tails());
                for metric in test.metrics() {
                    m.metrics.insert(*metric, MetricValue::Failed(why.clone()));
                }
                if matches!(test, Test::Tcp1 | Test::Tcp4) {
                    cpu_failed.get_or_insert(format!("{} failed", test.name()));
                }
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    // Numbers measured on another path than the system's are no numbers.
    tunnel
        .check_path_kept()
        .map_err(|e| anyhow::anyhow!("{e:#}{}", tunnel.log_tails()))?;
    let cpu_per_gb = match cpu_failed {
        Some(why) if system.is_tunnel() => MetricValue::Failed(why),
        _ if m.tunnel_payload_bytes == 0 => MetricValue::Failed("no payload measured".into()),
        _ => na_unless(
            system.is_tunnel(),
            m.tunnel_cpu_seconds / (m.tunnel_payload_bytes as f64 / 1e9),
        ),
    };
    m.metrics.insert(Metric::CpuSecondsPerGb, cpu_per_gb);
    let rss = tunnel
        .processes
        .iter()
        .filter_map(|p| procfs::peak_rss_kib(p.pid()))
        .max();
    m.metrics.insert(
        Metric::PeakRssMib,
        match rss {
            Some(kib) => MetricValue::Value(kib as f64 / 1024.0),
            None if system.is_tunnel() => MetricValue::Failed("tunnel processes gone".into()),
            None => MetricValue::NotApplicable,
        },
    );
    let (cpu, stats) = (lab.wan_cpu_time(), lab.wan_stats());
    m.wan = WanRecord {
        cpu_seconds: cpu.saturating_sub(wan_before.0).as_secs_f64(),
        forwarded: stats.forwarded - wan_before.1.forwarded,
        lost: stats.lost - wan_before.1.lost,
        dropped: stats.dropped - wan_before.1.dropped,
    };
    m.metrics.insert(
        Metric::WanCpuSeconds,
        na_unless(!scenario.wan.is_none(), m.wan.cpu_seconds),
    );
    drop(tunnel);
    drop(lab);
    Ok(m)
}

/// Pings between the gateways over the underlay, so that neighbour
/// resolution across an emulated WAN (one more round trip) is done before
/// the establishment clock starts, as it would be on a real link. Best
/// effort: a ping lost to emulated loss is retried, failures are ignored.
fn warm_up_underlay(lab: &Lab, scenario: &Scenario) {
    let sites = lab.sites();
    let timeout = Duration::from_millis(500) + scenario.wan.delay * 4;
    for (i, site) in sites.iter().enumerate() {
        let peer = sites[1 - i].public_addr;
        for _ in 0..3 {
            if matches!(site.gateway.ping(peer, timeout), Ok(Some(_))) {
                break;
            }
        }
    }
}

/// CPU-seconds of all tunnel processes; `None` if one is gone.
fn tunnel_cpu(tunnel: &Tunnel) -> Option<f64> {
    tunnel
        .processes
        .iter()
        .map(|p| procfs::cpu_seconds(p.pid()))
        .sum()
}

/// Each tunnel process's name in reports and its threads' CPU seconds.
type ThreadSnapshot = Vec<(String, Vec<procfs::ThreadCpu>)>;

/// Each tunnel process's name in reports (`a`, `b`, then by position) and
/// its threads' CPU seconds.
fn tunnel_threads(tunnel: &Tunnel) -> ThreadSnapshot {
    tunnel
        .processes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let name = ["a", "b"]
                .get(i)
                .map_or(format!("p{i}"), |n| (*n).to_owned());
            (name, procfs::thread_cpu_seconds(p.pid()))
        })
        .collect()
}

/// The tunnel threads busy at least 5 % of a CPU between two
/// [`tunnel_threads`] snapshots, busiest first.
fn busy_threads(
    before: &ThreadSnapshot,
    after: &ThreadSnapshot,
    elapsed: Duration,
) -> Vec<procfs::ThreadLoad> {
    let mut loads: Vec<procfs::ThreadLoad> = after
        .iter()
        .flat_map(|(name, threads)| {
            let start = before
                .iter()
                .find(|(n, _)| n == name)
                .map_or(&[][..], |(_, t)| t.as_slice());
            procfs::busy_threads(name, start, threads, elapsed.as_secs_f64(), 5.0)
        })
        .collect();
    loads.sort_by(|a, b| b.percent.total_cmp(&a.percent));
    loads
}

/// Starts `causeway-bench server` in `ns` and waits for it to listen.
fn start_server(ns: &Netns, exe: &Path) -> anyhow::Result<ChildGuard> {
    let mut cmd = ns.command(exe.to_str().context("the bench's path is not UTF-8")?);
    cmd.args(["server", "--port", &DEFAULT_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut server = ns.spawn(&mut cmd)?;
    let stdout = server.child().stdout.take().context("server stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    ensure!(
        line.starts_with("listening"),
        "causeway-bench server did not start in {}",
        ns.name()
    );
    Ok(server)
}

/// Runs `causeway-bench client` in `ns` against `target` and parses its
/// JSON report. Ctrl-C stops it.
fn run_client(
    ns: &Netns,
    exe: &Path,
    target: Ipv4Addr,
    args: &[String],
    seconds: f64,
    scenario: &Scenario,
    timeout: Duration,
) -> anyhow::Result<client::Report> {
    let mut cmd = ns.command(exe.to_str().context("the bench's path is not UTF-8")?);
    let connect = (Duration::from_secs(5) + scenario.wan.delay * 8).as_secs_f64();
    cmd.args([
        "client",
        &target.to_string(),
        "--time",
        &seconds.to_string(),
        "--connect-timeout",
        &connect.to_string(),
        "--json",
    ])
    .args(args)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut client = ns.spawn(&mut cmd)?;
    let read_all = |r: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read_all(client.child().stdout.take().map(|s| Box::new(s) as _));
    let err = read_all(client.child().stderr.take().map(|s| Box::new(s) as _));
    let start = Instant::now();
    let status = loop {
        interrupt::check()?;
        if let Some(status) = client.wait_timeout(Duration::from_millis(100))? {
            break status;
        }
        if start.elapsed() > timeout {
            bail!("the client did not finish within {timeout:?}");
        }
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    ensure!(
        status.success(),
        "client {}: {}",
        args.join(" "),
        err.trim()
    );
    serde_json::from_str(&out).with_context(|| format!("the client's JSON report: {out:?}"))
}

/// Sends a UDP probe every [`PROBE_INTERVAL`] from a pod until the bench
/// server answers one; keeps the time of the first answer.
struct Prober {
    thread: JoinHandle<Option<Instant>>,
    stop: Arc<AtomicBool>,
}

impl Prober {
    fn start(ns: &Netns, target: SocketAddr) -> anyhow::Result<Prober> {
        let socket = ns.try_enter(|| {
            UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = thread::spawn(move || probe(&socket, target, &thread_stop));
        Ok(Prober { thread, stop })
    }

    /// The instant of the first answer, or `None` after `timeout`.
    fn wait(self, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() && Instant::now() < deadline && !interrupt::interrupted() {
            thread::sleep(Duration::from_millis(1));
        }
        self.stop.store(true, Relaxed);
        self.thread.join().ok().flatten()
    }
}

fn probe(socket: &UdpSocket, target: SocketAddr, stop: &AtomicBool) -> Option<Instant> {
    let epoch = Instant::now();
    let mut out = [0u8; Datagram::LEN];
    let mut buf = [0u8; 256];
    let mut seq = 0u64;
    while !stop.load(Relaxed) {
        let sent_at = Instant::now();
        Datagram {
            kind: DatagramKind::Probe,
            id: 0,
            seq,
            sent_ns: crate::proto::nanos_since(epoch),
        }
        .write(&mut out);
        let _ = socket.send_to(&out, target);
        seq += 1;
        loop {
            let left = PROBE_INTERVAL.saturating_sub(sent_at.elapsed());
            if left.is_zero() {
                break;
            }
            let _ = socket.set_read_timeout(Some(left.max(Duration::from_micros(20))));
            match socket.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if Datagram::parse(&buf[..n])
                        .is_some_and(|d| d.kind == DatagramKind::ProbeReply)
                    {
                        return Some(Instant::now());
                    }
                }
                Err(_) => {
                    // Timeout, or an ICMP error about an earlier probe.
                    if sent_at.elapsed() >= PROBE_INTERVAL {
                        break;
                    }
                    thread::sleep(Duration::from_micros(20));
                }
            }
        }
    }
    None
}
