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
