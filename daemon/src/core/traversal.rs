//! NAT traversal in the site core: the STUN client, candidate publishing,
//! path probes and the fallback to the relay.
//!
//! - **STUN** from the WireGuard socket itself (so the reflexive address is
//!   the one peers must use), to every rendezvous and `stun_servers`, at
//!   start, every [`TraversalParams::stun_interval`] and whenever a path
//!   falls back to the relay.
//! - **Candidates** (advertised, port-mapped, server-reflexive, host) are
//!   published
//!   through [`Io::publish_candidates`] at start, when a reflexive address
//!   changes, and again (changed or not) when a path falls back to the
//!   relay, so that the rendezvous introduces both sides anew.
//! - **Probes**: one `PeerPaths` machine per peer without a static
//!   endpoint; its `PathChanged` events set where the peer's packets go
//!   (`Direct` → that address, `Relay` → no endpoint, so the relay).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use causeway_nat::path::{Event, Path, PathConfig};
use causeway_nat::probe::{self, Probe};
use causeway_nat::stun::{self, StunMessage, TransactionId};
use rand::RngCore;
use tracing::{debug, info};

use super::{DropReason, Io, Peer, PeerState, Site};

/// A STUN request unanswered this long is forgotten.
const STUN_TIMEOUT: Duration = Duration::from_secs(5);
/// First retransmission of an unanswered STUN request; each next one waits
/// twice as long (RFC 8489 §6.2.1), until [`STUN_TIMEOUT`].
const STUN_RTO: Duration = Duration::from_millis(500);

/// Pongs to a peer with a static endpoint: bursts of this many, then
/// [`PONG_RATE`] a second (the path machine's own answer budget has the
/// same numbers).
const PONG_BURST: u32 = 64;
const PONG_RATE: u32 = 20;

/// A token bucket for answers to pings ([`PONG_BURST`], [`PONG_RATE`]).
#[derive(Debug)]
pub(crate) struct AnswerBudget {
    tokens: u32,
    at: Option<Instant>,
}

impl Default for AnswerBudget {
    fn default() -> Self {
        AnswerBudget {
            tokens: PONG_BURST,
            at: None,
        }
    }
}

impl AnswerBudget {
    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let last = *self.at.get_or_insert(now);
        let elapsed = now.saturating_duration_since(last).as_millis();
        let refill = u32::try_from(elapsed * u128::from(PONG_RATE) / 1000).unwrap_or(u32::MAX);
        if refill > 0 {
            self.tokens = self.tokens.saturating_add(refill).min(PONG_BURST);
            self.at = Some(now);
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// What NAT traversal starts from.
#[derive(Debug, Clone)]
pub struct TraversalParams {
    /// STUN servers (every rendezvous' and the configured ones).
    pub stun_servers: Vec<SocketAddr>,
    /// Operator-advertised endpoints.
    pub advertised: Vec<SocketAddr>,
    /// Host addresses with the WireGuard port (outside the pod networks).
    pub host: Vec<SocketAddr>,
    /// How often the reflexive address is asked for again (NAT mappings
    /// change).
    pub stun_interval: Duration,
    /// Probing and keepalive timings of the path machines.
    pub path: PathConfig,
}

impl TraversalParams {
    /// The daemon's settings for these servers and addresses.
    pub fn new(
        stun_servers: Vec<SocketAddr>,
        advertised: Vec<SocketAddr>,
        host: Vec<SocketAddr>,
    ) -> Self {
        TraversalParams {
            stun_servers,
            advertised,
            host,
            stun_interval: Duration::from_secs(20),
            path: PathConfig::default(),
        }
    }
}

/// The site's own addresses and its STUN transactions.
struct Local {
    advertised: Vec<SocketAddr>,
    /// The external address the gateway's router mapped to the WireGuard
    /// port (PCP / NAT-PMP, see `crate::portmap`).
    mapped: Option<SocketAddr>,
    host: Vec<SocketAddr>,
    /// Server-reflexive addresses (one per STUN server that answered).
    srflx: Vec<(SocketAddr, SocketAddr)>,
    /// STUN requests in flight.
    pending: Vec<Pending>,
    /// When STUN goes out next.
    next_stun: Instant,
    /// The candidates are yet to be published (at the first timeout).
    unpublished: bool,
}

impl Local {
    /// Our candidates in the order peers should try them.
    fn candidates(&self) -> Vec<SocketAddr> {
        let srflx: Vec<SocketAddr> = self.srflx.iter().map(|&(_, mapped)| mapped).collect();
        // A port mapping is as good as an advertised endpoint (it is one,
        // made by the router on request): before the reflexive addresses.
        let chosen: Vec<SocketAddr> = self
            .advertised
            .iter()
            .chain(&self.mapped)
            .copied()
            .collect();
        causeway_nat::path::local_candidates(&chosen, &srflx, &self.host)
    }
}

/// A STUN request waiting for its answer.
struct Pending {
    tx: TransactionId,
    server: SocketAddr,
    /// First sent at.
    sent: Instant,
    /// When it goes out again, unless answered.
    retry_at: Instant,
    /// The wait after the next retransmission.
    rto: Duration,
}

/// Site-wide traversal state.
pub(super) struct Traversal {
    local: Mutex<Local>,
    stun_servers: Vec<SocketAddr>,
    stun_interval: Duration,
}

impl Traversal {
    pub(super) fn new(params: TraversalParams, now: Instant) -> Self {
        Traversal {
            local: Mutex::new(Local {
                advertised: params.advertised,
                mapped: None,
                host: params.host,
                srflx: Vec::new(),
                pending: Vec::new(),
                next_stun: now,
                unpublished: true,
            }),
            stun_servers: params.stun_servers,
            stun_interval: params.stun_interval,
        }
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn candidates(&self) -> Vec<SocketAddr> {
        self.local().candidates()
    }

    /// The next STUN round or retransmission (the first timeout also
    /// publishes the candidates).
    pub(super) fn poll_timeout(&self) -> Instant {
        let local = self.local();
        let retries = local.pending.iter().map(|p| p.retry_at);
        retries.fold(local.next_stun, Instant::min)
    }

    /// Publishes at start, expires STUN requests, sends STUN when due.
    pub(super) fn handle_timeout(&self, now: Instant, rng: &mut impl RngCore, io: &mut impl Io) {
        let mut local = self.local();
        if std::mem::take(&mut local.unpublished) {
            io.publish_candidates(&local.candidates());
        }
        let mut buf = [0u8; stun::MAX_ENCODED_LEN];
        // Unanswered requests go out again (the same transaction) until
        // they time out: a lost answer costs a second, not a STUN interval.
        local.pending.retain_mut(|p| {
            if now.duration_since(p.sent) >= STUN_TIMEOUT {
                return false;
            }
            if p.retry_at <= now {
                let n = stun::encode_binding_request(&p.tx, &mut buf);
                let _ = io.send(p.server, &buf[..n]);
                p.retry_at = (now + p.rto).min(p.sent + STUN_TIMEOUT);
                p.rto *= 2;
            }
            true
        });
        if local.next_stun > now {
            return;
        }
        local.next_stun = now + self.stun_interval;
        for &server in &self.stun_servers {
            // A request sent moments ago is still on its way (a round
            // brought forward by a rescue or a fallback): wait for its
            // answer instead.
            if local
                .pending
                .iter()
                .any(|p| p.server == server && now.saturating_duration_since(p.sent) < STUN_RTO)
            {
                continue;
            }
            let tx = TransactionId::random(rng);
            let n = stun::encode_binding_request(&tx, &mut buf);
            if io.send(server, &buf[..n]).is_ok() {
                // A new round replaces a request still waiting for the server.
                local.pending.retain(|p| p.server != server);
                local.pending.push(Pending {
                    tx,
                    server,
                    sent: now,
                    retry_at: now + STUN_RTO,
                    rto: 2 * STUN_RTO,
                });
            }
        }
    }

    /// A path fell back to the relay: our mapping may have changed, so ask
    /// STUN again at once, and announce the candidates again even if
    /// nothing changed, so that both sides start probing together.
    fn path_lost(&self, now: Instant, io: &mut impl Io) {
        let mut local = self.local();
        local.next_stun = now;
        io.publish_candidates(&local.candidates());
    }
}

impl Site {
    /// The gateway's router mapped `mapped` to the WireGuard port (or the
    /// mapping is gone: `None`): a candidate after the advertised ones and
    /// before the server-reflexive ones, published when it changes.
    pub fn set_mapped_candidate(&self, mapped: Option<SocketAddr>, io: &mut impl Io) {
        let Some(traversal) = self.traversal.as_ref() else {
            return;
        };
        let mut local = traversal.local();
        if local.mapped == mapped {
            return;
        }
        local.mapped = mapped;
        io.publish_candidates(&local.candidates());
    }

    /// The port-mapped candidate, if any (for status).
    pub fn mapped_candidate(&self) -> Option<SocketAddr> {
        self.traversal.as_ref().and_then(|t| t.local().mapped)
    }

    /// A STUN message arrived on the WireGuard socket.
    pub fn handle_stun(&self, from: SocketAddr, datagram: &[u8], io: &mut impl Io) {
        if self.standby_drop() {
            return;
        }
        let Some(traversal) = self.traversal.as_ref() else {
            return;
        };
        let Ok(StunMessage::BindingSuccess { tx, mapped }) = stun::parse(datagram) else {
            self.drops.count(DropReason::Malformed);
            return;
        };
        let mut local = traversal.local();
        let Some(i) = local
            .pending
            .iter()
            .position(|p| p.tx.0 == tx.0 && p.server == from)
        else {
            self.drops.count(DropReason::Rejected);
            return;
        };
        local.pending.swap_remove(i);
        let mapped = SocketAddr::new(mapped.ip().to_canonical(), mapped.port());
        match local.srflx.iter_mut().find(|(server, _)| *server == from) {
            Some((_, old)) if *old == mapped => return,
            Some((_, old)) => *old = mapped,
            None => local.srflx.push((from, mapped)),
        }
        info!(server = %from, reflexive = %mapped, "server-reflexive address of the WireGuard socket");
        io.publish_candidates(&local.candidates());
    }

    /// A path probe arrived on the WireGuard socket.
    pub fn handle_probe(&self, now: Instant, from: SocketAddr, datagram: &[u8], io: &mut impl Io) {
        if self.standby_drop() {
            return;
        }
        let peers = self.peers();
        let Some(index) = probe::sender(datagram).and_then(|key| peers.by_key(&key)) else {
            self.drop_packet(
                None,
                DropReason::UnknownPeer,
                format_args!("probe from {from}: not one of our peers"),
            );
            return;
        };
        let peer = peers.get(index);
        let Some(key) = peer.probe_key.as_ref() else {
            return;
        };
        let probe = match probe::open(key, datagram) {
            Ok(probe) => probe,
            Err(e) => {
                self.drop_packet(
                    Some(peer),
                    DropReason::Rejected,
                    format_args!("probe from {from}: {e}"),
                );
                return;
            }
        };
        let mut state = peer.lock();
        if let Probe::Ping { counter, .. } = probe
            && !state.ping_replay.accept(counter)
        {
            drop(state);
            self.drop_packet(
                Some(peer),
                DropReason::Rejected,
                format_args!("probe from {from}: replayed or stale ping"),
            );
            return;
        }
        match state.paths.as_mut() {
            Some(paths) => {
                paths.handle_probe(now, from, probe);
                self.pump_paths(now, peer, &mut state, io, false);
            }
            None => {
                // A peer with a static endpoint needs no path selection here,
                // but the other side may: answer its pings, at a bounded rate.
                if let Probe::Ping { tx, .. } = probe {
                    if !state.pong_budget.take(now) {
                        drop(state);
                        self.drop_packet(
                            Some(peer),
                            DropReason::Rejected,
                            format_args!("probe from {from}: over the pong rate limit"),
                        );
                        return;
                    }
                    drop(state);
                    let mut buf = [0u8; probe::MAX_PROBE_LEN];
                    let n = probe::encode(key, &Probe::Pong { tx, observed: from }, &mut buf);
                    let _ = io.send(from, &buf[..n]);
                }
            }
        }
    }

    /// A rendezvous told us about peer `key`: online with these candidates,
    /// or offline.
    pub fn handle_peer_update(
        &self,
        now: Instant,
        key: &[u8; 32],
        candidates: Vec<SocketAddr>,
        online: bool,
        io: &mut impl Io,
    ) {
        if !self.is_active() {
            return;
        }
        let peers = self.peers();
        let Some(index) = peers.by_key(key) else {
            return;
        };
        let peer = peers.get(index);
        info!(
            peer = peer.name(),
            online,
            candidates = candidates.len(),
            "peer update from the rendezvous"
        );
        debug!(peer = peer.name(), candidates = ?candidates, "candidates from the rendezvous");
        let candidates = self.reachable(peer, candidates);
        let mut state = peer.lock();
        if let Some(paths) = state.paths.as_mut() {
            if online {
                paths.set_remote_candidates(now, candidates);
            }
            self.pump_paths(now, peer, &mut state, io, false);
        }
        if online {
            // Reachable through the relay from now on.
            self.kick_handshake(peer, &mut state, io);
        }
    }

    /// Drives a peer's path machine: its timeout when `timers` and due,
    /// then sends what it wants sent and applies its decisions.
    pub(super) fn pump_paths(
        &self,
        now: Instant,
        peer: &Arc<Peer>,
        state: &mut PeerState,
        io: &mut impl Io,
        timers: bool,
    ) {
        let Some(key) = peer.probe_key.as_ref() else {
            return;
        };
        if timers
            && let Some(paths) = state.paths.as_mut()
            && paths.poll_timeout().is_some_and(|(at, _)| at <= now)
        {
            paths.handle_timeout(now);
        }
        let mut buf = [0u8; probe::MAX_PROBE_LEN];
        loop {
            let Some(paths) = state.paths.as_mut() else {
                return;
            };
            while let Some(t) = paths.poll_transmit() {
                // Pings carry our ping clock, under the MAC (replay defence).
                let probe = match t.probe {
                    Probe::Ping { tx, .. } => Probe::Ping {
                        tx,
                        counter: self.next_ping_counter(now),
                    },
                    pong => pong,
                };
                let n = probe::encode(key, &probe, &mut buf);
                let sent = match t.ttl {
                    Some(ttl) => io.send_with_ttl(t.dst, &buf[..n], ttl),
                    None => io.send(t.dst, &buf[..n]),
                };
                if let Err(e) = sent {
                    tracing::debug!(peer = peer.name(), "probe to {}: {e}", t.dst);
                }
            }
            let path = match paths.poll_event() {
                None => return,
                Some(Event::PathChanged(path)) => path,
                Some(Event::Silent) => {
                    info!(
                        peer = peer.name(),
                        "traffic to the peer unanswered: probing every candidate, asking STUN again, announcing our candidates"
                    );
                    if let Some(traversal) = &self.traversal {
                        traversal.path_lost(now, io);
                    }
                    continue;
                }
            };
            io.path_changed(peer, path);
            match path {
                Path::Direct(addr) => {
                    info!(peer = peer.name(), %addr, "direct path");
                    state.endpoint = Some(addr);
                    self.kick_handshake(peer, state, io);
                }
                Path::Relay => {
                    info!(peer = peer.name(), "no direct path: using the relay");
                    state.endpoint = None;
                    if let Some(traversal) = &self.traversal {
                        traversal.path_lost(now, io);
                    }
                }
            }
        }
    }

    /// Starts a WireGuard handshake at once when a peer without a session
    /// just became reachable, instead of waiting out boringtun's 5-second
    /// retry of an initiation that had nowhere to go.
    pub(super) fn kick_handshake(&self, peer: &Arc<Peer>, state: &mut PeerState, io: &mut impl Io) {
        if state.tunn.time_since_last_handshake().is_some() {
            return;
        }
        let mut buf = [0u8; 256];
        if let boringtun::noise::TunnResult::WriteToNetwork(init) =
            state.tunn.format_handshake_initiation(&mut buf, true)
        {
            self.send_to_peer(peer, state.send_addr(), init, io);
        }
    }

    /// The candidates worth probing: addresses a peer can have (see
    /// [`causeway_nat::path::is_valid_candidate`]), not one of this site's
    /// own, and not inside our own pod networks or any peer's view (those
    /// route into the tunnel itself, not to the peer's gateway). The rest
    /// are counted against the peer as `bad_candidate` and dropped.
    fn reachable(&self, peer: &Peer, candidates: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let peers = self.peers();
        let inside_overlay = |ip: std::net::IpAddr| {
            self.pod_cidrs.iter().any(|n| n.contains(&ip)) || peers.route(ip).is_some()
        };
        let own = self.candidates();
        let mut kept = Vec::with_capacity(candidates.len());
        for c in candidates {
            let c = SocketAddr::new(c.ip().to_canonical(), c.port());
            if !causeway_nat::path::is_valid_candidate(c)
                || own.contains(&c)
                || inside_overlay(c.ip())
            {
                self.drop_packet(
                    Some(peer),
                    DropReason::BadCandidate,
                    format_args!("candidate {c} from the rendezvous: not a peer address"),
                );
            } else {
                kept.push(c);
            }
        }
        kept
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::core::SiteParams;
    use x25519_dalek::StaticSecret;

    #[derive(Default)]
    struct Sent {
        datagrams: Vec<(SocketAddr, Vec<u8>)>,
        published: Vec<Vec<SocketAddr>>,
    }

    impl Io for Sent {
        fn send(&mut self, to: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
            self.datagrams.push((to, bytes.to_vec()));
            Ok(())
        }
        fn send_with_ttl(&mut self, to: SocketAddr, bytes: &[u8], _: u8) -> std::io::Result<()> {
            self.send(to, bytes)
        }
        fn relay(&mut self, _: &Arc<Peer>, _: &[u8]) -> bool {
            true
        }
        fn publish_candidates(&mut self, candidates: &[SocketAddr]) {
            self.published.push(candidates.to_vec());
        }
    }

    /// A site with NAT traversal (`traversal`) and these peers.
    fn site(t0: Instant, traversal: TraversalParams, peers: &[crate::config::PeerConfig]) -> Site {
        Site::new(
            SiteParams {
                private_key: StaticSecret::from([7; 32]),
                pod_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
                mtu: 1420,
                traversal: Some(traversal),
                seed: 1,
                role: crate::core::Role::Active,
            },
            peers,
            t0,
        )
    }

    /// A site with NAT traversal, no peers, one STUN server, these
    /// advertised endpoints and one host address.
    fn site_without_peers(
        t0: Instant,
        stun_server: SocketAddr,
        advertised: Vec<SocketAddr>,
        host: SocketAddr,
    ) -> Site {
        site(
            t0,
            TraversalParams::new(vec![stun_server], advertised, vec![host]),
            &[],
        )
    }

    const PEER_SECRET: [u8; 32] = [8; 32];

    /// A site with NAT traversal, host address 192.0.2.9:51820, and one
    /// peer (key [`PEER_SECRET`]) without a static endpoint.
    fn site_with_peer(t0: Instant) -> Site {
        site_with_peer_at(t0, None)
    }

    fn site_with_peer_at(t0: Instant, endpoint: Option<SocketAddr>) -> Site {
        let peer_cidr: ipnet::IpNet = "10.1.0.0/16".parse().unwrap();
        let peer = crate::config::PeerConfig {
            name: "b".to_owned(),
            public_key: x25519_dalek::PublicKey::from(&StaticSecret::from(PEER_SECRET)),
            cidrs: vec![peer_cidr],
            views: vec![crate::packet::View::identity(peer_cidr)],
            allow: Vec::new(),
            endpoint: endpoint.map(|addr| crate::config::Endpoint {
                spec: addr.to_string(),
                addr,
            }),
            persistent_keepalive: None,
        };
        let host = vec!["192.0.2.9:51820".parse().unwrap()];
        site(
            t0,
            TraversalParams::new(Vec::new(), Vec::new(), host),
            &[peer],
        )
    }

    #[test]
    fn a_granted_relay_port_is_bound_used_and_left_when_it_goes_silent() {
        use causeway_nat::udp_relay::{self, RelayPort, RelayToken};
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let site = site_with_peer(t0);
        let key = x25519_dalek::PublicKey::from(&StaticSecret::from(PEER_SECRET)).to_bytes();
        let server: SocketAddr = "203.0.113.1:7443".parse().unwrap();
        let port = RelayPort {
            addr: "203.0.113.1:40000".parse().unwrap(),
            token: RelayToken([5; 32]),
        };
        let binds = |io: &Sent| -> Vec<u64> {
            io.datagrams
                .iter()
                .filter(|(to, d)| *to == port.addr && udp_relay::is_control(d))
                .map(|(_, d)| port.token.open_bind(d).expect("a valid bind"))
                .collect()
        };
        let tick = |at| {
            let mut io = Sent::default();
            site.handle_timeout(at, &mut io);
            binds(&io)
        };
        let send_addr = || site.peers().get(0).lock().send_addr();
        site.handle_relay_port(t0, &key, server, Some(port));
        assert_eq!(tick(t0), vec![1]);
        // Bound, but the peer is not yet: still the QUIC relay.
        site.handle_relay_ack(ms(10), port.addr, &port.token.ack(1, false));
        assert_eq!(send_addr(), None);
        assert!(tick(ms(100)).is_empty(), "retries every 250 ms");
        assert_eq!(tick(ms(250)), vec![2]);
        site.handle_relay_ack(ms(260), port.addr, &port.token.ack(2, true));
        assert_eq!(send_addr(), Some(port.addr));
        // An old ack, a forged one, or one from elsewhere change nothing.
        let rejected = site.drops.get(DropReason::Rejected);
        site.handle_relay_ack(ms(270), port.addr, &port.token.ack(1, false));
        site.handle_relay_ack(ms(270), port.addr, &RelayToken([6; 32]).ack(2, false));
        let elsewhere: SocketAddr = "198.51.100.1:40000".parse().unwrap();
        site.handle_relay_ack(ms(270), elsewhere, &port.token.ack(2, false));
        assert_eq!(site.drops.get(DropReason::Rejected), rejected + 3);
        assert_eq!(send_addr(), Some(port.addr));
        // Refreshed every 2 s; one unanswered for 1 s: back to QUIC, and
        // binding again at once.
        assert!(tick(ms(1000)).is_empty());
        assert_eq!(tick(ms(2300)), vec![3]);
        assert!(tick(ms(3200)).is_empty());
        assert_eq!(send_addr(), Some(port.addr), "not 1 s yet");
        assert_eq!(tick(ms(3400)), vec![4]);
        assert_eq!(send_addr(), None);
        site.handle_relay_ack(ms(3450), port.addr, &port.token.ack(4, true));
        assert_eq!(send_addr(), Some(port.addr));
        // Withdrawn by another rendezvous: not ours; by ours: gone.
        let other: SocketAddr = "198.51.100.9:7443".parse().unwrap();
        site.handle_relay_port(ms(3500), &key, other, None);
        assert_eq!(send_addr(), Some(port.addr));
        site.handle_relay_port(ms(3500), &key, server, None);
        assert_eq!(send_addr(), None);
        assert!(tick(ms(6000)).is_empty());
    }

    #[test]
    fn binds_slow_down_when_the_peer_never_binds() {
        use causeway_nat::udp_relay::{self, RelayPort, RelayToken};
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let site = site_with_peer(t0);
        let key = x25519_dalek::PublicKey::from(&StaticSecret::from(PEER_SECRET)).to_bytes();
        let port = RelayPort {
            addr: "203.0.113.1:40000".parse().unwrap(),
            token: RelayToken([5; 32]),
        };
        site.handle_relay_port(t0, &key, "203.0.113.1:7443".parse().unwrap(), Some(port));
        // Every bind is answered, but the peer (which cannot reach the
        // port) never binds: 4 a second for 5 s, then one every 2 s.
        let mut sent = Vec::new();
        for at in (0..15_000).step_by(50).map(ms) {
            let mut io = Sent::default();
            site.handle_timeout(at, &mut io);
            for (_, d) in io
                .datagrams
                .iter()
                .filter(|(to, d)| *to == port.addr && udp_relay::is_control(d))
            {
                let counter = port.token.open_bind(d).expect("a bind");
                sent.push(at.duration_since(t0));
                site.handle_relay_ack(at, port.addr, &port.token.ack(counter, false));
            }
        }
        let early = sent.iter().filter(|t| **t < Duration::from_secs(5)).count();
        let late = sent
            .iter()
            .filter(|t| **t >= Duration::from_secs(5))
            .count();
        assert_eq!(early, 20, "{sent:?}");
        assert!((5..=6).contains(&late), "{sent:?}");
        assert_eq!(site.peers().get(0).lock().send_addr(), None);
    }

    #[test]
    fn a_mapped_candidate_comes_after_advertised_and_before_reflexive() {
        let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let host: SocketAddr = "192.0.2.9:51820".parse().unwrap();
        let advertised: SocketAddr = "203.0.113.7:51820".parse().unwrap();
        let t0 = Instant::now();
        let site = site_without_peers(t0, server, vec![advertised], host);
        let mut io = Sent::default();
        site.handle_timeout(t0, &mut io);
        let tx = transaction(&io.datagrams[0].1);
        let srflx: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut buf = [0u8; stun::MAX_ENCODED_LEN];
        let n = stun::encode_binding_success(&TransactionId(tx), srflx, &mut buf);
        site.handle_stun(server, &buf[..n], &mut io);
        let mapped: SocketAddr = "198.51.100.7:50000".parse().unwrap();
        site.set_mapped_candidate(Some(mapped), &mut io);
        assert_eq!(
            io.published.last().unwrap(),
            &vec![advertised, mapped, srflx, host]
        );
        assert_eq!(site.mapped_candidate(), Some(mapped));
        // Unchanged: nothing published; gone: published without it.
        let published = io.published.len();
        site.set_mapped_candidate(Some(mapped), &mut io);
        assert_eq!(io.published.len(), published);
        site.set_mapped_candidate(None, &mut io);
        assert_eq!(io.published.last().unwrap(), &vec![advertised, srflx, host]);
    }

    #[test]
    fn candidates_no_peer_can_have_are_dropped_and_counted() {
        let t0 = Instant::now();
        let site = site_with_peer(t0);
        let key = x25519_dalek::PublicKey::from(&StaticSecret::from(PEER_SECRET)).to_bytes();
        let good: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let bad: Vec<SocketAddr> = [
            "127.0.0.1:51820",
            "[::1]:51820",
            "169.254.0.1:51820",
            "[fe80::1]:51820",
            "224.0.0.1:51820",
            "255.255.255.255:51820",
            "0.0.0.0:51820",
            "198.51.100.8:0",
            // Our own host address, and addresses inside the overlay.
            "192.0.2.9:51820",
            "10.0.3.4:51820",
            "10.1.3.4:51820",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut io = Sent::default();
        let mut all = bad.clone();
        all.push(good);
        site.handle_peer_update(t0, &key, all, true, &mut io);
        let probed: Vec<SocketAddr> = io
            .datagrams
            .iter()
            .filter(|(_, d)| probe::is_probe(d))
            .map(|(to, _)| *to)
            .collect();
        assert_eq!(probed, vec![good]);
        let peers = site.peers();
        let peer = peers.get(0);
        assert_eq!(
            peer.counters.drops.get(DropReason::BadCandidate),
            bad.len() as u64
        );
    }

    /// The peer's pings to the site, each with its own counter.
    fn peer_ping(tx: u8, counter: u64) -> Vec<u8> {
        let key = probe::ProbeKey::derive(
            &StaticSecret::from(PEER_SECRET),
            &x25519_dalek::PublicKey::from(&StaticSecret::from([7; 32])),
        )
        .unwrap();
        let mut buf = [0u8; probe::MAX_PROBE_LEN];
        let n = probe::encode_ping(&key, &TransactionId([tx; 12]), counter, &mut buf);
        buf[..n].to_vec()
    }

    fn pongs(io: &Sent) -> usize {
        io.datagrams
            .iter()
            .filter(|(_, d)| d.len() != probe::PING_LEN && probe::is_probe(d))
            .count()
    }

    #[test]
    fn old_pings_replayed_get_no_answer() {
        // With a path machine (no static endpoint) and without one.
        for endpoint in [None, Some("198.51.100.1:51820".parse().unwrap())] {
            let t0 = Instant::now();
            let site = site_with_peer_at(t0, endpoint);
            let from: SocketAddr = "198.51.100.1:51820".parse().unwrap();
            let mut io = Sent::default();
            let recorded = peer_ping(0, 1_000);
            site.handle_probe(t0, from, &recorded, &mut io);
            assert_eq!(pongs(&io), 1);
            // 100 later pings, a second apart: more than any ring of ids.
            for i in 1..=100u8 {
                let at = t0 + Duration::from_secs(u64::from(i));
                site.handle_probe(at, from, &peer_ping(i, 1_000 + u64::from(i)), &mut io);
            }
            assert_eq!(pongs(&io), 101, "{endpoint:?}");
            // The first one, replayed from another address: refused.
            let later = t0 + Duration::from_secs(200);
            let elsewhere: SocketAddr = "203.0.113.66:4000".parse().unwrap();
            site.handle_probe(later, elsewhere, &recorded, &mut io);
            assert_eq!(pongs(&io), 101, "{endpoint:?}: replay answered");
            assert!(io.datagrams.iter().all(|(to, _)| *to != elsewhere));
            let peers = site.peers();
            assert_eq!(peers.get(0).counters.drops.get(DropReason::Rejected), 1);
            // And the latest one replayed, too.
            site.handle_probe(later, elsewhere, &peer_ping(100, 1_100), &mut io);
            assert_eq!(pongs(&io), 101);
        }
    }

    #[test]
    fn a_static_endpoint_peer_answers_pings_at_a_bounded_rate() {
        let t0 = Instant::now();
        let site = site_with_peer_at(t0, Some("198.51.100.1:51820".parse().unwrap()));
        let victim: SocketAddr = "203.0.113.66:4000".parse().unwrap();
        let mut io = Sent::default();
        // A thousand distinct authenticated pings at once (say, recorded
        // and replayed from a spoofed source before the real ones arrived).
        for i in 0..1000u64 {
            site.handle_probe(t0, victim, &peer_ping((i % 250) as u8, 5_000 + i), &mut io);
        }
        assert_eq!(pongs(&io), PONG_BURST as usize);
        // A second later, the rate's worth more.
        for i in 0..100u64 {
            let at = t0 + Duration::from_secs(1);
            site.handle_probe(at, victim, &peer_ping(1, 10_000 + i), &mut io);
        }
        assert_eq!(pongs(&io), (PONG_BURST + PONG_RATE) as usize);
    }

    fn transaction(datagram: &[u8]) -> [u8; 12] {
        match stun::parse(datagram).unwrap() {
            StunMessage::BindingRequest { tx } => tx.0,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unanswered_stun_is_retransmitted_until_answered() {
        let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let host: SocketAddr = "192.0.2.9:51820".parse().unwrap();
        let t0 = Instant::now();
        let site = site_without_peers(t0, server, Vec::new(), host);
        assert_eq!(site.poll_timeout(), Some(t0));
        let mut io = Sent::default();
        site.handle_timeout(t0, &mut io);
        // First timeout: the candidates go out, and one STUN request.
        assert_eq!(io.published, vec![vec![host]]);
        assert_eq!(io.datagrams.len(), 1);
        let tx = transaction(&io.datagrams[0].1);
        assert_eq!(site.poll_timeout(), Some(t0 + STUN_RTO));

        // Unanswered: the same transaction again after 500 ms, then 1 s.
        for at in [t0 + STUN_RTO, t0 + 3 * STUN_RTO] {
            site.handle_timeout(at, &mut io);
            let (to, last) = io.datagrams.last().unwrap();
            assert_eq!((*to, transaction(last)), (server, tx));
        }
        assert_eq!(io.datagrams.len(), 3);

        // The answer ends it: a new reflexive address is published, and
        // nothing more goes out until the next STUN round.
        let mapped: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut buf = [0u8; stun::MAX_ENCODED_LEN];
        let n = stun::encode_binding_success(&TransactionId(tx), mapped, &mut buf);
        site.handle_stun(server, &buf[..n], &mut io);
        assert_eq!(io.published.last().unwrap(), &vec![mapped, host]);
        let next = site.poll_timeout().unwrap();
        assert_eq!(next, t0 + Duration::from_secs(20));
        site.handle_timeout(t0 + Duration::from_secs(4), &mut io);
        assert_eq!(io.datagrams.len(), 3);
    }
}
