//! Garbage on the WireGuard port — random bytes, truncated messages,
//! forged and replayed WireGuard messages — is dropped and counted, logged
//! at a bounded rate, and the tunnel keeps carrying traffic.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use causeway::keys;

use crate::common::*;

/// A minimal IPv4/UDP packet from `src` to `dst` (checksums are not what is
/// tested here; the kernel may drop it after the daemon delivered it).
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = p[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&4000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

#[test]
fn garbage_and_replays_do_not_disturb_the_tunnel() {
    // A third peer "c" whose key the test holds, to forge and replay real
    // WireGuard messages.
    let c_secret = keys::generate();
    let c_public = keys::encode_public(&x25519_dalek::PublicKey::from(&c_secret));
    let j = Joined::with_extra_peers([&peer_toml("c", &c_public, &["10.2.0.0/16"], None), ""]);
    let (pod_a, addr_a) = j.pod(0);
    let (pod_b, addr_b) = j.pod(1);
    assert_ping(pod_a, addr_b.into());
    let a_key = keys::decode_public(&j.files[0].public_key).expect("a key");
    let target = SocketAddr::new(j.site(0).wan_addr, PORT);

    let attacker = j
        .lab
        .internet()
        .enter(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    attacker
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");

    // 1. Random bytes of random lengths, and every message type truncated.
    let noise = pattern(1 << 20, 99);
    let mut sent_garbage = 0;
    for i in 0..400 {
        let len = (i * 97) % 1500;
        let start = (i * 1013) % (noise.len() - 1500);
        attacker
            .send_to(&noise[start..start + len], target)
            .expect("send");
        sent_garbage += 1;
    }
    for msg_type in 1u8..=4 {
        for len in [1, 4, 5, 16, 31, 63, 91, 147] {
            let mut m = noise[..len].to_vec();
            m[0] = msg_type;
            if len >= 4 {
                m[1..4].fill(0);
            }
            attacker.send_to(&m, target).expect("send");
            sent_garbage += 1;
        }
    }
    // A well-formed but forged handshake initiation (MACs cannot verify).
    let mut forged = noise[..148].to_vec();
    forged[..4].copy_from_slice(&[1, 0, 0, 0]);
    attacker.send_to(&forged, target).expect("send");

    // 2. A real handshake and data packet from peer c, then replays.
    let mut tunn = Tunn::new(c_secret, a_key, None, None, 7, None);
    let mut buf = vec![0u8; 2048];
    let init = match tunn.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no initiation: {other:?}"),
    };
    attacker.send_to(&init, target).expect("send init");
    let mut reply = vec![0u8; 2048];
    let (n, _) = attacker
        .recv_from(&mut reply)
        .expect("handshake response from the daemon");
    let mut out = vec![0u8; 2048];
    match tunn.decapsulate(Some(target.ip()), &reply[..n], &mut out) {
        TunnResult::WriteToNetwork(keepalive) => {
            attacker.send_to(keepalive, target).expect("send keepalive");
        }
        other => panic!("handshake with the daemon failed: {other:?}"),
    }
    let packet = ipv4_udp(Ipv4Addr::new(10, 2, 0, 1), addr_a, b"hello from c");
    let data = match tunn.encapsulate(&packet, &mut out) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no data packet: {other:?}"),
    };
    for _ in 0..6 {
        attacker.send_to(&data, target).expect("send data");
    }
    for _ in 0..3 {
        attacker.send_to(&init, target).expect("replay init");
    }
    std::thread::sleep(Duration::from_millis(300));

    // The tunnel between a and b still works.
    let daemon = j.daemon(0);
    assert_ping(pod_a, addr_b.into());
    tcp_transfer(pod_b, addr_b, pod_a, 8 << 20);

    // Answering on its control socket proves the daemon is alive.
    let status = daemon.status();
    let c = status.peers.iter().find(|p| p.name == "c").expect("peer c");
    assert_eq!(
        c.rx_packets, 1,
        "the data packet is delivered exactly once: {c:?}"
    );
    let rejected = c.drops.get("rejected").copied().unwrap_or(0);
    assert!(rejected >= 5 + 3, "replays not rejected: {c:?}");
    let malformed = status.drops.get("malformed").copied().unwrap_or(0);
    assert!(
        malformed >= 300,
        "garbage not counted ({malformed} of {sent_garbage}): {status:?}"
    );

    let log_lines = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("dropped packet"))
        .count();
    assert!(
        log_lines <= 20,
        "{log_lines} drop log lines for {sent_garbage} bad datagrams: not rate limited"
    );
}
