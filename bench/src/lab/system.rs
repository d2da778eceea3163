//! The systems the lab compares, and how each one joins two sites.
//!
//! Adding a system (say, Causeway through NATs once NAT traversal exists)
//! means: a [`System`] variant, its lab shape ([`System::lab_spec`]), its
//! [`Readiness`], and a [`Prepared`] that starts it. The measurement code
//! only sees [`Tunnel`]s.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use causeway_testbed::{ChildGuard, IpNet, Lab, LabSpec, Nat, Netns, Site, SiteSpec, Wan};
use ipnet::Ipv4Net;

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

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum System {
    /// The same topology routed with no tunnel: the ceiling.
    Raw,
    /// Causeway with static endpoints, distinct pod CIDRs.
    Causeway,
    /// Causeway, both sites on the same pod CIDR, reached through views.
    CausewayRemap,
    /// Causeway with both gateways behind port-preserving NATs.
    CausewayNat,
    /// Causeway through the rendezvous relay (symmetric NATs on both sides).
    CausewayRelay,
    /// wireguard-go (Debian), configured with `wg`.
    WireguardGo,
    /// boringtun-cli (`cargo install boringtun-cli`), configured with `wg`.
    BoringtunCli,
}

/// Whether a system can be measured on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    Ready,
    /// Causeway does not have this yet.
    NotBuilt(String),
    /// A tool is missing; the reason says how to get it.
    Skipped(String),
}

impl System {
    /// Every system, in table order.
    pub(crate) const ALL: [System; 7] = [
        System::Raw,
        System::Causeway,
        System::CausewayRemap,
        System::CausewayNat,
        System::CausewayRelay,
        System::WireguardGo,
        System::BoringtunCli,
    ];

    /// The name used on the command line, in tables and in JSON.
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Raw => "raw",
            System::Causeway => "causeway",
            System::CausewayRemap => "causeway-remap",
            System::CausewayNat => "causeway-nat",
            System::CausewayRelay => "causeway-relay",
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
            System::CausewayRemap => {
                "causeway, both sites on 10.0.0.0/16, each reaching the other through its view CIDR"
            }
            System::CausewayNat => {
                "causeway, both gateways behind port-preserving NATs (hole punching via the rendezvous)"
            }
            System::CausewayRelay => {
                "causeway through the rendezvous relay (symmetric NATs on both sides)"
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
            System::Causeway | System::CausewayRemap => need(&tools.causeway),
            System::CausewayNat => Readiness::NotBuilt(
                "NAT traversal (rendezvous, hole punching) is not built yet".into(),
            ),
            System::CausewayRelay => {
                Readiness::NotBuilt("the rendezvous relay is not built yet".into())
            }
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
            System::CausewayRelay => Some(Nat::Symmetric),
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

    /// Everything that may be done before the clock of establishment
    /// starts: keys, config files.
    pub(crate) fn prepare(self, tools: &Tools, lab: &Lab, dir: &Path) -> anyhow::Result<Prepared> {
        let sites = [&lab.sites()[0], &lab.sites()[1]];
        match self {
            System::Raw => Ok(Prepared::Raw),
            System::Causeway | System::CausewayRemap => {
                let bin = tools.causeway.clone().map_err(anyhow::Error::msg)?;
                prepare_causeway(&bin, sites, dir)
            }
            System::WireguardGo | System::BoringtunCli => {
                let wg = tools.wg.clone().map_err(anyhow::Error::msg)?;
                let (flavour, bin) = match self {
                    System::WireguardGo => (Flavour::WireguardGo, tools.wireguard_go.clone()),
                    _ => (Flavour::Boringtun, tools.boringtun.clone()),
                };
                prepare_wireguard(flavour, bin.map_err(anyhow::Error::msg)?, wg, sites, dir)
            }
            System::CausewayNat | System::CausewayRelay => {
                bail!("{} is not built yet", self.name())
            }
        }
    }
}

/// The programs the systems need; `Err` says how to install a missing one.
#[derive(Clone, Debug)]
pub(crate) struct Tools {
    pub(crate) causeway: Result<PathBuf, String>,
    pub(crate) wireguard_go: Result<PathBuf, String>,
    pub(crate) wg: Result<PathBuf, String>,
    pub(crate) boringtun: Result<PathBuf, String>,
}

impl Tools {
    /// Looks for each program: `causeway` where given or next to this
    /// binary, the others on `PATH` (boringtun-cli also in `~/.cargo/bin`).
    pub(crate) fn find(causeway: Option<PathBuf>, boringtun: Option<PathBuf>) -> Tools {
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
        Tools {
            causeway,
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

/// `addr` of a network `real` as seen through `view`.
fn through(addr: Ipv4Addr, real: Ipv4Net, view: Ipv4Net) -> anyhow::Result<Ipv4Addr> {
    ensure!(
        real.contains(&addr) && real.prefix_len() == view.prefix_len(),
        "{addr} is not in {real}, or {view} is not the same size"
    );
    let host = u32::from(addr) & !u32::from(real.netmask());
    Ok(Ipv4Addr::from(u32::from(view.network()) | host))
}

/// A system ready to start.
pub(crate) enum Prepared {
    Raw,
    Causeway(Box<CausewayPair>),
    Wireguard(Box<WireguardPair>),
}

/// A running system. Dropping it stops its processes.
pub(crate) struct Tunnel {
    /// The tunnel processes of both sites (empty for raw).
    pub(crate) processes: Vec<ChildGuard>,
    /// Stops after the processes (removes leftover UAPI sockets).
    pub(crate) cleanup: Vec<PathBuf>,
    /// Log files, quoted when something fails.
    pub(crate) logs: Vec<PathBuf>,
    /// Causeway control sockets (to wait for and read the views).
    sockets: Vec<PathBuf>,
    causeway: Option<PathBuf>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for mut p in self.processes.drain(..) {
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
                Ok(Tunnel {
                    processes: Vec::new(),
                    cleanup: Vec::new(),
                    logs: Vec::new(),
                    sockets: Vec::new(),
                    causeway: None,
                })
            }
            Prepared::Causeway(pair) => pair.start(lab),
            Prepared::Wireguard(pair) => pair.start(lab),
        }
    }
}

impl Tunnel {
    /// After the first packet went through: waits until a Causeway
    /// daemon's control socket answers, and checks that site `a` sees site
    /// `b`'s pods where the measurement expects them (the view in `causeway
    /// status --json`). Nothing to do for other systems.
    pub(crate) fn settle(
        &mut self,
        pod_b: Ipv4Addr,
        real_b: Ipv4Net,
        expected: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let Some(bin) = self.causeway.clone() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut statuses = Vec::new();
        for socket in &self.sockets {
            loop {
                let out = Command::new(&bin)
                    .args(["status", "--json", "--socket"])
                    .arg(socket)
                    .stderr(Stdio::null())
                    .output()?;
                if out.status.success() {
                    statuses.push(
                        serde_json::from_slice::<serde_json::Value>(&out.stdout)
                            .context("causeway status --json")?,
                    );
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "causeway's control socket {} did not answer",
                    socket.display()
                );
                thread::sleep(Duration::from_millis(10));
            }
        }
        let status = statuses.first().context("no causeway status")?;
        let peer = status["peers"]
            .as_array()
            .and_then(|p| p.first())
            .context("site a's status lists no peer")?;
        let view: Ipv4Net = match peer["views"].as_array().and_then(|v| v.first()) {
            Some(v) => v["view"]
                .as_str()
                .context("a view without a view CIDR")?
                .parse()?,
            None => real_b,
        };
        let seen = through(pod_b, real_b, view)?;
        ensure!(
            seen == expected,
            "site a sees site b's pod {pod_b} at {seen} (view {view}), but the probes went to {expected}"
        );
        Ok(())
    }

    /// The last lines of every log, and which tunnel processes exited, for
    /// an error message.
    pub(crate) fn log_tails(&mut self) -> String {
        let mut s = String::new();
        for p in &mut self.processes {
            if let Ok(Some(status)) = p.wait_timeout(Duration::ZERO) {
                s += &format!("; tunnel process {} exited with {status}", p.pid());
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
    configs: [PathBuf; 2],
    sockets: [PathBuf; 2],
    logs: [PathBuf; 2],
}

fn prepare_causeway(bin: &Path, sites: [&Site; 2], dir: &Path) -> anyhow::Result<Prepared> {
    let mut keys = Vec::new();
    for _ in 0..2 {
        let private = run_ok(Command::new(bin).arg("genkey"), None)?;
        let public = run_ok(Command::new(bin).arg("pubkey"), Some(&private))?;
        keys.push((private.trim().to_owned(), public.trim().to_owned()));
    }
    let mut configs = Vec::new();
    let mut sockets = Vec::new();
    let mut logs = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let peer = sites[1 - i];
        let d = dir.join(format!("causeway-{}", site.name));
        std::fs::create_dir_all(&d)?;
        let key = d.join("private.key");
        std::fs::write(&key, format!("{}\n", keys[i].0))?;
        let cidrs = |s: &Site| {
            s.pod_cidrs
                .iter()
                .map(|c| format!("{:?}", c.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let socket = d.join("control.sock");
        let text = format!(
            "[site]\nname = {name:?}\nprivate_key_file = {key:?}\nlisten_port = {WG_PORT}\nmtu = {MTU}\npod_cidrs = [{own}]\n\
             remap_pool = [{REMAP_POOL:?}]\ncontrol_socket = {socket:?}\nuapi_socket = {uapi:?}\nstate_dir = {d:?}\n\n\
             [[peer]]\nname = {peer_name:?}\npublic_key = {peer_key:?}\ncidrs = [{peer_cidrs}]\nendpoint = \"{endpoint}\"\n",
            name = site.name,
            own = cidrs(site),
            peer_name = peer.name,
            peer_key = keys[1 - i].1,
            peer_cidrs = cidrs(peer),
            endpoint = SocketAddr::new(peer.wan_addr, WG_PORT),
            // /var/run/wireguard is host-wide; both gateways use causeway0.
            uapi = d.join("uapi.sock"),
        );
        let config = d.join("causeway.toml");
        std::fs::write(&config, text)?;
        configs.push(config);
        sockets.push(socket);
        logs.push(d.join("causeway.log"));
    }
    let arr = |v: Vec<PathBuf>| -> anyhow::Result<[PathBuf; 2]> {
        v.try_into()
            .map_err(|_| anyhow::anyhow!("two sites expected"))
    };
    Ok(Prepared::Causeway(Box::new(CausewayPair {
        bin: bin.to_owned(),
        configs: arr(configs)?,
        sockets: arr(sockets)?,
        logs: arr(logs)?,
    })))
}

impl CausewayPair {
    fn start(self, lab: &Lab) -> anyhow::Result<Tunnel> {
        let mut tunnel = Tunnel {
            processes: Vec::new(),
            cleanup: Vec::new(),
            logs: self.logs.to_vec(),
            sockets: self.sockets.to_vec(),
            causeway: Some(self.bin.clone()),
        };
        for (i, site) in lab.sites().iter().take(2).enumerate() {
            let log = std::fs::File::create(&self.logs[i])?;
            let mut cmd = site.gateway.command(path_str(&self.bin)?);
            cmd.args(["up", "--config"])
                .arg(&self.configs[i])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            tunnel.processes.push(site.gateway.spawn(&mut cmd)?);
        }
        Ok(tunnel)
    }
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
        let private = run_ok(Command::new(&wg).arg("genkey"), None)?;
        let public = run_ok(Command::new(&wg).arg("pubkey"), Some(&private))?;
        let path = dir.join(format!("wg-{}.key", site.name));
        std::fs::write(&path, private)?;
        keys.push(path);
        publics.push(public.trim().to_owned());
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
    fn two<T>(v: Vec<T>) -> anyhow::Result<[T; 2]> {
        v.try_into()
            .map_err(|_| anyhow::anyhow!("two sites expected"))
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
        let mut tunnel = Tunnel {
            processes: Vec::new(),
            cleanup: self.ifnames.iter().map(|n| uapi_socket(n)).collect(),
            logs: self.logs.to_vec(),
            sockets: Vec::new(),
            causeway: None,
        };
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

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Runs a local command (key generation) and returns its stdout.
fn run_ok(cmd: &mut Command, input: Option<&str>) -> anyhow::Result<String> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        std::io::Write::write_all(&mut stdin, input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{:?} failed: {}",
        cmd.get_program(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?)
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
    fn views_keep_host_bits() {
        let got = through(
            Ipv4Addr::new(10, 0, 1, 2),
            "10.0.0.0/16".parse().expect("cidr"),
            "100.64.0.0/16".parse().expect("cidr"),
        );
        assert_eq!(got.ok(), Some(Ipv4Addr::new(100, 64, 1, 2)));
        assert!(
            through(
                Ipv4Addr::new(10, 9, 1, 2),
                "10.0.0.0/16".parse().expect("cidr"),
                "100.64.0.0/16".parse().expect("cidr")
            )
            .is_err()
        );
    }

    #[test]
    fn interface_names_fit_linux() {
        for _ in 0..3 {
            let name = ifname('a');
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn unbuilt_systems_say_so() {
        let tools = Tools {
            causeway: Ok("/bin/true".into()),
            wireguard_go: Ok("/bin/true".into()),
            wg: Ok("/bin/true".into()),
            boringtun: Err("install it".into()),
        };
        assert!(matches!(
            System::CausewayNat.readiness(&tools),
            Readiness::NotBuilt(_)
        ));
        assert!(matches!(
            System::CausewayRelay.readiness(&tools),
            Readiness::NotBuilt(_)
        ));
        assert_eq!(
            System::BoringtunCli.readiness(&tools),
            Readiness::Skipped("install it".into())
        );
        assert_eq!(System::WireguardGo.readiness(&tools), Readiness::Ready);
    }
}
