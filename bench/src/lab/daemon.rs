//! Causeway's own processes in a lab, shared by the lab's causeway cells
//! and the demo: key pairs, a site daemon's directory and config, the
//! rendezvous in the lab's internet namespace, and what `causeway status
//! --json` says about a peer (its view and its path, see docs/status.md).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use causeway_testbed::{ChildGuard, IpNet, Lab, Netns};
use ipnet::Ipv4Net;
use serde_json::Value;

use super::procfs;
use crate::interrupt;

/// The rendezvous' QUIC port.
pub(crate) const RENDEZVOUS_PORT: u16 = 7443;
/// The rendezvous' STUN port.
pub(crate) const STUN_PORT: u16 = 3478;
/// How long a daemon or the rendezvous may take to answer once started.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A WireGuard key pair from `genkey` and `pubkey` (`causeway` and `wg`
/// both have them).
pub(crate) struct KeyPair {
    pub(crate) private: String,
    pub(crate) public: String,
}

impl KeyPair {
    pub(crate) fn generate(tool: &Path) -> anyhow::Result<KeyPair> {
        let private = causeway_testbed::run_command(Command::new(tool).arg("genkey"), None)?;
        let public =
            causeway_testbed::run_command(Command::new(tool).arg("pubkey"), Some(&private))?;
        Ok(KeyPair {
            private: private.trim().to_owned(),
            public: public.trim().to_owned(),
        })
    }
}

/// A site daemon's directory: its key, config, sockets, state and log.
pub(crate) struct SiteDir(PathBuf);

impl SiteDir {
    pub(crate) fn create(path: PathBuf) -> anyhow::Result<SiteDir> {
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(SiteDir(path))
    }

    pub(crate) fn config(&self) -> PathBuf {
        self.0.join("causeway.toml")
    }

    pub(crate) fn control_socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }

    /// The daemon's stderr.
    pub(crate) fn log(&self) -> PathBuf {
        self.0.join("causeway.log")
    }

    fn private_key(&self) -> PathBuf {
        self.0.join("private.key")
    }
}

/// What the lab and the demo put into a site daemon's config; `None`
/// leaves the daemon's default.
pub(crate) struct SiteConfig<'a> {
    pub(crate) site: &'a str,
    pub(crate) private_key: &'a str,
    pub(crate) pod_cidrs: &'a [IpNet],
    pub(crate) listen_port: Option<u16>,
    pub(crate) mtu: Option<u16>,
    pub(crate) remap_pool: Option<&'a str>,
    pub(crate) peer: PeerConfig<'a>,
    pub(crate) rendezvous: Option<&'a RendezvousPin>,
}

/// The site's one `[[peer]]`.
pub(crate) struct PeerConfig<'a> {
    pub(crate) name: &'a str,
    pub(crate) public_key: &'a str,
    pub(crate) cidrs: &'a [IpNet],
    /// `None`: the sites find each other through the rendezvous.
    pub(crate) endpoint: Option<SocketAddr>,
}

/// A rendezvous as a site's `[[rendezvous]]` pins it.
#[derive(Clone, Debug)]
pub(crate) struct RendezvousPin {
    pub(crate) address: SocketAddr,
    pub(crate) public_key: String,
}

impl SiteConfig<'_> {
    /// Writes the private key and the config into `dir`.
    pub(crate) fn write(&self, dir: &SiteDir) -> anyhow::Result<()> {
        self.write_with(dir, "")
    }

    /// [`SiteConfig::write`], with `extra` (whole TOML tables, e.g.
    /// `[failover]`) appended to the config.
    pub(crate) fn write_with(&self, dir: &SiteDir, extra: &str) -> anyhow::Result<()> {
        write_private_key(&dir.private_key(), self.private_key)?;
        let config = dir.config();
        let mut text = self.toml(dir);
        if !extra.is_empty() {
            text += "\n";
            text += extra;
        }
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))
    }

    fn toml(&self, dir: &SiteDir) -> String {
        let list = |cidrs: &[IpNet]| {
            cidrs
                .iter()
                .map(|c| format!("{:?}", c.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = format!(
            "[site]\nname = {:?}\nprivate_key_file = {:?}\npod_cidrs = [{}]\n",
            self.site,
            dir.private_key(),
            list(self.pod_cidrs)
        );
        if let Some(port) = self.listen_port {
            s += &format!("listen_port = {port}\n");
        }
        if let Some(mtu) = self.mtu {
            s += &format!("mtu = {mtu}\n");
        }
        if let Some(pool) = self.remap_pool {
            s += &format!("remap_pool = [{pool:?}]\n");
        }
        // Both gateways name their interface causeway0, each in its own
        // namespace, but the default socket directory is host-wide.
        s += &format!(
            "control_socket = {:?}\nuapi_socket = {:?}\nstate_dir = {:?}\n",
            dir.control_socket(),
            dir.0.join("uapi.sock"),
            dir.0
        );
        let peer = &self.peer;
        s += &format!(
            "\n[[peer]]\nname = {:?}\npublic_key = {:?}\ncidrs = [{}]\n",
            peer.name,
            peer.public_key,
            list(peer.cidrs)
        );
        if let Some(endpoint) = peer.endpoint {
            s += &format!("endpoint = \"{endpoint}\"\n");
        }
        if let Some(r) = self.rendezvous {
            s += &format!(
                "\n[[rendezvous]]\naddress = \"{}\"\npublic_key = {:?}\n",
                r.address, r.public_key
            );
        }
        s
    }
}

/// Starts `causeway up` with `dir`'s config in a site's gateway namespace,
/// its stderr going to `dir`'s log. Returns at once (see [`wait_ready`]).
pub(crate) fn spawn_daemon(
    bin: &Path,
    gateway: &Netns,
    dir: &SiteDir,
    log_level: &str,
) -> anyhow::Result<ChildGuard> {
    let log = std::fs::File::create(dir.log())?;
    let mut cmd = gateway.command(path_str(bin)?);
    cmd.args(["up", "--log-level", log_level, "--config"])
        .arg(dir.config())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Ok(gateway.spawn(&mut cmd)?)
}

/// Waits until the daemon behind `socket` answers and returns its status;
/// fails as soon as `daemon` exits, or after a while.
pub(crate) fn wait_ready(
    bin: &Path,
    socket: &Path,
    daemon: &mut ChildGuard,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        interrupt::check()?;
        if let Ok(status) = status(bin, socket) {
            return Ok(status);
        }
        if let Some(exit) = daemon.wait_timeout(Duration::from_millis(10))? {
            bail!("causeway (pid {}) exited with {exit}", daemon.pid());
        }
        ensure!(
            Instant::now() < deadline,
            "causeway's control socket {} did not answer within {START_TIMEOUT:?}",
            socket.display()
        );
    }
}

/// `causeway status --json` of the daemon behind `socket`.
pub(crate) fn status(bin: &Path, socket: &Path) -> anyhow::Result<Value> {
    let out = Command::new(bin)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "causeway status --socket {}: {}",
        socket.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("causeway status --json")
}

/// How a site's packets reach its peer: `path` in `causeway status --json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PeerPath {
    /// The configured endpoint.
    Static,
    /// An address found by NAT traversal (a punched hole).
    Direct,
    /// Through the rendezvous, either relay.
    Relay,
    /// Through the rendezvous' UDP relay port.
    RelayUdp,
    /// Through the rendezvous' QUIC relay (no UDP relay port).
    RelayQuic,
    /// Through the rendezvous, reached over TLS on TCP (no UDP relay
    /// port).
    RelayTcp,
}

impl PeerPath {
    pub(crate) fn name(self) -> &'static str {
        match self {
            PeerPath::Static => "static",
            PeerPath::Direct => "direct",
            PeerPath::Relay | PeerPath::RelayUdp | PeerPath::RelayQuic | PeerPath::RelayTcp => {
                "relay"
            }
        }
    }

    /// Whether it goes through the rendezvous.
    pub(crate) fn is_relay(self) -> bool {
        self.name() == "relay"
    }
}

/// One peer in a `causeway status --json`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PeerStatus {
    /// `static`, `direct`, `relay` or `none`.
    pub(crate) path: String,
    pub(crate) endpoint: Option<String>,
    /// The UDP relay port its packets go to, when relayed through one.
    pub(crate) relay_port: Option<String>,
    /// Where the peer's first CIDR is seen from this site.
    pub(crate) view: Option<Ipv4Net>,
    /// Inner packets sent to and received from it.
    pub(crate) packets: u64,
    /// WireGuard messages sent to and received from it through the relay.
    pub(crate) relayed: u64,
}

impl PeerStatus {
    /// Peer `name` of a status.
    pub(crate) fn of(status: &Value, name: &str) -> anyhow::Result<PeerStatus> {
        let peer = status["peers"]
            .as_array()
            .context("a status without peers")?
            .iter()
            .find(|p| p["name"] == name)
            .with_context(|| format!("peer {name} is not in the status"))?;
        let count = |field: &str| {
            peer[field]
                .as_u64()
                .with_context(|| format!("peer {name} has no {field} in the status"))
        };
        let view = match peer["views"].as_array().and_then(|v| v.first()) {
            Some(v) => Some(
                v["view"]
                    .as_str()
                    .context("a view without a view CIDR")?
                    .parse()
                    .context("a view that is not an IPv4 CIDR")?,
            ),
            None => None,
        };
        Ok(PeerStatus {
            path: peer["path"].as_str().unwrap_or("?").to_owned(),
            endpoint: peer["endpoint"].as_str().map(str::to_owned),
            relay_port: peer["relay_port"].as_str().map(str::to_owned),
            view,
            packets: count("tx_packets")? + count("rx_packets")?,
            relayed: count("relay_tx_packets")? + count("relay_rx_packets")?,
        })
    }

    pub(crate) fn is_on(&self, path: PeerPath) -> bool {
        self.path == path.name()
            && match path {
                PeerPath::RelayUdp => self.relay_port.is_some(),
                PeerPath::RelayQuic | PeerPath::RelayTcp => self.relay_port.is_none(),
                _ => true,
            }
    }
}

/// Polls the daemon behind `socket` until its peer `peer` is on `path`, or
/// `within` has passed; returns the peer as last seen (on another path
/// after a timeout).
pub(crate) fn wait_path(
    bin: &Path,
    socket: &Path,
    peer: &str,
    path: PeerPath,
    within: Duration,
) -> anyhow::Result<PeerStatus> {
    let deadline = Instant::now() + within;
    loop {
        interrupt::check()?;
        let seen = PeerStatus::of(&status(bin, socket)?, peer)?;
        if seen.is_on(path) || Instant::now() >= deadline {
            return Ok(seen);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A `causeway rendezvous` running in a lab's internet namespace.
pub(crate) struct Rendezvous {
    pub(crate) process: ChildGuard,
    pub(crate) pin: RendezvousPin,
    /// Its stderr.
    pub(crate) log: PathBuf,
}

impl Rendezvous {
    /// Starts one at the lab's internet address (QUIC on
    /// [`RENDEZVOUS_PORT`], STUN on [`STUN_PORT`]) serving `sites` (name,
    /// public key), its files in `dir`; returns once both ports are bound,
    /// so that sites started next find it listening.
    pub(crate) fn start(
        bin: &Path,
        lab: &Lab,
        dir: &Path,
        sites: &[(&str, &str)],
        log_level: &str,
    ) -> anyhow::Result<Rendezvous> {
        Self::start_with(bin, lab, dir, sites, log_level, &[], "")
    }

    /// [`Rendezvous::start`] with more arguments for `causeway rendezvous`
    /// (e.g. `--metrics-listen`) and more lines for its configuration file
    /// (e.g. `relay_ports = "off"`).
    pub(crate) fn start_with(
        bin: &Path,
        lab: &Lab,
        dir: &Path,
        sites: &[(&str, &str)],
        log_level: &str,
        extra: &[&str],
        extra_toml: &str,
    ) -> anyhow::Result<Rendezvous> {
        std::fs::create_dir_all(dir)?;
        let keys = KeyPair::generate(bin)?;
        let key = dir.join("rendezvous.key");
        write_private_key(&key, &keys.private)?;
        let ip = lab.internet_addr();
        let config = dir.join("rendezvous.toml");
        std::fs::write(
            &config,
            format!("{extra_toml}{}", rendezvous_toml(&key, ip, sites)),
        )?;
        let log = dir.join("rendezvous.log");
        let ns = lab.internet();
        let mut cmd = ns.command(path_str(bin)?);
        cmd.args(["rendezvous", "--log-level", log_level, "--config"])
            .arg(&config)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut process = ns.spawn(&mut cmd)?;
        let deadline = Instant::now() + START_TIMEOUT;
        // `ip netns exec` enters the namespace, then execs the rendezvous,
        // which binds both ports before it serves.
        let netns = ns.path();
        let ready = |pid| {
            procfs::in_netns(pid, &netns) && {
                let bound = procfs::udp_ports(pid);
                [RENDEZVOUS_PORT, STUN_PORT]
                    .iter()
                    .all(|p| bound.contains(p))
            }
        };
        while !ready(process.pid()) {
            interrupt::check()?;
            if let Some(exit) = process.wait_timeout(Duration::from_millis(5))? {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("causeway rendezvous exited with {exit}: {}", text.trim());
            }
            ensure!(
                Instant::now() < deadline,
                "causeway rendezvous did not bind {ip}:{RENDEZVOUS_PORT} and :{STUN_PORT} within {START_TIMEOUT:?}"
            );
        }
        Ok(Rendezvous {
            process,
            pin: RendezvousPin {
                address: SocketAddr::new(ip.into(), RENDEZVOUS_PORT),
                public_key: keys.public,
            },
            log,
        })
    }
}

fn rendezvous_toml(key: &Path, ip: Ipv4Addr, sites: &[(&str, &str)]) -> String {
    let mut s = format!(
        "private_key_file = {key:?}\nlisten = \"{ip}:{RENDEZVOUS_PORT}\"\nstun_listen = \"{ip}:{STUN_PORT}\"\n"
    );
    for (name, public_key) in sites {
        s += &format!("\n[[site]]\nname = {name:?}\npublic_key = {public_key:?}\n");
    }
    s
}

/// The lab routes IPv6 to every gateway and never translates it, NAT or
/// not; so that sites behind NATs meet through their NATs, over IPv4,
/// removes the global IPv6 addresses of their gateways' underlay link.
pub(crate) fn ipv4_only_behind_nats(lab: &Lab) -> anyhow::Result<()> {
    for site in lab.sites().iter().filter(|s| s.nat_router.is_some()) {
        site.remove_ipv6_underlay()?;
    }
    Ok(())
}

/// `addr` of a network `real` as seen through `view`.
pub(crate) fn through(addr: Ipv4Addr, real: Ipv4Net, view: Ipv4Net) -> anyhow::Result<Ipv4Addr> {
    ensure!(
        real.contains(&addr) && real.prefix_len() == view.prefix_len(),
        "{addr} is not in {real}, or {view} is not the same size"
    );
    let host = u32::from(addr) & !u32::from(real.netmask());
    Ok(Ipv4Addr::from(u32::from(view.network()) | host))
}

/// Writes a private key as `genkey` prints it, readable by its owner only
/// (Causeway warns about anything else).
pub(crate) fn write_private_key(path: &Path, key: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{key}")?;
    Ok(())
}

pub(crate) fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The `causeway` binary a benchmark runs: `given`, else the one next to
/// this program; an error saying how to build it when it is not there.
pub(crate) fn causeway_bin(
    given: Option<std::path::PathBuf>,
) -> anyhow::Result<std::path::PathBuf> {
    let bin = match given {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("causeway"),
    };
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it first (cargo build --release)",
        bin.display()
    );
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0uCdNRkqdW0tnYUlH4wRUCiQpyULUOi4NVs1tE0vImU=";

    fn cidrs(s: &str) -> Vec<IpNet> {
        vec![s.parse().expect("cidr")]
    }

    #[test]
    fn site_configs_are_valid_for_the_daemon() {
        let dir = SiteDir(PathBuf::from("/tmp/causeway-bench-test/a"));
        let (own, other) = (cidrs("10.0.0.0/16"), cidrs("10.1.0.0/16"));
        let pin = RendezvousPin {
            address: "198.18.0.1:7443".parse().expect("addr"),
            public_key: KEY.into(),
        };
        for (endpoint, rendezvous) in [
            (Some("198.18.2.2:51820".parse().expect("addr")), None),
            (None, Some(&pin)),
        ] {
            let config = SiteConfig {
                site: "a",
                private_key: KEY,
                pod_cidrs: &own,
                listen_port: Some(51820),
                mtu: Some(1420),
                remap_pool: Some("100.64.0.0/16"),
                peer: PeerConfig {
                    name: "b",
                    public_key: KEY,
                    cidrs: &other,
                    endpoint,
                },
                rendezvous,
            };
            let text = config.toml(&dir);
            let parsed = causeway::config::parse(&text, "test.toml");
            assert!(parsed.is_ok(), "{text}\n{parsed:?}");
            assert_eq!(text.contains("endpoint ="), endpoint.is_some(), "{text}");
            assert_eq!(text.contains("[[rendezvous]]"), rendezvous.is_some());
        }
    }

    #[test]
    fn extra_tables_go_after_the_config() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = SiteDir::create(tmp.path().join("a")).expect("dir");
        let own = cidrs("10.0.0.0/16");
        let config = SiteConfig {
            site: "a",
            private_key: KEY,
            pod_cidrs: &own,
            listen_port: None,
            mtu: None,
            remap_pool: None,
            peer: PeerConfig {
                name: "b",
                public_key: KEY,
                cidrs: &own,
                endpoint: None,
            },
            rendezvous: None,
        };
        config
            .write_with(&dir, "[failover]\nelection = \"keepalived\"\n")
            .expect("write");
        let text = std::fs::read_to_string(dir.config()).expect("read");
        let parsed = causeway::config::parse(&text, "test.toml").expect("valid");
        assert_eq!(
            parsed.failover,
            causeway::config::Failover::Keepalived,
            "{text}"
        );
    }

    #[test]
    fn rendezvous_config_lists_the_sites() {
        let text = rendezvous_toml(
            Path::new("/k"),
            Ipv4Addr::new(198, 18, 0, 1),
            &[("a", KEY), ("b", KEY)],
        );
        assert!(text.contains("listen = \"198.18.0.1:7443\""), "{text}");
        assert!(text.contains("stun_listen = \"198.18.0.1:3478\""), "{text}");
        assert_eq!(text.matches("[[site]]").count(), 2);
    }

    #[test]
    fn peer_status_reads_path_view_and_counters() {
        let status: Value = serde_json::json!({
            "peers": [{
                "name": "b", "path": "relay", "endpoint": null,
                "views": [{"real": "10.0.0.0/16", "view": "100.64.0.0/16"}],
                "tx_packets": 10, "rx_packets": 5,
                "relay_tx_packets": 11, "relay_rx_packets": 6
            }]
        });
        let p = PeerStatus::of(&status, "b").expect("peer b");
        assert!(p.is_on(PeerPath::Relay) && !p.is_on(PeerPath::Direct));
        assert_eq!(p.view, Some("100.64.0.0/16".parse().expect("cidr")));
        assert_eq!((p.packets, p.relayed, p.endpoint), (15, 17, None));
        assert!(PeerStatus::of(&status, "c").is_err());
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
}
