//! The lab demo: two sites, two daemons, traffic, teardown.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use causeway_testbed::{ChildGuard, Lab, LabSpec, Nat, Netns, Site, SiteSpec};
use ipnet::Ipv4Net;

/// The rendezvous' QUIC port.
const RDV_PORT: u16 = 7443;
/// Both sites use the same pod CIDR, as most clusters do.
const POD_CIDR: &str = "10.0.0.0/16";

use crate::interrupt::check as check_interrupt;

struct SiteRun {
    dir: tempfile::TempDir,
    public_key: String,
    daemon: Option<ChildGuard>,
}

/// The kind of NAT both demo sites sit behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DemoNat {
    /// nftables `masquerade`: a direct path can be punched.
    PortPreserving,
    /// nftables `masquerade random,fully-random`: only the relay works.
    Symmetric,
}

pub(crate) fn run(causeway: Option<PathBuf>, seconds: u32, nat: DemoNat) -> anyhow::Result<()> {
    let (nat, nat_name) = match nat {
        DemoNat::PortPreserving => (Nat::PortPreserving, "masquerade"),
        DemoNat::Symmetric => (Nat::Symmetric, "masquerade random,fully-random"),
    };
    crate::interrupt::install();
    let bin = match causeway {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("causeway"),
    };
    ensure!(
        bin.exists(),
        "{} not found: build it first (cargo build --release)",
        bin.display()
    );

    let t = Instant::now();
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("pharma", vec![POD_CIDR.parse()?]).nat(nat),
            SiteSpec::new("hospital", vec![POD_CIDR.parse()?]).nat(nat),
        ],
    })
    .context("building the lab (are you root?)")?;
    let (pharma, hospital) = (lab.site("pharma"), lab.site("hospital"));
    // The lab routes IPv6 without NAT; this demo is about IPv4 NATs.
    for site in [pharma, hospital] {
        site.gateway
            .ip(&["-6", "addr", "flush", "dev", "wan0", "scope", "global"])?;
    }
    println!(
        "lab     two sites in network namespaces ({} ms), both with pods in {POD_CIDR}, both behind a NAT router \
         (nftables {nat_name}, no inbound port open): pharma {} -> {}, hospital {} -> {}",
        t.elapsed().as_millis(),
        pharma.wan_addr,
        pharma.public_addr,
        hospital.wan_addr,
        hospital.public_addr
    );

    let mut runs = [new_site(&bin)?, new_site(&bin)?];
    let rendezvous = Rendezvous::start(&bin, lab.internet(), lab.internet_addr(), &runs)?;
    println!(
        "rdv     causeway rendezvous on the \"internet\" at {}:{RDV_PORT} (QUIC) and :3478 (STUN); the sites dial out to it",
        lab.internet_addr()
    );
    let started = Instant::now();
    for (i, (site, peer)) in [(pharma, hospital), (hospital, pharma)]
        .into_iter()
        .enumerate()
    {
        let config = write_config(
            &runs[i],
            site,
            &runs[1 - i].public_key,
            &peer.name,
            &rendezvous,
        )?;
        runs[i].daemon = Some(start_daemon(&bin, site, &runs[i], &config)?);
    }
    println!(
        "daemons causeway up on both gateways, ready in {} ms; peers know each other only by public key",
        started.elapsed().as_millis()
    );

    // Both sites number their pods alike, so each sees the other through a
    // view CIDR that its daemon allocated (and shows in its status).
    let hospital_view = view_of(&bin, &runs[0], "hospital")?;
    let pharma_view = view_of(&bin, &runs[1], "pharma")?;
    println!(
        "views   pharma sees hospital's {POD_CIDR} as {hospital_view}; hospital sees pharma's as {pharma_view}"
    );
    let (pod_a, pod_b) = (&pharma.pods[0], &hospital.pods[0]);
    let (b_from_a, a_from_b) = (
        through(pod_b.addr, hospital_view)?,
        through(pod_a.addr, pharma_view)?,
    );
    let rtt = match ping_until(&pod_a.ns, b_from_a.into(), Duration::from_secs(15)) {
        Ok(rtt) => rtt,
        Err(e) => {
            for run in &runs {
                let log = std::fs::read_to_string(run.dir.path().join("causeway.log"))
                    .unwrap_or_default();
                eprintln!("--- daemon log:\n{log}");
            }
            return Err(e);
        }
    };
    println!(
        "ping    pharma pod {} -> hospital pod {} (its own address: {}): first reply {} ms after both daemons were started, rtt {:.2} ms",
        pod_a.addr,
        b_from_a,
        pod_b.addr,
        started.elapsed().as_millis(),
        rtt.as_secs_f64() * 1e3
    );
    let within = if nat == Nat::Symmetric {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let (path, endpoint) = wait_direct(&bin, &runs[0], within)?;
    let how = match path.as_str() {
        "direct" => "hole punched through both NATs; relayed until then",
        "relay" => {
            "no hole can be punched through these NATs: WireGuard ciphertext goes through the rendezvous"
        }
        _ => "",
    };
    println!(
        "path    pharma -> hospital: {path} {endpoint} {} ms after start ({how})",
        started.elapsed().as_millis()
    );
    let rtt = ping_until(&pod_b.ns, a_from_b.into(), Duration::from_secs(5))?;
    println!(
        "ping    hospital pod {} -> pharma pod {} (its own address: {}): rtt {:.2} ms",
        pod_b.addr,
        a_from_b,
        pod_a.addr,
        rtt.as_secs_f64() * 1e3
    );
    check_interrupt()?;

    let _server = pod_b.ns.spawn(
        pod_b
            .ns
            .command("iperf3")
            .args(["-s", "-1", "-B", &pod_b.addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let gbps = iperf3(&pod_a.ns, &b_from_a.to_string(), seconds)?;
    println!(
        "tcp     pharma pod -> hospital pod: {gbps:.2} Gbit/s over {seconds} s (iperf3, one stream, through the tunnel)"
    );
    check_interrupt()?;

    let status = Command::new(&bin)
        .args(["status", "--socket"])
        .arg(runs[0].dir.path().join("control.sock"))
        .output()?;
    println!("status  of pharma's daemon (`causeway status`):");
    for line in String::from_utf8_lossy(&status.stdout).lines() {
        println!("          {line}");
    }

    for (run, site) in runs.iter_mut().zip([pharma, hospital]) {
        if let Some(mut daemon) = run.daemon.take() {
            let exit = daemon.stop(Duration::from_secs(5))?;
            ensure!(
                exit.success(),
                "causeway on {} exited with {exit}",
                site.name
            );
        }
        let left = site.gateway.ip(&["route", "show", "proto", "201"])?;
        ensure!(
            left.is_empty() && site.gateway.ip(&["link", "show", "causeway0"]).is_err(),
            "{} kept its routes or interface",
            site.name
        );
    }
    println!("stop    daemons stopped; their interfaces and routes are gone");
    drop(lab);
    println!("done    lab torn down");
    Ok(())
}

/// `causeway pubkey` of a private key.
fn public_key_of(bin: &Path, private_key: &[u8]) -> anyhow::Result<String> {
    let mut child = Command::new(bin)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, private_key)?;
    Ok(String::from_utf8(child.wait_with_output()?.stdout)?
        .trim()
        .to_owned())
}

fn new_site(bin: &Path) -> anyhow::Result<SiteRun> {
    let dir = tempfile::tempdir()?;
    let key = Command::new(bin).arg("genkey").output()?;
    ensure!(key.status.success(), "causeway genkey failed");
    std::fs::write(dir.path().join("private.key"), &key.stdout)?;
    let public_key = public_key_of(bin, &key.stdout)?;
    Ok(SiteRun {
        dir,
        public_key,
        daemon: None,
    })
}

/// The demo's rendezvous, in the lab's internet namespace.
struct Rendezvous {
    _dir: tempfile::TempDir,
    _child: ChildGuard,
    address: SocketAddr,
    public_key: String,
}

impl Rendezvous {
    fn start(
        bin: &Path,
        ns: &Netns,
        ip: Ipv4Addr,
        sites: &[SiteRun; 2],
    ) -> anyhow::Result<Rendezvous> {
        let dir = tempfile::tempdir()?;
        let key = Command::new(bin).arg("genkey").output()?;
        std::fs::write(dir.path().join("rendezvous.key"), &key.stdout)?;
        let public_key = public_key_of(bin, &key.stdout)?;
        let address = SocketAddr::new(ip.into(), RDV_PORT);
        let mut text = format!(
            "private_key_file = {:?}\nlisten = \"{address}\"\nstun_listen = \"{ip}:3478\"\n",
            dir.path().join("rendezvous.key")
        );
        for (name, site) in ["pharma", "hospital"].iter().zip(sites) {
            text += &format!(
                "\n[[site]]\nname = {name:?}\npublic_key = {:?}\n",
                site.public_key
            );
        }
        std::fs::write(dir.path().join("rendezvous.toml"), text)?;
        let log = std::fs::File::create(dir.path().join("rendezvous.log"))?;
        let child = ns.spawn(
            ns.command(bin.to_str().context("path")?)
                .args(["rendezvous", "--config"])
                .arg(dir.path().join("rendezvous.toml"))
                .stdout(Stdio::null())
                .stderr(log),
        )?;
        Ok(Rendezvous {
            _dir: dir,
            _child: child,
            address,
            public_key,
        })
    }
}

/// Waits until site `run`'s peer is on a direct path; returns (path, endpoint).
fn wait_direct(bin: &Path, run: &SiteRun, within: Duration) -> anyhow::Result<(String, String)> {
    let deadline = Instant::now() + within;
    loop {
        check_interrupt()?;
        let out = Command::new(bin)
            .args(["status", "--json", "--socket"])
            .arg(run.dir.path().join("control.sock"))
            .output()?;
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("causeway status --json")?;
        let peer = &status["peers"][0];
        let path = peer["path"].as_str().unwrap_or("?").to_owned();
        if path == "direct" || Instant::now() > deadline {
            return Ok((path, peer["endpoint"].as_str().unwrap_or("").to_owned()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_config(
    run: &SiteRun,
    site: &Site,
    peer_key: &str,
    peer_name: &str,
    rendezvous: &Rendezvous,
) -> anyhow::Result<PathBuf> {
    let dir = run.dir.path();
    let text = format!(
        "[site]\nname = {name:?}\nprivate_key_file = {key:?}\npod_cidrs = [{POD_CIDR:?}]\ncontrol_socket = {sock:?}\nuapi_socket = {uapi:?}\nstate_dir = {dir:?}\n\n\
         [[peer]]\nname = {peer_name:?}\npublic_key = {peer_key:?}\ncidrs = [{POD_CIDR:?}]\n\n\
         [[rendezvous]]\naddress = \"{address}\"\npublic_key = {rdv_key:?}\n",
        address = rendezvous.address,
        rdv_key = rendezvous.public_key,
        name = site.name,
        key = dir.join("private.key"),
        sock = dir.join("control.sock"),
        // Both gateways name their interface causeway0, each in its own
        // namespace, but the default UAPI socket directory is host-wide.
        uapi = dir.join("uapi.sock"),
    );
    let path = dir.join("causeway.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn start_daemon(
    bin: &Path,
    site: &Site,
    run: &SiteRun,
    config: &Path,
) -> anyhow::Result<ChildGuard> {
    let log = std::fs::File::create(run.dir.path().join("causeway.log"))?;
    let mut daemon = site.gateway.spawn(
        site.gateway
            .command(bin.to_str().context("path")?)
            .args(["up", "--config"])
            .arg(config)
            .stderr(log),
    )?;
    let socket = run.dir.path().join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        check_interrupt()?;
        let ok = Command::new(bin)
            .args(["status", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if ok.success() {
            return Ok(daemon);
        }
        if let Some(exit) = daemon.wait_timeout(Duration::from_millis(50))? {
            let log =
                std::fs::read_to_string(run.dir.path().join("causeway.log")).unwrap_or_default();
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
    let out = Command::new(bin)
        .args(["status", "--json", "--socket"])
        .arg(run.dir.path().join("control.sock"))
        .output()?;
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("causeway status --json")?;
    let peers = status["peers"].as_array().context("status has no peers")?;
    let p = peers
        .iter()
        .find(|p| p["name"] == peer)
        .context("peer missing from status")?;
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
    ensure!(
        out.status.success(),
        "iperf3 failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report")?;
    Ok(bps / 1e9)
}
