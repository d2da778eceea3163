//! The bounded fuzz pass over every parser of untrusted input in this crate:
//! STUN, path probes, rendezvous control frames (both directions, any
//! read size), relay datagrams and their reassembly, TLS-over-TCP records.
//! Each target starts from
//! its seed corpus (`fuzz/corpus/<target>/`), then runs mutated corpus
//! entries, structure-aware generated messages and random bytes through the
//! entry points in `causeway_nat::fuzz`, which assert the properties.
//! `CAUSEWAY_FUZZ_SECONDS=N` turns each target into an N-second run with a
//! random seed (docs/fuzzing.md).

#[path = "../../fuzz/driver.rs"]
mod driver;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use causeway_common::keys;
use causeway_nat::{fuzz, probe, stun};
use driver::{Rng, Target};

fn tx(rng: &mut Rng) -> stun::TransactionId {
    let mut t = [0u8; 12];
    t.iter_mut().for_each(|b| *b = rng.byte());
    stun::TransactionId(t)
}

fn addr(rng: &mut Rng) -> SocketAddr {
    let ip = if rng.chance(2) {
        IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(
            (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()),
        ))
    };
    SocketAddr::new(ip, rng.next_u64() as u16)
}

fn gen_stun(rng: &mut Rng) -> Vec<u8> {
    let mut out = [0u8; stun::MAX_ENCODED_LEN];
    let t = tx(rng);
    let n = match rng.below(3) {
        0 => stun::encode_binding_request(&t, &mut out),
        1 => stun::encode_binding_success(&t, addr(rng), &mut out),
        _ => stun::encode_binding_error(&t, 300 + rng.below(400) as u16, &mut out),
    };
    out[..n].to_vec()
}

fn gen_probe(rng: &mut Rng) -> Vec<u8> {
    let (_, peer) = fuzz::probe_keys();
    let mut out = [0u8; probe::MAX_PROBE_LEN];
    let t = tx(rng);
    let n = if rng.chance(2) {
        probe::encode_ping(peer, &t, rng.next_u64(), &mut out)
    } else {
        probe::encode_pong(peer, &t, addr(rng), &mut out)
    };
    out[..n].to_vec()
}

fn key(rng: &mut Rng) -> String {
    let mut k = [0u8; 32];
    k.iter_mut().for_each(|b| *b = rng.byte());
    keys::encode_bytes(&k)
}

/// One control message of either direction, as JSON.
fn message(rng: &mut Rng) -> String {
    let addrs = |rng: &mut Rng| {
        let n = rng.below(4);
        (0..n)
            .map(|_| format!("\"{}\"", addr(rng)))
            .collect::<Vec<_>>()
            .join(",")
    };
    match rng.below(5) {
        0 => format!(
            r#"{{"type":"hello","version":{},"site_key":"{}","rendezvous_key":"{}","proof":"{}"}}"#,
            rng.below(3),
            key(rng),
            key(rng),
            key(rng)
        ),
        1 => {
            let peers = (0..rng.below(4))
                .map(|_| format!("\"{}\"", key(rng)))
                .collect::<Vec<_>>()
                .join(",");
            format!(
                r#"{{"type":"register","peers":[{peers}],"candidates":[{}]}}"#,
                addrs(rng)
            )
        }
        2 => format!(
            r#"{{"type":"welcome","proof":"{}","relay_id":{},"observed":"{}"}}"#,
            key(rng),
            rng.next_u64() as u32,
            addr(rng)
        ),
        3 => format!(
            r#"{{"type":"reject","code":{},"message":"no \u00e9 \"x\""}}"#,
            rng.below(10)
        ),
        _ => format!(
            r#"{{"type":"peer_update","peer":"{}","relay_id":{},"candidates":[{}],"online":{}}}"#,
            key(rng),
            rng.next_u64() as u32,
            addrs(rng),
            rng.chance(2)
        ),
    }
}

fn gen_frames(rng: &mut Rng) -> Vec<u8> {
    let mut out = vec![rng.byte()];
    for _ in 0..1 + rng.below(3) {
        let body = message(rng);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// A relay program (see `causeway_nat::fuzz::relay`).
fn gen_relay(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(6) {
        match rng.below(3) {
            0 => {
                // A plausible datagram: kind 1, small ids, consistent bounds.
                let total = 1 + rng.below(3000) as u16;
                let offset = rng.below(usize::from(total)) as u16;
                let len = (1 + rng.below(100)).min(usize::from(total - offset));
                let mut d = vec![1];
                d.extend_from_slice(&(rng.below(4) as u32).to_be_bytes());
                d.extend_from_slice(&(rng.below(4) as u32).to_be_bytes());
                d.extend_from_slice(&total.to_be_bytes());
                d.extend_from_slice(&offset.to_be_bytes());
                d.extend(rng.bytes(len));
                d.truncate(255);
                out.extend_from_slice(&[0, d.len() as u8, rng.byte()]);
                out.extend(d);
            }
            1 => out.extend_from_slice(&[1, rng.byte()]),
            _ => {
                let max = if rng.chance(8) { 65536 } else { 3000 };
                let len = rng.below(max) as u16;
                out.extend_from_slice(&[2]);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&[rng.byte(), rng.byte()]);
                out.extend(rng.bytes(usize::from(len)));
            }
        }
    }
    out
}

const STUN_DICT: &[&[u8]] = &[
    &[0x21, 0x12, 0xa4, 0x42],
    &[0x00, 0x20, 0x00, 0x08],
    &[0x00, 0x01, 0x00, 0x08],
    &[0x00, 0x09, 0x00, 0x04],
    &[0x80, 0x28, 0x00, 0x04],
    &[0x00, 0x08, 0x00, 0x14],
    &[0x01, 0x01],
    &[0x01, 0x11],
];
const PROBE_DICT: &[&[u8]] = &[&[0xca, b'c', b'w', 1], &[1], &[2], &[3]];
const FRAME_DICT: &[&[u8]] = &[
    b"\"type\":",
    b"\"hello\"",
    b"\"register\"",
    b"\"welcome\"",
    b"\"peer_update\"",
    b"\"reject\"",
    b"null",
    b"[]",
    b"{}",
    b"\\u0000",
    b"\"[::1]:1\"",
    b"1e999",
    b"-1",
    b"4294967296",
    &[0, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0xff],
    &[0, 0x10, 0, 0],
];
const RELAY_DICT: &[&[u8]] = &[&[0, 14, 0, 1], &[2, 0xff, 0xff], &[1, 0xff], &[0xff, 0xff]];

#[test]
fn fuzz_stun() {
    let t = Target {
        name: "stun",
        iterations: 30_000,
        dict: STUN_DICT,
    };
    driver::run(&t, gen_stun, fuzz::stun);
}

/// A PCP MAP answer or a NAT-PMP answer, mostly for the target's own
/// nonce and port so that the mapper's deeper checks run.
fn gen_portmap(rng: &mut Rng) -> Vec<u8> {
    let mut d = match rng.below(3) {
        0 => {
            let mut d = vec![2, 0x81, 0, rng.below(4) as u8];
            d.extend(rng.bytes(8)); // lifetime, epoch
            d.extend([0; 12]);
            d.extend(fuzz::PORTMAP_NONCE);
            d.extend([17, 0, 0, 0]);
            d.extend(fuzz::PORTMAP_PORT.to_be_bytes());
            d.extend(rng.bytes(2));
            d.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
            d.extend(rng.bytes(4));
            d
        }
        1 => {
            let mut d = vec![0, 128, 0, rng.below(2) as u8];
            d.extend(rng.bytes(8));
            d
        }
        _ => {
            let mut d = vec![0, 129, 0, rng.below(2) as u8];
            d.extend(rng.bytes(4));
            d.extend(fuzz::PORTMAP_PORT.to_be_bytes());
            d.extend(rng.bytes(6));
            d
        }
    };
    if rng.chance(4) {
        d.truncate(rng.below(d.len() + 1));
    }
    d
}

#[test]
fn fuzz_portmap() {
    let t = Target {
        name: "portmap",
        iterations: 20_000,
        dict: &[
            &[2, 0x81],
            &[0, 128],
            &[0, 129],
            &[0, 0, 0, 1],
            &[17, 0, 0, 0],
        ],
    };
    let report = driver::run(&t, gen_portmap, fuzz::portmap);
    assert!(report.accepted > 0);
}

#[test]
fn fuzz_probe() {
    let t = Target {
        name: "probe",
        iterations: 20_000,
        dict: PROBE_DICT,
    };
    let report = driver::run(&t, gen_probe, fuzz::probe);
    // The generator's valid probes must get through: the target checks
    // something beyond "no panic".
    assert!(report.accepted > 0);
}

#[test]
fn fuzz_rendezvous_frames() {
    let t = Target {
        name: "rendezvous_frames",
        iterations: 10_000,
        dict: FRAME_DICT,
    };
    let report = driver::run(&t, gen_frames, fuzz::rendezvous_frames);
    assert!(report.accepted > 0);
}

#[test]
fn fuzz_relay() {
    let t = Target {
        name: "relay",
        iterations: 1_500,
        dict: RELAY_DICT,
    };
    let report = driver::run(&t, gen_relay, fuzz::relay);
    assert!(report.accepted > 0);
}

/// A piece size, then records as a site or the rendezvous writes them
/// (control bytes, datagrams, a close), sometimes with a byte changed.
fn gen_tcp_records(rng: &mut Rng) -> Vec<u8> {
    let mut out = vec![rng.byte()];
    for _ in 0..1 + rng.below(4) {
        let kind = rng.below(3) as u8;
        let len = match kind {
            2 => 4 + rng.below(20),
            _ => {
                let max = if rng.chance(4) { 3000 } else { 200 };
                rng.below(max)
            }
        };
        out.push(kind);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend(rng.bytes(len));
    }
    if rng.chance(4) {
        let i = rng.below(out.len());
        out[i] = rng.byte();
    }
    out
}

#[test]
fn fuzz_tcp_records() {
    let t = Target {
        name: "tcp_records",
        iterations: 10_000,
        dict: &[&[0, 0, 0], &[1, 5, 220], &[2, 0, 4], &[0xff, 0xff]],
    };
    let report = driver::run(&t, gen_tcp_records, fuzz::tcp_records);
    assert!(report.accepted > 0);
}

/// Writes the seed corpus (real messages from the encoders). Run by hand
/// after a format change: `cargo test -p causeway-nat --test fuzz --
/// --ignored write_seed_corpus`.
#[test]
#[ignore = "writes fuzz/corpus"]
fn write_seed_corpus() {
    let mut rng = Rng::new(1);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    type Generator = fn(&mut Rng) -> Vec<u8>;
    let targets: [(&str, Generator); 5] = [
        ("stun", gen_stun),
        ("probe", gen_probe),
        ("rendezvous_frames", gen_frames),
        ("relay", gen_relay),
        ("tcp_records", gen_tcp_records),
    ];
    for (name, generate) in targets {
        std::fs::create_dir_all(dir.join(name)).expect("mkdir");
        for i in 0..4 {
            std::fs::write(dir.join(name).join(format!("seed-{i}")), generate(&mut rng))
                .expect("write");
        }
    }
}
