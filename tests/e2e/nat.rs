//! No public endpoint needed: sites behind real nftables NAT routers find
//! each other through a rendezvous in the internet namespace, punch holes
//! where the NATs allow it and relay where they don't.

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use causeway::keys;
use causeway::observe::PeerStatus;
use causeway_testbed::{Lab, LabSpec, Nat, Netns, SiteSpec};

use crate::common::*;

/// Two sites that know each other only by key, both registered with one
/// rendezvous.
struct NatPair {
    lab: Lab,
    rendezvous: Rendezvous,
    /// Keeps the sites' key and config files alive.
    files: Vec<SiteFiles>,
    configs: Vec<std::path::PathBuf>,
    daemons: Vec<Daemon>,
}

impl NatPair {
    fn new(nat_a: Option<Nat>, nat_b: Option<Nat>) -> NatPair {
        Self::new_with(nat_a, nat_b, |_, _| {})
    }

    /// Like [`NatPair::new`], calling `before` with the lab and the sites'
    /// files before the daemons start.
    fn new_with(
        nat_a: Option<Nat>,
        nat_b: Option<Nat>,
        before: impl FnOnce(&Lab, &[SiteFiles]),
    ) -> NatPair {
        let site = |name: &str, cidr: &str, nat: Option<Nat>| {
            let spec = SiteSpec::new(name, vec![cidr.parse().expect("cidr")]);
            match nat {
                Some(nat) => spec.nat(nat),
                None => spec,
            }
        };
        let lab = Lab::build(&LabSpec {
            sites: vec![
                site("a", "10.0.0.0/16", nat_a),
                site("b", "10.1.0.0/16", nat_b),
            ],
        })
        .expect("lab");
        ipv4_underlay_only(&lab);
        let files = vec![SiteFiles::new(), SiteFiles::new()];
        let ip = IpAddr::V4(lab.internet_addr());
        let rendezvous = Rendezvous::start(
            lab.internet(),
            ip,
            &[("a", &files[0].public_key), ("b", &files[1].public_key)],
        );
        let rdv = format!(
            "[[rendezvous]]\naddress = \"{}\"\npublic_key = {:?}\n",
            SocketAddr::new(ip, RENDEZVOUS_QUIC_PORT),
            rendezvous.public_key
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
        before(&lab, &files);
        let daemons = vec![
            Daemon::start(&lab.sites()[0].gateway, &files[0], &cfg_a),
            Daemon::start(&lab.sites()[1].gateway, &files[1], &cfg_b),
        ];
        NatPair {
            lab,
            rendezvous,
            files,
            configs: vec![cfg_a, cfg_b],
            daemons,
        }
    }

    fn peer(&self, site: usize) -> PeerStatus {
        self.daemons[site]
            .status()
            .peers
            .into_iter()
            .next()
            .expect("one peer")
    }

    /// Waits until site `site` sees its peer on `path`; returns the time it took.
    fn wait_path(&self, site: usize, path: &str, within: Duration) -> Duration {
        let t = Instant::now();
        if wait_until(within, || self.peer(site).path == path) {
            return t.elapsed();
        }
        panic!(
            "site {site} never reached path {path}: {:#?}\n--- daemon log:\n{}\n--- rendezvous log:\n{}\n{}",
            self.peer(site),
            self.daemons[site].log_text(),
            self.rendezvous.log_text(),
            router_conntrack(&self.lab)
        );
    }

    fn pods(&self) -> [(&Netns, std::net::Ipv4Addr); 2] {
        pods(&self.lab)
    }

    /// Sends `len` bytes over TCP from a's pod to b's, on what must be a
    /// direct path: the relay may carry fewer than 20 packets of it.
    fn assert_transfer_goes_direct(&self, len: usize) {
        let [(pod_a, _), (pod_b, addr_b)] = self.pods();
        let relayed = || self.peer(0).relay_tx_packets + self.peer(1).relay_tx_packets;
        let before = relayed();
        tcp_transfer(pod_b, addr_b, pod_a, len);
        let carried = relayed() - before;
        assert!(
            carried < 20,
            "the relay carried {carried} packets of a direct transfer"
        );
    }

    /// Waits until site `site` relays to its peer through a UDP relay
    /// port; returns the port.
    fn wait_relay_port(&self, site: usize, within: Duration) -> SocketAddr {
        if let Some(port) = poll(within, || self.peer(site).relay_port) {
            return port.parse().expect("relay port");
        }
        panic!(
            "site {site} never moved to a UDP relay port: {:#?}\n--- daemon log:\n{}\n--- rendezvous log:\n{}",
            self.peer(site),
            self.daemons[site].log_text(),
            self.rendezvous.log_text()
        );
    }

    /// WireGuard messages site `site` sent over the QUIC relay.
    fn quic_relayed(&self, site: usize) -> u64 {
        self.daemons[site]
            .status()
            .rendezvous
            .iter()
            .map(|r| r.relay_tx_packets)
            .sum()
    }
}

/// The lab routes IPv6 between sites without NAT (like most dual-stack
/// networks), which would let every pair punch through over IPv6. These
/// tests are about IPv4 NATs: take the gateways' IPv6 underlay away.
fn ipv4_underlay_only(lab: &Lab) {
    for site in lab.sites() {
        site.remove_ipv6_underlay().expect("flush IPv6");
    }
}

/// The first pod of each site, and its address.
fn pods(lab: &Lab) -> [(&Netns, std::net::Ipv4Addr); 2] {
    let pod = |i: usize| (&lab.sites()[i].pods[0].ns, lab.sites()[i].pods[0].addr);
    [pod(0), pod(1)]
}

#[test]
fn port_preserving_nats_punch_a_direct_path() {
    let pair = NatPair::new(Some(Nat::PortPreserving), Some(Nat::PortPreserving));
    let [(pod_a, _), (pod_b, addr_b)] = pair.pods();
    assert_ping(pod_a, addr_b.into());
    let took = pair.wait_path(0, "direct", Duration::from_secs(15));
    pair.wait_path(1, "direct", Duration::from_secs(15));
    eprintln!("direct path after {took:?}");
    pair.assert_transfer_goes_direct(16 << 20);
    // A direct path gets the tunnel's whole MSS (1420 - 40; TCP_MAXSEG
    // reports it less the 12 bytes of the timestamp option, on by default).
    let mss = tcp_mss(pod_b, addr_b.into(), pod_a, addr_b.into());
    assert!(mss == 1380 || mss == 1368, "MSS on the direct path: {mss}");
    // The direct endpoint is the other NAT's public address.
    let endpoint: SocketAddr = pair
        .peer(0)
        .endpoint
        .expect("endpoint")
        .parse()
        .expect("addr");
    assert_eq!(endpoint.ip(), pair.lab.sites()[1].public_addr);
    // (No leak assertion here: the internet namespace also counts the
    // probes sent to the peers' private host candidates, 172.16.x, which it
    // cannot route; they carry no pod traffic.)
}

/// Both routers' UDP conntrack entries, for a failure message.
fn router_conntrack(lab: &Lab) -> String {
    lab.sites()
        .iter()
        .filter_map(|site| {
            let router = site.nat_router.as_ref()?;
            let list = router
                .run("conntrack", &["-L", "-p", "udp"])
                .unwrap_or_else(|e| format!("conntrack -L: {e}"));
            Some(format!("--- conntrack of {}'s router:\n{list}", site.name))
        })
        .collect()
}

/// Routers without an input firewall take a peer's first probe to
/// themselves, and conntrack confirms it: the other site's own outbound
/// flow to the same addresses then collides and gets another port.
#[test]
fn routers_without_an_input_firewall_still_get_a_direct_path() {
    let nat = Some(Nat::PortPreservingNoInputFirewall);
    let pair = NatPair::new(nat, nat);
    let [(pod_a, _), (_, addr_b)] = pair.pods();
    let t = Instant::now();
    assert_ping(pod_a, addr_b.into());
    pair.wait_path(0, "direct", Duration::from_secs(15));
    pair.wait_path(1, "direct", Duration::from_secs(15));
    eprintln!("direct path after {:?}", t.elapsed());
    pair.assert_transfer_goes_direct(16 << 20);
    assert_eq!(pair.peer(0).path, "direct");
    assert_eq!(pair.peer(1).path, "direct");
}

#[test]
fn symmetric_nats_carry_everything_through_the_relay() {
    let pair = NatPair::new(Some(Nat::Symmetric), Some(Nat::Symmetric));
    let [(pod_a, addr_a), (pod_b, addr_b)] = pair.pods();
    let t = Instant::now();
    assert_ping(pod_a, addr_b.into());
    eprintln!("first ping through the relay after {:?}", t.elapsed());
    assert_ping(pod_b, addr_a.into());
    // The first relayed packets went over QUIC and asked for a UDP relay
    // port; both sites bind to it and move their traffic there.
    let port = pair.wait_relay_port(0, Duration::from_secs(10));
    pair.wait_relay_port(1, Duration::from_secs(10));
    eprintln!("on the UDP relay port after {:?}", t.elapsed());
    assert_eq!(
        port.ip(),
        pair.lab.internet_addr(),
        "a port of the rendezvous"
    );
    let quic_before = pair.quic_relayed(0);
    let port_before = pair.peer(0).relay_tx_packets;
    tcp_transfer(pod_b, addr_b, pod_a, 64 << 20);
    tcp_transfer(pod_a, addr_a, pod_b, 8 << 20);
    udp_exchange(pod_b, addr_b, pod_a, 300);
    let a = pair.peer(0);
    assert_eq!(a.path, "relay", "{a:?}");
    assert_eq!(a.relay_port, Some(port.to_string()), "{a:?}");
    // a sent the 64 MiB (and received the 8 MiB): all of it relayed, by
    // the UDP relay port, not over QUIC.
    let through_port = a.relay_tx_packets - port_before;
    let over_quic = pair.quic_relayed(0) - quic_before;
    assert!(through_port > 40_000 && a.relay_rx_packets > 5_000, "{a:?}");
    assert!(over_quic < 100, "{over_quic} packets went over QUIC: {a:?}");
    // The relay port carries whole datagrams: connections through it get
    // the tunnel's full MSS (1420 - 40, less 12 for TCP timestamps).
    let mss = tcp_mss(pod_b, addr_b.into(), pod_a, addr_b.into());
    assert!(
        mss == 1380 || mss == 1368,
        "MSS through the UDP relay: {mss}"
    );
}

/// A site behind an egress firewall that lets no UDP out joins through the
/// rendezvous over TLS on TCP (port 443); everything to its peer is relayed
/// that way.
#[test]
fn a_site_that_can_send_no_udp_joins_over_tls_on_tcp() {
    let pair = NatPair::new(Some(Nat::UdpBlocked), Some(Nat::PortPreserving));
    let started = Instant::now();
    let [(pod_a, addr_a), (pod_b, addr_b)] = pair.pods();
    assert_ping(pod_a, addr_b.into());
    eprintln!(
        "first packet through after {:?} from the daemons' start",
        started.elapsed()
    );
    let rendezvous = |site: usize| pair.daemons[site].status().rendezvous[0].clone();
    let over_tcp = rendezvous(0);
    assert!(over_tcp.connected, "{over_tcp:?}");
    assert_eq!(over_tcp.transport.as_deref(), Some("tcp"), "{over_tcp:?}");
    assert_eq!(rendezvous(1).transport.as_deref(), Some("quic"));
    let sent_before = over_tcp.relay_tx_packets;
    tcp_transfer(pod_b, addr_b, pod_a, 64 << 20);
    tcp_transfer(pod_a, addr_a, pod_b, 8 << 20);
    let a = pair.peer(0);
    assert_eq!(a.path, "relay", "{a:?}");
    assert_eq!(a.relay_port, None, "no UDP relay port without UDP: {a:?}");
    // a sent the 64 MiB over the TLS connection, nothing got out over UDP.
    let sent = rendezvous(0).relay_tx_packets - sent_before;
    assert!(sent > 40_000, "{sent} packets over TCP: {a:?}");
    assert_eq!(rendezvous(0).transport.as_deref(), Some("tcp"));

    // The firewall lets UDP out again: the site moves back to QUIC by
    // itself (it tries every 10 s), and the pair punches a direct path.
    let router = pair.lab.sites()[0].nat_router.as_ref().expect("a router");
    router
        .run(
            "nft",
            &[
                "insert", "rule", "inet", "filter", "forward", "oifname", "wan0", "meta",
                "l4proto", "udp", "accept",
            ],
        )
        .expect("nft");
    let opened = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || {
            rendezvous(0).transport.as_deref() == Some("quic")
        }),
        "still {:?}\n{}",
        rendezvous(0),
        pair.daemons[0].log_text()
    );
    eprintln!("back on QUIC {:?} after UDP was let out", opened.elapsed());
    let direct = pair.wait_path(0, "direct", Duration::from_secs(20));
    eprintln!("direct path {direct:?} later");
    assert_ping(pod_a, addr_b.into());
}

#[test]
fn symmetric_meets_cone_and_public_meets_symmetric() {
    // A symmetric NAT against an address-and-port-filtering NAT: no hole
    // can be punched, the relay carries it.
    let pair = NatPair::new(Some(Nat::Symmetric), Some(Nat::PortPreserving));
    let [(pod_a, _), (_, addr_b)] = pair.pods();
    assert_ping(pod_a, addr_b.into());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pair.peer(0).path, "relay");
    drop(pair);

    // A site with a public address: the symmetric side reaches it directly.
    let pair = NatPair::new(None, Some(Nat::Symmetric));
    let [(pod_a, _), (_, addr_b)] = pair.pods();
    assert_ping(pod_a, addr_b.into());
    pair.wait_path(0, "direct", Duration::from_secs(15));
    pair.wait_path(1, "direct", Duration::from_secs(15));
}

/// Sends WireGuard handshake initiations with a valid mac1 (anyone who
/// knows the site's public key can) from a pod of the site to its
/// gateway's UDP port, about `per_second`, until dropped.
struct Flood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(lab: &Lab, site: usize, public_key: &str, per_second: u32) -> Flood {
        use std::sync::atomic::Ordering::Relaxed;
        let target = SocketAddr::new(lab.sites()[site].wan_addr, PORT);
        let socket = lab.sites()[site].pods[0]
            .ns
            .enter(|| std::net::UdpSocket::bind("0.0.0.0:0").expect("bind"));
        let key = keys::decode_public(public_key).expect("key");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            // One initiation, sent again and again: its mac1 stays valid,
            // and each copy counts against the site's handshake rate.
            let mut tunn = boringtun::noise::Tunn::new(keys::generate(), key, None, None, 7, None);
            let mut buf = [0u8; 256];
            let boringtun::noise::TunnResult::WriteToNetwork(init) =
                tunn.format_handshake_initiation(&mut buf, true)
            else {
                panic!("no initiation");
            };
            // In batches every 10 ms.
            let batch = per_second.div_ceil(100);
            let start = Instant::now();
            let mut n = 0u32;
            while !stop2.load(Relaxed) {
                for _ in 0..batch {
                    if socket.send_to(init, target).is_ok() {
                        sent2.fetch_add(1, Relaxed);
                    }
                }
                n += 1;
                let due = start + Duration::from_millis(10) * n;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        });
        Flood {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn relayed_sites_handshake_while_a_flood_of_initiations_hits_one() {
    // 5000 mac1-valid initiations a second at site a's UDP port, from
    // before the daemons start: a's handshake rate limiter (1000 a second) is
    // under load within milliseconds of each window, so every handshake
    // needs a cookie, also the ones through the relay.
    let mut flood = None;
    let pair = NatPair::new_with(Some(Nat::Symmetric), Some(Nat::Symmetric), |lab, files| {
        flood = Some(Flood::start(lab, 0, &files[0].public_key, 5000));
        std::thread::sleep(Duration::from_millis(500));
    });
    let [(pod_a, addr_a), (pod_b, addr_b)] = pair.pods();
    let t = Instant::now();
    assert!(
        ping_until(pod_b, addr_a.into(), Duration::from_secs(20)).is_some(),
        "no tunnel under the flood:\n{}",
        pair.daemons[0].log_text()
    );
    eprintln!(
        "first ping through the relay under the flood after {:?}",
        t.elapsed()
    );
    // And it keeps working: every second for 10 s, both ways.
    for _ in 0..10 {
        assert_ping(pod_a, addr_b.into());
        assert_ping(pod_b, addr_a.into());
        std::thread::sleep(Duration::from_millis(800));
    }
    let flood = flood.as_ref().expect("flood");
    let a = pair.peer(0);
    assert_eq!(a.path, "relay", "{a:?}");
    assert!(flood.sent() > 30_000, "flood sent {}", flood.sent());
    eprintln!("flood: {} initiations sent", flood.sent());
}

#[test]
fn nat_rebinding_under_a_ping_train_heals_within_3_seconds() {
    let pair = NatPair::new(Some(Nat::PortPreserving), Some(Nat::PortPreserving));
    let [(pod_a, _), (_, addr_b)] = pair.pods();
    assert_ping(pod_a, addr_b.into());
    pair.wait_path(0, "direct", Duration::from_secs(15));
    pair.wait_path(1, "direct", Duration::from_secs(15));
    // Site a's pod pings b's every 20 ms. After 4 s one NAT router moves
    // to a new public port and forgets every mapping: first the pinging
    // side's, then the answering side's.
    for (site, port) in [(0, 40001), (1, 40002)] {
        let (gap, replies) = ping_train(
            pod_a,
            addr_b,
            Duration::from_secs(12),
            Duration::from_secs(4),
            || {
                pair.lab.sites()[site].rebind_nat(port).expect("rebind");
            },
        );
        eprintln!("NAT of site {site} rebound: longest gap {gap:?}, {replies} replies");
        assert!(
            gap <= Duration::from_secs(3),
            "NAT of site {site} rebound: {gap:?} without a reply\n--- a:\n{}\n--- b:\n{}",
            pair.daemons[0].log_text(),
            pair.daemons[1].log_text()
        );
        // And the direct path is back, through the new port.
        pair.wait_path(0, "direct", Duration::from_secs(5));
        pair.wait_path(1, "direct", Duration::from_secs(5));
    }
}

#[test]
fn kill_9_and_restart_of_a_gateway_under_a_ping_train() {
    let mut pair = NatPair::new(Some(Nat::PortPreserving), Some(Nat::PortPreserving));
    let addr_b = pair.lab.sites()[1].pods[0].addr;
    assert_ping(&pair.lab.sites()[0].pods[0].ns, addr_b.into());
    pair.wait_path(0, "direct", Duration::from_secs(15));
    pair.wait_path(1, "direct", Duration::from_secs(15));
    // a's pod pings b's every 20 ms; after 3 s one gateway's daemon is
    // killed with SIGKILL and started again at once: b's (the answering
    // side), then a's (the pinging side).
    let NatPair {
        lab,
        files,
        configs,
        daemons,
        ..
    } = &mut pair;
    for site in [1, 0] {
        let mut down = Duration::ZERO;
        let (gap, replies) = ping_train(
            &lab.sites()[0].pods[0].ns,
            addr_b,
            Duration::from_secs(10),
            Duration::from_secs(3),
            || {
                let t = Instant::now();
                daemons[site].child.kill9().expect("kill -9");
                daemons[site] =
                    Daemon::start(&lab.sites()[site].gateway, &files[site], &configs[site]);
                down = t.elapsed();
            },
        );
        eprintln!(
            "kill -9 and restart of site {site}: longest gap {gap:?} ({down:?} from the kill until the new daemon answered its socket), {replies} replies"
        );
        assert!(
            gap.saturating_sub(down) <= Duration::from_secs(3),
            "site {site}: {gap:?} without a reply, {down:?} of it down\n--- a:\n{}\n--- b:\n{}",
            daemons[0].log_text(),
            daemons[1].log_text()
        );
    }
}

#[test]
fn a_conntrack_flush_mid_transfer_is_survived() {
    let pair = NatPair::new(Some(Nat::PortPreserving), Some(Nat::PortPreserving));
    let [(pod_a, _), (pod_b, addr_b)] = pair.pods();
    assert_ping(pod_a, addr_b.into());
    pair.wait_path(0, "direct", Duration::from_secs(15));
    let _server = pod_b
        .spawn(
            pod_b
                .command("iperf3")
                .args(["-s", "-1", "-B", &addr_b.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    let mut client = pod_a
        .spawn(
            pod_a
                .command("iperf3")
                .args(["-c", &addr_b.to_string(), "-t", "8", "-b", "50M", "--json"])
                .stdout(Stdio::piped()),
        )
        .expect("iperf3 -c");
    std::thread::sleep(Duration::from_secs(2));
    for site in pair.lab.sites() {
        site.flush_nat_mappings().expect("conntrack flush");
    }
    let status = client
        .wait_timeout(Duration::from_secs(40))
        .expect("wait")
        .expect("iperf3 ended");
    let mut json = String::new();
    std::io::Read::read_to_string(client.child().stdout.as_mut().expect("stdout"), &mut json)
        .expect("read");
    assert!(
        status.success(),
        "transfer broke after the conntrack flush: {json}"
    );
    assert_ping(pod_a, addr_b.into());
}

#[test]
fn a_rendezvous_restart_spares_direct_paths_and_relayed_ones_come_back() {
    // Direct: keeps working while the rendezvous is down.
    let mut pair = NatPair::new(Some(Nat::PortPreserving), Some(Nat::PortPreserving));
    let [(pod_a, _), (_, addr_b)] = pods(&pair.lab);
    assert_ping(pod_a, addr_b.into());
    pair.wait_path(0, "direct", Duration::from_secs(15));
    pair.rendezvous.stop();
    for _ in 0..10 {
        assert!(
            pod_a
                .ping(addr_b.into(), Duration::from_secs(1))
                .expect("ping")
                .is_some(),
            "direct path broke with the rendezvous"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(pair);

    // Relayed: stops with the rendezvous, resumes after its restart.
    let mut pair = NatPair::new(Some(Nat::Symmetric), Some(Nat::Symmetric));
    let [(pod_a, _), (_, addr_b)] = pods(&pair.lab);
    assert_ping(pod_a, addr_b.into());
    pair.rendezvous.stop();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        pod_a
            .ping(addr_b.into(), Duration::from_secs(1))
            .expect("ping")
            .is_none(),
        "relayed without a relay?"
    );
    pair.rendezvous.restart(pair.lab.internet());
    assert!(
        ping_until(pod_a, addr_b.into(), Duration::from_secs(45)).is_some(),
        "relay did not come back:\n{}",
        pair.daemons[0].log_text()
    );
}

#[test]
fn unknown_sites_and_impostor_rendezvous_are_refused() {
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("a", vec!["10.0.0.0/16".parse().expect("cidr")]).nat(Nat::PortPreserving),
            SiteSpec::new("b", vec!["10.1.0.0/16".parse().expect("cidr")]).nat(Nat::PortPreserving),
        ],
    })
    .expect("lab");
    ipv4_underlay_only(&lab);
    let files = [SiteFiles::new(), SiteFiles::new()];
    let ip = IpAddr::V4(lab.internet_addr());
    // The rendezvous serves only b; a is a stranger.
    let rendezvous = Rendezvous::start(lab.internet(), ip, &[("b", &files[1].public_key)]);
    let rdv = |key: &str| {
        format!(
            "[[rendezvous]]\naddress = \"{}\"\npublic_key = {key:?}\n",
            SocketAddr::new(ip, RENDEZVOUS_QUIC_PORT)
        )
    };
    let cfg_a = files[0].write_config(
        "a",
        &["10.0.0.0/16"],
        &(peer_toml("b", &files[1].public_key, &["10.1.0.0/16"], None)
            + &rdv(&rendezvous.public_key)),
    );
    // b pins the wrong rendezvous key.
    let wrong = keys::encode_public(&x25519_dalek::PublicKey::from(&keys::generate()));
    let cfg_b = files[1].write_config(
        "b",
        &["10.1.0.0/16"],
        &(peer_toml("a", &files[0].public_key, &["10.0.0.0/16"], None) + &rdv(&wrong)),
    );
    let da = Daemon::start(&lab.sites()[0].gateway, &files[0], &cfg_a);
    let db = Daemon::start(&lab.sites()[1].gateway, &files[1], &cfg_b);
    let (pod_a, addr_b) = (&lab.sites()[0].pods[0].ns, lab.sites()[1].pods[0].addr);
    assert!(
        ping_until(pod_a, addr_b.into(), Duration::from_secs(4)).is_none(),
        "traffic flowed without authorization"
    );
    let (mut log_a, mut log_b) = (String::new(), String::new());
    wait_until(Duration::from_secs(10), || {
        (log_a, log_b) = (da.log_text(), db.log_text());
        log_a.to_lowercase().contains("unknown site")
            && log_b.to_lowercase().contains("rendezvous key")
    });
    assert!(
        log_a.to_lowercase().contains("unknown site"),
        "stranger not told clearly:\n{log_a}"
    );
    assert!(
        log_b.to_lowercase().contains("rendezvous key"),
        "impostor rendezvous not named:\n{log_b}"
    );
    assert_eq!(
        da.status().peers[0].relay_rx_packets + db.status().peers[0].relay_rx_packets,
        0
    );
}

#[test]
fn with_two_rendezvous_servers_either_one_is_enough() {
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("a", vec!["10.0.0.0/16".parse().expect("cidr")]).nat(Nat::Symmetric),
            SiteSpec::new("b", vec!["10.1.0.0/16".parse().expect("cidr")]).nat(Nat::Symmetric),
        ],
    })
    .expect("lab");
    ipv4_underlay_only(&lab);
    let files = [SiteFiles::new(), SiteFiles::new()];
    let ip = IpAddr::V4(lab.internet_addr());
    let sites = [
        ("a", files[0].public_key.as_str()),
        ("b", files[1].public_key.as_str()),
    ];
    let mut first = Rendezvous::start(lab.internet(), ip, &sites);
    let second = Rendezvous::start_on(
        lab.internet(),
        ip,
        RENDEZVOUS_QUIC_PORT + 1,
        RENDEZVOUS_STUN_PORT + 1,
        RENDEZVOUS_TCP_PORT + 1,
        &sites,
        &[],
    );
    let rdv = format!(
        "[[rendezvous]]\naddress = \"{}\"\npublic_key = {:?}\n\n[[rendezvous]]\naddress = \"{}\"\npublic_key = {:?}\nstun = \"{}\"\n",
        SocketAddr::new(ip, RENDEZVOUS_QUIC_PORT),
        first.public_key,
        SocketAddr::new(ip, RENDEZVOUS_QUIC_PORT + 1),
        second.public_key,
        SocketAddr::new(ip, RENDEZVOUS_STUN_PORT + 1),
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
    let _da = Daemon::start(&lab.sites()[0].gateway, &files[0], &cfg_a);
    let _db = Daemon::start(&lab.sites()[1].gateway, &files[1], &cfg_b);
    let [(pod_a, _), (_, addr_b)] = pods(&lab);
    assert_ping(pod_a, addr_b.into());
    // Symmetric NATs: everything is relayed; losing one server is survived.
    first.stop();
    assert!(
        ping_until(pod_a, addr_b.into(), Duration::from_secs(5)).is_some(),
        "the second rendezvous did not take over"
    );
    tcp_transfer(&lab.sites()[1].pods[0].ns, addr_b, pod_a, 4 << 20);
}

/// The address miniupnpd hands out as the external one: not in any range
/// miniupnpd 2.3.1 calls reserved (the lab's 198.18.0.0/15 is, and that
/// version has no `ext_allow_private_ipv4`), routed from the lab's
/// internet to site a's NAT router and never beyond the lab.
const MAPPED_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 20, 1, 2);

/// A real miniupnpd (NAT-PMP and PCP) on site 0's NAT router, with its own
/// config file and nftables table. Stopped by its PID when dropped (the
/// lab's teardown kills whatever is left in its namespaces, too).
struct Miniupnpd {
    /// Stopped when dropped.
    _child: causeway_testbed::ChildGuard,
    dir: tempfile::TempDir,
}

impl Miniupnpd {
    /// Sets the router up for it and starts it; waits until it listens.
    fn start(lab: &Lab) -> Miniupnpd {
        let site = &lab.sites()[0];
        let router = site.nat_router.as_ref().expect("site a has a NAT router");
        // The external address: on the router's WAN link, routed to it and
        // let through by the internet's leak filter.
        let mapped = MAPPED_IP.to_string();
        router
            .ip(&["addr", "add", &format!("{mapped}/32"), "dev", "wan0"])
            .expect("external address");
        let wan = site.public_addr.to_string();
        lab.internet()
            .ip(&["route", "add", &format!("{mapped}/32"), "via", &wan])
            .expect("route to the external address");
        lab.internet()
            .run_with_input(
                "nft",
                &["-f", "-"],
                &format!(
                    "insert rule inet causeway_lab prerouting ip daddr {mapped} accept\n\
                     insert rule inet causeway_lab prerouting ip saddr {mapped} accept\n"
                ),
            )
            .expect("internet filter");
        // Mapped inbound traffic is new, not established: let what
        // miniupnpd forwards through the lab router's own forward chain.
        // miniupnpd's table and chains (it adds rules, not chains).
        router
            .run_with_input(
                "nft",
                &["-f", "-"],
                "insert rule inet filter forward ct status dnat accept\n\
                 table inet miniupnpd {\n\
                   chain forward { type filter hook forward priority filter; policy accept; jump forward_mu; }\n\
                   chain forward_mu { }\n\
                   chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump prerouting_mu; }\n\
                   chain prerouting_mu { }\n\
                   chain postrouting { type nat hook postrouting priority srcnat; policy accept; jump postrouting_mu; }\n\
                   chain postrouting_mu { }\n\
                 }\n",
            )
            .expect("miniupnpd's nftables table");
        let dir = tempfile::tempdir().expect("tempdir");
        let lan = format!("{}/24", site.wan_addr);
        let config = format!(
            "ext_ifname=wan0\n\
             ext_ip={mapped}\n\
             listening_ip=lan0\n\
             enable_natpmp=yes\n\
             enable_upnp=no\n\
             secure_mode=yes\n\
             upnp_table_name=miniupnpd\n\
             upnp_nat_table_name=miniupnpd\n\
             upnp_forward_chain=forward_mu\n\
             upnp_nat_chain=prerouting_mu\n\
             upnp_nat_postrouting_chain=postrouting_mu\n\
             allow 1024-65535 {lan} 1024-65535\n\
             deny 0-65535 0.0.0.0/0 0-65535\n"
        );
        std::fs::write(dir.path().join("miniupnpd.conf"), config).expect("config");
        let log = std::fs::File::create(dir.path().join("miniupnpd.log")).expect("log");
        let mut cmd = router.command("miniupnpd");
        cmd.arg("-d")
            .arg("-f")
            .arg(dir.path().join("miniupnpd.conf"))
            .arg("-P")
            .arg(dir.path().join("miniupnpd.pid"))
            .stdout(Stdio::null())
            .stderr(log);
        let upnp = Miniupnpd {
            _child: router.spawn(&mut cmd).expect("spawn miniupnpd"),
            dir,
        };
        assert!(
            wait_until(Duration::from_secs(5), || upnp
                .log_text()
                .contains("Listening for NAT-PMP/PCP traffic")),
            "miniupnpd did not start:\n{}",
            upnp.log_text()
        );
        upnp
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("miniupnpd.log")).unwrap_or_default()
    }
}

#[test]
fn a_port_mapping_on_the_router_gives_symmetric_nats_a_direct_path() {
    // Both NATs symmetric: alone, they force the relay (see
    // `symmetric_nats_carry_everything_through_the_relay`). Site a's router
    // runs miniupnpd: a asks it (PCP) to map its WireGuard port and offers
    // the mapping; b's probes to it get through, and both go direct.
    let mut upnp = None;
    let mut pair = NatPair::new_with(Some(Nat::Symmetric), Some(Nat::Symmetric), |lab, _| {
        upnp = Some(Miniupnpd::start(lab));
    });
    // (Declared after the pair: on failure, stopped before the lab goes.)
    let upnp = upnp.expect("miniupnpd");
    let t = Instant::now();
    let mapped = poll(Duration::from_secs(10), || {
        pair.daemons[0].status().port_mapping
    })
    .unwrap_or_else(|| {
        panic!(
            "no port mapping:\n--- daemon log:\n{}\n--- miniupnpd log:\n{}",
            pair.daemons[0].log_text(),
            upnp.log_text()
        )
    })
    .parse::<SocketAddr>()
    .expect("mapped address");
    eprintln!("port mapping {mapped} after {:?}", t.elapsed());
    assert_eq!(mapped.ip(), IpAddr::V4(MAPPED_IP));
    assert!(
        pair.daemons[0]
            .log_text()
            .contains("port mapping of the WireGuard port obtained"),
        "{}",
        pair.daemons[0].log_text()
    );
    let [(pod_a, _), (_, addr_b)] = pair.pods();
    assert_ping(pod_a, addr_b.into());
    let took = pair.wait_path(1, "direct", Duration::from_secs(20));
    pair.wait_path(0, "direct", Duration::from_secs(20));
    eprintln!("direct path after {took:?} more");
    // b reaches a at the mapped address; a answers b where b's pings come
    // from (their source through b's symmetric NAT).
    let b = pair.peer(1);
    assert!(b.candidates.contains(&mapped.to_string()), "{b:?}");
    assert_eq!(b.endpoint, Some(mapped.to_string()), "{b:?}");
    pair.assert_transfer_goes_direct(16 << 20);
    // Nothing dropped as a bad answer from the router.
    let status = pair.daemons[0].status();
    assert_eq!(status.drops.get("port_mapping"), None, "{status:?}");
    // Killed with SIGKILL (no delete) and started again, a's daemon gets
    // the same mapping back: its PCP nonce is the same (miniupnpd 2.3.1
    // would hand the port to a new nonce of the same client too; a strict
    // RFC 6887 server refuses it while the old mapping lives).
    pair.daemons[0].child.kill9().expect("kill -9");
    pair.daemons[0] = Daemon::start(
        &pair.lab.sites()[0].gateway,
        &pair.files[0],
        &pair.configs[0],
    );
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || {
            pair.daemons[0].status().port_mapping == Some(mapped.to_string())
        }),
        "no port mapping after a restart:\n--- daemon log:\n{}\n--- miniupnpd log:\n{}",
        pair.daemons[0].log_text(),
        upnp.log_text()
    );
    eprintln!(
        "the same port mapping after a kill -9 and restart: {:?}",
        t.elapsed()
    );
    // Stopping a's daemon deletes the mapping (lifetime 0).
    pair.daemons.remove(0).stop();
    assert!(
        wait_until(Duration::from_secs(3), || upnp
            .log_text()
            .contains("mapping removed")),
        "the mapping was not deleted:\n{}",
        upnp.log_text()
    );
}

/// Runs `mapper` against the server at the other end of `socket` until it
/// maps or `within` passes; `first` is fed to it before any real answer.
fn map_with(
    socket: &std::net::UdpSocket,
    mapper: &mut causeway_nat::portmap::PortMapper,
    first: Option<&[u8]>,
    within: Duration,
) -> causeway_nat::portmap::Mapping {
    use causeway_nat::portmap::Event;
    let t = Instant::now();
    let mut buf = [0u8; 1100];
    if let Some(answer) = first {
        while mapper.poll_transmit().is_some() {}
        mapper
            .handle_response(Instant::now(), answer)
            .expect("the fake answer");
    }
    loop {
        while let Some(d) = mapper.poll_transmit() {
            socket.send(&d).expect("send to miniupnpd");
        }
        if let Some(event) = mapper.poll_event() {
            match event {
                Event::Mapped(mapping) => return mapping,
                other => panic!("{other:?}"),
            }
        }
        assert!(t.elapsed() < within, "no mapping within {within:?}");
        let wait = mapper
            .poll_timeout()
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(wait)).expect("timeout");
        match socket.recv(&mut buf) {
            Ok(n) => mapper
                .handle_response(Instant::now(), &buf[..n])
                .expect("miniupnpd's answer"),
            Err(_) => mapper.handle_timeout(Instant::now()),
        }
    }
}

#[test]
fn the_port_mapper_speaks_pcp_and_nat_pmp_with_a_real_miniupnpd() {
    use causeway_nat::portmap::{self, MapperConfig, PortMapper, Protocol};
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("a", vec!["10.0.0.0/16".parse().expect("cidr")]).nat(Nat::Symmetric),
        ],
    })
    .expect("lab");
    let upnp = Miniupnpd::start(&lab);
    let site = &lab.sites()[0];
    let IpAddr::V4(client) = site.wan_addr else {
        panic!("IPv4 gateway")
    };
    let router = std::net::Ipv4Addr::new(172, 16, 1, 1);
    let socket = site.gateway.enter(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.connect((router, portmap::SERVER_PORT)).expect("connect");
        s
    });
    // PCP, as the daemon does.
    let mut pcp = PortMapper::new(MapperConfig::new(40000, client), [3; 12], Instant::now());
    let mapping = map_with(&socket, &mut pcp, None, Duration::from_secs(5));
    eprintln!("PCP: {mapping:?}");
    assert_eq!(mapping.protocol, Protocol::Pcp);
    assert_eq!(*mapping.external.ip(), MAPPED_IP);
    // NAT-PMP, after a (fake) PCP UNSUPP_VERSION answer, as from a
    // NAT-PMP-only router.
    let mut pmp = PortMapper::new(MapperConfig::new(40001, client), [4; 12], Instant::now());
    let unsupported = [0, 129, 0, 1, 0, 0, 0, 0];
    let mapping = map_with(
        &socket,
        &mut pmp,
        Some(&unsupported),
        Duration::from_secs(5),
    );
    eprintln!("NAT-PMP: {mapping:?}");
    assert_eq!(mapping.protocol, Protocol::NatPmp);
    assert_eq!(*mapping.external.ip(), MAPPED_IP);
    // miniupnpd forwards both ports now.
    let miniupnpd_rules = || {
        site.nat_router
            .as_ref()
            .expect("router")
            .run(
                "nft",
                &["list", "chain", "inet", "miniupnpd", "prerouting_mu"],
            )
            .expect("nft")
    };
    let rules = miniupnpd_rules();
    for port in [40000, 40001] {
        assert!(rules.contains(&format!(":{port}")), "{rules}");
    }
    // Deleting both (lifetime 0) leaves no forward behind.
    for delete in [pcp.delete_request(), pmp.delete_request()] {
        socket.send(&delete.expect("a mapping")).expect("send");
    }
    assert!(
        wait_until(Duration::from_secs(3), || !miniupnpd_rules()
            .contains("dnat")),
        "still forwarded:\n{}\n--- miniupnpd:\n{}",
        miniupnpd_rules(),
        upnp.log_text()
    );
}
