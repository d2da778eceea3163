//! The site configuration file (TOML): schema, defaults and validation.
//!
//! [`parse`] is a pure function of the text: it applies defaults and checks
//! every rule it can without touching files or the network, and reports all
//! problems at once. [`load`] reads the file, parses it, then loads (or
//! creates) the private key and resolves endpoint host names, so that every
//! mistake surfaces before any network setup. The file format is documented
//! in `docs/config.md`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use crate::keys::{self, PublicKey, StaticSecret};

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
pub const MAX_NAME_LEN: usize = 32;

/// The default control socket for an interface: `/run/causeway/<interface>.sock`.
pub fn default_control_socket(interface: &str) -> PathBuf {
    Path::new(DEFAULT_CONTROL_SOCKET_DIR).join(format!("{interface}.sock"))
}

/// A validated site configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This site.
    pub site: SiteConfig,
    /// The sites this one connects to, in file order.
    pub peers: Vec<PeerConfig>,
}

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
    /// Tunnel MTU.
    pub mtu: u16,
    /// Path of the control socket used by `causeway status`.
    pub control_socket: PathBuf,
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
            .field("mtu", &self.mtu)
            .field("control_socket", &self.control_socket)
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
    /// The peer's own networks (non-empty).
    pub cidrs: Vec<IpNet>,
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

/// Every problem found in a configuration, one line each, naming the file
/// and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    problems: Vec<String>,
}

impl ConfigErrors {
    /// The problems, one message each, in file order where possible.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    fn one(origin: &str, problem: impl fmt::Display) -> Self {
        Self {
            problems: vec![format!("{origin}: {problem}")],
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses and validates a configuration without touching files or the
/// network; `origin` names the file in messages. Host-name endpoints are
/// left unresolved and the private key unread: see [`load`].
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
    let raw: RawConfig =
        toml::from_str(text).map_err(|e| ConfigErrors::one(origin, toml_problem(text, &e)))?;
    let mut p = Problems {
        origin,
        lines: Vec::new(),
    };

    let site = raw.site.unwrap_or_default();
    let name = check_name(&mut p, "site.name", site.name);
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
    let listen_port = number(
        &mut p,
        "site.listen_port",
        site.listen_port,
        0..=u16::MAX,
        "(0 picks a free port)",
    )
    .unwrap_or(DEFAULT_LISTEN_PORT);
    let mtu = number(&mut p, "site.mtu", site.mtu, MTU_RANGE, "");
    let pod_cidrs = cidrs(&mut p, "site.pod_cidrs", site.pod_cidrs);

    let mut nets: Vec<Net> = pod_cidrs
        .iter()
        .map(|&(i, net)| Net {
            owner: None,
            field: format!("site.pod_cidrs[{i}]"),
            own_ref: format!("pod_cidrs[{i}]"),
            full_ref: format!("site.pod_cidrs[{i}]"),
            net,
        })
        .collect();
    let mut names = HashMap::new();
    let mut public_keys = HashMap::new();
    let mut peers = Vec::new();
    for (i, peer) in raw.peer.into_iter().enumerate() {
        let label = match &peer.name {
            Some(name) => format!("peer[{i}] {name:?}"),
            None => format!("peer[{i}]"),
        };
        let name = check_name(&mut p, &format!("{label}: name"), peer.name);
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
        nets.extend(cidrs.iter().map(|&(k, net)| Net {
            owner: Some(i),
            field: format!("{label}: cidrs[{k}]"),
            own_ref: format!("cidrs[{k}]"),
            full_ref: format!("{label} cidrs[{k}]"),
            net,
        }));
        peers.push(PeerConfig {
            name,
            public_key: public_key.unwrap_or(PublicKey::from([0; 32])),
            cidrs: cidrs.into_iter().map(|(_, net)| net).collect(),
            endpoint,
            persistent_keepalive,
        });
    }

    check_overlaps(&mut p, &nets);
    let mtu = mtu.unwrap_or(DEFAULT_MTU);
    if mtu < MIN_MTU_IPV6 && nets.iter().any(|n| matches!(n.net, IpNet::V6(_))) {
        p.add(
            "site.mtu",
            format!(
                "{mtu} is too small for the IPv6 CIDRs configured; use {MIN_MTU_IPV6} to {}",
                MTU_RANGE.end()
            ),
        );
    }

    if !p.lines.is_empty() {
        return Err(ConfigErrors { problems: p.lines });
    }
    Ok(Config {
        site: SiteConfig {
            name,
            private_key_file,
            private_key: None,
            interface,
            listen_port,
            pod_cidrs: pod_cidrs.into_iter().map(|(_, net)| net).collect(),
            mtu,
            control_socket,
        },
        peers,
    })
}

/// Reads and parses the file at `path`, then loads the private key (creating
/// the key file if it is missing) and resolves endpoint host names.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::one(&origin, format!("cannot read the config file: {e}")))?;
    let mut config = parse(&text, &origin)?;
    let mut p = Problems {
        origin: &origin,
        lines: Vec::new(),
    };

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

    for (i, peer) in config.peers.iter_mut().enumerate() {
        let Some(endpoint) = peer.endpoint.as_mut() else {
            continue;
        };
        match endpoint.resolve() {
            Ok(addr) => endpoint.addr = Some(addr),
            Err(e) => p.add(
                format!("peer[{i}] {:?}: endpoint", peer.name),
                format!(
                    "cannot resolve host {:?}: {e}; check the name and DNS, or write an IP address",
                    endpoint.host()
                ),
            ),
        }
    }

    if p.lines.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors { problems: p.lines })
    }
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: Option<String>,
    private_key_file: Option<PathBuf>,
    interface: Option<String>,
    listen_port: Option<i64>,
    pod_cidrs: Option<Vec<String>>,
    mtu: Option<i64>,
    control_socket: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<String>,
    public_key: Option<String>,
    cidrs: Option<Vec<String>>,
    endpoint: Option<String>,
    persistent_keepalive: Option<i64>,
}

struct Problems<'a> {
    origin: &'a str,
    lines: Vec<String>,
}

impl Problems<'_> {
    fn add(&mut self, field: impl fmt::Display, problem: impl fmt::Display) {
        self.lines
            .push(format!("{}: {field}: {problem}", self.origin));
    }
}

/// A syntax or type error from the TOML parser, as one line with its position.
fn toml_problem(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', "; ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

fn check_name(p: &mut Problems<'_>, field: &str, value: Option<String>) -> String {
    match value {
        None => p.add(
            field,
            "missing; give it a name of 1 to 32 characters from a-z, 0-9 and '-'",
        ),
        Some(name)
            if (1..=MAX_NAME_LEN).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
        {
            return name;
        }
        Some(name) => p.add(
            field,
            format!("{name:?} is not a valid name; use 1 to 32 characters from a-z, 0-9 and '-'"),
        ),
    }
    String::new()
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
    let mut nets = Vec::new();
    for (i, text) in list.iter().enumerate() {
        match text.parse::<IpNet>() {
            Err(_) => p.add(
                format!("{field}[{i}]"),
                format!("{text:?} is not a valid CIDR; write address/prefix-length, e.g. \"10.1.0.0/16\""),
            ),
            Ok(net) if net != net.trunc() => p.add(
                format!("{field}[{i}]"),
                format!(
                    "{text:?} has host bits set; did you mean \"{}\"?",
                    net.trunc()
                ),
            ),
            Ok(net) => nets.push((i, net)),
        }
    }
    nets
}

/// A CIDR with the names to report it under.
struct Net {
    /// `None` for the site, `Some(i)` for peer[i].
    owner: Option<usize>,
    /// As a field of the error line: `peer[1] "x": cidrs[0]`.
    field: String,
    /// As seen from its own list: `cidrs[0]`.
    own_ref: String,
    /// As seen from elsewhere: `peer[1] "x" cidrs[0]`.
    full_ref: String,
    net: IpNet,
}

fn check_overlaps(p: &mut Problems<'_>, nets: &[Net]) {
    for (j, b) in nets.iter().enumerate() {
        for a in &nets[..j] {
            if !(a.net.contains(&b.net.network()) || b.net.contains(&a.net.network())) {
                continue;
            }
            let problem = if a.owner == b.owner {
                format!(
                    "{} overlaps {} {}; list each network once",
                    b.net, a.own_ref, a.net
                )
            } else {
                format!(
                    "{} overlaps {} {}; overlapping peer CIDRs need remapping, which is not supported yet",
                    b.net, a.full_ref, a.net
                )
            };
            p.add(&b.field, problem);
        }
    }
}

/// Checks an endpoint; on error, says what is wrong after the quoted spec.
fn parse_endpoint(spec: &str) -> Result<Endpoint, String> {
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

    // `wg pubkey` of the keys in keys.rs's known vectors.
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
                                  | cidrs = ["10.0.1.0/24"]           | peer[0] "hospital": cidrs[0]: 10.0.1.0/24 overlaps site.pod_cidrs[0] 10.0.0.0/16; overlapping peer CIDRs need remapping, which is not supported yet
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
    fn unknown_top_level_key_and_table() {
        let text = config_with("", "") + "\n[peers]\nname = \"x\"\n";
        let err = parse(&text, "c.toml").err().unwrap().to_string();
        assert!(
            err.starts_with("c.toml: line 10, column 2: unknown field `peers`"),
            "{err}"
        );
        let err = parse("colour = 1\n", "c.toml").err().unwrap().to_string();
        assert!(
            err.contains("unknown field `colour`, expected `site` or `peer`"),
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
                "causeway.toml: peer[1] \"hospital\": cidrs[0]: 10.1.0.0/16 overlaps peer[0] \"hospital\" cidrs[0] 10.1.0.0/16; overlapping peer CIDRs need remapping, which is not supported yet",
                "causeway.toml: peer[2] \"lab\": cidrs[0]: 10.3.128.0/17 overlaps peer[1] \"hospital\" cidrs[1] 10.3.0.0/16; overlapping peer CIDRs need remapping, which is not supported yet",
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
    }

    fn write_config(dir: &Path, key_file: &Path, peer: &str) -> PathBuf {
        let text = format!(
            "[site]\nname = \"pharma\"\nprivate_key_file = {:?}\npod_cidrs = [\"10.0.0.0/16\"]\n\n[[peer]]\n{peer}\ncidrs = [\"10.1.0.0/16\"]\n",
            key_file.display().to_string()
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

    #[test]
    fn endpoint_resolution_prefers_ipv4() {
        let endpoint = parse_endpoint("localhost:9").unwrap();
        assert_eq!(endpoint.host(), "localhost");
        let addr = endpoint.resolve().unwrap();
        assert_eq!(addr, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9));
    }
}
