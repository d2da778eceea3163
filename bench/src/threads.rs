//! `causeway-bench threads`: how the data path's per-packet crypto grows
//! with threads, without system calls (issue 13, "many cores").
//!
//! Every thread does what one outbound thread and one inbound thread do
//! to a segment, batch after batch: lock the sending peer, boringtun
//! `encapsulate` of an MTU-size IPv4 packet into an arena, unlock; then
//! lock the receiving peer, `decapsulate` each datagram, unlock, and check
//! the packet came back whole. Keys come from a real handshake between two
//! `Tunn`s. Two ways of sharing:
//!
//! - **peer per thread**: each thread has its own pair of `Tunn`s (its own
//!   peer, its own session): what per-peer sharding gives, the upper bound;
//! - **one peer**: every thread goes through the same pair, each `Tunn`
//!   behind one mutex as `core::PeerState` is: what a multi-queue data path
//!   gets for a single big peer with boringtun's API (`&mut self`) as it is.
//!
//! Runs are interleaved (run 1 measures every thread count, then run 2, …)
//! and each run's figure is also divided by the one-thread figure of the
//! same run, so the drift of a shared machine hits every count alike.

use std::net::Ipv4Addr;
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::ensure;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::Serialize;

use crate::stats::median_min_max;

/// Packets per batch (the inbound thread decrypts up to 128 per batch,
/// the outbound thread encrypts up to 256 segments).
const BATCH: usize = 64;
/// WireGuard's data message overhead (header, counter, tag), and the
/// 148 bytes boringtun wants at least in a destination buffer.
const WG_OVERHEAD: usize = 32;
const MIN_DST: usize = 148;

pub(crate) struct Args {
    pub(crate) threads: Vec<usize>,
    pub(crate) runs: u32,
    pub(crate) seconds: f64,
    pub(crate) len: usize,
    pub(crate) json: bool,
}

/// How the threads share peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Sharing {
    /// Each thread its own peer (session).
    PeerPerThread,
    /// All threads one peer, each `Tunn` behind a mutex.
    OnePeer,
}

impl Sharing {
    const ALL: [Sharing; 2] = [Sharing::PeerPerThread, Sharing::OnePeer];

    fn name(self) -> &'static str {
        match self {
            Sharing::PeerPerThread => "peer per thread",
            Sharing::OnePeer => "one peer",
        }
    }
}

/// What one measurement (one thread count, one sharing, one run) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub(crate) struct Sample {
    /// Plaintext bytes encrypted and decrypted back intact, all threads.
    pub(crate) bytes: u64,
    /// Packets decapsulate refused or changed (e.g. outside the replay
    /// window when threads of one peer drift apart).
    pub(crate) rejected: u64,
    /// Of those, the ones boringtun refused as too far behind the newest
    /// counter it saw (`InvalidCounter`: outside its replay window).
    pub(crate) too_old: u64,
    /// Wall-clock seconds from the common start to the last thread's end.
    pub(crate) seconds: f64,
    /// CPU seconds the worker threads got, all together: on a shared
    /// machine, fewer than threads × seconds.
    pub(crate) cpu_seconds: f64,
}

impl Sample {
    pub(crate) fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }

    /// CPUs busy on average: CPU seconds over wall seconds.
    pub(crate) fn cpus(&self) -> f64 {
        self.cpu_seconds / self.seconds
    }

    /// Gbit/s per CPU busy: flat as threads grow when the work itself
    /// scales and only the CPUs available limit it.
    pub(crate) fn gbps_per_cpu(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.cpu_seconds / 1e9
    }
}

/// CPU time of the calling thread, in seconds.
fn this_thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A sending and a receiving `Tunn` with an established session (the
/// handshake and the first keepalive exchanged in memory), each behind a
/// mutex. `seed` picks the keys, so peers of different threads differ.
pub(crate) struct Pair {
    sender: Mutex<Tunn>,
    receiver: Mutex<Tunn>,
}

impl Pair {
    pub(crate) fn new(seed: u8) -> anyhow::Result<Self> {
        let secret = |b: u8| StaticSecret::from([b; 32]);
        let (sa, sb) = (
            secret(seed.wrapping_mul(2)),
            secret(seed.wrapping_mul(2) ^ 1),
        );
        let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
        let index = u32::from(seed) << 8;
        let mut a = Tunn::new(sa, pb, None, None, index, None);
        let mut b = Tunn::new(sb, pa, None, None, index + 1, None);
        let (mut buf, mut out) = (vec![0u8; 2048], vec![0u8; 2048]);
        let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, false)
        else {
            anyhow::bail!("no handshake initiation");
        };
        let TunnResult::WriteToNetwork(response) = b.decapsulate(None, init, &mut out) else {
            anyhow::bail!("no handshake response");
        };
        let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(None, response, &mut buf) else {
            anyhow::bail!("no keepalive after the handshake");
        };
        ensure!(
            matches!(b.decapsulate(None, keepalive, &mut out), TunnResult::Done),
            "keepalive not accepted"
        );
        Ok(Pair {
            sender: Mutex::new(a),
            receiver: Mutex::new(b),
        })
    }
}

fn lock(m: &Mutex<Tunn>) -> MutexGuard<'_, Tunn> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The one's-complement sum of an IPv4 header's 16-bit words.
fn header_sum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An IPv4/UDP packet of `len` bytes (at least 28) with a valid header
/// checksum and a payload that differs per `flow`.
pub(crate) fn ipv4_packet(len: usize, flow: u16) -> Vec<u8> {
    let len = len.clamp(28, usize::from(u16::MAX));
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&Ipv4Addr::new(10, 0, 1, 2).octets());
    p[16..20].copy_from_slice(&Ipv4Addr::new(10, 1, 1, 2).octets());
    let sum = header_sum(&p[..20]);
    p[10..12].copy_from_slice(&(!sum).to_be_bytes());
    p[20..22].copy_from_slice(&(40_000 + flow).to_be_bytes());
    p[22..24].copy_from_slice(&5211u16.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    for (i, b) in p[28..].iter_mut().enumerate() {
        *b = (i as u8) ^ (flow as u8);
    }
    p
}

/// What one thread's loop did.
#[derive(Default)]
struct Counts {
    bytes: u64,
    rejected: u64,
    too_old: u64,
}

/// One thread's loop: batches of `BATCH` packets through `pair` until
/// `deadline`.
fn worker(pair: &Pair, plain: &[u8], deadline: Instant) -> Counts {
    let slot = (plain.len() + WG_OVERHEAD).max(MIN_DST);
    let mut arena = vec![0u8; BATCH * slot];
    let mut lens = [0usize; BATCH];
    let mut decrypted = vec![0u8; slot];
    let mut counts = Counts::default();
    while Instant::now() < deadline {
        for (i, chunk) in arena.chunks_exact_mut(slot).enumerate() {
            lens[i] = match lock(&pair.sender).encapsulate(plain, chunk) {
                TunnResult::WriteToNetwork(d) => d.len(),
                _ => 0,
            };
        }
        for (i, chunk) in arena.chunks_exact(slot).enumerate() {
            if lens[i] == 0 {
                counts.rejected += 1;
                continue;
            }
            match lock(&pair.receiver).decapsulate(None, &chunk[..lens[i]], &mut decrypted) {
                TunnResult::WriteToTunnelV4(p, _) if p == plain => {
                    counts.bytes += plain.len() as u64
                }
                TunnResult::Err(WireGuardError::InvalidCounter) => {
                    counts.rejected += 1;
                    counts.too_old += 1;
                }
                _ => counts.rejected += 1,
            }
        }
    }
    counts
}

/// Runs `threads` workers for `seconds`, sharing peers as `sharing` says.
pub(crate) fn measure(
    threads: usize,
    sharing: Sharing,
    seconds: f64,
    len: usize,
) -> anyhow::Result<Sample> {
    ensure!(threads >= 1, "at least one thread");
    let pairs: Vec<Arc<Pair>> = match sharing {
        Sharing::OnePeer => {
            let shared = Arc::new(Pair::new(1)?);
            (0..threads).map(|_| Arc::clone(&shared)).collect()
        }
        Sharing::PeerPerThread => (0..threads)
            .map(|t| Pair::new(t as u8 + 1).map(Arc::new))
            .collect::<anyhow::Result<_>>()?,
    };
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = pairs
        .into_iter()
        .enumerate()
        .map(|(t, pair)| {
            let start = Arc::clone(&start);
            let plain = ipv4_packet(len, t as u16);
            std::thread::spawn(move || {
                start.wait();
                let cpu = this_thread_cpu_seconds();
                let deadline = Instant::now() + Duration::from_secs_f64(seconds);
                let counts = worker(&pair, &plain, deadline);
                (counts, Instant::now(), this_thread_cpu_seconds() - cpu)
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let mut sample = Sample::default();
    let mut end = t0;
    for h in handles {
        let (counts, done, cpu) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a worker thread panicked"))?;
        sample.cpu_seconds += cpu;
        sample.bytes += counts.bytes;
        sample.rejected += counts.rejected;
        sample.too_old += counts.too_old;
        end = end.max(done);
    }
    sample.seconds = end.duration_since(t0).as_secs_f64();
    Ok(sample)
}

/// One row of the report: a thread count and a sharing over every run.
#[derive(Debug, Serialize)]
pub(crate) struct Row {
    pub(crate) threads: usize,
    pub(crate) sharing: Sharing,
    /// Gbit/s of plaintext encrypted and decrypted, per run.
    pub(crate) gbps: Vec<f64>,
    /// CPUs the threads kept busy, per run.
    pub(crate) cpus: Vec<f64>,
    /// Gbit/s per CPU busy, per run.
    pub(crate) gbps_per_cpu: Vec<f64>,
    /// Each run's Gbit/s over the one-thread Gbit/s of the same sharing in
    /// the same run (empty without a one-thread count).
    pub(crate) vs_one_thread: Vec<f64>,
    pub(crate) rejected: Vec<u64>,
    pub(crate) too_old: Vec<u64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) cpus: usize,
    pub(crate) runs: u32,
    pub(crate) seconds: f64,
    pub(crate) packet_bytes: usize,
    pub(crate) rows: Vec<Row>,
}

/// Builds the rows from every run's samples, `samples[run][i]` measured
/// for `cells[i]`.
pub(crate) fn rows(cells: &[(usize, Sharing)], samples: &[Vec<Sample>]) -> Vec<Row> {
    cells
        .iter()
        .enumerate()
        .map(|(i, &(threads, sharing))| {
            let one = cells.iter().position(|&(t, s)| t == 1 && s == sharing);
            Row {
                threads,
                sharing,
                gbps: samples.iter().map(|run| run[i].gbps()).collect(),
                cpus: samples.iter().map(|run| run[i].cpus()).collect(),
                gbps_per_cpu: samples.iter().map(|run| run[i].gbps_per_cpu()).collect(),
                vs_one_thread: one
                    .map(|j| {
                        samples
                            .iter()
                            .map(|run| run[i].gbps() / run[j].gbps())
                            .collect()
                    })
                    .unwrap_or_default(),
                rejected: samples.iter().map(|run| run[i].rejected).collect(),
                too_old: samples.iter().map(|run| run[i].too_old).collect(),
            }
        })
        .collect()
}

/// The report as a Markdown table: median (min–max) over the runs.
pub(crate) fn table(report: &Report) -> String {
    let mmm = |v: &[f64], digits: usize| match median_min_max(v) {
        Some((m, lo, hi)) if v.len() > 1 => {
            format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
        }
        Some((m, _, _)) => format!("{m:.digits$}"),
        None => "—".into(),
    };
    let mut s = String::from(
        "| threads | peers | encrypt+decrypt Gbit/s | × 1 thread | CPUs busy | Gbit/s per CPU | rejected packets | of which too old |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &report.rows {
        let floats = |v: &[u64]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.threads,
            r.sharing.name(),
            mmm(&r.gbps, 2),
            mmm(&r.vs_one_thread, 2),
            mmm(&r.cpus, 2),
            mmm(&r.gbps_per_cpu, 2),
            mmm(&floats(&r.rejected), 0),
            mmm(&floats(&r.too_old), 0),
        );
    }
    s
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(
        args.seconds > 0.0 && args.seconds.is_finite(),
        "--seconds must be positive"
    );
    ensure!(
        !args.threads.is_empty() && args.threads.iter().all(|&t| (1..=256).contains(&t)),
        "--threads takes counts from 1 to 256"
    );
    ensure!(
        (28..=65_503).contains(&args.len),
        "--len must be 28 to 65503 bytes (an IPv4 packet that fits a WireGuard message)"
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cells: Vec<(usize, Sharing)> = Sharing::ALL
        .into_iter()
        .flat_map(|s| args.threads.iter().map(move |&t| (t, s)))
        .collect();
    let mut samples = Vec::new();
    for run in 0..args.runs {
        let mut this_run = Vec::new();
        for &(threads, sharing) in &cells {
            let sample = measure(threads, sharing, args.seconds, args.len)?;
            if !args.json {
                eprintln!(
                    "run {}/{}  {threads:>3} thread(s), {:<15}  {:>6.2} Gbit/s  {:.2} CPUs  rejected {} ({} too old)",
                    run + 1,
                    args.runs,
                    sharing.name(),
                    sample.gbps(),
                    sample.cpus(),
                    sample.rejected,
                    sample.too_old
                );
            }
            this_run.push(sample);
        }
        samples.push(this_run);
    }
    let report = Report {
        cpus,
        runs: args.runs,
        seconds: args.seconds,
        packet_bytes: args.len,
        rows: rows(&cells, &samples),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} CPU(s); {}-byte IPv4 packets, batches of {BATCH}; {} run(s) of {} s; median (min–max)\n",
            report.cpus, report.packet_bytes, report.runs, report.seconds
        );
        print!("{}", table(&report));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_come_back_intact_on_one_thread() {
        let s = measure(1, Sharing::PeerPerThread, 0.05, 1420).expect("measured");
        assert!(s.bytes > 0, "no packet went through");
        assert_eq!(s.bytes % 1420, 0);
        assert_eq!((s.rejected, s.too_old), (0, 0));
        assert!(s.gbps() > 0.0);
        // One thread keeps at most one CPU busy (a little slack for the
        // clocks' granularity).
        assert!(s.cpus() > 0.0 && s.cpus() < 1.05, "{s:?}");
    }

    #[test]
    fn threads_on_one_peer_deliver() {
        // Rejections are possible (the replay window) but most packets
        // of two threads of one peer must come back intact.
        let s = measure(2, Sharing::OnePeer, 0.05, 512).expect("measured");
        assert!(s.bytes / 512 > 10 * s.rejected, "{s:?}");
    }

    #[test]
    fn peers_of_different_threads_have_different_keys() {
        let (a, b) = (Pair::new(1).expect("pair"), Pair::new(2).expect("pair"));
        let plain = ipv4_packet(100, 0);
        let mut out = vec![0u8; 256];
        let TunnResult::WriteToNetwork(d) = lock(&a.sender).encapsulate(&plain, &mut out) else {
            panic!("no data message");
        };
        let d = d.to_vec();
        let mut dec = vec![0u8; 256];
        // Another session cannot open it.
        assert!(!matches!(
            lock(&b.receiver).decapsulate(None, &d, &mut dec),
            TunnResult::WriteToTunnelV4(..)
        ));
        assert!(matches!(
            lock(&a.receiver).decapsulate(None, &d, &mut dec),
            TunnResult::WriteToTunnelV4(p, _) if p == plain.as_slice()
        ));
    }

    #[test]
    fn packets_are_valid_ipv4() {
        let p = ipv4_packet(1420, 3);
        assert_eq!(p.len(), 1420);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 1420);
        // The header sums to 0xffff with its checksum (how a receiver
        // checks it).
        assert_eq!(header_sum(&p[..20]), 0xffff);
        assert_eq!(ipv4_packet(10, 0).len(), 28);
    }

    #[test]
    fn rows_divide_by_one_thread_of_the_same_run_and_sharing() {
        let s = |gbit: f64, rejected| Sample {
            bytes: (gbit * 1e9 / 8.0) as u64,
            rejected,
            too_old: rejected / 2,
            seconds: 1.0,
            cpu_seconds: 0.5,
        };
        let cells = [
            (1, Sharing::PeerPerThread),
            (2, Sharing::PeerPerThread),
            (2, Sharing::OnePeer),
        ];
        let samples = vec![
            vec![s(2.0, 0), s(4.0, 0), s(1.0, 3)],
            vec![s(1.0, 0), s(1.5, 0), s(1.0, 0)],
        ];
        let rows = rows(&cells, &samples);
        assert_eq!(rows[1].vs_one_thread, vec![2.0, 1.5]);
        // No one-thread cell of that sharing: no ratio.
        assert!(rows[2].vs_one_thread.is_empty());
        assert_eq!(rows[2].rejected, vec![3, 0]);
        let report = Report {
            cpus: 2,
            runs: 2,
            seconds: 1.0,
            packet_bytes: 1420,
            rows,
        };
        let t = table(&report);
        assert!(
            t.contains("| 2 | peer per thread | 2.75 (1.50–4.00) | 1.75 (1.50–2.00) | 0.50 (0.50–0.50) | 5.50 (3.00–8.00) | 0 (0–0) | 0 (0–0) |"),
            "{t}"
        );
        assert!(
            t.contains("| 2 | one peer | 1.00 (1.00–1.00) | — | 0.50 (0.50–0.50) | 2.00 (2.00–2.00) | 2 (0–3) | 0 (0–1) |"),
            "{t}"
        );
    }
}
