//! Peers as the data path sees them: the WireGuard state, where to send,
//! which inner addresses they may use, and their counters.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use boringtun::noise::Tunn;
use boringtun::noise::rate_limiter::RateLimiter;
use ipnet::IpNet;
use x25519_dalek::{PublicKey, StaticSecret};

use causeway_nat::path::{PathConfig, PeerPaths};
use causeway_nat::probe::ProbeKey;
use rand::RngCore;

use super::Source;
use super::lpm::Lpm;
use crate::config::PeerConfig;
use crate::packet::{AllowRule, DenyReason, View};

/// Why a packet was dropped. The names are the ones `causeway status` and
/// the logs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A decrypted packet's inner source is outside the peer's `cidrs`.
    SpoofedSource,
    /// A packet for a peer whose endpoint is not known yet.
    NoEndpoint,
    /// WireGuard rejected the packet (bad MAC, replay, wrong index, expired
    /// session, …).
    Rejected,
    /// A packet from the TUN whose destination no peer owns.
    NoRoute,
    /// A datagram that is not WireGuard (bad type or length).
    Malformed,
    /// A handshake from a key that is not a configured peer, or a packet
    /// naming a session index we never gave out.
    UnknownPeer,
    /// The kernel refused to take the packet (TUN or socket full).
    IoError,
    /// A packet from the TUN larger than the tunnel MTU; the sender got an
    /// ICMP "fragmentation needed" / "packet too big" back when allowed.
    TooBig,
    /// A packet from a peer to an address this site does not export.
    NotExported,
    /// Allow-list: no rule covers the destination.
    PolicyNoRule,
    /// Allow-list: a rule covers the destination, not the protocol.
    PolicyProtocol,
    /// Allow-list: a rule covers destination and protocol, not the port.
    PolicyPort,
    /// A candidate address from a rendezvous that no peer can have
    /// (loopback, link-local, multicast, broadcast, unspecified, port 0),
    /// one of this site's own, or inside the overlay: not probed.
    BadCandidate,
    /// A packet this replica got while it is a standby gateway: only the
    /// active one sends or answers anything.
    Standby,
    /// An answer from the gateway's PCP / NAT-PMP server that is malformed
    /// or answers no request of ours (wrong nonce, port or protocol).
    PortMapping,
}

impl DropReason {
    /// Every reason, in the order status prints them.
    pub const ALL: [DropReason; 15] = [
        Self::SpoofedSource,
        Self::NoEndpoint,
        Self::Rejected,
        Self::NoRoute,
        Self::Malformed,
        Self::UnknownPeer,
        Self::IoError,
        Self::TooBig,
        Self::NotExported,
        Self::PolicyNoRule,
        Self::PolicyProtocol,
        Self::PolicyPort,
        Self::BadCandidate,
        Self::Standby,
        Self::PortMapping,
    ];

    /// The snake_case name used in status output and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::SpoofedSource => "spoofed_source",
            Self::NoEndpoint => "no_endpoint",
            Self::Rejected => "rejected",
            Self::NoRoute => "no_route",
            Self::Malformed => "malformed",
            Self::UnknownPeer => "unknown_peer",
            Self::IoError => "io_error",
            Self::TooBig => "too_big",
            Self::NotExported => "not_exported",
            Self::PolicyNoRule => "policy_no_rule",
            Self::PolicyProtocol => "policy_protocol",
            Self::PolicyPort => "policy_port",
            Self::BadCandidate => "bad_candidate",
            Self::Standby => "standby",
            Self::PortMapping => "port_mapping",
        }
    }

    /// The drop reason for an allow-list denial.
    pub fn from_deny(reason: DenyReason) -> Self {
        match reason {
            DenyReason::NoRuleMatched => Self::PolicyNoRule,
            DenyReason::ProtocolNotAllowed => Self::PolicyProtocol,
            DenyReason::PortNotAllowed => Self::PolicyPort,
        }
    }
}

/// Drop counters, one per [`DropReason`].
#[derive(Debug, Default)]
pub struct Drops([AtomicU64; DropReason::ALL.len()]);

impl Drops {
    /// Counts one drop and returns the new total for that reason.
    pub fn count(&self, reason: DropReason) -> u64 {
        self.0[reason as usize].fetch_add(1, Relaxed) + 1
    }

    /// The current total for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize].load(Relaxed)
    }
}

/// Traffic counters of one peer (inner packets, after decryption / before
/// encryption).
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets sent to the peer.
    pub tx_packets: AtomicU64,
    /// Bytes of inner packets sent to the peer.
    pub tx_bytes: AtomicU64,
    /// Packets received from the peer and delivered to the TUN.
    pub rx_packets: AtomicU64,
    /// Bytes of inner packets received from the peer.
    pub rx_bytes: AtomicU64,
    /// WireGuard messages sent to the peer through the relay.
    pub relay_tx_packets: AtomicU64,
    /// WireGuard messages received from the peer through the relay.
    pub relay_rx_packets: AtomicU64,
    /// Packets to or from this peer that were dropped.
    pub drops: Drops,
}

/// The mutable part of a peer, behind one lock.
pub struct PeerState {
    /// boringtun's WireGuard state machine.
    pub tunn: Tunn,
    /// Where the peer's packets go: the configured endpoint at start, then
    /// the source of its latest authenticated packet (roaming), or the
    /// direct path that probing found. `None`: through the relay, if any.
    pub endpoint: Option<SocketAddr>,
    /// Candidate probing and path selection, for a peer without a static
    /// endpoint when the site uses a rendezvous.
    pub paths: Option<PeerPaths>,
    /// The counters of the peer's pings seen lately: replays are dropped.
    pub(super) ping_replay: causeway_nat::probe::ReplayWindow,
    /// Pongs this site may still send to a peer without a path machine
    /// (static endpoint): a token bucket, so that replayed or spoofed-source
    /// pings cannot make it a reflector.
    pub(super) pong_budget: super::traversal::AnswerBudget,
    /// The UDP relay port a rendezvous granted for the peer, if any.
    pub relay: Option<super::relay_port::UdpRelay>,
}

impl PeerState {
    /// A peer's state before any packet: no session, the static endpoint
    /// if any, a fresh path machine otherwise (when the site traverses NATs).
    fn new(config: &PeerConfig, id: u32, cx: &PeerContext<'_>, rng: &mut impl RngCore) -> Self {
        let tunn = Tunn::new(
            cx.private_key.clone(),
            config.public_key,
            None,
            config.persistent_keepalive,
            id,
            Some(Arc::clone(cx.rate_limiter)),
        );
        PeerState {
            tunn,
            endpoint: config.endpoint.as_ref().map(|e| e.addr),
            paths: cx
                .paths
                .filter(|_| config.endpoint.is_none())
                .map(|config| PeerPaths::new(config, rng.next_u64())),
            ping_replay: Default::default(),
            pong_budget: Default::default(),
            relay: None,
        }
    }

    /// Roaming: the peer's endpoint follows the source of its latest
    /// authenticated packet. Packets that came through a relay (the QUIC
    /// one, or the peer's UDP relay port) say nothing about a direct path
    /// and leave it as it is.
    pub fn roam(&mut self, source: Source, now: Instant) {
        if let Source::Udp(from) = source
            && !self.is_relay_port(from)
        {
            self.endpoint = Some(from);
            if let Some(paths) = self.paths.as_mut() {
                // Authenticated traffic proves the address as well as a pong.
                paths.notify_traffic_received(now, from);
            }
        }
    }
}

/// One configured peer.
pub struct Peer {
    /// Stable id for the life of this peer object: its WireGuard session
    /// index (receiver indices carry it in their top 24 bits), and how
    /// messages between threads name it across config reloads.
    pub id: u32,
    /// The configuration it was made from (name, key, real CIDRs and their
    /// views, endpoint); a reload keeps the peer (and its sessions and
    /// counters) while this stays the same.
    pub config: PeerConfig,
    /// What it may reach here (never empty: the default is every local pod
    /// CIDR, any protocol).
    pub allow: Vec<AllowRule>,
    /// Its counters.
    pub counters: Counters,
    /// Authenticates path probes with the peer (when the site does NAT
    /// traversal).
    pub probe_key: Option<ProbeKey>,
    /// When (ms after the site started) it may ask for a relay port again.
    pub(super) relay_port_asked: AtomicU64,
    state: Mutex<PeerState>,
}

impl Peer {
    /// Makes the peer with id (and WireGuard session index) `id`.
    fn new(config: &PeerConfig, id: u32, cx: &PeerContext<'_>, rng: &mut impl RngCore) -> Self {
        Peer {
            id,
            config: config.clone(),
            allow: if config.allow.is_empty() {
                cx.pod_cidrs.iter().map(|&c| AllowRule::any(c)).collect()
            } else {
                config.allow.clone()
            },
            counters: Counters::default(),
            probe_key: cx
                .paths
                .and_then(|_| ProbeKey::derive(cx.private_key, &config.public_key).ok()),
            relay_port_asked: AtomicU64::new(0),
            state: Mutex::new(PeerState::new(config, id, cx, rng)),
        }
    }

    /// Forgets everything learnt about the peer at run time (sessions,
    /// endpoint, paths), keeping its id and counters: what a gateway replica
    /// does when it takes over or hands over the active role, since the
    /// other replica has talked to the peer since.
    pub(super) fn reset(&self, cx: &PeerContext<'_>, rng: &mut impl RngCore) {
        *self.lock() = PeerState::new(&self.config, self.id, cx, rng);
    }

    /// The operator's name for the peer.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its WireGuard public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.config.public_key
    }

    /// How this site sees each of its real CIDRs.
    pub fn views(&self) -> &[View] {
        &self.config.views
    }

    /// Whether the operator configured a static endpoint.
    pub fn has_static_endpoint(&self) -> bool {
        self.config.endpoint.is_some()
    }

    /// Locks the peer's WireGuard state. A panic while it was held poisons
    /// nothing we rely on, so the poison is ignored.
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The view of the peer's real CIDR that contains `addr`, if `addr` is
    /// the peer's at all.
    pub fn view_of_source(&self, addr: IpAddr) -> Option<&View> {
        self.views().iter().find(|m| m.real().contains(&addr))
    }
}

/// What every peer of a site is made with.
pub(super) struct PeerContext<'a> {
    pub(super) private_key: &'a StaticSecret,
    pub(super) rate_limiter: &'a Arc<RateLimiter>,
    /// The local pod networks: the default allow-list.
    pub(super) pod_cidrs: &'a [IpNet],
    /// Path machine settings, when the site does NAT traversal.
    pub(super) paths: Option<PathConfig>,
}

/// All peers, with the lookups the data path needs: an immutable snapshot.
/// A config reload builds a new one (reusing the unchanged peers) and the
/// data path switches to it atomically.
pub struct Peers {
    peers: Vec<Arc<Peer>>,
    /// View CIDR → (peer position, view index).
    routes: Lpm<(usize, usize)>,
    /// Public key → peer position.
    keys: HashMap<[u8; 32], usize>,
    /// (peer id, position), sorted by id.
    ids: Vec<(u32, usize)>,
    next_id: u32,
}

/// What a reload changed, by peer name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerChanges {
    /// New peers.
    pub added: Vec<String>,
    /// Peers whose configuration changed (their sessions restart).
    pub changed: Vec<String>,
    /// Peers no longer configured.
    pub removed: Vec<String>,
    /// Peers kept as they were, sessions and counters included.
    pub unchanged: Vec<String>,
}

/// Peer ids are WireGuard session indices shifted left by 8 bits.
const MAX_PEER_ID: u32 = 1 << 24;

impl Peers {
    /// Builds the table for `configs`. Peers of `previous` whose
    /// configuration is unchanged are carried over as they are; everyone
    /// else gets a fresh peer with a new id.
    pub(super) fn build(
        configs: &[PeerConfig],
        cx: &PeerContext<'_>,
        rng: &mut impl RngCore,
        previous: Option<&Peers>,
    ) -> (Self, PeerChanges) {
        let mut changes = PeerChanges::default();
        let mut next_id = previous.map_or(0, |p| p.next_id);
        let mut peers = Vec::with_capacity(configs.len());
        for config in configs {
            let old =
                previous.and_then(|p| p.by_key(config.public_key.as_bytes()).map(|i| p.get(i)));
            match old {
                Some(old) if old.config == *config => {
                    changes.unchanged.push(config.name.clone());
                    peers.push(Arc::clone(old));
                    continue;
                }
                Some(_) => changes.changed.push(config.name.clone()),
                None => changes.added.push(config.name.clone()),
            }
            let id = next_id % MAX_PEER_ID;
            next_id = next_id.wrapping_add(1);
            peers.push(Arc::new(Peer::new(config, id, cx, rng)));
        }
        let keys: HashMap<[u8; 32], usize> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| (*p.public_key().as_bytes(), i))
            .collect();
        if let Some(previous) = previous {
            for old in previous.iter() {
                if !keys.contains_key(old.public_key().as_bytes()) {
                    changes.removed.push(old.name().to_owned());
                }
            }
        }
        let routes = Lpm::new(peers.iter().enumerate().flat_map(|(i, p)| {
            p.views()
                .iter()
                .enumerate()
                .map(move |(k, m)| (*m.view(), (i, k)))
        }));
        let mut ids: Vec<(u32, usize)> = peers.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
        ids.sort_unstable();
        (
            Peers {
                peers,
                routes,
                keys,
                ids,
                next_id,
            },
            changes,
        )
    }

    /// The peer, and which of its views, that local destination `addr`
    /// (a view address) belongs to: longest prefix match.
    pub fn route(&self, addr: IpAddr) -> Option<(usize, usize)> {
        self.routes.get(addr)
    }

    /// The peer with this public key.
    pub fn by_key(&self, key: &[u8; 32]) -> Option<usize> {
        self.keys.get(key).copied()
    }

    /// The peer with this id.
    pub fn by_id(&self, id: u32) -> Option<usize> {
        self.ids
            .binary_search_by_key(&id, |&(id, _)| id)
            .ok()
            .map(|k| self.ids[k].1)
    }

    /// The peer a receiver index (from a handshake response, cookie reply or
    /// data packet) belongs to.
    pub fn by_receiver_index(&self, receiver_idx: u32) -> Option<usize> {
        self.by_id(receiver_idx >> 8)
    }

    /// Peer at position `i`.
    pub fn get(&self, i: usize) -> &Arc<Peer> {
        &self.peers[i]
    }

    /// All peers, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.peers.iter()
    }

    /// How many peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Every view CIDR of every peer: the routes the TUN needs.
    pub fn all_views(&self) -> Vec<IpNet> {
        self.peers
            .iter()
            .flat_map(|p| p.views().iter().map(|m| *m.view()))
            .collect()
    }
}
