//! [`parse`]: from the file's text to a [`Config<Parsed>`], without touching
//! files or the network. One function per section; each records every
//! problem it finds and goes on, so that all of them are reported at once.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use causeway_common::problems::Problems;
use ipnet::IpNet;

use super::raw::{RawAllow, RawConfig, RawFailover, RawPeer, RawRendezvous, RawSite};
use super::{
    AllowRule, Config, ConfigErrors, DEFAULT_INTERFACE, DEFAULT_LISTEN_PORT, DEFAULT_MTU,
    DEFAULT_PRIVATE_KEY_FILE, DEFAULT_REMAP_POOL, DEFAULT_STATE_DIR, DEFAULT_STUN_PORT,
    DEFAULT_TCP_PORT, EndpointSpec, Failover, KubernetesLease, MIN_MTU_IPV6, MTU_RANGE, Parsed,
    PeerConfig, Proto, RendezvousConfig, SiteConfig, default_control_socket, default_uapi_socket,
};
use crate::keys::{self, PublicKey};
use crate::views::overlaps;

/// Parses and validates a configuration without touching files or the
/// network; `origin` names the file in messages. Host-name endpoints are
/// left unresolved, the private key unread and views not given: see
/// [`load`](super::load).
pub fn parse(text: &str, origin: &str) -> Result<Config<Parsed>, ConfigErrors> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigErrors::toml(origin, text, &e))?;
    let mut p = Problems::new(origin);
    let (site, exported) = site(&mut p, raw.site.unwrap_or_default());
    let rendezvous = raw
        .rendezvous
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| rendezvous(&mut p, i, r))
        .collect();
    let failover = raw.failover.map_or(Failover::None, |f| failover(&mut p, f));
    let mut taken = Taken::default();
    let peers: Vec<PeerConfig<Parsed>> = raw
        .peer
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            peer(
                &mut p,
                i,
                raw,
                exported.then_some(&site.pod_cidrs),
                &mut taken,
            )
        })
        .collect();

    let any_ipv6 = site
        .pod_cidrs
        .iter()
        .chain(peers.iter().flat_map(|peer| &peer.cidrs))
        .any(|net| matches!(net, IpNet::V6(_)));
    if site.mtu < MIN_MTU_IPV6 && any_ipv6 {
        p.add(
            "site.mtu",
            format!(
                "{} is too small for the IPv6 CIDRs configured; use {MIN_MTU_IPV6} to {}",
                site.mtu,
                MTU_RANGE.end()
            ),
        );
    }

    let cluster = raw
        .cluster
        .and_then(|raw| super::cluster::cluster(&mut p, raw));

    p.finish()?;
    Ok(Config {
        site,
        peers,
        rendezvous,
        cluster,
        failover,
    })
}

/// The `[failover]` table.
fn failover(p: &mut Problems<'_>, raw: RawFailover) -> Failover {
    const ELECTIONS: &str = "\"keepalived\" or \"kubernetes\"";
    let RawFailover {
        election,
        lease_name,
        lease_namespace,
        identity,
        lease_duration_ms,
        renew_deadline_ms,
        retry_period_ms,
    } = raw;
    let lease_keys = [
        ("lease_name", lease_name.is_some()),
        ("lease_namespace", lease_namespace.is_some()),
        ("identity", identity.is_some()),
        ("lease_duration_ms", lease_duration_ms.is_some()),
        ("renew_deadline_ms", renew_deadline_ms.is_some()),
        ("retry_period_ms", retry_period_ms.is_some()),
    ];
    match election.as_deref() {
        Some("keepalived") => {
            for (key, _) in lease_keys.iter().filter(|(_, given)| *given) {
                p.add(
                    format!("failover.{key}"),
                    "only for election = \"kubernetes\"; remove it",
                );
            }
            Failover::Keepalived
        }
        Some("kubernetes") => {
            let default = crate::election::Timing::default();
            let mut ms = |key: &str, value: Option<i64>, default: std::time::Duration| match value {
                None => default,
                Some(v) => match u64::try_from(v) {
                    Ok(v) => std::time::Duration::from_millis(v),
                    Err(_) => {
                        p.add(format!("failover.{key}"), format!("{v} is negative"));
                        default
                    }
                },
            };
            let timing = crate::election::Timing::new(
                ms(
                    "lease_duration_ms",
                    lease_duration_ms,
                    default.lease_duration,
                ),
                ms(
                    "renew_deadline_ms",
                    renew_deadline_ms,
                    default.renew_deadline,
                ),
                ms("retry_period_ms", retry_period_ms, default.retry_period),
            );
            for problem in timing.problems() {
                p.add("failover", problem);
            }
            Failover::Kubernetes(KubernetesLease {
                name: lease_name,
                namespace: lease_namespace,
                identity,
                timing,
            })
        }
        Some(other) => {
            p.add(
                "failover.election",
                format!("unknown election {other:?}; use {ELECTIONS}"),
            );
            Failover::None
        }
        None => {
            p.add(
                "failover.election",
                format!("missing; say how the active gateway is chosen: {ELECTIONS}"),
            );
            Failover::None
        }
    }
}

/// The `[site]` table, and whether all of its `pod_cidrs` are valid (allow
/// rules are checked against them only then, so that one mistake is not
/// reported once per rule).
fn site(p: &mut Problems<'_>, site: RawSite) -> (SiteConfig<Parsed>, bool) {
    let name = p.name("site.name", site.name).unwrap_or_default();
    let interface = site.interface.unwrap_or_else(|| DEFAULT_INTERFACE.into());
    if let Err(why) = check_interface(&interface) {
        p.add(
            "site.interface",
            format!("{interface:?} is not a valid interface name: {why}"),
        );
    }
    let private_key_file = absolute_path(
        p,
        "site.private_key_file",
        site.private_key_file,
        DEFAULT_PRIVATE_KEY_FILE.into(),
    );
    let control_socket = absolute_path(
        p,
        "site.control_socket",
        site.control_socket,
        default_control_socket(&interface),
    );
    let uapi_socket = absolute_path(
        p,
        "site.uapi_socket",
        site.uapi_socket,
        default_uapi_socket(&interface),
    );
    let listen_port = number(
        p,
        "site.listen_port",
        site.listen_port,
        0..=u16::MAX,
        "(0 picks a free port)",
    )
    .unwrap_or(DEFAULT_LISTEN_PORT);
    let mtu = number(p, "site.mtu", site.mtu, MTU_RANGE, "").unwrap_or(DEFAULT_MTU);
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
    let stun_servers: Vec<EndpointSpec> = site
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
    let pod_cidrs_given = site.pod_cidrs.as_ref().map_or(0, Vec::len);
    let pod_cidrs = cidrs(p, "site.pod_cidrs", site.pod_cidrs);
    check_own_overlaps(p, "site.", "pod_cidrs", &pod_cidrs);
    let reserved_cidrs = cidr_list(
        p,
        "site.reserved_cidrs",
        site.reserved_cidrs.unwrap_or_default(),
    );
    check_own_overlaps(p, "site.", "reserved_cidrs", &reserved_cidrs);
    let default_pool = site.remap_pool.is_none();
    let remap_pool = cidr_list(
        p,
        "site.remap_pool",
        site.remap_pool
            .unwrap_or_else(|| DEFAULT_REMAP_POOL.map(String::from).to_vec()),
    );
    check_own_overlaps(p, "site.", "remap_pool", &remap_pool);
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
        p,
        "site.state_dir",
        site.state_dir,
        DEFAULT_STATE_DIR.into(),
    );
    let exported = pod_cidrs_given > 0 && pod_cidrs.len() == pod_cidrs_given;
    let site = SiteConfig {
        name,
        private_key_file,
        private_key: (),
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
        port_mapping: site.port_mapping.unwrap_or(true),
        metrics_listen,
    };
    (site, exported)
}

/// The `i`th `[[rendezvous]]` table; `None` if it is not usable.
fn rendezvous(
    p: &mut Problems<'_>,
    i: usize,
    r: RawRendezvous,
) -> Option<RendezvousConfig<Parsed>> {
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
    let tcp = match (r.tcp.as_deref(), &address) {
        (Some("off"), _) => Some(None),
        (Some(spec), _) => parse_endpoint(spec)
            .map_err(|why| {
                p.add(
                    format!("{label}: tcp"),
                    format!("{spec:?} {why}, or \"off\""),
                )
            })
            .ok()
            .map(Some),
        (None, Some(address)) => parse_endpoint(&default_tcp(address)).ok().map(Some),
        (None, None) => None,
    };
    Some(RendezvousConfig {
        address: address?,
        public_key: public_key?,
        stun: stun?,
        tcp: tcp?,
    })
}

/// The names and public keys of the peers parsed so far: each must be
/// unique.
#[derive(Default)]
struct Taken {
    /// Name → index of the peer that has it.
    names: HashMap<String, usize>,
    /// Public key → label of the peer that has it.
    public_keys: HashMap<[u8; 32], String>,
}

/// The `i`th `[[peer]]` table; `exported` is the site's `pod_cidrs` when
/// they are all valid. Every problem is recorded; what is returned then is
/// incomplete, but [`parse`] returns no config at all.
fn peer(
    p: &mut Problems<'_>,
    i: usize,
    peer: RawPeer,
    exported: Option<&Vec<IpNet>>,
    taken: &mut Taken,
) -> PeerConfig<Parsed> {
    let label = match &peer.name {
        Some(name) => format!("peer[{i}] {name:?}"),
        None => format!("peer[{i}]"),
    };
    let name = p
        .name(format!("{label}: name"), peer.name)
        .unwrap_or_default();
    if !name.is_empty() {
        match taken.names.entry(name.clone()) {
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
        match taken.public_keys.entry(key.to_bytes()) {
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
        p,
        &format!("{label}: persistent_keepalive"),
        peer.persistent_keepalive,
        1..=u16::MAX,
        "seconds (leave it out to send no keepalives)",
    );
    let cidrs = cidrs(p, &format!("{label}: cidrs"), peer.cidrs);
    check_own_overlaps(p, &format!("{label}: "), "cidrs", &cidrs);
    let allow = peer
        .allow
        .into_iter()
        .enumerate()
        .filter_map(|(k, rule)| {
            allow_rule(
                p,
                &format!("{label}: allow[{k}]"),
                rule,
                exported.map(Vec::as_slice),
            )
        })
        .collect();
    PeerConfig {
        name,
        public_key: public_key.unwrap_or(PublicKey::from([0; 32])),
        cidrs: cidrs.into_iter().map(|(_, net)| net).collect(),
        views: (),
        allow,
        endpoint,
        persistent_keepalive,
    }
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
pub(crate) fn parse_cidr(text: &str) -> Result<IpNet, String> {
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

/// The STUN address of a rendezvous whose config names none: its host, on
/// [`DEFAULT_STUN_PORT`].
pub(crate) fn default_stun(rendezvous: &EndpointSpec) -> String {
    format!("{}:{DEFAULT_STUN_PORT}", bracket(rendezvous.host()))
}

/// The TLS-over-TCP address of a rendezvous whose config names none: its
/// host, on [`DEFAULT_TCP_PORT`].
pub(crate) fn default_tcp(rendezvous: &EndpointSpec) -> String {
    format!("{}:{DEFAULT_TCP_PORT}", bracket(rendezvous.host()))
}

/// A host as it goes before `:port`: IPv6 addresses in brackets.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Checks an endpoint; on error, says what is wrong after the quoted spec.
pub(crate) fn parse_endpoint(spec: &str) -> Result<EndpointSpec, String> {
    const FORMS: &str = "write \"host:port\", \"192.0.2.1:port\" or \"[2001:db8::1]:port\"";
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err("has port 0; use a port from 1 to 65535".into());
        }
        return Ok(EndpointSpec {
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
    Ok(EndpointSpec {
        spec: spec.into(),
        addr: None,
    })
}
