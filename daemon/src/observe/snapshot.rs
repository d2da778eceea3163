//! One [`Snapshot`] of the running site: everything `causeway status`, the
//! Prometheus metrics and `wg show` show, read in one pass.
//!
//! This is the only place that reads the data path's state for observation
//! (the [`LiveSite`] wraps its [`Ctx`]). Each peer is locked once; its
//! endpoint, path, RTT, handshake and keepalive are read under that lock,
//! and so are its counters, so that one peer's numbers belong together.
//! The renderers ([`super::status`], [`super::prometheus`],
//! [`super::uapi`]) work on the snapshot alone: they lock nothing and read
//! no clock, so that they are tested with hand-built snapshots.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use causeway_nat::rendezvous::{ClientStats, RendezvousHandle};
use ipnet::IpNet;
use x25519_dalek::PublicKey;
use zeroize::Zeroizing;

use crate::core::{DropReason, Drops, Peer};
use crate::datapath::Ctx;

/// Number of drop reasons.
pub(crate) const N_REASONS: usize = DropReason::ALL.len();

/// The running site, as the observers read it: the data path's context,
/// and what it does not hold (the site's name, the UDP port bound).
#[derive(Clone)]
pub(crate) struct LiveSite {
    ctx: Arc<Ctx>,
    name: Arc<str>,
    listen_port: u16,
}

impl LiveSite {
    pub(crate) fn new(ctx: Arc<Ctx>, name: &str, listen_port: u16) -> Self {
        LiveSite {
            ctx,
            name: name.into(),
            listen_port,
        }
    }

    /// Takes a snapshot; `now` dates the handshakes on the wall clock.
    pub(crate) fn snapshot(&self, now: SystemTime) -> Snapshot {
        Snapshot::take(&self.ctx, &self.name, self.listen_port, now)
    }

    /// Whether both packet threads still run (`/healthz`).
    pub(crate) fn alive(&self) -> bool {
        self.ctx.alive()
    }

    /// The site's private key, for the UAPI's `get=1` only (it is not part
    /// of the [`Snapshot`], which may be logged or serialized).
    pub(crate) fn private_key(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.ctx.site.private_key.to_bytes())
    }
}

/// Packets dropped, by reason (indexed like [`DropReason::ALL`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DropCounts(pub(crate) [u64; N_REASONS]);

impl DropCounts {
    fn read(drops: &Drops) -> Self {
        DropCounts(DropReason::ALL.map(|r| drops.get(r)))
    }

    /// Every reason and its count, zeros included, in [`DropReason::ALL`]
    /// order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().copied().zip(self.0.iter().copied())
    }
}

/// How packets reach a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathKind {
    /// Its configured endpoint.
    Static,
    /// An address found by NAT traversal, or learnt when the peer roamed.
    Direct,
    /// Through a rendezvous' relay.
    Relay,
    /// No way yet: no endpoint known and no relay.
    None,
}

impl PathKind {
    /// Every kind, in the order metrics export them.
    pub(crate) const ALL: [PathKind; 4] = [Self::Static, Self::Direct, Self::Relay, Self::None];

    /// The name status, metrics and docs use.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Direct => "direct",
            Self::Relay => "relay",
            Self::None => "none",
        }
    }
}

/// The last completed WireGuard handshake with a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Handshake {
    /// How long ago, when the snapshot was taken.
    pub(crate) age: Duration,
    /// When, on the wall clock (the snapshot's `now` minus `age`).
    pub(crate) at: SystemTime,
}

/// One real CIDR of a peer and where local pods reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ViewSnapshot {
    /// The peer's own network.
    pub(crate) real: IpNet,
    /// Where local pods reach it (the same unless remapped).
    pub(crate) view: IpNet,
}

/// One peer in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PeerSnapshot {
    pub(crate) name: String,
    pub(crate) public_key: PublicKey,
    pub(crate) path: PathKind,
    /// Where its WireGuard packets go now (`None` when relayed or unknown).
    pub(crate) endpoint: Option<SocketAddr>,
    /// The UDP relay port its packets go to, when relayed through one
    /// (`None` on the QUIC relay, or when not relayed).
    pub(crate) relay_port: Option<SocketAddr>,
    /// Its candidate addresses being probed (NAT traversal only).
    pub(crate) candidates: Vec<SocketAddr>,
    /// From path probes on the direct path, else from the last handshake
    /// this site initiated.
    pub(crate) rtt: Option<Duration>,
    pub(crate) last_handshake: Option<Handshake>,
    /// Seconds; `None`: off.
    pub(crate) persistent_keepalive: Option<u16>,
    /// Inner packets and bytes, as the data path counts them.
    pub(crate) tx_packets: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) rx_packets: u64,
    pub(crate) rx_bytes: u64,
    /// WireGuard messages through the relay.
    pub(crate) relay_tx_packets: u64,
    pub(crate) relay_rx_packets: u64,
    pub(crate) drops: DropCounts,
    /// Its real CIDRs (the `cidrs` of its config) and their views, in
    /// config order.
    pub(crate) views: Vec<ViewSnapshot>,
}

/// The site's client of one rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RendezvousSnapshot {
    /// The rendezvous' QUIC address.
    pub(crate) server: SocketAddr,
    /// Connected and registered now.
    pub(crate) connected: bool,
    /// This site's address as the rendezvous last saw it.
    pub(crate) observed: Option<SocketAddr>,
    /// While connected: `"quic"`, or `"tcp"` (TLS over TCP, UDP got no
    /// answer).
    pub(crate) transport: Option<&'static str>,
    pub(crate) stats: ClientStats,
}

/// The site itself in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SiteSnapshot {
    pub(crate) name: String,
    pub(crate) interface: String,
    pub(crate) public_key: PublicKey,
    pub(crate) listen_port: u16,
    /// Drops not attributable to a peer.
    pub(crate) drops: DropCounts,
    /// Whether both packet threads are running.
    pub(crate) packet_threads_alive: bool,
    /// This gateway replica's role.
    pub(crate) role: crate::core::Role,
    /// One per rendezvous client, in config order.
    pub(crate) rendezvous: Vec<RendezvousSnapshot>,
    /// The external address the gateway's router mapped to the WireGuard
    /// port (PCP / NAT-PMP).
    pub(crate) port_mapping: Option<std::net::SocketAddr>,
}

/// The site and its peers at one moment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot {
    pub(crate) site: SiteSnapshot,
    /// In config order.
    pub(crate) peers: Vec<PeerSnapshot>,
}

impl Snapshot {
    /// Reads `ctx`. `name` and `listen_port` are the site's; `now` dates
    /// the handshakes on the wall clock.
    fn take(ctx: &Ctx, name: &str, listen_port: u16, now: SystemTime) -> Self {
        let relay = ctx.site.has_traversal();
        let peers = ctx
            .site
            .peers()
            .iter()
            .map(|p| PeerSnapshot::take(p, relay, now))
            .collect();
        // After the peers, with no peer lock held.
        let handles: Vec<RendezvousHandle> = ctx
            .rendezvous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let rendezvous = handles.iter().map(RendezvousSnapshot::take).collect();
        Snapshot {
            site: SiteSnapshot {
                name: name.to_owned(),
                interface: ctx.tun.name().to_owned(),
                public_key: *ctx.site.public_key(),
                listen_port,
                drops: DropCounts::read(&ctx.site.drops),
                packet_threads_alive: ctx.alive(),
                role: ctx.site.role(),
                rendezvous,
                port_mapping: ctx.site.mapped_candidate(),
            },
            peers,
        }
    }
}

impl PeerSnapshot {
    /// Locks `peer` once and reads everything under that lock.
    fn take(peer: &Peer, relay: bool, now: SystemTime) -> Self {
        let state = peer.lock();
        let endpoint = state.endpoint;
        let relay_port = state
            .relay
            .as_ref()
            .filter(|r| endpoint.is_none() && r.usable())
            .map(|r| r.addr());
        let paths = state.paths.as_ref();
        let candidates = paths
            .map(|paths| paths.candidates().map(|c| c.addr).collect())
            .unwrap_or_default();
        let rtt = paths.and_then(|paths| paths.rtt()).or_else(|| {
            let (_, _, _, _, rtt_ms) = state.tunn.stats();
            rtt_ms.map(|ms| Duration::from_millis(u64::from(ms)))
        });
        let last_handshake = state.tunn.time_since_last_handshake().map(|age| Handshake {
            age,
            at: now.checked_sub(age).unwrap_or(UNIX_EPOCH),
        });
        let persistent_keepalive = state.tunn.persistent_keepalive();
        let c = &peer.counters;
        let snapshot = PeerSnapshot {
            name: peer.name().to_owned(),
            public_key: *peer.public_key(),
            path: match (endpoint, peer.has_static_endpoint()) {
                (Some(_), true) => PathKind::Static,
                (Some(_), false) => PathKind::Direct,
                (None, _) if relay => PathKind::Relay,
                (None, _) => PathKind::None,
            },
            endpoint,
            relay_port,
            candidates,
            rtt,
            last_handshake,
            persistent_keepalive,
            tx_packets: c.tx_packets.load(Relaxed),
            tx_bytes: c.tx_bytes.load(Relaxed),
            rx_packets: c.rx_packets.load(Relaxed),
            rx_bytes: c.rx_bytes.load(Relaxed),
            relay_tx_packets: c.relay_tx_packets.load(Relaxed),
            relay_rx_packets: c.relay_rx_packets.load(Relaxed),
            drops: DropCounts::read(&c.drops),
            views: peer
                .views()
                .iter()
                .map(|v| ViewSnapshot {
                    real: *v.real(),
                    view: *v.view(),
                })
                .collect(),
        };
        drop(state);
        snapshot
    }
}

impl RendezvousSnapshot {
    fn take(handle: &RendezvousHandle) -> Self {
        RendezvousSnapshot {
            server: handle.server(),
            connected: handle.is_connected(),
            observed: handle.observed(),
            transport: handle.transport(),
            stats: handle.stats(),
        }
    }
}

/// A hand-built snapshot for the renderers' tests: a site with drops and a
/// rendezvous, a static peer with traffic, a relayed peer with a remapped
/// view, and a peer with nothing yet (with a name that needs escaping).
#[cfg(test)]
pub(crate) fn example() -> Snapshot {
    let key = |b: u8| PublicKey::from([b; 32]);
    let net = |s: &str| s.parse::<IpNet>().expect("net");
    let mut site_drops = DropCounts::default();
    site_drops.0[DropReason::Malformed as usize] = 400;
    let mut b_drops = DropCounts::default();
    b_drops.0[DropReason::SpoofedSource as usize] = 5;
    b_drops.0[DropReason::PolicyPort as usize] = 2;
    let at = |secs: u64, nanos: u32| UNIX_EPOCH + Duration::new(secs, nanos);
    Snapshot {
        site: SiteSnapshot {
            name: "a".into(),
            interface: "causeway0".into(),
            public_key: key(0xaa),
            listen_port: 51820,
            drops: site_drops,
            packet_threads_alive: true,
            role: crate::core::Role::Active,
            port_mapping: Some("198.51.100.1:50000".parse().expect("addr")),
            rendezvous: vec![RendezvousSnapshot {
                server: "192.0.2.9:4433".parse().expect("addr"),
                connected: true,
                observed: Some("198.51.100.1:51820".parse().expect("addr")),
                transport: Some("quic"),
                stats: ClientStats {
                    relay_tx_packets: 11,
                    relay_tx_bytes: 1100,
                    relay_tx_datagrams: 13,
                    relay_rx_packets: 12,
                    relay_rx_bytes: 1200,
                    relay_incomplete: 1,
                    relay_malformed: 2,
                    events_dropped: 3,
                    connections: 4,
                },
            }],
        },
        peers: vec![
            PeerSnapshot {
                name: "b".into(),
                public_key: key(0xbb),
                path: PathKind::Static,
                endpoint: Some("192.0.2.2:51820".parse().expect("addr")),
                relay_port: None,
                candidates: vec![],
                rtt: Some(Duration::from_micros(1500)),
                last_handshake: Some(Handshake {
                    age: Duration::from_millis(3200),
                    at: at(1_700_000_000, 500_000_000),
                }),
                persistent_keepalive: Some(25),
                tx_packets: 10,
                tx_bytes: 1000,
                rx_packets: 20,
                rx_bytes: 2000,
                relay_tx_packets: 0,
                relay_rx_packets: 0,
                drops: b_drops,
                views: vec![
                    ViewSnapshot {
                        real: net("10.1.0.0/16"),
                        view: net("10.1.0.0/16"),
                    },
                    ViewSnapshot {
                        real: net("fd00:1::/64"),
                        view: net("fd00:1::/64"),
                    },
                ],
            },
            PeerSnapshot {
                name: "c".into(),
                public_key: key(0xcc),
                path: PathKind::Relay,
                endpoint: None,
                relay_port: None,
                candidates: vec!["203.0.113.7:40000".parse().expect("addr")],
                rtt: Some(Duration::from_millis(40)),
                last_handshake: Some(Handshake {
                    age: Duration::from_secs(60),
                    at: at(1_699_999_943, 700_000_000),
                }),
                persistent_keepalive: None,
                tx_packets: 3,
                tx_bytes: 300,
                rx_packets: 4,
                rx_bytes: 400,
                relay_tx_packets: 7,
                relay_rx_packets: 8,
                drops: DropCounts::default(),
                views: vec![ViewSnapshot {
                    real: net("10.0.0.0/16"),
                    view: net("100.64.0.0/16"),
                }],
            },
            PeerSnapshot {
                name: "d-\"quoted\"".into(),
                public_key: key(0x01),
                path: PathKind::None,
                endpoint: None,
                relay_port: None,
                candidates: vec![],
                rtt: None,
                last_handshake: None,
                persistent_keepalive: None,
                tx_packets: 0,
                tx_bytes: 0,
                rx_packets: 0,
                rx_bytes: 0,
                relay_tx_packets: 0,
                relay_rx_packets: 0,
                drops: DropCounts::default(),
                views: vec![],
            },
        ],
    }
}
