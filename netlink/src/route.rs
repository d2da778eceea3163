//! Routes through our interface, marked with our route protocol.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::RouteMessageBuilder;

use crate::error::errno;
use crate::{Error, Link, Netlink};

/// The route protocol number that marks routes Causeway installed
/// (`ip route show proto 201`). Only routes with this mark are ever removed.
pub const ROUTE_PROTOCOL: u8 = 201;

/// The metric of the backstop routes: the worst there is, so that the route
/// through the interface (metric 0 for IPv4, 1024 for IPv6), or any route
/// somebody else installs for the CIDR, wins whenever it is usable.
pub const BACKSTOP_METRIC: u32 = u32::MAX;

/// What [`Netlink::reconcile_routes`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteChanges {
    /// Routes that were missing and were added.
    pub added: Vec<IpNet>,
    /// Routes of ours that were not wanted any more and were removed.
    pub removed: Vec<IpNet>,
}

fn message(link: &Link, dst: IpNet) -> RouteMessage {
    let mut msg = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .map(|b| {
            b.output_interface(link.index)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        })
        .unwrap_or_default()
        .build();
    // `destination_prefix` only fails for a prefix length the type rules out.
    msg.header.destination_prefix_length = dst.prefix_len();
    msg
}

/// A `blackhole` route to `dst` in the main table, marked with our protocol,
/// at [`BACKSTOP_METRIC`]. It has no interface, so it does not depend on the
/// TUN existing or having carrier.
fn backstop_message(dst: IpNet) -> RouteMessage {
    let mut msg = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .map(|b| {
            b.protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                .kind(RouteType::BlackHole)
                .priority(BACKSTOP_METRIC)
        })
        .unwrap_or_default()
        .build();
    msg.header.destination_prefix_length = dst.prefix_len();
    msg
}

pub(crate) fn in_main_table(msg: &RouteMessage) -> bool {
    let table = msg
        .attributes
        .iter()
        .find_map(|attr| match attr {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table));
    table == u32::from(RouteHeader::RT_TABLE_MAIN)
}

pub(crate) fn destination(msg: &RouteMessage) -> Option<IpNet> {
    let len = msg.header.destination_prefix_length;
    msg.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => IpNet::new((*a).into(), len).ok(),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => IpNet::new((*a).into(), len).ok(),
        _ => None,
    })
}

impl Netlink {
    /// The destinations of the routes (IPv4 and IPv6, every table) that
    /// carry the protocol mark `protocol` and pass `keep`.
    pub(crate) async fn our_routes(
        &self,
        protocol: u8,
        what: &str,
        keep: impl Fn(&RouteMessage) -> bool,
    ) -> Result<Vec<IpNet>, Error> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessageBuilder::<IpAddr>::new().build();
            query.header.address_family = family;
            let mut routes = self.handle.route().get(query).execute();
            while let Some(msg) = routes
                .try_next()
                .await
                .map_err(|e| Error::request(format!("list {what}"), e))?
            {
                let ours = msg.header.protocol == RouteProtocol::Other(protocol) && keep(&msg);
                if let Some(dst) = destination(&msg).filter(|_| ours) {
                    out.push(dst);
                }
            }
        }
        Ok(out)
    }

    /// The routes of ours (main table, our protocol) that go out of `link`.
    pub async fn owned_routes(&self, link: &Link) -> Result<Vec<IpNet>, Error> {
        let what = format!("routes of {}", link.name);
        self.our_routes(ROUTE_PROTOCOL, &what, |msg| {
            msg.attributes.contains(&RouteAttribute::Oif(link.index))
        })
        .await
    }

    /// Our backstop routes: `blackhole` routes with our mark in the main
    /// table (see [`Netlink::reconcile_backstops`]).
    pub async fn backstop_routes(&self) -> Result<Vec<IpNet>, Error> {
        self.our_routes(ROUTE_PROTOCOL, "backstop routes", |msg| {
            msg.header.kind == RouteType::BlackHole && in_main_table(msg)
        })
        .await
    }

    /// Installs (or replaces) the backstop route to `dst`.
    pub async fn ensure_backstop(&self, dst: IpNet) -> Result<(), Error> {
        self.handle
            .route()
            .add(backstop_message(dst))
            .replace()
            .execute()
            .await
            .map_err(|e| {
                Error::request(
                    format!("add route blackhole {dst} metric {BACKSTOP_METRIC}"),
                    e,
                )
            })
    }

    /// Removes our backstop route to `dst`; a missing route is success.
    pub async fn remove_backstop(&self, dst: IpNet) -> Result<(), Error> {
        let mut msg = backstop_message(dst);
        msg.header.scope = RouteScope::NoWhere;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
            Err(e) => Err(Error::request(format!("delete route blackhole {dst}"), e)),
        }
    }

    /// Makes our backstop routes exactly `wanted`.
    ///
    /// A backstop is a `blackhole` route to a peer CIDR, with our mark, in
    /// the main table, at [`BACKSTOP_METRIC`]. While the route through the
    /// interface exists and is usable it wins; when the interface is gone
    /// (clean stop, restart) or its routes are ignored for lack of carrier
    /// (`ignore_routes_with_linkdown` after a crash), the backstop drops
    /// the packet instead of letting it follow the default route in clear.
    /// Backstops outlive the daemon on purpose: only this call (with fewer
    /// CIDRs) or `causeway down --purge` removes them.
    pub async fn reconcile_backstops(&self, wanted: &[IpNet]) -> Result<RouteChanges, Error> {
        let present = self.backstop_routes().await?;
        let mut changes = RouteChanges::default();
        for &dst in wanted {
            if !present.contains(&dst) {
                changes.added.push(dst);
            }
            self.ensure_backstop(dst).await?;
        }
        for dst in present {
            if !wanted.contains(&dst) {
                self.remove_backstop(dst).await?;
                changes.removed.push(dst);
            }
        }
        Ok(changes)
    }

    /// Installs (or replaces) the route to `dst` through `link`.
    pub async fn ensure_route(&self, link: &Link, dst: IpNet) -> Result<(), Error> {
        self.handle
            .route()
            .add(message(link, dst))
            .replace()
            .execute()
            .await
            .map_err(|e| Error::request(format!("add route {dst} dev {}", link.name), e))
    }

    /// Removes our route to `dst` through `link`; a missing route is success.
    pub async fn remove_route(&self, link: &Link, dst: IpNet) -> Result<(), Error> {
        let mut msg = message(link, dst);
        // Like `ip route del`: match whatever scope the route has (the
        // kernel compares scopes exactly unless told "nowhere").
        msg.header.scope = RouteScope::NoWhere;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT | libc::ENODEV)) => {
                Ok(())
            }
            Err(e) => Err(Error::request(
                format!("delete route {dst} dev {}", link.name),
                e,
            )),
        }
    }

    /// Makes the routes of ours through `link` exactly `wanted`: adds what is
    /// missing, removes what a previous run (or an older config) left behind.
    pub async fn reconcile_routes(
        &self,
        link: &Link,
        wanted: &[IpNet],
    ) -> Result<RouteChanges, Error> {
        let present = self.owned_routes(link).await?;
        let mut changes = RouteChanges::default();
        for &dst in wanted {
            if !present.contains(&dst) {
                changes.added.push(dst);
            }
            // Replace even when present: cheap, and repairs a route whose
            // attributes somebody changed.
            self.ensure_route(link, dst).await?;
        }
        for dst in present {
            if !wanted.contains(&dst) {
                self.remove_route(link, dst).await?;
                changes.removed.push(dst);
            }
        }
        Ok(changes)
    }
}
