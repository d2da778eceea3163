//! Pods: namespaces with one interface, `eth0`, and a default route.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::Ipv4Net;

use crate::netns::Netns;

/// A pod: a namespace with interface `eth0` behind a gateway (plain site) or
/// a node (cluster site).
#[derive(Debug)]
pub struct Pod {
    /// The pod's namespace.
    pub ns: Netns,
    /// The pod's IPv4 address.
    pub addr: Ipv4Addr,
    /// The pod's IPv6 address, if the site has an IPv6 pod CIDR (never on a
    /// cluster site: its networks are IPv4 only).
    pub addr6: Option<Ipv6Addr>,
    /// The gateway's (or node's) address on this pod's link: the pod's default route.
    pub gateway_addr: Ipv4Addr,
    /// The gateway's IPv6 address on this pod's link.
    pub gateway_addr6: Option<Ipv6Addr>,
}

impl Pod {
    /// The same pod, naming a namespace owned elsewhere (see [`Netns::alias`]).
    pub(crate) fn alias(&self) -> Pod {
        Pod {
            ns: self.ns.alias(),
            addr: self.addr,
            addr6: self.addr6,
            gateway_addr: self.gateway_addr,
            gateway_addr6: self.gateway_addr6,
        }
    }
}

/// Host `host` of the `k`-th /24 of `cidr` counting from 0, or `None` if
/// `cidr` is smaller than a /24 or has no such /24.
pub(crate) fn nth_24(cidr: Ipv4Net, k: usize, host: u8) -> Option<Ipv4Addr> {
    let subnets = 1u64 << 24u8.checked_sub(cidr.prefix_len())?;
    if k as u64 >= subnets {
        return None;
    }
    let k = u32::try_from(k).ok()?;
    Some(Ipv4Addr::from(
        u32::from(cidr.network()) + (k << 8) + u32::from(host),
    ))
}
