//! Cluster sites: nodes, pods on every node, a routed node, the switch-side
//! cut. Builds real topologies; needs root. Each test owns its own lab.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use causeway_testbed::{ClusterSpec, Error, Lab, LabSpec, Nat, Netns, SiteSpec};

fn net(s: &str) -> causeway_testbed::IpNet {
    s.parse().expect("valid CIDR")
}

fn ping(ns: &Netns, dst: impl Into<IpAddr>) -> Option<Duration> {
    ns.ping(dst.into(), Duration::from_millis(300))
        .expect("ping runs")
}

/// Pings until a reply comes (neighbours may have to be resolved again).
fn ping_until_reply(ns: &Netns, dst: impl Into<IpAddr>) -> Duration {
    let dst = dst.into();
    (0..20)
        .find_map(|_| ping(ns, dst))
        .unwrap_or_else(|| panic!("no reply from {dst} in {}", ns.name()))
}

fn udp_socket(ns: &Netns, addr: impl Into<IpAddr>, port: u16) -> UdpSocket {
    let addr = addr.into();
    let socket = ns.enter(|| UdpSocket::bind((addr, port))).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    socket
}

fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 1500];
    let (n, from) = socket.recv_from(&mut buf).expect("a datagram");
    (buf[..n].to_vec(), from)
}

/// Names of the namespaces that exist now and belong to `id`.
fn namespaces_of(id: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&format!("{id}-")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_cluster_site_routes_every_pod_to_every_node() {
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("a", vec![net("10.0.0.0/16")])
                .nat(Nat::PortPreserving)
                .cluster(
                    ClusterSpec::new(4, 2)
                        .pods_per_node(2)
                        .routed_nodes(1)
                        .port_forward(51820),
                ),
            SiteSpec::new("b", vec![net("10.1.0.0/16")]),
        ],
    })
    .expect("build");
    let id = lab.id().to_owned();
    let (a, b) = (lab.site("a"), lab.site("b"));
    let cluster = a.cluster.as_ref().expect("site a is a cluster");
    assert!(b.cluster.is_none());

    // The address plan of the crate docs.
    let ip = |s: &str| s.parse::<Ipv4Addr>().expect("address");
    assert_eq!(a.wan_addr, IpAddr::V4(ip("172.16.1.10")));
    assert_eq!(a.public_addr, IpAddr::V4(ip("198.18.1.2")));
    assert_eq!(cluster.vip, ip("172.16.1.100"));
    assert_eq!(cluster.router_addr, ip("172.16.1.1"));
    assert_eq!(cluster.lan_prefix, "172.16.1.0/24".parse().expect("net"));
    assert_eq!(cluster.routed_prefix, "172.16.101.0/24".parse().ok());
    let addrs: Vec<Ipv4Addr> = cluster.nodes.iter().map(|n| n.addr).collect();
    let want = ["172.16.1.10", "172.16.1.11", "172.16.1.12", "172.16.101.13"];
    assert_eq!(addrs, want.map(ip));
    let flags: Vec<(bool, bool)> = cluster
        .nodes
        .iter()
        .map(|n| (n.gateway_capable, n.routed))
        .collect();
    assert_eq!(
        flags,
        [(true, false), (true, false), (false, false), (false, true)]
    );
    assert_eq!(cluster.gateway_nodes().len(), 2);
    assert_eq!(cluster.node(3).router, ip("172.16.101.1"));
    assert_eq!(
        cluster.node(3).pod_slice,
        "10.0.4.0/24".parse().expect("net")
    );
    assert_eq!(cluster.node(3).pods[1].addr, ip("10.0.4.3"));
    assert_eq!(cluster.node(3).pods[1].gateway_addr, ip("10.0.4.1"));
    // The single-gateway view of the site is node 0.
    assert_eq!(a.gateway.name(), cluster.node_ns(0).name());
    assert_eq!(a.pods.len(), 2);
    assert_eq!(a.pods[1].ns.name(), cluster.node(0).pods[1].ns.name());
    assert_eq!(a.pods[1].addr, ip("10.0.1.3"));

    // Every pod reaches every other pod of the site, every node every node.
    let pods: Vec<_> = cluster.nodes.iter().flat_map(|n| &n.pods).collect();
    for from in &pods {
        for to in pods.iter().filter(|to| to.addr != from.addr) {
            assert!(
                ping(&from.ns, to.addr).is_some(),
                "{} cannot reach pod {}",
                from.ns.name(),
                to.addr
            );
        }
    }
    for from in &cluster.nodes {
        for to in cluster.nodes.iter().filter(|to| to.addr != from.addr) {
            assert!(
                ping(&from.ns, to.addr).is_some(),
                "{} cannot reach node {}",
                from.ns.name(),
                to.addr
            );
        }
    }

    // Which way packets go: host-gw on the LAN, the router for the routed node.
    let route = |node: usize, dst: &str| {
        cluster
            .node_ns(node)
            .ip(&["route", "get", dst])
            .expect("ip route get")
    };
    assert!(route(3, "172.16.1.10").contains("via 172.16.101.1"));
    assert!(route(3, "10.0.1.2").contains("via 172.16.101.1"));
    assert!(route(0, "172.16.101.13").contains("via 172.16.1.1"));
    assert!(route(1, "10.0.4.2").contains("via 172.16.1.1"));
    assert!(route(1, "10.0.1.2").contains("via 172.16.1.10"));
    assert!(route(2, "10.0.2.3").contains("via 172.16.1.11"));
    // ... and between the two subnets nothing is translated.
    let server = udp_socket(&a.gateway, Ipv4Addr::UNSPECIFIED, 0);
    let port = server.local_addr().expect("addr").port();
    for (ns, src) in [
        (cluster.node_ns(3), cluster.node(3).addr),
        (&cluster.node(3).pods[0].ns, cluster.node(3).pods[0].addr),
    ] {
        let client = udp_socket(ns, Ipv4Addr::UNSPECIFIED, 0);
        client.send_to(b"hi", (a.wan_addr, port)).expect("send");
        assert_eq!(recv(&server).1.ip(), IpAddr::V4(src));
    }

    // Link-local multicast (VRRP's 224.0.0.18) floods the node LAN, and
    // stays on it.
    let group = ip("224.0.0.18");
    let listeners: Vec<UdpSocket> = [1, 3]
        .map(|i| {
            let socket = udp_socket(cluster.node_ns(i), Ipv4Addr::UNSPECIFIED, 5405);
            socket
                .join_multicast_v4(&group, &cluster.node(i).addr)
                .expect("join");
            socket
        })
        .into();
    listeners[1]
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let advert = udp_socket(&a.gateway, a.wan_addr, 0);
    advert.send_to(b"vrrp", (group, 5405)).expect("send");
    assert_eq!(recv(&listeners[0]).0, b"vrrp");
    assert!(listeners[1].recv_from(&mut [0; 16]).is_err(), "routed node");

    // A routed node can reach a gateway node over VXLAN, as a node agent will.
    for (node, peer, inner) in [(0, 3, "192.168.42.1/30"), (3, 0, "192.168.42.2/30")] {
        let (local, remote) = (cluster.node(node).addr, cluster.node(peer).addr);
        let add = format!(
            "link add vx0 type vxlan id 42 dstport 4789 local {local} remote {remote} dev eth0"
        );
        let ns = cluster.node_ns(node);
        ns.ip(&add.split(' ').collect::<Vec<_>>()).expect("vxlan");
        ns.ip(&["addr", "add", inner, "dev", "vx0"]).expect("addr");
        ns.ip(&["link", "set", "vx0", "up"]).expect("up");
    }
    ping_until_reply(cluster.node_ns(3), ip("192.168.42.1"));

    // Out to the internet through the NAT, from a pod on the routed node.
    assert!(ping(&cluster.node(3).pods[0].ns, lab.internet_addr()).is_some());
    assert!(ping(&cluster.node(2).ns, b.public_addr).is_some());
    assert_eq!(lab.leaked_packets().expect("counter"), 0);

    // The port forward lands on whichever node holds the virtual IP.
    assert_eq!(cluster.vip_holders().expect("vip"), Vec::<usize>::new());
    let vip = format!("{}/24", cluster.vip);
    cluster
        .node_ns(1)
        .ip(&["addr", "add", &vip, "dev", "eth0"])
        .expect("assign the VIP");
    assert_eq!(cluster.vip_holders().expect("vip"), [1]);
    let endpoint = udp_socket(cluster.node_ns(1), cluster.vip, 51820);
    let peer = udp_socket(&b.gateway, Ipv4Addr::UNSPECIFIED, 0);
    peer.send_to(b"handshake", (a.public_addr, 51820))
        .expect("send");
    let (data, from) = recv(&endpoint);
    assert_eq!(
        (data.as_slice(), from.ip()),
        (&b"handshake"[..], b.wan_addr)
    );
    endpoint.send_to(b"response", from).expect("send");
    let (data, from) = recv(&peer);
    assert_eq!(data, b"response");
    assert_eq!(from, SocketAddr::new(a.public_addr, 51820));

    // Unplugging node 0 on the switch side: nothing reaches it, then it is back.
    let (node0, pod0) = (cluster.node(0).addr, cluster.node(0).pods[0].addr);
    cluster.cut_node_links(0).expect("cut");
    assert!(ping(cluster.node_ns(2), node0).is_none());
    assert!(ping(&cluster.node(2).pods[0].ns, pod0).is_none());
    assert!(ping(cluster.node_ns(3), node0).is_none());
    assert!(ping(&a.gateway, cluster.router_addr).is_none());
    cluster.restore_node_links(0).expect("restore");
    ping_until_reply(cluster.node_ns(2), node0);
    ping_until_reply(&cluster.node(2).pods[0].ns, pod0);
    ping_until_reply(&cluster.node(3).pods[1].ns, pod0);

    assert!(!namespaces_of(&id).is_empty());
    drop(lab);
    assert_eq!(namespaces_of(&id), Vec::<String>::new());
}

#[test]
fn cluster_specs_are_checked_before_anything_is_built() {
    let refused = |site: SiteSpec| match Lab::build(&LabSpec { sites: vec![site] }) {
        Err(Error::Spec(msg)) => msg,
        other => panic!("expected a spec error, got {other:?}"),
    };
    let site = || SiteSpec::new("a", vec![net("10.0.0.0/16")]);
    let msg = refused(site().cluster(ClusterSpec::new(3, 1)));
    assert!(msg.contains("NAT") && msg.contains("\"a\""), "{msg}");
    let msg = refused(site().nat(Nat::Symmetric).cluster(ClusterSpec::new(2, 1)));
    assert!(msg.contains("cluster.nodes"), "{msg}");
    let msg = refused(
        site()
            .nat(Nat::Symmetric)
            .pods(3)
            .cluster(ClusterSpec::new(3, 1)),
    );
    assert!(msg.contains("pods_per_node"), "{msg}");
    let small = SiteSpec::new("a", vec![net("10.0.0.0/23")]);
    let msg = refused(small.nat(Nat::Symmetric).cluster(ClusterSpec::new(3, 1)));
    assert!(msg.contains("10.0.0.0/23"), "{msg}");
}

#[test]
fn two_cluster_sites_build_side_by_side() {
    let cluster = |name: &str, nat| {
        SiteSpec::new(name, vec![net("10.0.0.0/16")])
            .nat(nat)
            .cluster(ClusterSpec::new(3, 2).routed_nodes(1).port_forward(51820))
    };
    let lab = Lab::build(&LabSpec {
        sites: vec![
            cluster("a", Nat::PortPreserving),
            cluster("b", Nat::Symmetric),
        ],
    })
    .expect("build");
    let (a, b) = (lab.site("a"), lab.site("b"));
    let (ca, cb) = (
        a.cluster.as_ref().expect("cluster"),
        b.cluster.as_ref().expect("cluster"),
    );
    assert_eq!(cb.vip, "172.16.2.100".parse::<Ipv4Addr>().expect("addr"));
    assert_eq!(cb.node(2).addr.to_string(), "172.16.102.12");
    // Same pod CIDR on both sites, each its own world behind its NAT.
    assert_eq!(ca.node(2).pods[0].addr, cb.node(2).pods[0].addr);
    for (site, other) in [(a, b), (b, a)] {
        let c = site.cluster.as_ref().expect("cluster");
        assert!(ping(&c.node(2).pods[0].ns, c.node(0).pods[0].addr).is_some());
        assert!(ping(&c.node(2).pods[0].ns, other.public_addr).is_some());
    }
    // Pods went out masqueraded: nothing unroutable reached the internet.
    assert_eq!(lab.leaked_packets().expect("counter"), 0);
}
