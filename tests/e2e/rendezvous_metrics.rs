//! `causeway rendezvous --metrics-listen`: the kubelet's probes and
//! Prometheus' scrape, from inside the rendezvous' namespace, see it ready
//! once it serves, and see sites connect and their relayed traffic.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use std::time::{Duration, Instant};

use causeway_testbed::{Lab, LabSpec, Nat, Netns, SiteSpec};

use crate::common::*;

const METRICS_PORT: u16 = 9469;

fn scrape(ns: &Netns, addr: SocketAddr) -> (BTreeMap<String, f64>, String) {
    let (status, body) = get(ns, addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    (samples(&body), body)
}

/// Scrapes until `done` holds (or panics after `within`); the last scrape.
fn scrape_until(
    ns: &Netns,
    addr: SocketAddr,
    within: Duration,
    what: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + within;
    loop {
        let (s, body) = scrape(ns, addr);
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never {what}:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn rendezvous_metrics_show_sites_connecting_and_relaying_and_probes_answer() {
    // Two sites behind symmetric NATs: everything goes through the relay.
    let site = |name: &str, cidr: &str| {
        SiteSpec::new(name, vec![cidr.parse().expect("cidr")]).nat(Nat::Symmetric)
    };
    let lab = Lab::build(&LabSpec {
        sites: vec![site("a", "10.0.0.0/16"), site("b", "10.1.0.0/16")],
    })
    .expect("lab");
    // IPv6 crosses the lab without NAT and would give a direct path.
    for s in lab.sites() {
        s.remove_ipv6_underlay().expect("flush IPv6");
    }
    let files = [SiteFiles::new(), SiteFiles::new()];
    let internet = lab.internet();
    let ip = IpAddr::V4(lab.internet_addr());

    // The rendezvous, serving a and b, with metrics on its own address.
    let metrics = SocketAddr::new(ip, METRICS_PORT);
    let mut rendezvous = Rendezvous::start_on(
        internet,
        ip,
        RENDEZVOUS_QUIC_PORT,
        RENDEZVOUS_STUN_PORT,
        RENDEZVOUS_TCP_PORT,
        &[("a", &files[0].public_key), ("b", &files[1].public_key)],
        &[format!("--metrics-listen={metrics}")],
    );
    let rendezvous_key = rendezvous.public_key.clone();

    // Ready once it serves (the probe may first find nothing listening).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(answer) = try_get(internet, metrics, "/readyz") {
            assert_eq!(answer, (200, "ready\n".to_owned()));
            break;
        }
        let child = rendezvous.child.as_mut().expect("started");
        if let Ok(Some(status)) = child.wait_timeout(Duration::from_millis(50)) {
            panic!("rendezvous exited ({status}):\n{}", rendezvous.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "rendezvous never ready:\n{}",
            rendezvous.log_text()
        );
    }
    assert_eq!(get(internet, metrics, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(internet, metrics, "/nope").0, 404);

    // Before any site: both configured, none connected, all zeros.
    let (s, body) = scrape(internet, metrics);
    let value = |s: &BTreeMap<String, f64>, key: &str| {
        s.get(key)
            .copied()
            .unwrap_or_else(|| panic!("no {key} in\n{body}"))
    };
    assert_eq!(value(&s, "causeway_rendezvous_sites_configured"), 2.0);
    for site in ["a", "b"] {
        for series in [
            "site_connected",
            "relay_rx_packets_total",
            "relay_rx_bytes_total",
            "relay_dropped_total",
        ] {
            assert_eq!(
                value(
                    &s,
                    &format!("causeway_rendezvous_{series}{{site=\"{site}\"}}")
                ),
                0.0,
                "{series}"
            );
        }
    }
    assert_eq!(value(&s, "causeway_rendezvous_stun_answered_total"), 0.0);
    assert!(
        s.keys()
            .any(|k| k.starts_with("causeway_build_info{version=")),
        "{body}"
    );
    assert!(value(&s, "process_resident_memory_bytes") > 1e5);
    assert!(value(&s, "process_open_fds") >= 3.0);
    assert!(
        !s.keys().any(|k| k.starts_with("causeway_peer")),
        "site series on a rendezvous:\n{body}"
    );

    // A STUN Binding request from the internet, answered and counted.
    let stun = internet.enter(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    stun.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut request = [0u8; causeway_nat::stun::BINDING_REQUEST_LEN];
    let len = causeway_nat::stun::encode_binding_request(
        &causeway_nat::stun::TransactionId([9; 12]),
        &mut request,
    );
    stun.send_to(&request[..len], (ip, RENDEZVOUS_STUN_PORT))
        .expect("send STUN");
    stun.recv(&mut [0u8; 512]).expect("STUN answer");

    // The sites connect and relay a ping and a transfer.
    let rdv = format!(
        "[[rendezvous]]\naddress = \"{}\"\npublic_key = {rendezvous_key:?}\n",
        SocketAddr::new(ip, RENDEZVOUS_QUIC_PORT)
    );
    let cfg_a = files[0].write_config(
        "a",
        &["10.0.0.0/16"],
        &(peer_toml("b", &files[1].public_key, &["10.1.0.0/16"], None) + &rdv),
    );
    let cfg_b = files[1].write_config(
        "b",
        &["10.1.0.0/16"],
        &(peer_toml("a", &files[0].public_key, &["10.0.0.0/16"], None) + &rdv),
    );
    let daemon_a = Daemon::start(&lab.sites()[0].gateway, &files[0], &cfg_a);
    let daemon_b = Daemon::start(&lab.sites()[1].gateway, &files[1], &cfg_b);
    let (pod_a, pod_b) = (&lab.sites()[0].pods[0], &lab.sites()[1].pods[0]);
    assert_ping(&pod_a.ns, pod_b.addr.into());
    tcp_transfer(&pod_b.ns, pod_b.addr, &pod_a.ns, 1 << 20);
    assert_eq!(daemon_a.status().peers[0].path, "relay");

    let relayed = |s: &BTreeMap<String, f64>, site: &str| {
        s.get(&format!(
            "causeway_rendezvous_relay_rx_packets_total{{site=\"{site}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    let s = scrape_until(
        internet,
        metrics,
        Duration::from_secs(10),
        "saw both sites connected and relaying",
        |s| {
            ["a", "b"].iter().all(|site| {
                s.get(&format!(
                    "causeway_rendezvous_site_connected{{site=\"{site}\"}}"
                )) == Some(&1.0)
                    && relayed(s, site) > 0.0
            })
        },
    );
    let a_relay_tx = daemon_a.status().peers[0].relay_tx_packets;
    let (packets_a, bytes_a) = (
        relayed(&s, "a"),
        value(&s, "causeway_rendezvous_relay_rx_bytes_total{site=\"a\"}"),
    );
    // a sent the megabyte: at least that many bytes (plus WireGuard's
    // overhead), in at least as many packets as a counted sending.
    assert!(
        bytes_a >= f64::from(1u32 << 20),
        "relayed bytes from a: {bytes_a}"
    );
    assert!(
        bytes_a >= packets_a * 32.0,
        "packets {packets_a}, bytes {bytes_a}"
    );
    assert!(
        packets_a >= 700.0 && packets_a <= a_relay_tx as f64,
        "relayed from a {packets_a}, a's relay_tx_packets {a_relay_tx}"
    );
    assert!(relayed(&s, "b") > 0.0);
    assert!(value(&s, "causeway_rendezvous_stun_answered_total") >= 1.0);

    // The site's side of the same relay, in `causeway status`: connected,
    // and what it handed the rendezvous is at least what the rendezvous
    // relayed for it. The rendezvous counts both of its relays; the
    // client's counters are its QUIC relay's, the peer's are both (the
    // first packets go over QUIC, the rest through the pair's UDP relay
    // port once both sites are bound to it).
    let status_a = daemon_a.status();
    let [client] = &status_a.rendezvous[..] else {
        panic!("one rendezvous client: {status_a:#?}");
    };
    assert!(client.connected && client.connections >= 1, "{client:#?}");
    assert!(
        client.relay_tx_packets > 0
            && client.relay_tx_bytes > 0
            && client.relay_tx_datagrams >= client.relay_tx_packets
            && status_a.peers[0].relay_tx_packets as f64 >= packets_a,
        "{client:#?}, {:#?}, rendezvous relayed {packets_a} packets, {bytes_a} bytes",
        status_a.peers[0]
    );
    assert!(
        client.relay_rx_packets > 0 && client.relay_rx_bytes > 0,
        "{client:#?}"
    );

    // A site that goes away is no longer connected; its counters stay.
    daemon_b.stop();
    let s = scrape_until(
        internet,
        metrics,
        Duration::from_secs(10),
        "saw b disconnect",
        |s| s.get("causeway_rendezvous_site_connected{site=\"b\"}") == Some(&0.0),
    );
    assert!(relayed(&s, "b") > 0.0);
    assert_eq!(
        value(&s, "causeway_rendezvous_site_connected{site=\"a\"}"),
        1.0
    );
    drop(daemon_a);

    // SIGTERM: a clean exit, and the metrics port closes with it.
    let status = rendezvous
        .child
        .take()
        .expect("running")
        .stop(Duration::from_secs(5))
        .expect("stop rendezvous");
    assert!(
        status.success(),
        "rendezvous exited with {status}:\n{}",
        rendezvous.log_text()
    );
    assert!(
        try_get(internet, metrics, "/healthz").is_err(),
        "metrics still served after exit"
    );
}
