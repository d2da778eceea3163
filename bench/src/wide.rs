//! `causeway-bench wide`: one gateway with many peers.
//!
//! The lab has three sites on the internet router, no NATs, no WAN
//! emulation: site `a` runs the daemon under test; site `b` runs a second
//! real `causeway up`, peer #0 of `a`, so that iperf3 measures pod to pod
//! through the wide gateway exactly as with one peer; site `sims` runs
//! one `causeway-bench wide-sim` process holding the other N − 1 peers,
//! each a boringtun `Tunn` with its own key and its own UDP socket (a
//! static endpoint of its own), allowed CIDR `10.100.s.0/24` for
//! simulated peer `s`. All endpoints are static: the daemon sees N plain
//! WireGuard peers.
//!
//! One run, in a fresh lab torn down at its end (also on failure):
//!
//! 1. both daemons start; a ping from `a`'s pod to `b`'s pod sets up peer #0;
//! 2. every simulated peer sends a handshake initiation at once; the
//!    figure is from that moment until the last simulated peer received
//!    the daemon's handshake response (the worker's clock), and until
//!    `causeway status --json`, polled every 20 ms, showed a handshake
//!    with every peer; then `a`'s VmRSS;
//! 3. traffic to all: one echo request from `a`'s pod to `10.100.s.1` for
//!    every simulated peer (again every 500 ms to those that have not
//!    answered); how many answered, and how many peers decrypted traffic
//!    (the worker's own count);
//! 4. reload: under a ping train to `b`'s pod (every 20 ms), one simulated
//!    peer's CIDR moves to `10.101.s.0/24` in the file and the daemon gets
//!    SIGHUP; reports the train's losses and every other peer whose
//!    session restarted (its simulated peer received a handshake
//!    initiation, or its `last_handshake_unix` moved on by more than
//!    [`STAMP_SLACK`]), and whether the moved peer answers at its new
//!    address;
//! 5. the daemon initiates: `a`'s daemon is restarted, then one echo
//!    request to every peer at once (all N: each simulated peer and `b`'s
//!    pod, again every 500 ms to those that have not answered); the
//!    figures are from then until the last simulated peer received the
//!    daemon's initiation, and until the last peer answered (a handshake
//!    and a round trip later);
//! 6. throughput: iperf3, one TCP stream from `a`'s pod to `b`'s pod,
//!    with the N-peer daemon (every peer has a session), then with a
//!    1-peer daemon (same key, port and peer `b`, restarted in its place),
//!    `--pairs` times in turn, so that the machine's drift hits both
//!    alike; each pair gives a ratio. `a`'s VmRSS after the first run.
//!
//! With N = 1 only steps 1 and 6 apply (and 6 without the 1-peer
//! daemon). The sizes are interleaved run by run (1, 50, 100, … then
//! again).

mod sim;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use causeway_common::keys;
use causeway_testbed::{ChildGuard, Lab, LabSpec, Netns, SiteSpec};
use ipnet::Ipv4Net;
use serde::Serialize;
use serde_json::Value;
use x25519_dalek::PublicKey;

use crate::interrupt;
use crate::lab::daemon::{self, PeerConfig, SiteConfig, SiteDir};
use crate::lab::procfs;
use crate::mesh::{icmp_socket, send_echo};
use crate::stats::median_min_max;
pub(crate) use sim::worker;

/// Pods of the site under test, of peer #0, and of the simulated peers'
/// site (the lab gives it a pod; nothing uses it).
const A_PODS: &str = "10.1.0.0/16";
const B_PODS: &str = "10.2.0.0/16";
const SIMS_PODS: &str = "10.3.0.0/16";
/// Both daemons' WireGuard port.
const LISTEN_PORT: u16 = 51820;
/// Simulated peer `s` listens on this + `s`.
const SIM_BASE_PORT: u16 = 40000;
/// At most this many peers (simulated peer `s` gets `10.100.s.0/24`).
const MAX_PEERS: usize = 257;
/// How long handshakes, pings and a reload may take before a step gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The reload's ping train.
const TRAIN_INTERVAL: Duration = Duration::from_millis(20);
/// The train runs this long before the reload and after it took effect.
const TRAIN_MARGIN: Duration = Duration::from_secs(1);
/// `last_handshake_unix` is the wall clock now minus boringtun's time
/// since the handshake, and boringtun's clock only moves when its timers
/// run (every 100 ms in the daemon): the same handshake's stamp wanders
/// by up to that much from one status to the next (more when the machine
/// is busy). A stamp that moved on by more than this is a new handshake:
/// the sessions are older than that at the reload (the train alone runs
/// for [`TRAIN_MARGIN`] before it), so a session restarted by the reload
/// moves its stamp on by more.
const STAMP_SLACK: f64 = 1.0;

/// `causeway-bench wide` options.
pub(crate) struct Args {
    /// The causeway binary [default: next to this one].
    pub(crate) causeway: Option<PathBuf>,
    /// Numbers of peers, each measured `runs` times.
    pub(crate) peers: Vec<usize>,
    pub(crate) runs: u32,
    /// Seconds of each iperf3 test.
    pub(crate) seconds: f64,
    /// iperf3 runs with the N-peer daemon, each followed by one with a
    /// 1-peer daemon.
    pub(crate) pairs: u32,
    /// Keep every run's logs, not only those of failed runs.
    pub(crate) keep_logs: bool,
    pub(crate) json: bool,
}

/// One run of one number of peers.
#[derive(Debug, Default, Serialize)]
struct Run {
    peers: usize,
    /// Which round of the interleaved runs (0-based).
    round: u32,
    /// From spawning the daemon under test until its control socket answered, ms.
    daemon_ready_ms: u64,
    /// Peers with a completed handshake in the status after step 2 (all N expected).
    handshakes_completed: usize,
    /// From the simulated peers' initiations until the last of them had
    /// the daemon's response, ms (`None`: N = 1, or not all).
    sims_handshakes_ms: Option<u64>,
    /// From the initiations until a status showed a handshake with every
    /// peer, ms (polled every 20 ms: an upper bound).
    status_all_handshakes_ms: Option<u64>,
    /// Cookie replies the simulated peers received (the daemon under load).
    cookie_replies: u64,
    /// Handshake initiations the simulated peers sent, `initiate` and
    /// their timers' retries together.
    sim_initiations_sent: u64,
    rss_after_handshakes_kib: u64,
    /// Simulated peers that answered an echo request in step 3.
    traffic_answered: usize,
    /// Simulated peers that decrypted at least one packet by the end of step 3.
    traffic_decrypted: usize,
    /// Step 6: single-stream TCP to peer #0 with the N-peer daemon, and
    /// with the 1-peer daemon right after each (empty for N = 1), Gbit/s.
    tcp_gbps: Vec<f64>,
    tcp_1peer_gbps: Vec<f64>,
    /// Each N-peer figure over the 1-peer figure right after it.
    tcp_pair_ratios: Vec<f64>,
    /// The N-peer daemon's VmRSS after its first iperf3 run.
    rss_after_traffic_kib: u64,
    /// The daemons' CPU (user + system) per GB received during the iperf3
    /// runs, seconds: the N-peer daemon, and the 1-peer one.
    cpu_s_per_gb: f64,
    cpu_s_per_gb_1peer: Option<f64>,
    reload: Option<Reload>,
    /// Step 5: from the echo burst until the last simulated peer received
    /// the daemon's initiation, ms (`None`: N = 1, or not every one).
    daemon_initiations_ms: Option<u64>,
    /// From the burst until the last of the N peers answered, ms.
    daemon_initiated_answered_ms: Option<u64>,
    /// Peers (of N) that answered the burst, and that have a handshake in
    /// the restarted daemon's status.
    daemon_initiated_answered: Option<usize>,
    daemon_initiated_handshakes: Option<usize>,
    /// Cookie replies the simulated peers received in step 5 (the daemon
    /// under load answers their handshake responses with a cookie).
    daemon_initiated_cookie_replies: Option<u64>,
    /// CPU of the simulated peers' process over the run, seconds.
    sims_cpu_s: f64,
    logs: Option<PathBuf>,
}

/// Step 4.
#[derive(Debug, Serialize)]
struct Reload {
    /// The simulated peer whose CIDR moved.
    moved: String,
    /// From SIGHUP until the status showed the moved CIDR, ms.
    applied_ms: u64,
    train_sent: u64,
    train_lost: u64,
    /// Longest run of lost pings, ms (count × 20 ms).
    train_longest_gap_ms: u64,
    /// Peers other than the moved one whose session restarted, by name.
    other_sessions_restarted: Vec<String>,
    /// Whether the moved peer answered at its new CIDR.
    moved_answers: bool,
}

/// Medians over the runs of one number of peers.
#[derive(Debug, Serialize)]
struct Summary {
    peers: usize,
    runs: usize,
    runs_all_handshakes: usize,
    sims_handshakes_ms_median: Option<f64>,
    sims_handshakes_ms_min: Option<f64>,
    sims_handshakes_ms_max: Option<f64>,
    status_all_handshakes_ms_median: Option<f64>,
    daemon_initiations_ms_median: Option<f64>,
    daemon_initiations_ms_max: Option<f64>,
    daemon_initiated_answered_ms_median: Option<f64>,
    daemon_initiated_answered_ms_max: Option<f64>,
    daemon_initiated_answered_min: Option<usize>,
    daemon_initiated_cookie_replies_max: Option<u64>,
    cookie_replies_max: u64,
    traffic_answered_min: usize,
    traffic_decrypted_min: usize,
    rss_after_handshakes_mib_median: f64,
    rss_after_traffic_mib_median: f64,
    rss_after_traffic_mib_max: f64,
    tcp_gbps_median: f64,
    tcp_gbps_min: f64,
    tcp_gbps_max: f64,
    tcp_1peer_gbps_median: Option<f64>,
    /// Every pair's N-peer figure over its 1-peer figure.
    tcp_ratio_median: Option<f64>,
    tcp_ratio_min: Option<f64>,
    tcp_ratio_max: Option<f64>,
    reload_train_lost_max: Option<u64>,
    reload_other_sessions_restarted_max: Option<usize>,
    reload_moved_answers_all: Option<bool>,
    cpu_s_per_gb_median: f64,
    cpu_s_per_gb_1peer_median: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    date: String,
    machine: procfs::Machine,
    iperf_seconds: f64,
    iperf_pairs: u32,
    summaries: Vec<Summary>,
    runs: Vec<Run>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    interrupt::install();
    let bin = daemon::causeway_bin(args.causeway.clone())?;
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(
        args.seconds > 0.0 && args.seconds <= 60.0,
        "--seconds must be in (0, 60]"
    );
    ensure!(!args.peers.is_empty(), "--peers: give at least one number");
    ensure!(args.pairs >= 1, "--pairs must be at least 1");
    for &n in &args.peers {
        ensure!(
            (1..=MAX_PEERS).contains(&n),
            "--peers: {n} is not within 1..={MAX_PEERS}"
        );
    }
    let mut runs = Vec::new();
    for round in 0..args.runs {
        for &n in &args.peers {
            interrupt::check()?;
            if !args.json {
                eprintln!("wide: {n} peers, run {}/{}", round + 1, args.runs);
            }
            let run = one_run(&bin, n, round, &args)?;
            if !args.json {
                print_run(&run);
            }
            runs.push(run);
        }
    }
    let summaries = args.peers.iter().map(|&n| summarize(n, &runs)).collect();
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date: procfs::utc_now(),
        machine: procfs::Machine::this(),
        iperf_seconds: args.seconds,
        iperf_pairs: args.pairs,
        summaries,
        runs,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summaries(&report.summaries);
    }
    Ok(())
}

/// Simulated peer `s`'s CIDR; `moved`: where step 4 moves it.
fn sim_cidr(s: usize, moved: bool) -> anyhow::Result<Ipv4Net> {
    let third = u8::try_from(s).context("too many simulated peers")?;
    let second = if moved { 101 } else { 100 };
    Ok(Ipv4Net::new(Ipv4Addr::new(10, second, third, 0), 24)?)
}

/// The address step 3 pings inside simulated peer `s`'s CIDR.
fn sim_target(cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

fn sim_name(s: usize) -> String {
    format!("sim{s:03}")
}

/// A simulated peer as site `a` configures it.
struct SimPeerEntry {
    name: String,
    public_key: String,
    cidr: Ipv4Net,
    endpoint: SocketAddr,
}

/// Site `a`'s config (its files in `dir`): peer `b`, then the simulated peers.
fn a_config(
    dir: &Path,
    private_key_file: &Path,
    b_public: &str,
    b_endpoint: SocketAddr,
    sims: &[SimPeerEntry],
) -> String {
    let mut s = format!(
        "[site]\nname = \"a\"\nprivate_key_file = {private_key_file:?}\npod_cidrs = [\"{A_PODS}\"]\n\
         listen_port = {LISTEN_PORT}\ncontrol_socket = {:?}\nuapi_socket = {:?}\nstate_dir = {dir:?}\n",
        dir.join("control.sock"),
        dir.join("uapi.sock"),
    );
    s += &format!(
        "\n[[peer]]\nname = \"b\"\npublic_key = {b_public:?}\ncidrs = [\"{B_PODS}\"]\nendpoint = \"{b_endpoint}\"\n"
    );
    for p in sims {
        s += &format!(
            "\n[[peer]]\nname = {:?}\npublic_key = {:?}\ncidrs = [\"{}\"]\nendpoint = \"{}\"\n",
            p.name, p.public_key, p.cidr, p.endpoint
        );
    }
    s
}

/// `last_handshake_unix` of every peer of a status, by name.
fn handshakes(status: &Value) -> anyhow::Result<HashMap<String, Option<f64>>> {
    status["peers"]
        .as_array()
        .context("a status without peers")?
        .iter()
        .map(|p| {
            let name = p["name"].as_str().context("a peer without a name")?;
            Ok((name.to_owned(), p["last_handshake_unix"].as_f64()))
        })
        .collect()
}

/// The CIDRs peer `name` has in a status.
fn cidrs_of(status: &Value, name: &str) -> Vec<String> {
    status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["cidrs"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect()
}

/// How many of `names` have a handshake in `seen`.
fn with_handshake(seen: &HashMap<String, Option<f64>>, names: &[String]) -> usize {
    names
        .iter()
        .filter(|n| seen.get(*n).is_some_and(Option::is_some))
        .count()
}

/// Polls `a`'s status every 20 ms until every peer in `names` has a
/// handshake, or `within` has passed; how many have one, and when all did
/// (from the call).
fn wait_handshakes(
    bin: &Path,
    dir: &SiteDir,
    names: &[String],
    within: Duration,
) -> anyhow::Result<(usize, Option<u64>)> {
    let start = Instant::now();
    loop {
        interrupt::check()?;
        let seen = handshakes(&daemon::status(bin, &dir.control_socket())?)?;
        let got = with_handshake(&seen, names);
        if got == names.len() {
            return Ok((got, Some(start.elapsed().as_millis() as u64)));
        }
        if start.elapsed() >= within {
            return Ok((got, None));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The latest of `times` once every one is there.
fn last_of(times: impl IntoIterator<Item = Option<u64>>) -> Option<u64> {
    times
        .into_iter()
        .try_fold(None, |max: Option<u64>, t| {
            t.map(|t| Some(max.map_or(t, |m| m.max(t))))
        })
        .flatten()
}

/// The `wide-sim` worker, talked to over its stdin and stdout.
struct Sims {
    process: ChildGuard,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Sims {
    fn start(gateway: &Netns, config: &Path, log: &Path) -> anyhow::Result<Sims> {
        let exe = std::env::current_exe()?;
        let mut cmd = gateway.command(daemon::path_str(&exe)?);
        cmd.arg("wide-sim")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?);
        let mut process = gateway.spawn(&mut cmd)?;
        let stdin = process.child().stdin.take().context("wide-sim stdin")?;
        let stdout = BufReader::new(process.child().stdout.take().context("wide-sim stdout")?);
        let mut sims = Sims {
            process,
            stdin,
            stdout,
        };
        let line = sims.line()?;
        ensure!(line == "ready", "wide-sim said {line:?}, not ready");
        Ok(sims)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line)?;
        ensure!(n > 0, "wide-sim exited (see its log)");
        Ok(line.trim().to_owned())
    }

    fn command(&mut self, command: &str) -> anyhow::Result<String> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        self.line()
    }

    fn report(&mut self) -> anyhow::Result<Vec<sim::SimCounters>> {
        let line = self.command("report")?;
        serde_json::from_str(&line).with_context(|| format!("wide-sim report {line:?}"))
    }
}

fn one_run(bin: &Path, n: usize, round: u32, args: &Args) -> anyhow::Result<Run> {
    let spec = vec![
        SiteSpec::new("a", vec![A_PODS.parse()?]),
        SiteSpec::new("b", vec![B_PODS.parse()?]),
        SiteSpec::new("sims", vec![SIMS_PODS.parse()?]),
    ];
    let lab = Lab::build(&LabSpec { sites: spec }).context("building the lab (are you root?)")?;
    let tmp = tempfile::Builder::new()
        .prefix("causeway-wide-")
        .tempdir()?;
    let measured = measure(bin, &lab, tmp.path(), n, round, args);
    let failed = measured.is_err();
    let logs = if failed || args.keep_logs {
        let kept = tmp.keep();
        eprintln!("wide: logs kept in {}", kept.display());
        Some(kept)
    } else {
        None
    };
    drop(lab);
    let mut run = measured?;
    run.logs = logs;
    Ok(run)
}

/// Everything of one run but the lab; every process it starts is stopped
/// when it returns (the guards), before the lab goes.
fn measure(
    bin: &Path,
    lab: &Lab,
    tmp: &Path,
    n: usize,
    round: u32,
    args: &Args,
) -> anyhow::Result<Run> {
    let (site_a, site_b, site_s) = (lab.site("a"), lab.site("b"), lab.site("sims"));
    let endpoint = |ip: std::net::IpAddr, port: u16| SocketAddr::new(ip, port);
    let (a_key, b_key) = (keys::generate(), keys::generate());
    let a_public = keys::encode_public(&PublicKey::from(&a_key));
    let b_public = keys::encode_public(&PublicKey::from(&b_key));
    let sim_keys: Vec<_> = (1..n).map(|_| keys::generate()).collect();
    let mut sims_cfg: Vec<SimPeerEntry> = sim_keys
        .iter()
        .enumerate()
        .map(|(s, k)| {
            Ok(SimPeerEntry {
                name: sim_name(s),
                public_key: keys::encode_public(&PublicKey::from(k)),
                cidr: sim_cidr(s, false)?,
                endpoint: endpoint(site_s.wan_addr, SIM_BASE_PORT + s as u16),
            })
        })
        .collect::<anyhow::Result<_>>()?;

    // Site b: one peer, a.
    let b_dir = SiteDir::create(tmp.join("b"))?;
    SiteConfig {
        site: "b",
        private_key: &keys::encode_private(&b_key),
        pod_cidrs: &[B_PODS.parse()?],
        listen_port: Some(LISTEN_PORT),
        mtu: None,
        remap_pool: None,
        peer: PeerConfig {
            name: "a",
            public_key: &a_public,
            cidrs: &[A_PODS.parse()?],
            endpoint: Some(endpoint(site_a.wan_addr, LISTEN_PORT)),
        },
        rendezvous: None,
    }
    .write(&b_dir)?;
    // Site a: b and the simulated peers.
    let a_path = tmp.join("a");
    let a_dir = SiteDir::create(a_path.clone())?;
    let a_key_file = a_path.join("private.key");
    daemon::write_private_key(&a_key_file, &keys::encode_private(&a_key))?;
    let b_endpoint = endpoint(site_b.wan_addr, LISTEN_PORT);
    std::fs::write(
        a_dir.config(),
        a_config(&a_path, &a_key_file, &b_public, b_endpoint, &sims_cfg),
    )?;

    let mut sims = if n > 1 {
        let config = sim::SimConfig {
            daemon_public_key: a_public.clone(),
            daemon_endpoint: endpoint(site_a.wan_addr, LISTEN_PORT),
            bind: match site_s.wan_addr {
                std::net::IpAddr::V4(v4) => v4,
                std::net::IpAddr::V6(_) => bail!("the sims' gateway has no IPv4 address"),
            },
            peers: sim_keys
                .iter()
                .enumerate()
                .map(|(s, k)| sim::SimPeer {
                    private_key: keys::encode_private(k),
                    port: SIM_BASE_PORT + s as u16,
                })
                .collect(),
        };
        let path = tmp.join("sims.json");
        std::fs::write(&path, serde_json::to_string(&config)?)?;
        Some(Sims::start(&site_s.gateway, &path, &tmp.join("sims.log"))?)
    } else {
        None
    };

    // 1. Both daemons; peer #0 set up by a ping.
    let mut b = daemon::spawn_daemon(bin, &site_b.gateway, &b_dir, "info")?;
    daemon::wait_ready(bin, &b_dir.control_socket(), &mut b).context("site b's daemon")?;
    let spawned = Instant::now();
    let mut a = daemon::spawn_daemon(bin, &site_a.gateway, &a_dir, "info")?;
    daemon::wait_ready(bin, &a_dir.control_socket(), &mut a).context("site a's daemon")?;
    let daemon_ready_ms = spawned.elapsed().as_millis() as u64;
    let (pod_a, pod_b) = (&site_a.pods[0], &site_b.pods[0]);
    let first = ping_all(&pod_a.ns, &[pod_b.addr], STEP_TIMEOUT)?;
    ensure!(first[0].is_some(), "b's pod never answered a's pod");

    // 2. The simulated peers initiate, all at once.
    let mut names: Vec<String> = vec!["b".to_owned()];
    names.extend(sims_cfg.iter().map(|p| p.name.clone()));
    let mut run = Run {
        peers: n,
        round,
        daemon_ready_ms,
        handshakes_completed: 1,
        ..Default::default()
    };
    if let Some(sims) = &mut sims {
        let ok = sims.command("initiate")?;
        ensure!(ok == "ok", "wide-sim said {ok:?} to initiate");
        let (done, all) = wait_handshakes(bin, &a_dir, &names, STEP_TIMEOUT)?;
        run.handshakes_completed = done;
        run.status_all_handshakes_ms = all;
        let counters = sims.report()?;
        run.sims_handshakes_ms = last_of(counters.iter().map(|c| c.response_ms));
        run.cookie_replies = counters.iter().map(|c| c.cookies_rx).sum();
        run.sim_initiations_sent = counters.iter().map(|c| c.initiations_tx).sum();
    }
    run.rss_after_handshakes_kib = procfs::rss_kib(a.pid()).context("a's VmRSS")?;

    // 3. Traffic to all of them.
    if let Some(sims) = &mut sims {
        let targets: Vec<Ipv4Addr> = sims_cfg.iter().map(|p| sim_target(p.cidr)).collect();
        let answers = ping_all(&pod_a.ns, &targets, STEP_TIMEOUT)?;
        run.traffic_answered = answers.iter().flatten().count();
        run.traffic_decrypted = sims.report()?.iter().filter(|c| c.decrypted > 0).count();
    }

    if let Some(sims) = &mut sims {
        // 4. Reload one simulated peer under a ping train to peer #0.
        let moved = sims_cfg.len() / 2;
        run.reload = Some(reload(
            bin,
            &a_dir,
            &mut a,
            sims,
            &mut sims_cfg,
            moved,
            (&pod_a.ns, pod_b.addr),
            |cfg| a_config(&a_path, &a_key_file, &b_public, b_endpoint, cfg),
        )?);

        // 5. The daemon initiates, after a restart.
        a.stop(Duration::from_secs(5))?;
        a = daemon::spawn_daemon(bin, &site_a.gateway, &a_dir, "info")?;
        daemon::wait_ready(bin, &a_dir.control_socket(), &mut a)
            .context("site a's daemon, restarted")?;
        let mut targets = vec![pod_b.addr];
        targets.extend(sims_cfg.iter().map(|p| sim_target(p.cidr)));
        let cookies = |c: &[sim::SimCounters]| c.iter().map(|c| c.cookies_rx).sum::<u64>();
        let cookies_before = cookies(&sims.report()?);
        let ok = sims.command("mark")?;
        ensure!(ok == "ok", "wide-sim said {ok:?} to mark");
        let answers = ping_all(&pod_a.ns, &targets, STEP_TIMEOUT)?;
        run.daemon_initiated_answered = Some(answers.iter().flatten().count());
        run.daemon_initiated_answered_ms =
            last_of(answers.iter().map(|a| a.map(|d| d.as_millis() as u64)));
        let counters = sims.report()?;
        run.daemon_initiations_ms = last_of(counters.iter().map(|c| c.initiation_ms));
        run.daemon_initiated_cookie_replies = Some(cookies(&counters) - cookies_before);
        let (done, _) = wait_handshakes(bin, &a_dir, &names, Duration::ZERO)?;
        run.daemon_initiated_handshakes = Some(done);
        run.sims_cpu_s = procfs::cpu_seconds(sims.process.pid()).unwrap_or(0.0);
    }

    // 6. Single-stream TCP to peer #0: the N-peer daemon (every peer has
    //    a session), then a 1-peer daemon with the same key, port and
    //    peer b, taking turns in the same lab so that the machine's drift
    //    hits both alike.
    let a1_path = tmp.join("a1");
    let a1_dir = SiteDir::create(a1_path.clone())?;
    std::fs::write(
        a1_dir.config(),
        a_config(&a1_path, &a_key_file, &b_public, b_endpoint, &[]),
    )?;
    let mut bytes = [0.0f64; 2];
    let mut cpu = [0.0f64; 2];
    let mut tcp = |daemon: &ChildGuard, which: usize| -> anyhow::Result<f64> {
        let cpu0 = procfs::cpu_seconds(daemon.pid()).unwrap_or(0.0);
        let gbps = iperf3(&pod_b.ns, pod_b.addr, &pod_a.ns, args.seconds)?;
        cpu[which] += procfs::cpu_seconds(daemon.pid()).unwrap_or(cpu0) - cpu0;
        bytes[which] += gbps * args.seconds / 8.0;
        Ok(gbps)
    };
    for pair in 0..args.pairs {
        run.tcp_gbps.push(tcp(&a, 0)?);
        if pair == 0 {
            run.rss_after_traffic_kib = procfs::rss_kib(a.pid()).context("a's VmRSS")?;
        }
        if n == 1 {
            continue;
        }
        a.stop(Duration::from_secs(5))?;
        let mut one = daemon::spawn_daemon(bin, &site_a.gateway, &a1_dir, "info")?;
        daemon::wait_ready(bin, &a1_dir.control_socket(), &mut one)
            .context("site a's 1-peer daemon")?;
        let gbps = tcp(&one, 1)?;
        one.stop(Duration::from_secs(5))?;
        run.tcp_1peer_gbps.push(gbps);
        if let Some(&with_n) = run.tcp_gbps.last()
            && gbps > 0.0
        {
            run.tcp_pair_ratios.push(with_n / gbps);
        }
        if pair + 1 < args.pairs {
            a = daemon::spawn_daemon(bin, &site_a.gateway, &a_dir, "info")?;
            daemon::wait_ready(bin, &a_dir.control_socket(), &mut a)
                .context("site a's daemon, restarted")?;
        }
    }
    let per_gb = |which: usize| (bytes[which] > 0.0).then(|| cpu[which] / bytes[which]);
    run.cpu_s_per_gb = per_gb(0).unwrap_or(0.0);
    run.cpu_s_per_gb_1peer = per_gb(1);
    Ok(run)
}

/// Step 4: moves simulated peer `moved` to its other CIDR in `a`'s file
/// (`config` writes it), sends SIGHUP, waits until the status shows it,
/// all under a ping train from `train.0` to `train.1`.
#[allow(clippy::too_many_arguments)]
fn reload(
    bin: &Path,
    dir: &SiteDir,
    a: &mut ChildGuard,
    sims: &mut Sims,
    cfg: &mut [SimPeerEntry],
    moved: usize,
    train: (&Netns, Ipv4Addr),
    config: impl Fn(&[SimPeerEntry]) -> String,
) -> anyhow::Result<Reload> {
    let before = handshakes(&daemon::status(bin, &dir.control_socket())?)?;
    let counters_before = sims.report()?;
    let pinger = Train::start(train.0, train.1)?;
    thread::sleep(TRAIN_MARGIN);
    cfg[moved].cidr = sim_cidr(moved, true)?;
    let new_cidr = cfg[moved].cidr.to_string();
    std::fs::write(dir.config(), config(cfg))?;
    let sighup = Instant::now();
    a.signal(libc::SIGHUP)?;
    let applied = loop {
        interrupt::check()?;
        let status = daemon::status(bin, &dir.control_socket())?;
        if cidrs_of(&status, &cfg[moved].name) == [new_cidr.clone()] {
            break sighup.elapsed();
        }
        ensure!(
            sighup.elapsed() < STEP_TIMEOUT,
            "the reload did not move {} to {new_cidr}",
            cfg[moved].name
        );
        thread::sleep(Duration::from_millis(10));
    };
    // The file watcher (every 2 s) may see the same change once more.
    thread::sleep(TRAIN_MARGIN.max(Duration::from_millis(2100)));
    let (sent, lost, longest) = pinger.stop()?;
    let after = handshakes(&daemon::status(bin, &dir.control_socket())?)?;
    let counters_after = sims.report()?;
    let mut restarted: Vec<String> = before
        .iter()
        .filter(|(name, t)| {
            **name != cfg[moved].name && new_handshake(**t, after.get(*name).copied().flatten())
        })
        .map(|(name, _)| name.clone())
        .collect();
    for (s, (b, a)) in counters_before.iter().zip(&counters_after).enumerate() {
        if s != moved && a.initiations_rx > b.initiations_rx && !restarted.contains(&cfg[s].name) {
            restarted.push(cfg[s].name.clone());
        }
    }
    restarted.sort();
    let moved_answers = ping_all(
        train.0,
        &[sim_target(cfg[moved].cidr)],
        Duration::from_secs(10),
    )?[0]
        .is_some();
    Ok(Reload {
        moved: cfg[moved].name.clone(),
        applied_ms: applied.as_millis() as u64,
        train_sent: sent,
        train_lost: lost,
        train_longest_gap_ms: longest * TRAIN_INTERVAL.as_millis() as u64,
        other_sessions_restarted: restarted,
        moved_answers,
    })
}

/// Whether a peer's `last_handshake_unix` went from `before` to a new
/// handshake at `after`.
fn new_handshake(before: Option<f64>, after: Option<f64>) -> bool {
    match (before, after) {
        (Some(b), Some(a)) => a > b + STAMP_SLACK,
        (None, Some(_)) => true,
        // None after: the session is gone.
        (_, None) => before.is_some(),
    }
}

/// Sends one echo request from `ns` to every target at once, again every
/// 500 ms to those that have not answered, until all have or `within`
/// passed; when each first answered, from the first send.
fn ping_all(
    ns: &Netns,
    targets: &[Ipv4Addr],
    within: Duration,
) -> anyhow::Result<Vec<Option<Duration>>> {
    let socket: OwnedFd = ns.try_enter(icmp_socket)??;
    let index: HashMap<Ipv4Addr, usize> =
        targets.iter().enumerate().map(|(i, a)| (*a, i)).collect();
    let mut answers = vec![None; targets.len()];
    let start = Instant::now();
    let mut pending = targets.len();
    let mut seq: u16 = 0;
    while pending > 0 && start.elapsed() < within {
        interrupt::check()?;
        seq = seq.wrapping_add(1);
        for (i, &t) in targets.iter().enumerate() {
            if answers[i].is_none() {
                let _ = send_echo(&socket, t, seq);
            }
        }
        let next = Instant::now() + Duration::from_millis(500);
        while pending > 0 && Instant::now() < next {
            if !poll_in(&socket, next) {
                continue;
            }
            while let Some((from, _)) = recv_echo(&socket) {
                if let Some(&i) = index.get(&from)
                    && answers[i].is_none()
                {
                    answers[i] = Some(start.elapsed());
                    pending -= 1;
                }
            }
        }
    }
    Ok(answers)
}

/// Waits until `socket` is readable or `until`; whether it is.
fn poll_in(socket: &OwnedFd, until: Instant) -> bool {
    let left = until.saturating_duration_since(Instant::now());
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = left.as_millis().clamp(1, 1000) as i32;
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut fd, 1, ms) > 0 }
}

/// The source and sequence number of the next echo reply waiting on
/// `socket`; `None` when nothing is left.
fn recv_echo(socket: &OwnedFd) -> Option<(Ipv4Addr, u16)> {
    let mut buf = [0u8; 1500];
    for _ in 0..4096 {
        // SAFETY: sockaddr_in is plain data; all zeroes is valid.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: valid buffers of the lengths given.
        let got = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&raw mut addr).cast(),
                &mut len,
            )
        };
        if got < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
                return None;
            }
            continue;
        }
        if got >= 8 && buf[0] == 0 {
            let from = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            return Some((from, u16::from_be_bytes([buf[6], buf[7]])));
        }
    }
    None
}

/// A ping train every [`TRAIN_INTERVAL`] on a thread of its own.
struct Train {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<anyhow::Result<(u64, u64, u64)>>,
}

impl Train {
    fn start(ns: &Netns, dst: Ipv4Addr) -> anyhow::Result<Train> {
        let socket: OwnedFd = ns.try_enter(icmp_socket)??;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut replied: Vec<bool> = Vec::new();
            let mut next = Instant::now();
            let mut stopped_at = None;
            loop {
                if flag.load(Ordering::Relaxed) && stopped_at.is_none() {
                    stopped_at = Some(Instant::now());
                }
                // After the last send, a second for late replies.
                if stopped_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(1)) {
                    break;
                }
                if stopped_at.is_none() && Instant::now() >= next {
                    let seq = replied.len() as u16;
                    let _ = send_echo(&socket, dst, seq);
                    replied.push(false);
                    next += TRAIN_INTERVAL;
                }
                let until = if stopped_at.is_some() {
                    Instant::now() + Duration::from_millis(50)
                } else {
                    next
                };
                if poll_in(&socket, until) {
                    while let Some((from, seq)) = recv_echo(&socket) {
                        // Sequence numbers wrap after 65536 pings (22 min).
                        if from == dst
                            && let Some(r) = replied.get_mut(usize::from(seq))
                        {
                            *r = true;
                        }
                    }
                }
            }
            Ok(train_losses(&replied))
        });
        Ok(Train { stop, thread })
    }

    /// Stops sending, waits a second for late replies; (sent, lost,
    /// longest run of lost).
    fn stop(self) -> anyhow::Result<(u64, u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the ping train panicked"))?
    }
}

/// (sent, lost, longest run of lost) of a train's replies.
fn train_losses(replied: &[bool]) -> (u64, u64, u64) {
    let lost = replied.iter().filter(|r| !**r).count() as u64;
    let mut longest = 0u64;
    let mut run = 0u64;
    for r in replied {
        run = if *r { 0 } else { run + 1 };
        longest = longest.max(run);
    }
    (replied.len() as u64, lost, longest)
}

/// One TCP stream for `seconds`, iperf3 from `client` to a server started
/// in `server` at `addr`; Gbit/s received.
fn iperf3(server: &Netns, addr: Ipv4Addr, client: &Netns, seconds: f64) -> anyhow::Result<f64> {
    let _server = server.spawn(
        server
            .command("iperf3")
            .args(["-s", "-1", "-B", &addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        interrupt::check()?;
        let out = client
            .command("iperf3")
            .args([
                "-c",
                &addr.to_string(),
                "-t",
                &seconds.to_string(),
                "--json",
            ])
            .output()
            .context("running iperf3 (apt-get install iperf3)")?;
        let report: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        let bps = report
            .as_ref()
            .and_then(|r| r["end"]["sum_received"]["bits_per_second"].as_f64());
        if let Some(bps) = bps
            && out.status.success()
        {
            return Ok(bps / 1e9);
        }
        // The server may not listen yet (iperf3 says so in "error").
        ensure!(
            Instant::now() < deadline,
            "iperf3 failed: {} {}",
            report.as_ref().map_or(Value::Null, |r| r["error"].clone()),
            String::from_utf8_lossy(&out.stderr)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn summarize(n: usize, runs: &[Run]) -> Summary {
    let of: Vec<&Run> = runs.iter().filter(|r| r.peers == n).collect();
    let mmm = |xs: Vec<f64>| median_min_max(&xs);
    let hs = mmm(of
        .iter()
        .filter_map(|r| r.sims_handshakes_ms.map(|v| v as f64))
        .collect());
    let opt_ms = |g: &dyn Fn(&Run) -> Option<u64>| {
        mmm(of.iter().filter_map(|r| g(r).map(|v| v as f64)).collect())
    };
    let seen = opt_ms(&|r| r.status_all_handshakes_ms);
    let di = opt_ms(&|r| r.daemon_initiations_ms);
    let da = opt_ms(&|r| r.daemon_initiated_answered_ms);
    let mib = |k: u64| k as f64 / 1024.0;
    let rss_h = mmm(of.iter().map(|r| mib(r.rss_after_handshakes_kib)).collect());
    let rss_t = mmm(of.iter().map(|r| mib(r.rss_after_traffic_kib)).collect());
    let all = |g: &dyn Fn(&Run) -> &Vec<f64>| -> Vec<f64> {
        of.iter().flat_map(|r| g(r).iter().copied()).collect()
    };
    let tcp = mmm(all(&|r| &r.tcp_gbps));
    let tcp1 = mmm(all(&|r| &r.tcp_1peer_gbps));
    let ratio = mmm(all(&|r| &r.tcp_pair_ratios));
    let reloads: Vec<&Reload> = of.iter().filter_map(|r| r.reload.as_ref()).collect();
    let all_hs = of
        .iter()
        .filter(|r| r.handshakes_completed == n && (n == 1 || r.sims_handshakes_ms.is_some()))
        .count();
    Summary {
        peers: n,
        runs: of.len(),
        runs_all_handshakes: all_hs,
        sims_handshakes_ms_median: hs.map(|v| v.0),
        sims_handshakes_ms_min: hs.map(|v| v.1),
        sims_handshakes_ms_max: hs.map(|v| v.2),
        status_all_handshakes_ms_median: seen.map(|v| v.0),
        daemon_initiations_ms_median: di.map(|v| v.0),
        daemon_initiations_ms_max: di.map(|v| v.2),
        daemon_initiated_answered_ms_median: da.map(|v| v.0),
        daemon_initiated_answered_ms_max: da.map(|v| v.2),
        daemon_initiated_answered_min: of.iter().filter_map(|r| r.daemon_initiated_answered).min(),
        daemon_initiated_cookie_replies_max: of
            .iter()
            .filter_map(|r| r.daemon_initiated_cookie_replies)
            .max(),
        cookie_replies_max: of.iter().map(|r| r.cookie_replies).max().unwrap_or(0),
        traffic_answered_min: of.iter().map(|r| r.traffic_answered).min().unwrap_or(0),
        traffic_decrypted_min: of.iter().map(|r| r.traffic_decrypted).min().unwrap_or(0),
        rss_after_handshakes_mib_median: rss_h.map_or(0.0, |v| v.0),
        rss_after_traffic_mib_median: rss_t.map_or(0.0, |v| v.0),
        rss_after_traffic_mib_max: rss_t.map_or(0.0, |v| v.2),
        tcp_gbps_median: tcp.map_or(0.0, |v| v.0),
        tcp_gbps_min: tcp.map_or(0.0, |v| v.1),
        tcp_gbps_max: tcp.map_or(0.0, |v| v.2),
        tcp_1peer_gbps_median: tcp1.map(|v| v.0),
        tcp_ratio_median: ratio.map(|v| v.0),
        tcp_ratio_min: ratio.map(|v| v.1),
        tcp_ratio_max: ratio.map(|v| v.2),
        reload_train_lost_max: reloads.iter().map(|r| r.train_lost).max(),
        reload_other_sessions_restarted_max: reloads
            .iter()
            .map(|r| r.other_sessions_restarted.len())
            .max(),
        reload_moved_answers_all: (!reloads.is_empty())
            .then(|| reloads.iter().all(|r| r.moved_answers)),
        cpu_s_per_gb_median: mmm(of.iter().map(|r| r.cpu_s_per_gb).collect()).map_or(0.0, |v| v.0),
        cpu_s_per_gb_1peer_median: mmm(of.iter().filter_map(|r| r.cpu_s_per_gb_1peer).collect())
            .map(|v| v.0),
    }
}

fn print_run(r: &Run) {
    println!(
        "  {} peers (round {}): ready {} ms; handshakes {}/{} (sims' initiations to the last: {:?} ms, {} cookie replies); \
         traffic to all: {}/{} answered, {} decrypted; RSS {:.1} / {:.1} MiB; tcp {:.2?} Gbit/s, 1 peer {:.2?}; \
         reload {:?}; daemon-initiated: last initiation received at {:?} ms, {:?}/{} answered (last at {:?} ms), {:?} handshakes",
        r.peers,
        r.round,
        r.daemon_ready_ms,
        r.handshakes_completed,
        r.peers,
        r.sims_handshakes_ms,
        r.cookie_replies,
        r.traffic_answered,
        r.peers - 1,
        r.traffic_decrypted,
        r.rss_after_handshakes_kib as f64 / 1024.0,
        r.rss_after_traffic_kib as f64 / 1024.0,
        r.tcp_gbps,
        r.tcp_1peer_gbps,
        r.reload,
        r.daemon_initiations_ms,
        r.daemon_initiated_answered,
        r.peers,
        r.daemon_initiated_answered_ms,
        r.daemon_initiated_handshakes,
    );
}

fn print_summaries(summaries: &[Summary]) {
    println!(
        "| peers | all handshakes, ms (sims initiate; median, min–max) | daemon initiates: all answered, ms | traffic answered (min) | RSS after handshakes / traffic, MiB | TCP Gbit/s (median, min–max) | ratio to 1 peer | reload: train lost, sessions restarted |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let opt = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| format!("{v:.0}"));
    for s in summaries {
        println!(
            "| {} | {} ({}–{}; {}/{} runs) | {} | {} | {:.1} / {:.1} | {:.2} ({:.2}–{:.2}) | {} | {:?}, {:?} |",
            s.peers,
            opt(s.sims_handshakes_ms_median),
            opt(s.sims_handshakes_ms_min),
            opt(s.sims_handshakes_ms_max),
            s.runs_all_handshakes,
            s.runs,
            opt(s.daemon_initiated_answered_ms_median),
            s.traffic_answered_min,
            s.rss_after_handshakes_mib_median,
            s.rss_after_traffic_mib_median,
            s.tcp_gbps_median,
            s.tcp_gbps_min,
            s.tcp_gbps_max,
            s.tcp_ratio_median
                .map_or_else(|| "—".to_owned(), |v| format!("{v:.3}")),
            s.reload_train_lost_max,
            s.reload_other_sessions_restarted_max,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_testbed::IpNet;

    fn entries(n: usize) -> Vec<SimPeerEntry> {
        (0..n)
            .map(|s| SimPeerEntry {
                name: sim_name(s),
                public_key: keys::encode_public(&PublicKey::from(&keys::generate())),
                cidr: sim_cidr(s, false).expect("cidr"),
                endpoint: SocketAddr::new([198, 18, 3, 2].into(), SIM_BASE_PORT + s as u16),
            })
            .collect()
    }

    #[test]
    fn the_wide_config_is_valid_for_the_daemon() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = keys::encode_public(&PublicKey::from(&keys::generate()));
        let mut sims = entries(199);
        let text = a_config(
            dir.path(),
            &dir.path().join("private.key"),
            &b,
            "198.18.2.2:51820".parse().expect("addr"),
            &sims,
        );
        let parsed = causeway::config::parse(&text, "test.toml");
        assert!(parsed.is_ok(), "{parsed:?}");
        assert_eq!(text.matches("[[peer]]").count(), 200);
        assert_eq!(text.matches("endpoint = ").count(), 200, "all static");
        // The moved CIDR is as valid, and distinct from every other.
        sims[99].cidr = sim_cidr(99, true).expect("cidr");
        let text = a_config(
            dir.path(),
            &dir.path().join("private.key"),
            &b,
            "198.18.2.2:51820".parse().expect("addr"),
            &sims,
        );
        assert!(causeway::config::parse(&text, "test.toml").is_ok());
        assert!(text.contains("\"10.101.99.0/24\""), "{text}");
    }

    #[test]
    fn every_simulated_peer_has_its_own_cidr() {
        let cidrs: Vec<Ipv4Net> = (0..MAX_PEERS - 1)
            .map(|s| sim_cidr(s, false).expect("cidr"))
            .collect();
        for (i, a) in cidrs.iter().enumerate() {
            for b in &cidrs[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} and {b}");
            }
            let moved = sim_cidr(i, true).expect("cidr");
            assert!(cidrs.iter().all(|c| !c.contains(&moved.network())));
            assert!(!IpNet::V4(*a).contains(&A_PODS.parse::<IpNet>().expect("a").addr()));
        }
        assert_eq!(sim_target(cidrs[7]), Ipv4Addr::new(10, 100, 7, 1));
        assert!(sim_cidr(256, false).is_err());
    }

    #[test]
    fn handshakes_are_counted_from_the_status() {
        let status: Value = serde_json::json!({"peers": [
            {"name": "b", "last_handshake_unix": 100.0, "cidrs": ["10.2.0.0/16"]},
            {"name": "sim000", "last_handshake_unix": 101.25, "cidrs": ["10.100.0.0/24"]},
            {"name": "sim001", "last_handshake_unix": null, "cidrs": ["10.100.1.0/24"]},
        ]});
        let seen = handshakes(&status).expect("peers");
        let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(with_handshake(&seen, &names(&["b", "sim000"])), 2);
        assert_eq!(with_handshake(&seen, &names(&["sim001", "nobody"])), 0);
        assert_eq!(cidrs_of(&status, "sim001"), ["10.100.1.0/24"]);
        assert!(cidrs_of(&status, "nobody").is_empty());
        assert!(handshakes(&serde_json::json!({})).is_err());
    }

    #[test]
    fn a_wandering_stamp_is_not_a_new_handshake() {
        assert!(!new_handshake(Some(100.0), Some(100.09)));
        assert!(
            !new_handshake(Some(100.0), Some(100.6)),
            "a busy machine's timers"
        );
        assert!(!new_handshake(Some(100.0), Some(99.95)));
        assert!(new_handshake(Some(100.0), Some(103.0)));
        assert!(new_handshake(None, Some(1.0)));
        assert!(new_handshake(Some(100.0), None), "the session went");
        assert!(!new_handshake(None, None));
    }

    #[test]
    fn the_last_time_only_once_all_are_there() {
        assert_eq!(last_of([Some(3), Some(9), Some(1)]), Some(9));
        assert_eq!(last_of([Some(3), None]), None);
        assert_eq!(last_of(Vec::<Option<u64>>::new()), None);
    }

    #[test]
    fn train_losses_and_longest_gap() {
        assert_eq!(train_losses(&[true, true, true]), (3, 0, 0));
        assert_eq!(
            train_losses(&[true, false, false, true, false, true]),
            (6, 3, 2)
        );
        assert_eq!(train_losses(&[]), (0, 0, 0));
    }
}
