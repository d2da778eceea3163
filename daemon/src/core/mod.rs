//! The site core: everything a site decides, with no I/O of its own.
//!
//! [`Site`] owns the peers (their WireGuard sessions, endpoints, path
//! machines and counters), the STUN client, candidate publishing and the
//! relay fallback. Every entry point takes the time (`now`) from its
//! caller, randomness comes from a generator seeded at construction, and
//! everything the core wants done goes out through an [`Io`] the caller
//! passes in: datagrams on the WireGuard socket, WireGuard messages for the
//! relay, candidate lists for the rendezvous. The daemon's threads and
//! tasks (`crate::datapath`) only move bytes and time in and out of it; the
//! NAT simulator (`tests/nat_matrix.rs`) drives the very same core in
//! virtual time.
//!
//! Two things read the clock themselves, at the edge: boringtun's `Tunn`
//! (handshake timestamps, session expiry) and the rate limit of drop log
//! lines. Neither takes part in path selection. [`Site::new`] also reads
//! the wall clock once: where the counter of its path pings starts
//! (`causeway_nat::probe::PingClock`, the replay defence of probes).
//!
//! The core is shared by the packet threads (`&self` everywhere): each
//! peer's state sits behind its own lock, taken once per packet; the peer
//! table is an immutable snapshot swapped on reload.

mod lpm;
mod peer;
mod relay_port;
mod traversal;
mod wireguard;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use causeway_nat::path::{Path, PathConfig};
use ipnet::IpNet;
use rand::SeedableRng;
use rand::rngs::StdRng;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::config::PeerConfig;

pub use peer::{Counters, DropReason, Drops, Peer, PeerChanges, PeerState, Peers};
pub use relay_port::UdpRelay;
pub use traversal::TraversalParams;
pub use wireguard::Outbound;

/// Handshake messages per second accepted before WireGuard's cookie
/// mechanism kicks in ("under load"). Enough for a gateway with 500 peers
/// to handshake with all of them within a second (a restart, a failover):
/// boringtun-cli's 100 made a 200-peer gateway answer half of its peers
/// with cookies, and a stock peer retries only after 5 s. A flood at this
/// rate from unknown keys costs one `parse_handshake_anon` each: 66 µs
/// here, so about 7 % of a core.
/// Each message is checked twice (once to find its peer, once inside
/// boringtun), hence the factor.
const HANDSHAKE_RATE_LIMIT: u64 = 2 * 1000;
/// Bytes WireGuard adds to an inner packet (header, counter, tag).
const WIREGUARD_DATA_OVERHEAD: usize = 32;
/// No relay MSS below TCP's default (RFC 9293): a relay datagram smaller
/// than that gets fragmented rather than starving TCP.
const MIN_RELAY_MSS: u16 = 536;
/// At most one log line per drop reason in this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(5);
/// How often the handshake rate limiter's window restarts.
const RATE_LIMIT_WINDOW: Duration = Duration::from_secs(1);

/// Where a WireGuard datagram came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Our UDP socket, from this address.
    Udp(SocketAddr),
    /// The relay, which says it comes from this peer (id).
    Relay(u32),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Udp(addr) => write!(f, "{addr}"),
            Source::Relay(_) => f.write_str("the relay"),
        }
    }
}

/// Whether this replica of the site's gateway carries the site's traffic.
///
/// A site may run several gateway replicas with the same key: exactly one is
/// active (it sends and answers WireGuard, probes, STUN), the others are
/// warm standbys that send nothing and drop what reaches them (counted as
/// `standby`). Who is active is decided outside the core (keepalived, a
/// Kubernetes Lease); [`Site::set_role`] applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Carries the site's traffic.
    Active,
    /// Ready to take over; sends nothing.
    Standby,
}

impl Role {
    /// `active` or `standby`, as in status, metrics and `causeway ctl role`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Role::Active),
            "standby" => Ok(Role::Standby),
            other => Err(format!(
                "unknown role {other:?}: expected `active` or `standby`"
            )),
        }
    }
}

/// What the core sends out. The daemon implements it over its UDP socket
/// and the rendezvous clients; the simulator over its virtual internet.
pub trait Io {
    /// Sends `bytes` from the WireGuard socket to `to`.
    fn send(&mut self, to: SocketAddr, bytes: &[u8]) -> std::io::Result<()>;
    /// Sends a datagram with this IP TTL (hop limit) instead of the
    /// socket's: a path machine's opening ping (`path::OPENING_TTL`). No
    /// default: an implementation that ignored the TTL would bring back the
    /// conntrack collisions the opening ping avoids.
    fn send_with_ttl(&mut self, to: SocketAddr, bytes: &[u8], ttl: u8) -> std::io::Result<()>;
    /// Hands a WireGuard message for `peer` to the relay (which counts it
    /// in `relay_tx_packets` once sent). `false`: no relay can take it now
    /// (its queue is full or closed).
    fn relay(&mut self, peer: &Arc<Peer>, bytes: &[u8]) -> bool;
    /// The site's candidates changed, or should be announced again even
    /// if unchanged: tell every rendezvous.
    fn publish_candidates(&mut self, candidates: &[SocketAddr]);
    /// Asks a rendezvous for a UDP relay port for this site and `peer`
    /// (the grant comes back through [`Site::handle_relay_port`]).
    fn request_relay_port(&mut self, _peer: &Peer) {}
    /// A peer's path changed (for observers; the core has applied it).
    fn path_changed(&mut self, _peer: &Peer, _path: Path) {}
}

/// What a site core is made from.
pub struct SiteParams {
    /// The site's private key.
    pub private_key: StaticSecret,
    /// The local pod networks: the only destinations peers may reach, and
    /// the default allow-list.
    pub pod_cidrs: Vec<IpNet>,
    /// The tunnel MTU.
    pub mtu: u16,
    /// NAT traversal (STUN, probes, relay), when the site uses a rendezvous
    /// or STUN servers.
    pub traversal: Option<TraversalParams>,
    /// Seed of the core's random generator (path machines, STUN
    /// transactions): from the OS in the daemon, fixed in the simulator.
    pub seed: u64,
    /// The role the site starts in.
    pub role: Role,
}

/// One site: peers, sessions, paths, STUN, candidates, relay fallback.
pub struct Site {
    peer_table: arc_swap::ArcSwap<Peers>,
    /// `true` while the replica is [`Role::Active`].
    active: AtomicBool,
    pub(crate) private_key: StaticSecret,
    pub(crate) public_key: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    /// Drops not attributable to a peer.
    pub drops: Drops,
    mtu: usize,
    /// Largest TCP MSS that fits the tunnel, for IPv4 and IPv6.
    max_mss: [u16; 2],
    /// Largest WireGuard packet the relay carries in one datagram (0 until
    /// known); connections set up through the relay get an MSS that fits
    /// it, so that their packets are not fragmented (see [`Site::mss`]).
    relay_unfragmented: AtomicUsize,
    pod_cidrs: Vec<IpNet>,
    traversal: Option<traversal::Traversal>,
    /// Path machine settings for new peers.
    path_config: PathConfig,
    rng: Mutex<StdRng>,
    /// The counter stamped on our path pings (see `causeway_nat::probe`).
    ping_clock: Mutex<causeway_nat::probe::PingClock>,
    /// When the rate limiter's window restarts next.
    next_rate_reset: Mutex<Option<Instant>>,
    started: Instant,
    next_log_ms: [AtomicU64; DropReason::ALL.len()],
}

impl Site {
    /// A site core with `peers`, started at `now`.
    pub fn new(params: SiteParams, peers: &[PeerConfig], now: Instant) -> Self {
        let SiteParams {
            private_key,
            pod_cidrs,
            mtu,
            traversal,
            seed,
            role,
        } = params;
        let public_key = PublicKey::from(&private_key);
        let rate_limiter = Arc::new(RateLimiter::new(&public_key, HANDSHAKE_RATE_LIMIT));
        let path_config = traversal.as_ref().map(|t| t.path).unwrap_or_default();
        let mut rng = StdRng::seed_from_u64(seed);
        let traversal = traversal.map(|t| traversal::Traversal::new(t, now));
        let (table, _) = Peers::build(
            peers,
            &peer::PeerContext {
                private_key: &private_key,
                rate_limiter: &rate_limiter,
                pod_cidrs: &pod_cidrs,
                paths: traversal.is_some().then_some(path_config),
            },
            &mut rng,
            None,
        );
        Site {
            peer_table: arc_swap::ArcSwap::from_pointee(table),
            active: AtomicBool::new(role == Role::Active),
            private_key,
            public_key,
            rate_limiter,
            drops: Drops::default(),
            mtu: usize::from(mtu),
            max_mss: [
                crate::packet::max_mss(mtu, false),
                crate::packet::max_mss(mtu, true),
            ],
            relay_unfragmented: AtomicUsize::new(0),
            pod_cidrs,
            traversal,
            path_config,
            rng: Mutex::new(rng),
            // The one wall-clock reading of the core: where ping counters start.
            ping_clock: Mutex::new(causeway_nat::probe::PingClock::new(
                now,
                std::time::SystemTime::now(),
            )),
            next_rate_reset: Mutex::new(None),
            started: Instant::now(),
            next_log_ms: Default::default(),
        }
    }

    /// The site's public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// The tunnel MTU.
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// The current peer table (a snapshot: a reload swaps in a new one).
    pub fn peers(&self) -> arc_swap::Guard<Arc<Peers>> {
        self.peer_table.load()
    }

    /// Applies a new peer list: peers whose configuration is unchanged are
    /// kept as they are (sessions, paths, counters), the rest start anew.
    pub fn update_peers(&self, configs: &[PeerConfig]) -> PeerChanges {
        let old = self.peers();
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let (table, changes) = Peers::build(configs, &self.peer_context(), &mut *rng, Some(&old));
        self.peer_table.store(Arc::new(table));
        changes
    }

    /// What a peer's state is made from.
    fn peer_context(&self) -> peer::PeerContext<'_> {
        peer::PeerContext {
            private_key: &self.private_key,
            rate_limiter: &self.rate_limiter,
            pod_cidrs: &self.pod_cidrs,
            paths: self.traversal.is_some().then_some(self.path_config),
        }
    }

    /// The replica's role.
    pub fn role(&self) -> Role {
        if self.active.load(Relaxed) {
            Role::Active
        } else {
            Role::Standby
        }
    }

    /// Whether the replica is active (carries traffic).
    pub fn is_active(&self) -> bool {
        self.active.load(Relaxed)
    }

    /// Takes on `role`. Either way every peer's run-time state (sessions,
    /// endpoints learnt by roaming, paths) starts anew: while this replica
    /// was standby the other one talked to the peers, and after handing over
    /// nothing it knew stays true. Becoming active also sends a handshake
    /// initiation to every peer with a known endpoint at once (the peers
    /// roam to this replica on its first authenticated packet); the others
    /// get one as soon as a rendezvous reports them online (through the
    /// relay) or a direct path is found. Returns whether the role changed.
    pub fn set_role(&self, role: Role, io: &mut impl Io) -> bool {
        let was = self.active.swap(role == Role::Active, Relaxed);
        if was == (role == Role::Active) {
            return false;
        }
        // Packets already past the gate when the flag flipped may still go
        // out under the old sessions; the reset below makes them useless.
        let peers = self.peers();
        {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            let cx = self.peer_context();
            for peer in peers.iter() {
                peer.reset(&cx, &mut *rng);
            }
        }
        if role == Role::Active {
            for peer in peers.iter() {
                let mut state = peer.lock();
                if state.endpoint.is_some() {
                    self.kick_handshake(peer, &mut state, io);
                }
            }
        }
        true
    }

    /// Counts a packet that reached a standby replica and says whether the
    /// caller must drop it.
    fn standby_drop(&self) -> bool {
        if self.is_active() {
            return false;
        }
        self.drops.count(DropReason::Standby);
        true
    }

    /// Whether the site does NAT traversal (and so has a relay fallback).
    pub fn has_traversal(&self) -> bool {
        self.traversal.is_some()
    }

    /// The site's candidates, in the order peers should try them.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        self.traversal
            .as_ref()
            .map(traversal::Traversal::candidates)
            .unwrap_or_default()
    }

    /// A relay datagram can carry WireGuard packets up to `size` bytes
    /// whole: relayed connections get an MSS that fits.
    pub fn set_relay_unfragmented(&self, size: usize) {
        self.relay_unfragmented.store(size, Relaxed);
    }

    /// The MSS to clamp a SYN to: what fits the tunnel, or, for one that
    /// goes through the relay, what fits one relay datagram (a full-size
    /// WireGuard packet would take two, doubling the relay's work).
    pub fn mss(&self, ipv6: bool, relayed: bool) -> u16 {
        let tunnel = self.max_mss[usize::from(ipv6)];
        let relay = self.relay_unfragmented.load(Relaxed);
        if !relayed || relay == 0 {
            return tunnel;
        }
        let inner = relay.saturating_sub(WIREGUARD_DATA_OVERHEAD);
        let inner = u16::try_from(inner).unwrap_or(u16::MAX);
        tunnel.min(crate::packet::max_mss(inner, ipv6).max(MIN_RELAY_MSS))
    }

    /// Drives every timer: boringtun's (handshake retries, rekeys,
    /// keepalives), the handshake rate limiter's window, path machines and
    /// STUN. The daemon calls it every 100 ms.
    pub fn handle_timeout(&self, now: Instant, io: &mut impl Io) {
        if !self.is_active() {
            return;
        }
        {
            let mut next = self
                .next_rate_reset
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if next.is_none_or(|at| at <= now) {
                self.rate_limiter.reset_count();
                *next = Some(now + RATE_LIMIT_WINDOW);
            }
        }
        let mut buf = [0u8; 256];
        for peer in self.peers().iter() {
            let mut state = peer.lock();
            self.pump_paths(now, peer, &mut state, io, true);
            self.relay_port_timers(now, peer, &mut state, io);
            let endpoint = state.send_addr();
            match state.tunn.update_timers(&mut buf) {
                boringtun::noise::TunnResult::WriteToNetwork(packet) => {
                    self.send_to_peer(peer, endpoint, packet, io)
                }
                boringtun::noise::TunnResult::Err(
                    boringtun::noise::errors::WireGuardError::ConnectionExpired,
                ) => {}
                boringtun::noise::TunnResult::Err(e) => {
                    tracing::debug!(peer = peer.name(), "timers: {e:?}")
                }
                _ => {}
            }
        }
        if let Some(traversal) = &self.traversal {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            traversal.handle_timeout(now, &mut *rng, io);
        }
    }

    /// When the core next wants [`Site::handle_timeout`], if anything in it
    /// runs on virtual time (path machines, STUN). boringtun's own timers
    /// want a call every 100 ms or so on top of this.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let paths = self
            .peers()
            .iter()
            .filter_map(|p| p.lock().paths.as_ref().and_then(|m| m.poll_timeout()))
            .map(|(at, _)| at)
            .min();
        let stun = self
            .traversal
            .as_ref()
            .map(traversal::Traversal::poll_timeout);
        paths.into_iter().chain(stun).min()
    }

    /// The counter for a path ping sent at `now`.
    fn next_ping_counter(&self, now: Instant) -> u64 {
        self.ping_clock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next(now)
    }

    /// Sends a WireGuard message to `peer`: straight to `endpoint` (the
    /// peer's, or its UDP relay port) when there is one, through the QUIC
    /// relay otherwise.
    pub(crate) fn send_to_peer(
        &self,
        peer: &Arc<Peer>,
        endpoint: Option<SocketAddr>,
        bytes: &[u8],
        io: &mut impl Io,
    ) {
        match endpoint {
            Some(ep) => {
                if let Err(e) = io.send(ep, bytes) {
                    self.drop_packet(
                        Some(peer),
                        DropReason::IoError,
                        format_args!("send to {ep}: {e}"),
                    );
                }
            }
            None => self.relay(peer, bytes, io),
        }
    }

    /// Answers a datagram where it came from.
    fn reply(&self, source: Source, bytes: &[u8], io: &mut impl Io) {
        match source {
            Source::Udp(to) => {
                if let Err(e) = io.send(to, bytes) {
                    tracing::debug!("send to {to}: {e}");
                }
            }
            Source::Relay(id) => {
                let peers = self.peers();
                if let Some(i) = peers.by_id(id) {
                    self.relay(peers.get(i), bytes, io);
                }
            }
        }
    }

    /// Hands a WireGuard message for `peer` to the relay.
    fn relay(&self, peer: &Arc<Peer>, bytes: &[u8], io: &mut impl Io) {
        if self.traversal.is_none() {
            self.drop_packet(
                Some(peer),
                DropReason::NoEndpoint,
                format_args!("no endpoint and no relay for the peer"),
            );
        } else if io.relay(peer, bytes) {
            self.want_relay_port(peer, io);
        } else {
            self.drop_packet(
                Some(peer),
                DropReason::IoError,
                format_args!("relay queue full or closed"),
            );
        }
    }

    /// Whether a drop for `reason` may be logged now (one line per reason
    /// per [`LOG_INTERVAL`]; the line carries the running total).
    fn may_log(&self, reason: DropReason) -> bool {
        self.take_turn(&self.next_log_ms[reason as usize], LOG_INTERVAL)
    }

    /// Whether the time `slot` holds (ms after the site started) has come;
    /// if so, moves it `interval` ahead. One caller wins per interval, from
    /// any thread.
    fn take_turn(&self, slot: &AtomicU64, interval: Duration) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let next = slot.load(Relaxed);
        now >= next
            && slot
                .compare_exchange(next, now + interval.as_millis() as u64, Relaxed, Relaxed)
                .is_ok()
    }

    /// Counts a drop against `peer` (or the site) and logs it at a bounded
    /// rate.
    pub fn drop_packet(
        &self,
        peer: Option<&Peer>,
        reason: DropReason,
        detail: std::fmt::Arguments<'_>,
    ) {
        let (total, name) = match peer {
            Some(p) => (p.counters.drops.count(reason), p.name()),
            None => (self.drops.count(reason), "-"),
        };
        if self.may_log(reason) {
            tracing::warn!(
                peer = name,
                reason = reason.name(),
                total,
                "dropped packet: {detail}"
            );
        }
    }
}
