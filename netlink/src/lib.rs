//! Kernel networking for Causeway: the TUN device and idempotent link and
//! route management over rtnetlink.
//!
//! Every call is idempotent: "already exists" on add and "does not exist" on
//! delete are success, so a daemon that crashed half-way can simply run its
//! setup again. Routes this crate installs carry the route protocol
//! [`ROUTE_PROTOCOL`] (`ip route` shows `proto 201`), which is how
//! [`Netlink::reconcile_routes`] tells the routes it owns from anybody
//! else's: it never touches a route without that mark. Besides the routes
//! through the interface it keeps *backstops*: `blackhole` routes to the
//! same CIDRs at the worst metric, which outlive the daemon so that peer
//! traffic is dropped, never sent in clear, while the interface is gone or
//! without carrier ([`Netlink::reconcile_backstops`]).
//!
//! For the node agent (`causeway node`) it keeps routes with their own mark
//! [`NODE_ROUTE_PROTOCOL`] (202) towards the site's active gateway, and the
//! VXLAN devices and neighbour entries that reach a gateway off the node's
//! L2 segment; it lists addresses (read only).
//!
//! What it does not do: add addresses, rules, or anything outside the
//! current network namespace.

mod error;
mod link;
mod node;
mod route;
mod tun;

pub use error::Error;
pub use link::Link;
pub use node::{
    GATEWAY_VXLAN_MAC, NODE_ROUTE_METRIC, NODE_ROUTE_PROTOCOL, NextHop, VXLAN_NEXT_HOP_V4,
    VXLAN_NEXT_HOP_V6, VxlanSpec,
};
pub use route::{BACKSTOP_METRIC, ROUTE_PROTOCOL, RouteChanges};
pub use tun::{GroTable, MAX_SEGMENTS, RECV_SCRATCH, TUN_HEADROOM, Tun};

/// A connection to the kernel's routing netlink socket.
///
/// Its background task runs on the tokio runtime that was current when it
/// was made, and ends when the `Netlink` is dropped.
pub struct Netlink {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Netlink {
    /// Opens the netlink socket. Must be called inside a tokio runtime.
    pub fn connect() -> Result<Self, Error> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
        let task = tokio::spawn(connection);
        Ok(Self { handle, task })
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
