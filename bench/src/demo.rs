//! The lab demo: two sites, two daemons, traffic, teardown.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use causeway_testbed::{Lab, LabSpec, Nat, Netns, SiteSpec};

use crate::interrupt::check as check_interrupt;
use crate::lab::daemon::{
    self, KeyPair, PeerConfig, PeerPath, PeerStatus, RENDEZVOUS_PORT, Rendezvous, STUN_PORT,
    SiteConfig, SiteDir, through,
};

/// Both sites use the same pod CIDR, as most clusters do.
const POD_CIDR: &str = "10.0.0.0/16";
/// Log level of the daemons and the rendezvous (their logs are shown when
/// something fails).
const LOG_LEVEL: &str = "info";

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
    let bin = crate::lab::daemon::causeway_bin(causeway)?;

    let t = Instant::now();
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("pharma", vec![POD_CIDR.parse()?]).nat(nat),
            SiteSpec::new("hospital", vec![POD_CIDR.parse()?]).nat(nat),
        ],
    })
    .context("building the lab (are you root?)")?;
    let sites = [lab.site("pharma"), lab.site("hospital")];
    let [pharma, hospital] = sites;
    // The lab routes IPv6 without NAT; this demo is about IPv4 NATs.
    daemon::ipv4_only_behind_nats(&lab)?;
    println!(
        "lab     two sites in network namespaces ({} ms), both with pods in {POD_CIDR}, both behind a NAT router \
         (nftables {nat_name}, no inbound port open): pharma {} -> {}, hospital {} -> {}",
        t.elapsed().as_millis(),
        pharma.wan_addr,
        pharma.public_addr,
        hospital.wan_addr,
        hospital.public_addr
    );

    let tmp = tempfile::tempdir()?;
    let keys = [KeyPair::generate(&bin)?, KeyPair::generate(&bin)?];
    let rendezvous = Rendezvous::start(
        &bin,
        &lab,
        &tmp.path().join("rendezvous"),
        &[
            ("pharma", keys[0].public.as_str()),
            ("hospital", keys[1].public.as_str()),
        ],
        LOG_LEVEL,
    )?;
    println!(
        "rdv     causeway rendezvous on the \"internet\" at {}:{RENDEZVOUS_PORT} (QUIC) and :{STUN_PORT} (STUN); the sites dial out to it",
        lab.internet_addr()
    );
    let started = Instant::now();
    let mut dirs = Vec::new();
    let mut daemons = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let peer = sites[1 - i];
        let dir = SiteDir::create(tmp.path().join(&site.name))?;
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
        let mut d = daemon::spawn_daemon(&bin, &site.gateway, &dir, LOG_LEVEL)?;
        if let Err(e) = daemon::wait_ready(&bin, &dir.control_socket(), &mut d) {
            let log = std::fs::read_to_string(dir.log()).unwrap_or_default();
            bail!("causeway on {}: {e:#}:\n{log}", site.name);
        }
        dirs.push(dir);
        daemons.push(d);
    }
    println!(
        "daemons causeway up on both gateways, ready in {} ms; peers know each other only by public key",
        started.elapsed().as_millis()
    );

    // Both sites number their pods alike, so each sees the other through a
    // view CIDR that its daemon allocated (and shows in its status).
    let view_of = |i: usize| -> anyhow::Result<_> {
        let status = daemon::status(&bin, &dirs[i].control_socket())?;
        PeerStatus::of(&status, &sites[1 - i].name)?
            .view
            .context("the peer has no view")
    };
    let (hospital_view, pharma_view) = (view_of(0)?, view_of(1)?);
    println!(
        "views   pharma sees hospital's {POD_CIDR} as {hospital_view}; hospital sees pharma's as {pharma_view}"
    );
    let (pod_a, pod_b) = (&pharma.pods[0], &hospital.pods[0]);
    let (b_from_a, a_from_b) = (
        through(pod_b.addr, POD_CIDR.parse()?, hospital_view)?,
        through(pod_a.addr, POD_CIDR.parse()?, pharma_view)?,
    );
    let rtt = match ping_until(&pod_a.ns, b_from_a.into(), Duration::from_secs(15)) {
        Ok(rtt) => rtt,
        Err(e) => {
            for dir in &dirs {
                let log = std::fs::read_to_string(dir.log()).unwrap_or_default();
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
    // Behind symmetric NATs the relay is the path: wait for the pair's
    // UDP relay port (the QUIC relay carries the first packets).
    let want = if nat == Nat::Symmetric {
        PeerPath::RelayUdp
    } else {
        PeerPath::Direct
    };
    let peer = daemon::wait_path(&bin, &dirs[0].control_socket(), "hospital", want, within)?;
    let how = if peer.is_on(PeerPath::Direct) {
        "hole punched through both NATs; relayed until then"
    } else if peer.is_on(PeerPath::RelayUdp) {
        "no hole can be punched through these NATs: WireGuard ciphertext goes through the rendezvous' UDP relay port for this pair"
    } else if peer.is_on(PeerPath::Relay) {
        "no hole can be punched through these NATs: WireGuard ciphertext goes through the rendezvous' QUIC relay"
    } else {
        ""
    };
    let at = peer
        .endpoint
        .as_deref()
        .or(peer.relay_port.as_deref())
        .unwrap_or("");
    println!(
        "path    pharma -> hospital: {} {at} {} ms after start ({how})",
        peer.path,
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
        .arg(dirs[0].control_socket())
        .output()?;
    println!("status  of pharma's daemon (`causeway status`):");
    for line in String::from_utf8_lossy(&status.stdout).lines() {
        println!("          {line}");
    }

    for (mut daemon, site) in daemons.into_iter().zip(sites) {
        let exit = daemon.stop(Duration::from_secs(5))?;
        ensure!(
            exit.success(),
            "causeway on {} exited with {exit}",
            site.name
        );
        // The backstops (type blackhole) stay on purpose.
        let left = site
            .gateway
            .ip(&["route", "show", "proto", "201", "type", "unicast"])?;
        ensure!(
            left.is_empty() && site.gateway.ip(&["link", "show", "causeway0"]).is_err(),
            "{} kept its routes or interface",
            site.name
        );
    }
    println!(
        "stop    daemons stopped; their interfaces and routes are gone, the backstop routes stay"
    );
    drop(rendezvous);
    drop(lab);
    println!("done    lab torn down");
    Ok(())
}

fn ping_until(ns: &Netns, dst: IpAddr, within: Duration) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        check_interrupt()?;
        if let Some(rtt) = ns.ping(dst, Duration::from_millis(500))? {
            return Ok(rtt);
        }
    }
    bail!("{dst} did not answer from {}", ns.name())
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
