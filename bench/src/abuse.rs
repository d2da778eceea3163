//! `causeway-bench abuse`: the public rendezvous under attack, in a lab.
//!
//! The lab has a rendezvous on its internet router, a legitimate pair of
//! sites behind symmetric NATs (so that they can only meet through the
//! relay) running real `causeway up` daemons, and attacker sites directly on
//! the internet, each running `causeway-bench abuse-worker`:
//!
//! - *strangers* open connections, each from a new source port, and never
//!   authenticate: a third stay silent, a third announce a maximal (1 MiB)
//!   control frame and send as much of it as flow control lets through, a
//!   third send a hello-sized frame of garbage; all send 1.25 MB of
//!   maximal datagrams (quinn's default receive buffer) as fast as
//!   congestion control allows;
//! - a *flooder* holds a valid site key (listed in the rendezvous config):
//!   it authenticates once, floods registrations (2,000 bogus peers, 40
//!   candidates each) and replays its hello on new connections.
//!
//! While they run, the legitimate pair starts; the report gives the
//! rendezvous' peak memory and CPU, the pair's time to registration and to
//! the first packet relayed between them. Everything is bounded in count
//! and time; the lab is torn down at the end, as on any error.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use blake2::Blake2sMac256;
use blake2::digest::{FixedOutput, KeyInit, Update};
use causeway_common::keys;
use causeway_testbed::{ChildGuard, Lab, LabSpec, Nat, Netns, SiteSpec};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::interrupt;
use crate::lab::daemon::{
    self, KeyPair, PeerConfig, PeerPath, PeerStatus, Rendezvous, SiteConfig, SiteDir, through,
};
use crate::lab::procfs;

/// Both legitimate sites number their pods alike.
const POD_CIDR: &str = "10.0.0.0/16";
/// The rendezvous' ALPN and TLS server name.
pub(crate) const ALPN: &[u8] = b"causeway-rendezvous/1";
pub(crate) const SERVER_NAME: &str = "causeway-rendezvous";
/// How long the legitimate pair may take to get through before the run
/// counts as failed.
const GIVE_UP: Duration = Duration::from_secs(20);
/// Connection attempts one stranger keeps in flight.
const IN_FLIGHT: usize = 64;
/// Datagram bytes each stranger connection sends: quinn's default
/// datagram receive buffer (1.25 MB).
const DATAGRAM_BYTES: usize = 1_250_000;
/// Concurrent replayers of the valid site's hello.
const REPLAYERS: u32 = 4;
/// Bogus peers in each flooded registration.
const FLOOD_PEERS: usize = 2000;
/// Candidates in each flooded registration.
const FLOOD_CANDIDATES: u8 = 40;

/// `causeway-bench abuse` options.
pub(crate) struct Args {
    /// The `causeway` binary (default: next to this one).
    pub(crate) causeway: Option<PathBuf>,
    /// Connection attempts of all strangers together.
    pub(crate) connections: u32,
    /// Stranger sites (source addresses).
    pub(crate) strangers: u32,
    /// How long the attack lasts.
    pub(crate) seconds: f64,
    /// Print the report as JSON.
    pub(crate) json: bool,
}

/// What one run measured.
#[derive(Debug, Serialize)]
struct Report {
    /// Rendezvous resident memory before the attack, MiB.
    rss_before_mib: f64,
    /// Highest resident memory sampled every 20 ms during the run, MiB.
    rss_max_sampled_mib: f64,
    /// The kernel's high-water mark (`VmHWM`) at the end, MiB.
    rss_peak_mib: f64,
    /// Rendezvous CPU seconds (user + system) during the run.
    cpu_seconds: f64,
    /// From starting the pair's daemons until both were registered, ms.
    registration_ms: u64,
    /// From starting the daemons until site A's first packet relayed to
    /// site B was answered (first ping reply on the relay path), ms.
    first_relayed_ms: u64,
    /// The pair's path when it got through.
    path: String,
    /// What the attackers did and what they got.
    attack: WorkerReport,
}

/// What an attacker did, as its worker prints it (one JSON line).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct WorkerReport {
    /// Connection attempts made.
    attempts: u64,
    /// Attempts whose QUIC handshake completed.
    handshakes: u64,
    /// Attempts refused, or whose handshake failed.
    refused: u64,
    /// Attempts whose handshake did not finish within 3 s.
    stalled: u64,
    /// Pre-authentication bytes written on control streams.
    stream_bytes: u64,
    /// Datagrams sent before authentication.
    datagrams: u64,
    /// Registrations sent by the valid site.
    registrations: u64,
    /// Hellos replayed on new connections.
    replays: u64,
    /// Replayed hellos that were welcomed (must stay 0).
    replays_welcomed: u64,
    /// How the rendezvous closed connections: close code → count.
    closes: BTreeMap<String, u64>,
}

impl WorkerReport {
    fn add(&mut self, other: WorkerReport) {
        self.attempts += other.attempts;
        self.handshakes += other.handshakes;
        self.refused += other.refused;
        self.stalled += other.stalled;
        self.stream_bytes += other.stream_bytes;
        self.datagrams += other.datagrams;
        self.registrations += other.registrations;
        self.replays += other.replays;
        self.replays_welcomed += other.replays_welcomed;
        for (k, v) in other.closes {
            *self.closes.entry(k).or_default() += v;
        }
    }
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    interrupt::install();
    let bin = crate::lab::daemon::causeway_bin(args.causeway.clone())?;
    ensure!(
        (1..=16).contains(&args.strangers),
        "--strangers must be 1 to 16"
    );
    ensure!(
        args.seconds > 0.0 && args.seconds <= 120.0,
        "--seconds must be in (0, 120]"
    );
    let mut spec = vec![
        SiteSpec::new("pharma", vec![POD_CIDR.parse()?]).nat(Nat::Symmetric),
        SiteSpec::new("hospital", vec![POD_CIDR.parse()?]).nat(Nat::Symmetric),
        SiteSpec::new("flooder", vec![POD_CIDR.parse()?]),
    ];
    for i in 0..args.strangers {
        spec.push(SiteSpec::new(
            &format!("stranger{i}"),
            vec![POD_CIDR.parse()?],
        ));
    }
    let lab = Lab::build(&LabSpec { sites: spec }).context("building the lab (are you root?)")?;
    daemon::ipv4_only_behind_nats(&lab)?;
    let tmp = tempfile::tempdir()?;

    let pair = [KeyPair::generate(&bin)?, KeyPair::generate(&bin)?];
    let flooder = keys::generate();
    let flooder_public = keys::encode_public(&PublicKey::from(&flooder));
    let flooder_key_file = tmp.path().join("flooder.key");
    daemon::write_private_key(&flooder_key_file, &keys::encode_private(&flooder))?;
    let rendezvous = Rendezvous::start(
        &bin,
        &lab,
        &tmp.path().join("rendezvous"),
        &[
            ("pharma", pair[0].public.as_str()),
            ("hospital", pair[1].public.as_str()),
            ("flooder", flooder_public.as_str()),
        ],
        "info",
    )?;
    let pid = rendezvous.process.pid();
    let rss_before = procfs::rss_kib(pid).context("the rendezvous' memory")?;
    let cpu_before = procfs::cpu_seconds(pid).unwrap_or(0.0);
    let sampler = Sampler::start(pid);

    // The attack.
    let target = rendezvous.pin.address;
    let per_stranger = args.connections.div_ceil(args.strangers);
    let mut workers = Vec::new();
    for i in 0..args.strangers {
        let site = lab.site(&format!("stranger{i}"));
        workers.push(spawn_worker(
            &site.gateway,
            &[
                "--target",
                &target.to_string(),
                "--connections",
                &per_stranger.to_string(),
                "--seconds",
                &args.seconds.to_string(),
            ],
        )?);
    }
    let peers = format!("{},{}", pair[0].public, pair[1].public);
    workers.push(spawn_worker(
        &lab.site("flooder").gateway,
        &[
            "--target",
            &target.to_string(),
            "--connections",
            "200",
            "--seconds",
            &args.seconds.to_string(),
            "--site-key-file",
            daemon::path_str(&flooder_key_file)?,
            "--rendezvous-key",
            &rendezvous.pin.public_key,
            "--peers",
            &peers,
        ],
    )?);
    // Let the attack get going before the pair starts.
    thread::sleep(Duration::from_secs_f64((args.seconds / 5.0).min(1.0)));

    let outcome = legitimate_pair(&bin, &lab, &rendezvous, &pair, tmp.path());
    let mut attack = WorkerReport::default();
    let mut worker_errors = Vec::new();
    for w in workers {
        match collect_worker(w, args.seconds) {
            Ok(r) => attack.add(r),
            Err(e) => worker_errors.push(format!("{e:#}")),
        }
    }
    let rss_max = sampler.stop();
    let alive = procfs::rss_kib(pid).is_some();
    let peak = procfs::peak_rss_kib(pid).unwrap_or(0);
    let cpu = procfs::cpu_seconds(pid).unwrap_or(cpu_before) - cpu_before;
    let log = std::fs::read_to_string(&rendezvous.log).unwrap_or_default();
    drop(rendezvous);
    drop(lab);
    ensure!(alive, "the rendezvous died during the attack:\n{log}");
    ensure!(
        worker_errors.is_empty(),
        "attackers failed: {}",
        worker_errors.join("; ")
    );
    let (registration, first_relayed, path) = outcome?;
    ensure!(
        attack.replays_welcomed == 0,
        "a replayed hello was welcomed"
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    let report = Report {
        rss_before_mib: mib(rss_before),
        rss_max_sampled_mib: mib(rss_max.max(rss_before)),
        rss_peak_mib: mib(peak),
        cpu_seconds: cpu,
        registration_ms: registration.as_millis() as u64,
        first_relayed_ms: first_relayed.as_millis() as u64,
        path,
        attack,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &args);
    }
    Ok(())
}

fn print_report(r: &Report, args: &Args) {
    let a = &r.attack;
    println!(
        "attack  {} connection attempts from {} sources and new source ports ({} handshakes, {} refused, {} stalled), \
         {} KiB of pre-authentication stream data, {} datagrams; {} registrations and {} replayed hellos from a valid site; {:.1} s",
        a.attempts,
        args.strangers,
        a.handshakes,
        a.refused,
        a.stalled,
        a.stream_bytes / 1024,
        a.datagrams,
        a.registrations,
        a.replays,
        args.seconds
    );
    println!("closes  {:?}", a.closes);
    let goal = |ok: bool| if ok { "goal met" } else { "GOAL MISSED" };
    println!(
        "memory  rendezvous RSS {:.1} MiB before, at most {:.1} MiB sampled, peak (VmHWM) {:.1} MiB (goal <= 64 MiB: {})",
        r.rss_before_mib,
        r.rss_max_sampled_mib,
        r.rss_peak_mib,
        goal(r.rss_peak_mib <= 64.0)
    );
    println!("cpu     rendezvous {:.2} CPU seconds", r.cpu_seconds);
    println!(
        "pair    registered {} ms, first relayed packet answered {} ms after the daemons started, path {} (goal <= 1 s: {})",
        r.registration_ms,
        r.first_relayed_ms,
        r.path,
        goal(r.registration_ms <= 1000 && r.first_relayed_ms <= 1000)
    );
}

/// Samples a process' resident memory every 20 ms and keeps the highest.
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: thread::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = procfs::rss_kib(pid) {
                    m.fetch_max(kib, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler { stop, max, thread }
    }

    /// The highest sample, KiB.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.max.load(Ordering::Relaxed)
    }
}

fn spawn_worker(ns: &Netns, args: &[&str]) -> anyhow::Result<ChildGuard> {
    let exe = std::env::current_exe()?;
    let mut cmd = ns.command(daemon::path_str(&exe)?);
    cmd.arg("abuse-worker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(ns.spawn(&mut cmd)?)
}

/// Waits for a worker (it stops by itself after the attack) and reads its
/// report.
fn collect_worker(mut w: ChildGuard, seconds: f64) -> anyhow::Result<WorkerReport> {
    let grace = Duration::from_secs_f64(seconds) + Duration::from_secs(15);
    let status = match w.wait_timeout(grace)? {
        Some(s) => s,
        None => {
            w.stop(Duration::from_secs(1))?;
            bail!("an attacker (pid {}) did not stop by itself", w.pid());
        }
    };
    let child: &mut Child = w.child();
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        std::io::Read::read_to_string(&mut s, &mut out)?;
    }
    if let Some(mut s) = child.stderr.take() {
        std::io::Read::read_to_string(&mut s, &mut err)?;
    }
    ensure!(status.success(), "an attacker exited with {status}: {err}");
    serde_json::from_str(out.trim()).with_context(|| format!("an attacker's report: {out}"))
}

/// Starts the pair's daemons and waits until both are registered and a
/// ping from A's pod is answered through the relay; the two times, from
/// the start of the daemons, and the path.
fn legitimate_pair(
    bin: &Path,
    lab: &Lab,
    rendezvous: &Rendezvous,
    keys: &[KeyPair; 2],
    tmp: &Path,
) -> anyhow::Result<(Duration, Duration, String)> {
    let sites = [lab.site("pharma"), lab.site("hospital")];
    let mut dirs = Vec::new();
    let mut daemons = Vec::new();
    let started = Instant::now();
    for (i, site) in sites.iter().enumerate() {
        let peer = sites[1 - i];
        let dir = SiteDir::create(tmp.join(&site.name))?;
        SiteConfig {
            site: &site.name,
            private_key: &keys[i].private,
            pod_cidrs: &site.pod_cidrs,
            listen_port: None,
            mtu: None,
            remap_pool: None,
            peer: PeerConfig {
                name: &peer.name,
                public_key: &keys[1 - i].public,
                cidrs: &peer.pod_cidrs,
                endpoint: None,
            },
            rendezvous: Some(&rendezvous.pin),
        }
        .write(&dir)?;
        daemons.push(daemon::spawn_daemon(bin, &site.gateway, &dir, "info")?);
        dirs.push(dir);
    }
    let result = (|| {
        for (d, dir) in daemons.iter_mut().zip(&dirs) {
            daemon::wait_ready(bin, &dir.control_socket(), d)?;
        }
        let registered = |i: usize| -> bool {
            daemon::status(bin, &dirs[i].control_socket())
                .ok()
                .and_then(|s| s["rendezvous"][0]["connected"].as_bool())
                .unwrap_or(false)
        };
        while !(registered(0) && registered(1)) {
            interrupt::check()?;
            ensure!(
                started.elapsed() < GIVE_UP,
                "the pair did not register within {GIVE_UP:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
        let registration = started.elapsed();
        let status = daemon::status(bin, &dirs[0].control_socket())?;
        let view = PeerStatus::of(&status, &sites[1].name)?
            .view
            .context("the peer has no view")?;
        let pod_b = &sites[1].pods[0];
        let dst = through(pod_b.addr, POD_CIDR.parse()?, view)?;
        loop {
            interrupt::check()?;
            ensure!(
                started.elapsed() < GIVE_UP,
                "no ping through the relay within {GIVE_UP:?}"
            );
            if sites[0].pods[0]
                .ns
                .ping(IpAddr::V4(dst), Duration::from_millis(200))?
                .is_some()
            {
                break;
            }
        }
        let first = started.elapsed();
        let peer = PeerStatus::of(
            &daemon::status(bin, &dirs[0].control_socket())?,
            &sites[1].name,
        )?;
        ensure!(
            peer.is_on(PeerPath::Relay) && peer.relayed > 0,
            "the pair got through, but not on the relay: {peer:?}"
        );
        Ok((registration, first, peer.path))
    })();
    if result.is_err() {
        for dir in &dirs {
            let log = std::fs::read_to_string(dir.log()).unwrap_or_default();
            eprintln!("--- daemon log {}:\n{log}", dir.log().display());
        }
    }
    for mut d in daemons {
        let _ = d.stop(Duration::from_secs(5));
    }
    result
}

/// `causeway-bench abuse-worker` options (run by `abuse` in an attacker's
/// namespace).
pub(crate) struct WorkerArgs {
    pub(crate) target: SocketAddr,
    pub(crate) connections: u32,
    pub(crate) seconds: f64,
    /// A valid site's private key file: flood registrations and replay
    /// hellos instead of connecting as a stranger.
    pub(crate) site_key_file: Option<PathBuf>,
    /// The rendezvous' public key (with `site_key_file`).
    pub(crate) rendezvous_key: Option<String>,
    /// Real site keys to list among the bogus peers (with `site_key_file`).
    pub(crate) peers: Vec<String>,
}

/// Runs one attacker and prints its [`WorkerReport`] as one JSON line.
pub(crate) fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.seconds);
        match &args.site_key_file {
            Some(file) => valid_site(&args, file, deadline).await,
            None => Ok(strangers(&args, deadline).await),
        }
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

pub(crate) fn client_config() -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// A fresh endpoint: a new socket, so a new source port.
fn endpoint() -> anyhow::Result<quinn::Endpoint> {
    endpoint_at(SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// An endpoint on a socket bound to `local`, dialling with
/// [`client_config`].
pub(crate) fn endpoint_at(local: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let mut ep = quinn::Endpoint::client(local)?;
    ep.set_default_client_config(client_config()?);
    Ok(ep)
}

pub(crate) fn close_name(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => format!("code {}", c.error_code),
        quinn::ConnectionError::TimedOut => "idle timeout".into(),
        quinn::ConnectionError::ConnectionClosed(_) => "transport close".into(),
        quinn::ConnectionError::LocallyClosed => "closed by us".into(),
        other => other.to_string(),
    }
}

/// Connects once; `None` if refused or stalled (counted in `r`).
async fn dial(
    target: SocketAddr,
    r: &mut WorkerReport,
) -> Option<(quinn::Endpoint, quinn::Connection)> {
    r.attempts += 1;
    let ep = match endpoint() {
        Ok(ep) => ep,
        Err(_) => {
            r.refused += 1;
            return None;
        }
    };
    let connecting = match ep.connect(target, SERVER_NAME) {
        Ok(c) => c,
        Err(_) => {
            r.refused += 1;
            return None;
        }
    };
    match tokio::time::timeout(Duration::from_secs(3), connecting).await {
        Ok(Ok(conn)) => {
            r.handshakes += 1;
            Some((ep, conn))
        }
        Ok(Err(_)) => {
            r.refused += 1;
            None
        }
        Err(_) => {
            r.stalled += 1;
            None
        }
    }
}

/// One stranger connection of kind `i % 3` (see the module doc).
async fn stranger(target: SocketAddr, i: u32, deadline: tokio::time::Instant) -> WorkerReport {
    let mut r = WorkerReport::default();
    let Some((_ep, conn)) = dial(target, &mut r).await else {
        return r;
    };
    // Maximal datagrams, as many as quinn's default receive buffer holds,
    // at the pace congestion control allows.
    let datagrams = async {
        let mut sent = 0u64;
        if let Some(max) = conn.max_datagram_size() {
            for _ in 0..DATAGRAM_BYTES / max {
                let send = conn.send_datagram_wait(vec![0xa5; max].into());
                match tokio::time::timeout_at(deadline, send).await {
                    Ok(Ok(())) => sent += 1,
                    _ => break,
                }
            }
        }
        sent
    };
    let frame = async {
        let mut written = 0u64;
        if i.is_multiple_of(3) {
            return written;
        }
        let Ok(mut send) = conn.open_bi().await.map(|(s, _)| s) else {
            return written;
        };
        let (len, body) = if i % 3 == 1 {
            (1u32 << 20, 1 << 20)
        } else {
            (1020, 1020)
        };
        let mut frame = len.to_be_bytes().to_vec();
        frame.resize(4 + body, b'{');
        // As much as flow control lets through before the rendezvous
        // closes the connection or the attack ends.
        for chunk in frame.chunks(16 * 1024) {
            match tokio::time::timeout_at(deadline, send.write_all(chunk)).await {
                Ok(Ok(())) => written += chunk.len() as u64,
                _ => break,
            }
        }
        written
    };
    let (sent, written) = tokio::join!(datagrams, frame);
    r.datagrams += sent;
    r.stream_bytes += written;
    // Hold the connection until the rendezvous closes it or the attack ends.
    match tokio::time::timeout_at(deadline, conn.closed()).await {
        Ok(e) => *r.closes.entry(close_name(&e)).or_default() += 1,
        Err(_) => *r.closes.entry("held to the end".into()).or_default() += 1,
    }
    r
}

async fn strangers(args: &WorkerArgs, deadline: tokio::time::Instant) -> WorkerReport {
    let mut tasks = tokio::task::JoinSet::new();
    let mut report = WorkerReport::default();
    for i in 0..args.connections {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        while tasks.len() >= IN_FLIGHT {
            if let Some(Ok(r)) = tasks.join_next().await {
                report.add(r);
            }
        }
        tasks.spawn(stranger(args.target, i, deadline));
    }
    while let Some(r) = tasks.join_next().await {
        if let Ok(r) = r {
            report.add(r);
        }
    }
    report
}

/// Keyed BLAKE2s-256 of the concatenated parts (docs/rendezvous.md).
fn mac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Blake2sMac256 as KeyInit>::new(key.into());
    for part in parts {
        mac.update(part);
    }
    mac.finalize_fixed().into()
}

/// The site's proof for a session, as docs/rendezvous.md constructs it.
fn site_proof(secret: &StaticSecret, rendezvous: &PublicKey, exporter: &[u8; 32]) -> [u8; 32] {
    let site = PublicKey::from(secret);
    let shared = secret.diffie_hellman(rendezvous);
    let key = mac(shared.as_bytes(), &[b"causeway-rendezvous-v1 auth key"]);
    mac(
        &key,
        &[
            b"causeway-rendezvous-v1 site proof",
            exporter,
            site.as_bytes(),
            rendezvous.as_bytes(),
        ],
    )
}

/// A site's `hello` on `conn`, its proof bound to that TLS session.
pub(crate) fn hello_frame(
    conn: &quinn::Connection,
    secret: &StaticSecret,
    rendezvous: &PublicKey,
) -> anyhow::Result<Vec<u8>> {
    let mut exporter = [0u8; 32];
    conn.export_keying_material(&mut exporter, b"EXPORTER-causeway-rendezvous-v1", b"")
        .map_err(|_| anyhow::anyhow!("no TLS exporter"))?;
    Ok(frame(&serde_json::json!({
        "type": "hello",
        "version": 1,
        "site_key": keys::encode_public(&PublicKey::from(secret)),
        "rendezvous_key": keys::encode_public(rendezvous),
        "proof": keys::encode_bytes(&site_proof(secret, rendezvous, &exporter)),
    })))
}

pub(crate) fn frame(body: &serde_json::Value) -> Vec<u8> {
    let body = body.to_string().into_bytes();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// Reads one frame's JSON body.
pub(crate) async fn read_frame(recv: &mut quinn::RecvStream) -> anyhow::Result<serde_json::Value> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    ensure!(len <= 64 * 1024, "a {len}-byte frame");
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// A valid site: authenticates, then floods registrations on its control
/// stream while replaying its hello on new connections.
async fn valid_site(
    args: &WorkerArgs,
    key_file: &Path,
    deadline: tokio::time::Instant,
) -> anyhow::Result<WorkerReport> {
    let text = std::fs::read_to_string(key_file)?;
    let secret = keys::decode_private(text.trim())?;
    let rendezvous = keys::decode_public(
        args.rendezvous_key
            .as_deref()
            .context("--rendezvous-key is needed with --site-key-file")?,
    )?;
    let mut r = WorkerReport::default();
    let (_ep, conn) = dial(args.target, &mut r)
        .await
        .context("the valid site could not connect")?;
    let hello = hello_frame(&conn, &secret, &rendezvous)?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&hello).await?;
    let welcome = read_frame(&mut recv).await?;
    ensure!(
        welcome["type"] == "welcome",
        "the valid site was not welcomed: {welcome}"
    );

    // Replays of the hello, each on a new connection (the proof is bound
    // to the first session, so each must be refused), a few at a time.
    let mut replayers = tokio::task::JoinSet::new();
    for _ in 0..REPLAYERS {
        replayers.spawn(replay(
            args.target,
            hello.clone(),
            args.connections / REPLAYERS,
            deadline,
        ));
    }

    // The flood: bogus peers (plus the real ones), many candidates, a new
    // port each time so that nothing could be skipped as unchanged.
    let mut peers: Vec<String> = args.peers.clone();
    for _ in 0..FLOOD_PEERS {
        peers.push(keys::encode_public(&PublicKey::from(&keys::generate())));
    }
    let mut port: u16 = 1;
    let mut drain = [0u8; 4096];
    while tokio::time::Instant::now() < deadline {
        let candidates: Vec<String> = (0..FLOOD_CANDIDATES)
            .map(|i| format!("198.51.100.{i}:{port}"))
            .collect();
        let register = frame(&serde_json::json!({
            "type": "register",
            "peers": peers,
            "candidates": candidates,
        }));
        tokio::select! {
            w = send.write_all(&register) => {
                if w.is_err() {
                    break;
                }
                r.registrations += 1;
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
        // Keep reading what the rendezvous sends (peer updates).
        while let Ok(Ok(Some(_))) =
            tokio::time::timeout(Duration::ZERO, recv.read(&mut drain)).await
        {}
        port = port.wrapping_add(1).max(1);
    }
    conn.close(0u32.into(), b"done");
    while let Some(replayed) = replayers.join_next().await {
        if let Ok(replayed) = replayed {
            r.add(replayed);
        }
    }
    Ok(r)
}

/// Replays `hello` on up to `count` new connections until `deadline`.
/// The first replay is made even past the deadline (a dial stalled by the
/// attack can take the whole window), with a few more dials if need be:
/// a run that replayed nothing would say nothing about replays.
async fn replay(
    target: SocketAddr,
    hello: Vec<u8>,
    count: u32,
    deadline: tokio::time::Instant,
) -> WorkerReport {
    const FIRST_REPLAY_DIALS: u32 = 3;
    let mut r = WorkerReport::default();
    for dials in 0.. {
        let first = r.replays == 0 && dials < FIRST_REPLAY_DIALS;
        if !first && (dials >= count.max(1) || tokio::time::Instant::now() >= deadline) {
            break;
        }
        let Some((_ep, conn)) = dial(target, &mut r).await else {
            continue;
        };
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            continue;
        };
        r.replays += 1;
        if send.write_all(&hello).await.is_err() {
            continue;
        }
        let answer = tokio::time::timeout(Duration::from_secs(3), read_frame(&mut recv)).await;
        let outcome = match answer {
            Ok(Ok(v)) if v["type"] == "welcome" => {
                r.replays_welcomed += 1;
                "welcomed".to_owned()
            }
            Ok(Ok(v)) if v["type"] == "reject" => format!("reject code {}", v["code"]),
            Ok(Ok(v)) => format!("answered {}", v["type"]),
            Ok(Err(_)) => match conn.close_reason() {
                Some(e) => close_name(&e),
                None => "stream ended".into(),
            },
            Err(_) => "no answer in 3 s".into(),
        };
        *r.closes.entry(format!("replay: {outcome}")).or_default() += 1;
        conn.close(0u32.into(), b"done");
    }
    r
}

/// Accepts any certificate (an attacker does not care who it talks to).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_length_prefixed_json() {
        let f = frame(&serde_json::json!({"type": "x"}));
        assert_eq!(&f[..4], &12u32.to_be_bytes());
        assert_eq!(&f[4..], br#"{"type":"x"}"#);
    }

    #[test]
    fn reports_add_up() {
        let mut a = WorkerReport {
            attempts: 1,
            ..Default::default()
        };
        a.closes.insert("code 2".into(), 1);
        let mut b = WorkerReport {
            attempts: 2,
            replays: 3,
            ..Default::default()
        };
        b.closes.insert("code 2".into(), 4);
        a.add(b);
        assert_eq!((a.attempts, a.replays), (3, 3));
        assert_eq!(a.closes["code 2"], 5);
    }
}
