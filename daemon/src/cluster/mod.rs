//! The cluster endpoint: how a site's gateway tells the node agents
//! (`causeway node`, one per node) which views to route to it and whether
//! it is the active gateway.
//!
//! - [`wire`]: the wire format, without I/O (frames, the [`Announcement`],
//!   session keys from the shared cluster secret).
//! - [`Announcer`] and [`serve`]: the gateway's end, a TCP long poll. A node
//!   sends the version it has; the gateway answers at once when its own
//!   differs, else when it changes or after [`LONG_POLL`]. Changes reach
//!   every node within a round trip, and an idle node costs one sealed
//!   frame each way per [`LONG_POLL`].
//! - [`watch`]: the node's end, one task per gateway address.
//! - [`Gateway`]: what `causeway up` runs when `[cluster]` is set: the
//!   server and a receive-only VXLAN device for nodes off the gateway's L2
//!   segment.

use std::sync::Arc;

use causeway_netlink::{GATEWAY_VXLAN_MAC, Link, Netlink, VXLAN_NEXT_HOP_V4, VxlanSpec};
use ipnet::IpNet;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::config::ClusterConfig;

mod client;
mod server;
pub mod wire;

pub use client::{Heard, WatchError, watch};
pub use server::{Announcer, LONG_POLL, MAX_CONNECTIONS, ServerStats, serve};
pub use wire::{Announcement, ClusterSecret, WireError};

/// The MTU of the VXLAN devices: 1500 minus the 50 bytes of VXLAN over
/// IPv4, so that an encapsulated full-size packet fits a 1500-byte node
/// network.
pub const VXLAN_MTU: u32 = 1450;

/// Why the cluster endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The secret file cannot be read.
    #[error("[cluster] secret_file {path}: {source}")]
    Secret {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The secret is too short.
    #[error("[cluster] secret_file {0}: fewer than 16 bytes; put a long random secret there")]
    SecretTooShort(String),
    /// The listen address cannot be bound.
    #[error("[cluster] listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VXLAN device could not be made.
    #[error("[cluster] VXLAN device: {0}")]
    Vxlan(#[from] causeway_netlink::Error),
}

/// Reads the cluster secret from `path`.
pub fn read_secret(path: &std::path::Path) -> Result<ClusterSecret, GatewayError> {
    let bytes = std::fs::read(path).map_err(|source| GatewayError::Secret {
        path: path.display().to_string(),
        source,
    })?;
    ClusterSecret::from_file_content(&bytes)
        .ok_or_else(|| GatewayError::SecretTooShort(path.display().to_string()))
}

/// The gateway's cluster endpoint, running.
pub struct Gateway {
    announcer: Announcer,
    stats: Arc<ServerStats>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    vxlan: Link,
}

impl Gateway {
    /// Reads the secret, binds the listener, creates (or re-creates, after a
    /// crash) the receive-only VXLAN device, and starts serving. The
    /// announcement starts inactive with no views: the daemon sets both.
    pub async fn start(
        site: &str,
        pod_cidrs: &[IpNet],
        cluster: &ClusterConfig,
        netlink: &Netlink,
    ) -> Result<Self, GatewayError> {
        let secret = read_secret(&cluster.secret_file)?;
        let listener = tokio::net::TcpListener::bind(cluster.listen)
            .await
            .map_err(|source| GatewayError::Bind {
                addr: cluster.listen,
                source,
            })?;
        let vxlan = netlink
            .ensure_vxlan(&VxlanSpec {
                name: cluster.vxlan_interface.clone(),
                vni: cluster.vxlan_vni,
                port: cluster.vxlan_port,
                remote: None,
                mac: Some(GATEWAY_VXLAN_MAC),
                mtu: VXLAN_MTU,
            })
            .await?;
        // Packets from pods of routed nodes arrive on the VXLAN device, but
        // the route back to their source goes through the CNI: strict
        // reverse-path filtering would drop them, and so would loose
        // filtering on a device without an IPv4 address. The address is the
        // nodes' next hop (their neighbour entry maps it to this device's
        // MAC); the kernel gives the device the IPv6 one (EUI-64 of the MAC).
        netlink
            .ensure_address(&vxlan, VXLAN_NEXT_HOP_V4.into(), 32)
            .await?;
        loose_rp_filter(&vxlan.name);
        let announcer = Announcer::new(Announcement {
            site: site.to_owned(),
            active: false,
            term: 0,
            pod_cidrs: pod_cidrs.to_vec(),
            views: Vec::new(),
            route_via: cluster.route_via,
            vxlan_vni: cluster.vxlan_vni,
            vxlan_port: cluster.vxlan_port,
        });
        let stats = Arc::new(ServerStats::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            secret,
            announcer.clone(),
            Arc::clone(&stats),
            async move {
                let _ = stopped.await;
            },
        ));
        info!(listen = %cluster.listen, vxlan = vxlan.name, vni = cluster.vxlan_vni, port = cluster.vxlan_port, "cluster endpoint for node agents is up");
        Ok(Self {
            announcer,
            stats,
            stop: Some(stop),
            task,
            vxlan,
        })
    }

    /// The announcement's handle: `set_views`, `set_active`.
    pub fn announcer(&self) -> &Announcer {
        &self.announcer
    }

    /// The server's counters.
    pub fn stats(&self) -> &Arc<ServerStats> {
        &self.stats
    }

    /// Stops serving and removes the VXLAN device.
    pub async fn stop(mut self, netlink: &Netlink) -> Result<(), causeway_netlink::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        netlink.delete_link(&self.vxlan).await
    }
}

/// Sets `net.ipv4.conf.<name>.rp_filter` to 2 (loose); warns when it cannot
/// (e.g. under systemd's `ProtectKernelTunables=yes`: then the operator sets
/// `net.ipv4.conf.all.rp_filter` to 0 or 2, see docs/deploy.md).
pub fn loose_rp_filter(name: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{name}/rp_filter");
    if let Err(e) = std::fs::write(&path, "2") {
        warn!(
            "cannot set {path} to 2 (loose reverse-path filter): {e}; traffic from routed nodes may be dropped unless net.ipv4.conf.all.rp_filter and .default.rp_filter are 0 or 2"
        );
    }
}

/// Reads one frame of the node protocol (a 4-byte length, at most
/// [`wire::MAX_FRAME`], then the payload), for the gateway and the node.
async fn read_frame<R, E>(stream: &mut R) -> Result<Vec<u8>, E>
where
    R: tokio::io::AsyncRead + Unpin,
    E: From<std::io::Error> + From<wire::WireError>,
{
    use tokio::io::AsyncReadExt as _;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = wire::frame_len(header)?;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::mpsc;

    fn announcement() -> Announcement {
        Announcement {
            site: "pharma".into(),
            active: false,
            term: 0,
            pod_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
            views: vec![],
            route_via: None,
            vxlan_vni: 1,
            vxlan_port: 4792,
        }
    }

    async fn next(rx: &mut mpsc::Receiver<Heard>) -> Heard {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("heard within 5 s")
            .expect("channel open")
    }

    /// A node learns the announcement at once, and every change within the
    /// same long poll; a node with another secret learns nothing and the
    /// gateway counts its frame.
    #[tokio::test]
    async fn node_follows_changes_and_strangers_learn_nothing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let secret = ClusterSecret::from_file_content(b"0123456789abcdef-secret").expect("secret");
        let announcer = Announcer::new(announcement());
        let stats = Arc::new(ServerStats::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            secret.clone(),
            announcer.clone(),
            Arc::clone(&stats),
            async move {
                let _ = stopped.await;
            },
        ));

        let (tx, mut rx) = mpsc::channel(8);
        let node = tokio::spawn(watch(addr, secret, tx));
        let Heard::Announcement(from, first) = next(&mut rx).await else {
            panic!("lost")
        };
        assert_eq!(from, addr);
        assert_eq!(first, announcement());
        let view: IpNet = "100.64.0.0/16".parse().expect("cidr");
        announcer.set_views(vec![view]);
        announcer.set_active(true, 1);
        // Both changes may come as one announcement or two.
        let mut last = first;
        while last.views.is_empty() || !last.active {
            let Heard::Announcement(_, a) = next(&mut rx).await else {
                panic!("lost")
            };
            last = a;
        }
        assert_eq!(last.views, vec![view]);
        assert_eq!(last.term, 1);
        // Setting the same again sends nothing new.
        announcer.set_views(vec![view]);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err()
        );

        let stranger =
            ClusterSecret::from_file_content(b"another secret entirely").expect("secret");
        let (tx2, mut rx2) = mpsc::channel(8);
        let intruder = tokio::spawn(watch(addr, stranger, tx2));
        let Heard::Lost(_, why) = next(&mut rx2).await else {
            panic!("a stranger was answered")
        };
        assert!(!why.is_empty());
        // The gateway saw the stranger's watch fail to authenticate.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(stats.bad_frames.load(std::sync::atomic::Ordering::Relaxed) >= 1);

        intruder.abort();
        node.abort();
        let _ = stop.send(());
        server.await.expect("server task");
    }
}
