//! Per-peer candidate probing and path selection, without I/O.
//!
//! One [`PeerPaths`] per peer. The driver feeds it the peer's candidate
//! addresses (from the rendezvous), the probes that arrive from the peer
//! (already authenticated with [`crate::probe::open`]) and the clock; it tells
//! the driver which probes to send ([`PeerPaths::poll_transmit`]), when to
//! wake it up ([`PeerPaths::poll_timeout`]) and when the path changes
//! ([`PeerPaths::poll_event`]). Every method that changes state takes `now`;
//! the random generator (transaction ids, jitter) is seeded by the caller.
//!
//! Rules (docs/nat-traversal.md has the reasoning, the timers and the NAT
//! matrix that daemon/tests/nat_matrix.rs checks them against):
//! - New candidates are all pinged at once, in a burst (0, 200 ms, 500 ms,
//!   1 s, 2 s, 4 s), then every [`PathConfig::relay_retry_interval`] while
//!   there is no direct path, every [`PathConfig::upgrade_interval`] once
//!   there is one. The first ping of a burst has IP TTL [`OPENING_TTL`]:
//!   it opens our NAT and dies before the peer's.
//! - A ping from the peer is answered with a pong to its source. A source we
//!   do not know becomes a *peer-reflexive* candidate and is pinged at once
//!   (a triggered check), unless the direct path is *settled* (it answers and
//!   the peer sends from it): behind NATs that map per destination, every
//!   new address pinged opens a new mapping, which the peer would learn in
//!   turn, without end.
//! - The first pong makes the address it answers the direct path. Another
//!   candidate that answered twice in a row replaces it if its RTT is clearly
//!   lower (30 % and 1 ms), or comparable while the peer sends from it but no
//!   longer from the current one (that mapping is about to expire).
//! - The direct path, and every other address that answered in the last
//!   three keepalive intervals, is pinged every
//!   [`PathConfig::keepalive_interval`] (jittered down by up to 20 %): this
//!   keeps open the NAT mappings the peer may be sending to.
//! - A ping on the direct path unanswered for 1 s is repeated every second,
//!   together with a ping to every other working address; the first of those
//!   to answer takes over. After [`MAX_MISSED`] unanswered pings in a row
//!   (about 5 s) the path falls back to [`Path::Relay`] and discovery
//!   restarts on every candidate.
//! - Everything is bounded: candidates, pings in flight, queued transmits,
//!   and the answers a burst of (possibly replayed) pings can cause.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::probe::Probe;
use crate::stun::TransactionId;

/// At most this many candidates from the rendezvous are kept per peer.
pub const MAX_REMOTE_CANDIDATES: usize = 16;
/// At most this many peer-reflexive candidates are kept per peer.
pub const MAX_PEER_REFLEXIVE: usize = 8;
/// Unanswered pings in a row after which a direct path is declared dead.
pub const MAX_MISSED: u8 = 5;

/// IP TTL of the first ping of a discovery burst: it opens our own NAT's
/// mapping toward the candidate and dies before the peer's NAT. A router
/// without an input firewall would take a ping that reaches it before its
/// own site has sent to us, conntrack would confirm that inbound flow, and
/// its site's own flow to us would collide with it and get another port.
/// The real pings follow 200 ms later, when both NATs have sent.
pub const OPENING_TTL: u8 = 2;

/// Offsets of the discovery pings from the start of a burst.
const BURST: [Duration; 6] = [
    Duration::ZERO,
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];
/// A ping on the direct path unanswered for this long counts as missed and
/// is repeated.
const PATH_RETRY: Duration = Duration::from_secs(1);
/// A pong later than this after its ping is ignored.
const PING_TTL: Duration = Duration::from_secs(10);
/// Pings whose pong we still accept.
const MAX_IN_FLIGHT: usize = 64;
/// Probes waiting for the driver; more are dropped.
const MAX_QUEUED_TRANSMITS: usize = 64;
/// Ping transaction ids remembered to drop duplicates and replays.
const SEEN_PINGS: usize = 64;
/// A peer-reflexive candidate not confirmed by a pong for this long is forgotten.
const PEER_REFLEXIVE_TTL: Duration = Duration::from_secs(60);
/// Traffic sent on the direct path with nothing authenticated back from the
/// peer for this long starts a rescue (see [`Event::Silent`]).
const SILENCE: Duration = Duration::from_secs(1);
/// How long a direct path has to prove itself once the peer offered a new
/// session through the relay (at least three of its RTTs): long enough for
/// a ping's answer on any working path, short enough that a path to a dead
/// gateway is left well within a second.
pub const SUSPECT_TIMEOUT: Duration = Duration::from_millis(250);
/// At most one rescue in this interval: a one-way stream (the peer has
/// nothing to answer) must not turn into a rescue every second.
const RESCUE_INTERVAL: Duration = Duration::from_secs(10);
/// Minimum gap between a triggered ping and the previous ping to that address.
const TRIGGERED_GAP: Duration = Duration::from_millis(500);
/// Probes sent in answer to incoming pings (pongs, triggered pings): burst
/// size and sustained rate per second.
const ANSWER_BURST: u32 = 64;
const ANSWER_RATE: u32 = 20;

/// Timers, with defaults that suit any NAT whose UDP mapping timeout is 30 s
/// or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathConfig {
    /// How often the direct path is pinged (jittered down by up to 20 %).
    /// This is the NAT keepalive: keep it below the shortest NAT UDP mapping
    /// timeout on the way (commonly 30 s or more; RFC 4787 asks for >= 2 min).
    /// It also bounds how long a broken path goes unnoticed (plus about 5 s).
    pub keepalive_interval: Duration,
    /// While a direct path is up, how often every other candidate is pinged
    /// in case it is better.
    pub upgrade_interval: Duration,
    /// While there is no direct path, how often every candidate is pinged
    /// after its discovery burst.
    pub relay_retry_interval: Duration,
}

impl Default for PathConfig {
    fn default() -> Self {
        Self {
            keepalive_interval: Duration::from_secs(5),
            upgrade_interval: Duration::from_secs(30),
            relay_retry_interval: Duration::from_secs(10),
        }
    }
}

/// How packets to the peer travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Straight to this address, on the WireGuard socket.
    Direct(SocketAddr),
    /// Through the rendezvous relay.
    Relay,
}

/// Something the driver should know about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The path changed; send subsequent WireGuard packets this way.
    PathChanged(Path),
    /// Traffic went to the peer on the direct path and nothing
    /// authenticated came back for a second (a NAT on the way probably
    /// rebound or forgot its mappings). The machine pings the direct path
    /// and starts a discovery burst on every other candidate now; the
    /// driver should ask STUN again and announce its candidates again, so
    /// that the peer learns a changed address and probes back.
    Silent,
}

/// A probe to send on the WireGuard socket: encode it with
/// [`crate::probe::encode`] and the peer's [`crate::probe::ProbeKey`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub dst: SocketAddr,
    /// What to send.
    pub probe: Probe,
    /// `Some`: send it with this IP TTL (hop limit) instead of the
    /// socket's: an opening ping ([`OPENING_TTL`]).
    pub ttl: Option<u8>,
}

/// Why [`PeerPaths::poll_timeout`] wants to be woken up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimeoutReason {
    /// The next ping of a candidate's discovery burst.
    Discovery,
    /// No direct path yet: retry a candidate after its burst.
    RelayRetry,
    /// A direct path is up: try another candidate in case it is better.
    Upgrade,
    /// Keepalive ping on the direct path.
    Keepalive,
    /// The last ping on the direct path is unanswered: ping again, or give
    /// the path up.
    PathCheck,
    /// Traffic to the peer has gone unanswered: rescue the path now.
    Silence,
}

/// One remote candidate, as [`PeerPaths::candidates`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CandidateInfo {
    /// The address.
    pub addr: SocketAddr,
    /// Learned from the source of the peer's probes rather than from the
    /// rendezvous.
    pub peer_reflexive: bool,
    /// Smoothed round-trip time of its pings, once one was answered.
    pub rtt: Option<Duration>,
    /// When it last answered a ping.
    pub last_pong: Option<Instant>,
    /// When an authenticated probe from the peer last came from it.
    pub last_received: Option<Instant>,
}

/// Where a remote candidate came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// From the rendezvous (host, server-reflexive or advertised).
    Signalled,
    /// The source address of a ping or pong from the peer.
    PeerReflexive,
}

#[derive(Debug)]
struct Candidate {
    addr: SocketAddr,
    origin: Origin,
    learned_at: Instant,
    /// Start of the current discovery burst and pings sent in it.
    burst_start: Instant,
    burst_sent: usize,
    /// Next ping when this candidate is not the direct path.
    next_ping: Instant,
    last_ping: Option<Instant>,
    /// The last ping to this address is still unanswered.
    awaiting: bool,
    consecutive_pongs: u8,
    srtt: Option<Duration>,
    last_pong: Option<Instant>,
    /// Last time an authenticated probe from the peer came *from* this
    /// address.
    seen_from: Option<Instant>,
    /// While this is the direct path: pings unanswered in a row, and when the
    /// next keepalive is due.
    missed: u8,
    keepalive_due: Instant,
}

impl Candidate {
    fn new(addr: SocketAddr, origin: Origin, now: Instant) -> Self {
        Self {
            addr,
            origin,
            learned_at: now,
            burst_start: now,
            burst_sent: 0,
            next_ping: now,
            last_ping: None,
            awaiting: false,
            consecutive_pongs: 0,
            srtt: None,
            last_pong: None,
            seen_from: None,
            missed: 0,
            keepalive_due: now,
        }
    }

    fn restart_burst(&mut self, now: Instant) {
        self.burst_start = now;
        self.burst_sent = 0;
        self.next_ping = now;
    }

    fn in_burst(&self) -> bool {
        self.burst_sent < BURST.len()
    }
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    tx: TransactionId,
    dst: SocketAddr,
    sent_at: Instant,
}

/// Candidate and path selection state for one peer. See the module docs.
#[derive(Debug)]
pub struct PeerPaths {
    config: PathConfig,
    rng: StdRng,
    candidates: Vec<Candidate>,
    active: Option<SocketAddr>,
    in_flight: Vec<Option<InFlight>>,
    in_flight_next: usize,
    seen_pings: Vec<TransactionId>,
    seen_next: usize,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    observed: Option<SocketAddr>,
    answer_budget: u32,
    answer_budget_at: Option<Instant>,
    /// First traffic sent on the direct path since the peer was last heard.
    unanswered_since: Option<Instant>,
    /// The direct path must prove itself by then (authenticated traffic
    /// from it), or it is given up: set when the peer offered a new session
    /// through the relay (see [`PeerPaths::notify_relayed_handshake`]).
    suspect_until: Option<Instant>,
    /// When the last rescue started.
    last_rescue: Option<Instant>,
}

impl PeerPaths {
    /// A peer with no candidates yet; its path is [`Path::Relay`].
    /// `seed` seeds the transaction ids and jitter (use a random one outside
    /// tests).
    pub fn new(config: PathConfig, seed: u64) -> Self {
        Self {
            config,
            rng: StdRng::seed_from_u64(seed),
            candidates: Vec::with_capacity(MAX_REMOTE_CANDIDATES + MAX_PEER_REFLEXIVE),
            active: None,
            in_flight: Vec::with_capacity(MAX_IN_FLIGHT),
            in_flight_next: 0,
            seen_pings: Vec::with_capacity(SEEN_PINGS),
            seen_next: 0,
            transmits: VecDeque::with_capacity(MAX_QUEUED_TRANSMITS),
            events: VecDeque::with_capacity(4),
            observed: None,
            answer_budget: ANSWER_BURST,
            answer_budget_at: None,
            unanswered_since: None,
            suspect_until: None,
            last_rescue: None,
        }
    }

    /// The current path.
    pub fn path(&self) -> Path {
        self.active.map_or(Path::Relay, Path::Direct)
    }

    /// Smoothed round-trip time of the direct path, if there is one.
    pub fn rtt(&self) -> Option<Duration> {
        let active = self.active?;
        self.candidates.iter().find(|c| c.addr == active)?.srtt
    }

    /// The peer's candidate addresses being probed (signalled and
    /// peer-reflexive), with what is known about each (for `causeway status`).
    pub fn candidates(&self) -> impl Iterator<Item = CandidateInfo> + '_ {
        self.candidates.iter().map(|c| CandidateInfo {
            addr: c.addr,
            peer_reflexive: c.origin == Origin::PeerReflexive,
            rtt: c.srtt,
            last_pong: c.last_pong,
            last_received: c.seen_from,
        })
    }

    /// Our own address as the peer last saw it (from its pongs): our
    /// reflexive address toward this peer.
    pub fn observed_address(&self) -> Option<SocketAddr> {
        self.observed
    }

    /// Replaces the peer's signalled candidates (host, server-reflexive,
    /// advertised; from the rendezvous). Invalid addresses and duplicates are
    /// dropped, and at most [`MAX_REMOTE_CANDIDATES`] kept, in order.
    ///
    /// New addresses are pinged at once. Without a direct path, every
    /// candidate starts a new burst: a fresh candidate list usually means the
    /// peer is probing us right now, and punching a hole needs both sides to
    /// send at the same time.
    pub fn set_remote_candidates(&mut self, now: Instant, addrs: Vec<SocketAddr>) {
        let mut wanted: Vec<SocketAddr> = Vec::with_capacity(MAX_REMOTE_CANDIDATES);
        for addr in addrs {
            if is_valid_candidate(addr)
                && !wanted.contains(&addr)
                && wanted.len() < MAX_REMOTE_CANDIDATES
            {
                wanted.push(addr);
            }
        }
        let active = self.active;
        self.candidates.retain_mut(|c| {
            if wanted.contains(&c.addr) {
                c.origin = Origin::Signalled;
                true
            } else if c.origin == Origin::Signalled && Some(c.addr) == active {
                // No longer signalled but working: keep it as peer-reflexive.
                c.origin = Origin::PeerReflexive;
                true
            } else {
                c.origin == Origin::PeerReflexive
            }
        });
        for addr in wanted {
            if !self.candidates.iter().any(|c| c.addr == addr) {
                self.candidates
                    .push(Candidate::new(addr, Origin::Signalled, now));
            }
        }
        // Keep the peer-reflexive ones within their own cap, oldest out first.
        self.trim_peer_reflexive(0);
        match self.active {
            None => {
                for c in &mut self.candidates {
                    c.restart_burst(now);
                }
            }
            Some(active) => {
                // New candidates often mean the peer's address changed (its
                // NAT rebound): check the direct path now rather than at the
                // next keepalive.
                if let Some(c) = self.candidates.iter_mut().find(|c| c.addr == active)
                    && !c.awaiting
                {
                    c.keepalive_due = now;
                }
            }
        }
        self.ping_due(now);
    }

    /// Handles an authenticated probe from the peer that arrived from `from`.
    pub fn handle_probe(&mut self, now: Instant, from: SocketAddr, probe: Probe) {
        match probe {
            Probe::Ping { tx, .. } => self.handle_ping(now, from, tx),
            Probe::Pong { tx, observed } => self.handle_pong(now, from, tx, observed),
        }
    }

    /// Handles an authenticated ping from the peer: answers it with a pong to
    /// `from`, learns `from` as a peer-reflexive candidate if it is new, and
    /// pings it back (a triggered check). Duplicate and replayed pings are
    /// ignored.
    pub fn handle_ping(&mut self, now: Instant, from: SocketAddr, tx: TransactionId) {
        if self.seen_pings.contains(&tx) {
            return;
        }
        if self.seen_pings.len() < SEEN_PINGS {
            self.seen_pings.push(tx);
        } else {
            self.seen_pings[self.seen_next] = tx;
            self.seen_next = (self.seen_next + 1) % SEEN_PINGS;
        }
        self.mark_seen(now, from);
        // A ping from elsewhere says nothing about the address our traffic
        // goes to (the peer's NAT may have rebound: its pings come from a
        // new address while our traffic goes to the old one).
        if self.active == Some(from) {
            self.unanswered_since = None;
        }
        if !self.take_answer_budget(now) {
            return;
        }
        self.queue(Transmit {
            dst: from,
            probe: Probe::Pong { tx, observed: from },
            ttl: None,
        });
        self.learn(now, from);
    }

    /// Handles an authenticated pong from the peer. Pongs that answer no ping
    /// of ours (unknown, expired or already answered) are ignored.
    pub fn handle_pong(
        &mut self,
        now: Instant,
        from: SocketAddr,
        tx: TransactionId,
        observed: SocketAddr,
    ) {
        let Some(ping) = self.take_in_flight(now, tx) else {
            return;
        };
        if self.active == Some(ping.dst) {
            self.unanswered_since = None;
        }
        self.observed = Some(observed);
        let rtt = now.saturating_duration_since(ping.sent_at);
        let keepalive = self.jitter(self.config.keepalive_interval);
        let Some(c) = self.candidates.iter_mut().find(|c| c.addr == ping.dst) else {
            return;
        };
        c.awaiting = false;
        c.consecutive_pongs = c.consecutive_pongs.saturating_add(1);
        c.last_pong = Some(now);
        c.srtt = Some(match c.srtt {
            None => rtt,
            Some(srtt) => (srtt * 7 + rtt) / 8,
        });
        let addr = c.addr;
        if self.active == Some(addr) {
            c.missed = 0;
            c.keepalive_due = c.keepalive_due.max(ping.sent_at + keepalive);
        }
        // A pong from another address than the one pinged (the peer's NAT
        // maps per destination) is not learned from: answering it would open
        // yet another mapping on a per-destination NAT, and so on. Pings
        // teach us the peer's addresses (see `handle_ping`).
        self.mark_seen(now, from);
        match self.active {
            None => self.activate(now, addr),
            Some(active) if active == addr => {}
            // The direct path stopped answering and this one works.
            Some(_) if self.direct_is_failing() => self.activate(now, addr),
            Some(active) => {
                if self.is_better(now, addr, active) {
                    self.activate(now, addr);
                }
            }
        }
    }

    /// Tells the state machine that an authenticated WireGuard packet from
    /// the peer arrived from `from`. Traffic from the direct path proves it
    /// alive as well as a pong does (pongs can be lost under load).
    ///
    /// Called for every packet: one scan of the candidates, and a random
    /// draw only when a keepalive is rescheduled.
    pub fn notify_traffic_received(&mut self, now: Instant, from: SocketAddr) {
        self.unanswered_since = None;
        if self.active == Some(from) {
            self.suspect_until = None;
        }
        let Some(i) = self.candidates.iter().position(|c| c.addr == from) else {
            return;
        };
        self.candidates[i].seen_from = Some(now);
        if self.active != Some(from) {
            return;
        }
        self.candidates[i].missed = 0;
        if self.candidates[i].awaiting {
            let keepalive = self.jitter(self.config.keepalive_interval);
            let c = &mut self.candidates[i];
            c.awaiting = false;
            c.keepalive_due = c.last_ping.unwrap_or(now) + keepalive;
        }
    }

    /// Tells the state machine that the peer offered a new WireGuard
    /// session through the relay. Either the peer's start-up raced our
    /// probes (it initiated before it knew the direct path), or it
    /// restarted, or another instance with its key took over (a standby
    /// gateway) and the direct path leads to the old one. The direct path
    /// is pinged at once and must answer (or carry authenticated traffic)
    /// within [`SUSPECT_TIMEOUT`] (at least three RTTs), else it is given up:
    /// back to the relay ([`Event::PathChanged`]) and every candidate
    /// probed again, to find the peer where it is now.
    pub fn notify_relayed_handshake(&mut self, now: Instant) {
        let Some(active) = self.active else {
            return;
        };
        let Some(c) = self.candidates.iter_mut().find(|c| c.addr == active) else {
            return;
        };
        let wait = SUSPECT_TIMEOUT.max(c.srtt.unwrap_or_default() * 3);
        if !c.awaiting {
            c.keepalive_due = now;
        }
        self.suspect_until = Some(now + wait);
        self.ping_due(now);
    }

    /// Tells the state machine that a WireGuard packet went to the peer on
    /// the direct path. If nothing authenticated comes back from the peer
    /// within a second (a pong, a ping, traffic), the path is rescued at
    /// once ([`Event::Silent`]) instead of at the next keepalive.
    ///
    /// Called for every packet: a comparison, no allocation.
    pub fn notify_traffic_sent(&mut self, now: Instant) {
        if self.active.is_some() && self.unanswered_since.is_none() {
            self.unanswered_since = Some(now);
        }
    }

    /// Advances timers: sends due pings, rescues a path whose traffic goes
    /// unanswered, declares a silent direct path dead.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire_peer_reflexive(now);
        if self.suspect_until.is_some_and(|at| at <= now) {
            self.fall_back(now);
        }
        if self.rescue_due().is_some_and(|at| at <= now) {
            self.rescue(now);
        }
        self.ping_due(now);
    }

    /// When traffic to the peer will have gone unanswered long enough for a
    /// rescue (at most one per [`RESCUE_INTERVAL`]).
    fn rescue_due(&self) -> Option<Instant> {
        self.active?;
        let since = self.unanswered_since?;
        let at = since + SILENCE;
        Some(match self.last_rescue {
            Some(last) => at.max(last + RESCUE_INTERVAL),
            None => at,
        })
    }

    /// Traffic goes unanswered: ping the direct path now, start a burst on
    /// every other candidate, and tell the driver ([`Event::Silent`]).
    fn rescue(&mut self, now: Instant) {
        self.last_rescue = Some(now);
        self.unanswered_since = None;
        let active = self.active;
        for c in &mut self.candidates {
            if Some(c.addr) == active {
                if !c.awaiting {
                    // The path check runs from now: ping, then every second.
                    c.keepalive_due = now;
                }
            } else {
                c.restart_burst(now);
            }
        }
        self.events.push_back(Event::Silent);
    }

    /// The next probe to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`PeerPaths::handle_timeout`] next, and why. `None` when
    /// there is nothing to probe.
    pub fn poll_timeout(&self) -> Option<(Instant, TimeoutReason)> {
        let rescue = self.rescue_due().map(|at| (at, TimeoutReason::Silence));
        let suspect = self.suspect_until.map(|at| (at, TimeoutReason::PathCheck));
        self.candidates
            .iter()
            .map(|c| self.next_action(c))
            .chain(rescue)
            .chain(suspect)
            .min_by_key(|(at, _)| *at)
    }

    fn next_action(&self, c: &Candidate) -> (Instant, TimeoutReason) {
        if self.active == Some(c.addr) {
            match (c.awaiting, c.last_ping) {
                (true, Some(last)) => (last + PATH_RETRY, TimeoutReason::PathCheck),
                _ => (c.keepalive_due, TimeoutReason::Keepalive),
            }
        } else if c.in_burst() {
            (c.next_ping, TimeoutReason::Discovery)
        } else if self.active.is_some() {
            (c.next_ping, TimeoutReason::Upgrade)
        } else {
            (c.next_ping, TimeoutReason::RelayRetry)
        }
    }

    /// Sends every ping that is due at `now`.
    fn ping_due(&mut self, now: Instant) {
        // The direct path first: it may die, which restarts every burst.
        if let Some(active) = self.active
            && let Some(i) = self.candidates.iter().position(|c| c.addr == active)
        {
            let (at, reason) = self.next_action(&self.candidates[i]);
            if at <= now {
                if reason == TimeoutReason::PathCheck {
                    let c = &mut self.candidates[i];
                    c.missed = c.missed.saturating_add(1);
                    if c.missed >= MAX_MISSED {
                        self.fall_back(now);
                    } else {
                        self.send_ping(now, i, None);
                        // Check the other working addresses too: the first
                        // to answer takes over (see handle_pong).
                        for k in 0..self.candidates.len() {
                            if k != i && self.is_live(&self.candidates[k], now) {
                                self.send_ping(now, k, None);
                            }
                        }
                    }
                } else {
                    self.send_ping(now, i, None);
                    let keepalive = self.jitter(self.config.keepalive_interval);
                    self.candidates[i].keepalive_due = now + keepalive;
                }
            }
        }
        for i in 0..self.candidates.len() {
            let c = &self.candidates[i];
            if self.active == Some(c.addr) || c.next_ping > now {
                continue;
            }
            // The first ping of a burst only opens our NAT (see OPENING_TTL).
            let ttl = (c.burst_sent == 0).then_some(OPENING_TTL);
            self.send_ping(now, i, ttl);
            let interval = match self.active {
                None => self.config.relay_retry_interval,
                // Keep every working address alive, not only the one we
                // send to: the peer may be sending to the NAT mapping that
                // our pings to this candidate hold open.
                Some(_) if self.is_live(&self.candidates[i], now) => self.config.keepalive_interval,
                Some(_) => self.config.upgrade_interval,
            };
            let interval = self.jitter(interval);
            let c = &mut self.candidates[i];
            c.burst_sent += 1;
            c.next_ping = match BURST.get(c.burst_sent) {
                Some(offset) => (c.burst_start + *offset).max(now),
                None => now + interval,
            };
        }
    }

    /// Pings candidate `i`, with IP TTL `ttl` (`None`: the socket's). If
    /// the transmit queue is full the ping is lost, but counted as sent, so
    /// that timers still advance.
    fn send_ping(&mut self, now: Instant, i: usize, ttl: Option<u8>) {
        let tx = TransactionId::random(&mut self.rng);
        let c = &mut self.candidates[i];
        if c.awaiting {
            c.consecutive_pongs = 0;
        }
        c.awaiting = true;
        c.last_ping = Some(now);
        let dst = c.addr;
        let entry = Some(InFlight {
            tx,
            dst,
            sent_at: now,
        });
        if self.in_flight.len() < MAX_IN_FLIGHT {
            self.in_flight.push(entry);
        } else {
            self.in_flight[self.in_flight_next] = entry;
            self.in_flight_next = (self.in_flight_next + 1) % MAX_IN_FLIGHT;
        }
        self.queue(Transmit {
            dst,
            // The driver stamps the counter (its `PingClock`) when encoding.
            probe: Probe::Ping { tx, counter: 0 },
            ttl,
        });
    }

    fn take_in_flight(&mut self, now: Instant, tx: TransactionId) -> Option<InFlight> {
        let slot = self
            .in_flight
            .iter_mut()
            .find(|e| e.is_some_and(|e| e.tx == tx))?;
        let ping = slot.take()?;
        (now.saturating_duration_since(ping.sent_at) <= PING_TTL).then_some(ping)
    }

    fn queue(&mut self, transmit: Transmit) {
        if self.transmits.len() < MAX_QUEUED_TRANSMITS {
            self.transmits.push_back(transmit);
        }
    }

    /// Learns `addr` as a peer-reflexive candidate if it is new, and pings it
    /// now (a triggered check) unless it already answers or was pinged very
    /// recently.
    fn learn(&mut self, now: Instant, addr: SocketAddr) {
        if !is_valid_candidate(addr) {
            return;
        }
        let i = match self.candidates.iter().position(|c| c.addr == addr) {
            Some(i) => i,
            // With a settled direct path, new addresses are answered but not
            // learned: behind NATs that map per destination every ping to a
            // new address opens a new mapping, which the peer would learn in
            // turn, and so on without end.
            None if self.direct_is_settled(now) => return,
            None => {
                if !self.trim_peer_reflexive(1) {
                    return;
                }
                let mut c = Candidate::new(addr, Origin::PeerReflexive, now);
                c.seen_from = Some(now);
                self.candidates.push(c);
                self.candidates.len() - 1
            }
        };
        let c = &self.candidates[i];
        let recently = c
            .last_ping
            .is_some_and(|t| now.saturating_duration_since(t) < TRIGGERED_GAP);
        // A working address keeps its own schedule.
        if self.active == Some(addr) || recently || self.is_live(c, now) {
            return;
        }
        self.send_ping(now, i, None);
        let c = &mut self.candidates[i];
        // The triggered ping counts as the first of a burst for a new
        // candidate; an old one keeps its schedule.
        if c.burst_sent == 0 && c.burst_start == now {
            c.burst_sent = 1;
            c.next_ping = now + BURST[1];
        }
    }

    /// Records that an authenticated probe came from `addr`.
    fn mark_seen(&mut self, now: Instant, addr: SocketAddr) {
        if let Some(c) = self.candidates.iter_mut().find(|c| c.addr == addr) {
            c.seen_from = Some(now);
        }
        if self.active == Some(addr) {
            self.suspect_until = None;
        }
    }

    /// Whether candidate `addr` should replace the direct path `active`:
    /// both need two pongs in a row, then either a clearly lower RTT (30 %
    /// and 1 ms), or a comparable RTT and the peer sends from this address
    /// but not from the current one.
    ///
    /// The second rule matters behind NATs that map per destination: the
    /// peer's server-reflexive address there is a mapping toward the STUN
    /// server that only STUN refreshes, while an address the peer sends from
    /// is a mapping its own probes keep open.
    fn is_better(&self, now: Instant, addr: SocketAddr, active: SocketAddr) -> bool {
        let find = |a: SocketAddr| self.candidates.iter().find(|c| c.addr == a);
        let (Some(c), Some(current)) = (find(addr), find(active)) else {
            return false;
        };
        let (Some(srtt), Some(current_srtt)) = (c.srtt, current.srtt) else {
            return false;
        };
        if c.consecutive_pongs < 2 {
            return false;
        }
        let faster =
            srtt * 10 < current_srtt * 7 && current_srtt - srtt >= Duration::from_millis(1);
        let comparable = srtt <= current_srtt * 3 / 2 + Duration::from_millis(5);
        let peer_sends_here =
            self.is_recent(c.seen_from, now) && !self.is_recent(current.seen_from, now);
        faster || (comparable && peer_sends_here)
    }

    /// Whether `c` answered a ping recently enough to count as working.
    fn is_live(&self, c: &Candidate, now: Instant) -> bool {
        self.is_recent(c.last_pong, now)
    }

    /// Whether the direct path answers its pings and the peer sends from
    /// it: then it needs nothing better.
    fn direct_is_settled(&self, now: Instant) -> bool {
        !self.rescuing()
            && self
                .active
                .and_then(|a| self.candidates.iter().find(|c| c.addr == a))
                .is_some_and(|c| c.missed == 0 && self.is_recent(c.seen_from, now))
    }

    /// Whether a rescue ([`Event::Silent`]) started and the direct path has
    /// not been heard from since: then any address the peer reaches us
    /// from is worth learning, and the first to answer takes over.
    fn rescuing(&self) -> bool {
        let Some(rescue) = self.last_rescue else {
            return false;
        };
        self.active
            .and_then(|a| self.candidates.iter().find(|c| c.addr == a))
            .is_some_and(|c| {
                c.last_pong.is_none_or(|t| t < rescue) && c.seen_from.is_none_or(|t| t < rescue)
            })
    }

    /// Whether `t` is within three keepalive intervals of `now`.
    fn is_recent(&self, t: Option<Instant>, now: Instant) -> bool {
        t.is_some_and(|t| now.saturating_duration_since(t) < self.config.keepalive_interval * 3)
    }

    /// Whether the direct path has missed at least one ping, or is being
    /// rescued.
    fn direct_is_failing(&self) -> bool {
        self.rescuing()
            || self
                .active
                .and_then(|a| self.candidates.iter().find(|c| c.addr == a))
                .is_some_and(|c| c.missed > 0)
    }

    /// Makes room for `room` more peer-reflexive candidates by forgetting the
    /// oldest ones that are not the direct path; false if that is impossible.
    fn trim_peer_reflexive(&mut self, room: usize) -> bool {
        loop {
            let count = self
                .candidates
                .iter()
                .filter(|c| c.origin == Origin::PeerReflexive)
                .count();
            if count + room <= MAX_PEER_REFLEXIVE {
                return true;
            }
            let oldest = self
                .candidates
                .iter()
                .enumerate()
                .filter(|(_, c)| c.origin == Origin::PeerReflexive && Some(c.addr) != self.active)
                .min_by_key(|(_, c)| c.last_pong.unwrap_or(c.learned_at))
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    self.candidates.remove(i);
                }
                None => return false,
            }
        }
    }

    fn expire_peer_reflexive(&mut self, now: Instant) {
        let active = self.active;
        self.candidates.retain(|c| {
            c.origin != Origin::PeerReflexive
                || Some(c.addr) == active
                || now.saturating_duration_since(c.last_pong.unwrap_or(c.learned_at))
                    < PEER_REFLEXIVE_TTL
        });
    }

    fn activate(&mut self, now: Instant, addr: SocketAddr) {
        let keepalive = self.jitter(self.config.keepalive_interval);
        if let Some(previous) = self.active
            && let Some(c) = self.candidates.iter_mut().find(|c| c.addr == previous)
        {
            // Still pinged at the keepalive rate while it answers (the peer
            // may be sending to the mapping these pings keep open).
            c.next_ping = c.last_ping.map_or(now, |t| (t + keepalive).max(now));
            c.burst_sent = BURST.len();
        }
        if let Some(c) = self.candidates.iter_mut().find(|c| c.addr == addr) {
            c.missed = 0;
            c.keepalive_due = c.last_ping.unwrap_or(now) + keepalive;
        }
        self.active = Some(addr);
        self.suspect_until = None;
        self.events
            .push_back(Event::PathChanged(Path::Direct(addr)));
    }

    /// The direct path died: back to the relay, rediscover everything.
    fn fall_back(&mut self, now: Instant) {
        self.active = None;
        self.suspect_until = None;
        for c in &mut self.candidates {
            c.restart_burst(now);
            c.awaiting = false;
            c.consecutive_pongs = 0;
            c.missed = 0;
        }
        self.events.push_back(Event::PathChanged(Path::Relay));
    }

    /// `d` shortened by a random 0..20 %.
    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(self.rng.gen_range(0.8..=1.0))
    }

    fn take_answer_budget(&mut self, now: Instant) -> bool {
        let last = *self.answer_budget_at.get_or_insert(now);
        let elapsed = now.saturating_duration_since(last);
        let refill =
            u32::try_from(elapsed.as_millis() * u128::from(ANSWER_RATE) / 1000).unwrap_or(u32::MAX);
        if refill > 0 {
            self.answer_budget = self.answer_budget.saturating_add(refill).min(ANSWER_BURST);
            self.answer_budget_at = Some(now);
        }
        if self.answer_budget == 0 {
            return false;
        }
        self.answer_budget -= 1;
        true
    }
}

/// Builds this site's candidate list to hand to the rendezvous: advertised
/// endpoints first, then server-reflexive addresses (from STUN), then host
/// addresses; invalid addresses and duplicates dropped, at most
/// [`MAX_REMOTE_CANDIDATES`].
pub fn local_candidates(
    advertised: &[SocketAddr],
    server_reflexive: &[SocketAddr],
    host: &[SocketAddr],
) -> Vec<SocketAddr> {
    let mut out = Vec::with_capacity(MAX_REMOTE_CANDIDATES);
    for &addr in advertised.iter().chain(server_reflexive).chain(host) {
        if is_valid_candidate(addr) && !out.contains(&addr) && out.len() < MAX_REMOTE_CANDIDATES {
            out.push(addr);
        }
    }
    out
}

/// Whether `addr` can be a peer's address on the internet or a LAN: not
/// port 0, and not an unspecified, loopback, link-local, multicast or
/// broadcast address (IPv4-mapped IPv6 judged as the IPv4 address). A
/// rendezvous that hands out such addresses (malicious or confused) would
/// make the site probe itself or its own link.
pub fn is_valid_candidate(addr: SocketAddr) -> bool {
    let ip = addr.ip().to_canonical();
    let bad = match ip {
        std::net::IpAddr::V4(v4) => {
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                // 0.0.0.0/8: "this network", never a destination.
                || v4.octets()[0] == 0
        }
        std::net::IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_unicast_link_local()
                || v6.is_multicast()
        }
    };
    addr.port() != 0 && !bad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn drain(p: &mut PeerPaths) -> Vec<Transmit> {
        std::iter::from_fn(|| p.poll_transmit()).collect()
    }

    fn pings_to(transmits: &[Transmit], dst: SocketAddr) -> Vec<TransactionId> {
        transmits
            .iter()
            .filter(|t| t.dst == dst)
            .filter_map(|t| match t.probe {
                Probe::Ping { tx, .. } => Some(tx),
                Probe::Pong { .. } => None,
            })
            .collect()
    }

    #[test]
    fn new_candidates_are_pinged_at_once_in_a_burst() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 1);
        assert_eq!(p.poll_timeout(), None);
        let (a, b) = (addr("192.0.2.1:1000"), addr("10.0.0.1:51820"));
        p.set_remote_candidates(t0, vec![a, b, a, addr("0.0.0.0:5")]);
        let sent = drain(&mut p);
        assert_eq!(sent.len(), 2);
        assert_eq!(pings_to(&sent, a).len(), 1);
        assert_eq!(
            p.poll_timeout(),
            Some((t0 + BURST[1], TimeoutReason::Discovery))
        );
        // Walk the burst: one ping per candidate at each offset.
        let mut times = Vec::new();
        while let Some((at, TimeoutReason::Discovery)) = p.poll_timeout() {
            p.handle_timeout(at);
            assert_eq!(drain(&mut p).len(), 2);
            times.push(at - t0);
        }
        assert_eq!(times, BURST[1..].to_vec());
        let (at, reason) = p.poll_timeout().unwrap();
        assert_eq!(reason, TimeoutReason::RelayRetry);
        assert!(at - (t0 + BURST[5]) <= Duration::from_secs(10));
        assert_eq!(p.path(), Path::Relay);
    }

    #[test]
    fn a_relayed_handshake_gives_up_the_direct_path_and_probes_anew() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 3);
        let a = addr("192.0.2.1:1000");
        p.set_remote_candidates(t0, vec![a]);
        let tx = pings_to(&drain(&mut p), a)[0];
        p.handle_pong(t0, a, tx, addr("198.51.100.1:2"));
        assert_eq!(p.poll_event(), Some(Event::PathChanged(Path::Direct(a))));

        // A relayed handshake while the direct path works (the peer's
        // start-up raced our probes): the path is pinged at once, answers,
        // and stays.
        let t1 = t0 + Duration::from_secs(5);
        p.notify_relayed_handshake(t1);
        let tx = pings_to(&drain(&mut p), a)[0];
        p.handle_pong(t1 + Duration::from_millis(1), a, tx, addr("198.51.100.1:2"));
        p.handle_timeout(t1 + SUSPECT_TIMEOUT);
        assert_eq!(p.path(), Path::Direct(a));
        assert_eq!(p.poll_event(), None);

        // One when the direct path leads to a dead instance: no answer
        // within SUSPECT_TIMEOUT, back to the relay, every candidate
        // probed again, and the first pong makes a direct path again.
        let t2 = t1 + Duration::from_secs(5);
        p.notify_relayed_handshake(t2);
        assert_eq!(pings_to(&drain(&mut p), a).len(), 1);
        let (at, reason) = p.poll_timeout().unwrap();
        assert_eq!(
            (at, reason),
            (t2 + SUSPECT_TIMEOUT, TimeoutReason::PathCheck)
        );
        p.handle_timeout(at);
        assert_eq!(p.path(), Path::Relay);
        assert_eq!(p.poll_event(), Some(Event::PathChanged(Path::Relay)));
        let tx = pings_to(&drain(&mut p), a)[0];
        p.handle_pong(at, a, tx, addr("198.51.100.1:2"));
        assert_eq!(p.poll_event(), Some(Event::PathChanged(Path::Direct(a))));

        // Without a direct path it changes nothing.
        let mut q = PeerPaths::new(PathConfig::default(), 4);
        q.notify_relayed_handshake(t1);
        assert_eq!(q.poll_event(), None);
        assert_eq!(q.poll_timeout(), None);
    }

    #[test]
    fn first_pong_makes_a_direct_path_and_silence_falls_back() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 2);
        let a = addr("192.0.2.1:1000");
        p.set_remote_candidates(t0, vec![a]);
        let tx = pings_to(&drain(&mut p), a)[0];
        // A pong for an unknown transaction changes nothing.
        p.handle_pong(t0, a, TransactionId([9; 12]), addr("198.51.100.1:2"));
        assert_eq!(p.path(), Path::Relay);
        let t1 = t0 + Duration::from_millis(40);
        p.handle_pong(t1, a, tx, addr("198.51.100.1:2"));
        assert_eq!(p.path(), Path::Direct(a));
        assert_eq!(p.poll_event(), Some(Event::PathChanged(Path::Direct(a))));
        assert_eq!(p.rtt(), Some(Duration::from_millis(40)));
        assert_eq!(p.observed_address(), Some(addr("198.51.100.1:2")));
        // The same pong again is ignored.
        p.handle_pong(t1, a, tx, addr("198.51.100.1:2"));
        assert_eq!(p.poll_event(), None);
        // Keepalives, answered, keep it up for a minute.
        let mut now = t1;
        while now < t0 + Duration::from_secs(60) {
            let (at, reason) = p.poll_timeout().unwrap();
            assert_eq!(reason, TimeoutReason::Keepalive);
            now = at;
            p.handle_timeout(now);
            for tx in pings_to(&drain(&mut p), a) {
                p.handle_pong(
                    now + Duration::from_millis(40),
                    a,
                    tx,
                    addr("198.51.100.1:2"),
                );
            }
        }
        assert_eq!(p.poll_event(), None);
        // Silence: a keepalive, then retries every second, then relay.
        let broken_at = now;
        let mut pings = 0;
        while p.path() != Path::Relay {
            let (at, _) = p.poll_timeout().unwrap();
            now = at;
            p.handle_timeout(now);
            pings += pings_to(&drain(&mut p), a).len();
        }
        assert_eq!(
            pings,
            usize::from(MAX_MISSED) + 1,
            "keepalive + retries, then the restarted burst"
        );
        assert!(
            now - broken_at <= Duration::from_secs(5) + Duration::from_secs(u64::from(MAX_MISSED))
        );
        assert_eq!(p.poll_event(), Some(Event::PathChanged(Path::Relay)));
        assert_eq!(p.poll_timeout().unwrap().1, TimeoutReason::Discovery);
    }

    #[test]
    fn traffic_from_the_direct_path_counts_as_alive() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 3);
        let a = addr("192.0.2.1:1000");
        p.set_remote_candidates(t0, vec![a]);
        let tx = pings_to(&drain(&mut p), a)[0];
        p.handle_pong(t0, a, tx, a);
        let mut now = t0;
        // Pongs never come back, but WireGuard traffic does.
        while now < t0 + Duration::from_secs(120) {
            let (at, _) = p.poll_timeout().unwrap();
            now = at;
            p.handle_timeout(now);
            drain(&mut p);
            p.notify_traffic_received(now + Duration::from_millis(500), a);
        }
        assert_eq!(p.path(), Path::Direct(a));
    }

    #[test]
    fn a_clearly_faster_candidate_takes_over() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 4);
        let (slow, fast) = (addr("192.0.2.1:1000"), addr("10.0.0.1:51820"));
        p.set_remote_candidates(t0, vec![slow, fast]);
        let mut now = t0;
        let mut paths = Vec::new();
        for _ in 0..4 {
            let sent = drain(&mut p);
            for tx in pings_to(&sent, slow) {
                p.handle_pong(now + Duration::from_millis(80), slow, tx, slow);
            }
            for tx in pings_to(&sent, fast) {
                p.handle_pong(now + Duration::from_millis(5), fast, tx, fast);
            }
            while let Some(Event::PathChanged(path)) = p.poll_event() {
                paths.push(path);
            }
            now = p.poll_timeout().unwrap().0;
            p.handle_timeout(now);
        }
        // The first pong wins; the faster one (after two pongs) replaces it.
        assert_eq!(paths, vec![Path::Direct(slow), Path::Direct(fast)]);
        assert!(p.rtt().unwrap() < Duration::from_millis(10));
    }

    #[test]
    fn a_silent_direct_path_fails_over_to_another_working_address() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 8);
        let (a, b) = (addr("192.0.2.1:1000"), addr("192.0.2.1:2000"));
        p.set_remote_candidates(t0, vec![a, b]);
        // Both answer (same RTT) for a while; `a` answered first.
        let mut now = t0;
        let mut a_alive = true;
        let mut paths = Vec::new();
        while now < t0 + Duration::from_secs(40) {
            if now > t0 + Duration::from_secs(20) {
                a_alive = false;
            }
            let sent = drain(&mut p);
            let reply = now + Duration::from_millis(30);
            for tx in pings_to(&sent, a).into_iter().filter(|_| a_alive) {
                p.handle_pong(reply, a, tx, a);
            }
            for tx in pings_to(&sent, b) {
                p.handle_pong(reply, b, tx, b);
            }
            while let Some(Event::PathChanged(path)) = p.poll_event() {
                paths.push((now - t0, path));
            }
            now = p.poll_timeout().unwrap().0;
            p.handle_timeout(now);
        }
        // Straight from `a` to `b`, never through the relay, within about
        // a keepalive interval plus a second or two of silence.
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert_eq!(paths[0].1, Path::Direct(a));
        assert_eq!(paths[1].1, Path::Direct(b));
        assert!(paths[1].0 < Duration::from_secs(20 + 5 + 3), "{paths:?}");
    }

    #[test]
    fn a_burst_opens_our_nat_with_a_short_ttl_then_pings_for_real() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 3);
        let a = addr("198.51.100.1:51820");
        p.set_remote_candidates(t0, vec![a]);
        let ttls = |sent: Vec<Transmit>| sent.iter().map(|t| t.ttl).collect::<Vec<_>>();
        assert_eq!(ttls(drain(&mut p)), vec![Some(OPENING_TTL)]);
        p.handle_timeout(t0 + BURST[1]);
        assert_eq!(ttls(drain(&mut p)), vec![None]);
        // A new list without a direct path restarts the burst: opening again.
        p.set_remote_candidates(t0 + BURST[2], vec![a]);
        assert_eq!(ttls(drain(&mut p)), vec![Some(OPENING_TTL)]);
    }

    #[test]
    fn pings_are_answered_and_teach_peer_reflexive_candidates() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 5);
        let from = addr("198.51.100.2:40000");
        p.handle_ping(t0, from, TransactionId([1; 12]));
        let sent = drain(&mut p);
        assert_eq!(
            sent[0],
            Transmit {
                dst: from,
                probe: Probe::Pong {
                    tx: TransactionId([1; 12]),
                    observed: from
                },
                ttl: None,
            }
        );
        assert_eq!(pings_to(&sent, from).len(), 1, "triggered check");
        assert_eq!(
            p.candidates().map(|c| c.addr).collect::<Vec<_>>(),
            vec![from]
        );
        // A replay is ignored entirely.
        p.handle_ping(t0, addr("203.0.113.9:1"), TransactionId([1; 12]));
        assert!(drain(&mut p).is_empty());
        // Peer-reflexive candidates are capped; unconfirmed ones expire.
        for i in 0..20u8 {
            p.handle_ping(
                t0,
                SocketAddr::from(([198, 51, 100, 3], 1000 + u16::from(i))),
                TransactionId([i + 2; 12]),
            );
        }
        assert_eq!(p.candidates().count(), MAX_PEER_REFLEXIVE);
        p.handle_timeout(t0 + PEER_REFLEXIVE_TTL);
        assert_eq!(p.candidates().count(), 0);
    }

    #[test]
    fn answers_are_rate_limited_and_queues_bounded() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 6);
        let from = addr("198.51.100.2:40000");
        for i in 0..1000u32 {
            let mut tx = [0u8; 12];
            tx[..4].copy_from_slice(&i.to_be_bytes());
            p.handle_ping(t0, from, TransactionId(tx));
        }
        let pongs = drain(&mut p)
            .iter()
            .filter(|t| matches!(t.probe, Probe::Pong { .. }))
            .count();
        assert!(pongs <= ANSWER_BURST as usize);
        let many: Vec<SocketAddr> = (0..100)
            .map(|i| SocketAddr::from(([192, 0, 2, 1], 1000 + i)))
            .collect();
        p.set_remote_candidates(t0, many);
        assert!(p.candidates().count() <= MAX_REMOTE_CANDIDATES + MAX_PEER_REFLEXIVE);
        assert!(drain(&mut p).len() <= MAX_QUEUED_TRANSMITS);
    }

    #[test]
    fn new_candidate_list_keeps_a_working_path() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 7);
        let (a, b) = (addr("192.0.2.1:1000"), addr("192.0.2.1:2000"));
        p.set_remote_candidates(t0, vec![a]);
        let tx = pings_to(&drain(&mut p), a)[0];
        p.handle_pong(t0, a, tx, a);
        p.set_remote_candidates(t0, vec![b]);
        assert_eq!(p.path(), Path::Direct(a));
        let sent = drain(&mut p);
        assert_eq!(pings_to(&sent, b).len(), 1);
        assert_eq!(
            pings_to(&sent, a).len(),
            1,
            "the direct path is checked at once"
        );
    }

    #[test]
    fn unanswered_traffic_is_rescued_after_a_second_not_at_the_keepalive() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 10);
        let (a, b) = (addr("192.0.2.1:1000"), addr("192.0.2.1:2000"));
        p.set_remote_candidates(t0, vec![a, b]);
        let tx = pings_to(&drain(&mut p), a)[0];
        p.handle_pong(t0, a, tx, a);
        assert_eq!(p.poll_event(), Some(Event::PathChanged(Path::Direct(a))));
        // Let the discovery bursts end, with traffic answered.
        let mut now = t0;
        while now < t0 + Duration::from_secs(4) + BURST[5] {
            now += Duration::from_millis(20);
            p.notify_traffic_sent(now);
            p.notify_traffic_received(now, a);
            if p.poll_timeout().is_some_and(|(at, _)| at <= now) {
                p.handle_timeout(now);
            }
        }
        drain(&mut p);
        // Traffic keeps going out; nothing comes back (a ping from another
        // address of the peer does not count).
        let silent_from = now;
        p.notify_traffic_sent(now);
        p.handle_ping(now, b, TransactionId([3; 12]));
        drain(&mut p);
        // Timers run (a keepalive may come first, unanswered); the rescue
        // comes a second after the traffic, not at the next keepalive.
        let mut sent = Vec::new();
        let at = loop {
            let (at, reason) = p.poll_timeout().unwrap();
            assert!(
                at <= silent_from + SILENCE,
                "{reason:?} at {:?}",
                at - silent_from
            );
            p.handle_timeout(at);
            sent.extend(drain(&mut p));
            if reason == TimeoutReason::Silence {
                break at;
            }
        };
        assert_eq!(at, silent_from + SILENCE);
        assert_eq!(p.poll_event(), Some(Event::Silent));
        assert_eq!(pings_to(&sent, a).len(), 1, "direct path checked");
        assert!(!pings_to(&sent, b).is_empty(), "every candidate pinged");
        // A one-way stream: the path answers, the peer sends nothing. At
        // most one rescue per RESCUE_INTERVAL.
        let mut rescues = 1;
        let mut now = at;
        while now < at + Duration::from_secs(30) {
            now += Duration::from_millis(20);
            p.notify_traffic_sent(now);
            if p.poll_timeout().is_some_and(|(t, _)| t <= now) {
                p.handle_timeout(now);
            }
            for t in drain(&mut p) {
                if let Probe::Ping { tx, .. } = t.probe {
                    p.handle_pong(now, t.dst, tx, t.dst);
                }
            }
            while let Some(e) = p.poll_event() {
                rescues += usize::from(e == Event::Silent);
            }
        }
        assert!(rescues <= 4, "{rescues} rescues in 30 s");
        assert!(matches!(p.path(), Path::Direct(_)));
    }

    #[test]
    fn addresses_that_are_no_peer_are_never_candidates() {
        for bad in [
            "0.0.0.0:51820",
            "0.1.2.3:51820",
            "127.0.0.1:51820",
            "127.9.9.9:51820",
            "169.254.1.1:51820",
            "224.0.0.1:51820",
            "239.1.2.3:51820",
            "255.255.255.255:51820",
            "192.0.2.1:0",
            "[::]:51820",
            "[::1]:51820",
            "[fe80::1]:51820",
            "[ff02::1]:51820",
            "[::ffff:127.0.0.1]:51820",
            "[::ffff:169.254.0.1]:51820",
        ] {
            assert!(!is_valid_candidate(addr(bad)), "{bad}");
        }
        for good in ["192.0.2.1:1", "10.0.0.1:51820", "[2001:db8::1]:51820"] {
            assert!(is_valid_candidate(addr(good)), "{good}");
        }
        // A malicious rendezvous cannot make the site probe them.
        let t0 = Instant::now();
        let mut p = PeerPaths::new(PathConfig::default(), 9);
        p.set_remote_candidates(
            t0,
            vec![
                addr("127.0.0.1:51820"),
                addr("169.254.1.1:51820"),
                addr("255.255.255.255:51820"),
                addr("[ff02::1]:51820"),
            ],
        );
        assert!(drain(&mut p).is_empty());
        assert_eq!(p.candidates().count(), 0);
    }

    #[test]
    fn local_candidate_order() {
        let list = local_candidates(
            &[addr("203.0.113.5:51820")],
            &[addr("198.51.100.1:40000"), addr("203.0.113.5:51820")],
            &[addr("10.0.0.2:51820"), addr("0.0.0.0:51820")],
        );
        assert_eq!(
            list,
            vec![
                addr("203.0.113.5:51820"),
                addr("198.51.100.1:40000"),
                addr("10.0.0.2:51820")
            ]
        );
    }
}
