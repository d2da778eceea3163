//! The bounded fuzz pass over every parser of untrusted input in the
//! daemon: IP packets (parse, remap both ways, MSS clamp, too-big reply,
//! allow-list), invite tokens, config files, UAPI requests, WireGuard
//! datagrams into the site core, and inner packets from an authenticated
//! peer through the core's whole receive path. Targets are in
//! `fuzz/targets.rs` (shared with the cargo-fuzz project), the driver in
//! `fuzz/driver.rs` at the top of the repository; seed corpora in
//! `fuzz/corpus/<target>/`. `CAUSEWAY_FUZZ_SECONDS=N` turns each target into
//! an N-second run with a random seed (docs/fuzzing.md).

#[path = "../../fuzz/driver.rs"]
mod driver;
#[path = "fuzz/targets.rs"]
mod targets;

use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use boringtun::noise::{Tunn, TunnResult};
use driver::{Rng, Target};
use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, TcpOptionElement};
use x25519_dalek::{PublicKey, StaticSecret};

/// A well-formed IP packet between two of the interesting addresses (same
/// family): TCP (SYN with MSS, or ACK), UDP, ICMP echo, or an ICMP error
/// quoting another packet.
fn gen_ip(rng: &mut Rng) -> Vec<u8> {
    let addrs = targets::addresses();
    let v6 = rng.chance(2);
    let pool: Vec<IpAddr> = addrs.into_iter().filter(|a| a.is_ipv6() == v6).collect();
    let (src, dst) = (*rng.pick(&pool), *rng.pick(&pool));
    ip_between(rng, src, dst, true)
}

fn ip_between(rng: &mut Rng, src: IpAddr, dst: IpAddr, may_quote: bool) -> Vec<u8> {
    let builder = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("same family"),
    };
    let payload = {
        let max = if rng.chance(8) { 1600 } else { 64 };
        let n = rng.below(max);
        rng.bytes(n)
    };
    let (sport, dport) = (rng.next_u64() as u16, rng.next_u64() as u16);
    let mut out = Vec::new();
    let written = match rng.below(if may_quote { 5 } else { 4 }) {
        0 => builder
            .tcp(sport, dport, rng.next_u64() as u32, 65535)
            .syn()
            .options(&[
                TcpOptionElement::MaximumSegmentSize(rng.next_u64() as u16),
                TcpOptionElement::Noop,
                TcpOptionElement::WindowScale(7),
            ])
            .expect("options")
            .write(&mut out, &payload),
        1 => builder
            .tcp(sport, dport, 1, 100)
            .ack(2)
            .write(&mut out, &payload),
        2 => builder.udp(sport, dport).write(&mut out, &payload),
        3 if src.is_ipv4() => builder
            .icmpv4_echo_request(sport, dport)
            .write(&mut out, &payload),
        3 => builder
            .icmpv6_echo_request(sport, dport)
            .write(&mut out, &payload),
        _ => {
            // An error about a packet that went the other way.
            let mut quoted = ip_between(rng, dst, src, false);
            quoted.truncate(28 + rng.below(100));
            if src.is_ipv4() {
                builder
                    .icmpv4(Icmpv4Type::DestinationUnreachable(
                        DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1280 },
                    ))
                    .write(&mut out, &quoted)
            } else {
                builder
                    .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
                    .write(&mut out, &quoted)
            }
        }
    };
    written.expect("packet builds");
    out
}

fn gen_packet(rng: &mut Rng) -> Vec<u8> {
    let mut out = vec![rng.byte()];
    out.extend(gen_ip(rng));
    out
}

/// An inner packet as the peer would send it: from its real networks to
/// our pods, mostly.
fn gen_inner(rng: &mut Rng) -> Vec<u8> {
    let v6 = rng.chance(2);
    // Mostly the expected address, sometimes another one.
    let pick = |rng: &mut Rng, expected: &str, other: &str| -> IpAddr {
        let a = if rng.chance(6) { other } else { expected };
        a.parse().expect("address")
    };
    let (src, dst) = if v6 {
        (
            pick(rng, "fd00:1::5", "fd00::7"),
            pick(rng, "fd00::9", "2001:db8::1"),
        )
    } else {
        (
            pick(rng, "10.1.2.3", "10.0.0.7"),
            pick(rng, "10.0.0.9", "192.0.2.1"),
        )
    };
    ip_between(rng, src, dst, true)
}

fn key(rng: &mut Rng) -> String {
    let secret = StaticSecret::from(<[u8; 32]>::try_from(rng.bytes(32)).expect("32"));
    causeway::keys::encode_public(&PublicKey::from(&secret))
}

fn invite_json(rng: &mut Rng) -> String {
    let rendezvous = (0..rng.below(3))
        .map(|i| {
            format!(
                r#"{{"address":"rv{i}.example.net:7443","public_key":"{}"{}}}"#,
                key(rng),
                if rng.chance(2) {
                    r#","stun":"[2001:db8::1]:3479""#
                } else {
                    ""
                }
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    format!(
        r#"{{"v":1,"site":"site-{}","public_key":"{}","pod_cidrs":["10.{}.0.0/16","fd00:{}::/64"],"endpoints":["192.0.2.{}:51820","gw.example.org:51820"],"rendezvous":[{rendezvous}]}}"#,
        rng.below(100),
        key(rng),
        rng.below(256),
        rng.below(65536),
        rng.below(256)
    )
}

fn gen_invite(rng: &mut Rng) -> Vec<u8> {
    let json = invite_json(rng);
    if rng.chance(2) {
        let mut out = vec![1];
        out.extend_from_slice(json.as_bytes());
        out
    } else {
        let mut out = vec![0];
        out.extend_from_slice(format!("cw1.{}", URL_SAFE_NO_PAD.encode(json)).as_bytes());
        out
    }
}

fn gen_config(rng: &mut Rng) -> Vec<u8> {
    let mut text = format!(
        "[site]\nname = \"s{}\"\npod_cidrs = [\"10.0.0.0/16\"]\nlisten_port = {}\nmtu = {}\n",
        rng.below(10),
        rng.below(65536),
        576 + rng.below(9000)
    );
    for i in 0..rng.below(4) {
        text.push_str(&format!(
            "\n[[peer]]\nname = \"p{i}\"\npublic_key = \"{}\"\ncidrs = [\"10.{}.0.0/16\"]\nendpoint = \"192.0.2.{}:51820\"\n",
            key(rng),
            rng.below(256),
            rng.below(256)
        ));
        if rng.chance(2) {
            text.push_str(
                "[[peer.allow]]\ncidr = \"10.0.0.0/24\"\nproto = \"tcp\"\nports = \"80-443\"\n",
            );
        }
    }
    if rng.chance(2) {
        text.push_str(&format!(
            "\n[[rendezvous]]\naddress = \"rv.example.net:7443\"\npublic_key = \"{}\"\n",
            key(rng)
        ));
    }
    text.into_bytes()
}

fn gen_uapi(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(3) {
        if rng.chance(2) {
            out.extend_from_slice(b"get=1\n\n");
        } else {
            out.extend_from_slice(b"set=1\n");
            for _ in 0..rng.below(4) {
                let line = *rng.pick(&[
                    &b"public_key=0000\n"[..],
                    b"endpoint=[::1]:9\n",
                    b"allowed_ip=0.0.0.0/0\n",
                    b"replace_peers=true\n",
                ]);
                out.extend_from_slice(line);
            }
            out.push(b'\n');
        }
    }
    out
}

/// A WireGuard message of some peer (not necessarily ours): a handshake
/// initiation, or a message type with the right size and random content.
fn gen_wireguard(rng: &mut Rng) -> Vec<u8> {
    let mut out = vec![rng.byte()];
    match rng.below(3) {
        0 => {
            let secret = if rng.chance(2) {
                targets::PEER_SECRET
            } else {
                <[u8; 32]>::try_from(rng.bytes(32)).expect("32")
            };
            let mut tunn = Tunn::new(
                StaticSecret::from(secret),
                PublicKey::from(&StaticSecret::from(targets::SITE_SECRET)),
                None,
                None,
                rng.below(1000) as u32,
                None,
            );
            let mut buf = [0u8; 256];
            if let TunnResult::WriteToNetwork(init) =
                tunn.format_handshake_initiation(&mut buf, false)
            {
                out.extend_from_slice(init);
            }
        }
        _ => {
            let (kind, len) = *rng.pick(&[(1u8, 148usize), (2, 92), (3, 64), (4, 32), (4, 96)]);
            out.extend_from_slice(&[kind, 0, 0, 0]);
            // Data and responses name a receiver: sometimes our peer's index.
            let receiver = if rng.chance(2) {
                1u32 << 8
            } else {
                rng.next_u64() as u32
            };
            out.extend_from_slice(&receiver.to_le_bytes());
            out.extend(rng.bytes(len - 8));
        }
    }
    out
}

const PACKET_DICT: &[&[u8]] = &[
    &[0x45, 0x00],
    &[0x60, 0x00, 0x00, 0x00],
    &[0x40, 0x00],
    &[0x20, 0x00],
    &[0x00, 0x01],
    &[6],
    &[17],
    &[1],
    &[58],
    &[44],
    &[0, 0],
    &[2, 4, 0x05, 0xb4],
    &[10, 1],
    &[100, 64],
    &[0xfd, 0x00],
];
const INVITE_DICT: &[&[u8]] = &[
    b"cw1.",
    b"cw2.",
    b"\"v\":1",
    b"\"site\":",
    b"\"public_key\":",
    b"\"pod_cidrs\":[",
    b"\"endpoints\":[",
    b"\"rendezvous\":[",
    b"\"stun\":null",
    b"\"0.0.0.0/0\"",
    b"\"::/0\"",
    b"\"[::1]:0\"",
    b"18446744073709551616",
    b"\\ud800",
    b"=",
];
const CONFIG_DICT: &[&[u8]] = &[
    b"[site]\n",
    b"[[peer]]\n",
    b"[[peer.allow]]\n",
    b"[[rendezvous]]\n",
    b"cidrs = [\"0.0.0.0/0\"]\n",
    b"pod_cidrs = [\"::/0\"]\n",
    b"remap_pool = [\"10.0.0.0/32\"]\n",
    b"mtu = 0\n",
    b"listen_port = 65536\n",
    b"ports = \"0-65535\"\n",
    b"persistent_keepalive = 0\n",
    b"endpoint = \"[::1]:0\"\n",
    b"stun_servers = [\"x:1\"]\n",
    b"advertise_endpoints = []\n",
    b"= \"\"\n",
    b"'''",
    b"\"\\u0000\"",
    b"9223372036854775808",
];
const UAPI_DICT: &[&[u8]] = &[
    b"get=1\n",
    b"set=1\n",
    b"\n",
    b"=",
    b"public_key=",
    b"\r\n",
    &[0xff],
];
const WIREGUARD_DICT: &[&[u8]] = &[
    &[1, 0, 0, 0],
    &[2, 0, 0, 0],
    &[3, 0, 0, 0],
    &[4, 0, 0, 0],
    &[0, 1, 0, 0],
];

fn run(
    name: &str,
    iterations: u64,
    dict: &[&[u8]],
    generate: fn(&mut Rng) -> Vec<u8>,
    check: fn(&[u8]) -> bool,
) -> driver::Report {
    let t = Target {
        name,
        iterations,
        dict,
    };
    driver::run(&t, generate, check)
}

#[test]
fn fuzz_packet() {
    let report = run("packet", 200_000, PACKET_DICT, gen_packet, targets::packet);
    assert!(report.accepted > 0);
}

#[test]
fn fuzz_invite() {
    let report = run("invite", 40_000, INVITE_DICT, gen_invite, targets::invite);
    assert!(report.accepted > 0);
}

#[test]
fn fuzz_config() {
    let report = run("config", 20_000, CONFIG_DICT, gen_config, targets::config);
    assert!(report.accepted > 0);
}

#[test]
fn fuzz_uapi() {
    let report = run("uapi", 40_000, UAPI_DICT, gen_uapi, targets::uapi);
    assert!(report.accepted > 0);
}

#[test]
fn fuzz_wireguard_datagram() {
    run(
        "wireguard_datagram",
        40_000,
        WIREGUARD_DICT,
        gen_wireguard,
        targets::wireguard_datagram,
    );
}

#[test]
fn fuzz_inner_packet() {
    let report = run(
        "inner_packet",
        50_000,
        PACKET_DICT,
        gen_inner,
        targets::inner_packet,
    );
    assert!(report.accepted > 0);
}

/// Writes the seed corpus: real messages from the generators, plus the
/// example configs. Run by hand after a format change:
/// `cargo test -p causeway --test fuzz -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes fuzz/corpus"]
fn write_seed_corpus() {
    type Generator = fn(&mut Rng) -> Vec<u8>;
    let mut rng = Rng::new(1);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("fuzz/corpus");
    let targets: [(&str, Generator); 6] = [
        ("packet", gen_packet),
        ("invite", gen_invite),
        ("config", gen_config),
        ("uapi", gen_uapi),
        ("wireguard_datagram", gen_wireguard),
        ("inner_packet", gen_inner),
    ];
    for (name, generate) in targets {
        std::fs::create_dir_all(dir.join(name)).expect("mkdir");
        for i in 0..4 {
            std::fs::write(dir.join(name).join(format!("seed-{i}")), generate(&mut rng))
                .expect("write");
        }
    }
    for example in [
        "examples/site-a.toml",
        "examples/site-b.toml",
        "examples/shared-network.toml",
    ] {
        let name = example.rsplit('/').next().expect("name");
        std::fs::copy(root.join(example), dir.join("config").join(name)).expect("copy");
    }
}
