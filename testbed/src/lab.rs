//! Lab descriptions and the topology builder.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::Error;
use crate::cluster::{Cluster, ClusterSpec, NO_REDIRECTS};
use crate::links::{ROUTER_SYSCTLS, address, base_setup, default_route, link_up};
use crate::netns::{self, BASE_SYSCTLS, Netns, check_label};
use crate::pod::{Pod, nth_24};
use crate::wire::{Wan, WanStats, Wire};

/// What to build: the sites, in order (site `i` gets access link `198.18.(i+1).0/24`).
#[derive(Debug, Clone, Default)]
pub struct LabSpec {
    /// The sites.
    pub sites: Vec<SiteSpec>,
}

/// One site: a gateway and its pods (or a cluster of nodes), and how it is
/// connected to the internet.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    /// Short name used in namespace names, e.g. `"a"` or `"pharma"`
    /// (ASCII letters, digits, `-`, `_`; at most 24 characters).
    pub name: String,
    /// The site's pod networks. The first IPv4 one numbers the pods and must
    /// be a /23 or larger; the first IPv6 one, if any, gives pods an IPv6
    /// address too and must be a /96 or larger.
    pub pod_cidrs: Vec<IpNet>,
    /// Number of pod namespaces, at least 1. A cluster site leaves it at 1
    /// and sets [`ClusterSpec::pods_per_node`] instead.
    pub pods: usize,
    /// `None`: the gateway sits directly on the internet.
    pub nat: Option<Nat>,
    /// WAN emulation on the access link; [`Wan::default`] is a plain veth.
    pub wan: Wan,
    /// `Some`: the site is a cluster of nodes behind its NAT router (which it
    /// then requires) instead of one gateway; see "Cluster sites" in the crate docs.
    pub cluster: Option<ClusterSpec>,
}

impl SiteSpec {
    /// A site with one pod, no NAT and no WAN emulation.
    pub fn new(name: &str, pod_cidrs: Vec<IpNet>) -> SiteSpec {
        SiteSpec {
            name: name.to_owned(),
            pod_cidrs,
            pods: 1,
            nat: None,
            wan: Wan::default(),
            cluster: None,
        }
    }

    /// Sets the number of pods.
    pub fn pods(mut self, pods: usize) -> SiteSpec {
        self.pods = pods;
        self
    }

    /// Puts the gateway behind a NAT router.
    pub fn nat(mut self, nat: Nat) -> SiteSpec {
        self.nat = Some(nat);
        self
    }

    /// Emulates a WAN on the access link.
    pub fn wan(mut self, wan: Wan) -> SiteSpec {
        self.wan = wan;
        self
    }

    /// Makes the site a cluster (it also needs [`SiteSpec::nat`]).
    pub fn cluster(mut self, cluster: ClusterSpec) -> SiteSpec {
        self.cluster = Some(cluster);
        self
    }
}

/// The kind of NAT router in front of a gateway (nftables masquerade).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade`: keeps the source port when it is free (endpoint-independent
    /// mapping in practice), filtering by address and port.
    PortPreserving,
    /// `masquerade random,fully-random`: a new random port per destination.
    Symmetric,
    /// [`Nat::PortPreserving`] on a router without an input firewall: a
    /// packet from the internet that matches no mapping is taken by the
    /// router itself (nothing listens, it answers ICMP port unreachable)
    /// and conntrack confirms it as an inbound flow. A later outbound flow
    /// of the same addresses and ports would collide with it and gets
    /// another external port.
    PortPreservingNoInputFirewall,
    /// [`Nat::PortPreserving`] behind an egress firewall that lets no UDP
    /// out (IPv4 and IPv6): only TCP (and ICMP) leave the site.
    UdpBlocked,
}

/// A built topology. Dropping it tears everything down (see the crate docs).
pub struct Lab {
    id: String,
    internet: Netns,
    sites: Vec<Site>,
    wires: Vec<Wire>,
}

/// A built site.
#[derive(Debug)]
pub struct Site {
    /// The name from the spec.
    pub name: String,
    /// Where the Causeway daemon runs. On a cluster site: node 0 (the
    /// first gateway-capable node), the same namespace as `cluster.nodes[0].ns`.
    pub gateway: Netns,
    /// The gateway's own IPv4 underlay address (behind the NAT if any); on
    /// a cluster site node 0's address on the node LAN.
    pub wan_addr: IpAddr,
    /// The IPv4 address the internet sees: the NAT router's outside address, or `wan_addr`.
    pub public_addr: IpAddr,
    /// The gateway's IPv6 underlay address; routed (never translated) to
    /// the internet. `::` on a cluster site: its node network is IPv4 only.
    pub wan_addr6: Ipv6Addr,
    /// The NAT router, if the site has one.
    pub nat_router: Option<Netns>,
    /// The pod networks from the spec.
    pub pod_cidrs: Vec<IpNet>,
    /// The pods, in order; on a cluster site node 0's pods (the same
    /// namespaces as `cluster.nodes[0].pods`).
    pub pods: Vec<Pod>,
    /// The nodes, node network and virtual IP of a cluster site.
    pub cluster: Option<Cluster>,
}

/// Sysctls of a wire namespace: no IPv6 stack chattering on the wire.
const WIRE_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
];

/// `ethtool -K` settings of the wire's own veths: no offloads at all, so the
/// wire reads finished frames no larger than the MTU.
const WIRE_OFFLOADS: &str = "tx off tso off gso off tx-udp-segmentation off gro off";

/// `ethtool -K` settings of the veth ends facing the wire: nothing left to
/// segment or checksum on transmit; GRO on receive is fine (and puts the veth
/// in NAPI mode, see "WAN emulation" in the crate docs).
const OUTER_OFFLOADS: &str = "tx off tso off gso off tx-udp-segmentation off gro on";

/// The internet's packet filter: only underlay addresses may cross it.
const INTERNET_NFT: &str = r#"
table inet causeway_lab {
    counter leaked { }
    chain prerouting {
        type filter hook prerouting priority raw; policy accept;
        ip saddr != 198.18.0.0/15 counter name "leaked" drop
        ip daddr != 198.18.0.0/15 counter name "leaked" drop
        ip6 saddr != { 2001:db8::/32, fe80::/10, ::/128 } counter name "leaked" drop
        ip6 daddr != { 2001:db8::/32, fe80::/10, ff00::/8 } counter name "leaked" drop
    }
}
"#;

impl Lab {
    /// Builds the topology. Sweeps stale namespaces of dead processes first;
    /// on error, removes whatever it had made.
    pub fn build(spec: &LabSpec) -> Result<Lab, Error> {
        validate(spec)?;
        netns::sweep_stale_namespaces();
        let id = netns::next_id();
        let internet = Netns::add(format!("{id}-inet"))?;
        let lab = Lab {
            id,
            internet,
            sites: Vec::new(),
            wires: Vec::new(),
        };
        lab.build_internet()?;
        let mut lab = lab.build_sites(spec)?;
        for ns in lab.namespaces_mut() {
            ns.wait_links_up(Duration::from_secs(3))?;
        }
        Ok(lab)
    }

    fn build_internet(&self) -> Result<(), Error> {
        base_setup(&self.internet, &[BASE_SYSCTLS, ROUTER_SYSCTLS])?;
        self.internet
            .ip(&["addr", "add", "198.18.0.1/32", "dev", "lo"])?;
        self.internet
            .ip(&["addr", "add", "2001:db8::1/128", "dev", "lo"])?;
        self.internet
            .run_with_input("nft", &["-f", "-"], INTERNET_NFT)?;
        Ok(())
    }

    fn build_sites(mut self, spec: &LabSpec) -> Result<Lab, Error> {
        for (i, site) in spec.sites.iter().enumerate() {
            let (site, wire) = self.build_site(i, site)?;
            self.sites.push(site);
            self.wires.extend(wire);
        }
        Ok(self)
    }

    fn build_site(&self, i: usize, spec: &SiteSpec) -> Result<(Site, Option<Wire>), Error> {
        let n = u8::try_from(i + 1).map_err(|_| Error::Spec("too many sites".into()))?;
        let prefix = format!("{}-{}", self.id, spec.name);
        if let (Some(cluster), Some(kind)) = (&spec.cluster, spec.nat) {
            return self.build_cluster_site(n, &prefix, spec, cluster, kind);
        }
        let gateway = Netns::add(format!("{prefix}-gw"))?;
        base_setup(&gateway, &[BASE_SYSCTLS, ROUTER_SYSCTLS])?;
        let nat_router = match spec.nat {
            Some(_) => {
                let nat = Netns::add(format!("{prefix}-nat"))?;
                base_setup(&nat, &[BASE_SYSCTLS, ROUTER_SYSCTLS])?;
                Some(nat)
            }
            None => None,
        };
        let first_hop = nat_router.as_ref().unwrap_or(&gateway);
        let wire = self.access_link(n, &prefix, first_hop, spec.wan)?;
        let public_addr = IpAddr::V4(Ipv4Addr::new(198, 18, n, 2));
        let (wan_addr, wan_addr6) = match (&nat_router, spec.nat) {
            (Some(nat), Some(kind)) => self.nat_inside(n, nat, &gateway, kind)?,
            _ => (
                public_addr,
                Ipv6Addr::new(0x2001, 0xdb8, n.into(), 0, 0, 0, 0, 2),
            ),
        };
        let pods = (0..spec.pods)
            .map(|j| build_pod(&gateway, &format!("{prefix}-pod{j}"), spec, j))
            .collect::<Result<_, _>>()?;
        let site = Site {
            name: spec.name.clone(),
            gateway,
            wan_addr,
            public_addr,
            wan_addr6,
            nat_router,
            pod_cidrs: spec.pod_cidrs.clone(),
            pods,
            cluster: None,
        };
        Ok((site, wire))
    }

    /// A cluster site: the access link lands on the NAT router, whose
    /// inside is the cluster's node network.
    fn build_cluster_site(
        &self,
        n: u8,
        prefix: &str,
        spec: &SiteSpec,
        cluster: &ClusterSpec,
        kind: Nat,
    ) -> Result<(Site, Option<Wire>), Error> {
        let nat = Netns::add(format!("{prefix}-nat"))?;
        base_setup(&nat, &[BASE_SYSCTLS, ROUTER_SYSCTLS, NO_REDIRECTS])?;
        let wire = self.access_link(n, prefix, &nat, spec.wan)?;
        let (pod_cidr, _) = pod_cidrs(spec)?;
        let cluster = Cluster::build(prefix, n, cluster, pod_cidr, &nat)?;
        let forward = cluster.port_forward.map(|port| (cluster.vip, port));
        nat.run_with_input("nft", &["-f", "-"], &nat_ruleset(kind, forward))?;
        let node0 = cluster.node(0);
        let site = Site {
            name: spec.name.clone(),
            gateway: node0.ns.alias(),
            wan_addr: node0.addr.into(),
            public_addr: Ipv4Addr::new(198, 18, n, 2).into(),
            wan_addr6: Ipv6Addr::UNSPECIFIED,
            nat_router: Some(nat),
            pod_cidrs: spec.pod_cidrs.clone(),
            pods: node0.pods.iter().map(Pod::alias).collect(),
            cluster: Some(cluster),
        };
        Ok((site, wire))
    }

    /// The access link of site `n - 1`: internet `site{i}` ↔ `wan0` of the
    /// site's first hop, through a wire namespace if `wan` emulates anything.
    fn access_link(
        &self,
        n: u8,
        prefix: &str,
        first_hop: &Netns,
        wan: Wan,
    ) -> Result<Option<Wire>, Error> {
        let inet_if = format!("site{}", n - 1);
        let wire = if wan.is_none() {
            self.internet.veth(&inet_if, first_hop, "wan0")?;
            None
        } else {
            let wire_ns = Netns::add(format!("{prefix}-wire"))?;
            base_setup(&wire_ns, &[BASE_SYSCTLS, WIRE_SYSCTLS])?;
            self.internet.veth(&inet_if, &wire_ns, "w0")?;
            wire_ns.veth("w1", first_hop, "wan0")?;
            for (ns, ifname, offloads) in [
                (&wire_ns, "w0", WIRE_OFFLOADS),
                (&wire_ns, "w1", WIRE_OFFLOADS),
                (&self.internet, inet_if.as_str(), OUTER_OFFLOADS),
                (first_hop, "wan0", OUTER_OFFLOADS),
            ] {
                let args: Vec<&str> = ["-K", ifname]
                    .into_iter()
                    .chain(offloads.split(' '))
                    .collect();
                ns.run("ethtool", &args)?;
            }
            link_up(&wire_ns, "w0")?;
            link_up(&wire_ns, "w1")?;
            Some(Wire::start(wire_ns, "w0", "w1", wan)?)
        };
        let v4 = |host| IpAddr::V4(Ipv4Addr::new(198, 18, n, host));
        let v6 = |host| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, n.into(), 0, 0, 0, 0, host));
        for (ns, ifname, host) in [
            (&self.internet, inet_if.as_str(), 1),
            (first_hop, "wan0", 2),
        ] {
            address(ns, ifname, v4(host), 24)?;
            address(ns, ifname, v6(host.into()), 64)?;
            link_up(ns, ifname)?;
            if wire.is_some() {
                // Frames from the wire are received (GRO, the whole stack) in
                // a NAPI thread of this veth's own, not on the wire's thread.
                let threaded = format!("echo 1 > /sys/class/net/{ifname}/threaded");
                ns.run("sh", &["-c", &threaded])?;
            }
        }
        default_route(first_hop, v4(1))?;
        default_route(first_hop, v6(1))?;
        Ok(wire)
    }

    /// The link between NAT router `nat` and `gateway` of site `n - 1`, and
    /// the NAT rules. Returns the gateway's IPv4 and IPv6 addresses.
    fn nat_inside(
        &self,
        n: u8,
        nat: &Netns,
        gateway: &Netns,
        kind: Nat,
    ) -> Result<(IpAddr, Ipv6Addr), Error> {
        let v4 = |host| Ipv4Addr::new(172, 16, n, host);
        let v6 = |host| Ipv6Addr::new(0x2001, 0xdb8, n.into(), 1, 0, 0, 0, host);
        nat.veth("lan0", gateway, "wan0")?;
        for (ns, ifname, host) in [(nat, "lan0", 1), (gateway, "wan0", 2)] {
            address(ns, ifname, v4(host).into(), 24)?;
            address(ns, ifname, v6(host.into()).into(), 64)?;
            link_up(ns, ifname)?;
        }
        default_route(gateway, v4(1).into())?;
        default_route(gateway, v6(1).into())?;
        // IPv6 is routed to the gateway, through the NAT router's firewall.
        let outside = Ipv6Addr::new(0x2001, 0xdb8, n.into(), 0, 0, 0, 0, 2).to_string();
        let inside = format!("{}/64", v6(0));
        self.internet
            .ip(&["-6", "route", "add", &inside, "via", &outside])?;
        nat.run_with_input("nft", &["-f", "-"], &nat_ruleset(kind, None))?;
        Ok((v4(2).into(), v6(2)))
    }

    /// The site named `name`.
    ///
    /// # Panics
    /// If there is no such site (the message lists the known ones).
    pub fn site(&self, name: &str) -> &Site {
        match self.sites.iter().find(|s| s.name == name) {
            Some(site) => site,
            None => {
                let known: Vec<&str> = self.sites.iter().map(|s| s.name.as_str()).collect();
                panic!(
                    "lab {} has no site {name:?}; its sites are {known:?}",
                    self.id
                )
            }
        }
    }

    /// All sites, in spec order.
    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    /// The internet router's namespace.
    pub fn internet(&self) -> &Netns {
        &self.internet
    }

    /// An IPv4 address of the internet router reachable from every site
    /// (`198.18.0.1`): where to run a rendezvous or STUN server.
    pub fn internet_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, 1)
    }

    /// The IPv6 counterpart of [`Lab::internet_addr`] (`2001:db8::1`).
    pub fn internet_addr6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)
    }

    /// The run id in every namespace name of this lab (`cw<pid>x<counter>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Packets that reached the internet with a source or destination outside
    /// the underlay (e.g. plaintext pod traffic), all dropped there. A test of
    /// the tunnel should see 0.
    pub fn leaked_packets(&self) -> Result<u64, Error> {
        let out = self.internet.run(
            "nft",
            &["list", "counter", "inet", "causeway_lab", "leaked"],
        )?;
        out.split_whitespace()
            .skip_while(|word| *word != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                let e = std::io::Error::other(format!("unexpected output {out:?}"));
                self.internet.io_error("reading the leak counter", e)
            })
    }

    /// CPU time used so far by all WAN emulator threads (report it next to
    /// benchmark results: it is not free).
    pub fn wan_cpu_time(&self) -> Duration {
        self.wires.iter().map(Wire::cpu_time).sum()
    }

    /// Frame counters of all WAN emulators.
    pub fn wan_stats(&self) -> WanStats {
        self.wires
            .iter()
            .map(Wire::stats)
            .fold(WanStats::default(), |a, b| WanStats {
                forwarded: a.forwarded + b.forwarded,
                lost: a.lost + b.lost,
                dropped: a.dropped + b.dropped,
            })
    }

    /// Every namespace of the lab.
    fn namespaces_mut(&mut self) -> Vec<&mut Netns> {
        let mut all = vec![&mut self.internet];
        for site in &mut self.sites {
            all.extend(site.nat_router.as_mut());
            match &mut site.cluster {
                // `gateway` and `pods` are aliases of node 0's: the cluster owns them.
                Some(cluster) => all.extend(cluster.namespaces_mut()),
                None => {
                    all.push(&mut site.gateway);
                    all.extend(site.pods.iter_mut().map(|p| &mut p.ns));
                }
            }
        }
        all.extend(self.wires.iter_mut().map(Wire::netns_mut));
        all
    }
}

impl Drop for Lab {
    /// Stops the WAN emulators, then kills every process in the lab's
    /// namespaces and deletes them, all at once.
    fn drop(&mut self) {
        for wire in &mut self.wires {
            wire.stop();
        }
        let mut namespaces = self.namespaces_mut();
        let names: Vec<String> = namespaces.iter().map(|ns| ns.name().to_owned()).collect();
        netns::teardown(&names.iter().map(String::as_str).collect::<Vec<_>>());
        namespaces.iter_mut().for_each(|ns| ns.disarm());
    }
}

impl Site {
    /// Removes the global IPv6 addresses of the gateway's underlay link
    /// (`wan0`). The lab routes IPv6 between sites and never translates it,
    /// NAT or not, so a test or benchmark about IPv4 NATs takes it away
    /// lest every pair meet directly over IPv6. Does nothing on a cluster
    /// site (its node network has no IPv6 underlay).
    pub fn remove_ipv6_underlay(&self) -> Result<(), Error> {
        if self.cluster.is_some() {
            return Ok(());
        }
        self.gateway
            .ip(&["-6", "addr", "flush", "dev", "wan0", "scope", "global"])
            .map(drop)
    }

    /// Rebinds the site's NAT router, as a router reboot or a carrier NAT
    /// does: from now on it translates to source port `port` (one port:
    /// still one mapping for every destination), and every mapping it had
    /// is forgotten. Does nothing for a site without NAT.
    pub fn rebind_nat(&self, port: u16) -> Result<(), Error> {
        let Some(nat) = &self.nat_router else {
            return Ok(());
        };
        let rules = format!(
            "flush chain ip nat postrouting\n\
             add rule ip nat postrouting oifname \"wan0\" meta l4proto {{ tcp, udp }} masquerade to :{port}\n\
             add rule ip nat postrouting oifname \"wan0\" masquerade\n"
        );
        nat.run_with_input("nft", &["-f", "-"], &rules)?;
        self.flush_nat_mappings()
    }

    /// Forgets every NAT mapping of the site's NAT router (like `conntrack
    /// -F`, over ctnetlink), as if the router had rebooted or its mappings had
    /// timed out. Does nothing for a site without NAT.
    pub fn flush_nat_mappings(&self) -> Result<(), Error> {
        let Some(nat) = &self.nat_router else {
            return Ok(());
        };
        nat.try_enter(crate::conntrack::flush)?
            .map_err(|e| nat.io_error("flushing conntrack", e))
    }
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("id", &self.id)
            .field("sites", &self.sites)
            .finish_non_exhaustive()
    }
}

fn build_pod(gateway: &Netns, name: &str, spec: &SiteSpec, j: usize) -> Result<Pod, Error> {
    let (v4, v6) = pod_cidrs(spec)?;
    let ns = Netns::add(name.to_owned())?;
    base_setup(&ns, &[BASE_SYSCTLS])?;
    let gw_if = format!("pod{j}");
    gateway.veth(&gw_if, &ns, "eth0")?;
    let gateway_addr = pod_v4(v4, j, 1)?;
    let addr = pod_v4(v4, j, 2)?;
    address(gateway, &gw_if, gateway_addr.into(), 24)?;
    address(&ns, "eth0", addr.into(), 24)?;
    let (mut addr6, mut gateway_addr6) = (None, None);
    if let Some(v6) = v6 {
        let (gw6, pod6) = (pod_v6(v6, j, 1)?, pod_v6(v6, j, 2)?);
        address(gateway, &gw_if, gw6.into(), 112)?;
        address(&ns, "eth0", pod6.into(), 112)?;
        (addr6, gateway_addr6) = (Some(pod6), Some(gw6));
    }
    link_up(gateway, &gw_if)?;
    link_up(&ns, "eth0")?;
    default_route(&ns, gateway_addr.into())?;
    if let Some(gw6) = gateway_addr6 {
        default_route(&ns, gw6.into())?;
    }
    Ok(Pod {
        ns,
        addr,
        addr6,
        gateway_addr,
        gateway_addr6,
    })
}

/// The NAT router's nftables rules; `forward` is a UDP port forward from
/// `wan0` to `(address, same port)`.
fn nat_ruleset(kind: Nat, forward: Option<(Ipv4Addr, u16)>) -> String {
    let flags = match kind {
        Nat::PortPreserving | Nat::PortPreservingNoInputFirewall | Nat::UdpBlocked => "",
        Nat::Symmetric => " random,fully-random",
    };
    let input_drop = match kind {
        Nat::PortPreservingNoInputFirewall => "",
        Nat::PortPreserving | Nat::Symmetric | Nat::UdpBlocked => "\n        iifname \"wan0\" drop",
    };
    let udp_drop = match kind {
        Nat::UdpBlocked => "\n        oifname \"wan0\" meta l4proto udp drop",
        _ => "",
    };
    let (prerouting, forwarded) = match forward {
        Some((addr, port)) => (
            format!(
                "
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname \"wan0\" udp dport {port} dnat to {addr}:{port}
    }}"
            ),
            "\n        ct status dnat accept",
        ),
        None => (String::new(), ""),
    };
    format!(
        r#"
table ip nat {{{prerouting}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" masquerade{flags}
    }}
}}
table inet filter {{
    chain input {{
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        iifname "wan0" meta l4proto {{ icmp, ipv6-icmp }} accept{input_drop}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state established,related accept{forwarded}{udp_drop}
        iifname "wan0" drop
    }}
}}
"#
    )
}

/// The site's first IPv4 and first IPv6 pod CIDR.
fn pod_cidrs(spec: &SiteSpec) -> Result<(Ipv4Net, Option<Ipv6Net>), Error> {
    let v4 = spec.pod_cidrs.iter().find_map(|c| match c {
        IpNet::V4(net) => Some(*net),
        IpNet::V6(_) => None,
    });
    let v6 = spec.pod_cidrs.iter().find_map(|c| match c {
        IpNet::V6(net) => Some(*net),
        IpNet::V4(_) => None,
    });
    let v4 = v4.ok_or_else(|| {
        Error::Spec(format!(
            "site {:?}: pod_cidrs needs an IPv4 CIDR",
            spec.name
        ))
    })?;
    Ok((v4, v6))
}

/// Host `host` of pod `j`'s /24: the (j+1)-th /24 of `cidr`.
fn pod_v4(cidr: Ipv4Net, j: usize, host: u8) -> Result<Ipv4Addr, Error> {
    nth_24(cidr, j + 1, host).ok_or_else(|| {
        Error::Spec(format!(
            "pod CIDR {cidr} has no room for a /24 for pod {j} (pod j uses /24 number j+1)"
        ))
    })
}

/// Host `host` of pod `j`'s /112: the (j+1)-th /112 of `cidr`.
fn pod_v6(cidr: Ipv6Net, j: usize, host: u16) -> Result<Ipv6Addr, Error> {
    let bits = 112u32.saturating_sub(cidr.prefix_len().into());
    if cidr.prefix_len() > 96 || (bits < 64 && j as u64 + 1 >= 1u64 << bits) {
        return Err(Error::Spec(format!(
            "pod CIDR {cidr} has no room for a /112 for pod {j} (pod j uses /112 number j+1)"
        )));
    }
    Ok(Ipv6Addr::from(
        u128::from(cidr.network()) + ((j as u128 + 1) << 16) + u128::from(host),
    ))
}

fn validate(spec: &LabSpec) -> Result<(), Error> {
    if spec.sites.len() > 254 {
        return Err(Error::Spec(format!(
            "{} sites; at most 254",
            spec.sites.len()
        )));
    }
    let underlay: [IpNet; 3] = [
        IpNet::V4(Ipv4Net::new(Ipv4Addr::new(198, 18, 0, 0), 15).expect("valid prefix")),
        IpNet::V4(Ipv4Net::new(Ipv4Addr::new(172, 16, 0, 0), 16).expect("valid prefix")),
        IpNet::V6(
            Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32).expect("valid prefix"),
        ),
    ];
    for (i, site) in spec.sites.iter().enumerate() {
        check_label("site name", &site.name)?;
        if spec.sites[..i].iter().any(|s| s.name == site.name) {
            return Err(Error::Spec(format!("two sites are named {:?}", site.name)));
        }
        let err = |msg: String| Error::Spec(format!("site {:?}: {msg}", site.name));
        if site.pods == 0 {
            return Err(err("pods must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&site.wan.loss) {
            return Err(err(format!(
                "wan.loss {} is not within 0.0..=1.0",
                site.wan.loss
            )));
        }
        for cidr in &site.pod_cidrs {
            if let Some(net) = underlay
                .iter()
                .find(|u| u.contains(cidr) || cidr.contains(*u))
            {
                return Err(err(format!(
                    "pod CIDR {cidr} overlaps the lab's underlay {net}"
                )));
            }
        }
        let (v4, v6) = pod_cidrs(site)?;
        if let Some(cluster) = &site.cluster {
            validate_cluster(i, site, cluster, v4)?;
            continue;
        }
        pod_v4(v4, site.pods - 1, 2)?;
        if let Some(v6) = v6 {
            pod_v6(v6, site.pods - 1, 2)?;
        }
    }
    Ok(())
}

/// The cluster part of site `i`: `v4` is its first IPv4 pod CIDR.
fn validate_cluster(
    i: usize,
    site: &SiteSpec,
    cluster: &ClusterSpec,
    v4: Ipv4Net,
) -> Result<(), Error> {
    let err = |msg: String| Error::Spec(format!("site {:?}: {msg}", site.name));
    cluster.check().map_err(err)?;
    if site.nat.is_none() {
        return Err(err(
            "a cluster site needs a NAT router in front of its node network: add .nat(..)".into(),
        ));
    }
    if site.pods != 1 {
        return Err(err(format!(
            "pods is {}, but a cluster site numbers its pods per node: set \
             ClusterSpec::pods_per_node and leave pods at 1",
            site.pods
        )));
    }
    if i >= 155 {
        return Err(err(format!(
            "a cluster must be one of the first 155 sites (it is site {i}, 0-based): its \
             routed subnet is 172.16.(101+i).0/24"
        )));
    }
    if nth_24(v4, cluster.nodes, 0).is_none() {
        return Err(err(format!(
            "pod CIDR {v4} has no room for {} node slices (node i uses /24 number i+1)",
            cluster.nodes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("valid CIDR")
    }

    #[test]
    fn pod_addresses_skip_the_first_subnet() {
        let v4: Ipv4Net = "10.0.0.0/16".parse().expect("valid");
        assert_eq!(pod_v4(v4, 0, 2).ok(), Some(Ipv4Addr::new(10, 0, 1, 2)));
        assert_eq!(pod_v4(v4, 4, 1).ok(), Some(Ipv4Addr::new(10, 0, 5, 1)));
        let v6: Ipv6Net = "fd00:10::/64".parse().expect("valid");
        assert_eq!(pod_v6(v6, 0, 2).ok(), "fd00:10::1:2".parse().ok());
        assert_eq!(pod_v6(v6, 2, 1).ok(), "fd00:10::3:1".parse().ok());
    }

    #[test]
    fn pod_cidrs_must_have_room() {
        let small: Ipv4Net = "10.0.0.0/23".parse().expect("valid");
        assert!(pod_v4(small, 0, 2).is_ok());
        assert!(pod_v4(small, 1, 2).is_err());
        assert!(pod_v4("10.0.0.0/24".parse().expect("valid"), 0, 2).is_err());
        assert!(pod_v6("fd00::/97".parse().expect("valid"), 0, 2).is_err());
        assert!(pod_v6("fd00::/96".parse().expect("valid"), 0, 2).is_ok());
        assert!(pod_v6("fd00::/96".parse().expect("valid"), 65_535, 2).is_err());
    }

    #[test]
    fn validation_names_the_problem() {
        let bad = |site: SiteSpec| {
            validate(&LabSpec { sites: vec![site] })
                .expect_err("invalid")
                .to_string()
        };
        assert!(bad(SiteSpec::new("a", vec![net("fd00::/64")])).contains("needs an IPv4"));
        assert!(bad(SiteSpec::new("a b", vec![net("10.0.0.0/16")])).contains("site name"));
        assert!(bad(SiteSpec::new("a", vec![net("198.18.0.0/16")])).contains("underlay"));
        assert!(bad(SiteSpec::new("a", vec![net("10.0.0.0/16")]).pods(0)).contains("at least 1"));
        let lossy = Wan {
            delay: Duration::ZERO,
            loss: 1.5,
        };
        assert!(bad(SiteSpec::new("a", vec![net("10.0.0.0/16")]).wan(lossy)).contains("wan.loss"));
        let twice = LabSpec {
            sites: vec![SiteSpec::new("a", vec![net("10.0.0.0/16")]); 2],
        };
        assert!(validate(&twice).is_err());
    }
}
