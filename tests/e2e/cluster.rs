//! Cluster sites: the gateway runs on node 0 with `[cluster]`, a node agent
//! (`causeway node`) on every node. Pods on non-gateway nodes reach pods on
//! non-gateway nodes of another cluster through views, with no hand-made
//! route: the node agents learn the views from the gateway.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use causeway_testbed::{ClusterSpec, IpNet, Lab, LabSpec, Nat, Netns, SiteSpec};

use crate::common::*;

/// The destinations of the node agent's routes (`proto 202`) in `ns`.
fn node_routes(ns: &Netns) -> Vec<String> {
    ns.ip(&["route", "show", "proto", "202"])
        .expect("ip route")
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The full lines of the node agent's routes in `ns`.
fn node_route_lines(ns: &Netns) -> String {
    ns.ip(&["route", "show", "proto", "202"]).expect("ip route")
}

fn has_nft_table(ns: &Netns) -> bool {
    ns.run("nft", &["list", "table", "inet", "causeway_node"])
        .is_ok()
}

/// Waits until `ns` has exactly the node routes `want` (as strings);
/// returns how long that took.
fn wait_routes(ns: &Netns, want: &[IpNet], within: Duration, agent: &NodeAgent) -> Duration {
    let mut want: Vec<String> = want.iter().map(|n| n.to_string()).collect();
    want.sort();
    let t = Instant::now();
    loop {
        let mut have = node_routes(ns);
        have.sort();
        if have == want {
            return t.elapsed();
        }
        if t.elapsed() > within {
            panic!(
                "{}: node routes {have:?}, want {want:?} after {within:?}\n--- node agent log:\n{}",
                ns.name(),
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Counts, in the internet namespace, packets from or to pod or view
/// addresses (installed by [`Clusters::build`] before any daemon runs).
fn count_plaintext(lab: &Lab) {
    lab.internet()
        .run_with_input(
            "nft",
            &["-f", "-"],
            "table inet cluster_test_leaks {\n counter plaintext {}\n chain pre {\n  type filter hook prerouting priority raw - 10; policy accept;\n  ip saddr { 10.0.0.0/8, 100.64.0.0/10 } counter name plaintext\n  ip daddr { 10.0.0.0/8, 100.64.0.0/10 } counter name plaintext\n }\n}\n",
        )
        .expect("leak counter");
}

fn plaintext_leaks(lab: &Lab) -> u64 {
    let out = lab
        .internet()
        .run(
            "nft",
            &["list", "counter", "inet", "cluster_test_leaks", "plaintext"],
        )
        .expect("leak counter");
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("counter output {out:?}"))
}

/// The view site `viewer`'s daemon gives peer `peer`.
fn view_of(daemon: &Daemon, peer: &str) -> IpNet {
    let status = daemon.status();
    let p = status
        .peers
        .iter()
        .find(|p| p.name == peer)
        .unwrap_or_else(|| panic!("peer {peer} in status: {status:?}"));
    p.views[0].view.parse().expect("view cidr")
}

/// `addr` inside the /16 `real` as seen through the /16 `view`.
fn through(addr: Ipv4Addr, view: IpNet) -> IpAddr {
    let IpNet::V4(v) = view else {
        panic!("IPv4 view expected")
    };
    let host = u32::from(addr) & 0xffff;
    IpAddr::V4((u32::from(v.network()) | host).into())
}

/// Two cluster sites `a` (4 nodes, node 3 routed) and `b` (3 nodes), both
/// behind NATs, both using the pod CIDR 10.0.0.0/16, and a plain site `c`
/// with the same pod CIDR; one rendezvous. The gateways run on node 0 with
/// `[cluster]`; `a` knows only `b` at first, `c` knows `a`.
struct Clusters {
    lab: Lab,
    _rendezvous: Rendezvous,
    files: Vec<SiteFiles>,
    configs: Vec<PathBuf>,
    daemons: Vec<Daemon>,
    secret_dir: tempfile::TempDir,
    /// Site a's config text without and with peer c.
    a_with_c: String,
    /// The `[[rendezvous]]` table of every site.
    rdv: String,
}

const POD_CIDR: &str = "10.0.0.0/16";

impl Clusters {
    fn build() -> Clusters {
        let cidr = || vec![POD_CIDR.parse().expect("cidr")];
        let lab = Lab::build(&LabSpec {
            sites: vec![
                SiteSpec::new("a", cidr())
                    .nat(Nat::PortPreserving)
                    .cluster(ClusterSpec::new(4, 2).routed_nodes(1)),
                SiteSpec::new("b", cidr())
                    .nat(Nat::PortPreserving)
                    .cluster(ClusterSpec::new(3, 1)),
                SiteSpec::new("c", cidr()).nat(Nat::PortPreserving),
            ],
        })
        .expect("lab");
        for site in lab.sites() {
            site.remove_ipv6_underlay().expect("flush IPv6");
        }
        count_plaintext(&lab);
        let files = vec![SiteFiles::new(), SiteFiles::new(), SiteFiles::new()];
        let ip = IpAddr::V4(lab.internet_addr());
        let rendezvous = Rendezvous::start(
            lab.internet(),
            ip,
            &[
                ("a", &files[0].public_key),
                ("b", &files[1].public_key),
                ("c", &files[2].public_key),
            ],
        );
        let rdv = format!(
            "[[rendezvous]]\naddress = \"{}\"\npublic_key = {:?}\n\n",
            SocketAddr::new(ip, RENDEZVOUS_QUIC_PORT),
            rendezvous.public_key
        );
        let secret_dir = tempfile::tempdir().expect("tempdir");
        let secret = secret_dir.path().join("cluster.secret");
        std::fs::write(&secret, "a cluster secret of the test, 32 bytes+\n").expect("secret");
        let cluster = |site: &str| {
            let node0 = lab
                .site(site)
                .cluster
                .as_ref()
                .expect("cluster")
                .node(0)
                .addr;
            format!("[cluster]\nlisten = \"{node0}:{CLUSTER_PORT}\"\nsecret_file = {secret:?}\n")
        };
        let peer = |i: usize, name: &str| peer_toml(name, &files[i].public_key, &[POD_CIDR], None);
        let a_text = peer(1, "b") + &rdv + &cluster("a");
        let a_with_c = peer(1, "b") + &peer(2, "c") + &rdv + &cluster("a");
        let configs = vec![
            files[0].write_config("a", &[POD_CIDR], &a_text),
            files[1].write_config("b", &[POD_CIDR], &(peer(0, "a") + &rdv + &cluster("b"))),
            files[2].write_config("c", &[POD_CIDR], &(peer(0, "a") + &rdv)),
        ];
        let daemons = (0..3)
            .map(|i| Daemon::start(&lab.sites()[i].gateway, &files[i], &configs[i]))
            .collect();
        Clusters {
            lab,
            _rendezvous: rendezvous,
            files,
            configs,
            daemons,
            secret_dir,
            a_with_c,
            rdv,
        }
    }

    fn node(&self, site: &str, i: usize) -> &causeway_testbed::Node {
        self.lab
            .site(site)
            .cluster
            .as_ref()
            .expect("cluster")
            .node(i)
    }

    fn secret(&self) -> PathBuf {
        self.secret_dir.path().join("cluster.secret")
    }

    /// Starts a node agent on every node of `site`, watching node 0's
    /// gateway.
    fn agents(&self, site: &str) -> Vec<NodeAgent> {
        let cluster = self.lab.site(site).cluster.as_ref().expect("cluster");
        self.agents_watching(site, &[cluster.node(0).addr])
    }

    /// Starts a node agent on every node of `site`, watching `gateways`.
    fn agents_watching(&self, site: &str, gateways: &[Ipv4Addr]) -> Vec<NodeAgent> {
        let cluster = self.lab.site(site).cluster.as_ref().expect("cluster");
        cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                NodeAgent::start(
                    &n.ns,
                    self.secret_dir.path(),
                    &format!("{site}-node{i}"),
                    gateways,
                    &self.secret(),
                )
            })
            .collect()
    }
}

#[test]
fn pods_on_non_gateway_nodes_reach_each_other_through_views_and_a_reload_adds_a_site_within_a_second()
 {
    let c = Clusters::build();
    let agents_a = c.agents("a");
    let agents_b = c.agents("b");
    let b_in_a = view_of(&c.daemons[0], "b");
    let a_in_b = view_of(&c.daemons[1], "a");

    // Every non-gateway node gets exactly one route per view; the gateway
    // node none (its own TUN routes carry the traffic).
    for (i, agent) in agents_a.iter().enumerate().skip(1) {
        wait_routes(
            &c.node("a", i).ns,
            &[b_in_a],
            Duration::from_secs(10),
            agent,
        );
    }
    for (i, agent) in agents_b.iter().enumerate().skip(1) {
        wait_routes(
            &c.node("b", i).ns,
            &[a_in_b],
            Duration::from_secs(10),
            agent,
        );
    }
    assert!(node_routes(&c.node("a", 0).ns).is_empty());
    // Node 2 is on the gateway's L2: straight via the gateway's address.
    // Node 3 is routed: through the VXLAN device.
    let direct = node_route_lines(&c.node("a", 2).ns);
    assert!(
        direct.contains(&format!("via {}", c.node("a", 0).addr))
            && direct.contains("metric 100000"),
        "{direct}"
    );
    let vxlan = node_route_lines(&c.node("a", 3).ns);
    assert!(vxlan.contains("dev causeway-vx"), "{vxlan}");
    assert!(has_nft_table(&c.node("a", 0).ns));

    // Pod on a's node 2 ↔ pod on b's node 2: the same real address in both
    // sites, each reached at its view.
    let pod_a = &c.node("a", 2).pods[0];
    let pod_b = &c.node("b", 2).pods[0];
    assert_eq!(pod_a.addr, pod_b.addr, "overlapping pod CIDRs");
    assert_ping(&pod_a.ns, through(pod_b.addr, b_in_a));
    assert_ping(&pod_b.ns, through(pod_a.addr, a_in_b));
    tcp_transfer_via(
        &pod_b.ns,
        pod_b.addr.into(),
        &pod_a.ns,
        through(pod_b.addr, b_in_a),
        8 << 20,
    );
    // The routed node's pod, through the VXLAN device.
    let pod_a3 = &c.node("a", 3).pods[0];
    if ping_until(
        &pod_a3.ns,
        through(pod_b.addr, b_in_a),
        Duration::from_secs(10),
    )
    .is_none()
    {
        let n3 = &c.node("a", 3).ns;
        let n0 = &c.node("a", 0).ns;
        panic!(
            "routed node's pod cannot reach b's pod through VXLAN\n--- node3 link:\n{}\n--- node3 neigh:\n{}\n--- node3 fdb:\n{}\n--- node0 link:\n{}\n--- node0 routes:\n{}\n--- node3 agent:\n{}",
            n3.ip(&["-d", "-s", "link", "show", "causeway-vx"]).unwrap_or_default(),
            n3.ip(&["neigh", "show", "dev", "causeway-vx"]).unwrap_or_default(),
            n3.run("bridge", &["fdb", "show", "dev", "causeway-vx"]).unwrap_or_default(),
            n0.ip(&["-d", "-s", "link", "show", "causeway-gw-vx"]).unwrap_or_default(),
            n0.ip(&["route"]).unwrap_or_default()
                + &n0.ip(&["-s", "link", "show", "causeway0"]).unwrap_or_default()
                + &n0.run("sh", &["-c", "grep . /proc/sys/net/ipv4/conf/*/rp_filter /proc/sys/net/ipv4/conf/*/forwarding; nstat -az | grep -v ' 0 '"]).unwrap_or_default(),
            agents_a[3].log_text(),
        );
    }
    tcp_transfer_via(
        &pod_b.ns,
        pod_b.addr.into(),
        &pod_a3.ns,
        through(pod_b.addr, b_in_a),
        8 << 20,
    );
    // The gateway node itself (host-originated traffic, source-NATed to
    // its cni0 address inside the pod CIDR) and a non-gateway node's host.
    assert_ping(&c.node("a", 0).ns, through(pod_b.addr, b_in_a));
    assert_ping(&c.node("a", 2).ns, through(pod_b.addr, b_in_a));
    for daemon in &c.daemons[..2] {
        for peer in daemon.status().peers {
            assert_eq!(
                peer.drops.get("spoofed_source").copied().unwrap_or(0),
                0,
                "spoofed sources dropped: {peer:?}"
            );
        }
    }

    // A reload of a that adds site c: the view of c is routed on every
    // node within a second, with no hand-made route.
    let text = std::fs::read_to_string(&c.configs[0]).expect("config");
    let site_table = text.split("[[peer]]").next().expect("site table");
    std::fs::write(&c.configs[0], format!("{site_table}{}", c.a_with_c)).expect("rewrite config");
    let reload = Instant::now();
    let pid = c.daemons[0].child.pid();
    // SIGHUP to the gateway's own process (kept by its ChildGuard).
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let c_in_a = {
        let t = Instant::now();
        loop {
            let status = c.daemons[0].status();
            if let Some(p) = status.peers.iter().find(|p| p.name == "c") {
                break p.views[0].view.parse::<IpNet>().expect("view");
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "reload did not add c"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let mut slowest = Duration::ZERO;
    for (i, agent) in agents_a.iter().enumerate().skip(1) {
        wait_routes(
            &c.node("a", i).ns,
            &[b_in_a, c_in_a],
            Duration::from_secs(10),
            agent,
        );
        slowest = slowest.max(reload.elapsed());
    }
    println!("reload (SIGHUP) → view of c routed on every node of a: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "node routes for the new view took {slowest:?} after the reload"
    );
    let pod_c = &c.lab.site("c").pods[0];
    assert_ping(&pod_a.ns, through(pod_c.addr, c_in_a));
    assert_ping(&pod_a3.ns, through(pod_c.addr, c_in_a));
    // No pod or view address ever reached the internet in clear. (The
    // lab's own leak counter also counts the daemons' probes of the other
    // sites' private host candidates, which NAT tests always have.)
    assert_eq!(plaintext_leaks(&c.lab), 0);
    drop(agents_a);
    drop(agents_b);
    let _ = &c.files;
}

#[test]
fn node_agent_reports_masquerade_cleans_up_on_stop_and_adopts_after_kill() {
    let mut c = Clusters::build();
    let mut daemons = std::mem::take(&mut c.daemons);
    let c = c;
    let mut agents_a = c.agents("a");
    let _agents_b = c.agents("b");
    let b_in_a = view_of(&daemons[0], "b");
    let ns2 = &c.node("a", 2).ns;
    wait_routes(ns2, &[b_in_a], Duration::from_secs(10), &agents_a[2]);
    let pod_b = &c.node("b", 2).pods[0];
    let pod_a = &c.node("a", 2).pods[0];
    assert_ping(&pod_a.ns, through(pod_b.addr, b_in_a));

    // Induce the CNI mistake: masquerade pod traffic towards the views.
    ns2.run_with_input(
        "nft",
        &["-f", "-"],
        &format!(
            "table ip cni_masq {{\n chain post {{\n  type nat hook postrouting priority srcnat; policy accept;\n  ip saddr 10.0.3.0/24 ip daddr {b_in_a} masquerade\n }}\n}}\n"
        ),
    )
    .expect("masquerade rule");
    // The peer drops what arrives with the node's address; the node agent
    // counts it and says so.
    for _ in 0..3 {
        let _ = pod_a
            .ns
            .ping(through(pod_b.addr, b_in_a), Duration::from_millis(300));
    }
    let metrics_addr: SocketAddr = NODE_METRICS.parse().expect("addr");
    let t = Instant::now();
    let masqueraded = loop {
        let (code, body) = get(ns2, metrics_addr, "/metrics");
        assert_eq!(code, 200);
        let n = samples(&body)
            .get("causeway_node_masqueraded_packets_total")
            .copied()
            .unwrap_or(0.0);
        if n > 0.0 {
            break n;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "masquerade not reported:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("masqueraded packets reported: {masqueraded}");
    assert!(
        agents_a[2]
            .log_text()
            .contains("left this node masqueraded")
    );
    ns2.run("nft", &["delete", "table", "ip", "cni_masq"])
        .expect("remove masquerade rule");

    // Clean stop: routes and table gone.
    let status = agents_a[2]
        .child
        .stop(Duration::from_secs(5))
        .expect("stop");
    assert!(status.success(), "{}", agents_a[2].log_text());
    assert!(node_routes(ns2).is_empty(), "{}", node_route_lines(ns2));
    assert!(!has_nft_table(ns2));
    // The routed node's VXLAN device goes too.
    let ns3 = &c.node("a", 3).ns;
    wait_routes(ns3, &[b_in_a], Duration::from_secs(10), &agents_a[3]);
    agents_a[3]
        .child
        .stop(Duration::from_secs(5))
        .expect("stop");
    assert!(ns3.ip(&["link", "show", "causeway-vx"]).is_err());
    assert!(node_routes(ns3).is_empty());

    // Restart, kill -9: routes and table stay; a new agent adopts them.
    agents_a[2].restart(ns2);
    wait_routes(ns2, &[b_in_a], Duration::from_secs(10), &agents_a[2]);
    // The table comes with (not before) the routes: wait for it too.
    let t = Instant::now();
    while !has_nft_table(ns2) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{}",
            agents_a[2].log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agents_a[2].child.kill9().expect("kill -9");
    assert_eq!(node_routes(ns2), vec![b_in_a.to_string()]);
    assert!(has_nft_table(ns2));
    agents_a[2].restart(ns2);
    std::thread::sleep(Duration::from_millis(500));
    wait_routes(ns2, &[b_in_a], Duration::from_secs(10), &agents_a[2]);
    assert_ping(&pod_a.ns, through(pod_b.addr, b_in_a));
    assert!(
        !agents_a[2].log_text().contains("File exists"),
        "{}",
        agents_a[2].log_text()
    );

    // The gateway's VXLAN device: left by kill -9, adopted by the next
    // run, removed by a clean stop.
    let node0 = &c.node("a", 0).ns;
    let mut gateway = daemons.remove(0);
    gateway.child.kill9().expect("kill -9 the gateway");
    assert!(node0.ip(&["link", "show", "causeway-gw-vx"]).is_ok());
    let gateway = Daemon::start(node0, &c.files[0], &c.configs[0]);
    assert_ping(&pod_a.ns, through(pod_b.addr, b_in_a));
    gateway.stop();
    assert!(node0.ip(&["link", "show", "causeway-gw-vx"]).is_err());
    let _ = &c.files;
}

/// `causeway ctl role <role>` to the daemon of `files` (what keepalived's
/// notify scripts run).
fn ctl_role(files: &SiteFiles, role: &str) {
    let out = std::process::Command::new(causeway_bin())
        .args(["ctl", "role", role, "--socket"])
        .arg(files.socket())
        .output()
        .expect("causeway ctl");
    assert!(
        out.status.success(),
        "ctl role {role}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the node routes in `ns` go to `via` (directly or through
/// the VXLAN device); returns how long.
fn wait_via(ns: &Netns, via: Ipv4Addr, agent: &NodeAgent) -> Duration {
    let t = Instant::now();
    loop {
        // Direct, or through the VXLAN device whose remote is `via`.
        let vxlan = ns
            .ip(&["-d", "link", "show", "causeway-vx"])
            .unwrap_or_default();
        let lines = node_route_lines(ns);
        if lines.contains(&format!("via {via} "))
            || (lines.contains("dev causeway-vx") && vxlan.contains(&format!("remote {via} ")))
        {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{}: node routes not via {via}:\n{}\n--- agent:\n{}",
            ns.name(),
            node_route_lines(ns),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn nodes_follow_a_gateway_failover_within_a_second() {
    let mut c = Clusters::build();
    let mut daemons = std::mem::take(&mut c.daemons);
    let c = c;
    // Site a's gateway becomes two replicas ([failover] election =
    // "keepalived") on nodes 0 and 1: the same key and peers, their own
    // state and sockets, each its [cluster] on its node's address. The
    // test plays keepalived with `causeway ctl role`.
    daemons.remove(0).stop();
    let (node0, node1) = (c.node("a", 0).addr, c.node("a", 1).addr);
    let replicas: Vec<(SiteFiles, Daemon)> = [0, 1]
        .into_iter()
        .map(|n| {
            let files = SiteFiles::new();
            std::fs::copy(c.files[0].path("private.key"), files.path("private.key")).expect("key");
            let addr = c.node("a", n).addr;
            let text = peer_toml("b", &c.files[1].public_key, &[POD_CIDR], None)
                + &c.rdv
                + &format!(
                    "[cluster]\nlisten = \"{addr}:{CLUSTER_PORT}\"\nsecret_file = {:?}\n\n[failover]\nelection = \"keepalived\"\n",
                    c.secret()
                );
            let config = files.write_config("a", &[POD_CIDR], &text);
            let daemon = Daemon::start(&c.node("a", n).ns, &files, &config);
            (files, daemon)
        })
        .collect();
    let agents_a = c.agents_watching("a", &[node0, node1]);
    let _agents_b = c.agents("b");
    // Both replicas are standby: the nodes follow nobody yet.
    std::thread::sleep(Duration::from_millis(300));
    assert!(node_routes(&c.node("a", 2).ns).is_empty());

    ctl_role(&replicas[0].0, "active");
    let b_in_a = view_of(&replicas[0].1, "b");
    let ns2 = &c.node("a", 2).ns;
    wait_routes(ns2, &[b_in_a], Duration::from_secs(10), &agents_a[2]);
    wait_via(ns2, node0, &agents_a[2]);
    let pod_a = &c.node("a", 2).pods[0];
    let pod_b = &c.node("b", 2).pods[0];
    assert_ping(&pod_a.ns, through(pod_b.addr, b_in_a));

    // Failover in the order VRRP makes it: the new master is told first
    // (both say active for a moment: the nodes follow the later term),
    // then the old one backs off.
    let switch = Instant::now();
    ctl_role(&replicas[1].0, "active");
    let mut slowest = Duration::ZERO;
    for i in [0, 2, 3] {
        wait_via(&c.node("a", i).ns, node1, &agents_a[i]);
        slowest = slowest.max(switch.elapsed());
    }
    println!("ctl role active on the standby → every node routes via it: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "node failover took {slowest:?}"
    );
    ctl_role(&replicas[0].0, "standby");
    // Node 1 is the active gateway's node now: no node route there.
    wait_routes(
        &c.node("a", 1).ns,
        &[],
        Duration::from_secs(2),
        &agents_a[1],
    );
    assert!(
        ping_until(
            &pod_a.ns,
            through(pod_b.addr, b_in_a),
            Duration::from_secs(20)
        )
        .is_some(),
        "no traffic through the new active gateway:\n{}",
        replicas[1].1.log_text()
    );
    let pod_a3 = &c.node("a", 3).pods[0];
    assert_ping(&pod_a3.ns, through(pod_b.addr, b_in_a));
}
