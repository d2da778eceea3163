//! Micro-benchmarks of the data path's per-packet work, so that a
//! regression shows up without the lab:
//!
//! - `wireguard/encapsulate` and `wireguard/decapsulate`: boringtun's
//!   `Tunn` on an established session, per IPv4 packet of 64, 512 and 1420
//!   bytes;
//! - `packet/*`: `causeway::packet` on one TCP packet: `parse`, remap
//!   (`View::egress`, `View::ingress`), `clamp_mss` on a SYN, and the
//!   allow-list check;
//! - `batch/*`: what the daemon's threads do to a batch of 64 full-size
//!   packets, without the system calls: outbound (parse ▸ remap ▸ MSS clamp ▸
//!   encapsulate into one arena) and inbound (decapsulate ▸ remap ▸ allow).
//!
//! `cargo bench -p causeway-bench --bench datapath` (add `-- wireguard` to
//! run one group).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use causeway::packet::{self, AllowRule, View};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ipnet::IpNet;

/// Packet sizes measured: a small ACK-sized packet, a medium one, and a
/// full packet at the tunnel MTU.
const SIZES: [usize; 3] = [64, 512, 1420];
/// Packets per batch, as the daemon reads them from the TUN.
const BATCH: usize = 64;
/// WireGuard's overhead per data packet (header, counter, tag).
const WG_OVERHEAD: usize = 32;

const SRC: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// The peer's pod as this site sees it (its view) and as it really is.
const DST_VIEW: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 2);
const DST_REAL: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);

fn net(s: &str) -> IpNet {
    s.parse().expect("valid CIDR")
}

/// An IPv4 TCP packet of `len` bytes (at least 40) with valid IP header
/// checksum; `syn` adds an MSS option of 1460.
fn tcp_packet(len: usize, src: Ipv4Addr, dst: Ipv4Addr, syn: bool) -> Vec<u8> {
    let header = if syn { 24 } else { 20 };
    let len = len.max(20 + header);
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum = 0u32;
    for i in (0..20).step_by(2) {
        sum += u32::from(u16::from_be_bytes([p[i], p[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    t[2..4].copy_from_slice(&5211u16.to_be_bytes());
    t[12] = ((header / 4) as u8) << 4;
    t[13] = if syn { 0x02 } else { 0x10 };
    t[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    if syn {
        t[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    }
    for (i, b) in p[20 + header..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

/// Two `Tunn`s with an established session (handshake and first
/// keepalive exchanged in memory).
fn session() -> (Tunn, Tunn) {
    let (sa, sb) = (StaticSecret::from([7u8; 32]), StaticSecret::from([9u8; 32]));
    let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
    let mut a = Tunn::new(sa, pb, None, None, 1, None);
    let mut b = Tunn::new(sb, pa, None, None, 2, None);
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let init = match a.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no handshake initiation"),
    };
    let response = match b.decapsulate(None, &init, &mut out) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no handshake response"),
    };
    let keepalive = match a.decapsulate(None, &response, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no keepalive after the handshake"),
    };
    while !matches!(a.decapsulate(None, &[], &mut buf), TunnResult::Done) {}
    match b.decapsulate(None, &keepalive, &mut out) {
        TunnResult::Done => {}
        _ => panic!("keepalive not accepted"),
    }
    (a, b)
}

fn encrypt(a: &mut Tunn, plain: &[u8], out: &mut [u8]) -> usize {
    match a.encapsulate(plain, out) {
        TunnResult::WriteToNetwork(p) => p.len(),
        _ => panic!("encapsulate failed"),
    }
}

fn wireguard(c: &mut Criterion) {
    let mut g = c.benchmark_group("wireguard");
    for size in SIZES {
        let plain = tcp_packet(size, SRC, DST_REAL, false);
        g.throughput(Throughput::Bytes(size as u64));
        let (mut a, _b) = session();
        let mut out = vec![0u8; size + WG_OVERHEAD + 16];
        g.bench_with_input(
            BenchmarkId::new("encapsulate", size),
            &plain,
            |bench, plain| {
                bench.iter(|| encrypt(&mut a, black_box(plain), &mut out));
            },
        );
        let (mut a, mut b) = session();
        let mut cipher = vec![0u8; size + WG_OVERHEAD + 16];
        let mut decrypted = vec![0u8; size + 64];
        g.bench_function(BenchmarkId::new("decapsulate", size), |bench| {
            bench.iter_batched_ref(
                || {
                    // A fresh ciphertext each time: replays are refused.
                    let n = encrypt(&mut a, &plain, &mut cipher);
                    cipher[..n].to_vec()
                },
                |datagram| match b.decapsulate(None, datagram, &mut decrypted) {
                    TunnResult::WriteToTunnelV4(p, _) => p.len(),
                    _ => panic!("decapsulate failed"),
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

fn packet_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("packet");
    let mapping = View::new(net("10.0.0.0/16"), net("100.64.0.0/16")).expect("mapping");
    let rules = [AllowRule::any(net("10.0.0.0/16"))];
    for size in SIZES {
        g.throughput(Throughput::Elements(1));
        let egress = tcp_packet(size, SRC, DST_VIEW, false);
        g.bench_with_input(BenchmarkId::new("parse", size), &egress, |bench, p| {
            bench.iter(|| packet::parse(black_box(p)).map(|s| s.len));
        });
        g.bench_with_input(
            BenchmarkId::new("remap_egress", size),
            &egress,
            |bench, p| {
                bench.iter_batched_ref(|| p.clone(), |p| mapping.egress(p), BatchSize::SmallInput);
            },
        );
        let ingress = tcp_packet(size, DST_REAL, SRC, false);
        g.bench_with_input(
            BenchmarkId::new("remap_ingress", size),
            &ingress,
            |bench, p| {
                bench.iter_batched_ref(|| p.clone(), |p| mapping.ingress(p), BatchSize::SmallInput);
            },
        );
        g.bench_with_input(BenchmarkId::new("allow", size), &ingress, |bench, p| {
            let summary = packet::parse(p).expect("valid packet");
            bench.iter(|| packet::allowed(black_box(&rules), black_box(&summary)).is_allowed());
        });
    }
    let syn = tcp_packet(64, SRC, DST_VIEW, true);
    let max = packet::max_mss(1420, false);
    g.bench_function("clamp_mss_syn", |bench| {
        bench.iter_batched_ref(
            || syn.clone(),
            |p| packet::clamp_mss(p, max),
            BatchSize::SmallInput,
        );
    });
    let ack = tcp_packet(1420, SRC, DST_VIEW, false);
    g.bench_function("clamp_mss_non_syn/1420", |bench| {
        bench.iter_batched_ref(
            || ack.clone(),
            |p| packet::clamp_mss(p, max),
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

fn batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Bytes((BATCH * 1420) as u64));
    let mapping = View::new(net("10.0.0.0/16"), net("100.64.0.0/16")).expect("mapping");
    let rules = [AllowRule::any(net("10.0.0.0/16"))];
    let max = packet::max_mss(1420, false);
    let batch_in: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| tcp_packet(1420, SRC, DST_VIEW, false))
        .collect();
    let (mut a, _b) = session();
    let mut arena = vec![0u8; BATCH * (1420 + 148)];
    g.bench_function("outbound_64x1420", |bench| {
        bench.iter_batched_ref(
            || batch_in.clone(),
            |packets| {
                let mut used = 0;
                for p in packets.iter_mut() {
                    if packet::parse(p).is_err() {
                        continue;
                    }
                    let _ = mapping.egress(p);
                    packet::clamp_mss(p, max);
                    let end = (used + p.len() + 148).min(arena.len());
                    used += encrypt(&mut a, p, &mut arena[used..end]);
                }
                used
            },
            BatchSize::SmallInput,
        );
    });
    let (mut a, mut b) = session();
    let plain = tcp_packet(1420, DST_REAL, SRC, false);
    let mut cipher = vec![0u8; 1420 + 148];
    let mut decrypted = vec![0u8; 2048];
    let local = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2));
    g.bench_function("inbound_64x1420", |bench| {
        bench.iter_batched_ref(
            || {
                (0..BATCH)
                    .map(|_| {
                        let n = encrypt(&mut a, &plain, &mut cipher);
                        cipher[..n].to_vec()
                    })
                    .collect::<Vec<_>>()
            },
            |datagrams| {
                let mut delivered = 0;
                for d in datagrams.iter() {
                    if let TunnResult::WriteToTunnelV4(p, _) =
                        b.decapsulate(Some(local), d, &mut decrypted)
                    {
                        let _ = mapping.ingress(p);
                        if packet::parse(p).is_ok_and(|s| packet::allowed(&rules, &s).is_allowed())
                        {
                            delivered += 1;
                        }
                    }
                }
                delivered
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! { name = benches; config = config(); targets = wireguard, packet_ops, batch }
criterion_main!(benches);
