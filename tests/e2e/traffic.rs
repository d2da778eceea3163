//! Two sites joined by static endpoints carry ICMP, TCP and UDP both ways,
//! and a peer cannot inject packets from addresses it does not own.

use std::net::{IpAddr, UdpSocket};
use std::time::Duration;

use crate::common::*;

#[test]
fn ping_tcp_and_udp_cross_the_tunnel_both_ways() {
    let j = Joined::new();
    let (pod_a, addr_a) = j.pod(0);
    let (pod_b, addr_b) = j.pod(1);
    assert_ping(pod_a, addr_b.into());
    assert_ping(pod_b, addr_a.into());

    tcp_transfer(pod_b, addr_b, pod_a, 64 << 20);
    tcp_transfer(pod_a, addr_a, pod_b, 64 << 20);
    udp_exchange(pod_b, addr_b, pod_a, 500);
    udp_exchange(pod_a, addr_a, pod_b, 500);

    let status = j.daemon(0).status();
    let b = &status.peers[0];
    assert_eq!(b.name, "b");
    // A log written to a file carries no terminal colour codes.
    let log = j.daemon(0).log_text();
    assert!(log.contains("INFO") && !log.contains('\x1b'), "log:\n{log}");
    assert!(
        b.last_handshake_secs.is_some(),
        "no handshake recorded: {status:?}"
    );
    assert!(
        b.rx_bytes >= 64 << 20 && b.tx_bytes >= 64 << 20,
        "counters: {b:?}"
    );
    assert_eq!(
        b.endpoint.as_deref(),
        Some(format!("{}:{PORT}", j.site(1).wan_addr).as_str())
    );

    // The underlay carried only ciphertext: the internet namespace never saw
    // a pod address.
    assert_eq!(j.lab.leaked_packets().expect("leak counter"), 0);
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    let j = Joined::new();
    let (pod_a, addr_a) = j.pod(0);
    let (_, addr_b) = j.pod(1);
    assert_ping(pod_a, addr_b.into());

    // Site b's gateway sends from an address outside b's cidrs; b's daemon
    // encrypts it like anything routed to its TUN, a's must refuse it.
    let gw_b = &j.site(1).gateway;
    gw_b.ip(&["addr", "add", "10.99.0.1/32", "dev", "lo"])
        .expect("add spoof address");
    let delivered_before = j.daemon(0).status().peers[0].rx_packets;
    let spoofer = gw_b.enter(|| UdpSocket::bind("10.99.0.1:0").expect("bind spoofed source"));
    for _ in 0..5 {
        spoofer.send_to(b"spoofed", (addr_a, 9)).expect("send");
    }
    std::thread::sleep(Duration::from_millis(300));
    let dropped = j.daemon(0).drops("b", "spoofed_source");
    assert!(
        dropped >= 5,
        "expected >= 5 spoofed_source drops, got {dropped}\nstatus a: {:#?}\nstatus b: {:#?}",
        j.daemon(0).status(),
        j.daemon(1).status()
    );

    assert_eq!(
        j.daemon(0).status().peers[0].rx_packets,
        delivered_before,
        "spoofed packets were delivered"
    );
    // The honest traffic is untouched.
    assert_ping(pod_a, IpAddr::V4(addr_b));
}

/// A pod that sends UDP with segmentation offload (`UDP_SEGMENT`, as QUIC
/// stacks do) hands the gateway one super-packet per send: the daemon must
/// split it into datagrams that fit the tunnel, and the receiving side
/// (which coalesces them again on its way into the TUN) must deliver each
/// datagram whole, with its own length.
#[test]
fn udp_segmentation_offload_from_a_pod_arrives_as_separate_datagrams() {
    use std::os::fd::AsRawFd;
    const SEGMENT: usize = 1200;
    const SENDS: usize = 20;
    const PER_SEND: usize = 8; // the last one shorter
    let j = Joined::new();
    let (pod_a, _) = j.pod(0);
    let (pod_b, addr_b) = j.pod(1);
    assert_ping(pod_a, addr_b.into());

    let rx = pod_b.enter(|| UdpSocket::bind((addr_b, 5003)).expect("bind"));
    rx.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    // Room for every datagram: they are read only after all were sent.
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt with a valid fd and an int option value.
    unsafe {
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let tx = pod_a.enter(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    let gso_size: libc::c_int = SEGMENT as libc::c_int;
    // SAFETY: setsockopt with a valid fd and an int option value.
    let rc = unsafe {
        libc::setsockopt(
            tx.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&gso_size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
    // Each datagram: send number, index within the send, then a pattern.
    let datagram = |send: usize, i: usize| {
        let len = if i == PER_SEND - 1 { 300 } else { SEGMENT };
        let mut d = pattern(len, (send * PER_SEND + i) as u64);
        d[0] = send as u8;
        d[1] = i as u8;
        d
    };
    // Packets the kernel handed to site a's TUN: a super-packet counts once.
    let gw_a = &j.site(0).gateway;
    let tun_packets = || -> u64 {
        let out = gw_a
            .ip(&["-j", "-s", "link", "show", "causeway0"])
            .expect("ip link");
        let json: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
        json[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("no TUN counter in {out}"))
    };
    let before = tun_packets();
    for send in 0..SENDS {
        let buf: Vec<u8> = (0..PER_SEND).flat_map(|i| datagram(send, i)).collect();
        tx.send_to(&buf, (addr_b, 5003)).expect("send super-packet");
    }
    let handed = tun_packets() - before;
    eprintln!("{SENDS} sends of {PER_SEND} datagrams: {handed} packets into the TUN");
    // Proof that the offload is in effect (else there would be 160).
    assert!(
        handed < (SENDS * PER_SEND / 2) as u64,
        "the TUN got {handed} packets for {SENDS} sends"
    );
    let mut seen = [false; SENDS * PER_SEND];
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = rx.recv(&mut buf) {
        let (send, i) = (usize::from(buf[0]), usize::from(buf[1]));
        assert!(send < SENDS && i < PER_SEND, "unknown datagram {send}/{i}");
        assert_eq!(&buf[..n], &datagram(send, i)[..], "datagram {send}/{i}");
        seen[send * PER_SEND + i] = true;
        if seen.iter().all(|&s| s) {
            break;
        }
    }
    let arrived = seen.iter().filter(|&&s| s).count();
    // UDP may lose a datagram on a busy machine, but not a whole send.
    let missing: Vec<(usize, usize)> = (0..seen.len())
        .filter(|&k| !seen[k])
        .map(|k| (k / PER_SEND, k % PER_SEND))
        .collect();
    assert!(
        arrived * 10 >= seen.len() * 9,
        "{arrived} of {} datagrams arrived; missing (send, index): {missing:?}",
        seen.len()
    );
    let malformed = j.daemon(0).drops("b", "malformed") + j.daemon(1).drops("a", "malformed");
    assert_eq!(malformed, 0, "datagrams dropped as malformed");
}
