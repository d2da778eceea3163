//! Network-namespace topologies for Causeway's end-to-end tests and benchmarks.
//!
//! [`Lab::build`] turns a [`LabSpec`] into Linux network namespaces wired with
//! veth pairs: an "internet" router, one gateway per site (where the Causeway
//! daemon runs) or a cluster of nodes, optional NAT routers, pod namespaces
//! behind each gateway or node, and an optional user-space WAN emulator
//! (delay, loss) on a site's access link.
//! Everything is removed when the [`Lab`] is dropped, also while a test panics.
//!
//! What it does not do: run Causeway, configure tunnels, or touch the host's
//! own network namespace. It shells out to `ip` (iproute2), `nft` and
//! `ethtool`, and must run as root.
//!
//! # Topology
//!
//! ```text
//!  pod0 ─┐                                                          ┌─ pod0
//!  pod1 ─┼─ gateway a ── [wire a] ── internet ── [nat b] ── gateway b ┼─ pod1
//!        └──        (WAN emulator)    (router)   (NAT router)        └──
//! ```
//!
//! # Addressing (site `i` is 0-based, `n = i + 1`)
//!
//! | link | internet / outer side | site / inner side |
//! |---|---|---|
//! | access link (internet `site{i}` ↔ `wan0`) | `198.18.n.1/24`, `2001:db8:n::1/64` | `198.18.n.2/24`, `2001:db8:n::2/64` |
//! | NAT inside (NAT `lan0` ↔ gateway `wan0`) | `172.16.n.1/24`, `2001:db8:n:1::1/64` | `172.16.n.2/24`, `2001:db8:n:1::2/64` |
//! | pod `j` (gateway `pod{j}` ↔ pod `eth0`) | `P4 + (j+1)·256 + 1 /24`, `P6 + (j+1)·2¹⁶ + 1 /112` | `… + 2` |
//!
//! `P4` is the site's first IPv4 pod CIDR (10.0.0.0/16 → pod0 is 10.0.1.2, its
//! gateway 10.0.1.1), `P6` its first IPv6 pod CIDR if any (fd00:10::/64 → pod0
//! is fd00:10::1:2, its gateway fd00:10::1:1).
//!
//! * The internet namespace forwards IPv4 and IPv6 and owns `198.18.0.1/32`
//!   and `2001:db8::1/128` on `lo` ([`Lab::internet_addr`]): a place to run a
//!   rendezvous reachable from every site. It has no route to any pod CIDR,
//!   and drops and counts any packet whose source or destination is not an
//!   underlay address ([`Lab::leaked_packets`]): plaintext pod traffic can
//!   never cross it.
//! * Without NAT the access link lands on the gateway: `wan_addr ==
//!   public_addr == 198.18.n.2`. With NAT a NAT router sits in between
//!   (`public_addr` 198.18.n.2, `wan_addr` 172.16.n.2) running nftables:
//!   `masquerade` ([`Nat::PortPreserving`]) or `masquerade random,fully-random`
//!   ([`Nat::Symmetric`]) on `wan0`, plus a stateful filter that only lets
//!   replies in (`ct state established,related accept; iifname "wan0" drop`),
//!   for IPv4 and IPv6 alike. [`Nat::PortPreservingNoInputFirewall`] leaves
//!   the `drop` out of the router's input chain: unsolicited packets reach
//!   the router itself and conntrack confirms them. [`Nat::UdpBlocked`] also
//!   drops every UDP datagram going out of `wan0` (an egress firewall that
//!   lets only TCP and ICMP out). IPv6 is routed, not translated:
//!   [`Site::wan_addr6`] is reachable from the internet once the gateway has
//!   sent to the peer, like a home router's IPv6 firewall.
//! * Gateways forward IPv4 and IPv6, route to their own pods only, and have a
//!   default route towards the internet. They have no route to other sites'
//!   pods: that is the tunnel's job.
//! * Every namespace has `lo` up, `rp_filter` off, IPv6 DAD off and ICMP echo
//!   sockets allowed ([`Netns::ping`]: the lab machines have no `ping`).
//!   [`Lab::build`] returns once every link is operationally up, so IPv6
//!   works from the first packet.
//! * [`Site::flush_nat_mappings`] deletes the NAT router's conntrack entries
//!   (what `conntrack -F` does, sent over ctnetlink: the conntrack tool is not
//!   needed).
//!
//! # Cluster sites
//!
//! A site whose [`SiteSpec::cluster`] is set is a small Kubernetes-like
//! cluster instead of one gateway: [`ClusterSpec::nodes`] node namespaces on
//! a node network behind the site's NAT router (required), pods behind each
//! node on a CNI-like bridge (flannel host-gw style), the first
//! [`ClusterSpec::gateways`] nodes gateway-capable, the last
//! [`ClusterSpec::routed_nodes`] on a second subnet that only the NAT router
//! reaches. The node network and the pods are IPv4 only (an IPv6 pod CIDR
//! is ignored; [`Site::wan_addr6`] is `::`).
//!
//! ```text
//!                  switch ({prefix}-lan)
//!  internet ── NAT ─lan0── br0 ─┬─ n0 ── eth0 node0 cni0 ─┬─ pod0
//!     router      │             ├─ n1 ── eth0 node1 …     └─ pod1
//!                 │             └─ n2 ── eth0 node2 …
//!                 └─lan1── br1 ─── n3 ── eth0 node3 …  (routed node)
//! ```
//!
//! | what | address |
//! |---|---|
//! | NAT router `lan0` (node LAN, switch bridge `br0`) | `172.16.n.1/24` |
//! | node `i` `eth0` on the node LAN (switch port `n<i>`) | `172.16.n.(10+i)/24`, default via `.1` |
//! | virtual IP for keepalived ([`Cluster::vip`], never assigned by the testbed) | `172.16.n.100` |
//! | NAT router `lan1` (routed subnet, bridge `br1`; only with routed nodes) | `172.16.(100+n).1/24` |
//! | routed node `i` `eth0` (switch port `n<i>` on `br1`) | `172.16.(100+n).(10+i)/24`, default via `.1` |
//! | node `i`'s pod slice ([`Node::pod_slice`]), bridge `cni0` | `P4 + (i+1)·256`/24, `cni0` is `.1` |
//! | pod `j` of node `i` (`eth0`, veth `veth<j>` on the node's `cni0`) | `… + 2 + j`, default via `.1` |
//!
//! (`n = site index + 1`, `P4` as above: 10.0.0.0/16 → node0's pods are
//! 10.0.1.2, 10.0.1.3…, node1's 10.0.2.2….) Namespaces are `{prefix}-node{i}`,
//! `{prefix}-node{i}-pod{j}`, `{prefix}-lan` (the switch) and `{prefix}-nat`.
//!
//! * Routing: an L2 node routes each other L2 node's slice via that node's
//!   address (host-gw) and each routed node's slice via the router `.1`;
//!   a routed node routes everything via its `.1`; the NAT router routes each
//!   slice via its node. So every pod reaches every pod of its site, and
//!   every node every node. The NAT router forwards between its two inside
//!   subnets without translation: it masquerades only out of `wan0`.
//! * Nodes and the cluster's NAT router forward IPv4, have `rp_filter` off,
//!   and neither send nor accept ICMP redirects (routes stay what the test
//!   or a node agent set).
//! * [`Site::gateway`] and [`Site::pods`] are node 0 and its pods (the same
//!   namespaces as `cluster.nodes[0]`), so code written for one gateway runs
//!   its daemon on node 0; [`Site::wan_addr`] is node 0's address,
//!   [`Site::public_addr`] the NAT router's outside address.
//! * [`ClusterSpec::port_forward`] makes the NAT router forward UDP
//!   `public_addr:port` to `vip:port` (a static endpoint for peers).
//! * Failover: [`Cluster::cut_node_links`] takes a node's switch port down
//!   (the node looks unplugged), [`Cluster::restore_node_links`] plugs it
//!   back in; [`Cluster::vip_holders`] says who holds the virtual IP. The
//!   switch bridges do no multicast snooping: VRRP adverts (224.0.0.18)
//!   reach every node of the LAN, and no routed node.
//! * Left to the test: running keepalived and assigning the virtual IP, and
//!   `net.ipv4.ip_nonlocal_bind` (0 everywhere) should a backup's daemon
//!   bind the virtual IP before it holds it.
//!
//! # WAN emulation
//!
//! A site whose [`Wan`] is not zero gets an extra "wire" namespace in the middle
//! of its access link. A thread moves Ethernet frames between its two veths
//! with `AF_PACKET` sockets, holding each for [`Wan::delay`] and dropping it
//! with probability [`Wan::loss`], each direction independently (see
//! [`Lab::wan_cpu_time`] and [`Lab::wan_stats`]). It adds no loss of its own:
//! when a receiver is busy it queues (up to 65 536 frames, then tail-drops).
//! Checksum and segmentation offloads are off on all four veth ends of that
//! link, so every frame on the wire is a real frame of at most 1514 bytes.
//! The two outer ends keep GRO on and run their receive path in a threaded
//! NAPI kthread, so the emulator thread's CPU time is its own work (copying
//! frames), not the receiving namespace's network stack. On the 2-vCPU lab
//! machine it carries about 3.8 Gbit/s of TCP with 1 ms delay at ~2.3 µs of
//! its CPU per frame (release build).
//!
//! # Names and teardown
//!
//! Every namespace is named `cw<pid>x<counter>-…` (`cw123x0-a-gw`,
//! `cw123x0-a-pod0`, `cw123x0-a-nat`, `cw123x0-a-wire`, `cw123x0-inet`), so
//! parallel test processes never collide. Dropping a [`Lab`] (or a standalone
//! [`Netns`]) stops the WAN threads, sends SIGTERM to every process inside its
//! namespaces, SIGKILL to those still alive after a second, and deletes the
//! namespaces. [`Lab::build`] first sweeps namespaces left behind by processes
//! that no longer exist (a SIGKILLed test run).

mod cluster;
mod conntrack;
mod error;
mod keepalived;
mod lab;
mod links;
mod netns;
mod pod;
mod probe;
mod wire;

pub use cluster::{Cluster, ClusterSpec, Node};
pub use error::Error;
pub use keepalived::{Keepalived, SHIPPED_CONFIG, shipped_config};
pub use lab::{Lab, LabSpec, Nat, Site, SiteSpec};
pub use netns::{ChildGuard, Netns, run_command, sweep_stale_namespaces};
pub use pod::Pod;
pub use wire::{Wan, WanStats};

/// The CIDR type used for pod networks (re-exported from `ipnet`).
pub use ipnet::IpNet;
