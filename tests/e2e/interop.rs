//! A stock WireGuard node (wireguard-go from Debian, configured with `wg`)
//! is an ordinary peer of a causeway site, whichever side starts.

use std::net::SocketAddr;
use std::path::Path;

use std::time::{Duration, Instant};

use causeway_testbed::{ChildGuard, Netns};

use crate::common::*;

/// Starts wireguard-go on `ns` and configures it with `wg` and `ip`.
fn start_wireguard_go(
    ns: &Netns,
    ifname: &str,
    key_file: &Path,
    peer_key: &str,
    peer_endpoint: SocketAddr,
    allowed: &str,
) -> ChildGuard {
    let mut cmd = ns.command("wireguard-go");
    cmd.args(["-f", ifname])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .env("LOG_LEVEL", "error")
        .stdout(std::process::Stdio::null());
    let guard = ns.spawn(&mut cmd).expect("spawn wireguard-go");
    let sock = format!("/var/run/wireguard/{ifname}.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(&sock).exists() {
        assert!(
            Instant::now() < deadline,
            "wireguard-go did not create {sock}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let key = key_file.to_str().expect("utf-8 path");
    ns.run(
        "wg",
        &[
            "set",
            ifname,
            "listen-port",
            &PORT.to_string(),
            "private-key",
            key,
            "peer",
            peer_key,
            "endpoint",
            &peer_endpoint.to_string(),
            "allowed-ips",
            allowed,
        ],
    )
    .expect("wg set");
    ns.ip(&["link", "set", ifname, "mtu", "1420", "up"])
        .expect("link up");
    ns.ip(&["route", "replace", allowed, "dev", ifname])
        .expect("route");
    guard
}

#[test]
fn causeway_and_wireguard_go_are_peers_both_ways() {
    let lab = two_sites();
    let (a, b) = (lab.site("a"), lab.site("b"));
    let files_a = SiteFiles::new();
    let files_b = SiteFiles::new();
    let config = files_a.write_config(
        "a",
        &["10.0.0.0/16"],
        &peer_toml(
            "b",
            &files_b.public_key,
            &["10.1.0.0/16"],
            Some(SocketAddr::new(b.wan_addr, PORT)),
        ),
    );
    let daemon = Daemon::start(&a.gateway, &files_a, &config);
    let ifname = unique_ifname("wgt");
    let a_endpoint = SocketAddr::new(a.wan_addr, PORT);
    let (pod_a, pod_b) = (&a.pods[0], &b.pods[0]);

    // Round 1: causeway initiates.
    let wg = start_wireguard_go(
        &b.gateway,
        &ifname,
        &files_b.path("private.key"),
        &files_a.public_key,
        a_endpoint,
        "10.0.0.0/16",
    );
    assert_ping(&pod_a.ns, pod_b.addr.into());
    assert_ping(&pod_b.ns, pod_a.addr.into());
    tcp_transfer(&pod_b.ns, pod_b.addr, &pod_a.ns, 8 << 20);
    tcp_transfer(&pod_a.ns, pod_a.addr, &pod_b.ns, 8 << 20);
    let dump = b
        .gateway
        .run("wg", &["show", &ifname, "latest-handshakes"])
        .expect("wg show");
    assert!(
        !dump.contains("\t0\n") && dump.contains(&files_a.public_key),
        "wireguard-go saw no handshake: {dump}"
    );
    drop(wg);

    // Round 2: a fresh wireguard-go initiates towards the running causeway.
    let _wg = start_wireguard_go(
        &b.gateway,
        &ifname,
        &files_b.path("private.key"),
        &files_a.public_key,
        a_endpoint,
        "10.0.0.0/16",
    );
    assert_ping(&pod_b.ns, pod_a.addr.into());
    assert_ping(&pod_a.ns, pod_b.addr.into());
    udp_exchange(&pod_a.ns, pod_a.addr, &pod_b.ns, 300);

    let status = daemon.status();
    assert!(status.peers[0].rx_bytes > 8 << 20, "{status:?}");
    daemon.stop();
}
