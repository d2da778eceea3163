//! Tests of the whole config module: [`parse`] and [`load`] as the
//! daemon and `causeway invite`/`join` call them.

#![allow(clippy::unwrap_used)] // tests may panic

use super::*;
use crate::views::{self, PeerCidrs, Persisted};
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
        Some(EndpointSpec {
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
fn overlapping_peers_are_accepted_until_load_gives_views() {
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
    let cidrs: Vec<&[IpNet]> = config.peers.iter().map(|p| &p.cidrs[..]).collect();
    assert_eq!(
        cidrs,
        [
            &[net("10.0.0.0/16"), net("10.3.0.0/16")][..],
            &[net("10.0.0.0/16"), net("10.3.128.0/17")][..],
        ]
    );
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
    let a = parse(include_str!("../../../examples/site-a.toml"), "site-a.toml").unwrap();
    let b = parse(include_str!("../../../examples/site-b.toml"), "site-b.toml").unwrap();
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
    let text = include_str!("../../../examples/shared-network.toml");
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
    let key = &config.site.private_key;
    assert_eq!(
        keys::load_or_create_private_key(&key_file)
            .unwrap()
            .to_bytes(),
        key.secret().to_bytes()
    );
    let endpoint = config.peers[0].endpoint.as_ref().unwrap();
    let addr = endpoint.addr;
    assert!(addr.ip().is_loopback(), "{addr}");
    assert_eq!(addr.port(), 51820);

    // Debug shows the public half, never the private key.
    let debug = format!("{config:?}");
    assert!(
        !debug.contains(&keys::encode_private(key.secret())),
        "{debug}"
    );
    let public = keys::encode_public(&key.public_key());
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
fn restart_is_needed_for_site_settings_not_for_peers_or_views() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_remapped(dir.path(), "", &[0, 1]);
    let running = load(&path).unwrap();
    assert_eq!(needs_restart(&running, &running.clone()), None);

    let mut new = running.clone();
    new.peers.pop();
    new.site.remap_pool = vec![net("100.96.0.0/12")];
    new.site.reserved_cidrs.push(net("10.96.0.0/12"));
    new.site.state_dir = dir.path().join("elsewhere");
    new.site.private_key_file = dir.path().join("same-key-elsewhere");
    assert_eq!(needs_restart(&running, &new), None);

    type Change = fn(&mut Config);
    let changes: [(&str, Change); 8] = [
        ("[site] mtu", |c| c.site.mtu = 1300),
        ("[site] port_mapping", |c| c.site.port_mapping = false),
        ("[failover]", |c| c.failover = Failover::Keepalived),
        ("the private key", |c| {
            c.site.private_key = PrivateKey::from(keys::generate());
        }),
        ("[site] listen_port", |c| c.site.listen_port = 1),
        ("[site] metrics_listen", |c| {
            c.site.metrics_listen = Some("127.0.0.1:9469".parse().unwrap());
        }),
        ("[site] pod_cidrs", |c| {
            c.site.pod_cidrs.pop().map(drop).unwrap()
        }),
        ("[[rendezvous]]", |c| {
            c.rendezvous.push(RendezvousConfig {
                address: Endpoint {
                    spec: "198.18.0.1:7443".into(),
                    addr: "198.18.0.1:7443".parse().unwrap(),
                },
                public_key: keys::decode_public(KEY_B).unwrap(),
                stun: Endpoint {
                    spec: "198.18.0.1:3478".into(),
                    addr: "198.18.0.1:3478".parse().unwrap(),
                },
                tcp: None,
            });
        }),
    ];
    for (field, change) in changes {
        let mut new = running.clone();
        change(&mut new);
        assert_eq!(needs_restart(&running, &new), Some(field));
    }
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
         \n[[rendezvous]]\naddress = \"[2001:db8::1]:7443\"\npublic_key = \"{KEY_B}\"\nstun = \"[2001:db8::1]:3479\"\ntcp = \"off\"\n\
         \n[[rendezvous]]\naddress = \"198.18.0.2:7443\"\npublic_key = \"{KEY_B}\"\ntcp = \"198.18.0.2:8443\"\n"
    );
    let config = parse(&text.replace("KEY_A", KEY_A), "c.toml").unwrap();
    assert_eq!(config.site.advertise_endpoints.len(), 2);
    assert_eq!(config.site.stun_servers[0].host(), "stun.example");
    assert_eq!(
        config.site.metrics_listen,
        Some("127.0.0.1:9469".parse().unwrap())
    );
    assert_eq!(config.rendezvous.len(), 3);
    assert_eq!(
        config.rendezvous[0].stun.addr,
        Some("198.18.0.1:3478".parse().unwrap())
    );
    // TLS over TCP: the same host on 443 unless given, or off.
    let tcp = |i: usize| config.rendezvous[i].tcp.as_ref().map(|t| t.addr);
    assert_eq!(tcp(0), Some(Some("198.18.0.1:443".parse().unwrap())));
    assert_eq!(tcp(1), None);
    assert_eq!(tcp(2), Some(Some("198.18.0.2:8443".parse().unwrap())));
    assert_eq!(
        config.rendezvous[1].stun.addr,
        Some("[2001:db8::1]:3479".parse().unwrap())
    );

    let bad = config_with(
        "advertise_endpoints = [\"nowhere\"]\nmetrics_listen = \"x\"",
        "",
    ) + "\n[[rendezvous]]\naddress = \"198.18.0.1\"\ntcp = \"on\"\n";
    let err = parse(&bad.replace("KEY_A", KEY_A), "c.toml").err().unwrap();
    let text = err.to_string();
    for needle in [
        "advertise_endpoints[0]",
        "metrics_listen",
        "rendezvous[0]: address",
        "rendezvous[0]: public_key",
        "rendezvous[0]: tcp",
    ] {
        assert!(text.contains(needle), "{needle} not reported:\n{text}");
    }
}

/// A minimal site in `dir` with the given `[cluster]` table.
fn with_cluster(dir: &std::path::Path, cluster: &str) -> String {
    format!(
        "[site]\nname = \"a\"\nprivate_key_file = {key:?}\npod_cidrs = [\"10.0.0.0/16\"]\nstate_dir = {dir:?}\n\n{cluster}",
        key = dir.join("private.key"),
    )
}

#[test]
fn cluster_section_defaults_problems_and_secret_check() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    let text = with_cluster(
        dir.path(),
        &format!("[cluster]\nlisten = \"0.0.0.0:7473\"\nsecret_file = {secret:?}\n"),
    );
    let parsed = parse(&text, "c.toml").unwrap();
    let cluster = parsed.cluster.unwrap();
    assert_eq!(cluster.listen, "0.0.0.0:7473".parse().unwrap());
    assert_eq!(cluster.vxlan_vni, DEFAULT_VXLAN_VNI);
    assert_eq!(cluster.vxlan_port, DEFAULT_VXLAN_PORT);
    assert_eq!(cluster.vxlan_interface, DEFAULT_GATEWAY_VXLAN_INTERFACE);
    assert_eq!(cluster.route_via, None);
    assert!(
        parse(&with_cluster(dir.path(), ""), "c.toml")
            .unwrap()
            .cluster
            .is_none()
    );

    // Every problem at once.
    let bad = with_cluster(
        dir.path(),
        "[cluster]\nlisten = \"nowhere\"\nsecret_file = \"relative\"\nroute_via = \"x\"\nvxlan_vni = 0\nvxlan_port = 70000\nvxlan_interface = \"much-too-long-a-name\"\n",
    );
    let text_of = |e: ConfigErrors| e.to_string();
    let err = text_of(parse(&bad, "c.toml").unwrap_err());
    for field in [
        "cluster.listen",
        "cluster.secret_file",
        "cluster.route_via",
        "cluster.vxlan_vni",
        "cluster.vxlan_port",
        "cluster.vxlan_interface",
    ] {
        assert!(err.contains(field), "{field} not in {err}");
    }
    let missing = text_of(parse(&with_cluster(dir.path(), "[cluster]\n"), "c.toml").unwrap_err());
    assert!(missing.contains("cluster.listen") && missing.contains("cluster.secret_file"));

    // load reads the secret: missing, then too short, then good.
    let path = dir.path().join("c.toml");
    std::fs::write(&path, &text).unwrap();
    assert!(text_of(load(&path).unwrap_err()).contains("cluster.secret_file"));
    std::fs::write(&secret, "short\n").unwrap();
    assert!(text_of(load(&path).unwrap_err()).contains("fewer than 16 bytes"));
    std::fs::write(&secret, "a long enough cluster secret\n").unwrap();
    let running = load(&path).unwrap();

    // Any change of [cluster] needs a restart.
    let mut new = running.clone();
    new.cluster.as_mut().unwrap().vxlan_port = 4999;
    assert_eq!(needs_restart(&running, &new), Some("[cluster]"));
    let mut new = running.clone();
    new.cluster = None;
    assert_eq!(needs_restart(&running, &new), Some("[cluster]"));
}

#[test]
fn failover_election() {
    let base = config_with("", "");
    assert_eq!(parse(&base, "c").unwrap().failover, Failover::None);
    let keepalived = format!("{base}\n[failover]\nelection = \"keepalived\"\n");
    let config = parse(&keepalived, "c").unwrap();
    assert_eq!(config.failover, Failover::Keepalived);
    let kubernetes = format!("{base}\n[failover]\nelection = \"kubernetes\"\n");
    assert_eq!(
        parse(&kubernetes, "c").unwrap().failover,
        Failover::Kubernetes(KubernetesLease {
            name: None,
            namespace: None,
            identity: None,
            timing: crate::election::Timing::default(),
        })
    );
    let tuned = format!(
        "{base}\n[failover]\nelection = \"kubernetes\"\nlease_name = \"gw\"\nidentity = \"a-0\"\n\
         lease_duration_ms = 1000\nrenew_deadline_ms = 700\nretry_period_ms = 200\n"
    );
    let Failover::Kubernetes(lease) = parse(&tuned, "c").unwrap().failover else {
        panic!("not kubernetes");
    };
    assert_eq!(
        (lease.name.as_deref(), lease.identity.as_deref()),
        (Some("gw"), Some("a-0"))
    );
    assert_eq!(
        lease.timing.retry_period,
        std::time::Duration::from_millis(200)
    );
    for (table, expected) in [
        (
            "[failover]\nelection = \"keepalived\"\nlease_name = \"gw\"",
            "failover.lease_name: only for election = \"kubernetes\"",
        ),
        (
            "[failover]\nelection = \"kubernetes\"\nlease_duration_ms = 1500",
            "lease_duration_ms = 1500: must be a whole number of seconds",
        ),
        (
            "[failover]\nelection = \"kubernetes\"\nrenew_deadline_ms = 2000",
            "renew_deadline_ms = 2000 must be less than lease_duration_ms = 2000",
        ),
        (
            "[failover]\nelection = \"kubernetes\"\nretry_period_ms = -5",
            "failover.retry_period_ms: -5 is negative",
        ),
        (
            "[failover]\nelection = \"raft\"",
            "failover.election: unknown election \"raft\"",
        ),
        ("[failover]", "failover.election: missing"),
        (
            "[failover]\nelection = \"keepalived\"\nvip = 1",
            "unknown field `vip`",
        ),
    ] {
        let err = parse(&format!("{base}\n{table}\n"), "c").unwrap_err();
        assert!(err.to_string().contains(expected), "{table}: {err}");
    }
}

#[test]
fn port_mapping_is_on_unless_turned_off() {
    let on = parse(&config_with("", "").replace("KEY_A", KEY_A), "c.toml").unwrap();
    assert!(on.site.port_mapping);
    let off = config_with("port_mapping = false", "").replace("KEY_A", KEY_A);
    assert!(!parse(&off, "c.toml").unwrap().site.port_mapping);
    // Not a boolean: the error names the file, line and what it wanted.
    let bad = config_with("port_mapping = \"yes\"", "").replace("KEY_A", KEY_A);
    let err = parse(&bad, "c.toml").err().unwrap().to_string();
    assert!(
        err.contains("c.toml") && err.contains("expected a boolean"),
        "{err}"
    );
}
