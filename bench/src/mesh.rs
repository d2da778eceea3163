//! `causeway-bench mesh`: N sites in a full mesh through one rendezvous.
//!
//! Every site peers with every other by key only (no static endpoints);
//! one rendezvous on the lab's internet router lists them all. Site `i`
//! sits on the internet if `i % 4 == 0`, behind a symmetric NAT
//! (`masquerade random,fully-random`) if `i % 4 == 3`, and behind a
//! port-preserving NAT (`masquerade`) otherwise: a quarter public, half
//! port-preserving, a quarter symmetric. Site `i`'s pods are 10.i.0.0/16, so
//! no two sites overlap and no view remaps anything.
//!
//! One run starts every daemon at once and measures:
//!
//! - the time until every ordered pair of pods has answered a ping (one
//!   thread, an ICMP socket in each pod, a request to every pair not yet
//!   answered every 100 ms: the resolution of the figure);
//! - the path of every pair from `causeway status --json`, and whether each
//!   pair that docs/nat-traversal.md says can be punched (a public site with
//!   anything, port-preserving with port-preserving) is `direct` on both
//!   sides, and how long that took;
//! - after the paths have settled, over an idle window: each daemon's and
//!   the rendezvous' CPU (utime + stime) and resident memory (VmRSS), and
//!   the bytes each gateway sends and receives on its underlay link (`wan0`,
//!   from /proc/<daemon>/net/dev, i.e. in the gateway's namespace).
//!
//! Each run has a fresh lab, torn down at its end, also on failure.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use causeway_common::keys;
use causeway_testbed::{ChildGuard, IpNet, Lab, LabSpec, Nat, SiteSpec};
use serde::Serialize;
use x25519_dalek::PublicKey;

use crate::interrupt;
use crate::lab::daemon::{self, PeerPath, PeerStatus, Rendezvous, RendezvousPin, SiteDir};
use crate::lab::procfs;
use crate::stats::median_min_max;

/// How long a run waits for full reachability before it gives up.
const REACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after full reachability the punchable pairs may take to be
/// direct on both sides.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Between the paths settling and the idle window.
const QUIET: Duration = Duration::from_secs(2);
/// A new echo request to every unanswered pair this often.
const PING_INTERVAL: Duration = Duration::from_millis(100);

/// `causeway-bench mesh` options.
pub(crate) struct Args {
    /// The causeway binary [default: next to this one].
    pub(crate) causeway: Option<PathBuf>,
    /// Mesh sizes, each measured `runs` times.
    pub(crate) sites: Vec<usize>,
    pub(crate) runs: u32,
    /// Length of the idle window, seconds.
    pub(crate) idle: f64,
    /// Keep every run's logs, not only those of failed runs.
    pub(crate) keep_logs: bool,
    pub(crate) json: bool,
}

/// How a site is connected to the internet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Access {
    Public,
    PortPreserving,
    Symmetric,
}

impl Access {
    /// Site `i` of a mesh: a quarter public, half port-preserving, a quarter symmetric.
    pub(crate) fn of(i: usize) -> Access {
        match i % 4 {
            0 => Access::Public,
            3 => Access::Symmetric,
            _ => Access::PortPreserving,
        }
    }

    fn nat(self) -> Option<Nat> {
        match self {
            Access::Public => None,
            Access::PortPreserving => Some(Nat::PortPreserving),
            Access::Symmetric => Some(Nat::Symmetric),
        }
    }

    /// Whether two sites can punch a direct path, as docs/nat-traversal.md
    /// claims: a public site with anything, two endpoint-independent
    /// mappings (masquerade) with each other. A symmetric NAT (APDM/APDF)
    /// against masquerade (EIM/APDF) or another symmetric NAT is relayed.
    pub(crate) fn punchable(self, other: Access) -> bool {
        matches!(
            (self, other),
            (Access::Public, _)
                | (_, Access::Public)
                | (Access::PortPreserving, Access::PortPreserving)
        )
    }
}

/// One run of one mesh size.
#[derive(Debug, Serialize)]
struct Run {
    sites: usize,
    /// Spawning the N daemons (`ip netns exec causeway up`) took, ms.
    spawned_ms: u64,
    /// Until the last ordered pair of pods first answered a ping, ms
    /// (`None`: not every pair within the timeout).
    reachable_ms: Option<u64>,
    /// The median and 90th-percentile ordered pair's first answer, ms.
    pair_median_ms: Option<u64>,
    pair_p90_ms: Option<u64>,
    /// The five ordered pairs that answered last: from, to, ms.
    slowest_pairs: Vec<(String, String, u64)>,
    /// Ordered pairs that answered / all ordered pairs.
    pairs_answered: usize,
    pairs_total: usize,
    /// Until every punchable pair was `direct` on both sides, ms.
    punchable_direct_ms: Option<u64>,
    /// Unordered pairs by the path both sides report after the idle window.
    direct_pairs: usize,
    relay_pairs: usize,
    /// Pairs whose two sides disagree, or that have no path.
    other_pairs: usize,
    /// Pairs the documentation says can be punched, and how many of them are direct.
    punchable_pairs: usize,
    punchable_direct: usize,
    /// Pairs expected on the relay that went direct (a pleasant surprise, or a wrong claim).
    unexpected_direct: usize,
    /// Per site, in site order.
    access: Vec<Access>,
    daemon_rss_kib: Vec<u64>,
    /// CPU over the idle window, percent of one core.
    daemon_idle_cpu_pct: Vec<f64>,
    /// CPU from spawning to full reachability, seconds.
    daemon_setup_cpu_s: Vec<f64>,
    /// Bytes per second on the gateway's underlay link (both directions) while idle.
    idle_bytes_per_s: Vec<f64>,
    rendezvous_rss_kib: u64,
    rendezvous_idle_cpu_pct: f64,
    rendezvous_setup_cpu_s: f64,
    /// UDP datagrams (QUIC and STUN, in + out) per second of the internet
    /// namespace's own sockets, i.e. the rendezvous', while idle.
    rendezvous_idle_datagrams_per_s: f64,
    idle_seconds: f64,
    /// Where the logs were kept, if they were.
    logs: Option<PathBuf>,
}

/// Medians over the runs of one mesh size.
#[derive(Debug, Serialize)]
struct Summary {
    sites: usize,
    runs: usize,
    runs_fully_reachable: usize,
    reachable_ms_median: Option<f64>,
    reachable_ms_min: Option<u64>,
    reachable_ms_max: Option<u64>,
    punchable_direct_ms_median: Option<f64>,
    pairs: usize,
    direct_pairs_median: f64,
    relay_pairs_median: f64,
    other_pairs_max: usize,
    punchable_pairs: usize,
    punchable_direct_min: usize,
    daemon_rss_mib_median: f64,
    daemon_rss_mib_max: f64,
    daemon_idle_cpu_pct_median: f64,
    daemon_idle_cpu_pct_max: f64,
    daemon_setup_cpu_s_median: f64,
    rendezvous_rss_mib_median: f64,
    rendezvous_idle_cpu_pct_median: f64,
    rendezvous_setup_cpu_s_median: f64,
    rendezvous_idle_datagrams_per_s_median: f64,
    idle_bytes_per_s_per_site_median: f64,
    idle_bytes_per_s_per_site_max: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    date: String,
    machine: procfs::Machine,
    summaries: Vec<Summary>,
    runs: Vec<Run>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    interrupt::install();
    let bin = daemon::causeway_bin(args.causeway.clone())?;
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(
        args.idle > 0.0 && args.idle <= 300.0,
        "--idle must be in (0, 300] seconds"
    );
    for &n in &args.sites {
        ensure!((2..=64).contains(&n), "--sites: {n} is not within 2..=64");
    }
    let mut runs = Vec::new();
    let mut summaries = Vec::new();
    for &n in &args.sites {
        let mut of_n = Vec::new();
        for r in 0..args.runs {
            interrupt::check()?;
            if !args.json {
                eprintln!("mesh: {n} sites, run {}/{}", r + 1, args.runs);
            }
            let run = one_run(&bin, n, &args)?;
            if !args.json {
                print_run(&run);
            }
            of_n.push(run);
        }
        summaries.push(summarize(n, &of_n));
        runs.extend(of_n);
    }
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date: procfs::utc_now(),
        machine: procfs::Machine::this(),
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

/// Site `i`'s pod CIDR.
fn pod_cidr(i: usize) -> anyhow::Result<IpNet> {
    let octet = u8::try_from(i).context("too many sites")?;
    Ok(format!("10.{octet}.0.0/16").parse()?)
}

fn site_name(i: usize) -> String {
    format!("s{i:02}")
}

fn one_run(bin: &Path, n: usize, args: &Args) -> anyhow::Result<Run> {
    let access: Vec<Access> = (0..n).map(Access::of).collect();
    let mut spec = Vec::new();
    for (i, a) in access.iter().enumerate() {
        let site = SiteSpec::new(&site_name(i), vec![pod_cidr(i)?]);
        spec.push(match a.nat() {
            Some(nat) => site.nat(nat),
            None => site,
        });
    }
    let lab = Lab::build(&LabSpec { sites: spec }).context("building the lab (are you root?)")?;
    daemon::ipv4_only_behind_nats(&lab)?;
    let tmp = tempfile::Builder::new()
        .prefix("causeway-mesh-")
        .tempdir()?;
    let secrets: Vec<_> = (0..n).map(|_| keys::generate()).collect();
    let publics: Vec<String> = secrets
        .iter()
        .map(|s| keys::encode_public(&PublicKey::from(s)))
        .collect();
    let names: Vec<String> = (0..n).map(site_name).collect();
    let listed: Vec<(&str, &str)> = names
        .iter()
        .map(String::as_str)
        .zip(publics.iter().map(String::as_str))
        .collect();
    let rendezvous = Rendezvous::start(bin, &lab, &tmp.path().join("rendezvous"), &listed, "info")?;
    let mut dirs = Vec::new();
    for (i, secret) in secrets.iter().enumerate() {
        let path = tmp.path().join(&names[i]);
        let dir = SiteDir::create(path.clone())?;
        daemon::write_private_key(&path.join("private.key"), &keys::encode_private(secret))?;
        let text = config_toml(i, &path, &names, &publics, &rendezvous.pin)?;
        std::fs::write(dir.config(), text)?;
        dirs.push(dir);
    }
    let measured = measure(bin, &lab, &rendezvous, &dirs, &access, args);
    let failed = measured.as_ref().map_or(true, |r| r.reachable_ms.is_none());
    let logs = if failed || args.keep_logs {
        let kept = tmp.keep();
        eprintln!("mesh: logs kept in {}", kept.display());
        Some(kept)
    } else {
        None
    };
    drop(rendezvous);
    drop(lab);
    let mut run = measured?;
    run.logs = logs;
    Ok(run)
}

/// Site `i`'s config (its files in `dir`): every other site as a peer,
/// found through the rendezvous.
fn config_toml(
    i: usize,
    dir: &Path,
    names: &[String],
    publics: &[String],
    rendezvous: &RendezvousPin,
) -> anyhow::Result<String> {
    let mut s = format!(
        "[site]\nname = {:?}\nprivate_key_file = {:?}\npod_cidrs = [\"{}\"]\n\
         control_socket = {:?}\nuapi_socket = {:?}\nstate_dir = {:?}\n",
        names[i],
        dir.join("private.key"),
        pod_cidr(i)?,
        dir.join("control.sock"),
        dir.join("uapi.sock"),
        dir,
    );
    for k in (0..names.len()).filter(|&k| k != i) {
        s += &format!(
            "\n[[peer]]\nname = {:?}\npublic_key = {:?}\ncidrs = [\"{}\"]\n",
            names[k],
            publics[k],
            pod_cidr(k)?
        );
    }
    s += &format!(
        "\n[[rendezvous]]\naddress = \"{}\"\npublic_key = {:?}\n",
        rendezvous.address, rendezvous.public_key
    );
    Ok(s)
}

fn measure(
    bin: &Path,
    lab: &Lab,
    rendezvous: &Rendezvous,
    dirs: &[SiteDir],
    access: &[Access],
    args: &Args,
) -> anyhow::Result<Run> {
    let n = dirs.len();
    let sites = lab.sites();
    let rdv_pid = rendezvous.process.pid();
    let rdv_cpu0 = procfs::cpu_seconds(rdv_pid).unwrap_or(0.0);
    // All at once; the pings start right away (the pod CIDRs do not
    // overlap, so every site sees every pod at its own address; checked
    // below against the views in the status).
    let started = Instant::now();
    let mut daemons: Vec<ChildGuard> = Vec::new();
    for (site, dir) in sites.iter().zip(dirs) {
        daemons.push(daemon::spawn_daemon(bin, &site.gateway, dir, "info")?);
    }
    let spawned = started.elapsed();
    let targets: Vec<Vec<Option<Ipv4Addr>>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|k| (k != i).then(|| sites[k].pods[0].addr))
                .collect()
        })
        .collect();
    let answers = reach_all(lab, &targets, started, started + REACH_TIMEOUT, || {
        daemons
            .iter_mut()
            .all(|d| matches!(d.wait_timeout(Duration::ZERO), Ok(None)))
    })?;
    for (i, (d, dir)) in daemons.iter_mut().zip(dirs).enumerate() {
        let status = daemon::wait_ready(bin, &dir.control_socket(), d)
            .with_context(|| format!("site {}'s daemon", sites[i].name))?;
        for site in sites.iter().filter(|s| s.name != sites[i].name) {
            let peer = PeerStatus::of(&status, &site.name)?;
            ensure!(
                peer.view.is_none_or(|v| v.contains(&site.pods[0].addr)),
                "site {} sees {} at {:?}: remapped, but the mesh pings real addresses",
                sites[i].name,
                site.name,
                peer.view
            );
        }
    }
    let reached: Vec<Duration> = answers.iter().flatten().flatten().copied().collect();
    let total = n * (n - 1);
    let reachable = (reached.len() == total)
        .then(|| reached.iter().max().copied())
        .flatten();
    let setup_cpu: Vec<f64> = daemons
        .iter()
        .map(|d| procfs::cpu_seconds(d.pid()).unwrap_or(0.0))
        .collect();
    let rdv_setup_cpu = procfs::cpu_seconds(rdv_pid).unwrap_or(0.0) - rdv_cpu0;

    // Paths: wait until every punchable pair is direct on both sides.
    let punchable = |i: usize, k: usize| access[i].punchable(access[k]);
    let mut direct_at = None;
    let deadline = Instant::now() + DIRECT_TIMEOUT;
    loop {
        interrupt::check()?;
        let paths = all_paths(bin, dirs, lab)?;
        let all_direct = (0..n).all(|i| {
            (0..n)
                .filter(|&k| k != i && punchable(i, k))
                .all(|k| paths[i][k].as_deref() == Some(PeerPath::Direct.name()))
        });
        if all_direct {
            direct_at = Some(started.elapsed());
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }

    // Idle.
    thread::sleep(QUIET);
    let pids: Vec<u32> = daemons.iter().map(ChildGuard::pid).collect();
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|&p| procfs::cpu_seconds(p).unwrap_or(0.0))
        .collect();
    let bytes0: Vec<u64> = pids.iter().map(|&p| wan_bytes(p).unwrap_or(0)).collect();
    let rdv0 = procfs::cpu_seconds(rdv_pid).unwrap_or(0.0);
    let rdv_dgrams0 = udp_datagrams(rdv_pid).unwrap_or(0);
    let t0 = Instant::now();
    let idle = Duration::from_secs_f64(args.idle);
    while t0.elapsed() < idle {
        interrupt::check()?;
        thread::sleep(Duration::from_millis(100).min(idle.saturating_sub(t0.elapsed())));
    }
    let secs = t0.elapsed().as_secs_f64();
    let daemon_idle_cpu_pct: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|(&p, c0)| 100.0 * (procfs::cpu_seconds(p).unwrap_or(*c0) - c0) / secs)
        .collect();
    let idle_bytes_per_s: Vec<f64> = pids
        .iter()
        .zip(&bytes0)
        .map(|(&p, b0)| wan_bytes(p).unwrap_or(*b0).saturating_sub(*b0) as f64 / secs)
        .collect();
    let rendezvous_idle_cpu_pct =
        100.0 * (procfs::cpu_seconds(rdv_pid).unwrap_or(rdv0) - rdv0) / secs;
    let rendezvous_idle_datagrams_per_s = udp_datagrams(rdv_pid)
        .unwrap_or(rdv_dgrams0)
        .saturating_sub(rdv_dgrams0) as f64
        / secs;
    let daemon_rss_kib: Vec<u64> = pids
        .iter()
        .map(|&p| procfs::rss_kib(p).unwrap_or(0))
        .collect();
    let rendezvous_rss_kib = procfs::rss_kib(rdv_pid).unwrap_or(0);
    for (i, d) in daemons.iter_mut().enumerate() {
        ensure!(
            d.wait_timeout(Duration::ZERO)?.is_none(),
            "site {}'s daemon exited during the run",
            sites[i].name
        );
    }

    // Paths after the idle window.
    let paths = all_paths(bin, dirs, lab)?;
    let (mut direct, mut relay, mut other) = (0, 0, 0);
    let (mut punchable_pairs, mut punchable_direct, mut unexpected_direct) = (0, 0, 0);
    let pairs = (0..n).flat_map(|i| (i + 1..n).map(move |k| (i, k)));
    for (i, k) in pairs {
        let (a, b) = (paths[i][k].as_deref(), paths[k][i].as_deref());
        let is = |p: PeerPath| a == Some(p.name()) && b == Some(p.name());
        let on_direct = is(PeerPath::Direct);
        if on_direct {
            direct += 1;
        } else if is(PeerPath::Relay) {
            relay += 1;
        } else {
            other += 1;
        }
        if punchable(i, k) {
            punchable_pairs += 1;
            punchable_direct += usize::from(on_direct);
        } else {
            unexpected_direct += usize::from(on_direct);
        }
    }
    let mut sorted = reached.clone();
    sorted.sort();
    let mut by_time: Vec<(Duration, usize, usize)> = answers
        .iter()
        .enumerate()
        .flat_map(|(i, row)| {
            row.iter()
                .enumerate()
                .filter_map(move |(k, t)| t.map(|t| (t, i, k)))
        })
        .collect();
    by_time.sort();
    let slowest_pairs = by_time
        .iter()
        .rev()
        .take(5)
        .map(|&(t, i, k)| {
            (
                sites[i].name.clone(),
                sites[k].name.clone(),
                t.as_millis() as u64,
            )
        })
        .collect();
    let ms = |d: Duration| d.as_millis() as u64;
    for mut d in daemons {
        let _ = d.stop(Duration::from_secs(5));
    }
    Ok(Run {
        sites: n,
        spawned_ms: ms(spawned),
        reachable_ms: reachable.map(ms),
        pair_median_ms: sorted.get(sorted.len() / 2).copied().map(ms),
        pair_p90_ms: sorted.get(sorted.len() * 9 / 10).copied().map(ms),
        slowest_pairs,
        pairs_answered: reached.len(),
        pairs_total: total,
        punchable_direct_ms: direct_at.map(ms),
        direct_pairs: direct,
        relay_pairs: relay,
        other_pairs: other,
        punchable_pairs,
        punchable_direct,
        unexpected_direct,
        access: access.to_vec(),
        daemon_rss_kib,
        daemon_idle_cpu_pct,
        daemon_setup_cpu_s: setup_cpu,
        idle_bytes_per_s,
        rendezvous_rss_kib,
        rendezvous_idle_cpu_pct,
        rendezvous_setup_cpu_s: rdv_setup_cpu,
        rendezvous_idle_datagrams_per_s,
        idle_seconds: secs,
        logs: None,
    })
}

/// `paths[i][k]`: the path site `i` reports for site `k`.
fn all_paths(bin: &Path, dirs: &[SiteDir], lab: &Lab) -> anyhow::Result<Vec<Vec<Option<String>>>> {
    let sites = lab.sites();
    dirs.iter()
        .map(|dir| {
            let status = daemon::status(bin, &dir.control_socket())?;
            sites
                .iter()
                .map(|site| match PeerStatus::of(&status, &site.name) {
                    Ok(p) => Ok(Some(p.path)),
                    Err(_) => Ok(None), // itself
                })
                .collect()
        })
        .collect()
}

/// Bytes received plus sent on `wan0` in the network namespace of `pid`.
fn wan_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    dev_bytes(&text, "wan0")
}

/// Bytes received plus sent on `ifname` in a /proc/net/dev table.
fn dev_bytes(text: &str, ifname: &str) -> Option<u64> {
    let prefix = format!("{ifname}:");
    let line = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix.as_str()))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // rx_bytes is the first field, tx_bytes the ninth.
    Some(fields.first()? + fields.get(8)?)
}

/// UDP datagrams received plus sent by the sockets of `pid`'s network
/// namespace (`Udp:` in /proc/<pid>/net/snmp; forwarded packets do not count).
fn udp_datagrams(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).ok()?;
    snmp_udp_datagrams(&text)
}

fn snmp_udp_datagrams(text: &str) -> Option<u64> {
    let field = |name| procfs::snmp_udp_field(text, name);
    Some(field("InDatagrams")? + field("OutDatagrams")?)
}

/// Pings every `targets[i][k]` from site `i`'s first pod until each has
/// answered once or `deadline` passes; `answers[i][k]` is when the first
/// reply came, from `start`; fails as soon as `alive` says no. One thread: an ICMP socket per pod, opened
/// in the pod's namespace (a socket stays in the namespace it was made in).
fn reach_all(
    lab: &Lab,
    targets: &[Vec<Option<Ipv4Addr>>],
    start: Instant,
    deadline: Instant,
    mut alive: impl FnMut() -> bool,
) -> anyhow::Result<Vec<Vec<Option<Duration>>>> {
    let sites = lab.sites();
    let n = targets.len();
    let sockets: Vec<OwnedFd> = sites
        .iter()
        .map(|s| {
            s.pods[0]
                .ns
                .try_enter(icmp_socket)?
                .map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<_>>()?;
    let mut answers = vec![vec![None; n]; n];
    // Which k an answer from an address is, per source.
    let index: Vec<HashMap<Ipv4Addr, usize>> = targets
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .filter_map(|(k, t)| t.map(|a| (a, k)))
                .collect()
        })
        .collect();
    let mut pending = n * (n - 1);
    let mut seq: u16 = 0;
    while pending > 0 && Instant::now() < deadline {
        interrupt::check()?;
        ensure!(alive(), "a daemon exited while the mesh was coming up");
        let round = Instant::now();
        seq = seq.wrapping_add(1);
        for (i, socket) in sockets.iter().enumerate() {
            for k in (0..n).filter(|&k| k != i && answers[i][k].is_none()) {
                if let Some(dst) = targets[i][k] {
                    // A failed send (no route yet) is retried next round.
                    let _ = send_echo(socket, dst, seq);
                }
            }
        }
        let next = round + PING_INTERVAL;
        loop {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() || pending == 0 {
                break;
            }
            let mut fds: Vec<libc::pollfd> = sockets
                .iter()
                .map(|s| libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let ms = left.as_millis().clamp(1, 1000) as i32;
            // SAFETY: a valid array of pollfds of the length given.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if ready <= 0 {
                continue;
            }
            for (i, fd) in fds.iter().enumerate() {
                if fd.revents == 0 {
                    continue;
                }
                while let Some(from) = recv_echo_reply(&sockets[i]) {
                    let at = start.elapsed();
                    if let Some(&k) = index[i].get(&from)
                        && answers[i][k].is_none()
                    {
                        answers[i][k] = Some(at);
                        pending -= 1;
                    }
                }
            }
        }
    }
    Ok(answers)
}

/// An unconnected, non-blocking ICMP echo ("ping") socket.
pub(crate) fn icmp_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and valid, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn send_echo(socket: &OwnedFd, dst: Ipv4Addr, seq: u16) -> io::Result<()> {
    let mut packet = [0u8; 16];
    packet[0] = 8; // echo request; the kernel fills in the identifier and checksum
    packet[6..8].copy_from_slice(&seq.to_be_bytes());
    packet[8..].copy_from_slice(b"cw-mesh!");
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid buffer and a valid sockaddr_in of the length given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The source of the next echo reply waiting on `socket`, skipping anything
/// else; `None` when nothing is left.
fn recv_echo_reply(socket: &OwnedFd) -> Option<Ipv4Addr> {
    let mut buf = [0u8; 1500];
    for _ in 0..1024 {
        // SAFETY: sockaddr_in is plain data; all zeroes is valid.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: valid buffers of the lengths given.
        let got = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut addr).cast(),
                &mut len,
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return None;
            }
            continue; // an ICMP error, consumed
        }
        if got >= 8 && buf[0] == 0 {
            return Some(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)));
        }
    }
    None
}

/// The median, 0 for no values.
fn median(values: &[f64]) -> f64 {
    median_min_max(values).map_or(0.0, |(m, _, _)| m)
}

fn summarize(n: usize, runs: &[Run]) -> Summary {
    let f = |xs: Vec<f64>| median(&xs);
    let all = |g: &dyn Fn(&Run) -> &Vec<f64>| -> Vec<f64> {
        runs.iter().flat_map(|r| g(r).iter().copied()).collect()
    };
    let reach: Vec<u64> = runs.iter().filter_map(|r| r.reachable_ms).collect();
    let direct_ms: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.punchable_direct_ms.map(|v| v as f64))
        .collect();
    let rss: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.daemon_rss_kib.iter().map(|&k| k as f64 / 1024.0))
        .collect();
    let idle_cpu = all(&|r| &r.daemon_idle_cpu_pct);
    let bytes = all(&|r| &r.idle_bytes_per_s);
    let max = |xs: &[f64]| xs.iter().copied().fold(0.0, f64::max);
    Summary {
        sites: n,
        runs: runs.len(),
        runs_fully_reachable: reach.len(),
        reachable_ms_median: (!reach.is_empty())
            .then(|| f(reach.iter().map(|&v| v as f64).collect())),
        reachable_ms_min: reach.iter().min().copied(),
        reachable_ms_max: reach.iter().max().copied(),
        punchable_direct_ms_median: (!direct_ms.is_empty()).then(|| median(&direct_ms)),
        pairs: n * (n - 1) / 2,
        direct_pairs_median: f(runs.iter().map(|r| r.direct_pairs as f64).collect()),
        relay_pairs_median: f(runs.iter().map(|r| r.relay_pairs as f64).collect()),
        other_pairs_max: runs.iter().map(|r| r.other_pairs).max().unwrap_or(0),
        punchable_pairs: runs.first().map_or(0, |r| r.punchable_pairs),
        punchable_direct_min: runs.iter().map(|r| r.punchable_direct).min().unwrap_or(0),
        daemon_rss_mib_median: median(&rss),
        daemon_rss_mib_max: max(&rss),
        daemon_idle_cpu_pct_median: median(&idle_cpu),
        daemon_idle_cpu_pct_max: max(&idle_cpu),
        daemon_setup_cpu_s_median: f(all(&|r| &r.daemon_setup_cpu_s)),
        rendezvous_rss_mib_median: f(runs
            .iter()
            .map(|r| r.rendezvous_rss_kib as f64 / 1024.0)
            .collect()),
        rendezvous_idle_cpu_pct_median: f(runs.iter().map(|r| r.rendezvous_idle_cpu_pct).collect()),
        rendezvous_setup_cpu_s_median: f(runs.iter().map(|r| r.rendezvous_setup_cpu_s).collect()),
        rendezvous_idle_datagrams_per_s_median: f(runs
            .iter()
            .map(|r| r.rendezvous_idle_datagrams_per_s)
            .collect()),
        idle_bytes_per_s_per_site_median: median(&bytes),
        idle_bytes_per_s_per_site_max: max(&bytes),
    }
}

fn print_run(r: &Run) {
    let reach = r
        .reachable_ms
        .map_or_else(|| "NOT REACHED".to_owned(), |v| format!("{v} ms"));
    println!(
        "  {} sites: spawned in {} ms, all {} ordered pairs answered {} (median pair {:?} ms, p90 {:?} ms; {}/{} answered), \
         punchable pairs direct at {:?} ms; pairs direct {} relay {} other {}, punchable direct {}/{}",
        r.sites,
        r.spawned_ms,
        r.pairs_total,
        reach,
        r.pair_median_ms,
        r.pair_p90_ms,
        r.pairs_answered,
        r.pairs_total,
        r.punchable_direct_ms,
        r.direct_pairs,
        r.relay_pairs,
        r.other_pairs,
        r.punchable_direct,
        r.punchable_pairs
    );
}

fn print_summaries(summaries: &[Summary]) {
    println!(
        "| sites | full reachability, ms (median, min–max) | punchable direct, ms | direct / relay / other pairs | punchable direct | daemon RSS MiB (median, max) | daemon idle CPU % (median, max) | rendezvous RSS MiB | rendezvous idle CPU %, datagrams/s | idle B/s per site (median, max) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in summaries {
        let opt = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| format!("{v:.0}"));
        println!(
            "| {} | {} ({}–{}; {}/{} runs) | {} | {:.0} / {:.0} / {} | {} of {} | {:.1}, {:.1} | {:.2}, {:.2} | {:.1} | {:.2}, {:.0} | {:.0}, {:.0} |",
            s.sites,
            opt(s.reachable_ms_median),
            s.reachable_ms_min.map_or("—".into(), |v| v.to_string()),
            s.reachable_ms_max.map_or("—".into(), |v| v.to_string()),
            s.runs_fully_reachable,
            s.runs,
            opt(s.punchable_direct_ms_median),
            s.direct_pairs_median,
            s.relay_pairs_median,
            s.other_pairs_max,
            s.punchable_direct_min,
            s.punchable_pairs,
            s.daemon_rss_mib_median,
            s.daemon_rss_mib_max,
            s.daemon_idle_cpu_pct_median,
            s.daemon_idle_cpu_pct_max,
            s.rendezvous_rss_mib_median,
            s.rendezvous_idle_cpu_pct_median,
            s.rendezvous_idle_datagrams_per_s_median,
            s.idle_bytes_per_s_per_site_median,
            s.idle_bytes_per_s_per_site_max,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarter_public_half_port_preserving_a_quarter_symmetric() {
        let count = |n: usize, a: Access| (0..n).filter(|&i| Access::of(i) == a).count();
        assert_eq!(
            [Access::Public, Access::PortPreserving, Access::Symmetric].map(|a| count(20, a)),
            [5, 10, 5]
        );
        assert_eq!(
            [Access::Public, Access::PortPreserving, Access::Symmetric].map(|a| count(5, a)),
            [2, 2, 1]
        );
    }

    #[test]
    fn punchable_as_the_nat_traversal_page_says() {
        use Access::*;
        assert!(Public.punchable(Symmetric) && Symmetric.punchable(Public));
        assert!(PortPreserving.punchable(PortPreserving));
        assert!(!PortPreserving.punchable(Symmetric) && !Symmetric.punchable(PortPreserving));
        assert!(!Symmetric.punchable(Symmetric));
    }

    #[test]
    fn mesh_configs_are_valid_for_the_daemon() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names: Vec<String> = (0..3).map(site_name).collect();
        let keys: Vec<String> = (0..3)
            .map(|_| keys::encode_public(&PublicKey::from(&keys::generate())))
            .collect();
        let pin = RendezvousPin {
            address: "198.18.0.1:7443".parse().expect("addr"),
            public_key: keys[0].clone(),
        };
        let text = config_toml(1, dir.path(), &names, &keys, &pin).expect("toml");
        let parsed = causeway::config::parse(&text, "test.toml");
        assert!(parsed.is_ok(), "{text}\n{parsed:?}");
        assert_eq!(text.matches("[[peer]]").count(), 2, "{text}");
        assert!(!text.contains("endpoint"), "{text}");
    }

    #[test]
    fn underlay_bytes_from_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
 lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  \
 wan0:    1234      10    0    0    0     0          0         0     4321      12    0    0    0     0       0          0\n";
        assert_eq!(dev_bytes(text, "wan0"), Some(1234 + 4321));
        assert_eq!(dev_bytes(text, "lo"), Some(200));
        assert_eq!(dev_bytes(text, "pod0"), None);
    }

    #[test]
    fn udp_datagrams_from_snmp() {
        let text = "Icmp: InMsgs InErrors\nIcmp: 3 0\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n\
                    Udp: 40 1 0 2 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n\
                    UdpLite: 0 0 0 0 0\n";
        assert_eq!(snmp_udp_datagrams(text), Some(42));
        assert_eq!(snmp_udp_datagrams("Icmp: a\nIcmp: 1\n"), None);
    }
}
