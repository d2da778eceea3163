//! The site's side of the rendezvous protocol, without I/O.
//!
//! One [`ClientSession`] per rendezvous. The driver (client.rs) dials when
//! asked, and feeds it what happens: the connection and its control stream
//! are open ([`ClientSession::connected`]), bytes arrived on the control
//! stream, a datagram arrived, the connection was lost, the site changed
//! its candidates or peers, and the clock. The session says what to do
//! ([`ClientSession::poll_transmit`]: dial, write these bytes, close), what
//! to tell the site ([`ClientSession::poll_event`]) and when to wake it up
//! and why ([`ClientSession::poll_timeout`]). Every input that depends on
//! time takes `now`; the random generator (backoff jitter, the first relay
//! packet id) is seeded by the caller.
//!
//! Rules (docs/rendezvous.md):
//! - `hello` goes out as soon as the control stream is open; peers and
//!   candidates (`register`) only once the rendezvous proved the pinned key
//!   in `welcome`, and again whenever the site changes either. Changes made
//!   while not registered are kept and sent with the next `register`.
//! - One attempt (QUIC handshake and authentication) may take
//!   [`CONNECT_TIMEOUT`]. A failed attempt, or a lost connection, is retried
//!   after a backoff of [`MIN_BACKOFF`] doubling to [`MAX_BACKOFF`], ±25 %
//!   jitter; a connection that lasted [`STABLE`] resets it, a rejection only
//!   an operator can fix sets it to its maximum.
//! - When a registered connection ends, every peer online through it goes
//!   offline (one `PeerUpdate` each, in key order), then `Disconnected`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tracing::{debug, error, info, warn};
use x25519_dalek::PublicKey;

use super::auth::{AuthKey, Exporter, Role};
use super::proto::{
    CloseCode, FrameDecoder, PROTOCOL_VERSION, RendezvousMessage, SiteMessage, Wire32, encode_frame,
};
use super::relay::{self, FragmentError, Reassembler};
use super::tls::TlsError;
use crate::udp_relay::{RelayPort, RelayToken};
use causeway_common::keys;

/// How long one connection attempt (QUIC handshake plus authentication)
/// may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// First reconnect delay; doubles up to [`MAX_BACKOFF`].
pub(crate) const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that lasted this long resets the backoff.
pub(crate) const STABLE: Duration = Duration::from_secs(10);

/// What the rendezvous tells the site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RendezvousEvent {
    /// Authenticated and registered (again). `observed` is the address the
    /// rendezvous sees this client's QUIC socket at; it is *not* the
    /// WireGuard socket's server-reflexive address (a different socket),
    /// only a hint about the NAT in front of the site.
    Connected {
        /// The QUIC socket's address as the rendezvous sees it.
        observed: SocketAddr,
    },
    /// A peer that lists this site (and that this site lists) came online,
    /// changed its candidates, or went offline. While offline (or while
    /// this client is disconnected) it cannot be relayed to through this
    /// rendezvous.
    PeerUpdate {
        /// The peer's WireGuard public key.
        peer: PublicKey,
        /// Its candidates (empty when offline).
        candidates: Vec<SocketAddr>,
        /// Whether it is connected to this rendezvous.
        online: bool,
    },
    /// The rendezvous granted this site and `peer` a relay port (a UDP
    /// relay, see [`crate::udp_relay`]), or took it back (`None`: the peer
    /// went offline, or this connection ended). Follows the `PeerUpdate`
    /// that carried it; sent only when it changes.
    RelayPort {
        /// The peer's WireGuard public key.
        peer: PublicKey,
        /// The port and this site's token, while granted.
        port: Option<RelayPort>,
    },
    /// A WireGuard packet relayed from a peer (reassembled).
    Relayed {
        /// The sending peer.
        from: PublicKey,
        /// The packet, byte for byte as the peer sent it.
        packet: Vec<u8>,
    },
    /// The connection dropped (every peer learned through it went offline:
    /// a `PeerUpdate` was emitted for each first), or an attempt to
    /// reconnect failed. The client keeps reconnecting with backoff by
    /// itself.
    Disconnected {
        /// Why, for logs.
        reason: String,
    },
}

/// Why connecting to a rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The local UDP socket or QUIC endpoint could not be set up.
    #[error("cannot open a local socket for rendezvous {server}: {source}")]
    Local {
        /// The rendezvous.
        server: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// TLS configuration failed (never expected).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The pinned rendezvous key is a low-order point, not a real key.
    #[error(
        "the pinned public key of rendezvous {server} is not a usable X25519 key; copy the key the rendezvous logs at start"
    )]
    UnusableKey {
        /// The rendezvous.
        server: SocketAddr,
    },
    /// No QUIC connection could be made.
    #[error("cannot reach rendezvous {server}: {reason}")]
    Unreachable {
        /// The rendezvous.
        server: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The rendezvous does not list this site's key, or this site's proof
    /// did not verify (the rendezvous does not say which).
    #[error(
        "rendezvous {server} rejected this site: unknown site key {site_key} or bad proof; ask its operator to add this key as a [[site]]"
    )]
    UnknownSiteKey {
        /// The rendezvous.
        server: SocketAddr,
        /// This site's public key.
        site_key: String,
    },
    /// The rendezvous could not verify this site's proof.
    #[error("rendezvous {server} rejected this site: bad proof ({message})")]
    BadProof {
        /// The rendezvous.
        server: SocketAddr,
        /// What the rendezvous said.
        message: String,
    },
    /// The server is not the rendezvous whose key was pinned: it said so, or
    /// it could not prove the pinned key (a different server, or a man in
    /// the middle).
    #[error(
        "wrong rendezvous key for {server}: {detail}; check the public_key pinned for this rendezvous"
    )]
    WrongRendezvousKey {
        /// The rendezvous.
        server: SocketAddr,
        /// What happened.
        detail: String,
    },
    /// The rendezvous refused for another reason (version, timeout…).
    #[error("rendezvous {server} closed the connection: {code}: {message}")]
    Rejected {
        /// The rendezvous.
        server: SocketAddr,
        /// The close code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The rendezvous broke the protocol.
    #[error("rendezvous {server} broke the protocol: {reason}")]
    Protocol {
        /// The rendezvous.
        server: SocketAddr,
        /// What it did.
        reason: String,
    },
}

impl ConnectError {
    /// Whether retrying soon is pointless until an operator changes a
    /// configuration (the retry backoff goes to its maximum).
    fn needs_operator(&self) -> bool {
        matches!(
            self,
            Self::UnusableKey { .. }
                | Self::UnknownSiteKey { .. }
                | Self::BadProof { .. }
                | Self::WrongRendezvousKey { .. }
        )
    }

    /// The code and reason this site closes the connection with after it.
    fn close(&self) -> (CloseCode, &'static str) {
        match self {
            Self::WrongRendezvousKey { .. } => (
                CloseCode::WrongRendezvousKey,
                "the rendezvous did not prove the pinned key",
            ),
            Self::Protocol { .. } => (CloseCode::Protocol, "protocol error"),
            _ => (CloseCode::Normal, "giving up"),
        }
    }
}

/// Why a packet could not be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// Not connected to the rendezvous right now.
    #[error("not connected to the rendezvous")]
    NotConnected,
    /// The peer is not online at this rendezvous (or does not list this site).
    #[error("peer is not reachable through this rendezvous")]
    PeerUnavailable,
    /// The rendezvous connection does not carry datagrams.
    #[error("the rendezvous connection does not carry datagrams")]
    DatagramsUnsupported,
    /// The packet cannot be fragmented.
    #[error(transparent)]
    Fragment(#[from] FragmentError),
    /// The connection refused the datagram.
    #[error("relay send failed: {0}")]
    Send(String),
}

/// Counters of one client.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    /// Packets handed to the relay.
    pub relay_tx_packets: u64,
    /// Bytes of those packets.
    pub relay_tx_bytes: u64,
    /// Datagrams those packets took (more than packets when fragmented).
    pub relay_tx_datagrams: u64,
    /// Relayed packets received whole.
    pub relay_rx_packets: u64,
    /// Bytes of those packets.
    pub relay_rx_bytes: u64,
    /// Partly received packets dropped (fragments missing after 1 s, or the
    /// reassembly table full).
    pub relay_incomplete: u64,
    /// Relay datagrams dropped as malformed or from an unknown peer.
    pub relay_malformed: u64,
    /// Relayed packets dropped because the caller did not take events fast
    /// enough.
    pub events_dropped: u64,
    /// Connections established (1 + reconnects).
    pub connections: u64,
}

/// What the session asks the driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transmit {
    /// Dial the rendezvous: a QUIC connection and its control stream; then
    /// report [`ClientSession::connected`] or
    /// [`ClientSession::connection_lost`].
    Connect,
    /// Write these bytes on the control stream.
    Stream(Vec<u8>),
    /// Close the connection (or give up dialling) with this code and
    /// reason, and drop it. Nothing more is read from it.
    Close {
        /// The QUIC application close code.
        code: CloseCode,
        /// The reason sent with it.
        reason: &'static str,
    },
}

/// Why [`ClientSession::poll_timeout`] wants to be woken up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum TimeoutReason {
    /// Time to dial the rendezvous (again).
    Reconnect,
    /// The attempt in progress (QUIC handshake and authentication) is out
    /// of time.
    ConnectTimeout,
    /// A partly reassembled relay packet is out of time.
    ExpireFragments,
}

/// How a connection ended, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lost {
    /// The application close code and reason, when the rendezvous closed
    /// the connection itself.
    pub(crate) closed_by_rendezvous: Option<(u64, String)>,
    /// The error in words, for logs.
    pub(crate) description: String,
}

/// Where a relayed packet goes: the peer's relay id and this packet's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RelayTarget {
    pub(crate) relay_id: u32,
    pub(crate) packet_id: u32,
}

/// Exponential backoff with jitter.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: MIN_BACKOFF }
    }

    fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }

    fn max_out(&mut self) {
        self.next = MAX_BACKOFF;
    }

    /// The delay before the next attempt (±25% jitter).
    fn delay(&mut self, rng: &mut StdRng) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        base.mul_f64(rng.gen_range(0.75..1.25))
    }
}

#[derive(Debug)]
enum State {
    /// No connection; the next attempt is due at `at`.
    Waiting { at: Instant },
    /// The driver is dialling (QUIC handshake, control stream).
    Dialling { deadline: Instant },
    /// `hello` sent; waiting for `welcome`.
    Authenticating {
        deadline: Instant,
        exporter: Exporter,
    },
    /// Authenticated and registered since `since`.
    Registered { since: Instant },
}

/// The site's session with one rendezvous, across reconnects.
pub(crate) struct ClientSession {
    server: SocketAddr,
    pinned: PublicKey,
    site_public: PublicKey,
    auth_key: AuthKey,
    rng: StdRng,
    backoff: Backoff,
    state: State,
    /// What `register` carries: always the latest the site gave.
    peers: Vec<PublicKey>,
    candidates: Vec<SocketAddr>,
    /// A `register` is owed to the rendezvous (sent once registered).
    register_due: bool,
    decoder: FrameDecoder,
    observed: Option<SocketAddr>,
    /// Online peers: key → relay id, and back.
    online: BTreeMap<[u8; 32], u32>,
    by_relay: HashMap<u32, [u8; 32]>,
    /// Relay ports granted, by peer.
    relay_ports: HashMap<[u8; 32], RelayPort>,
    next_packet_id: u32,
    reassembler: Reassembler,
    /// The counters this session keeps (received relay traffic,
    /// connections); the driver adds what it sent.
    stats: ClientStats,
    transmits: VecDeque<Transmit>,
    events: VecDeque<RendezvousEvent>,
    failure: Option<ConnectError>,
}

impl ClientSession {
    /// A session with the rendezvous at `server`, which must prove the key
    /// `pinned`; this site is `site_public` and `auth_key` is the key it
    /// shares with the rendezvous. The first attempt is due at `now`.
    /// `seed` seeds the backoff jitter and relay packet ids.
    pub(crate) fn new(
        server: SocketAddr,
        pinned: PublicKey,
        site_public: PublicKey,
        auth_key: AuthKey,
        peers: Vec<PublicKey>,
        now: Instant,
        seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let next_packet_id = rng.next_u32();
        Self {
            server,
            pinned,
            site_public,
            auth_key,
            rng,
            backoff: Backoff::new(),
            state: State::Waiting { at: now },
            peers,
            candidates: Vec::new(),
            register_due: false,
            decoder: FrameDecoder::default(),
            observed: None,
            online: BTreeMap::new(),
            by_relay: HashMap::new(),
            relay_ports: HashMap::new(),
            next_packet_id,
            reassembler: Reassembler::default(),
            stats: ClientStats::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            failure: None,
        }
    }

    /// Whether authenticated and registered now.
    pub(crate) fn is_registered(&self) -> bool {
        matches!(self.state, State::Registered { .. })
    }

    /// The address the rendezvous last saw this client's QUIC socket at.
    pub(crate) fn observed(&self) -> Option<SocketAddr> {
        self.observed
    }

    /// The peers online through this rendezvous now, in key order.
    pub(crate) fn online_peers(&self) -> Vec<PublicKey> {
        self.online.keys().map(|k| PublicKey::from(*k)).collect()
    }

    /// The relay id of `peer`, while it is online.
    pub(crate) fn relay_id_of(&self, peer: &PublicKey) -> Option<u32> {
        self.online.get(peer.as_bytes()).copied()
    }

    /// Makes this session believe `peer` has relay id `id` (attack tests).
    #[cfg(test)]
    pub(crate) fn force_relay_id(&mut self, peer: &PublicKey, id: u32) {
        self.online.insert(peer.to_bytes(), id);
    }

    /// The counters the session keeps: received relay traffic and
    /// connections (the `relay_tx_*` and `events_dropped` ones are the
    /// driver's).
    pub(crate) fn stats(&self) -> ClientStats {
        self.stats
    }

    /// Why the last attempt failed, until taken.
    pub(crate) fn take_failure(&mut self) -> Option<ConnectError> {
        self.failure.take()
    }

    /// Replaces this site's candidates; re-registers now if registered,
    /// else with the next registration.
    pub(crate) fn update_candidates(&mut self, candidates: Vec<SocketAddr>) {
        self.candidates = candidates;
        self.register_due = true;
    }

    /// Replaces the peers to be introduced to; re-registers now if
    /// registered, else with the next registration.
    pub(crate) fn update_peers(&mut self, peers: Vec<PublicKey>) {
        self.peers = peers;
        self.register_due = true;
    }

    /// Asks the rendezvous for a relay port for this site and `peer` (it
    /// comes as a [`RendezvousEvent::RelayPort`]). With a port granted
    /// already, tells it again at once (the site may have forgotten it: a
    /// reload, a role change). Ignored unless registered with `peer`
    /// online.
    pub(crate) fn request_relay_port(&mut self, peer: &PublicKey) {
        let key = peer.to_bytes();
        if let Some(&port) = self.relay_ports.get(&key) {
            self.events.push_back(RendezvousEvent::RelayPort {
                peer: *peer,
                port: Some(port),
            });
        } else if self.is_registered() && self.online.contains_key(&key) {
            let request = SiteMessage::RelayRequest { peer: Wire32(key) };
            self.transmits
                .push_back(Transmit::Stream(encode_frame(&request)));
        }
    }

    /// Records the relay port a peer update carries (or no longer
    /// carries) and tells the site when it changed.
    fn set_relay_port(&mut self, peer: [u8; 32], port: Option<RelayPort>) {
        let old = match port {
            Some(p) => self.relay_ports.insert(peer, p),
            None => self.relay_ports.remove(&peer),
        };
        if old != port {
            self.events.push_back(RendezvousEvent::RelayPort {
                peer: PublicKey::from(peer),
                port,
            });
        }
    }

    /// Where a packet to `peer` goes, if it can be relayed now; counts a
    /// packet id.
    pub(crate) fn relay_target(&mut self, peer: &PublicKey) -> Result<RelayTarget, RelayError> {
        if !self.is_registered() {
            return Err(RelayError::NotConnected);
        }
        let relay_id = self.relay_id_of(peer).ok_or(RelayError::PeerUnavailable)?;
        let packet_id = self.next_packet_id;
        self.next_packet_id = packet_id.wrapping_add(1);
        Ok(RelayTarget {
            relay_id,
            packet_id,
        })
    }

    /// The connection asked for by [`Transmit::Connect`] is up and its
    /// control stream open; `exporter` is its TLS exporter (`None` if the
    /// TLS session offers none). Sends `hello`.
    pub(crate) fn connected(&mut self, now: Instant, exporter: Option<Exporter>) {
        let State::Dialling { deadline } = self.state else {
            return;
        };
        let Some(exporter) = exporter else {
            self.fail(now, self.protocol("no TLS exporter".into()));
            return;
        };
        let proof = self
            .auth_key
            .proof(Role::Site, &exporter, &self.site_public, &self.pinned);
        let hello = SiteMessage::Hello {
            version: PROTOCOL_VERSION,
            site_key: Wire32(self.site_public.to_bytes()),
            rendezvous_key: Wire32(self.pinned.to_bytes()),
            proof: Wire32(proof),
        };
        self.transmits
            .push_back(Transmit::Stream(encode_frame(&hello)));
        self.state = State::Authenticating { deadline, exporter };
    }

    /// Bytes arrived on the control stream.
    pub(crate) fn stream_received(&mut self, now: Instant, bytes: &[u8]) {
        if !matches!(
            self.state,
            State::Authenticating { .. } | State::Registered { .. }
        ) {
            return;
        }
        self.decoder.push(bytes);
        loop {
            let message = match self.decoder.next::<RendezvousMessage>() {
                Ok(Some(message)) => message,
                Ok(None) => return,
                Err(e) => {
                    match self.state {
                        State::Registered { .. } => self.end(
                            now,
                            (CloseCode::Protocol, "bad frame"),
                            format!("protocol error: {e}"),
                        ),
                        _ => self.fail(now, self.protocol(e.to_string())),
                    }
                    return;
                }
            };
            match self.state {
                State::Authenticating { exporter, .. } => self.on_reply(now, &exporter, message),
                State::Registered { .. } => self.on_message(now, message),
                _ => return,
            }
        }
    }

    /// The rendezvous finished the control stream.
    pub(crate) fn stream_finished(&mut self, now: Instant) {
        // While authenticating, the connection's close (or the attempt's
        // deadline) says why.
        if self.is_registered() {
            self.end(
                now,
                (CloseCode::Normal, "control stream finished"),
                "the rendezvous finished the control stream".to_owned(),
            );
        }
    }

    /// A QUIC datagram arrived: a relayed packet or a fragment of one.
    pub(crate) fn datagram_received(&mut self, now: Instant, datagram: &[u8]) {
        if !self.is_registered() {
            return;
        }
        let Ok((header, payload)) = relay::parse(datagram) else {
            self.stats.relay_malformed += 1;
            return;
        };
        let Some(from) = self.by_relay.get(&header.relay_id).copied() else {
            self.stats.relay_malformed += 1;
            return;
        };
        let packet = self
            .reassembler
            .push(now, header.relay_id, &header, payload);
        self.sync_reassembly_stats();
        let Some(packet) = packet else {
            return;
        };
        self.stats.relay_rx_packets += 1;
        self.stats.relay_rx_bytes += packet.len() as u64;
        self.events.push_back(RendezvousEvent::Relayed {
            from: PublicKey::from(from),
            packet,
        });
    }

    /// The connection (or the attempt to make one) ended.
    pub(crate) fn connection_lost(&mut self, now: Instant, lost: Lost) {
        match self.state {
            State::Waiting { .. } => {}
            State::Dialling { .. } | State::Authenticating { .. } => {
                let e = self.closed_error(lost);
                self.fail(now, e);
            }
            State::Registered { .. } => self.end(
                now,
                (CloseCode::Normal, "connection lost"),
                lost.description,
            ),
        }
    }

    /// A better way to the rendezvous is ready (QUIC, while registered
    /// over TLS on TCP): ends this connection and dials again at once.
    pub(crate) fn redial(&mut self, now: Instant) {
        if self.tear_down(
            now,
            (CloseCode::Normal, "moving to QUIC"),
            "UDP reaches the rendezvous again; moving to QUIC".to_owned(),
        ) {
            self.state = State::Waiting { at: now };
        }
    }

    /// Acts on the timers that are due at `now`.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Waiting { at } if now >= at => {
                self.decoder = FrameDecoder::default();
                self.state = State::Dialling {
                    deadline: now + CONNECT_TIMEOUT,
                };
                self.transmits.push_back(Transmit::Connect);
            }
            State::Dialling { deadline } | State::Authenticating { deadline, .. }
                if now >= deadline =>
            {
                let e = ConnectError::Unreachable {
                    server: self.server,
                    reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                };
                self.fail(now, e);
            }
            State::Registered { .. } => {
                self.reassembler.expire(now);
                self.sync_reassembly_stats();
            }
            _ => {}
        }
    }

    /// The next thing to do for the connection, in order.
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.transmits.pop_front() {
            return Some(t);
        }
        if self.register_due && self.is_registered() {
            self.register_due = false;
            let register = SiteMessage::Register {
                peers: self.peers.iter().map(|k| Wire32(k.to_bytes())).collect(),
                candidates: self.candidates.clone(),
            };
            return Some(Transmit::Stream(encode_frame(&register)));
        }
        None
    }

    /// The next event for the site, in order.
    pub(crate) fn poll_event(&mut self) -> Option<RendezvousEvent> {
        self.events.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next, and why.
    pub(crate) fn poll_timeout(&self) -> Option<(Instant, TimeoutReason)> {
        match self.state {
            State::Waiting { at } => Some((at, TimeoutReason::Reconnect)),
            State::Dialling { deadline } | State::Authenticating { deadline, .. } => {
                Some((deadline, TimeoutReason::ConnectTimeout))
            }
            State::Registered { .. } => self
                .reassembler
                .next_expiry()
                .map(|at| (at, TimeoutReason::ExpireFragments)),
        }
    }

    /// The rendezvous' answer to `hello`.
    fn on_reply(&mut self, now: Instant, exporter: &Exporter, message: RendezvousMessage) {
        match message {
            RendezvousMessage::Welcome {
                proof,
                relay_id,
                observed,
            } => {
                if !self.auth_key.verify(
                    Role::Rendezvous,
                    exporter,
                    &self.site_public,
                    &self.pinned,
                    &proof.0,
                ) {
                    let e = ConnectError::WrongRendezvousKey {
                        server: self.server,
                        detail: format!(
                            "the server did not prove it holds the private key of {} (another server, or a man in the middle)",
                            keys::encode_public(&self.pinned)
                        ),
                    };
                    self.fail(now, e);
                    return;
                }
                // Only now, with the rendezvous proven, say who our peers are.
                self.state = State::Registered { since: now };
                self.register_due = true;
                self.observed = Some(observed);
                self.online.clear();
                self.by_relay.clear();
                self.reassembler = Reassembler::default();
                self.stats.connections += 1;
                info!(%observed, relay_id, "connected to the rendezvous");
                self.events
                    .push_back(RendezvousEvent::Connected { observed });
            }
            RendezvousMessage::Reject { code, message } => {
                let e = self.rejection_error(code.into(), message);
                self.fail(now, e);
            }
            RendezvousMessage::PeerUpdate { .. } => {
                self.fail(now, self.protocol("peer update before welcome".into()));
            }
        }
    }

    /// A message on a registered connection.
    fn on_message(&mut self, now: Instant, message: RendezvousMessage) {
        match message {
            RendezvousMessage::PeerUpdate {
                peer,
                relay_id,
                candidates,
                online,
                relay_port,
                relay_token,
            } => {
                if let Some(old) = self.online.remove(&peer.0) {
                    self.by_relay.remove(&old);
                }
                if online {
                    self.online.insert(peer.0, relay_id);
                    self.by_relay.insert(relay_id, peer.0);
                }
                debug!(peer = %keys::encode_bytes(&peer.0), online, ?candidates, "peer update");
                self.events.push_back(RendezvousEvent::PeerUpdate {
                    peer: PublicKey::from(peer.0),
                    candidates,
                    online,
                });
                let port = match (relay_port, relay_token) {
                    (Some(port), Some(token)) if online && port != 0 => Some(RelayPort {
                        addr: SocketAddr::new(self.server.ip(), port),
                        token: RelayToken(token.0),
                    }),
                    _ => None,
                };
                self.set_relay_port(peer.0, port);
            }
            other => self.end(
                now,
                (CloseCode::Protocol, "unexpected message"),
                format!("protocol error: unexpected {other:?}"),
            ),
        }
    }

    /// A connection attempt failed: close it, tell the site, retry later.
    fn fail(&mut self, now: Instant, e: ConnectError) {
        let (code, reason) = e.close();
        self.transmits.push_back(Transmit::Close { code, reason });
        if e.needs_operator() {
            error!("{e}");
            self.backoff.max_out();
        } else {
            warn!("{e}");
        }
        self.events.push_back(RendezvousEvent::Disconnected {
            reason: e.to_string(),
        });
        self.failure = Some(e);
        self.wait(now);
    }

    /// A registered connection ended: close it, take every peer offline,
    /// tell the site, reconnect later.
    fn end(&mut self, now: Instant, close: (CloseCode, &'static str), reason: String) {
        if self.tear_down(now, close, reason) {
            self.wait(now);
        }
    }

    /// [`end`](Self::end) without scheduling the next attempt; `false`
    /// (and nothing done) unless registered.
    fn tear_down(
        &mut self,
        now: Instant,
        (code, close): (CloseCode, &'static str),
        reason: String,
    ) -> bool {
        let State::Registered { since } = self.state else {
            return false;
        };
        self.transmits.push_back(Transmit::Close {
            code,
            reason: close,
        });
        info!(%reason, "disconnected from the rendezvous; reconnecting");
        self.sync_reassembly_stats();
        self.reassembler = Reassembler::default();
        self.by_relay.clear();
        for peer in std::mem::take(&mut self.online).into_keys() {
            self.events.push_back(RendezvousEvent::PeerUpdate {
                peer: PublicKey::from(peer),
                candidates: Vec::new(),
                online: false,
            });
        }
        let granted: Vec<[u8; 32]> = self.relay_ports.keys().copied().collect();
        for peer in granted {
            self.set_relay_port(peer, None);
        }
        self.events
            .push_back(RendezvousEvent::Disconnected { reason });
        if now.saturating_duration_since(since) >= STABLE {
            self.backoff.reset();
        }
        true
    }

    fn wait(&mut self, now: Instant) {
        let delay = self.backoff.delay(&mut self.rng);
        self.state = State::Waiting { at: now + delay };
    }

    fn sync_reassembly_stats(&mut self) {
        self.stats.relay_incomplete +=
            std::mem::take(&mut self.reassembler.stats.dropped_incomplete);
    }

    fn protocol(&self, reason: String) -> ConnectError {
        ConnectError::Protocol {
            server: self.server,
            reason,
        }
    }

    fn closed_error(&self, lost: Lost) -> ConnectError {
        match lost.closed_by_rendezvous {
            Some((code, message)) => self.rejection_error(code, message),
            None => ConnectError::Unreachable {
                server: self.server,
                reason: lost.description,
            },
        }
    }

    fn rejection_error(&self, code: u64, message: String) -> ConnectError {
        let server = self.server;
        match CloseCode::from_u64(code) {
            Some(CloseCode::UnknownSiteKey) => ConnectError::UnknownSiteKey {
                server,
                site_key: keys::encode_public(&self.site_public),
            },
            Some(CloseCode::BadProof) => ConnectError::BadProof { server, message },
            Some(CloseCode::WrongRendezvousKey) => ConnectError::WrongRendezvousKey {
                server,
                detail: message,
            },
            Some(code) => ConnectError::Rejected {
                server,
                code: code.to_string(),
                message,
            },
            None => ConnectError::Rejected {
                server,
                code: format!("code {code}"),
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use x25519_dalek::StaticSecret;

    use super::*;
    use crate::rendezvous::relay::HEADER_LEN;

    const SERVER: &str = "192.0.2.1:7443";
    const EXPORTER: Exporter = [9; 32];

    fn key(seed: u8) -> (StaticSecret, PublicKey) {
        let secret = StaticSecret::from([seed; 32]);
        let public = PublicKey::from(&secret);
        (secret, public)
    }

    /// A session with a virtual clock and the rendezvous' side of the
    /// handshake.
    struct Lab {
        s: ClientSession,
        now: Instant,
        site: PublicKey,
        rendezvous: (StaticSecret, PublicKey),
    }

    impl Lab {
        fn new(peers: Vec<PublicKey>) -> Self {
            let (site_secret, site) = key(1);
            let rendezvous = key(2);
            let auth = AuthKey::derive(&site_secret, &rendezvous.1).unwrap();
            let now = Instant::now();
            let s = ClientSession::new(
                SERVER.parse().unwrap(),
                rendezvous.1,
                site,
                auth,
                peers,
                now,
                42,
            );
            Self {
                s,
                now,
                site,
                rendezvous,
            }
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            self.s.handle_timeout(self.now);
        }

        /// Advances to the session's next timeout, which must be `reason`.
        fn wake(&mut self, reason: TimeoutReason) -> Duration {
            let (at, why) = self.s.poll_timeout().unwrap();
            assert_eq!(why, reason);
            let waited = at.saturating_duration_since(self.now);
            self.now = self.now.max(at);
            self.s.handle_timeout(self.now);
            waited
        }

        fn transmits(&mut self) -> Vec<Transmit> {
            std::iter::from_fn(|| self.s.poll_transmit()).collect()
        }

        fn events(&mut self) -> Vec<RendezvousEvent> {
            std::iter::from_fn(|| self.s.poll_event()).collect()
        }

        /// The messages written on the control stream (anything else asked
        /// for is a failure).
        fn sent(&mut self) -> Vec<SiteMessage> {
            let mut decoder = FrameDecoder::default();
            let mut out = Vec::new();
            for t in self.transmits() {
                let Transmit::Stream(bytes) = t else {
                    panic!("unexpected {t:?}");
                };
                decoder.push(&bytes);
                out.push(decoder.next().unwrap().unwrap());
            }
            out
        }

        fn receive(&mut self, message: &RendezvousMessage) {
            self.s.stream_received(self.now, &encode_frame(message));
        }

        fn welcome(&self, relay_id: u32) -> RendezvousMessage {
            let key = AuthKey::derive(&self.rendezvous.0, &self.site).unwrap();
            let proof = key.proof(Role::Rendezvous, &EXPORTER, &self.site, &self.rendezvous.1);
            RendezvousMessage::Welcome {
                proof: Wire32(proof),
                relay_id,
                observed: "198.51.100.4:40123".parse().unwrap(),
            }
        }

        /// Dials (the attempt must be due), authenticates and registers;
        /// returns the `register` sent.
        fn register(&mut self) -> SiteMessage {
            assert_eq!(self.transmits(), [Transmit::Connect]);
            self.s.connected(self.now, Some(EXPORTER));
            let hello = self.sent();
            assert!(
                matches!(hello[..], [SiteMessage::Hello { .. }]),
                "{hello:?}"
            );
            let welcome = self.welcome(17);
            self.receive(&welcome);
            assert!(self.s.is_registered());
            let mut sent = self.sent();
            assert_eq!(sent.len(), 1, "{sent:?}");
            sent.remove(0)
        }

        fn lose(&mut self) {
            self.s.connection_lost(
                self.now,
                Lost {
                    closed_by_rendezvous: None,
                    description: "timed out".into(),
                },
            );
        }
    }

    fn registration(peers: &[&PublicKey], candidates: &[SocketAddr]) -> SiteMessage {
        SiteMessage::Register {
            peers: peers.iter().map(|k| Wire32(k.to_bytes())).collect(),
            candidates: candidates.to_vec(),
        }
    }

    fn peer_update(peer: &PublicKey, relay_id: u32, online: bool) -> RendezvousMessage {
        RendezvousMessage::PeerUpdate {
            peer: Wire32(peer.to_bytes()),
            relay_id,
            candidates: Vec::new(),
            online,
            relay_port: None,
            relay_token: None,
        }
    }

    fn within(d: Duration, base: Duration) -> bool {
        d >= base.mul_f64(0.75) && d <= base.mul_f64(1.25)
    }

    #[test]
    fn first_attempt_is_due_at_once_and_is_bounded_in_time() {
        let mut lab = Lab::new(Vec::new());
        assert_eq!(lab.wake(TimeoutReason::Reconnect), Duration::ZERO);
        assert_eq!(lab.transmits(), [Transmit::Connect]);
        // Nothing answers: the attempt gives up after CONNECT_TIMEOUT.
        assert_eq!(lab.wake(TimeoutReason::ConnectTimeout), CONNECT_TIMEOUT);
        assert!(matches!(lab.transmits()[..], [Transmit::Close { .. }]));
        match &lab.events()[..] {
            [RendezvousEvent::Disconnected { reason }] => {
                assert!(reason.contains("no answer within 10 s"), "{reason}")
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            lab.s.take_failure(),
            Some(ConnectError::Unreachable { .. })
        ));
        let (_, why) = lab.s.poll_timeout().unwrap();
        assert_eq!(why, TimeoutReason::Reconnect);
    }

    #[test]
    fn reconnect_backoff_doubles_to_its_cap_and_resets_after_a_stable_connection() {
        let mut lab = Lab::new(Vec::new());
        lab.wake(TimeoutReason::Reconnect);
        let mut base = MIN_BACKOFF;
        for _ in 0..10 {
            assert_eq!(lab.transmits(), [Transmit::Connect]);
            lab.lose();
            lab.transmits();
            lab.events();
            // Not a moment before its time.
            let (at, _) = lab.s.poll_timeout().unwrap();
            lab.s.handle_timeout(at - Duration::from_millis(1));
            assert!(lab.transmits().is_empty());
            let waited = lab.wake(TimeoutReason::Reconnect);
            assert!(within(waited, base), "{waited:?} for {base:?}");
            base = (base * 2).min(MAX_BACKOFF);
        }
        assert_eq!(base, MAX_BACKOFF);

        // A short-lived connection does not reset the backoff...
        lab.register();
        lab.advance(STABLE / 2);
        lab.lose();
        assert!(matches!(lab.transmits()[..], [Transmit::Close { .. }]));
        let waited = lab.wake(TimeoutReason::Reconnect);
        assert!(within(waited, MAX_BACKOFF), "{waited:?}");
        // ...one that lasted STABLE does.
        lab.register();
        lab.advance(STABLE);
        lab.lose();
        assert!(matches!(lab.transmits()[..], [Transmit::Close { .. }]));
        let waited = lab.wake(TimeoutReason::Reconnect);
        assert!(within(waited, MIN_BACKOFF), "{waited:?}");
    }

    #[test]
    fn a_rejection_only_an_operator_can_fix_waits_the_longest() {
        let mut lab = Lab::new(Vec::new());
        lab.wake(TimeoutReason::Reconnect);
        lab.transmits();
        lab.s.connected(lab.now, Some(EXPORTER));
        lab.transmits();
        lab.receive(&RendezvousMessage::Reject {
            code: CloseCode::UnknownSiteKey.as_u32(),
            message: "unknown site key".into(),
        });
        assert!(matches!(
            lab.s.take_failure(),
            Some(ConnectError::UnknownSiteKey { .. })
        ));
        let waited = lab.wake(TimeoutReason::Reconnect);
        assert!(within(waited, MAX_BACKOFF), "{waited:?}");
    }

    #[test]
    fn a_rendezvous_that_cannot_prove_the_pinned_key_hears_nothing_of_our_peers() {
        let (_, peer) = key(3);
        let mut lab = Lab::new(vec![peer]);
        lab.wake(TimeoutReason::Reconnect);
        lab.transmits();
        lab.s.connected(lab.now, Some(EXPORTER));
        lab.transmits();
        let RendezvousMessage::Welcome {
            relay_id, observed, ..
        } = lab.welcome(1)
        else {
            unreachable!()
        };
        lab.receive(&RendezvousMessage::Welcome {
            proof: Wire32([0; 32]),
            relay_id,
            observed,
        });
        assert_eq!(
            lab.transmits(),
            [Transmit::Close {
                code: CloseCode::WrongRendezvousKey,
                reason: "the rendezvous did not prove the pinned key",
            }]
        );
        assert!(!lab.s.is_registered());
        assert!(matches!(
            lab.s.take_failure(),
            Some(ConnectError::WrongRendezvousKey { .. })
        ));
    }

    #[test]
    fn reregistering_after_a_reconnect_carries_the_latest_candidates_and_peers() {
        let (_, b) = key(3);
        let (_, c) = key(4);
        let one: SocketAddr = "203.0.113.7:51820".parse().unwrap();
        let two: SocketAddr = "[2001:db8::7]:51820".parse().unwrap();
        let mut lab = Lab::new(vec![b]);
        lab.wake(TimeoutReason::Reconnect);
        assert_eq!(lab.register(), registration(&[&b], &[]));

        // While registered, a change is sent at once.
        lab.s.update_candidates(vec![one]);
        assert_eq!(lab.sent(), [registration(&[&b], &[one])]);

        // Changes while disconnected wait for the next registration.
        lab.lose();
        lab.transmits();
        lab.s.update_peers(vec![b, c]);
        lab.s.update_candidates(vec![two]);
        assert!(lab.transmits().is_empty());
        lab.wake(TimeoutReason::Reconnect);
        assert_eq!(lab.register(), registration(&[&b, &c], &[two]));
    }

    #[test]
    fn updates_while_connecting_are_sent_once_after_welcome() {
        let (_, b) = key(3);
        let one: SocketAddr = "203.0.113.7:51820".parse().unwrap();
        let mut lab = Lab::new(Vec::new());
        lab.wake(TimeoutReason::Reconnect);
        assert_eq!(lab.transmits(), [Transmit::Connect]);
        lab.s.update_candidates(vec![one]);
        assert!(lab.transmits().is_empty());
        lab.s.connected(lab.now, Some(EXPORTER));
        // Only `hello` before the rendezvous has proven itself.
        lab.s.update_peers(vec![b]);
        assert!(matches!(lab.sent()[..], [SiteMessage::Hello { .. }]));
        let welcome = lab.welcome(5);
        lab.receive(&welcome);
        assert_eq!(lab.sent(), [registration(&[&b], &[one])]);
    }

    #[test]
    fn events_are_emitted_in_order() {
        let (_, b) = key(3);
        let (_, c) = key(4);
        let mut lab = Lab::new(vec![b, c]);
        lab.wake(TimeoutReason::Reconnect);
        lab.register();
        // Two peers come online, b relays a packet in two fragments, c
        // goes offline again.
        lab.receive(&peer_update(&b, 20, true));
        lab.receive(&peer_update(&c, 30, true));
        let packet: Vec<u8> = (0..100u8).collect();
        let datagrams = relay::fragment(20, 1, &packet, HEADER_LEN + 60).unwrap();
        assert_eq!(datagrams.len(), 2);
        for d in &datagrams {
            lab.s.datagram_received(lab.now, d);
        }
        lab.receive(&peer_update(&c, 30, false));
        lab.lose();
        let online = |peer: &PublicKey, online| RendezvousEvent::PeerUpdate {
            peer: *peer,
            candidates: Vec::new(),
            online,
        };
        assert_eq!(
            lab.events(),
            [
                RendezvousEvent::Connected {
                    observed: "198.51.100.4:40123".parse().unwrap()
                },
                online(&b, true),
                online(&c, true),
                RendezvousEvent::Relayed { from: b, packet },
                online(&c, false),
                // The connection ends: b, still online, goes offline first.
                online(&b, false),
                RendezvousEvent::Disconnected {
                    reason: "timed out".into()
                },
            ]
        );
        let stats = lab.s.stats();
        assert_eq!((stats.relay_rx_packets, stats.relay_rx_bytes), (1, 100));
        assert_eq!(stats.connections, 1);
    }

    #[test]
    fn relay_targets_need_a_registration_and_an_online_peer() {
        let (_, b) = key(3);
        let mut lab = Lab::new(vec![b]);
        assert_eq!(lab.s.relay_target(&b), Err(RelayError::NotConnected));
        lab.wake(TimeoutReason::Reconnect);
        lab.register();
        assert_eq!(lab.s.relay_target(&b), Err(RelayError::PeerUnavailable));
        lab.receive(&peer_update(&b, 20, true));
        let first = lab.s.relay_target(&b).unwrap();
        let second = lab.s.relay_target(&b).unwrap();
        assert_eq!((first.relay_id, second.relay_id), (20, 20));
        assert_eq!(second.packet_id, first.packet_id.wrapping_add(1));
        lab.lose();
        assert_eq!(lab.s.relay_target(&b), Err(RelayError::NotConnected));
    }

    #[test]
    fn incomplete_relayed_packets_expire_on_the_session_clock() {
        let (_, b) = key(3);
        let mut lab = Lab::new(vec![b]);
        lab.wake(TimeoutReason::Reconnect);
        lab.register();
        assert_eq!(lab.s.poll_timeout(), None);
        lab.receive(&peer_update(&b, 20, true));
        let packet = vec![7; 100];
        let datagrams = relay::fragment(20, 1, &packet, HEADER_LEN + 60).unwrap();
        lab.s.datagram_received(lab.now, &datagrams[0]);
        // From an unknown relay id, or garbage: counted, dropped.
        let stranger = relay::fragment(99, 1, &packet, 1200).unwrap();
        lab.s.datagram_received(lab.now, &stranger[0]);
        lab.s.datagram_received(lab.now, &[1, 2, 3]);
        assert_eq!(
            lab.wake(TimeoutReason::ExpireFragments),
            relay::REASSEMBLY_TIMEOUT
        );
        let stats = lab.s.stats();
        assert_eq!((stats.relay_incomplete, stats.relay_malformed), (1, 2));
        assert_eq!(lab.s.poll_timeout(), None);
        // The missing fragment, too late, does not make a packet.
        lab.s.datagram_received(lab.now, &datagrams[1]);
        assert!(
            !lab.events()
                .iter()
                .any(|e| matches!(e, RendezvousEvent::Relayed { .. }))
        );
    }

    #[test]
    fn protocol_errors_close_the_connection() {
        let mut lab = Lab::new(Vec::new());
        lab.wake(TimeoutReason::Reconnect);
        lab.register();
        lab.events();
        let welcome = lab.welcome(1);
        lab.receive(&welcome);
        assert_eq!(
            lab.transmits(),
            [Transmit::Close {
                code: CloseCode::Protocol,
                reason: "unexpected message",
            }]
        );
        match &lab.events()[..] {
            [RendezvousEvent::Disconnected { reason }] => {
                assert!(reason.starts_with("protocol error: unexpected"), "{reason}")
            }
            e => panic!("{e:?}"),
        }
        // Bytes from the old connection are not read any more.
        lab.receive(&peer_update(&key(3).1, 2, true));
        assert!(lab.events().is_empty());

        lab.wake(TimeoutReason::Reconnect);
        lab.register();
        lab.s
            .stream_received(lab.now, &[0xff, 0xff, 0xff, 0xff, b'{']);
        assert_eq!(
            lab.transmits(),
            [Transmit::Close {
                code: CloseCode::Protocol,
                reason: "bad frame",
            }]
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new();
        let first = b.delay(&mut rng);
        assert!(first >= MIN_BACKOFF.mul_f64(0.75) && first <= MIN_BACKOFF.mul_f64(1.25));
        for _ in 0..20 {
            let d = b.delay(&mut rng);
            assert!(d <= MAX_BACKOFF.mul_f64(1.25));
        }
        assert_eq!(b.next, MAX_BACKOFF);
        b.reset();
        assert_eq!(b.next, MIN_BACKOFF);
    }
}
