//! Small iproute2 steps shared by the site and cluster builders.

use std::net::IpAddr;

use crate::Error;
use crate::netns::Netns;

/// Sysctls of namespaces that route (internet, NAT routers, gateways, nodes).
pub(crate) const ROUTER_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
];

/// Sets `sysctls` and brings `lo` up.
pub(crate) fn base_setup(ns: &Netns, sysctls: &[&[(&str, &str)]]) -> Result<(), Error> {
    ns.sysctls(&sysctls.concat())?;
    link_up(ns, "lo")
}

/// `ip link set IFNAME up`.
pub(crate) fn link_up(ns: &Netns, ifname: &str) -> Result<(), Error> {
    ns.ip(&["link", "set", ifname, "up"]).map(drop)
}

/// `ip addr add ADDR/PREFIX dev IFNAME` (IPv6 without duplicate address detection).
pub(crate) fn address(ns: &Netns, ifname: &str, addr: IpAddr, prefix: u8) -> Result<(), Error> {
    let cidr = format!("{addr}/{prefix}");
    match addr {
        IpAddr::V4(_) => ns.ip(&["addr", "add", &cidr, "dev", ifname]),
        IpAddr::V6(_) => ns.ip(&["-6", "addr", "add", &cidr, "dev", ifname, "nodad"]),
    }
    .map(drop)
}

/// `ip route add default via VIA`.
pub(crate) fn default_route(ns: &Netns, via: IpAddr) -> Result<(), Error> {
    let family = if via.is_ipv4() { "-4" } else { "-6" };
    ns.ip(&[family, "route", "add", "default", "via", &via.to_string()])
        .map(drop)
}

/// `ip link add NAME type bridge`, without multicast snooping (so VRRP and
/// any other multicast is simply flooded) and up. With STP off (the
/// default) a port forwards as soon as it is up.
pub(crate) fn bridge(ns: &Netns, name: &str) -> Result<(), Error> {
    ns.ip(&["link", "add", name, "type", "bridge", "mcast_snooping", "0"])?;
    link_up(ns, name)
}

/// Makes `port` a port of `bridge` and brings it up.
pub(crate) fn bridge_port(ns: &Netns, bridge: &str, port: &str) -> Result<(), Error> {
    ns.ip(&["link", "set", port, "master", bridge])?;
    link_up(ns, port)
}
