//! `causeway-bench rendezvous`: one rendezvous under thousands of sites.
//!
//! The lab has one site, `loadgen`, directly on the internet, and a real
//! `causeway rendezvous` on the internet router whose config lists every
//! site's key. One load generator (`causeway-bench rendezvous-worker`, in
//! the loadgen namespace) holds a QUIC connection per site, each
//! authenticated like a real site (a hello with a proof bound to that TLS
//! session, from the site's own key), and registers every site with 3 to
//! 10 mutual peers (a deterministic pseudo-random peer graph). Then:
//!
//! - **idle**: nothing happens for a while (the rendezvous' CPU and memory
//!   with every site registered);
//! - **churn**: a share of the sites (1 % a second by default) reconnects
//!   (closes its connection, dials again, hello, register) or registers new
//!   candidates, paced evenly; every `register` carries a candidate that
//!   names the site and a generation, so the generator, which also holds
//!   every peer, times each `register` to each peer's `peer_update` about
//!   it on one clock;
//! - **relay**: pairs of mutual peers send each other relay datagrams as
//!   fast as QUIC lets them, through the rendezvous, and the receivers
//!   count them.
//!
//! The generator keeps the rendezvous' limits for connections that are
//! authenticating: it dials from [`SOURCES`] addresses of its own (added to
//! its namespace), round robin, with at most [`IN_FLIGHT`] connections
//! between the dial and the `welcome` at once, so that no source ever has
//! more than a few authenticating (the limit is 8), all of them stay under
//! the 32 above which a Retry is asked for and far under the 256 refused
//! beyond; each site registers once per change, far under its token
//! bucket. The rendezvous' own counters (`--metrics-listen`, scraped at the
//! end) show what it refused, retried or coalesced.
//!
//! The rendezvous is pinned to CPU 0 and the generator to CPU 1; the lab
//! is torn down at the end, as on any error.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use causeway_common::keys;
use causeway_testbed::{ChildGuard, Lab, LabSpec, SiteSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::abuse;
use crate::interrupt;
use crate::lab::daemon::{self, Rendezvous};
use crate::lab::procfs;
use crate::stats::percentile_sorted;

/// Source addresses the generator dials from.
const SOURCES: usize = 64;
/// Connections between the dial and the `welcome` at once (the rendezvous
/// asks for a Retry above 32 authenticating and refuses above 256).
const IN_FLIGHT: usize = 32;
/// Fewest and most peers of a site.
const MIN_PEERS: usize = 3;
const MAX_PEERS: usize = 10;
/// Where the rendezvous serves its metrics, in the internet namespace.
const METRICS_PORT: u16 = 9464;
/// The relay datagram header (docs/rendezvous.md, "Relay datagrams").
const RELAY_HEADER: usize = 13;

/// `causeway-bench rendezvous` options.
pub(crate) struct Args {
    pub(crate) causeway: Option<PathBuf>,
    pub(crate) sites: Vec<usize>,
    pub(crate) idle: f64,
    pub(crate) churn: f64,
    pub(crate) churn_percent: f64,
    pub(crate) relay_pairs: usize,
    pub(crate) relay_seconds: f64,
    pub(crate) payload: usize,
    pub(crate) seed: u64,
    pub(crate) keep_logs: bool,
    pub(crate) json: bool,
}

/// The whole run.
#[derive(Debug, Serialize)]
struct Report {
    command: String,
    date: String,
    machine: procfs::Machine,
    sizes: Vec<SizeReport>,
}

/// One size: a fresh lab and rendezvous.
#[derive(Debug, Serialize)]
struct SizeReport {
    sites: usize,
    /// Mutual pairs in the peer graph.
    pairs: usize,
    sources: usize,
    in_flight: usize,
    /// Threads of the rendezvous process (pinned to one CPU).
    rendezvous_threads: u64,
    rendezvous_cpu: usize,
    generator_cpu: Option<usize>,
    /// Rendezvous `VmRSS` before any site connected, KiB.
    rss_before_kib: u64,
    /// … at the end of the idle window, every site registered, KiB.
    rss_registered_kib: u64,
    /// (registered − before) / sites, KiB.
    rss_per_site_kib: f64,
    /// `VmHWM` at the end, KiB.
    rss_peak_kib: u64,
    /// Rendezvous CPU, % of one core, per window.
    cpu_setup_percent: f64,
    cpu_idle_percent: f64,
    cpu_churn_percent: f64,
    cpu_relay_percent: f64,
    /// The generator's CPU, % of one core, per window.
    generator_cpu_setup_percent: f64,
    generator_cpu_churn_percent: f64,
    generator_cpu_relay_percent: f64,
    /// How busy each CPU of the machine was (all processes), %, per window.
    cpus_busy_idle_percent: Vec<f64>,
    cpus_busy_churn_percent: Vec<f64>,
    cpus_busy_relay_percent: Vec<f64>,
    /// UDP datagrams dropped by the kernel for want of receive buffer, from
    /// start to the end of the relay window: (rendezvous' namespace,
    /// generator's namespace).
    udp_rcvbuf_drops: (u64, u64),
    /// … during churn alone.
    udp_rcvbuf_drops_churn: (u64, u64),
    /// Time the rendezvous' and the generator's threads were ready to run
    /// but waited for their CPU (taken by other work on the machine), ms,
    /// during churn: latency that is the machine's, not the rendezvous'.
    runqueue_wait_churn_ms: (f64, f64),
    /// What the rendezvous counted (its metrics at the end).
    rendezvous_counters: BTreeMap<String, f64>,
    generator: WorkerReport,
}

/// Nearest-rank percentiles of a set of samples, ms.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Percentiles {
    count: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Percentiles {
    fn of_micros(mut samples: Vec<u64>) -> Percentiles {
        samples.sort_unstable();
        let ms = |p| percentile_sorted(&samples, p) / 1000.0;
        Percentiles {
            count: samples.len(),
            p50_ms: ms(50.0),
            p90_ms: ms(90.0),
            p99_ms: ms(99.0),
            max_ms: samples.last().map_or(0.0, |&m| m as f64 / 1000.0),
        }
    }
}

/// What the generator did and saw, printed as its last line.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct WorkerReport {
    sites: usize,
    /// Sites welcomed at least once / registered at least once.
    welcomed: usize,
    registered: usize,
    /// Dials that failed (refused, timed out, rejected), retried.
    dial_failures: u64,
    /// From the first dial to every site registered and every peer
    /// having heard of every peer, s.
    setup_seconds: f64,
    /// Dial to `welcome`, during setup.
    setup_welcome: Percentiles,
    /// Dial to `welcome` of the reconnections during churn.
    churn_welcome: Percentiles,
    churn_seconds: f64,
    reconnects: u64,
    reregistrations: u64,
    /// `register` to each peer's `peer_update` with its candidates, during
    /// churn (peers that were connected throughout).
    churn_latency: Percentiles,
    /// Updates that never came, and no later one about the same site
    /// either (must be 0).
    missing: u64,
    /// Expected updates replaced by a newer one about the same site
    /// before they arrived (the rendezvous keeps one per peer).
    superseded: u64,
    /// Expected updates whose receiver reconnected meanwhile (it heard
    /// the latest on its new connection; not timed).
    excused: u64,
    /// `peer_update`s received: online, and offline.
    updates_online: u64,
    updates_offline: u64,
    /// After churn: (receiver, peer) views checked, and those not showing
    /// the peer online with its latest candidates (must be 0).
    views_checked: u64,
    views_stale: u64,
    relay: RelayReport,
    /// The first few errors seen.
    errors: Vec<String>,
}

/// The relay window.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct RelayReport {
    pairs: usize,
    payload_bytes: usize,
    seconds: f64,
    /// Relay datagrams each packet took (1 when it fit one datagram).
    datagrams_per_packet: usize,
    sent_packets: u64,
    received_packets: u64,
    packets_per_second: f64,
    mbit_per_second: f64,
    /// Jain's fairness index over the pairs' received bytes (1 = equal).
    jain: f64,
    min_pair_mbit: f64,
    max_pair_mbit: f64,
    /// Pairs that received nothing in either direction.
    silent_pairs: usize,
}

/// A deterministic generator (SplitMix64): the same seed gives the same
/// peer graph and churn on every machine and version.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is negligible here).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A peer graph of `n` sites: each lists 3 to 10 others, and every listing
/// is mutual (the lists are the adjacency of an undirected graph without
/// loops or repeated edges). Each site draws a wish between 3 and 10 and
/// is joined to random sites that have room, so degrees stay within the
/// bounds. Deterministic in `seed`. Needs `n > MAX_PEERS`.
pub(crate) fn peer_graph(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = SplitMix::new(seed);
    let wish: Vec<usize> = (0..n)
        .map(|_| MIN_PEERS + rng.below(MAX_PEERS - MIN_PEERS + 1))
        .collect();
    let mut adj: Vec<Vec<u32>> = vec![Vec::new(); n];
    for i in 0..n {
        let mut tries = 0;
        while adj[i].len() < wish[i] {
            tries += 1;
            let j = rng.below(n);
            // Random sites with room below their own wish first; later any
            // with room below the maximum (the last sites find few left).
            let room = if tries < 64 { wish[j] } else { MAX_PEERS };
            if j == i || adj[j].len() >= room || adj[i].contains(&(j as u32)) {
                if tries > 10_000 {
                    break;
                }
                continue;
            }
            adj[i].push(j as u32);
            adj[j].push(i as u32);
        }
    }
    adj
}

/// Jain's fairness index of some allocations: (Σx)² / (n·Σx²), 1 when all
/// are equal, 1/n when one gets everything; 1 for none or all zero.
pub(crate) fn jain(values: &[f64]) -> f64 {
    let sum: f64 = values.iter().sum();
    let squares: f64 = values.iter().map(|x| x * x).sum();
    if values.is_empty() || squares == 0.0 {
        return 1.0;
    }
    sum * sum / (values.len() as f64 * squares)
}

/// Disjoint pairs of mutual peers, at most `count`, lowest sites first.
pub(crate) fn relay_pairs(graph: &[Vec<u32>], count: usize) -> Vec<(u32, u32)> {
    let mut used = vec![false; graph.len()];
    let mut pairs = Vec::new();
    for (a, peers) in graph.iter().enumerate() {
        if pairs.len() == count {
            break;
        }
        if used[a] {
            continue;
        }
        if let Some(&b) = peers.iter().find(|&&b| !used[b as usize]) {
            used[a] = true;
            used[b as usize] = true;
            pairs.push((a as u32, b));
        }
    }
    pairs
}

/// The candidate that tells who registered it and when: site `s` at
/// `10.x.y.z` (s + 1 in the low 24 bits), its generation as the port.
pub(crate) fn candidate(site: u32, generation: u16) -> SocketAddr {
    SocketAddr::new(
        Ipv4Addr::from(0x0a00_0000 | ((site + 1) & 0x00ff_ffff)).into(),
        generation,
    )
}

/// The inverse of [`candidate`].
pub(crate) fn parse_candidate(text: &str) -> Option<(u32, u16)> {
    let addr: SocketAddr = text.parse().ok()?;
    let IpAddr::V4(v4) = addr.ip() else {
        return None;
    };
    let bits = u32::from(v4);
    (bits >> 24 == 10 && bits & 0x00ff_ffff != 0).then(|| ((bits & 0x00ff_ffff) - 1, addr.port()))
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    interrupt::install();
    let bin = daemon::causeway_bin(args.causeway.clone())?;
    ensure!(!args.sites.is_empty(), "--sites is empty");
    for &n in &args.sites {
        ensure!(
            (MAX_PEERS + 1..=100_000).contains(&n),
            "--sites: {n} is not between {} and 100000",
            MAX_PEERS + 1
        );
    }
    ensure!(
        args.churn_percent > 0.0 && args.churn_percent <= 100.0,
        "--churn-percent must be in (0, 100]"
    );
    ensure!(
        args.payload >= 16 && args.payload <= 65_535,
        "--payload must be 16 to 65535 bytes"
    );
    let mut sizes = Vec::new();
    for &n in &args.sites {
        eprintln!("rendezvous: {n} sites…");
        let size = run_size(&bin, n, &args)?;
        if !args.json {
            print_size(&size);
        }
        sizes.push(size);
    }
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        date: procfs::utc_now(),
        machine: procfs::Machine::this(),
        sizes,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn print_size(s: &SizeReport) {
    let g = &s.generator;
    let goal = |ok: bool| if ok { "goal met" } else { "GOAL MISSED" };
    println!(
        "{} sites, {} mutual pairs: {} welcomed, {} registered in {:.1} s (dial→welcome p50 {:.1} ms, p99 {:.1} ms; {} failed dials)",
        s.sites,
        s.pairs,
        g.welcomed,
        g.registered,
        g.setup_seconds,
        g.setup_welcome.p50_ms,
        g.setup_welcome.p99_ms,
        g.dial_failures
    );
    println!(
        "  churn {:.0} s: {} reconnects, {} re-registrations; register→peer_update p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} updates (goal p99 <= 100 ms: {}); missing {}, superseded {}, excused {}; stale views {} of {}",
        g.churn_seconds,
        g.reconnects,
        g.reregistrations,
        g.churn_latency.p50_ms,
        g.churn_latency.p90_ms,
        g.churn_latency.p99_ms,
        g.churn_latency.max_ms,
        g.churn_latency.count,
        goal(g.churn_latency.p99_ms <= 100.0),
        g.missing,
        g.superseded,
        g.excused,
        g.views_stale,
        g.views_checked
    );
    println!(
        "  memory {:.1} MiB before, {:.1} MiB registered: {:.1} KiB per site (goal <= 20 KiB: {}); peak {:.1} MiB",
        s.rss_before_kib as f64 / 1024.0,
        s.rss_registered_kib as f64 / 1024.0,
        s.rss_per_site_kib,
        goal(s.rss_per_site_kib <= 20.0),
        s.rss_peak_kib as f64 / 1024.0
    );
    println!(
        "  rendezvous CPU ({} threads, pinned to CPU {}): setup {:.1} %, idle {:.1} %, churn {:.1} %, relay {:.1} % of a core; generator setup {:.1} %, churn {:.1} %, relay {:.1} %",
        s.rendezvous_threads,
        s.rendezvous_cpu,
        s.cpu_setup_percent,
        s.cpu_idle_percent,
        s.cpu_churn_percent,
        s.cpu_relay_percent,
        s.generator_cpu_setup_percent,
        s.generator_cpu_churn_percent,
        s.generator_cpu_relay_percent
    );
    let r = &g.relay;
    println!(
        "  relay {} pairs, {} B payloads ({} datagram(s) each), {:.0} s: {:.0} packets/s, {:.1} Mbit/s delivered ({} of {} sent); per pair {:.2}–{:.2} Mbit/s, Jain {:.3}, {} silent",
        r.pairs,
        r.payload_bytes,
        r.datagrams_per_packet,
        r.seconds,
        r.packets_per_second,
        r.mbit_per_second,
        r.received_packets,
        r.sent_packets,
        r.min_pair_mbit,
        r.max_pair_mbit,
        r.jain,
        r.silent_pairs
    );
    println!(
        "  CPUs busy (all processes) idle {:.0?} %, churn {:.0?} %, relay {:.0?} %",
        s.cpus_busy_idle_percent, s.cpus_busy_churn_percent, s.cpus_busy_relay_percent
    );
    println!(
        "  UDP receive-buffer drops (rendezvous, generator): {:?} in all, {:?} during churn",
        s.udp_rcvbuf_drops, s.udp_rcvbuf_drops_churn
    );
    println!(
        "  waiting for a CPU during churn (rendezvous, generator): {:.0} ms, {:.0} ms",
        s.runqueue_wait_churn_ms.0, s.runqueue_wait_churn_ms.1
    );
    println!("  rendezvous counters {:?}", s.rendezvous_counters);
    if !g.errors.is_empty() {
        println!("  errors {:?}", g.errors);
    }
}

/// Pins every thread of process `pid` to `cpu`.
fn pin(pid: u32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes in it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("the threads of {pid}"))?;
    for task in tasks {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        // SAFETY: a valid set of the size given.
        let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
        ensure!(
            rc == 0,
            "sched_setaffinity({tid}, CPU {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn threads(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count() as u64)
}

/// The rendezvous' and the generator's CPU seconds at one moment.
#[derive(Clone)]
struct Mark {
    at: Instant,
    rendezvous: f64,
    generator: f64,
    /// The rendezvous' `VmRSS`, KiB.
    rss_kib: u64,
    /// Busy and total jiffies of each CPU (`/proc/stat`).
    cpus: Vec<(u64, u64)>,
    /// UDP datagrams dropped for want of receive buffer (`RcvbufErrors`
    /// of `/proc/<pid>/net/snmp`) in the rendezvous' and the generator's
    /// namespaces.
    udp_drops: (u64, u64),
    /// Time spent runnable but waiting for a CPU (`/proc/<pid>/schedstat`),
    /// ns: (rendezvous, generator).
    runqueue_wait_ns: (u64, u64),
}

/// Nanoseconds process `pid` (its main thread) has waited on a run queue.
fn runqueue_wait_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// `Udp: RcvbufErrors` of the network namespace of process `pid`.
fn udp_rcvbuf_errors(pid: u32) -> u64 {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).unwrap_or_default();
    crate::lab::procfs::snmp_udp_field(&snmp, "RcvbufErrors").unwrap_or(0)
}

/// Busy and total jiffies of each CPU, from `/proc/stat`.
fn cpu_jiffies() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            // idle and iowait are not busy.
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

impl Mark {
    fn take(rendezvous: u32, generator: u32) -> Mark {
        Mark {
            at: Instant::now(),
            rendezvous: procfs::cpu_seconds(rendezvous).unwrap_or(0.0),
            generator: procfs::cpu_seconds(generator).unwrap_or(0.0),
            rss_kib: procfs::rss_kib(rendezvous).unwrap_or(0),
            cpus: cpu_jiffies(),
            udp_drops: (udp_rcvbuf_errors(rendezvous), udp_rcvbuf_errors(generator)),
            runqueue_wait_ns: (runqueue_wait_ns(rendezvous), runqueue_wait_ns(generator)),
        }
    }
}

/// How busy each CPU was between two marks, % (every process and the
/// kernel: what the rendezvous and the generator did not use of their CPU
/// went to other work on the machine).
fn cpus_busy(a: Option<&Mark>, b: Option<&Mark>) -> Vec<f64> {
    let (Some(a), Some(b)) = (a, b) else {
        return Vec::new();
    };
    a.cpus
        .iter()
        .zip(&b.cpus)
        .map(|(&(b0, t0), &(b1, t1))| 100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64)
        .collect()
}

/// UDP receive-buffer drops between two marks: (rendezvous, generator).
fn drops(a: Option<&Mark>, b: Option<&Mark>) -> (u64, u64) {
    match (a, b) {
        (Some(a), Some(b)) => (
            b.udp_drops.0.saturating_sub(a.udp_drops.0),
            b.udp_drops.1.saturating_sub(a.udp_drops.1),
        ),
        _ => (0, 0),
    }
}

/// Run-queue wait between two marks, ms: (rendezvous, generator).
fn waited(a: Option<&Mark>, b: Option<&Mark>) -> (f64, f64) {
    match (a, b) {
        (Some(a), Some(b)) => (
            b.runqueue_wait_ns.0.saturating_sub(a.runqueue_wait_ns.0) as f64 / 1e6,
            b.runqueue_wait_ns.1.saturating_sub(a.runqueue_wait_ns.1) as f64 / 1e6,
        ),
        _ => (0.0, 0.0),
    }
}

/// CPU between two marks, % of one core: (rendezvous, generator).
fn cpu_between(a: Option<&Mark>, b: Option<&Mark>) -> (f64, f64) {
    let (Some(a), Some(b)) = (a, b) else {
        return (0.0, 0.0);
    };
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    (
        100.0 * (b.rendezvous - a.rendezvous) / secs,
        100.0 * (b.generator - a.generator) / secs,
    )
}

fn run_size(bin: &Path, n: usize, args: &Args) -> anyhow::Result<SizeReport> {
    let lab = Lab::build(&LabSpec {
        sites: vec![SiteSpec::new("loadgen", vec!["10.0.0.0/16".parse()?])],
    })
    .context("building the lab (are you root?)")?;
    let site = lab.site("loadgen");
    let IpAddr::V4(public) = site.public_addr else {
        bail!("the load generator has no IPv4 address");
    };
    // More source addresses on the generator's link (the internet router
    // reaches its whole /24).
    let [a, b, c, _] = public.octets();
    let sources: Vec<IpAddr> = (0..SOURCES)
        .map(|k| IpAddr::V4(Ipv4Addr::new(a, b, c, 100 + k as u8)))
        .collect();
    let batch: String = sources
        .iter()
        .map(|ip| format!("addr add {ip}/24 dev wan0\n"))
        .collect();
    site.gateway
        .run_with_input("ip", &["-batch", "-"], &batch)?;

    let tmp = tempfile::tempdir()?;
    let secrets: Vec<StaticSecret> = (0..n).map(|_| keys::generate()).collect();
    let keys_file = tmp.path().join("sites.keys");
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&keys_file)?;
        for s in &secrets {
            writeln!(f, "{}", keys::encode_private(s))?;
        }
    }
    let names: Vec<(String, String)> = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("site{i}"), keys::encode_public(&PublicKey::from(s))))
        .collect();
    let sites: Vec<(&str, &str)> = names
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let metrics = SocketAddr::new(lab.internet_addr().into(), METRICS_PORT);
    let rendezvous = Rendezvous::start_with(
        bin,
        &lab,
        &tmp.path().join("rendezvous"),
        &sites,
        "info",
        &["--metrics-listen", &metrics.to_string()],
        "",
    )?;
    let rdv = rendezvous.process.pid();
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rendezvous_cpu = 0;
    let generator_cpu = (nproc > 1).then_some(1);
    pin(rdv, rendezvous_cpu)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = procfs::rss_kib(rdv).context("the rendezvous' memory")?;

    let log = tmp.path().join("generator.log");
    let exe = std::env::current_exe()?;
    let mut cmd = site.gateway.command(daemon::path_str(&exe)?);
    cmd.arg("rendezvous-worker")
        .args(["--target", &rendezvous.pin.address.to_string()])
        .args(["--rendezvous-key", &rendezvous.pin.public_key])
        .arg("--keys")
        .arg(&keys_file)
        .args([
            "--sources",
            &sources
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ])
        .args(["--seed", &args.seed.to_string()])
        .args(["--idle", &args.idle.to_string()])
        .args(["--churn", &args.churn.to_string()])
        .args(["--churn-percent", &args.churn_percent.to_string()])
        .args(["--relay-pairs", &args.relay_pairs.to_string()])
        .args(["--relay-seconds", &args.relay_seconds.to_string()])
        .args(["--payload", &args.payload.to_string()]);
    if let Some(cpu) = generator_cpu {
        cmd.args(["--cpu", &cpu.to_string()]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?);
    let mut worker = site.gateway.spawn(&mut cmd)?;
    let gen_pid = worker.pid();
    let outcome = follow_worker(&mut worker, rdv, gen_pid, n, args);
    let rss_peak = procfs::peak_rss_kib(rdv).unwrap_or(0);
    let rendezvous_threads = threads(rdv);
    let counters = scrape_counters(&lab, metrics).unwrap_or_else(|e| {
        let mut m = BTreeMap::new();
        m.insert(format!("unavailable: {e:#}"), 0.0);
        m
    });
    let alive = procfs::rss_kib(rdv).is_some();
    let _ = worker.stop(Duration::from_secs(5));
    let rendezvous_log = rendezvous.log.clone();
    drop(rendezvous);
    let keep = |why: &str| {
        let dir = std::env::temp_dir().join(format!(
            "causeway-bench-rendezvous-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::copy(&log, dir.join("generator.log"));
        let _ = std::fs::copy(&rendezvous_log, dir.join("rendezvous.log"));
        eprintln!("rendezvous: {why}; logs kept in {}", dir.display());
    };
    drop(lab);
    let (marks, report) = match outcome {
        Ok(x) => x,
        Err(e) => {
            keep("the run failed");
            return Err(e);
        }
    };
    if args.keep_logs {
        keep("--keep-logs");
    }
    ensure!(alive, "the rendezvous died during the run");
    let mark = |name: &str| marks.get(name);
    let (cpu_setup, gen_setup) = cpu_between(mark("start"), mark("registered"));
    let (cpu_idle, _) = cpu_between(mark("idle_start"), mark("idle_end"));
    let (cpu_churn, gen_churn) = cpu_between(mark("churn_start"), mark("churn_end"));
    let (cpu_relay, gen_relay) = cpu_between(mark("relay_start"), mark("relay_end"));
    let rss_registered = mark("idle_end").map_or(0, |m| m.rss_kib);
    let graph = peer_graph(n, args.seed);
    let pairs = graph.iter().map(Vec::len).sum::<usize>() / 2;
    Ok(SizeReport {
        sites: n,
        pairs,
        sources: SOURCES,
        in_flight: IN_FLIGHT,
        rendezvous_threads,
        rendezvous_cpu,
        generator_cpu,
        rss_before_kib: rss_before,
        rss_registered_kib: rss_registered,
        rss_per_site_kib: rss_registered.saturating_sub(rss_before) as f64 / n as f64,
        rss_peak_kib: rss_peak,
        cpu_setup_percent: cpu_setup,
        cpu_idle_percent: cpu_idle,
        cpu_churn_percent: cpu_churn,
        cpu_relay_percent: cpu_relay,
        generator_cpu_setup_percent: gen_setup,
        generator_cpu_churn_percent: gen_churn,
        generator_cpu_relay_percent: gen_relay,
        cpus_busy_idle_percent: cpus_busy(mark("idle_start"), mark("idle_end")),
        cpus_busy_churn_percent: cpus_busy(mark("churn_start"), mark("churn_end")),
        cpus_busy_relay_percent: cpus_busy(mark("relay_start"), mark("relay_end")),
        udp_rcvbuf_drops: drops(mark("start"), mark("relay_end")),
        udp_rcvbuf_drops_churn: drops(mark("churn_start"), mark("churn_end")),
        runqueue_wait_churn_ms: waited(mark("churn_start"), mark("churn_end")),
        rendezvous_counters: counters,
        generator: report,
    })
}

/// Reads the generator's events (one JSON line each), marking CPU times at
/// each, until its report; fails on a stall or an interrupt.
fn follow_worker(
    worker: &mut ChildGuard,
    rdv: u32,
    gen_pid: u32,
    n: usize,
    args: &Args,
) -> anyhow::Result<(HashMap<String, Mark>, WorkerReport)> {
    let stdout = worker
        .child()
        .stdout
        .take()
        .context("the generator's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut marks = HashMap::new();
    marks.insert("start".to_owned(), Mark::take(rdv, gen_pid));
    // Generous: setup at a few hundred sites a second, the windows, the
    // relay, and slack for a busy machine.
    let budget = Duration::from_secs_f64(
        60.0 + n as f64 / 50.0 + args.idle + args.churn + args.relay_seconds + 30.0,
    );
    let deadline = Instant::now() + budget;
    loop {
        interrupt::check()?;
        ensure!(
            Instant::now() < deadline,
            "the generator did not finish within {budget:?}"
        );
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("a generator line: {line}"))?;
                if let Some(event) = v["event"].as_str() {
                    marks.insert(event.to_owned(), Mark::take(rdv, gen_pid));
                    eprintln!("rendezvous:   {line}");
                } else if v.get("report").is_some() {
                    let report: WorkerReport = serde_json::from_value(v["report"].clone())?;
                    return Ok((marks, report));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some(status) = worker.wait_timeout(Duration::ZERO)? {
                    bail!("the generator exited with {status} before its report");
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = worker.wait_timeout(Duration::from_secs(2))?;
                bail!("the generator ended its output before its report ({status:?})");
            }
        }
    }
}

/// The rendezvous' `causeway_rendezvous_abuse_total{what}` and
/// `causeway_rendezvous_pending_auth`, from its metrics endpoint.
fn scrape_counters(lab: &Lab, addr: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let text = lab
        .internet()
        .try_enter(move || -> anyhow::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })??;
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let key = if let Some(what) = name
            .strip_prefix("causeway_rendezvous_abuse_total{what=\"")
            .and_then(|r| r.strip_suffix("\"}"))
        {
            what.to_owned()
        } else if name == "causeway_rendezvous_pending_auth" {
            "pending_auth".to_owned()
        } else {
            continue;
        };
        if let Ok(v) = value.parse() {
            m.insert(key, v);
        }
    }
    Ok(m)
}

// ---------------------------------------------------------------------
// The generator.

/// `causeway-bench rendezvous-worker` options.
pub(crate) struct WorkerArgs {
    pub(crate) target: SocketAddr,
    pub(crate) rendezvous_key: String,
    pub(crate) keys: PathBuf,
    pub(crate) sources: Vec<IpAddr>,
    pub(crate) seed: u64,
    pub(crate) idle: f64,
    pub(crate) churn: f64,
    pub(crate) churn_percent: f64,
    pub(crate) relay_pairs: usize,
    pub(crate) relay_seconds: f64,
    pub(crate) payload: usize,
    pub(crate) cpu: Option<usize>,
}

/// Raises the soft open-files limit to the hard one (a connection per
/// site needs no file of its own here, but sockets and the runtime do).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn emit(line: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn event(name: &str) {
    emit(serde_json::json!({ "event": name }));
}

/// Runs the generator; prints events and, last, its report.
pub(crate) fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    if let Some(cpu) = args.cpu {
        pin(std::process::id(), cpu)?;
    }
    raise_nofile();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(generate(args))?;
    emit(serde_json::json!({ "report": report }));
    Ok(())
}

/// What one site's driver is told to do.
enum Cmd {
    Reregister,
    Reconnect,
}

/// What a site knows of one of its peers.
#[derive(Debug, Default, Clone, Copy)]
struct View {
    generation: u16,
    online: bool,
    relay_id: u32,
}

/// A `register` waiting for its peers' updates.
struct Pending {
    generation: u16,
    sent: Instant,
    timed: bool,
    /// Receivers not heard from yet, with their reconnect count at the send.
    waiting: Vec<(u32, u32)>,
}

#[derive(Default)]
struct Tracker {
    churning: bool,
    generation: Vec<u16>,
    epoch: Vec<u32>,
    connected: Vec<bool>,
    welcomed: Vec<bool>,
    registered: Vec<bool>,
    views: Vec<Vec<View>>,
    pending: HashMap<u32, VecDeque<Pending>>,
    pending_count: usize,
    latency_us: Vec<u64>,
    setup_welcome_us: Vec<u64>,
    churn_welcome_us: Vec<u64>,
    dial_failures: u64,
    superseded: u64,
    excused: u64,
    updates_online: u64,
    updates_offline: u64,
    errors: Vec<String>,
}

impl Tracker {
    fn error(&mut self, e: String) {
        if self.errors.len() < 10 {
            self.errors.push(e);
        }
    }

    /// Site `s` is about to send `register`; its new generation.
    fn registering(&mut self, graph: &[Vec<u32>], s: u32) -> u16 {
        let g = &mut self.generation[s as usize];
        *g = g.checked_add(1).unwrap_or(1);
        let generation = *g;
        let waiting = graph[s as usize]
            .iter()
            .map(|&r| (r, self.epoch[r as usize]))
            .collect();
        self.pending.entry(s).or_default().push_back(Pending {
            generation,
            sent: Instant::now(),
            timed: self.churning,
            waiting,
        });
        self.pending_count += 1;
        self.registered[s as usize] = true;
        generation
    }

    /// Site `r` heard about `s`.
    fn update(&mut self, graph: &[Vec<u32>], r: u32, s: u32, view: View, at: Instant) {
        let Some(pos) = graph[r as usize].iter().position(|&p| p == s) else {
            self.error(format!("site {r} heard about {s}, not its peer"));
            return;
        };
        self.views[r as usize][pos] = view;
        if !view.online {
            self.updates_offline += 1;
            return;
        }
        self.updates_online += 1;
        let epoch = self.epoch[r as usize];
        let Some(queue) = self.pending.get_mut(&s) else {
            return;
        };
        for p in queue.iter_mut() {
            if p.generation > view.generation {
                break;
            }
            let Some(i) = p.waiting.iter().position(|&(w, _)| w == r) else {
                continue;
            };
            let (_, then) = p.waiting.swap_remove(i);
            if p.generation < view.generation {
                self.superseded += 1;
            } else if then != epoch {
                self.excused += 1;
            } else if p.timed {
                self.latency_us
                    .push(at.duration_since(p.sent).as_micros() as u64);
            }
        }
        let before = queue.len();
        queue.retain(|p| !p.waiting.is_empty());
        self.pending_count -= before - queue.len();
        if queue.is_empty() {
            self.pending.remove(&s);
        }
    }
}

struct Shared {
    graph: Vec<Vec<u32>>,
    secrets: Vec<StaticSecret>,
    publics: Vec<String>,
    index: HashMap<[u8; 32], u32>,
    rendezvous: PublicKey,
    target: SocketAddr,
    endpoints: Vec<quinn::Endpoint>,
    limiter: Semaphore,
    tracker: Mutex<Tracker>,
    conns: Mutex<Vec<Option<quinn::Connection>>>,
}

impl Shared {
    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, Vec<Option<quinn::Connection>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn client_config() -> anyhow::Result<quinn::ClientConfig> {
    let mut config = abuse::client_config()?;
    let mut t = quinn::TransportConfig::default();
    // As a site: keep-alives every 5 s, 15 s idle timeout, no streams
    // accepted (docs/rendezvous.md).
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(Duration::from_secs(15).try_into()?));
    t.max_concurrent_bidi_streams(0u8.into());
    t.max_concurrent_uni_streams(0u8.into());
    config.transport_config(Arc::new(t));
    Ok(config)
}

/// Dials, says hello and reads the `welcome`, holding one of the
/// [`IN_FLIGHT`] places meanwhile.
async fn connect(
    shared: &Shared,
    s: u32,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let _permit = shared.limiter.acquire().await?;
    let started = Instant::now();
    let ep = &shared.endpoints[s as usize % shared.endpoints.len()];
    let attempt = async {
        let conn = ep.connect(shared.target, abuse::SERVER_NAME)?.await?;
        let hello = abuse::hello_frame(&conn, &shared.secrets[s as usize], &shared.rendezvous)?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&hello).await?;
        let welcome = abuse::read_frame(&mut recv).await?;
        ensure!(
            welcome["type"] == "welcome",
            "site {s} was not welcomed: {welcome}"
        );
        anyhow::Ok((conn, send, recv))
    };
    let out = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| anyhow::anyhow!("site {s}: no welcome within 10 s"))??;
    let us = started.elapsed().as_micros() as u64;
    let mut t = shared.tracker();
    if t.churning {
        t.churn_welcome_us.push(us);
    } else {
        t.setup_welcome_us.push(us);
    }
    t.welcomed[s as usize] = true;
    t.connected[s as usize] = true;
    Ok(out)
}

async fn send_register(
    shared: &Shared,
    s: u32,
    send: &mut quinn::SendStream,
) -> anyhow::Result<()> {
    let generation = shared.tracker().registering(&shared.graph, s);
    let c = candidate(s, generation);
    let site = s + 1;
    let peers: Vec<&str> = shared.graph[s as usize]
        .iter()
        .map(|&p| shared.publics[p as usize].as_str())
        .collect();
    let frame = abuse::frame(&serde_json::json!({
        "type": "register",
        "peers": peers,
        // Three candidates, as a site with a host, a server-reflexive and
        // an IPv6 address has; the first says who and when.
        "candidates": [
            c.to_string(),
            SocketAddr::new(Ipv4Addr::from(0xc633_6400 | (site & 0xff)).into(), generation).to_string(),
            SocketAddr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (site >> 16) as u16, site as u16).into(), generation).to_string(),
        ],
    }));
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads a site's control stream: every `peer_update` into the tracker.
async fn reader(shared: Arc<Shared>, r: u32, mut recv: quinn::RecvStream) {
    while let Ok(v) = abuse::read_frame(&mut recv).await {
        if v["type"] != "peer_update" {
            continue;
        }
        let at = Instant::now();
        let peer = v["peer"]
            .as_str()
            .and_then(|k| keys::decode_bytes(k).ok())
            .and_then(|k| shared.index.get(&k).copied());
        let Some(s) = peer else {
            shared
                .tracker()
                .error(format!("site {r}: an update about an unknown key: {v}"));
            continue;
        };
        let online = v["online"].as_bool().unwrap_or(false);
        let generation = v["candidates"][0]
            .as_str()
            .and_then(parse_candidate)
            .filter(|&(who, _)| who == s)
            .map(|(_, g)| g);
        let relay_id = v["relay_id"].as_u64().unwrap_or(0) as u32;
        let view = View {
            generation: generation.unwrap_or(0),
            online,
            relay_id,
        };
        if online && generation.is_none() {
            shared.tracker().error(format!(
                "site {r}: an update about {s} without its candidate: {v}"
            ));
            continue;
        }
        shared.tracker().update(&shared.graph, r, s, view, at);
    }
}

/// One site: connects, registers, then follows its commands.
async fn site(shared: Arc<Shared>, s: u32, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
    let mut failures = 0;
    'connect: loop {
        let (conn, mut send, recv) = match connect(&shared, s).await {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                {
                    let mut t = shared.tracker();
                    t.dial_failures += 1;
                    if failures >= 5 {
                        t.error(format!("site {s} gave up after 5 failed dials: {e:#}"));
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        shared.conns()[s as usize] = Some(conn.clone());
        let reading = tokio::spawn(reader(shared.clone(), s, recv));
        if let Err(e) = send_register(&shared, s, &mut send).await {
            shared.tracker().error(format!("site {s}: register: {e:#}"));
        }
        loop {
            match cmds.recv().await {
                Some(Cmd::Reregister) => {
                    if let Err(e) = send_register(&shared, s, &mut send).await {
                        shared.tracker().error(format!("site {s}: register: {e:#}"));
                    }
                }
                Some(Cmd::Reconnect) => {
                    {
                        let mut t = shared.tracker();
                        t.connected[s as usize] = false;
                        t.epoch[s as usize] += 1;
                    }
                    shared.conns()[s as usize] = None;
                    conn.close(0u32.into(), b"reconnecting");
                    let _ = reading.await;
                    continue 'connect;
                }
                None => {
                    conn.close(0u32.into(), b"done");
                    reading.abort();
                    return;
                }
            }
        }
    }
}

async fn generate(args: WorkerArgs) -> anyhow::Result<WorkerReport> {
    let text = std::fs::read_to_string(&args.keys)?;
    let secrets: Vec<StaticSecret> = text
        .lines()
        .map(|l| keys::decode_private(l.trim()))
        .collect::<Result<_, _>>()?;
    let n = secrets.len();
    ensure!(n > MAX_PEERS, "{n} sites are too few");
    let publics: Vec<PublicKey> = secrets.iter().map(PublicKey::from).collect();
    let index = publics
        .iter()
        .enumerate()
        .map(|(i, p)| (p.to_bytes(), i as u32))
        .collect();
    let graph = peer_graph(n, args.seed);
    let config = client_config()?;
    let endpoints = args
        .sources
        .iter()
        .map(|&ip| {
            let mut ep = abuse::endpoint_at(SocketAddr::new(ip, 0))?;
            ep.set_default_client_config(config.clone());
            anyhow::Ok(ep)
        })
        .collect::<Result<Vec<_>, _>>()?;
    ensure!(!endpoints.is_empty(), "no --sources");
    let tracker = Tracker {
        generation: vec![0; n],
        epoch: vec![0; n],
        connected: vec![false; n],
        welcomed: vec![false; n],
        registered: vec![false; n],
        views: graph
            .iter()
            .map(|p| vec![View::default(); p.len()])
            .collect(),
        ..Tracker::default()
    };
    let shared = Arc::new(Shared {
        publics: publics.iter().map(keys::encode_public).collect(),
        graph,
        secrets,
        index,
        rendezvous: keys::decode_public(&args.rendezvous_key)?,
        target: args.target,
        endpoints,
        limiter: Semaphore::new(IN_FLIGHT),
        tracker: Mutex::new(tracker),
        conns: Mutex::new(vec![None; n]),
    });

    // Setup: every site dials (IN_FLIGHT at a time) and registers.
    let started = Instant::now();
    let mut commands = Vec::with_capacity(n);
    let mut drivers = tokio::task::JoinSet::new();
    for s in 0..n as u32 {
        let (tx, rx) = mpsc::unbounded_channel();
        commands.push(tx);
        drivers.spawn(site(shared.clone(), s, rx));
    }
    let setup_budget = Duration::from_secs_f64(30.0 + n as f64 / 50.0);
    let settled = wait_settled(&shared, n, setup_budget).await;
    let setup_seconds = started.elapsed().as_secs_f64();
    event("registered");
    if !settled {
        shared
            .tracker()
            .error(format!("setup did not settle within {setup_budget:?}"));
    }

    event("idle_start");
    tokio::time::sleep(Duration::from_secs_f64(args.idle)).await;
    event("idle_end");

    // Churn, paced evenly.
    let mut rng = SplitMix::new(args.seed ^ 0x00c0_ffee);
    let rate = n as f64 * args.churn_percent / 100.0;
    let total = (rate * args.churn).round() as u64;
    let (mut reconnects, mut reregistrations) = (0, 0);
    shared.tracker().churning = true;
    event("churn_start");
    let churn_started = tokio::time::Instant::now();
    for k in 0..total {
        tokio::time::sleep_until(churn_started + Duration::from_secs_f64(k as f64 / rate)).await;
        // A site that is not in the middle of reconnecting.
        let mut s = rng.below(n);
        for _ in 0..16 {
            if shared.tracker().connected[s] {
                break;
            }
            s = rng.below(n);
        }
        let cmd = if k % 2 == 0 {
            reconnects += 1;
            Cmd::Reconnect
        } else {
            reregistrations += 1;
            Cmd::Reregister
        };
        let _ = commands[s].send(cmd);
    }
    tokio::time::sleep_until(churn_started + Duration::from_secs_f64(args.churn)).await;
    let churn_seconds = churn_started.elapsed().as_secs_f64();
    event("churn_end");
    shared.tracker().churning = false;
    // Let the last reconnections and updates arrive.
    wait_settled(&shared, n, Duration::from_secs(15)).await;

    let (views_checked, views_stale) = {
        let t = shared.tracker();
        let mut checked = 0;
        let mut stale = 0;
        for (r, peers) in shared.graph.iter().enumerate() {
            for (pos, &s) in peers.iter().enumerate() {
                checked += 1;
                let v = t.views[r][pos];
                if !v.online || v.generation != t.generation[s as usize] {
                    stale += 1;
                }
            }
        }
        (checked, stale)
    };

    let relay = relay(&shared, &args).await;

    // Every site closes its connection; one still dialling is abandoned.
    drop(commands);
    let closing = async { while drivers.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(3), closing)
        .await
        .is_err()
    {
        drivers.abort_all();
    }
    for ep in &shared.endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    }

    let mut t = shared.tracker();
    let missing = t
        .pending
        .values()
        .flat_map(|q| q.iter())
        .map(|p| p.waiting.len() as u64)
        .sum();
    Ok(WorkerReport {
        sites: n,
        welcomed: t.welcomed.iter().filter(|&&w| w).count(),
        registered: t.registered.iter().filter(|&&w| w).count(),
        dial_failures: t.dial_failures,
        setup_seconds,
        setup_welcome: Percentiles::of_micros(std::mem::take(&mut t.setup_welcome_us)),
        churn_welcome: Percentiles::of_micros(std::mem::take(&mut t.churn_welcome_us)),
        churn_seconds,
        reconnects,
        reregistrations,
        churn_latency: Percentiles::of_micros(std::mem::take(&mut t.latency_us)),
        missing,
        superseded: t.superseded,
        excused: t.excused,
        updates_online: t.updates_online,
        updates_offline: t.updates_offline,
        views_checked,
        views_stale,
        relay,
        errors: std::mem::take(&mut t.errors),
    })
}

/// Waits until every site is connected and registered and no update is
/// awaited; whether that happened within `budget`.
async fn wait_settled(shared: &Shared, n: usize, budget: Duration) -> bool {
    let deadline = Instant::now() + budget;
    loop {
        {
            let t = shared.tracker();
            let connected = t.connected.iter().filter(|&&c| c).count();
            if connected == n && t.pending_count == 0 {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Relay datagrams of one packet (fragmented at `max` bytes a datagram).
fn relay_datagrams(dst: u32, packet_id: u32, payload: &[u8], max: usize) -> Vec<bytes::Bytes> {
    let chunk = max.saturating_sub(RELAY_HEADER).max(1);
    let total = payload.len() as u16;
    payload
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let mut d = Vec::with_capacity(RELAY_HEADER + part.len());
            d.push(0x01);
            d.extend_from_slice(&dst.to_be_bytes());
            d.extend_from_slice(&packet_id.to_be_bytes());
            d.extend_from_slice(&total.to_be_bytes());
            d.extend_from_slice(&((i * chunk) as u16).to_be_bytes());
            d.extend_from_slice(part);
            bytes::Bytes::from(d)
        })
        .collect()
}

/// The relay window: each pair sends both ways as fast as QUIC allows.
async fn relay(shared: &Arc<Shared>, args: &WorkerArgs) -> RelayReport {
    event("relay_start");
    let pairs = relay_pairs(&shared.graph, args.relay_pairs);
    let window = Duration::from_secs_f64(args.relay_seconds);
    let deadline = tokio::time::Instant::now() + window;
    let payload = vec![0x5a; args.payload];
    let mut senders = tokio::task::JoinSet::new();
    let mut receivers = tokio::task::JoinSet::new();
    let mut datagrams_per_packet = 1;
    for (k, &(a, b)) in pairs.iter().enumerate() {
        for (from, to) in [(a, b), (b, a)] {
            let (conn_from, conn_to, dst) = {
                let conns = shared.conns();
                let t = shared.tracker();
                let pos = shared.graph[from as usize]
                    .iter()
                    .position(|&p| p == to)
                    .unwrap_or(0);
                (
                    conns[from as usize].clone(),
                    conns[to as usize].clone(),
                    t.views[from as usize][pos].relay_id,
                )
            };
            let (Some(conn_from), Some(conn_to)) = (conn_from, conn_to) else {
                continue;
            };
            let max = conn_from.max_datagram_size().unwrap_or(1200);
            datagrams_per_packet = datagrams_per_packet.max(
                args.payload
                    .div_ceil(max.saturating_sub(RELAY_HEADER).max(1)),
            );
            let payload = payload.clone();
            senders.spawn(async move {
                let mut sent = 0u64;
                let mut id = 0u32;
                'send: while tokio::time::Instant::now() < deadline {
                    let max = conn_from.max_datagram_size().unwrap_or(1200);
                    for d in relay_datagrams(dst, id, &payload, max) {
                        let send = conn_from.send_datagram_wait(d);
                        match tokio::time::timeout_at(deadline, send).await {
                            Ok(Ok(())) => {}
                            _ => break 'send,
                        }
                    }
                    id = id.wrapping_add(1);
                    sent += 1;
                }
                sent
            });
            receivers.spawn(async move {
                let (mut packets, mut bytes) = (0u64, 0u64);
                let until = deadline + Duration::from_millis(500);
                while let Ok(Ok(d)) = tokio::time::timeout_at(until, conn_to.read_datagram()).await
                {
                    if d.len() < RELAY_HEADER || d[0] != 0x01 {
                        continue;
                    }
                    if d[11] == 0 && d[12] == 0 {
                        packets += 1;
                    }
                    bytes += (d.len() - RELAY_HEADER) as u64;
                }
                (k, packets, bytes)
            });
        }
    }
    let mut sent_packets = 0;
    while let Some(r) = senders.join_next().await {
        sent_packets += r.unwrap_or(0);
    }
    event("relay_end");
    let mut per_pair = vec![0u64; pairs.len()];
    let mut received_packets = 0;
    while let Some(r) = receivers.join_next().await {
        if let Ok((k, packets, bytes)) = r {
            received_packets += packets;
            per_pair[k] += bytes;
        }
    }
    let secs = window.as_secs_f64();
    let mbit = |bytes: u64| bytes as f64 * 8.0 / secs / 1e6;
    let values: Vec<f64> = per_pair.iter().map(|&b| mbit(b)).collect();
    RelayReport {
        pairs: pairs.len(),
        payload_bytes: args.payload,
        seconds: secs,
        datagrams_per_packet,
        sent_packets,
        received_packets,
        packets_per_second: received_packets as f64 / secs,
        mbit_per_second: values.iter().sum(),
        jain: jain(&values),
        min_pair_mbit: values.iter().copied().reduce(f64::min).unwrap_or(0.0),
        max_pair_mbit: values.iter().copied().fold(0.0, f64::max),
        silent_pairs: per_pair.iter().filter(|&&b| b == 0).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_graph_is_mutual_bounded_and_deterministic() {
        for (n, seed) in [(11, 1), (200, 7), (5000, 42)] {
            let g = peer_graph(n, seed);
            assert_eq!(g, peer_graph(n, seed), "deterministic");
            assert_eq!(g.len(), n);
            for (i, peers) in g.iter().enumerate() {
                assert!(
                    (MIN_PEERS..=MAX_PEERS).contains(&peers.len()),
                    "n {n}: site {i} has {} peers",
                    peers.len()
                );
                for &p in peers {
                    assert_ne!(p as usize, i, "no site lists itself");
                    assert!(g[p as usize].contains(&(i as u32)), "mutual");
                    assert_eq!(peers.iter().filter(|&&q| q == p).count(), 1, "once");
                }
            }
        }
        assert_ne!(peer_graph(200, 1), peer_graph(200, 2));
    }

    #[test]
    fn relay_pairs_are_disjoint_mutual_peers() {
        let g = peer_graph(1000, 3);
        let pairs = relay_pairs(&g, 100);
        assert_eq!(pairs.len(), 100);
        let mut seen = std::collections::HashSet::new();
        for (a, b) in pairs {
            assert!(g[a as usize].contains(&b));
            assert!(seen.insert(a) && seen.insert(b), "disjoint");
        }
    }

    #[test]
    fn candidates_name_their_site_and_generation() {
        for (s, g) in [(0, 1), (9_999, 65_535), (70_000, 7)] {
            let c = candidate(s, g).to_string();
            assert_eq!(parse_candidate(&c), Some((s, g)), "{c}");
        }
        assert_eq!(parse_candidate("198.51.100.1:5"), None);
        assert_eq!(parse_candidate("[2001:db8::1]:5"), None);
        assert_eq!(parse_candidate("nonsense"), None);
    }

    #[test]
    fn jain_is_one_when_fair_and_one_over_n_when_not() {
        assert!((jain(&[3.0, 3.0, 3.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        assert!((jain(&[1.0, 2.0]) - 0.9).abs() < 1e-12);
        assert_eq!(jain(&[]), 1.0);
    }

    #[test]
    fn percentiles_are_nearest_rank_in_ms() {
        let p = Percentiles::of_micros((1..=1000).rev().map(|x| x * 1000).collect());
        assert_eq!(p.count, 1000);
        assert_eq!(p.p50_ms, 500.0);
        assert_eq!(p.p90_ms, 900.0);
        assert_eq!(p.p99_ms, 990.0);
        assert_eq!(p.max_ms, 1000.0);
        assert_eq!(Percentiles::of_micros(vec![]).p99_ms, 0.0);
    }

    #[test]
    fn relay_datagrams_follow_the_wire_format_and_fragment() {
        let payload: Vec<u8> = (0..=255).collect();
        let one = relay_datagrams(0x0102_0304, 9, &payload, 1200);
        assert_eq!(one.len(), 1);
        assert_eq!(&one[0][..13], &[1, 1, 2, 3, 4, 0, 0, 0, 9, 1, 0, 0, 0]);
        assert_eq!(&one[0][13..], &payload[..]);
        let frags = relay_datagrams(7, 1, &payload, 13 + 100);
        assert_eq!(frags.len(), 3);
        assert_eq!(&frags[2][11..13], &200u16.to_be_bytes());
        assert_eq!(frags[2].len(), 13 + 56);
    }

    #[test]
    fn the_tracker_times_supersedes_and_excuses() {
        // Sites 0 and 1 peer with each other (and 2 with both).
        let graph = vec![vec![1, 2], vec![0, 2], vec![0, 1]];
        let mut t = Tracker {
            generation: vec![0; 3],
            epoch: vec![0; 3],
            registered: vec![false; 3],
            views: graph
                .iter()
                .map(|p| vec![View::default(); p.len()])
                .collect(),
            churning: true,
            ..Tracker::default()
        };
        let g1 = t.registering(&graph, 0);
        let g2 = t.registering(&graph, 0);
        let view = |generation| View {
            generation,
            online: true,
            relay_id: 5,
        };
        // Site 1 hears only the newer one: the older is superseded.
        t.update(&graph, 1, 0, view(g2), Instant::now());
        assert_eq!((t.superseded, t.latency_us.len()), (1, 1));
        // Site 2 reconnected meanwhile: excused, not timed.
        t.epoch[2] += 1;
        t.update(&graph, 2, 0, view(g1), Instant::now());
        t.update(&graph, 2, 0, view(g2), Instant::now());
        assert_eq!((t.excused, t.latency_us.len()), (2, 1));
        assert_eq!(t.pending_count, 0);
        assert!(t.pending.is_empty());
        assert_eq!(t.views[1][0].generation, g2);
    }
}
