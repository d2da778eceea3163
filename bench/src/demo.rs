//! The lab demo: two sites, two daemons, traffic, teardown.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use causeway_testbed::{ChildGuard, Lab, LabSpec, Netns, Site, SiteSpec};
use ipnet::Ipv4Net;

const PORT: u16 = 51820;
/// Both sites use the same pod CIDR, as most clusters do.
const POD_CIDR: &str = "10.0.0.0/16";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Fails if Ctrl-C was pressed, so that everything built so far is dropped
/// (torn down) on the way out.
fn check_interrupt() -> anyhow::Result<()> {
    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted; tearing down");
    Ok(())
}

struct SiteRun {
    dir: tempfile::TempDir,
    public_key: String,
    daemon: Option<ChildGuard>,
}

pub(crate) fn run(causeway: Option<PathBuf>, seconds: u32) -> anyhow::Result<()> {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let bin = match causeway {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("causeway"),
    };
    ensure!(bin.exists(), "{} not found: build it first (cargo build --release)", bin.display());

    let t = Instant::now();
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("pharma", vec![POD_CIDR.parse()?]),
            SiteSpec::new("hospital", vec![POD_CIDR.parse()?]),
        ],
    })
    .context("building the lab (are you root?)")?;
    let (pharma, hospital) = (lab.site("pharma"), lab.site("hospital"));
    println!(
        "lab     two sites in network namespaces ({} ms), both with pods in {POD_CIDR}: pharma at {}, hospital at {}",
        t.elapsed().as_millis(),
        pharma.wan_addr,
        hospital.wan_addr
    );

    let mut runs = [new_site(&bin)?, new_site(&bin)?];
    let t = Instant::now();
    for (i, (site, peer)) in [(pharma, hospital), (hospital, pharma)].into_iter().enumerate() {
        let config = write_config(&runs[i], site, &runs[1 - i].public_key, &peer.name, SocketAddr::new(peer.wan_addr, PORT))?;
        runs[i].daemon = Some(start_daemon(&bin, site, &runs[i], &config)?);
    }
    println!("daemons causeway up on both gateways, ready in {} ms", t.elapsed().as_millis());

    // Both sites number their pods alike, so each sees the other through a
    // view CIDR that its daemon allocated (and shows in its status).
    let hospital_view = view_of(&bin, &runs[0], "hospital")?;
    let pharma_view = view_of(&bin, &runs[1], "pharma")?;
    println!("views   pharma sees hospital's {POD_CIDR} as {hospital_view}; hospital sees pharma's as {pharma_view}");
    let (pod_a, pod_b) = (&pharma.pods[0], &hospital.pods[0]);
    let (b_from_a, a_from_b) = (through(pod_b.addr, hospital_view)?, through(pod_a.addr, pharma_view)?);
    let t = Instant::now();
    let rtt = ping_until(&pod_a.ns, b_from_a.into(), Duration::from_secs(5))?;
    println!(
        "ping    pharma pod {} -> hospital pod {} (its own address: {}): first reply after {} ms (handshake included), rtt {:.2} ms",
        pod_a.addr,
        b_from_a,
        pod_b.addr,
        t.elapsed().as_millis(),
        rtt.as_secs_f64() * 1e3
    );
    let rtt = ping_until(&pod_b.ns, a_from_b.into(), Duration::from_secs(5))?;
    println!("ping    hospital pod {} -> pharma pod {} (its own address: {}): rtt {:.2} ms", pod_b.addr, a_from_b, pod_a.addr, rtt.as_secs_f64() * 1e3);
    check_interrupt()?;

    let _server = pod_b.ns.spawn(pod_b.ns.command("iperf3").args(["-s", "-1", "-B", &pod_b.addr.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()))?;
    let gbps = iperf3(&pod_a.ns, &b_from_a.to_string(), seconds)?;
    println!("tcp     pharma pod -> hospital pod: {gbps:.2} Gbit/s over {seconds} s (iperf3, one stream, through the tunnel)");
    check_interrupt()?;

    let status = Command::new(&bin).args(["status", "--socket"]).arg(runs[0].dir.path().join("control.sock")).output()?;
    println!("status  of pharma's daemon (`causeway status`):");
    for line in String::from_utf8_lossy(&status.stdout).lines() {
        println!("          {line}");
    }

    for (run, site) in runs.iter_mut().zip([pharma, hospital]) {
        if let Some(mut daemon) = run.daemon.take() {
            let exit = daemon.stop(Duration::from_secs(5))?;
            ensure!(exit.success(), "causeway on {} exited with {exit}", site.name);
        }
        let left = site.gateway.ip(&["route", "show", "proto", "201"])?;
        ensure!(left.is_empty() && site.gateway.ip(&["link", "show", "causeway0"]).is_err(), "{} kept its routes or interface", site.name);
    }
    println!("stop    daemons stopped; their interfaces and routes are gone");
    drop(lab);
    println!("done    lab torn down");
    Ok(())
}

fn new_site(bin: &Path) -> anyhow::Result<SiteRun> {
    let dir = tempfile::tempdir()?;
    let key = Command::new(bin).arg("genkey").output()?;
    ensure!(key.status.success(), "causeway genkey failed");
    std::fs::write(dir.path().join("private.key"), &key.stdout)?;
    let mut child = Command::new(bin).arg("pubkey").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, &key.stdout)?;
    let public_key = String::from_utf8(child.wait_with_output()?.stdout)?.trim().to_owned();
    Ok(SiteRun { dir, public_key, daemon: None })
}

fn write_config(run: &SiteRun, site: &Site, peer_key: &str, peer_name: &str, endpoint: SocketAddr) -> anyhow::Result<PathBuf> {
    let dir = run.dir.path();
    let text = format!(
        "[site]\nname = {name:?}\nprivate_key_file = {key:?}\npod_cidrs = [{POD_CIDR:?}]\ncontrol_socket = {sock:?}\nstate_dir = {dir:?}\n\n\
         [[peer]]\nname = {peer_name:?}\npublic_key = {peer_key:?}\ncidrs = [{POD_CIDR:?}]\nendpoint = \"{endpoint}\"\n",
        name = site.name,
        key = dir.join("private.key"),
        sock = dir.join("control.sock"),
    );
    let path = dir.join("causeway.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn start_daemon(bin: &Path, site: &Site, run: &SiteRun, config: &Path) -> anyhow::Result<ChildGuard> {
    let log = std::fs::File::create(run.dir.path().join("causeway.log"))?;
    let mut daemon = site.gateway.spawn(site.gateway.command(bin.to_str().context("path")?).args(["up", "--config"]).arg(config).stderr(log))?;
    let socket = run.dir.path().join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        check_interrupt()?;
        let ok = Command::new(bin).args(["status", "--socket"]).arg(&socket).stdout(Stdio::null()).stderr(Stdio::null()).status()?;
        if ok.success() {
            return Ok(daemon);
        }
        if let Some(exit) = daemon.wait_timeout(Duration::from_millis(50))? {
            let log = std::fs::read_to_string(run.dir.path().join("causeway.log")).unwrap_or_default();
            bail!("causeway on {} exited with {exit}:\n{log}", site.name);
        }
    }
    bail!("causeway on {} did not become ready", site.name)
}

fn ping_until(ns: &Netns, dst: std::net::IpAddr, within: Duration) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        check_interrupt()?;
        if let Some(rtt) = ns.ping(dst, Duration::from_millis(500))? {
            return Ok(rtt);
        }
    }
    bail!("{dst} did not answer from {}", ns.name())
}

/// The view CIDR a site's daemon gave its peer's pod CIDR.
fn view_of(bin: &Path, run: &SiteRun, peer: &str) -> anyhow::Result<Ipv4Net> {
    let out = Command::new(bin).args(["status", "--json", "--socket"]).arg(run.dir.path().join("control.sock")).output()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).context("causeway status --json")?;
    let peers = status["peers"].as_array().context("status has no peers")?;
    let p = peers.iter().find(|p| p["name"] == peer).context("peer missing from status")?;
    let view = p["views"][0]["view"].as_str().context("peer has no view")?;
    Ok(view.parse()?)
}

/// `addr` of a site's pod as the other site sees it through `view`.
fn through(addr: Ipv4Addr, view: Ipv4Net) -> anyhow::Result<Ipv4Addr> {
    let real: Ipv4Net = POD_CIDR.parse()?;
    let host = u32::from(addr) & !u32::from(real.netmask());
    Ok(Ipv4Addr::from(u32::from(view.network()) | host))
}

/// Runs iperf3 from `client` to the server already listening at
/// `server_addr`; returns Gbit/s received.
fn iperf3(client: &Netns, server_addr: &str, seconds: u32) -> anyhow::Result<f64> {
    std::thread::sleep(Duration::from_millis(300));
    let out = client
        .command("iperf3")
        .args(["-c", server_addr, "-t", &seconds.to_string(), "--json"])
        .output()
        .context("running iperf3 (apt-get install iperf3)")?;
    ensure!(out.status.success(), "iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = report["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 report")?;
    Ok(bps / 1e9)
}
