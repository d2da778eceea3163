//! The site configuration file (TOML): schema, defaults and validation, in
//! stages.
//!
//! 1. `raw`: the file as written; every value optional and loosely typed,
//!    so that validation, not the deserializer, reports what is missing or
//!    malformed.
//! 2. [`parse`]: a pure function of the text. It applies defaults and
//!    checks every rule it can without touching files or the network (one
//!    function per section: the site, each rendezvous, each peer, each
//!    allow rule), and reports all problems at once. Its result is a
//!    [`Config<Parsed>`]: the private key unread, host names unresolved,
//!    no views yet.
//! 3. [`load`]: reads the file, parses it, then loads (or creates) the
//!    private key, resolves endpoint host names and gives every peer CIDR
//!    its view (reading and updating `<state_dir>/views.json`, see
//!    [`crate::views`]), so that every mistake surfaces before any network
//!    setup. Its result is a [`Config`] (`Config<Loaded>`): everything the
//!    daemon runs on, nothing left to check at run time.
//!
//! [`needs_restart`] says which change of a running configuration a reload
//! cannot apply. The file format is documented in `docs/config.md`.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

pub use causeway_common::problems::ConfigErrors;

use crate::keys::{self, PublicKey, StaticSecret};
use crate::packet::View;
pub use crate::packet::{AllowRule, Proto};

mod cluster;
mod load;
mod parse;
mod raw;
mod restart;
#[cfg(test)]
mod tests;

pub use cluster::{
    ClusterConfig, DEFAULT_GATEWAY_VXLAN_INTERFACE, DEFAULT_VXLAN_PORT, DEFAULT_VXLAN_VNI,
    MIN_SECRET_LEN, vxlan_interface,
};
pub(crate) use load::assign_views;
pub use load::load;
pub use parse::parse;
pub(crate) use parse::{default_stun, default_tcp, parse_cidr, parse_endpoint};
pub use restart::needs_restart;

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
/// The rendezvous' default STUN port.
pub use causeway_nat::rendezvous::{DEFAULT_STUN_PORT, DEFAULT_TCP_PORT};

/// The default control socket for an interface: `/run/causeway/<interface>.sock`.
pub fn default_control_socket(interface: &str) -> PathBuf {
    Path::new(DEFAULT_CONTROL_SOCKET_DIR).join(format!("{interface}.sock"))
}

/// The default WireGuard UAPI socket for an interface (where `wg` looks):
/// `/var/run/wireguard/<interface>.sock`.
pub fn default_uapi_socket(interface: &str) -> PathBuf {
    Path::new("/var/run/wireguard").join(format!("{interface}.sock"))
}

/// What a configuration holds at one stage: [`Parsed`] or [`Loaded`]. Only
/// the private key, endpoints and views differ between them; every other
/// setting has the same type (and name) in both.
pub trait Stage: fmt::Debug + Clone + PartialEq + Eq {
    /// The site's private key.
    type PrivateKey: fmt::Debug + Clone;
    /// A `host:port` from the file.
    type Endpoint: fmt::Debug + Clone + PartialEq + Eq;
    /// How the site sees a peer's CIDRs.
    type Views: fmt::Debug + Clone + PartialEq + Eq;
}

/// [`parse`]'s result: no private key (`()`), endpoints as written
/// ([`EndpointSpec`], an IP literal parsed, a host name not resolved), no
/// views (`()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {}

impl Stage for Parsed {
    type PrivateKey = ();
    type Endpoint = EndpointSpec;
    type Views = ();
}

/// [`load`]'s result: the private key read, every endpoint resolved
/// ([`Endpoint`]), every peer CIDR given its [`View`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {}

impl Stage for Loaded {
    type PrivateKey = PrivateKey;
    type Endpoint = Endpoint;
    type Views = Vec<View>;
}

/// A validated site configuration; by default a loaded one, what the
/// daemon runs on.
#[derive(Debug, Clone)]
pub struct Config<S: Stage = Loaded> {
    /// This site.
    pub site: SiteConfig<S>,
    /// The sites this one connects to, in file order.
    pub peers: Vec<PeerConfig<S>>,
    /// Rendezvous servers: peers without a static endpoint are found (and
    /// relayed) through them. The site registers with all of them.
    pub rendezvous: Vec<RendezvousConfig<S>>,
    /// `[cluster]`: the endpoint for the node agents; `None`: no node agents.
    pub cluster: Option<ClusterConfig>,
    /// `[failover]`: how this gateway replica learns whether it is the
    /// site's active one.
    pub failover: Failover,
}

/// How a gateway replica learns its role (see docs/deploy.md, "Standby
/// gateways").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Failover {
    /// No `[failover]` table: the site's only gateway, always active.
    #[default]
    None,
    /// `election = "keepalived"`: starts as a standby; keepalived's notify
    /// scripts run `causeway ctl role active|standby` on VRRP transitions.
    Keepalived,
    /// `election = "kubernetes"`: starts as a standby; active while it
    /// holds a `coordination.k8s.io/v1` Lease.
    Kubernetes(KubernetesLease),
}

/// The Lease of `election = "kubernetes"`; what is not given is taken from
/// the pod when the daemon starts (see [`crate::election::LeaseParams::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesLease {
    /// `lease_name` (default `causeway-gateway`).
    pub name: Option<String>,
    /// `lease_namespace` (default: `POD_NAMESPACE`, else the service
    /// account's namespace).
    pub namespace: Option<String>,
    /// `identity` (default: `POD_NAME`, else the host name).
    pub identity: Option<String>,
    /// `lease_duration_ms`, `renew_deadline_ms`, `retry_period_ms`.
    pub timing: crate::election::Timing,
}

/// Where the daemon's config comes from: the file, with the settings given
/// on the command line put over it. Loaded the same way at start and at
/// every reload, so that a reload does not read an override as a change.
#[derive(Debug, Clone)]
pub struct Source {
    /// The TOML file (`causeway up --config`).
    pub path: PathBuf,
    /// `causeway up --metrics-listen`: wins over `[site] metrics_listen`.
    pub metrics_listen: Option<SocketAddr>,
}

impl Source {
    /// [`load`]s the file and applies the command-line settings.
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        let mut config = load(&self.path)?;
        if self.metrics_listen.is_some() {
            config.site.metrics_listen = self.metrics_listen;
        }
        Ok(config)
    }
}

/// A `[[rendezvous]]` table: a rendezvous server this site dials out to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig<S: Stage = Loaded> {
    /// Its QUIC address (`host:port`).
    pub address: S::Endpoint,
    /// Its public key, pinned: a server that cannot prove it is refused.
    pub public_key: PublicKey,
    /// Its STUN address; default: the same host, port 3478.
    pub stun: S::Endpoint,
    /// Its TLS-over-TCP address, used when UDP to it gets no answer;
    /// default: the same host, port 443; `None` (`tcp = "off"`): never.
    pub tcp: Option<S::Endpoint>,
}

/// The `[site]` table: this site's identity, interface and exported networks.
#[derive(Debug, Clone)]
pub struct SiteConfig<S: Stage = Loaded> {
    /// Site name, `[a-z0-9-]{1,32}`.
    pub name: String,
    /// Absolute path of the private key file.
    pub private_key_file: PathBuf,
    /// The private key, read from (or created in) `private_key_file` by
    /// [`load`].
    pub private_key: S::PrivateKey,
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
    pub stun_servers: Vec<S::Endpoint>,
    /// Whether to ask the gateway's router (PCP, NAT-PMP) to map the
    /// WireGuard port and offer the mapping as a candidate (NAT traversal
    /// only).
    pub port_mapping: bool,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: off.
    pub metrics_listen: Option<SocketAddr>,
}

/// A `[[peer]]` table: another site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig<S: Stage = Loaded> {
    /// Peer name, unique, `[a-z0-9-]{1,32}`.
    pub name: String,
    /// The peer's WireGuard public key, unique.
    pub public_key: PublicKey,
    /// The peer's own networks, as the peer numbers them: its real CIDRs
    /// (non-empty, not overlapping each other; they may overlap this
    /// site's networks and other peers').
    pub cidrs: Vec<IpNet>,
    /// How this site sees each of [`cidrs`](Self::cidrs), index-aligned
    /// with it, remapped where needed; given by [`load`].
    pub views: S::Views,
    /// What the peer may reach here, from `[[peer.allow]]`: a packet is let
    /// in if it matches any rule. Empty means the default: all of the
    /// site's `pod_cidrs`, any protocol.
    pub allow: Vec<AllowRule>,
    /// Where to reach the peer directly, if it has a static address.
    pub endpoint: Option<S::Endpoint>,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
}

/// The site's private key. Its `Debug` shows only the public half, so a
/// logged configuration never holds the key.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    /// The key itself.
    pub fn secret(&self) -> &StaticSecret {
        &self.0
    }

    /// Its public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(&self.0)
    }
}

impl From<StaticSecret> for PrivateKey {
    fn from(secret: StaticSecret) -> Self {
        PrivateKey(secret)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "<private key of public key {}>",
            keys::encode_public(&self.public_key())
        )
    }
}

/// An endpoint as written (`host:port`, `1.2.3.4:port` or `[v6]:port`),
/// checked but not resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The text from the config file.
    pub spec: String,
    /// The address when the text is an IP literal; `None` for a host name.
    pub addr: Option<SocketAddr>,
}

impl EndpointSpec {
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

/// An endpoint resolved by [`load`]: its text and the address it had then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The text from the config file.
    pub spec: String,
    /// Its address.
    pub addr: SocketAddr,
}
