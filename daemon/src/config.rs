//! The site configuration file (TOML): schema, defaults and validation.
//!
//! [`parse`] is a pure function of the text: it applies defaults and checks
//! every rule it can without touching files or the network, and reports all
//! problems at once. [`load`] reads the file, parses it, then loads (or
//! creates) the private key, resolves endpoint host names and gives every
//! peer CIDR its view (reading and updating `<state_dir>/views.json`, see
//! [`crate::views`]), so that every mistake surfaces before any network
//! setup. The file format is documented in `docs/config.md`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

pub use causeway_common::problems::ConfigErrors;
use causeway_common::problems::Problems;

use crate::keys::{self, PublicKey, StaticSecret};
use crate::packet::View;
pub use crate::packet::{AllowRule, Proto};
use crate::views::{self, PeerCidrs, Persisted, overlaps};

/// Where the site's private key lives unless `site.private_key_file` says otherwise.
pub const DEFAULT_PRIVATE_KEY_FILE: &str = "/var/lib/causeway/private.key";
/// The TUN interface name unless `site.interface` says otherwise.
pub const DEFAULT_INTERFACE: &str = "causeway0";
/// The WireGuard UDP port unless `site.listen_port` says otherwise.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// The tunnel MTU unless `site.mtu` says otherwise.
pub const DEFAULT_MTU: u16 = 1420;
/// The directory of the default control socket, `<dir>/<interface>.sock`.
pub const DEFAULT_CONTROL_SOCKET_DIR: &str = "/run/causeway";
/// The smallest and largest tunnel MTU accepted.
pub const MTU_RANGE: RangeInclusive<u16> = 576..=9000;
/// The smallest tunnel MTU accepted when any CIDR is IPv6 (RFC 8200).
pub const MIN_MTU_IPV6: u16 = 1280;
/// Longest site or peer name.
pub use causeway_common::problems::MAX_NAME_LEN;
/// Where view CIDRs come from unless `site.remap_pool` says otherwise: the
/// RFC 6598 shared address space for IPv4 and a fixed ULA /48 for IPv6
/// ("cause" in ASCII after `fd`).
pub const DEFAULT_REMAP_POOL: [&str; 2] = ["100.64.0.0/10", "fd63:6175:7365::/48"];
/// Where the daemon keeps its state (the view allocations) unless
/// `site.state_dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/causeway";

/// The default control socket for an interface: `/run/causeway/<interface>.sock`.
pub fn default_control_socket(interface: &str) -> PathBuf {
    Path::new(DEFAULT_CONTROL_SOCKET_DIR).join(format!("{interface}.sock"))
}

/// The default WireGuard UAPI socket for an interface (where `wg` looks):
/// `/var/run/wireguard/<interface>.sock`.
pub fn default_uapi_socket(interface: &str) -> PathBuf {
    Path::new("/var/run/wireguard").join(format!("{interface}.sock"))
}

/// A validated site configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This site.
    pub site: SiteConfig,
    /// The sites this one connects to, in file order.
    pub peers: Vec<PeerConfig>,
    /// Rendezvous servers: peers without a static endpoint are found (and
    /// relayed) through them. The site registers with all of them.
    pub rendezvous: Vec<RendezvousConfig>,
}

/// A `[[rendezvous]]` table: a rendezvous server this site dials out to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// Its QUIC address (`host:port`).
    pub address: Endpoint,
    /// Its public key, pinned: a server that cannot prove it is refused.
    pub public_key: PublicKey,
    /// Its STUN address; default: the same host, port 3478.
    pub stun: Endpoint,
}

/// The rendezvous' default STUN port.
pub use causeway_nat::rendezvous::DEFAULT_STUN_PORT;

/// The `[site]` table: this site's identity, interface and exported networks.
#[derive(Clone)]
pub struct SiteConfig {
    /// Site name, `[a-z0-9-]{1,32}`.
    pub name: String,
    /// Absolute path of the private key file.
    pub private_key_file: PathBuf,
    /// The private key: `None` after [`parse`], `Some` after [`load`].
    pub private_key: Option<StaticSecret>,
    /// TUN interface name.
    pub interface: String,
    /// WireGuard UDP port; 0 picks a free one.
    pub listen_port: u16,
    /// The networks this site exports to its peers (non-empty).
    pub pod_cidrs: Vec<IpNet>,
    /// Where view CIDRs for remapped peer CIDRs come from; no entry
    /// overlaps another, `pod_cidrs` or `reserved_cidrs`.
    pub remap_pool: Vec<IpNet>,
    /// Local networks that views must never use (service CIDR, node
    /// network, …).
    pub reserved_cidrs: Vec<IpNet>,
    /// Absolute path of the directory holding the daemon's state
    /// (`views.json`).
    pub state_dir: PathBuf,
    /// Tunnel MTU.
    pub mtu: u16,
    /// Path of the control socket used by `causeway status`.
    pub control_socket: PathBuf,
    /// Path of the WireGuard UAPI socket that `wg show` reads.
    pub uapi_socket: PathBuf,
    /// Endpoints of this site's WireGuard port that the operator made
    /// reachable (port forwards, a public address): offered to peers as
    /// candidates through the rendezvous.
    pub advertise_endpoints: Vec<SocketAddr>,
    /// Extra STUN servers asked for this site's server-reflexive address
    /// (each rendezvous answers STUN too).
    pub stun_servers: Vec<Endpoint>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: off.
    pub metrics_listen: Option<SocketAddr>,
}

impl SiteConfig {
    /// The public half of the private key, once [`load`] has read it.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.private_key.as_ref().map(PublicKey::from)
    }
}

impl fmt::Debug for SiteConfig {
    // By hand so that the private key is never printed: only its public half.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let private_key = self
            .public_key()
            .map(|k| format!("<private key of public key {}>", keys::encode_public(&k)));
        f.debug_struct("SiteConfig")
            .field("name", &self.name)
            .field("private_key_file", &self.private_key_file)
            .field("private_key", &private_key)
            .field("interface", &self.interface)
            .field("listen_port", &self.listen_port)
            .field("pod_cidrs", &self.pod_cidrs)
            .field("remap_pool", &self.remap_pool)
            .field("reserved_cidrs", &self.reserved_cidrs)
            .field("state_dir", &self.state_dir)
            .field("mtu", &self.mtu)
            .field("control_socket", &self.control_socket)
            .field("uapi_socket", &self.uapi_socket)
            .finish()
    }
}

/// A `[[peer]]` table: another site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Peer name, unique, `[a-z0-9-]{1,32}`.
    pub name: String,
    /// The peer's WireGuard public key, unique.
    pub public_key: PublicKey,
    /// The peer's own networks, as the peer numbers them: its real CIDRs
    /// (non-empty, not overlapping each other; they may overlap this
    /// site's networks and other peers').
    pub cidrs: Vec<IpNet>,
    /// How this site sees each of [`cidrs`](Self::cidrs), index-aligned
    /// with it. [`parse`] sets identity views (`view == real`); [`load`]
    /// gives the real ones, remapping where needed.
    pub views: Vec<View>,
    /// What the peer may reach here, from `[[peer.allow]]`: a packet is let
    /// in if it matches any rule. Empty means the default: all of the
    /// site's `pod_cidrs`, any protocol.
    pub allow: Vec<AllowRule>,
    /// Where to reach the peer directly, if it has a static address.
    pub endpoint: Option<Endpoint>,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
}

/// A peer endpoint as written (`host:port`, `1.2.3.4:port` or `[v6]:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The text from the config file.
    pub spec: String,
    /// The address: set by [`parse`] for an IP literal, by [`load`] for a host name.
    pub addr: Option<SocketAddr>,
}

impl Endpoint {
    /// The host part of [`spec`](Self::spec), without brackets.
    pub fn host(&self) -> &str {
        let host = self.spec.rsplit_once(':').map_or(&*self.spec, |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// Resolves the endpoint now (an IP literal as is, a host name through
    /// the system resolver), preferring an IPv4 address when a name has both.
    pub fn resolve(&self) -> io::Result<SocketAddr> {
        if let Some(addr) = self.addr {
            return Ok(addr);
        }
        let addrs: Vec<SocketAddr> = self.spec.to_socket_addrs()?.collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no addresses found"))
    }
}

/// Parses and validates a configuration without touching files or the
/// network; `origin` names the file in messages. Host-name endpoints are
/// left unresolved and the private key unread: see [`load`].
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigErrors::toml(origin, text, &e))?;
    let mut p = Problems::new(origin);

    let site = raw.site.unwrap_or_default();
    let name = p.name("site.name", site.name).unwrap_or_default();
    let interface = site.interface.unwrap_or_else(|| DEFAULT_INTERFACE.into());
    if let Err(why) = check_interface(&interface) {
        p.add(
            "site.interface",
            format!("{interface:?} is not a valid interface name: {why}"),
        );
    }
    let private_key_file = absolute_path(
        &mut p,
        "site.private_key_file",
        site.private_key_file,
        DEFAULT_PRIVATE_KEY_FILE.into(),
    );
    let control_socket = absolute_path(
        &mut p,
        "site.control_socket",
        site.control_socket,
        default_control_socket(&interface),
    );
    let uapi_socket = absolute_path(
        &mut p,
        "site.uapi_socket",
        site.uapi_socket,
        default_uapi_socket(&interface),
    );
    let listen_port = number(
        &mut p,
        "site.listen_port",
        site.listen_port,
        0..=u16::MAX,
        "(0 picks a free port)",
    )
    .unwrap_or(DEFAULT_LISTEN_PORT);
    let mtu = number(&mut p, "site.mtu", site.mtu, MTU_RANGE, "");
    let advertise_endpoints: Vec<SocketAddr> = site
        .advertise_endpoints
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, spec)| match spec.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Some(addr),
            _ => {
                p.add(
                    format!("site.advertise_endpoints[{i}]"),
                    format!("{spec:?} is not an address:port such as \"203.0.113.7:51820\" or \"[2001:db8::7]:51820\""),
                );
                None
            }
        })
        .collect();
    let stun_servers: Vec<Endpoint> = site
        .stun_servers
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, spec)| {
            parse_endpoint(&spec)
                .map_err(|why| p.add(format!("site.stun_servers[{i}]"), format!("{spec:?} {why}")))
                .ok()
        })
        .collect();
    let metrics_listen = site
        .metrics_listen
        .and_then(|spec| match spec.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                p.add(
                    "site.metrics_listen",
                    format!("{spec:?} is not an address:port such as \"127.0.0.1:9469\""),
                );
                None
            }
        });
    let mut rendezvous = Vec::new();
    for (i, r) in raw.rendezvous.into_iter().enumerate() {
        let label = format!("rendezvous[{i}]");
        let address = match r.address {
            None => {
                p.add(
                    format!("{label}: address"),
                    "missing; write the server's QUIC \"host:port\"",
                );
                None
            }
            Some(spec) => parse_endpoint(&spec)
                .map_err(|why| p.add(format!("{label}: address"), format!("{spec:?} {why}")))
                .ok(),
        };
        let public_key = match r.public_key.as_deref().map(keys::decode_public) {
            None => {
                p.add(
                    format!("{label}: public_key"),
                    "missing; pin the rendezvous' public key",
                );
                None
            }
            Some(Err(e)) => {
                p.add(format!("{label}: public_key"), e);
                None
            }
            Some(Ok(key)) => Some(key),
        };
        let stun = match (r.stun, &address) {
            (Some(spec), _) => parse_endpoint(&spec)
                .map_err(|why| p.add(format!("{label}: stun"), format!("{spec:?} {why}")))
                .ok(),
            (None, Some(address)) => parse_endpoint(&default_stun(address)).ok(),
            (None, None) => None,
        };
        if let (Some(address), Some(public_key), Some(stun)) = (address, public_key, stun) {
            rendezvous.push(RendezvousConfig {
                address,
                public_key,
                stun,
            });
        }
    }
    let pod_cidrs_given = site.pod_cidrs.as_ref().map_or(0, Vec::len);
    let pod_cidrs = cidrs(&mut p, "site.pod_cidrs", site.pod_cidrs);
    check_own_overlaps(&mut p, "site.", "pod_cidrs", &pod_cidrs);
    let reserved_cidrs = cidr_list(
        &mut p,
        "site.reserved_cidrs",
        site.reserved_cidrs.unwrap_or_default(),
    );
    check_own_overlaps(&mut p, "site.", "reserved_cidrs", &reserved_cidrs);
    let default_pool = site.remap_pool.is_none();
    let remap_pool = cidr_list(
        &mut p,
        "site.remap_pool",
        site.remap_pool
            .unwrap_or_else(|| DEFAULT_REMAP_POOL.map(String::from).to_vec()),
    );
    check_own_overlaps(&mut p, "site.", "remap_pool", &remap_pool);
    for &(i, pool) in &remap_pool {
        let local = pod_cidrs
            .iter()
            .map(|&(k, net)| (format!("site.pod_cidrs[{k}]"), net))
            .chain(
                reserved_cidrs
                    .iter()
                    .map(|&(k, net)| (format!("site.reserved_cidrs[{k}]"), net)),
            );
        for (name, net) in local {
            if overlaps(&pool, &net) {
                let default = if default_pool { " (the default)" } else { "" };
                p.add(
                    format!("site.remap_pool[{i}]"),
                    format!(
                        "{pool}{default} overlaps {name} {net}; views taken from remap_pool must not collide with this site's own networks: set remap_pool to ranges this site does not use"
                    ),
                );
            }
        }
    }
    let state_dir = absolute_path(
        &mut p,
        "site.state_dir",
        site.state_dir,
        DEFAULT_STATE_DIR.into(),
    );
    // Allow rules are checked against the exported networks only when those
    // are all valid, so that one mistake is not reported once per rule.
    let exported: Option<Vec<IpNet>> = (pod_cidrs_given > 0 && pod_cidrs.len() == pod_cidrs_given)
        .then(|| pod_cidrs.iter().map(|&(_, net)| net).collect());
    let mut any_ipv6 = pod_cidrs.iter().any(|(_, net)| matches!(net, IpNet::V6(_)));
    let mut names = HashMap::new();
    let mut public_keys = HashMap::new();
    let mut peers = Vec::new();
    for (i, peer) in raw.peer.into_iter().enumerate() {
        let label = match &peer.name {
            Some(name) => format!("peer[{i}] {name:?}"),
            None => format!("peer[{i}]"),
        };
        let name = p
            .name(format!("{label}: name"), peer.name)
            .unwrap_or_default();
        if !name.is_empty() {
            match names.entry(name.clone()) {
                Entry::Occupied(first) => p.add(
                    format!("{label}: name"),
                    format!(
                        "{name:?} is already used by peer[{}]; peer names must be unique",
                        first.get()
                    ),
                ),
                Entry::Vacant(slot) => {
                    slot.insert(i);
                }
            }
        }
        let public_key = match peer.public_key.as_deref().map(keys::decode_public) {
            None => {
                p.add(
                    format!("{label}: public_key"),
                    "missing; add the peer's `wg pubkey` output",
                );
                None
            }
            Some(Err(e)) => {
                p.add(format!("{label}: public_key"), e);
                None
            }
            Some(Ok(key)) => Some(key),
        };
        if let Some(key) = public_key {
            match public_keys.entry(key.to_bytes()) {
                Entry::Occupied(first) => p.add(
                    format!("{label}: public_key"),
                    format!("same key as {}; each peer has its own key", first.get()),
                ),
                Entry::Vacant(slot) => {
                    slot.insert(label.clone());
                }
            }
        }
        let endpoint = peer.endpoint.and_then(|spec| {
            parse_endpoint(&spec)
                .map_err(|why| p.add(format!("{label}: endpoint"), format!("{spec:?} {why}")))
                .ok()
        });
        let persistent_keepalive = number(
            &mut p,
            &format!("{label}: persistent_keepalive"),
            peer.persistent_keepalive,
            1..=u16::MAX,
            "seconds (leave it out to send no keepalives)",
        );
        let cidrs = cidrs(&mut p, &format!("{label}: cidrs"), peer.cidrs);
        check_own_overlaps(&mut p, &format!("{label}: "), "cidrs", &cidrs);
        any_ipv6 |= cidrs.iter().any(|(_, net)| matches!(net, IpNet::V6(_)));
        let allow = peer
            .allow
            .into_iter()
            .enumerate()
            .filter_map(|(k, rule)| {
                allow_rule(
                    &mut p,
                    &format!("{label}: allow[{k}]"),
                    rule,
                    exported.as_deref(),
                )
            })
            .collect();
        let cidrs: Vec<IpNet> = cidrs.into_iter().map(|(_, net)| net).collect();
        peers.push(PeerConfig {
            name,
            public_key: public_key.unwrap_or(PublicKey::from([0; 32])),
            views: cidrs.iter().copied().map(View::identity).collect(),
            cidrs,
            allow,
            endpoint,
            persistent_keepalive,
        });
    }

    let mtu = mtu.unwrap_or(DEFAULT_MTU);
    if mtu < MIN_MTU_IPV6 && any_ipv6 {
        p.add(
            "site.mtu",
            format!(
                "{mtu} is too small for the IPv6 CIDRs configured; use {MIN_MTU_IPV6} to {}",
                MTU_RANGE.end()
            ),
        );
    }

    p.finish()?;
    Ok(Config {
        site: SiteConfig {
            name,
            private_key_file,
            private_key: None,
            interface,
            listen_port,
            pod_cidrs: pod_cidrs.into_iter().map(|(_, net)| net).collect(),
            remap_pool: remap_pool.into_iter().map(|(_, net)| net).collect(),
            reserved_cidrs: reserved_cidrs.into_iter().map(|(_, net)| net).collect(),
            state_dir,
            mtu,
            control_socket,
            uapi_socket,
            advertise_endpoints,
            stun_servers,
            metrics_listen,
        },
        peers,
        rendezvous,
    })
}

/// Reads and parses the file at `path`, then loads the private key (creating
/// the key file if it is missing), resolves endpoint host names and gives
/// every peer CIDR its view: the views recorded in
/// `<state_dir>/views.json` are kept while still valid, new ones are
/// allocated from `remap_pool`, and the file is rewritten (atomically) when
/// anything changed and the whole configuration is valid.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::one(&origin, format!("cannot read the config file: {e}")))?;
    let mut config = parse(&text, &origin)?;
    let mut p = Problems::new(&origin);

    match keys::load_or_create_private_key(&config.site.private_key_file) {
        Ok(key) => {
            let own = PublicKey::from(&key);
            for (i, peer) in config.peers.iter().enumerate() {
                if peer.public_key == own {
                    p.add(
                        format!("peer[{i}] {:?}: public_key", peer.name),
                        format!(
                            "is this site's own public key (from {}); use the peer's key, or remove this peer",
                            config.site.private_key_file.display()
                        ),
                    );
                }
            }
            config.site.private_key = Some(key);
        }
        Err(e) => p.add("site.private_key_file", e),
    }

    // Host names are resolved once, here; IP literals were parsed already.
    let mut to_resolve: Vec<(String, &mut Endpoint)> = Vec::new();
    for (i, peer) in config.peers.iter_mut().enumerate() {
        if let Some(endpoint) = peer.endpoint.as_mut() {
            to_resolve.push((format!("peer[{i}] {:?}: endpoint", peer.name), endpoint));
        }
    }
    for (i, r) in config.rendezvous.iter_mut().enumerate() {
        to_resolve.push((format!("rendezvous[{i}]: address"), &mut r.address));
        to_resolve.push((format!("rendezvous[{i}]: stun"), &mut r.stun));
    }
    for (i, e) in config.site.stun_servers.iter_mut().enumerate() {
        to_resolve.push((format!("site.stun_servers[{i}]"), e));
    }
    for (field, endpoint) in to_resolve {
        if endpoint.addr.is_none() {
            match endpoint.resolve() {
                Ok(addr) => endpoint.addr = Some(addr),
                Err(e) => p.add(field, format!("cannot resolve host {:?}: {e}; check the name and DNS, or write an IP address", endpoint.host())),
            }
        }
    }

    let state_file = config.site.state_dir.join(views::STATE_FILE);
    let mut changed = None;
    match Persisted::load(&state_file) {
        Err(e) => p.add("site.state_dir", e),
        Ok(persisted) => match assign_views(&config, &persisted) {
            Ok((views, next)) => {
                for (peer, views) in config.peers.iter_mut().zip(views) {
                    log_view_changes(peer, &views, &persisted);
                    peer.views = views;
                }
                if next != persisted {
                    changed = Some(next);
                }
            }
            Err(errors) => {
                for e in errors {
                    let name = config.peers.get(e.peer).map_or("", |peer| &peer.name);
                    p.add(format!("peer[{}] {name:?}: cidrs[{}]", e.peer, e.cidr), e);
                }
            }
        },
    }

    p.finish()?;
    // Only a configuration that is valid as a whole changes the state.
    if let Some(next) = changed {
        next.save(&state_file)
            .map_err(|e| ConfigErrors::one(&origin, format!("site.state_dir: {e}")))?;
    }
    Ok(config)
}

/// Logs the views that were not recorded yet, and louder, those that differ
/// from the recorded ones (a recorded view that became invalid).
fn log_view_changes(peer: &PeerConfig, views: &[View], persisted: &Persisted) {
    let public_key = keys::encode_public(&peer.public_key);
    for view in views {
        let recorded = persisted
            .views
            .iter()
            .find(|e| e.public_key == public_key && e.real == *view.real());
        match recorded {
            Some(e) if e.view != *view.view() => tracing::warn!(
                peer = peer.name,
                real = %view.real(),
                old_view = %e.view,
                view = %view.view(),
                "the recorded view CIDR is no longer usable (it collides with a local, reserved or other view CIDR, or left remap_pool); the peer is now seen elsewhere"
            ),
            None if view.is_remapped() => tracing::info!(
                peer = peer.name,
                real = %view.real(),
                view = %view.view(),
                "allocated a view CIDR"
            ),
            _ => {}
        }
    }
}

/// The views of every peer CIDR given the recorded ones (see [`views::assign`]).
pub(crate) fn assign_views(
    config: &Config,
    persisted: &Persisted,
) -> Result<(Vec<Vec<View>>, Persisted), Vec<views::AssignError>> {
    let public_keys: Vec<String> = config
        .peers
        .iter()
        .map(|peer| keys::encode_public(&peer.public_key))
        .collect();
    let peers: Vec<PeerCidrs<'_>> = config
        .peers
        .iter()
        .zip(&public_keys)
        .map(|(peer, public_key)| PeerCidrs {
            name: &peer.name,
            public_key,
            cidrs: &peer.cidrs,
        })
        .collect();
    let site = &config.site;
    views::assign(
        &site.pod_cidrs,
        &site.reserved_cidrs,
        &site.remap_pool,
        &peers,
        persisted,
    )
}

// The file as written. Everything is optional and loosely typed so that
// validation, not the deserializer, reports missing and malformed values,
// all of them at once.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site: Option<RawSite>,
    #[serde(default)]
    peer: Vec<RawPeer>,
    #[serde(default)]
    rendezvous: Vec<RawRendezvous>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRendezvous {
    address: Option<String>,
    public_key: Option<String>,
    stun: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: Option<String>,
    private_key_file: Option<PathBuf>,
    interface: Option<String>,
    listen_port: Option<i64>,
    pod_cidrs: Option<Vec<String>>,
    remap_pool: Option<Vec<String>>,
    reserved_cidrs: Option<Vec<String>>,
    state_dir: Option<PathBuf>,
    mtu: Option<i64>,
    control_socket: Option<PathBuf>,
    uapi_socket: Option<PathBuf>,
    advertise_endpoints: Option<Vec<String>>,
    stun_servers: Option<Vec<String>>,
    metrics_listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<String>,
    public_key: Option<String>,
    cidrs: Option<Vec<String>>,
    endpoint: Option<String>,
    persistent_keepalive: Option<i64>,
    #[serde(default)]
    allow: Vec<RawAllow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    cidr: Option<String>,
    proto: Option<String>,
    // A string ("443", "8000-8080") or, for a single port, an integer.
    ports: Option<toml::Value>,
}

/// The kernel's rules for a network interface name (`dev_valid_name`).
fn check_interface(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 15 {
        Err("use 1 to 15 characters")
    } else if name == "." || name == ".." {
        Err("\".\" and \"..\" are reserved")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        Err("'/', ':' and whitespace are not allowed")
    } else {
        Ok(())
    }
}

fn absolute_path(
    p: &mut Problems<'_>,
    field: &str,
    value: Option<PathBuf>,
    default: PathBuf,
) -> PathBuf {
    let path = value.unwrap_or(default);
    if !path.is_absolute() {
        p.add(
            field,
            format!(
                "{:?} is not an absolute path; write the full path",
                path.display().to_string()
            ),
        );
    }
    path
}

/// An optional integer in `range`; `None` if absent or out of range.
fn number(
    p: &mut Problems<'_>,
    field: &str,
    value: Option<i64>,
    range: RangeInclusive<u16>,
    unit: &str,
) -> Option<u16> {
    let value = value?;
    match u16::try_from(value) {
        Ok(n) if range.contains(&n) => Some(n),
        _ => {
            let unit = if unit.is_empty() {
                String::new()
            } else {
                format!(" {unit}")
            };
            p.add(
                field,
                format!(
                    "{value} is out of range; use {} to {}{unit}",
                    range.start(),
                    range.end()
                ),
            );
            None
        }
    }
}

/// A required, non-empty list of CIDRs in canonical form, each valid one
/// with its index in the list.
fn cidrs(p: &mut Problems<'_>, field: &str, value: Option<Vec<String>>) -> Vec<(usize, IpNet)> {
    let list = match value {
        None => {
            p.add(
                field,
                "missing; list at least one network, e.g. [\"10.0.0.0/16\"]",
            );
            return Vec::new();
        }
        Some(list) if list.is_empty() => {
            p.add(
                field,
                "is empty; list at least one network, e.g. [\"10.0.0.0/16\"]",
            );
            return Vec::new();
        }
        Some(list) => list,
    };
    cidr_list(p, field, list)
}

/// A list of CIDRs that may be empty: each valid one with its index.
fn cidr_list(p: &mut Problems<'_>, field: &str, list: Vec<String>) -> Vec<(usize, IpNet)> {
    list.iter()
        .enumerate()
        .filter_map(|(i, text)| {
            parse_cidr(text)
                .map_err(|why| p.add(format!("{field}[{i}]"), why))
                .ok()
                .map(|net| (i, net))
        })
        .collect()
}

/// One CIDR in canonical form; on error, what is wrong.
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    match text.parse::<IpNet>() {
        Err(_) => Err(format!(
            "{text:?} is not a valid CIDR; write address/prefix-length, e.g. \"10.1.0.0/16\""
        )),
        Ok(net) if net != net.trunc() => Err(format!(
            "{text:?} has host bits set; did you mean \"{}\"?",
            net.trunc()
        )),
        Ok(net) => Ok(net),
    }
}

/// Reports every entry of one list that overlaps an earlier entry, as
/// `{prefix}{name}[j]: … overlaps {name}[i] …`.
fn check_own_overlaps(p: &mut Problems<'_>, prefix: &str, name: &str, list: &[(usize, IpNet)]) {
    for (j, &(b_index, b)) in list.iter().enumerate() {
        for &(a_index, a) in &list[..j] {
            if overlaps(&a, &b) {
                p.add(
                    format!("{prefix}{name}[{b_index}]"),
                    format!("{b} overlaps {name}[{a_index}] {a}; list each network once"),
                );
            }
        }
    }
}

/// Checks one `[[peer.allow]]` rule; `exported` is the site's `pod_cidrs`
/// when they are all valid.
fn allow_rule(
    p: &mut Problems<'_>,
    label: &str,
    rule: RawAllow,
    exported: Option<&[IpNet]>,
) -> Option<AllowRule> {
    let before = p.count();
    let cidr = match rule.cidr.as_deref().map(parse_cidr) {
        None => {
            p.add(
                format!("{label}.cidr"),
                "missing; write the local network this peer may reach, e.g. \"10.0.5.0/24\"",
            );
            None
        }
        Some(Err(why)) => {
            p.add(format!("{label}.cidr"), why);
            None
        }
        Some(Ok(net)) => {
            if exported.is_some_and(|pods| !pods.iter().any(|pod| pod.contains(&net))) {
                p.add(
                    format!("{label}.cidr"),
                    format!(
                        "{net} is not inside any of site.pod_cidrs; a peer can only reach networks this site exports: export it in pod_cidrs first"
                    ),
                );
            }
            Some(net)
        }
    };
    let proto = match rule.proto.as_deref() {
        None | Some("any") => Some(Proto::Any),
        Some("tcp") => Some(Proto::Tcp),
        Some("udp") => Some(Proto::Udp),
        Some("icmp") => Some(Proto::Icmp),
        Some(other) => {
            p.add(
                format!("{label}.proto"),
                format!("{other:?} is not a protocol; use \"tcp\", \"udp\", \"icmp\" or \"any\""),
            );
            None
        }
    };
    let ports = rule.ports.and_then(|value| {
        let ports = parse_ports(&value)
            .map_err(|why| p.add(format!("{label}.ports"), why))
            .ok()?;
        if let Some(Proto::Icmp | Proto::Any) = proto {
            let proto = match rule.proto.as_deref() {
                Some(proto) => format!("not to proto = {proto:?}"),
                None => "and proto defaults to \"any\"".into(),
            };
            p.add(
                format!("{label}.ports"),
                format!(
                    "ports apply only to TCP and UDP, {proto}; set proto = \"tcp\" or \"udp\", or leave ports out"
                ),
            );
        }
        Some(ports)
    });
    if p.count() > before {
        return None;
    }
    Some(AllowRule {
        cidr: cidr?,
        proto: proto?,
        ports,
    })
}

/// `"443"`, `443` or `"8000-8080"`, ports 1 to 65535; on error, what is wrong.
fn parse_ports(value: &toml::Value) -> Result<RangeInclusive<u16>, String> {
    const FORMS: &str =
        "write a port (\"443\") or a range (\"8000-8080\") of ports from 1 to 65535";
    let port = |text: &str| match text.trim().parse::<u16>() {
        Ok(port @ 1..) => Ok(port),
        _ => Err(format!("{text:?} is not a port; {FORMS}")),
    };
    match value {
        toml::Value::Integer(n) => port(&n.to_string()).map(|n| n..=n),
        toml::Value::String(text) => match text.split_once('-') {
            None => port(text).map(|n| n..=n),
            Some((low, high)) => {
                let (low, high) = (port(low)?, port(high)?);
                if low > high {
                    return Err(format!(
                        "{text:?} is an empty range; write the lower port first: \"{high}-{low}\""
                    ));
                }
                Ok(low..=high)
            }
        },
        other => Err(format!("{other} is not a port or range; {FORMS}")),
    }
}

/// A host as it goes before `:port`: IPv6 addresses in brackets.
/// The STUN address of a rendezvous whose config names none: its host, on
/// [`DEFAULT_STUN_PORT`].
pub(crate) fn default_stun(rendezvous: &Endpoint) -> String {
    format!("{}:{DEFAULT_STUN_PORT}", bracket(rendezvous.host()))
}

fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Checks an endpoint; on error, says what is wrong after the quoted spec.
pub(crate) fn parse_endpoint(spec: &str) -> Result<Endpoint, String> {
    const FORMS: &str = "write \"host:port\", \"192.0.2.1:port\" or \"[2001:db8::1]:port\"";
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err("has port 0; use a port from 1 to 65535".into());
        }
        return Ok(Endpoint {
            spec: spec.into(),
            addr: Some(addr),
        });
    }
    let Some((host, port)) = spec.rsplit_once(':').filter(|_| !spec.ends_with(']')) else {
        return Err(format!("has no port; {FORMS}"));
    };
    if !matches!(port.parse::<u16>(), Ok(1..)) {
        return Err(format!(
            "has an invalid port {port:?}; use a port from 1 to 65535"
        ));
    }
    if host.starts_with('[') {
        return Err(format!("has an invalid IPv6 address {host}"));
    }
    if host.contains(':') {
        return Err(format!(
            "is ambiguous; put an IPv6 address in brackets: \"[{host}]:{port}\""
        ));
    }
    let labels_ok = (1..=253).contains(&host.len())
        && host.trim_end_matches('.').split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    let numeric = host
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if !labels_ok || numeric {
        return Err(format!("has an invalid host {host:?}; {FORMS}"));
    }
    Ok(Endpoint {
        spec: spec.into(),
        addr: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::os::unix::fs::PermissionsExt;

    // `wg pubkey` of the keys in causeway_common::keys's known vectors.
    const KEY_A: &str = "ZkgvCW+DIoRG24ZST7MmKM5j/X9m/LO8XA0qLN0Fxm0=";
    const KEY_B: &str = "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk=";

    const FULL: &str = r#"
[site]
name = "pharma"
private_key_file = "/etc/causeway/key"
interface = "cw1"
listen_port = 0
pod_cidrs = ["10.0.0.0/16", "fd00:10::/64"]
mtu = 1380
control_socket = "/run/cw.sock"
remap_pool = ["100.96.0.0/12"]
reserved_cidrs = ["10.96.0.0/12", "192.168.0.0/24"]
state_dir = "/srv/causeway"

[[peer]]
name = "hospital"
public_key = "KEY_A"
cidrs = ["10.1.0.0/16"]
endpoint = "192.0.2.2:51820"
persistent_keepalive = 25

[[peer]]
name = "lab-2"
public_key = "KEY_B"
cidrs = ["10.2.0.0/24", "10.2.1.0/24"]
endpoint = "[2001:db8::2]:4000"

[[peer]]
name = "edge"
public_key = "KEY_C"
cidrs = ["192.168.7.0/24"]
endpoint = "gw.example.com:51821"
"#;

    fn keyed(text: &str) -> String {
        let key_c = keys::encode_public(&PublicKey::from(&StaticSecret::from([7; 32])));
        text.replace("KEY_A", KEY_A)
            .replace("KEY_B", KEY_B)
            .replace("KEY_C", &key_c)
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn full_config() {
        let config = parse(&keyed(FULL), "causeway.toml").unwrap();
        let site = &config.site;
        assert_eq!(site.name, "pharma");
        assert_eq!(site.private_key_file, Path::new("/etc/causeway/key"));
        assert!(site.private_key.is_none());
        assert_eq!(site.interface, "cw1");
        assert_eq!(site.listen_port, 0);
        assert_eq!(site.pod_cidrs, [net("10.0.0.0/16"), net("fd00:10::/64")]);
        assert_eq!(site.mtu, 1380);
        assert_eq!(site.control_socket, Path::new("/run/cw.sock"));
        assert_eq!(site.remap_pool, [net("100.96.0.0/12")]);
        assert_eq!(
            site.reserved_cidrs,
            [net("10.96.0.0/12"), net("192.168.0.0/24")]
        );
        assert_eq!(site.state_dir, Path::new("/srv/causeway"));

        let [hospital, lab, edge] = &config.peers[..] else {
            panic!("{:?}", config.peers)
        };
        assert_eq!(hospital.name, "hospital");
        assert_eq!(hospital.public_key, keys::decode_public(KEY_A).unwrap());
        assert_eq!(hospital.cidrs, [net("10.1.0.0/16")]);
        assert_eq!(
            hospital.endpoint,
            Some(Endpoint {
                spec: "192.0.2.2:51820".into(),
                addr: Some("192.0.2.2:51820".parse().unwrap()),
            })
        );
        assert_eq!(hospital.persistent_keepalive, Some(25));
        assert_eq!(lab.cidrs.len(), 2);
        let lab_endpoint = lab.endpoint.as_ref().unwrap();
        assert_eq!(
            lab_endpoint.addr,
            Some("[2001:db8::2]:4000".parse().unwrap())
        );
        assert_eq!(lab_endpoint.host(), "2001:db8::2");
        assert_eq!(lab.persistent_keepalive, None);
        let edge_endpoint = edge.endpoint.as_ref().unwrap();
        assert_eq!(edge_endpoint.spec, "gw.example.com:51821");
        assert_eq!(edge_endpoint.addr, None);
        assert_eq!(edge_endpoint.host(), "gw.example.com");
    }

    #[test]
    fn defaults_applied() {
        let text = "[site]\nname = \"a\"\npod_cidrs = [\"10.0.0.0/16\"]\n";
        let config = parse(text, "causeway.toml").unwrap();
        let site = &config.site;
        assert_eq!(site.private_key_file, Path::new(DEFAULT_PRIVATE_KEY_FILE));
        assert_eq!(site.interface, DEFAULT_INTERFACE);
        assert_eq!(site.listen_port, DEFAULT_LISTEN_PORT);
        assert_eq!(site.mtu, DEFAULT_MTU);
        assert_eq!(
            site.remap_pool,
            [net("100.64.0.0/10"), net("fd63:6175:7365::/48")]
        );
        assert!(site.reserved_cidrs.is_empty());
        assert_eq!(site.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(
            site.uapi_socket,
            Path::new("/var/run/wireguard/causeway0.sock")
        );
        assert_eq!(
            site.control_socket,
            Path::new("/run/causeway/causeway0.sock")
        );
        assert!(config.peers.is_empty());

        let text = "[site]\nname = \"a\"\ninterface = \"cw7\"\npod_cidrs = [\"10.0.0.0/16\"]\n";
        let config = parse(text, "causeway.toml").unwrap();
        assert_eq!(
            config.site.control_socket,
            Path::new("/run/causeway/cw7.sock")
        );
    }

    /// A valid site with one valid peer, plus `site_extra` in [site] and
    /// `peer_extra` in the peer; keys that appear in an extra replace the
    /// default line.
    fn config_with(site_extra: &str, peer_extra: &str) -> String {
        let key = |line: &str| {
            line.split('=')
                .next()
                .unwrap_or("")
                .trim()
                .trim_start_matches('-')
                .to_owned()
        };
        let merge = |defaults: &[&str], extra: &str| {
            let replaced: Vec<String> = extra.lines().map(key).collect();
            let kept = defaults
                .iter()
                .copied()
                .filter(|l| !replaced.contains(&key(l)));
            let added = extra.lines().filter(|l| !l.starts_with('-'));
            kept.chain(added).collect::<Vec<_>>().join("\n")
        };
        let site = merge(
            &["name = \"pharma\"", "pod_cidrs = [\"10.0.0.0/16\"]"],
            site_extra,
        );
        let peer = merge(
            &[
                "name = \"hospital\"",
                "public_key = \"KEY_A\"",
                "cidrs = [\"10.1.0.0/16\"]",
            ],
            peer_extra,
        );
        keyed(&format!("[site]\n{site}\n\n[[peer]]\n{peer}\n"))
    }

    /// One case per line: `site extra | peer extra | expected problem`, where
    /// an extra's lines are separated by ';' and "-key" removes a default.
    /// An empty expectation means the config is valid.
    const SINGLE_PROBLEMS: &str = r#"
                                  |                                   |
                                  | x = 1                             | line 9, column 1: unknown field `x`
lisen_port = 1                    |                                   | line 4, column 1: unknown field `lisen_port`, expected one of
                                  | pubkey = "KEY_B"                  | line 9, column 1: unknown field `pubkey`
name = 7                          |                                   | line 3, column 8: invalid type: integer `7`, expected a string
name = "Pharma"                   |                                   | site.name: "Pharma" is not a valid name
name = ""                         |                                   | site.name: "" is not a valid name
name = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" |                          | is not a valid name
-name                             |                                   | site.name: missing
                                  | name = "a_b"                      | peer[0] "a_b": name: "a_b" is not a valid name
                                  | -name                             | peer[0]: name: missing
-pod_cidrs                        |                                   | site.pod_cidrs: missing
pod_cidrs = []                    |                                   | site.pod_cidrs: is empty
                                  | -cidrs                            | peer[0] "hospital": cidrs: missing
                                  | cidrs = ["10.1.0.0/33"]           | causeway.toml: peer[0] "hospital": cidrs[0]: "10.1.0.0/33" is not a valid CIDR
                                  | cidrs = ["10.1.0.0"]              | cidrs[0]: "10.1.0.0" is not a valid CIDR
pod_cidrs = ["10.0.0.1/16"]       |                                   | site.pod_cidrs[0]: "10.0.0.1/16" has host bits set; did you mean "10.0.0.0/16"?
                                  | cidrs = ["fd00::1/64"]            | did you mean "fd00::/64"?
                                  | cidrs = ["10.0.1.0/24"]           |
                                  | cidrs = ["10.1.0.0/16", "10.1.2.0/24"] | cidrs[1]: 10.1.2.0/24 overlaps cidrs[0] 10.1.0.0/16; list each network once
pod_cidrs = ["10.0.0.0/16", "10.0.0.0/16"] |                          | site.pod_cidrs[1]: 10.0.0.0/16 overlaps pod_cidrs[0] 10.0.0.0/16
                                  | -public_key                       | peer[0] "hospital": public_key: missing
                                  | public_key = "KEY_A="             | public_key: public key is 45 characters long; expected 44
                                  | public_key = "ZkgvCW+DIoRG24ZST7MmKM5j/X9m/LO8XA0qLN0Fxm0!" | public_key: public key is not valid base64
                                  | endpoint = "192.0.2.2"            | endpoint: "192.0.2.2" has no port
                                  | endpoint = "[2001:db8::2]"        | has no port
                                  | endpoint = "192.0.2.2:0"          | has port 0
                                  | endpoint = "192.0.2.2:70000"      | has an invalid port "70000"
                                  | endpoint = "host:"                | has an invalid port ""
                                  | endpoint = "2001:db8::2:51820"    | put an IPv6 address in brackets
                                  | endpoint = "[2001:db8::g]:1"      | has an invalid IPv6 address [2001:db8::g]
                                  | endpoint = "300.1.1.1:1"          | has an invalid host "300.1.1.1"
                                  | endpoint = "bad host:1"           | has an invalid host "bad host"
                                  | endpoint = ":1"                   | has an invalid host ""
                                  | endpoint = "gw.example.com:1"     |
listen_port = 65536               |                                   | site.listen_port: 65536 is out of range; use 0 to 65535
listen_port = -1                  |                                   | site.listen_port: -1 is out of range
                                  | persistent_keepalive = 0          | persistent_keepalive: 0 is out of range; use 1 to 65535 seconds
mtu = 575                         |                                   | site.mtu: 575 is out of range; use 576 to 9000
mtu = 9001                        |                                   | site.mtu: 9001 is out of range
mtu = 1279; pod_cidrs = ["fd00::/64"] |                               | site.mtu: 1279 is too small for the IPv6 CIDRs configured; use 1280 to 9000
mtu = 1279                        | cidrs = ["fd01::/64"]             | site.mtu: 1279 is too small for the IPv6 CIDRs configured; use 1280 to 9000
mtu = 1280; pod_cidrs = ["fd00::/64"] |                               |
interface = ""                    |                                   | site.interface: "" is not a valid interface name: use 1 to 15
interface = "causeway-tunnel0"    |                                   | use 1 to 15 characters
interface = "cw/0"                |                                   | '/', ':' and whitespace are not allowed
interface = "cw:0"                |                                   | not allowed
interface = "cw 0"                |                                   | not allowed
interface = ".."                  |                                   | reserved
private_key_file = "key"          |                                   | site.private_key_file: "key" is not an absolute path
control_socket = "s.sock"         |                                   | site.control_socket: "s.sock" is not an absolute path
state_dir = "state"               |                                   | site.state_dir: "state" is not an absolute path
                                  | cidrs = ["10.0.0.0/16"]           |
                                  | cidrs = ["10.0.0.0/8", "fd00::/64"] |
remap_pool = []                   |                                   |
mtu = 1279                        |                                   |
remap_pool = ["10.0.128.0/17"]    |                                   | site.remap_pool[0]: 10.0.128.0/17 overlaps site.pod_cidrs[0] 10.0.0.0/16; views taken from remap_pool must not collide
pod_cidrs = ["100.64.0.0/16"]     |                                   | site.remap_pool[0]: 100.64.0.0/10 (the default) overlaps site.pod_cidrs[0] 100.64.0.0/16; views taken from remap_pool must not collide with this site's own networks: set remap_pool to ranges this site does not use
reserved_cidrs = ["10.96.0.0/12"]; remap_pool = ["10.96.0.0/16"] |   | site.remap_pool[0]: 10.96.0.0/16 overlaps site.reserved_cidrs[0] 10.96.0.0/12
remap_pool = ["100.64.0.0/10", "100.64.0.0/16"] |                     | site.remap_pool[1]: 100.64.0.0/16 overlaps remap_pool[0] 100.64.0.0/10; list each network once
remap_pool = ["100.64.0.0/33"]    |                                   | site.remap_pool[0]: "100.64.0.0/33" is not a valid CIDR
reserved_cidrs = ["10.96.0.0/12", "10.100.0.0/16"] |                  | site.reserved_cidrs[1]: 10.100.0.0/16 overlaps reserved_cidrs[0] 10.96.0.0/12; list each network once
reserved_cidrs = ["10.96.0.1/12"] |                                   | site.reserved_cidrs[0]: "10.96.0.1/12" has host bits set
reserved_cidrs = ["10.0.0.0/24"]  |                                   |
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; proto = "tcp"; ports = "443" |
                                  | [[peer.allow]]; cidr = "10.0.0.0/16"; proto = "udp"; ports = "8000-8080" |
                                  | [[peer.allow]]; cidr = "10.0.0.0/16"; proto = "tcp"; ports = 22 |
                                  | [[peer.allow]]; cidr = "10.0.5.7/32"; proto = "icmp" |
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; proto = "sctp" | peer[0] "hospital": allow[0].proto: "sctp" is not a protocol; use "tcp", "udp", "icmp" or "any"
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; proto = "TCP" | allow[0].proto: "TCP" is not a protocol
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; proto = "icmp"; ports = "443" | peer[0] "hospital": allow[0].ports: ports apply only to TCP and UDP, not to proto = "icmp"; set proto = "tcp" or "udp", or leave ports out
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; proto = "any"; ports = "443" | allow[0].ports: ports apply only to TCP and UDP, not to proto = "any"
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; ports = "443" | allow[0].ports: ports apply only to TCP and UDP, and proto defaults to "any"
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; proto = "udp"; ports = "9-3" | allow[0].ports: "9-3" is an empty range; write the lower port first: "3-9"
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; proto = "udp"; ports = "0" | allow[0].ports: "0" is not a port; write a port ("443") or a range ("8000-8080") of ports from 1 to 65535
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; proto = "udp"; ports = 70000 | allow[0].ports: "70000" is not a port
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; proto = "udp"; ports = "80-" | allow[0].ports: "" is not a port
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; proto = "udp"; ports = "http" | allow[0].ports: "http" is not a port
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; proto = "udp"; ports = true | allow[0].ports: true is not a port or range
                                  | [[peer.allow]]; cidr = "10.1.0.0/24" | peer[0] "hospital": allow[0].cidr: 10.1.0.0/24 is not inside any of site.pod_cidrs; a peer can only reach networks this site exports: export it in pod_cidrs first
                                  | [[peer.allow]]; cidr = "10.0.0.0/8" | allow[0].cidr: 10.0.0.0/8 is not inside any of site.pod_cidrs
                                  | [[peer.allow]]; cidr = "fd00::/64" | allow[0].cidr: fd00::/64 is not inside any of site.pod_cidrs
                                  | [[peer.allow]]; cidr = "10.0.5.1/24" | allow[0].cidr: "10.0.5.1/24" has host bits set
                                  | [[peer.allow]]; proto = "tcp"     | allow[0].cidr: missing; write the local network this peer may reach
                                  | [[peer.allow]]; cidr = "10.0.5.0/24"; port = "1" | unknown field `port`, expected one of `cidr`, `proto`, `ports`
"#;

    #[test]
    fn single_problems() {
        for case in SINGLE_PROBLEMS.lines().skip(1) {
            let [site, peer, expected] = case.split('|').collect::<Vec<_>>()[..] else {
                panic!("bad case {case:?}")
            };
            let extra = |s: &str| s.trim().replace("; ", "\n");
            let text = config_with(&extra(site), &extra(peer));
            let expected = expected.trim();
            let result = parse(&text, "causeway.toml");
            if expected.is_empty() {
                assert!(result.is_ok(), "{text}\n{result:?}");
                continue;
            }
            let err = result.err().unwrap_or_else(|| panic!("accepted:\n{text}"));
            assert_eq!(err.problems().len(), 1, "{text}\n{err}");
            let problem = &err.problems()[0];
            assert!(problem.starts_with("causeway.toml: "), "{problem}");
            assert!(
                problem.contains(expected),
                "{text}\n{problem}\nexpected: {expected}"
            );
        }
    }

    #[test]
    fn allow_rules() {
        let text = config_with(
            "pod_cidrs = [\"10.0.0.0/16\", \"fd00:10::/64\"]",
            r#"[[peer.allow]]
cidr = "10.0.5.0/24"
proto = "tcp"
ports = "443"
[[peer.allow]]
cidr = "10.0.6.0/24"
proto = "udp"
ports = "8000-8080"
[[peer.allow]]
cidr = "fd00:10::/64"
proto = "icmp"
[[peer.allow]]
cidr = "10.0.7.0/24""#,
        );
        let config = parse(&text, "causeway.toml").unwrap();
        assert_eq!(
            config.peers[0].allow,
            [
                AllowRule {
                    cidr: net("10.0.5.0/24"),
                    proto: Proto::Tcp,
                    ports: Some(443..=443),
                },
                AllowRule {
                    cidr: net("10.0.6.0/24"),
                    proto: Proto::Udp,
                    ports: Some(8000..=8080),
                },
                AllowRule {
                    cidr: net("fd00:10::/64"),
                    proto: Proto::Icmp,
                    ports: None,
                },
                AllowRule::any(net("10.0.7.0/24")),
            ]
        );
        // No rule: the default (everything exported), left to the data path.
        let config = parse(&config_with("", ""), "causeway.toml").unwrap();
        assert!(config.peers[0].allow.is_empty());

        // Every bad rule is reported, each field on its own line.
        let text = config_with(
            "",
            r#"[[peer.allow]]
cidr = "10.9.0.0/24"
proto = "icmp"
ports = "9-3"
[[peer.allow]]
proto = "gre""#,
        );
        let err = parse(&text, "c.toml").err().unwrap();
        let fields: Vec<&str> = err
            .problems()
            .iter()
            .map(|p| p.split(": ").nth(2).unwrap_or(""))
            .collect();
        assert_eq!(
            fields,
            [
                "allow[0].cidr",
                "allow[0].ports",
                "allow[1].cidr",
                "allow[1].proto"
            ],
            "{err}"
        );

        // With pod_cidrs broken, rules are not also blamed for it.
        let text = config_with(
            "pod_cidrs = [\"10.0.0.0/16\", \"bad\"]",
            "[[peer.allow]]\ncidr = \"10.9.0.0/24\"",
        );
        let err = parse(&text, "c.toml").err().unwrap();
        assert_eq!(err.problems().len(), 1, "{err}");
    }

    #[test]
    fn overlapping_peers_are_accepted_with_identity_views_until_load() {
        let text = keyed(
            r#"
[site]
name = "pharma"
pod_cidrs = ["10.0.0.0/16"]

[[peer]]
name = "hospital"
public_key = "KEY_A"
cidrs = ["10.0.0.0/16", "10.3.0.0/16"]

[[peer]]
name = "lab"
public_key = "KEY_B"
cidrs = ["10.0.0.0/16", "10.3.128.0/17"]
"#,
        );
        let config = parse(&text, "causeway.toml").unwrap();
        for peer in &config.peers {
            let real: Vec<IpNet> = peer.views.iter().map(|v| *v.real()).collect();
            assert_eq!(real, peer.cidrs);
            assert!(peer.views.iter().all(|v| !v.is_remapped()));
        }
    }

    #[test]
    fn unknown_top_level_key_and_table() {
        let text = config_with("", "") + "\n[peers]\nname = \"x\"\n";
        let err = parse(&text, "c.toml").err().unwrap().to_string();
        assert!(
            err.starts_with("c.toml: line 10, column 2: unknown field `peers`"),
            "{err}"
        );
        let err = parse("colour = 1\n", "c.toml").err().unwrap().to_string();
        assert!(
            err.contains("unknown field `colour`, expected one of `site`, `peer`, `rendezvous`"),
            "{err}"
        );
    }

    #[test]
    fn peer_conflicts() {
        let text = keyed(
            r#"
[site]
name = "pharma"
pod_cidrs = ["10.0.0.0/16"]

[[peer]]
name = "hospital"
public_key = "KEY_A"
cidrs = ["10.1.0.0/16"]

[[peer]]
name = "hospital"
public_key = "KEY_A"
cidrs = ["10.1.0.0/16", "10.3.0.0/16"]

[[peer]]
name = "lab"
public_key = "KEY_B"
cidrs = ["10.3.128.0/17"]
"#,
        );
        let err = parse(&text, "causeway.toml").err().unwrap();
        assert_eq!(
            err.problems(),
            [
                "causeway.toml: peer[1] \"hospital\": name: \"hospital\" is already used by peer[0]; peer names must be unique",
                "causeway.toml: peer[1] \"hospital\": public_key: same key as peer[0] \"hospital\"; each peer has its own key",
            ]
        );
    }

    #[test]
    fn all_problems_reported_together() {
        let text = keyed(
            r#"
[site]
interface = "this-name-is-too-long"
listen_port = 99999
pod_cidrs = ["10.0.0.1/16", "nonsense"]
mtu = 100

[[peer]]
name = "Hospital"
public_key = "short"
cidrs = []
endpoint = "nowhere"
persistent_keepalive = 0

[[peer]]
"#,
        );
        let err = parse(&text, "causeway.toml").err().unwrap();
        let fields: Vec<&str> = err
            .problems()
            .iter()
            .map(|p| p.split(": ").nth(1).unwrap_or(""))
            .collect();
        assert_eq!(
            fields,
            [
                "site.name",
                "site.interface",
                "site.listen_port",
                "site.mtu",
                "site.pod_cidrs[0]",
                "site.pod_cidrs[1]",
                "peer[0] \"Hospital\"", // name
                "peer[0] \"Hospital\"", // public_key
                "peer[0] \"Hospital\"", // endpoint
                "peer[0] \"Hospital\"", // persistent_keepalive
                "peer[0] \"Hospital\"", // cidrs
                "peer[1]",              // name
                "peer[1]",              // public_key
                "peer[1]",              // cidrs
            ],
            "{err}"
        );
        assert_eq!(err.to_string().lines().count(), fields.len());
    }

    #[test]
    fn examples_are_a_valid_pair() {
        let a = parse(include_str!("../../examples/site-a.toml"), "site-a.toml").unwrap();
        let b = parse(include_str!("../../examples/site-b.toml"), "site-b.toml").unwrap();
        for (this, other) in [(&a, &b), (&b, &a)] {
            let [peer] = &this.peers[..] else {
                panic!("{:?}", this.peers)
            };
            assert_eq!(peer.name, other.site.name);
            assert_eq!(peer.cidrs, other.site.pod_cidrs);
            let port = peer
                .endpoint
                .as_ref()
                .and_then(|e| e.addr)
                .map(|a| a.port());
            assert_eq!(port, Some(other.site.listen_port));
        }
        assert_ne!(a.peers[0].public_key, b.peers[0].public_key);
        assert_eq!(a.peers[0].allow.len(), 3);
        assert!(b.peers[0].allow.is_empty());
    }

    #[test]
    fn shared_network_example_gets_the_views_it_describes() {
        let text = include_str!("../../examples/shared-network.toml");
        let config = parse(text, "shared-network.toml").unwrap();
        let site = &config.site;
        let public_keys: Vec<String> = config
            .peers
            .iter()
            .map(|p| keys::encode_public(&p.public_key))
            .collect();
        let peers: Vec<PeerCidrs<'_>> = config
            .peers
            .iter()
            .zip(&public_keys)
            .map(|(p, public_key)| PeerCidrs {
                name: &p.name,
                public_key,
                cidrs: &p.cidrs,
            })
            .collect();
        let (views, _) = views::assign(
            &site.pod_cidrs,
            &site.reserved_cidrs,
            &site.remap_pool,
            &peers,
            &Persisted::default(),
        )
        .unwrap();
        let shown: Vec<Vec<String>> = views
            .iter()
            .map(|v| v.iter().map(|v| v.to_string()).collect())
            .collect();
        assert_eq!(
            shown,
            [
                vec!["10.0.0.0/16 seen as 100.96.0.0/16"],
                vec![
                    "10.0.0.0/16 seen as 100.97.0.0/16",
                    "fd00:10::/64 seen as fd63:6175:7365::/64"
                ],
            ]
        );
        assert_eq!(config.peers[1].allow.len(), 4);
    }

    fn write_config(dir: &Path, key_file: &Path, peer: &str) -> PathBuf {
        let text = format!(
            "[site]\nname = \"pharma\"\nprivate_key_file = {:?}\nstate_dir = {:?}\npod_cidrs = [\"10.0.0.0/16\"]\n\n[[peer]]\n{peer}\ncidrs = [\"10.1.0.0/16\"]\n",
            key_file.display().to_string(),
            dir.join("state").display().to_string(),
        );
        let path = dir.join("causeway.toml");
        std::fs::write(&path, keyed(&text)).unwrap();
        path
    }

    #[test]
    fn load_creates_key_and_resolves_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("state/private.key");
        let path = write_config(
            dir.path(),
            &key_file,
            "name = \"hospital\"\npublic_key = \"KEY_A\"\nendpoint = \"localhost:51820\"",
        );
        let config = load(&path).unwrap();
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let key = config.site.private_key.as_ref().unwrap();
        assert_eq!(
            keys::load_or_create_private_key(&key_file)
                .unwrap()
                .to_bytes(),
            key.to_bytes()
        );
        let endpoint = config.peers[0].endpoint.as_ref().unwrap();
        let addr = endpoint.addr.unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 51820);

        // Debug shows the public half, never the private key.
        let debug = format!("{config:?}");
        assert!(!debug.contains(&keys::encode_private(key)), "{debug}");
        let public = keys::encode_public(&config.site.public_key().unwrap());
        assert!(debug.contains(&public), "{debug}");
    }

    #[test]
    fn load_rejects_own_key_unreadable_key_and_unresolvable_host() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("private.key");
        let own = keys::generate();
        std::fs::write(&key_file, keys::encode_private(&own) + "\n").unwrap();
        let own_public = keys::encode_public(&PublicKey::from(&own));
        let path = write_config(
            dir.path(),
            &key_file,
            &format!(
                "name = \"me\"\npublic_key = \"{own_public}\"\nendpoint = \"no-such-host.invalid:51820\""
            ),
        );
        let err = load(&path).err().unwrap();
        let origin = path.display().to_string();
        assert_eq!(err.problems().len(), 2, "{err}");
        assert!(
            err.problems()[0].starts_with(&format!(
                "{origin}: peer[0] \"me\": public_key: is this site's own public key"
            )),
            "{err}"
        );
        assert!(
            err.problems()[1].starts_with(&format!(
                "{origin}: peer[0] \"me\": endpoint: cannot resolve host \"no-such-host.invalid\""
            )),
            "{err}"
        );

        let key_dir = dir.path().join("key-is-a-dir");
        std::fs::create_dir(&key_dir).unwrap();
        let path = write_config(
            dir.path(),
            &key_dir,
            "name = \"hospital\"\npublic_key = \"KEY_A\"",
        );
        let err = load(&path).err().unwrap().to_string();
        assert!(
            err.contains("site.private_key_file: cannot read private key file"),
            "{err}"
        );
        assert!(err.contains(&key_dir.display().to_string()), "{err}");

        let missing = dir.path().join("missing.toml");
        let err = load(&missing).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!(
                "{}: cannot read the config file",
                missing.display()
            )),
            "{err}"
        );
    }

    /// A site with state in `dir`, sharing 10.0.0.0/16 with two of its
    /// peers, listed in the given order.
    fn write_remapped(dir: &Path, extra_site: &str, order: &[usize]) -> PathBuf {
        let peers = [
            "[[peer]]\nname = \"hospital\"\npublic_key = \"KEY_A\"\ncidrs = [\"10.0.0.0/16\", \"10.1.0.0/16\"]\n",
            "[[peer]]\nname = \"lab\"\npublic_key = \"KEY_B\"\ncidrs = [\"10.0.0.0/16\", \"fd00:10::/64\"]\n",
            "[[peer]]\nname = \"edge\"\npublic_key = \"KEY_C\"\ncidrs = [\"10.1.0.0/16\"]\n",
        ];
        let mut text = format!(
            "[site]\nname = \"pharma\"\nprivate_key_file = {:?}\nstate_dir = {:?}\npod_cidrs = [\"10.0.0.0/16\", \"fd00:10::/64\"]\n{extra_site}\n",
            dir.join("private.key").display().to_string(),
            dir.join("state").display().to_string(),
        );
        for &i in order {
            text.push_str(peers[i]);
        }
        let path = dir.join("causeway.toml");
        std::fs::write(&path, keyed(&text)).unwrap();
        path
    }

    fn views_by_peer(config: &Config) -> Vec<(String, Vec<View>)> {
        let mut views: Vec<_> = config
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.views.clone()))
            .collect();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        views
    }

    #[test]
    fn load_gives_views_and_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("state/views.json");
        let path = write_remapped(dir.path(), "", &[0, 1]);
        let config = load(&path).unwrap();
        let shown: Vec<Vec<String>> = config
            .peers
            .iter()
            .map(|p| p.views.iter().map(|v| v.to_string()).collect())
            .collect();
        assert_eq!(
            shown,
            [
                vec!["10.0.0.0/16 seen as 100.64.0.0/16", "10.1.0.0/16"],
                vec![
                    "10.0.0.0/16 seen as 100.65.0.0/16",
                    "fd00:10::/64 seen as fd63:6175:7365::/64"
                ],
            ]
        );
        let written = std::fs::read_to_string(&state_file).unwrap();
        assert_eq!(
            Persisted::from_json(&written).unwrap().views.len(),
            4,
            "{written}"
        );
        let mode = std::fs::metadata(dir.path().join("state"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);

        // Reloading gives the same views and leaves the file as it was.
        let again = load(&path).unwrap();
        assert_eq!(views_by_peer(&again), views_by_peer(&config));
        assert_eq!(std::fs::read_to_string(&state_file).unwrap(), written);

        // So does listing the peers the other way round, and adding a peer
        // (that overlaps hospital's identity view) before both.
        let path = write_remapped(dir.path(), "", &[2, 1, 0]);
        let grown = load(&path).unwrap();
        let mut expected = views_by_peer(&config);
        expected.insert(
            0,
            (
                "edge".into(),
                vec![View::new(net("10.1.0.0/16"), net("100.66.0.0/16")).unwrap()],
            ),
        );
        assert_eq!(views_by_peer(&grown), expected);

        // Removing a peer drops its entries from the file.
        let path = write_remapped(dir.path(), "", &[1]);
        load(&path).unwrap();
        let state = Persisted::from_json(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
        assert!(state.views.iter().all(|e| e.peer == "lab"), "{state:?}");
        assert_eq!(state.views.len(), 2);
    }

    #[test]
    fn load_reports_views_it_cannot_give() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_remapped(dir.path(), "remap_pool = [\"100.64.0.0/16\"]", &[0, 1]);
        let err = load(&path).err().unwrap();
        let origin = path.display().to_string();
        assert_eq!(
            err.problems(),
            [
                format!(
                    "{origin}: peer[1] \"lab\": cidrs[0]: 10.0.0.0/16 overlaps site.pod_cidrs[0] 10.0.0.0/16, so it needs a view from site.remap_pool, but its IPv4 CIDRs have no free /16 left; add another IPv4 CIDR to remap_pool"
                ),
                format!(
                    "{origin}: peer[1] \"lab\": cidrs[1]: fd00:10::/64 overlaps site.pod_cidrs[1] fd00:10::/64, so it needs a view from site.remap_pool, but remap_pool has no IPv6 CIDR; add one, e.g. \"fd63:6175:7365::/48\""
                ),
            ]
        );
        // A failed load changes no state.
        assert!(!dir.path().join("state/views.json").exists());

        // A damaged state file is reported, not silently replaced.
        let path = write_remapped(dir.path(), "", &[0, 1]);
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join("state/views.json"), "{").unwrap();
        let err = load(&path).err().unwrap().to_string();
        assert!(err.contains(": site.state_dir: "), "{err}");
        assert!(err.contains("is not a valid views file"), "{err}");
    }

    #[test]
    fn endpoint_resolution_prefers_ipv4() {
        let endpoint = parse_endpoint("localhost:9").unwrap();
        assert_eq!(endpoint.host(), "localhost");
        let addr = endpoint.resolve().unwrap();
        assert_eq!(addr, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9));
    }

    #[test]
    fn rendezvous_stun_and_advertised_endpoints() {
        let text = config_with(
            "advertise_endpoints = [\"203.0.113.7:51820\", \"[2001:db8::7]:51820\"]\n\
             stun_servers = [\"stun.example:3478\"]\nmetrics_listen = \"127.0.0.1:9469\"",
            "",
        ) + &format!(
            "\n[[rendezvous]]\naddress = \"198.18.0.1:7443\"\npublic_key = \"{KEY_B}\"\n\
             \n[[rendezvous]]\naddress = \"[2001:db8::1]:7443\"\npublic_key = \"{KEY_B}\"\nstun = \"[2001:db8::1]:3479\"\n"
        );
        let config = parse(&text.replace("KEY_A", KEY_A), "c.toml").unwrap();
        assert_eq!(config.site.advertise_endpoints.len(), 2);
        assert_eq!(config.site.stun_servers[0].host(), "stun.example");
        assert_eq!(
            config.site.metrics_listen,
            Some("127.0.0.1:9469".parse().unwrap())
        );
        assert_eq!(config.rendezvous.len(), 2);
        assert_eq!(
            config.rendezvous[0].stun.addr,
            Some("198.18.0.1:3478".parse().unwrap())
        );
        assert_eq!(
            config.rendezvous[1].stun.addr,
            Some("[2001:db8::1]:3479".parse().unwrap())
        );

        let bad = config_with(
            "advertise_endpoints = [\"nowhere\"]\nmetrics_listen = \"x\"",
            "",
        ) + "\n[[rendezvous]]\naddress = \"198.18.0.1\"\n";
        let err = parse(&bad.replace("KEY_A", KEY_A), "c.toml").err().unwrap();
        let text = err.to_string();
        for needle in [
            "advertise_endpoints[0]",
            "metrics_listen",
            "rendezvous[0]: address",
            "rendezvous[0]: public_key",
        ] {
            assert!(text.contains(needle), "{needle} not reported:\n{text}");
        }
    }
}
