//! The local control socket: `causeway status` reads the daemon's state
//! from it. Root and the daemon's user only (see [`super::unix`]).
//!
//! The protocol is deliberately tiny: connect, read one JSON document
//! ([`Status`]), done. The JSON field names are stable for scripts.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tracing::info;

use crate::datapath::Ctx;
use crate::keys;
use crate::peer::DropReason;

use super::unix::{Limits, UnixServer};

/// A snapshot of the daemon, as `causeway status --json` prints it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// The site name.
    pub site: String,
    /// The TUN interface.
    pub interface: String,
    /// The site's WireGuard public key.
    pub public_key: String,
    /// The UDP port WireGuard listens on.
    pub listen_port: u16,
    /// Drops not attributable to one peer, by reason.
    pub drops: std::collections::BTreeMap<String, u64>,
    /// One entry per configured peer.
    pub peers: Vec<PeerStatus>,
}

/// One peer in [`Status`].
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's name.
    pub name: String,
    /// Its WireGuard public key.
    pub public_key: String,
    /// How packets reach it: `static` (configured endpoint), `direct` (a
    /// path found by probing, or roaming), `relay` (through a rendezvous),
    /// or `none` (no endpoint, no relay).
    pub path: String,
    /// Where its packets go now (`null` until known, or when relayed).
    pub endpoint: Option<String>,
    /// Its candidate addresses being probed (NAT traversal only).
    pub candidates: Vec<String>,
    /// Round-trip time to the peer in milliseconds: from path probes when
    /// the peer is found through a rendezvous, else measured by the last
    /// WireGuard handshake (`null` before one).
    pub rtt_ms: Option<f64>,
    /// WireGuard messages sent through the relay.
    pub relay_tx_packets: u64,
    /// WireGuard messages received through the relay.
    pub relay_rx_packets: u64,
    /// The networks it owns (its real CIDRs).
    pub cidrs: Vec<String>,
    /// How this site sees each of them: local pods reach the peer's
    /// `real` network at `view` (the same when no remapping was needed).
    pub views: Vec<ViewStatus>,
    /// Seconds since the last completed handshake (`null`: never).
    pub last_handshake_secs: Option<f64>,
    /// Inner packets sent to the peer.
    pub tx_packets: u64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: u64,
    /// Inner packets received from the peer.
    pub rx_packets: u64,
    /// Inner bytes received from the peer.
    pub rx_bytes: u64,
    /// Dropped packets by reason.
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// One real CIDR of a peer and the view this site gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewStatus {
    /// The peer's own network.
    pub real: String,
    /// Where local pods reach it.
    pub view: String,
}

impl Status {
    pub(crate) fn collect(ctx: &Ctx, site: &str, listen_port: u16) -> Self {
        let drops = |d: &crate::peer::Drops| {
            DropReason::ALL
                .iter()
                .map(|r| (r.name().to_owned(), d.get(*r)))
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        Status {
            site: site.to_owned(),
            interface: ctx.tun.name().to_owned(),
            public_key: keys::encode_public(&ctx.public_key),
            listen_port,
            drops: drops(&ctx.drops),
            peers: ctx
                .peers()
                .iter()
                .map(|p| {
                    let (endpoint, handshake, candidates, rtt) = {
                        let state = p.lock();
                        let candidates: Vec<String> = state
                            .paths
                            .as_ref()
                            .map(|paths| paths.candidates().map(|c| c.addr.to_string()).collect())
                            .unwrap_or_default();
                        // From path probes when there are some, else from
                        // the last WireGuard handshake.
                        let rtt =
                            state
                                .paths
                                .as_ref()
                                .and_then(|paths| paths.rtt())
                                .or_else(|| {
                                    state
                                        .tunn
                                        .stats()
                                        .4
                                        .map(|ms| std::time::Duration::from_millis(u64::from(ms)))
                                });
                        (
                            state.endpoint,
                            state.tunn.time_since_last_handshake(),
                            candidates,
                            rtt,
                        )
                    };
                    let path = match (endpoint, p.has_static_endpoint()) {
                        (Some(_), true) => "static",
                        (Some(_), false) => "direct",
                        (None, _) if ctx.has_relay() => "relay",
                        (None, _) => "none",
                    };
                    PeerStatus {
                        name: p.name().to_owned(),
                        public_key: keys::encode_public(p.public_key()),
                        path: path.to_owned(),
                        endpoint: endpoint.map(|e| e.to_string()),
                        candidates,
                        rtt_ms: rtt.map(|d| d.as_secs_f64() * 1e3),
                        relay_tx_packets: p.counters.relay_tx_packets.load(Relaxed),
                        relay_rx_packets: p.counters.relay_rx_packets.load(Relaxed),
                        cidrs: p.config.cidrs.iter().map(|c| c.to_string()).collect(),
                        views: p
                            .views()
                            .iter()
                            .map(|m| ViewStatus {
                                real: m.real().to_string(),
                                view: m.view().to_string(),
                            })
                            .collect(),
                        last_handshake_secs: handshake.map(|d| d.as_secs_f64()),
                        tx_packets: p.counters.tx_packets.load(Relaxed),
                        tx_bytes: p.counters.tx_bytes.load(Relaxed),
                        rx_packets: p.counters.rx_packets.load(Relaxed),
                        rx_bytes: p.counters.rx_bytes.load(Relaxed),
                        drops: drops(&p.counters.drops),
                    }
                })
                .collect(),
        }
    }

    /// Human-readable rendering for `causeway status`.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "site {} on {}, port {}, key {}",
            self.site, self.interface, self.listen_port, self.public_key
        );
        if !self.drops.is_empty() {
            let _ = writeln!(s, "  drops: {}", fmt_drops(&self.drops));
        }
        for p in &self.peers {
            let _ = writeln!(s, "peer {} ({})", p.name, p.public_key);
            let _ = writeln!(
                s,
                "  path:      {} {}",
                p.path,
                p.endpoint.as_deref().unwrap_or("")
            );
            if let Some(rtt) = p.rtt_ms {
                let _ = writeln!(s, "  rtt:       {rtt:.2} ms");
            }
            if !p.candidates.is_empty() {
                let _ = writeln!(s, "  candidates: {}", p.candidates.join(", "));
            }
            if p.relay_tx_packets + p.relay_rx_packets > 0 {
                let _ = writeln!(
                    s,
                    "  relayed:   {} sent, {} received",
                    p.relay_tx_packets, p.relay_rx_packets
                );
            }
            let views: Vec<String> = p
                .views
                .iter()
                .map(|v| {
                    if v.real == v.view {
                        v.real.clone()
                    } else {
                        format!("{} (seen here as {})", v.real, v.view)
                    }
                })
                .collect();
            let _ = writeln!(s, "  cidrs:     {}", views.join(", "));
            let hs = p
                .last_handshake_secs
                .map_or("never".to_owned(), |t| format!("{t:.1} s ago"));
            let _ = writeln!(s, "  handshake: {hs}");
            let _ = writeln!(
                s,
                "  sent:      {} packets, {} bytes",
                p.tx_packets, p.tx_bytes
            );
            let _ = writeln!(
                s,
                "  received:  {} packets, {} bytes",
                p.rx_packets, p.rx_bytes
            );
            if !p.drops.is_empty() {
                let _ = writeln!(s, "  drops:     {}", fmt_drops(&p.drops));
            }
        }
        s
    }
}

fn fmt_drops(drops: &std::collections::BTreeMap<String, u64>) -> String {
    drops
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the control socket takes on.
const LIMITS: Limits = Limits {
    max_connections: 8,
    connection_timeout: Duration::from_secs(10),
};

/// Serves `status()` on the control socket at `path`: each connection
/// gets one JSON document, then is closed.
pub(crate) async fn serve(
    path: &Path,
    status: impl Fn() -> Status + Send + Sync + 'static,
) -> io::Result<UnixServer> {
    let status = Arc::new(status);
    let server = UnixServer::serve(path, "control", LIMITS, move |mut conn: UnixStream| {
        let status = Arc::clone(&status);
        async move {
            if let Ok(json) = serde_json::to_vec_pretty(&status()) {
                let _ = conn.write_all(&json).await;
            }
        }
    })
    .await?;
    info!(path = %path.display(), "serving `causeway status`");
    Ok(server)
}

/// Asks the daemon behind `path` for its status.
pub async fn query(path: &Path) -> anyhow::Result<Status> {
    use anyhow::Context as _;
    let mut conn = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach the daemon at {} (is `causeway up` running, and are you root?)",
            path.display()
        )
    })?;
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf).await.context("reading status")?;
    serde_json::from_slice(&buf).context("daemon sent a status this version does not understand")
}
