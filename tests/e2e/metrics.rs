//! Prometheus scrapes `/metrics` on a gateway after traffic and finds the
//! per-peer series and drop counters; `/healthz` and `/readyz` answer the
//! way Kubernetes probes expect.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use crate::uapi::Pair;

const METRICS: &str = "127.0.0.1:9469";

#[test]
fn metrics_show_peer_traffic_handshakes_and_drops_and_probes_answer() {
    let listen = format!("{METRICS:?}");
    let p = Pair::start([&[("metrics_listen", listen.as_str())], &[]]);
    let (gw_a, gw_b) = (p.gateway(0), p.gateway(1));
    let (pod_a, pod_b) = (&p.lab.sites()[0].pods[0], &p.lab.sites()[1].pods[0]);
    let addr: SocketAddr = METRICS.parse().expect("addr");

    assert_ping(&pod_a.ns, pod_b.addr.into());
    tcp_transfer(&pod_b.ns, pod_b.addr, &pod_a.ns, 2 << 20);

    // Drops: b's gateway sends from an address b does not own (a counts
    // spoofed_source against peer b), and junk reaches a's WireGuard port
    // from the internet (malformed, not attributable to a peer).
    gw_b.ip(&["addr", "add", "10.99.0.1/32", "dev", "lo"])
        .expect("spoof address");
    let spoofer = gw_b.enter(|| UdpSocket::bind("10.99.0.1:0").expect("bind spoofed source"));
    for _ in 0..5 {
        spoofer.send_to(b"spoofed", (pod_a.addr, 9)).expect("send");
    }
    let junk = p
        .lab
        .internet()
        .enter(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    for i in 0..7u8 {
        junk.send_to(&[0xee, i, 1, 2, 3], (p.lab.sites()[0].wan_addr, PORT))
            .expect("send junk");
    }
    std::thread::sleep(Duration::from_millis(300));

    let (status, body) = get(gw_a, addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    let s = samples(&body);
    let sample = |key: &str| *s.get(key).unwrap_or_else(|| panic!("no {key} in\n{body}"));

    assert_eq!(sample("causeway_peers_configured"), 1.0);
    assert_eq!(
        sample(&format!(
            "causeway_peer_info{{peer=\"b\",public_key=\"{}\"}}",
            p.files[1].public_key
        )),
        1.0
    );
    assert!(
        s.keys()
            .any(|k| k.starts_with("causeway_build_info{version=")),
        "{body}"
    );
    let tx = sample("causeway_peer_tx_bytes_total{peer=\"b\"}");
    let rx = sample("causeway_peer_rx_bytes_total{peer=\"b\"}");
    assert!(tx >= f64::from(2u32 << 20), "tx {tx}");
    assert!(rx > 0.0, "rx {rx}");
    assert!(sample("causeway_peer_tx_packets_total{peer=\"b\"}") >= 1000.0);
    assert!(sample("causeway_peer_rx_packets_total{peer=\"b\"}") > 0.0);
    let handshake = sample("causeway_peer_last_handshake_timestamp_seconds{peer=\"b\"}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        handshake > now - 300.0 && handshake <= now + 1.0,
        "handshake {handshake}, now {now}"
    );
    assert!(
        sample("causeway_peer_drops_total{peer=\"b\",reason=\"spoofed_source\"}") >= 5.0,
        "{body}"
    );
    assert_eq!(
        sample("causeway_peer_drops_total{peer=\"b\",reason=\"policy_port\"}"),
        0.0
    );
    assert!(
        sample("causeway_site_drops_total{reason=\"malformed\"}") >= 7.0,
        "{body}"
    );
    // The path, the RTT and the relay, as `causeway status` has them.
    assert_eq!(sample("causeway_packet_threads_alive"), 1.0);
    assert_eq!(
        sample(&format!(
            "causeway_site_info{{site=\"a\",interface=\"{}\",public_key=\"{}\"}}",
            p.ifnames[0], p.files[0].public_key
        )),
        1.0
    );
    for (path, on) in [
        ("static", 1.0),
        ("direct", 0.0),
        ("relay", 0.0),
        ("none", 0.0),
    ] {
        assert_eq!(
            sample(&format!("causeway_peer_path{{peer=\"b\",path=\"{path}\"}}")),
            on,
            "{body}"
        );
    }
    if let Some(rtt) = s.get("causeway_peer_rtt_seconds{peer=\"b\"}") {
        assert!((0.0..1.0).contains(rtt), "rtt {rtt} s");
    }
    assert_eq!(
        sample("causeway_peer_relay_tx_packets_total{peer=\"b\"}"),
        0.0
    );
    assert_eq!(
        sample("causeway_peer_relay_rx_packets_total{peer=\"b\"}"),
        0.0
    );
    assert!(
        !s.keys()
            .any(|k| k.starts_with("causeway_rendezvous_client_")),
        "no rendezvous configured:\n{body}"
    );

    // The same numbers `causeway status` shows, read a moment later.
    let status = p.daemon(0).status();
    assert!(status.peers[0].tx_bytes as f64 >= tx && status.peers[0].rx_bytes as f64 >= rx);
    assert!(status.packet_threads_alive && status.rendezvous.is_empty());
    let at = status.peers[0].last_handshake_unix.expect("handshake time");
    // The same handshake (or a later one), dated by two readings of the clock.
    assert!(at > handshake - 0.5, "status {at}, metrics {handshake}");

    // The daemon's own process.
    assert!(sample("process_resident_memory_bytes") > 1e6);
    assert!(sample("process_open_fds") >= 5.0);
    assert!(sample("process_cpu_seconds_total") >= 0.0);
    let started = sample("process_start_time_seconds");
    assert!(
        started > now - 600.0 && started <= now + 1.0,
        "start time {started}, now {now}"
    );

    // Probes.
    assert_eq!(get(gw_a, addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(gw_a, addr, "/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(get(gw_a, addr, "/favicon.ico").0, 404);

    // Only where asked: b has no metrics_listen, nothing listens there.
    assert!(
        gw_b.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
            .is_err(),
        "b serves metrics unasked"
    );
}

/// `/healthz` reflects the data path: once a packet thread is gone (here the
/// outbound one, whose interface was deleted under it), the gateway is
/// neither healthy nor ready, and the kubelet restarts it.
#[test]
fn healthz_fails_when_the_data_path_dies() {
    let listen = format!("{METRICS:?}");
    let p = Pair::start([&[("metrics_listen", listen.as_str())], &[]]);
    let gw_a = p.gateway(0);
    let addr: SocketAddr = METRICS.parse().expect("addr");
    assert_eq!(get(gw_a, addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(gw_a, addr, "/readyz").0, 200);

    gw_a.ip(&["link", "del", &p.ifnames[0]])
        .expect("delete the TUN");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while get(gw_a, addr, "/healthz").0 != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "/healthz still 200 with the data path dead"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        get(gw_a, addr, "/healthz"),
        (503, "data path down\n".to_owned())
    );
    assert_eq!(get(gw_a, addr, "/readyz").0, 503);
    assert!(!p.daemon(0).status().packet_threads_alive);
    // Metrics are still served, for the post-mortem.
    assert_eq!(get(gw_a, addr, "/metrics").0, 200);
}
