//! The systems the lab compares, and how each one joins two sites.
//!
//! Adding a system means: a [`System`] variant, its lab shape
//! ([`System::lab_spec`]), its [`Readiness`], and a [`Prepared`] that
//! starts it. The measurement code only sees [`Tunnel`]s.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use causeway_testbed::{ChildGuard, IpNet, Lab, LabSpec, Nat, Netns, Site, SiteSpec, Wan};
use ipnet::Ipv4Net;

use super::daemon::{
    self, KeyPair, PeerConfig, PeerPath, PeerStatus, Rendezvous, SiteConfig, SiteDir, path_str,
    through,
};

/// WireGuard port on every gateway.
const WG_PORT: u16 = 51820;
/// Tunnel MTU of every system.
pub(crate) const MTU: u16 = 1420;
/// The pod CIDRs of sites `a` and `b` when they differ.
const CIDR_A: &str = "10.0.0.0/16";
const CIDR_B: &str = "10.1.0.0/16";
/// The view pool given to Causeway with remapping, one /16: site `a` sees
/// `b`'s 10.0.0.0/16 as exactly this.
const REMAP_POOL: &str = "100.64.0.0/16";
/// Log level of Causeway's daemons and rendezvous in the lab.
const CAUSEWAY_LOG_LEVEL: &str = "warn";

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum System {
    /// The same topology routed with no tunnel: the ceiling.
    Raw,
    /// Causeway with static endpoints, distinct pod CIDRs.
    Causeway,
    /// The same as [`System::Causeway`] with another causeway binary
    /// (`--baseline`): a before/after comparison in one run.
    CausewayBaseline,
    /// Causeway, both sites on the same pod CIDR, reached through views.
    CausewayRemap,
    /// Causeway with both gateways behind port-preserving NATs.
    CausewayNat,
    /// Causeway through the rendezvous' UDP relay port (symmetric NATs on
    /// both sides).
    CausewayRelay,
    /// The same through the rendezvous' QUIC relay (`relay_ports = "off"`).
    CausewayRelayQuic,
    /// Causeway, both gateways behind egress firewalls that let no UDP
    /// out: relayed through the rendezvous over TLS on TCP.
    CausewayTcp,
    /// wireguard-go (Debian), configured with `wg`.
    WireguardGo,
    /// boringtun-cli (`cargo install boringtun-cli`), configured with `wg`.
    BoringtunCli,
}

/// Whether a system can be measured on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    Ready,
    /// A tool is missing; the reason says how to get it.
    Skipped(String),
}

impl System {
    /// Every system, in table order.
    pub(crate) const ALL: [System; 10] = [
        System::Raw,
        System::Causeway,
        System::CausewayBaseline,
        System::CausewayRemap,
        System::CausewayNat,
        System::CausewayRelay,
        System::CausewayRelayQuic,
        System::CausewayTcp,
        System::WireguardGo,
        System::BoringtunCli,
    ];

    /// The name used on the command line, in tables and in JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Raw => "raw",
            System::Causeway => "causeway",
            System::CausewayBaseline => "causeway-baseline",
            System::CausewayRemap => "causeway-remap",
            System::CausewayNat => "causeway-nat",
            System::CausewayRelay => "causeway-relay",
            System::CausewayRelayQuic => "causeway-relay-quic",
            System::CausewayTcp => "causeway-tcp",
            System::WireguardGo => "wireguard-go",
            System::BoringtunCli => "boringtun-cli",
        }
    }

    /// One line on what it is.
    pub(crate) fn description(self) -> &'static str {
        match self {
            System::Raw => {
                "no tunnel: the gateways and the internet router route the pod CIDRs in the clear (the ceiling)"
            }
            System::Causeway => "causeway, static endpoints, distinct pod CIDRs",
            System::CausewayBaseline => {
                "as causeway, with the binary given by --baseline (a before/after comparison in one run)"
            }
            System::CausewayRemap => {
                "causeway, both sites on 10.0.0.0/16, each reaching the other through its view CIDR"
            }
            System::CausewayNat => {
                "causeway, both gateways behind port-preserving NATs, peers without endpoints: a rendezvous on the internet router introduces them and they punch a direct path (checked before and after the tests); CPU and RSS are the two daemons' (the rendezvous carries no traffic then)"
            }
            System::CausewayRelay => {
                "causeway, both gateways behind symmetric NATs: no hole can be punched, the traffic goes through the rendezvous' UDP relay port (checked before and after the tests); CPU and RSS count the two daemons and the rendezvous, which carries the traffic"
            }
            System::CausewayRelayQuic => {
                "as causeway-relay with the rendezvous' relay ports off (relay_ports = \"off\"): the traffic goes through its QUIC relay, the fallback"
            }
            System::CausewayTcp => {
                "causeway, both gateways behind NATs whose egress firewall lets no UDP out: both sites reach the rendezvous over TLS on TCP (port 443) and the traffic is relayed over those connections (checked before and after the tests); CPU and RSS count the two daemons and the rendezvous"
            }
            System::WireguardGo => "wireguard-go from Debian, configured with wg",
            System::BoringtunCli => {
                "boringtun-cli (cargo install boringtun-cli), 4 threads, configured with wg"
            }
        }
    }

    pub(crate) fn parse(name: &str) -> Option<System> {
        System::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether it runs tunnel processes (whose CPU and memory are measured).
    pub(crate) fn is_tunnel(self) -> bool {
        self != System::Raw
    }

    pub(crate) fn readiness(self, tools: &Tools) -> Readiness {
        let need = |tool: &Result<PathBuf, String>| match tool {
            Ok(_) => Readiness::Ready,
            Err(how) => Readiness::Skipped(how.clone()),
        };
        match self {
            System::Raw => Readiness::Ready,
            System::Causeway
            | System::CausewayRemap
            | System::CausewayNat
            | System::CausewayRelay
            | System::CausewayRelayQuic
            | System::CausewayTcp => need(&tools.causeway),
            System::CausewayBaseline => need(&tools.baseline),
            System::WireguardGo => match (&tools.wireguard_go, &tools.wg) {
                (Err(how), _) | (_, Err(how)) => Readiness::Skipped(how.clone()),
                _ => Readiness::Ready,
            },
            System::BoringtunCli => match (&tools.boringtun, &tools.wg) {
                (Err(how), _) | (_, Err(how)) => Readiness::Skipped(how.clone()),
                _ => Readiness::Ready,
            },
        }
    }

    /// The lab: sites `a` and `b`, one pod each; `wan` on `a`'s access link.
    pub(crate) fn lab_spec(self, wan: Wan) -> anyhow::Result<LabSpec> {
        let (cidr_a, cidr_b) = match self {
            System::CausewayRemap => (CIDR_A, CIDR_A),
            _ => (CIDR_A, CIDR_B),
        };
        let nat = match self {
            System::CausewayNat => Some(Nat::PortPreserving),
            System::CausewayRelay | System::CausewayRelayQuic => Some(Nat::Symmetric),
            System::CausewayTcp => Some(Nat::UdpBlocked),
            _ => None,
        };
        let mut a = SiteSpec::new("a", vec![cidr_a.parse()?]).wan(wan);
        let mut b = SiteSpec::new("b", vec![cidr_b.parse()?]);
        if let Some(nat) = nat {
            a = a.nat(nat);
            b = b.nat(nat);
        }
        Ok(LabSpec { sites: vec![a, b] })
    }

    /// Where site `a`'s pod reaches site `b`'s pod once the system is up.
    pub(crate) fn target(self, lab: &Lab) -> anyhow::Result<Ipv4Addr> {
        let pod_b = lab.sites()[1].pods[0].addr;
        match self {
            System::CausewayRemap => through(pod_b, CIDR_A.parse()?, REMAP_POOL.parse()?),
            _ => Ok(pod_b),
        }
    }

    /// The path each Causeway site must see its peer on (`path` in
    /// `causeway status --json`) before and after the tests.
    pub(crate) fn peer_path(self) -> Option<PeerPath> {
        match self {
            System::Causeway | System::CausewayBaseline | System::CausewayRemap => {
                Some(PeerPath::Static)
            }
            System::CausewayNat => Some(PeerPath::Direct),
            System::CausewayRelay => Some(PeerPath::RelayUdp),
            System::CausewayRelayQuic => Some(PeerPath::RelayQuic),
            System::CausewayTcp => Some(PeerPath::RelayTcp),
            System::Raw | System::WireguardGo | System::BoringtunCli => None,
        }
    }

    /// Everything that may be done before the clock of establishment
    /// starts: keys, config files, and the rendezvous that the sites behind
    /// NATs dial (it runs before they come up, as it would in real life).
    pub(crate) fn prepare(self, tools: &Tools, lab: &Lab, dir: &Path) -> anyhow::Result<Prepared> {
        let sites = [&lab.sites()[0], &lab.sites()[1]];
        match self {
            System::Raw => Ok(Prepared::Raw),
            System::Causeway
            | System::CausewayRemap
            | System::CausewayNat
            | System::CausewayRelay
            | System::CausewayRelayQuic
            | System::CausewayTcp => {
                let bin = tools.causeway.clone().map_err(anyhow::Error::msg)?;
                prepare_causeway(self, &bin, lab, dir)
            }
            System::CausewayBaseline => {
                let bin = tools.baseline.clone().map_err(anyhow::Error::msg)?;
                prepare_causeway(self, &bin, lab, dir)
            }
            System::WireguardGo | System::BoringtunCli => {
                let wg = tools.wg.clone().map_err(anyhow::Error::msg)?;
                let (flavour, bin) = match self {
                    System::WireguardGo => (Flavour::WireguardGo, tools.wireguard_go.clone()),
                    _ => (Flavour::Boringtun, tools.boringtun.clone()),
                };
                prepare_wireguard(flavour, bin.map_err(anyhow::Error::msg)?, wg, sites, dir)
            }
        }
    }
}

/// The programs the systems need; `Err` says how to install a missing one.
#[derive(Clone, Debug)]
pub(crate) struct Tools {
    pub(crate) causeway: Result<PathBuf, String>,
    /// The causeway binary of `causeway-baseline`.
    pub(crate) baseline: Result<PathBuf, String>,
    pub(crate) wireguard_go: Result<PathBuf, String>,
    pub(crate) wg: Result<PathBuf, String>,
    pub(crate) boringtun: Result<PathBuf, String>,
}

impl Tools {
    /// Looks for each program: `causeway` where given or next to this
    /// binary, the others on `PATH` (boringtun-cli also in `~/.cargo/bin`).
    pub(crate) fn find(
        causeway: Option<PathBuf>,
        baseline: Option<PathBuf>,
        boringtun: Option<PathBuf>,
    ) -> Tools {
        let causeway = match causeway {
            Some(p) => Ok(p),
            None => std::env::current_exe().map(|e| e.with_file_name("causeway")).map_err(|e| e.to_string()),
        }
        .and_then(|p| {
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!("causeway binary not found at {}; build it (cargo build --release -p causeway) or pass --causeway", p.display()))
            }
        });
        let apt = |cmd: &str, package: &str| {
            which(cmd).ok_or_else(|| {
                format!("{cmd} not found; install it with `apt-get install {package}`")
            })
        };
        let cargo_bin = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|d| d.join("bin").join("boringtun-cli"));
        let boringtun = boringtun
            .or_else(|| which("boringtun-cli"))
            .or_else(|| cargo_bin.filter(|p| p.is_file()))
            .filter(|p| p.is_file())
            .ok_or_else(|| "boringtun-cli not found; install it with `cargo install boringtun-cli --locked` (or pass --boringtun PATH)".to_owned());
        let baseline = match baseline {
            Some(p) if p.is_file() => Ok(p),
            Some(p) => Err(format!(
                "baseline causeway binary not found at {}",
                p.display()
            )),
            None => {
                Err("causeway-baseline needs --baseline PATH (another causeway binary)".to_owned())
            }
        };
        Tools {
            causeway,
            baseline,
            wireguard_go: apt("wireguard-go", "wireguard-go"),
            wg: apt("wg", "wireguard-tools"),
            boringtun,
        }
    }

    /// `--version` of each tool that is there, for the report.
    pub(crate) fn versions(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, tool, arg) in [
            ("causeway", &self.causeway, "--version"),
            ("causeway-baseline", &self.baseline, "--version"),
            ("wireguard-go", &self.wireguard_go, "--version"),
            ("boringtun-cli", &self.boringtun, "--version"),
        ] {
            let Ok(path) = tool else { continue };
            let version = Command::new(path)
                .arg(arg)
                .stdin(Stdio::null())
                .output()
                .ok()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_owned()
                })
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "unknown version".into());
            out.push((name.to_owned(), version));
        }
        out
    }
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(cmd))
            .find(|p| p.is_file())
    })
}

/// A system ready to start.
pub(crate) enum Prepared {
    Raw,
    Causeway(Box<CausewayPair>),
    Wireguard(Box<WireguardPair>),
}

/// A running system. Dropping it stops its processes.
pub(crate) struct Tunnel {
    /// The processes whose CPU time and memory are measured: the tunnel
    /// processes of both sites (empty for raw), Causeway's daemons first
    /// (site `a`, then `b`), then for causeway-relay the rendezvous, which
    /// carries the traffic.
    pub(crate) processes: Vec<ChildGuard>,
    /// Processes the system needs that are not measured: the rendezvous of
    /// causeway-nat, which only introduces the sites. Stopped last.
    services: Vec<ChildGuard>,
    /// Stops after the processes (removes leftover UAPI sockets).
    pub(crate) cleanup: Vec<PathBuf>,
    /// Log files, quoted when something fails.
    pub(crate) logs: Vec<PathBuf>,
    causeway: Option<Control>,
}

/// What the lab checks of a Causeway pair through its control sockets.
struct Control {
    bin: PathBuf,
    /// Per site (`a`, `b`): its name, its peer's name, its control socket.
    sites: Vec<(String, String, PathBuf)>,
    /// The path both sites must see their peer on.
    path: PeerPath,
    /// Each site's peer once the path was reached, before the tests.
    before: Vec<PeerStatus>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for mut p in self.processes.drain(..).chain(self.services.drain(..)) {
            let _ = p.stop(Duration::from_secs(3));
        }
        for path in &self.cleanup {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Prepared {
    /// Starts both ends as fast as it can; returns when every process is
    /// spawned and configured (traffic may not flow yet).
    pub(crate) fn start(self, lab: &Lab) -> anyhow::Result<Tunnel> {
        match self {
            Prepared::Raw => {
                route_raw(lab)?;
                Ok(Tunnel::new(Vec::new(), None))
            }
            Prepared::Causeway(pair) => pair.start(lab),
            Prepared::Wireguard(pair) => pair.start(lab),
        }
    }
}

impl Tunnel {
    fn new(logs: Vec<PathBuf>, causeway: Option<Control>) -> Tunnel {
        Tunnel {
            processes: Vec::new(),
            services: Vec::new(),
            cleanup: Vec::new(),
            logs,
            causeway,
        }
    }

    /// After the first packet went through: waits until both Causeway
    /// daemons' control sockets answer, checks that site `a` sees site
    /// `b`'s pods where the measurement expects them (the view in `causeway
    /// status --json`), and waits up to `within` until both sites see
    /// their peer on the system's path (a hole punched through the NATs
    /// takes a few round trips). Nothing to do for other systems.
    pub(crate) fn settle(
        &mut self,
        pod_b: Ipv4Addr,
        real_b: Ipv4Net,
        expected: Ipv4Addr,
        within: Duration,
    ) -> anyhow::Result<()> {
        let Some(control) = self.causeway.as_mut() else {
            return Ok(());
        };
        let mut statuses = Vec::new();
        for ((_, _, socket), daemon) in control.sites.iter().zip(&mut self.processes) {
            statuses.push(daemon::wait_ready(&control.bin, socket, daemon)?);
        }
        let (_, peer_of_a, _) = &control.sites[0];
        let status = statuses.first().context("no causeway status")?;
        let view = PeerStatus::of(status, peer_of_a)?.view.unwrap_or(real_b);
        let seen = through(pod_b, real_b, view)?;
        ensure!(
            seen == expected,
            "site a sees site b's pod {pod_b} at {seen} (view {view}), but the probes went to {expected}"
        );
        let mut before = Vec::new();
        for (site, peer, socket) in &control.sites {
            let seen = daemon::wait_path(&control.bin, socket, peer, control.path, within)?;
            ensure!(
                seen.is_on(control.path),
                "site {site} sees its peer {peer} on path {}{}, not {}, {within:?} after the first packet went through",
                seen.path,
                seen.endpoint.map(|e| format!(" {e}")).unwrap_or_default(),
                control.path.name(),
            );
            before.push(seen);
        }
        control.before = before;
        Ok(())
    }

    /// After the tests: both sites still see their peer on the system's
    /// path, and the traffic of the tests took it (through the relay for
    /// relay, hardly any through it otherwise). Nothing to do for other
    /// systems.
    pub(crate) fn check_path_kept(&self) -> anyhow::Result<()> {
        let Some(control) = &self.causeway else {
            return Ok(());
        };
        for ((site, peer, socket), before) in control.sites.iter().zip(&control.before) {
            let now = PeerStatus::of(&daemon::status(&control.bin, socket)?, peer)?;
            let want = control.path.name();
            ensure!(
                now.is_on(control.path),
                "site {site} saw its peer {peer} on path {want} before the tests and on {} after",
                now.path
            );
            let packets = now.packets.saturating_sub(before.packets);
            let relayed = now.relayed.saturating_sub(before.relayed);
            if control.path.is_relay() {
                ensure!(
                    packets == 0 || relayed > 0,
                    "site {site}: none of the {packets} packets to and from {peer} during the tests went through the relay"
                );
            } else {
                ensure!(
                    relayed * 100 <= packets,
                    "site {site}: {relayed} WireGuard messages to and from {peer} went through the relay during the tests, \
                     for {packets} packets through the tunnel: not only the {want} path"
                );
            }
        }
        Ok(())
    }

    /// The last lines of every log, and which tunnel processes exited, for
    /// an error message.
    pub(crate) fn log_tails(&mut self) -> String {
        let mut s = String::new();
        for p in self.processes.iter_mut().chain(&mut self.services) {
            if let Ok(Some(status)) = p.wait_timeout(Duration::ZERO) {
                s += &format!("; process {} exited with {status}", p.pid());
            }
        }
        for log in &self.logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(5)..].join("\n  ");
            if !tail.is_empty() {
                s += &format!("\n{}:\n  {tail}", log.display());
            }
        }
        s
    }
}

/// Raw: pod CIDRs routed via the internet router, which is told to let them
/// through (the lab's leak filter drops non-underlay traffic otherwise).
fn route_raw(lab: &Lab) -> anyhow::Result<()> {
    let sites = lab.sites();
    let inet = lab.internet();
    for (i, site) in sites.iter().enumerate() {
        let other = &sites[1 - i];
        let n = i + 1;
        for cidr in &other.pod_cidrs {
            site.gateway.ip(&[
                "route",
                "add",
                &cidr.to_string(),
                "via",
                &format!("198.18.{n}.1"),
            ])?;
        }
        for cidr in &site.pod_cidrs {
            inet.ip(&[
                "route",
                "add",
                &cidr.to_string(),
                "via",
                &site.wan_addr.to_string(),
            ])?;
        }
    }
    let pods: Vec<String> = sites
        .iter()
        .flat_map(|s| s.pod_cidrs.iter().map(IpNet::to_string))
        .collect();
    let set = pods.join(", ");
    inet.run(
        "nft",
        &[
            "insert",
            "rule",
            "inet",
            "causeway_lab",
            "prerouting",
            "ip",
            "saddr",
            &format!("{{ {set} }}"),
            "ip",
            "daddr",
            &format!("{{ {set} }}"),
            "accept",
        ],
    )?;
    Ok(())
}

pub(crate) struct CausewayPair {
    bin: PathBuf,
    /// Sites `a` and `b`, in lab order.
    dirs: [SiteDir; 2],
    /// Per site: its name and its peer's.
    names: [(String, String); 2],
    /// The rendezvous of the systems behind NATs, already running.
    rendezvous: Option<Rendezvous>,
    path: PeerPath,
}

/// Keys and configs of both sites; for the systems behind NATs also the
/// rendezvous, started (and IPv6 taken off the gateways' underlay link, so
/// that the sites meet through their IPv4 NATs).
fn prepare_causeway(system: System, bin: &Path, lab: &Lab, dir: &Path) -> anyhow::Result<Prepared> {
    let sites = [&lab.sites()[0], &lab.sites()[1]];
    let path = system
        .peer_path()
        .with_context(|| format!("{} is not a causeway system", system.name()))?;
    let keys = [KeyPair::generate(bin)?, KeyPair::generate(bin)?];
    let rendezvous = match path {
        PeerPath::Static => None,
        _ => {
            daemon::ipv4_only_behind_nats(lab)?;
            let served = [
                (sites[0].name.as_str(), keys[0].public.as_str()),
                (sites[1].name.as_str(), keys[1].public.as_str()),
            ];
            let extra_toml = match path {
                PeerPath::RelayQuic => "relay_ports = \"off\"\n".to_owned(),
                // The sites' default TLS-over-TCP address: the rendezvous'
                // host on 443.
                PeerPath::RelayTcp => format!("tcp_listen = \"{}:443\"\n", lab.internet_addr()),
                _ => String::new(),
            };
            Some(Rendezvous::start_with(
                bin,
                lab,
                &dir.join("rendezvous"),
                &served,
                CAUSEWAY_LOG_LEVEL,
                &[],
                &extra_toml,
            )?)
        }
    };
    let mut dirs = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let peer = sites[1 - i];
        let d = SiteDir::create(dir.join(format!("causeway-{}", site.name)))?;
        SiteConfig {
            site: &site.name,
            private_key: &keys[i].private,
            pod_cidrs: &site.pod_cidrs,
            listen_port: Some(WG_PORT),
            mtu: Some(MTU),
            remap_pool: Some(REMAP_POOL),
            peer: PeerConfig {
                name: &peer.name,
                public_key: &keys[1 - i].public,
                cidrs: &peer.pod_cidrs,
                endpoint: rendezvous
                    .is_none()
                    .then(|| SocketAddr::new(peer.wan_addr, WG_PORT)),
            },
            rendezvous: rendezvous.as_ref().map(|r| &r.pin),
        }
        .write(&d)?;
        dirs.push(d);
    }
    Ok(Prepared::Causeway(Box::new(CausewayPair {
        bin: bin.to_owned(),
        dirs: two(dirs)?,
        names: [
            (sites[0].name.clone(), sites[1].name.clone()),
            (sites[1].name.clone(), sites[0].name.clone()),
        ],
        rendezvous,
        path,
    })))
}

impl CausewayPair {
    fn start(self, lab: &Lab) -> anyhow::Result<Tunnel> {
        let mut logs: Vec<PathBuf> = self.dirs.iter().map(SiteDir::log).collect();
        logs.extend(self.rendezvous.as_ref().map(|r| r.log.clone()));
        let sites = self
            .names
            .iter()
            .zip(&self.dirs)
            .map(|((site, peer), d)| (site.clone(), peer.clone(), d.control_socket()))
            .collect();
        let mut tunnel = Tunnel::new(
            logs,
            Some(Control {
                bin: self.bin.clone(),
                sites,
                path: self.path,
                before: Vec::new(),
            }),
        );
        let rendezvous = self.rendezvous.map(|r| r.process);
        for (site, d) in lab.sites().iter().zip(&self.dirs) {
            tunnel.processes.push(daemon::spawn_daemon(
                &self.bin,
                &site.gateway,
                d,
                CAUSEWAY_LOG_LEVEL,
            )?);
        }
        match rendezvous {
            // The relay carries the traffic: its work is the tunnel's.
            Some(r) if self.path.is_relay() => tunnel.processes.push(r),
            Some(r) => tunnel.services.push(r),
            None => {}
        }
        Ok(tunnel)
    }
}

fn two<T>(v: Vec<T>) -> anyhow::Result<[T; 2]> {
    v.try_into()
        .map_err(|_| anyhow::anyhow!("two sites expected"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    WireguardGo,
    Boringtun,
}

pub(crate) struct WireguardPair {
    flavour: Flavour,
    bin: PathBuf,
    wg: PathBuf,
    ifnames: [String; 2],
    keys: [PathBuf; 2],
    publics: [String; 2],
    logs: [PathBuf; 2],
}

/// A fresh interface name for one site: the UAPI socket
/// `/var/run/wireguard/<name>.sock` is host-wide, so names must not repeat
/// across namespaces, runs or concurrent processes.
fn ifname(side: char) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "cwb{}{side}{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed) % 100_000
    )
}

fn prepare_wireguard(
    flavour: Flavour,
    bin: PathBuf,
    wg: PathBuf,
    sites: [&Site; 2],
    dir: &Path,
) -> anyhow::Result<Prepared> {
    let mut keys = Vec::new();
    let mut publics = Vec::new();
    let mut logs = Vec::new();
    for site in sites {
        let pair = KeyPair::generate(&wg)?;
        let path = dir.join(format!("wg-{}.key", site.name));
        daemon::write_private_key(&path, &pair.private)?;
        keys.push(path);
        publics.push(pair.public);
        logs.push(dir.join(format!(
            "{}-{}.log",
            if flavour == Flavour::WireguardGo {
                "wireguard-go"
            } else {
                "boringtun"
            },
            site.name
        )));
    }
    let ifnames = [ifname('a'), ifname('b')];
    for name in &ifnames {
        let sock = uapi_socket(name);
        ensure!(
            !sock.exists(),
            "{} exists already; another process uses interface name {name}",
            sock.display()
        );
    }
    Ok(Prepared::Wireguard(Box::new(WireguardPair {
        flavour,
        bin,
        wg,
        ifnames,
        keys: two(keys)?,
        publics: two(publics)?,
        logs: two(logs)?,
    })))
}

fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from("/var/run/wireguard").join(format!("{ifname}.sock"))
}

impl WireguardPair {
    fn start(self, lab: &Lab) -> anyhow::Result<Tunnel> {
        let sites = lab.sites();
        let mut tunnel = Tunnel::new(self.logs.to_vec(), None);
        tunnel.cleanup = self.ifnames.iter().map(|n| uapi_socket(n)).collect();
        for (i, site) in sites.iter().take(2).enumerate() {
            let log = std::fs::File::create(&self.logs[i])?;
            let ns = &site.gateway;
            let mut cmd = ns.command(path_str(&self.bin)?);
            match self.flavour {
                Flavour::WireguardGo => {
                    cmd.args(["-f", &self.ifnames[i]])
                        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
                        .env("LOG_LEVEL", "error");
                }
                Flavour::Boringtun => {
                    cmd.args([
                        "--foreground",
                        "--disable-drop-privileges",
                        &self.ifnames[i],
                    ])
                    .env("WG_LOG_LEVEL", "error")
                    .env("WG_LOG_FILE", &self.logs[i]);
                }
            }
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            tunnel.processes.push(ns.spawn(&mut cmd)?);
        }
        // Configure both sites at once, as two operators would.
        let results: Vec<anyhow::Result<()>> = thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|i| {
                    scope.spawn({
                        let this = &self;
                        move || this.configure(i, &sites[i], &sites[1 - i])
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("configuring thread panicked")))
                })
                .collect()
        });
        for r in results {
            r.map_err(|e| anyhow::anyhow!("{e:#}{}", tunnel.log_tails()))?;
        }
        Ok(tunnel)
    }

    /// `wg set`, link up with the MTU, route to the peer's pods.
    fn configure(&self, i: usize, site: &Site, peer: &Site) -> anyhow::Result<()> {
        let ifname = &self.ifnames[i];
        let sock = uapi_socket(ifname);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            ensure!(
                Instant::now() < deadline,
                "{} did not create {}",
                self.bin.display(),
                sock.display()
            );
            thread::sleep(Duration::from_millis(1));
        }
        let ns: &Netns = &site.gateway;
        let allowed: Vec<String> = peer.pod_cidrs.iter().map(IpNet::to_string).collect();
        let endpoint = SocketAddr::new(peer.wan_addr, WG_PORT).to_string();
        let (port, key) = (WG_PORT.to_string(), path_str(&self.keys[i])?.to_owned());
        let allowed_ips = allowed.join(",");
        let wg = path_str(&self.wg)?;
        ns.run(
            wg,
            &[
                "set",
                ifname,
                "listen-port",
                &port,
                "private-key",
                &key,
                "peer",
                &self.publics[1 - i],
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed_ips,
            ],
        )?;
        ns.ip(&["link", "set", ifname, "mtu", &MTU.to_string(), "up"])?;
        for cidr in &allowed {
            ns.ip(&["route", "replace", cidr, "dev", ifname])?;
        }
        Ok(())
    }
}

/// The IPv4 pod CIDR of site `b`.
pub(crate) fn real_cidr_b(lab: &Lab) -> anyhow::Result<Ipv4Net> {
    lab.sites()[1]
        .pod_cidrs
        .iter()
        .find_map(|c| match c {
            IpNet::V4(v4) => Some(*v4),
            IpNet::V6(_) => None,
        })
        .context("site b has no IPv4 pod CIDR")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in System::ALL {
            assert_eq!(System::parse(s.name()), Some(s));
        }
        assert_eq!(System::parse("kernel"), None);
    }

    #[test]
    fn interface_names_fit_linux() {
        for _ in 0..3 {
            let name = ifname('a');
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn readiness_follows_the_tools() {
        let tools = Tools {
            causeway: Ok("/bin/true".into()),
            baseline: Err("pass --baseline".into()),
            wireguard_go: Ok("/bin/true".into()),
            wg: Ok("/bin/true".into()),
            boringtun: Err("install it".into()),
        };
        for system in [
            System::Causeway,
            System::CausewayRemap,
            System::CausewayNat,
            System::CausewayRelay,
            System::CausewayRelayQuic,
            System::CausewayTcp,
        ] {
            assert_eq!(
                system.readiness(&tools),
                Readiness::Ready,
                "{}",
                system.name()
            );
        }
        let without_causeway = Tools {
            causeway: Err("build it".into()),
            ..tools.clone()
        };
        for system in [System::CausewayNat, System::CausewayRelay] {
            assert_eq!(
                system.readiness(&without_causeway),
                Readiness::Skipped("build it".into())
            );
        }
        assert_eq!(
            System::BoringtunCli.readiness(&tools),
            Readiness::Skipped("install it".into())
        );
        assert_eq!(System::WireguardGo.readiness(&tools), Readiness::Ready);
    }
}
