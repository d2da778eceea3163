//! What the node agent (`causeway node`) keeps on a node: routes to the
//! peers' view CIDRs towards the site's active gateway, marked with their
//! own route protocol [`NODE_ROUTE_PROTOCOL`], and the VXLAN device and
//! neighbour entry that reach a gateway off the node's L2 segment. The
//! gateway's side of that VXLAN is here too ([`Netlink::ensure_vxlan`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::error::errno;
use crate::route::in_main_table;
use crate::{Error, Link, Netlink};

/// The route protocol number that marks the node agent's routes
/// (`ip route show proto 202`); distinct from the gateway's
/// [`crate::ROUTE_PROTOCOL`] (201) so that neither ever removes the other's.
pub const NODE_ROUTE_PROTOCOL: u8 = 202;

/// The metric of the node agent's routes: worse than the gateway's routes
/// through its TUN (metric 0 for IPv4, 1024 for IPv6), better than the
/// gateway's backstops ([`crate::BACKSTOP_METRIC`]). On a node that also
/// runs a gateway, the gateway's own TUN route wins while it exists and the
/// node route takes over when it is gone.
pub const NODE_ROUTE_METRIC: u32 = 100_000;

/// The MAC address of the gateway's VXLAN device: fixed, so that a node
/// needs only the gateway's underlay address to reach it.
pub const GATEWAY_VXLAN_MAC: [u8; 6] = [0x02, 0x63, 0x77, 0x00, 0x00, 0x01];

/// The next hop node routes use through a VXLAN device for IPv4 views: a
/// link-local address that exists only as a permanent neighbour entry
/// mapping it to [`GATEWAY_VXLAN_MAC`].
pub const VXLAN_NEXT_HOP_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);

/// The same for IPv6 views (`fe80::63:77ff:fe00:1`, the EUI-64 of
/// [`GATEWAY_VXLAN_MAC`]).
pub const VXLAN_NEXT_HOP_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x63, 0x77ff, 0xfe00, 1);

/// Where a node route sends its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop {
    /// Straight to the gateway's address on a directly connected subnet.
    Via(IpAddr),
    /// Through a VXLAN device (by index) to the gateway's VXLAN MAC, via
    /// [`VXLAN_NEXT_HOP_V4`]/[`VXLAN_NEXT_HOP_V6`] `onlink`.
    Vxlan(u32),
}

/// A VXLAN device as Causeway wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Interface name.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP port (sent to and listened on).
    pub port: u16,
    /// Where every frame goes (a node's device: the active gateway); `None`
    /// for a receive-only device (the gateway's).
    pub remote: Option<IpAddr>,
    /// A fixed MAC address (the gateway's: [`GATEWAY_VXLAN_MAC`]); `None`:
    /// the kernel picks one.
    pub mac: Option<[u8; 6]>,
    /// MTU of the device.
    pub mtu: u32,
}

fn node_route_message(dst: IpNet, hop: Option<NextHop>) -> Result<RouteMessage, Error> {
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .map_err(|e| Error::InvalidRoute {
            dst,
            why: e.to_string(),
        })?
        .protocol(RouteProtocol::Other(NODE_ROUTE_PROTOCOL))
        .priority(NODE_ROUTE_METRIC);
    match hop {
        None => {}
        Some(NextHop::Via(gateway)) => {
            builder = builder.gateway(gateway).map_err(|e| Error::InvalidRoute {
                dst,
                why: e.to_string(),
            })?
        }
        Some(NextHop::Vxlan(index)) => {
            let next: IpAddr = match dst {
                IpNet::V4(_) => VXLAN_NEXT_HOP_V4.into(),
                IpNet::V6(_) => VXLAN_NEXT_HOP_V6.into(),
            };
            builder = builder
                .gateway(next)
                .map_err(|e| Error::InvalidRoute {
                    dst,
                    why: e.to_string(),
                })?
                .output_interface(index)
                .onlink();
        }
    }
    let mut msg = builder.build();
    msg.header.destination_prefix_length = dst.prefix_len();
    Ok(msg)
}

impl Netlink {
    /// The node agent's routes: destinations of the routes with
    /// [`NODE_ROUTE_PROTOCOL`] in the main table.
    pub async fn node_routes(&self) -> Result<Vec<IpNet>, Error> {
        self.our_routes(NODE_ROUTE_PROTOCOL, "node routes", in_main_table)
            .await
    }

    /// Installs (or replaces) the node route to `dst` through `hop`.
    pub async fn ensure_node_route(&self, dst: IpNet, hop: NextHop) -> Result<(), Error> {
        let msg = node_route_message(dst, Some(hop))?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                Error::request(
                    format!("add route {dst} {hop:?} proto {NODE_ROUTE_PROTOCOL} metric {NODE_ROUTE_METRIC}"),
                    e,
                )
            })
    }

    /// Removes the node route to `dst`; a missing route is success.
    pub async fn remove_node_route(&self, dst: IpNet) -> Result<(), Error> {
        let mut msg = node_route_message(dst, None)?;
        msg.header.scope = RouteScope::NoWhere;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT | libc::ENODEV)) => {
                Ok(())
            }
            Err(e) => Err(Error::request(
                format!("delete route {dst} proto {NODE_ROUTE_PROTOCOL}"),
                e,
            )),
        }
    }

    /// Makes the node routes exactly `wanted`: every one (re)installed with
    /// its next hop, every other route with our mark removed. Nobody
    /// else's route is touched.
    pub async fn reconcile_node_routes(
        &self,
        wanted: &[(IpNet, NextHop)],
    ) -> Result<crate::RouteChanges, Error> {
        let present = self.node_routes().await?;
        let mut changes = crate::RouteChanges::default();
        for &(dst, hop) in wanted {
            if !present.contains(&dst) {
                changes.added.push(dst);
            }
            self.ensure_node_route(dst, hop).await?;
        }
        for dst in present {
            if !wanted.iter().any(|(w, _)| *w == dst) {
                self.remove_node_route(dst).await?;
                changes.removed.push(dst);
            }
        }
        Ok(changes)
    }

    /// Every address of every interface in this namespace, with its prefix
    /// length (what `ip addr` shows), and the interface index.
    pub async fn addresses(&self) -> Result<Vec<(u32, IpNet)>, Error> {
        let mut out = Vec::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|e| Error::request("list addresses", e))?
        {
            if let Some(net) = address_of(&msg) {
                out.push((msg.header.index, net));
            }
        }
        Ok(out)
    }

    /// Creates the VXLAN device `spec` and brings it up. A device of that
    /// name left by an earlier run (or with other settings) is deleted and
    /// created again, so the result always matches `spec`; a device of that
    /// name that is not VXLAN is somebody else's and is refused.
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<Link, Error> {
        if let Some(old) = self.link_by_name(&spec.name).await? {
            if old.kind != "vxlan" {
                return Err(Error::NotOurs {
                    name: old.name,
                    kind: old.kind,
                    wanted: "vxlan",
                });
            }
            self.delete_link(&old).await?;
        }
        let mut builder = LinkVxlan::new(&spec.name, spec.vni)
            .port(spec.port)
            .learning(false)
            .mtu(spec.mtu);
        match spec.remote {
            Some(IpAddr::V4(v4)) => builder = builder.remote(v4),
            Some(IpAddr::V6(v6)) => builder = builder.remote6(v6),
            None => {}
        }
        if let Some(mac) = spec.mac {
            builder = builder.address(mac.to_vec());
        }
        let msg = builder.build();
        match self.handle.link().add(msg).execute().await {
            Ok(()) => {}
            Err(e) => {
                return Err(Error::request(
                    format!(
                        "add link {} type vxlan id {} dstport {} (another VXLAN device with this id and port, e.g. a gateway's on the same host, conflicts)",
                        spec.name, spec.vni, spec.port
                    ),
                    e,
                ));
            }
        }
        let link = self
            .link_by_name(&spec.name)
            .await?
            .ok_or_else(|| Error::Vanished(spec.name.clone()))?;
        let up = LinkUnspec::new_with_index(link.index).up().build();
        self.handle
            .link()
            .set(up)
            .execute()
            .await
            .map_err(|e| Error::request(format!("set link {} up", spec.name), e))?;
        Ok(link)
    }

    /// Adds the address `ip/prefix_len` to `link` (replacing it if present).
    pub async fn ensure_address(
        &self,
        link: &Link,
        ip: IpAddr,
        prefix_len: u8,
    ) -> Result<(), Error> {
        self.handle
            .address()
            .add(link.index, ip, prefix_len)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                Error::request(
                    format!("add address {ip}/{prefix_len} dev {}", link.name),
                    e,
                )
            })
    }

    /// A permanent neighbour entry on `link`: `ip` is at `mac` (replaces
    /// whatever entry `ip` had there).
    pub async fn ensure_neighbour(
        &self,
        link: &Link,
        ip: IpAddr,
        mac: [u8; 6],
    ) -> Result<(), Error> {
        self.handle
            .neighbours()
            .add(link.index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| Error::request(format!("add neighbour {ip} dev {}", link.name), e))
    }
}

fn address_of(msg: &AddressMessage) -> Option<IpNet> {
    let len = msg.header.prefix_len;
    // IFA_LOCAL is the interface's own address on point-to-point links;
    // elsewhere IFA_ADDRESS is.
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    local.or(address).and_then(|ip| IpNet::new(ip, len).ok())
}
