//! Cluster sites: nodes on a node network, pods behind each node (see
//! "Cluster sites" in the crate docs).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use crate::Error;
use crate::links::{
    ROUTER_SYSCTLS, address, base_setup, bridge, bridge_port, default_route, link_up,
};
use crate::netns::{BASE_SYSCTLS, Netns};
use crate::pod::{Pod, nth_24};

/// What a cluster site looks like: nodes on a node network behind the
/// site's NAT router, each with its own pods. Build one with
/// [`ClusterSpec::new`] and give it to [`SiteSpec::cluster`](crate::SiteSpec::cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Number of nodes, 3 to 90.
    pub nodes: usize,
    /// The first `gateways` nodes are gateway-capable (where a Causeway
    /// daemon and keepalived may run); at least 1, all on the node LAN.
    pub gateways: usize,
    /// Pods on each node, 1 to 253.
    pub pods_per_node: usize,
    /// The last `routed_nodes` nodes sit on a second subnet, reached from
    /// the node LAN only through the NAT router (not on the gateways' L2).
    pub routed_nodes: usize,
    /// The NAT router forwards UDP `public_addr:port` to the cluster's
    /// virtual IP, same port: a static endpoint for peers.
    pub port_forward: Option<u16>,
}

impl ClusterSpec {
    /// `nodes` nodes, the first `gateways` gateway-capable, one pod each, all
    /// on one node LAN, no port forward.
    pub fn new(nodes: usize, gateways: usize) -> ClusterSpec {
        ClusterSpec {
            nodes,
            gateways,
            pods_per_node: 1,
            routed_nodes: 0,
            port_forward: None,
        }
    }

    /// Sets the number of pods on each node.
    pub fn pods_per_node(mut self, pods: usize) -> ClusterSpec {
        self.pods_per_node = pods;
        self
    }

    /// Puts the last `routed` nodes on the routed subnet.
    pub fn routed_nodes(mut self, routed: usize) -> ClusterSpec {
        self.routed_nodes = routed;
        self
    }

    /// Forwards UDP `port` of the NAT router's outside address to the virtual IP.
    pub fn port_forward(mut self, port: u16) -> ClusterSpec {
        self.port_forward = Some(port);
        self
    }

    /// What is wrong with the spec, naming the field, if anything.
    pub(crate) fn check(&self) -> Result<(), String> {
        let Self {
            nodes,
            gateways,
            pods_per_node,
            routed_nodes,
            port_forward,
        } = *self;
        if !(3..=MAX_NODES).contains(&nodes) {
            return Err(format!("cluster.nodes is {nodes}; use 3 to {MAX_NODES}"));
        }
        if gateways == 0 {
            return Err("cluster.gateways must be at least 1".into());
        }
        if gateways + routed_nodes > nodes {
            return Err(format!(
                "cluster.gateways ({gateways}) + cluster.routed_nodes ({routed_nodes}) exceed \
                 cluster.nodes ({nodes}): gateway-capable nodes (the first ones) must be on the \
                 node LAN, routed nodes are the last ones"
            ));
        }
        if !(1..=MAX_PODS).contains(&pods_per_node) {
            return Err(format!(
                "cluster.pods_per_node is {pods_per_node}; use 1 to {MAX_PODS}"
            ));
        }
        if port_forward == Some(0) {
            return Err("cluster.port_forward must not be port 0".into());
        }
        Ok(())
    }
}

/// Most nodes: node addresses `.10` to `.99`, below the virtual IP.
const MAX_NODES: usize = 90;
/// Most pods per node: `.2` to `.254` of its slice.
const MAX_PODS: usize = 253;
/// Host part of node 0's address; node `i` is `NODE_BASE + i`.
const NODE_BASE: u8 = 10;
/// Host part of the virtual IP on the node LAN.
const VIP_HOST: u8 = 100;
/// The node LAN interface of every node.
const NODE_IF: &str = "eth0";

/// Sysctls of routers that hand packets back out the interface they came
/// in on (nodes, a cluster's NAT router): no ICMP redirects, so routes stay
/// what the test (or the node agent) set, not what a redirect cached.
pub(crate) const NO_REDIRECTS: &[(&str, &str)] = &[
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.default.send_redirects", "0"),
    ("net.ipv4.conf.all.accept_redirects", "0"),
    ("net.ipv4.conf.default.accept_redirects", "0"),
];

/// A built cluster site: its nodes, node network and virtual IP.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes, in order: gateway-capable ones first, routed ones last.
    pub nodes: Vec<Node>,
    /// The virtual IP reserved for keepalived on the node LAN
    /// (`172.16.n.100`); the testbed never assigns it.
    pub vip: Ipv4Addr,
    /// The node LAN (`172.16.n.0/24`).
    pub lan_prefix: Ipv4Net,
    /// The routed nodes' subnet (`172.16.(100+n).0/24`), if there are routed nodes.
    pub routed_prefix: Option<Ipv4Net>,
    /// The NAT router's address on the node LAN (`172.16.n.1`).
    pub router_addr: Ipv4Addr,
    /// The UDP port the NAT router forwards to [`Cluster::vip`], if any.
    pub port_forward: Option<u16>,
    /// The switch namespace holding the bridges.
    switch: Netns,
}

/// A node of a cluster site: a namespace with `eth0` on the node network
/// (a port of the switch's bridge) and bridge `cni0` for its pods.
#[derive(Debug)]
pub struct Node {
    /// The node's namespace.
    pub ns: Netns,
    /// Its address on `eth0` (`172.16.n.(10+i)`, or `172.16.(100+n).(10+i)` if routed).
    pub addr: Ipv4Addr,
    /// Its default route: the NAT router's address on the node's subnet.
    pub router: Ipv4Addr,
    /// The node's share of the site's pod CIDR (its pods' /24).
    pub pod_slice: Ipv4Net,
    /// The node's pods (on `cni0`, default route via the slice's `.1`).
    pub pods: Vec<Pod>,
    /// Whether a Causeway daemon (and keepalived) may run here.
    pub gateway_capable: bool,
    /// Whether the node sits on the routed subnet, off the gateways' L2.
    pub routed: bool,
}

impl Cluster {
    /// Builds the node network, nodes and pods of site `n - 1` behind its
    /// NAT `router` (which must already forward). `pod_cidr` must have room
    /// for a /24 per node after the first (checked by the lab's validation).
    pub(crate) fn build(
        prefix: &str,
        n: u8,
        spec: &ClusterSpec,
        pod_cidr: Ipv4Net,
        router: &Netns,
    ) -> Result<Cluster, Error> {
        let spec_error = |what: &str| Error::Spec(format!("site {prefix}: {what}"));
        let lan_prefix = net24(172, 16, n);
        let routed_prefix = match spec.routed_nodes {
            0 => None,
            _ => Some(net24(
                172,
                16,
                n.checked_add(100)
                    .ok_or_else(|| spec_error("too many sites for a routed node subnet"))?,
            )),
        };
        let switch = Netns::add(format!("{prefix}-lan"))?;
        base_setup(&switch, &[BASE_SYSCTLS])?;
        let mut subnets = vec![("br0", "lan0", "nat0", lan_prefix)];
        subnets.extend(routed_prefix.map(|p| ("br1", "lan1", "nat1", p)));
        for &(br, router_if, port, subnet) in &subnets {
            bridge(&switch, br)?;
            router.veth(router_if, &switch, port)?;
            bridge_port(&switch, br, port)?;
            address(router, router_if, host(subnet, 1).into(), 24)?;
            link_up(router, router_if)?;
        }

        let first_routed = spec.nodes - spec.routed_nodes;
        let mut nodes = Vec::with_capacity(spec.nodes);
        for i in 0..spec.nodes {
            let routed = i >= first_routed;
            let (br, subnet) = match (routed, routed_prefix) {
                (true, Some(p)) => ("br1", p),
                _ => ("br0", lan_prefix),
            };
            let slice = nth_24(pod_cidr, i + 1, 0)
                .and_then(|a| Ipv4Net::new(a, 24).ok())
                .ok_or_else(|| spec_error("pod CIDR has no /24 left for a node"))?;
            let node = Node {
                ns: Netns::add(format!("{prefix}-node{i}"))?,
                addr: host(subnet, NODE_BASE + i as u8),
                router: host(subnet, 1),
                pod_slice: slice,
                pods: Vec::new(),
                gateway_capable: i < spec.gateways,
                routed,
            };
            let node = node.build(prefix, i, spec.pods_per_node, &switch, br)?;
            nodes.push(node);
        }

        for node in &nodes {
            // The NAT router reaches every slice through its node.
            route(router, node.pod_slice, node.addr)?;
            if node.routed {
                continue; // everything goes via the default route
            }
            for other in nodes.iter().filter(|o| o.addr != node.addr) {
                // host-gw: straight to the other node on the same L2,
                // through the router to a routed one.
                let via = if other.routed {
                    node.router
                } else {
                    other.addr
                };
                route(&node.ns, other.pod_slice, via)?;
            }
        }
        Ok(Cluster {
            nodes,
            vip: host(lan_prefix, VIP_HOST),
            lan_prefix,
            routed_prefix,
            router_addr: host(lan_prefix, 1),
            port_forward: spec.port_forward,
            switch,
        })
    }

    /// Node `i`.
    ///
    /// # Panics
    /// If there is no node `i` (the message says how many there are).
    pub fn node(&self, i: usize) -> &Node {
        match self.nodes.get(i) {
            Some(node) => node,
            None => panic!(
                "cluster behind {} has no node {i}; it has {} (0-based)",
                self.switch.name(),
                self.nodes.len()
            ),
        }
    }

    /// Node `i`'s namespace (panics like [`Cluster::node`]).
    pub fn node_ns(&self, i: usize) -> &Netns {
        &self.node(i).ns
    }

    /// The gateway-capable nodes (the first ones).
    pub fn gateway_nodes(&self) -> &[Node] {
        let k = self.nodes.iter().take_while(|n| n.gateway_capable).count();
        &self.nodes[..k]
    }

    /// The switch namespace: bridge `br0` (node LAN, ports `nat0` and
    /// `n<i>`) and, with routed nodes, `br1` (ports `nat1` and `n<i>`).
    /// Run `tcpdump` here to watch the node network.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// Unplugs node `i`: takes its bridge port down on the switch side, so
    /// its `eth0` loses carrier and nothing reaches it or leaves it (the
    /// node's own configuration is untouched).
    pub fn cut_node_links(&self, i: usize) -> Result<(), Error> {
        self.node(i);
        self.switch
            .ip(&["link", "set", &port_name(i), "down"])
            .map(drop)
    }

    /// Plugs node `i` back in after [`Cluster::cut_node_links`], and waits
    /// (up to 3 s) until its `eth0` is up again.
    pub fn restore_node_links(&self, i: usize) -> Result<(), Error> {
        let ns = self.node_ns(i);
        link_up(&self.switch, &port_name(i))?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let state = ns.ip(&["-br", "link", "show", "dev", NODE_IF])?;
            if state.split_whitespace().nth(1) == Some("UP") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, state.trim());
                return Err(ns.io_error("waiting for eth0 to come back up", e));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The nodes that have the virtual IP on some interface right now
    /// (keepalived's master: one, unless there is a split brain).
    pub fn vip_holders(&self) -> Result<Vec<usize>, Error> {
        let needle = format!("inet {}/", self.vip);
        let mut holders = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.ns.ip(&["-4", "-o", "addr", "show"])?.contains(&needle) {
                holders.push(i);
            }
        }
        Ok(holders)
    }

    /// Every namespace the cluster owns (nodes, pods, switch).
    pub(crate) fn namespaces_mut(&mut self) -> Vec<&mut Netns> {
        let mut all = vec![&mut self.switch];
        for node in &mut self.nodes {
            all.push(&mut node.ns);
            all.extend(node.pods.iter_mut().map(|p| &mut p.ns));
        }
        all
    }
}

impl Node {
    /// Wires the node (its namespace exists already) to `br` of `switch`,
    /// makes `cni0` and its pods.
    fn build(
        mut self,
        prefix: &str,
        i: usize,
        pods: usize,
        switch: &Netns,
        br: &str,
    ) -> Result<Node, Error> {
        let ns = &self.ns;
        base_setup(ns, &[BASE_SYSCTLS, ROUTER_SYSCTLS, NO_REDIRECTS])?;
        let port = port_name(i);
        switch.veth(&port, ns, NODE_IF)?;
        bridge_port(switch, br, &port)?;
        address(ns, NODE_IF, self.addr.into(), 24)?;
        link_up(ns, NODE_IF)?;
        default_route(ns, self.router.into())?;

        let cni_addr = host(self.pod_slice, 1);
        bridge(ns, "cni0")?;
        address(ns, "cni0", cni_addr.into(), 24)?;
        for j in 0..pods {
            let pod = Pod {
                ns: Netns::add(format!("{prefix}-node{i}-pod{j}"))?,
                addr: host(self.pod_slice, 2 + j as u8),
                addr6: None,
                gateway_addr: cni_addr,
                gateway_addr6: None,
            };
            base_setup(&pod.ns, &[BASE_SYSCTLS])?;
            let veth = format!("veth{j}");
            ns.veth(&veth, &pod.ns, "eth0")?;
            bridge_port(ns, "cni0", &veth)?;
            address(&pod.ns, "eth0", pod.addr.into(), 24)?;
            link_up(&pod.ns, "eth0")?;
            default_route(&pod.ns, cni_addr.into())?;
            self.pods.push(pod);
        }
        Ok(self)
    }
}

/// Node `i`'s port on the switch.
fn port_name(i: usize) -> String {
    format!("n{i}")
}

fn net24(a: u8, b: u8, c: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(a, b, c, 0), 24).expect("24 is a valid prefix length")
}

/// Host `h` of the /24 `net`.
fn host(net: Ipv4Net, h: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) | u32::from(h))
}

fn route(ns: &Netns, to: Ipv4Net, via: Ipv4Addr) -> Result<(), Error> {
    ns.ip(&[
        "route",
        "add",
        &to.to_string(),
        "via",
        &IpAddr::V4(via).to_string(),
    ])
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_limits_name_the_field() {
        let bad = |spec: ClusterSpec| spec.check().expect_err("invalid");
        assert!(ClusterSpec::new(4, 2).routed_nodes(2).check().is_ok());
        assert!(bad(ClusterSpec::new(2, 1)).contains("cluster.nodes"));
        assert!(bad(ClusterSpec::new(91, 1)).contains("cluster.nodes"));
        assert!(bad(ClusterSpec::new(3, 0)).contains("cluster.gateways"));
        assert!(bad(ClusterSpec::new(3, 2).routed_nodes(2)).contains("routed_nodes"));
        assert!(bad(ClusterSpec::new(3, 4)).contains("cluster.gateways"));
        assert!(bad(ClusterSpec::new(3, 1).pods_per_node(0)).contains("pods_per_node"));
        assert!(bad(ClusterSpec::new(3, 1).pods_per_node(254)).contains("pods_per_node"));
        assert!(bad(ClusterSpec::new(3, 1).port_forward(0)).contains("port_forward"));
    }

    #[test]
    fn hosts_of_a_slash_24() {
        let lan = net24(172, 16, 3);
        assert_eq!(host(lan, 1), Ipv4Addr::new(172, 16, 3, 1));
        assert_eq!(host(lan, VIP_HOST), Ipv4Addr::new(172, 16, 3, 100));
        assert_eq!(port_name(7), "n7");
    }
}
