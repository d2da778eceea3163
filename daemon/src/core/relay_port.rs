//! The UDP relay in the site core: binding the WireGuard socket to the
//! relay port a rendezvous granted for a peer, and sending the peer's
//! WireGuard packets there (plain UDP, batched like the direct path)
//! instead of through the QUIC relay.
//!
//! A peer without a direct path starts on the QUIC relay. The first packet
//! relayed there asks the rendezvous for a port (again every
//! [`REQUEST_INTERVAL`] while it has none); once the port is granted this
//! site binds to it (`causeway_nat::udp_relay`: a bind MAC'd with our
//! token, acked by the port) and, as soon as an ack says the peer is bound
//! too, the peer's packets go to the port. Binds are repeated every
//! [`REFRESH`] (keeping our NAT's mapping and the port's record of our
//! address fresh); a bind unanswered for [`ACK_TIMEOUT`] (the rendezvous
//! restarted, the port closed, our NAT mapping changed) sends the peer
//! back to the QUIC relay until an ack comes. A direct path found by
//! probing always wins; while there is one, no binds are sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_nat::udp_relay::RelayPort;
use tracing::{debug, info};

use super::{DropReason, Io, Peer, PeerState, Site};

/// Binds go out this often until the port says both sites are bound
/// (for the first [`FAST_BINDS`] of a grant).
const RETRY: Duration = Duration::from_millis(250);
/// Then this often; also while the peer stays unbound after
/// [`FAST_BINDS`] (it cannot reach the port: a firewall, or no UDP at all),
/// so that a pair that cannot use the port does not bind 4 times a second
/// for ever.
const REFRESH: Duration = Duration::from_secs(2);
/// See [`RETRY`].
const FAST_BINDS: Duration = Duration::from_secs(5);
/// A bind unanswered this long: the port is not used until an ack comes.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// A peer on the QUIC relay asks for a relay port at most this often.
const REQUEST_INTERVAL: Duration = Duration::from_secs(5);

/// A relay port granted for one peer, and this site's binding to it.
#[derive(Debug, Clone)]
pub struct UdpRelay {
    port: RelayPort,
    /// Counter of the latest bind sent.
    counter: u64,
    /// Counter of the latest bind acked.
    acked_counter: u64,
    /// Whether packets to the peer go to the port now: the latest ack
    /// said the peer is bound too, and no bind since went unanswered.
    usable: bool,
    /// When the latest bind went out, while it is unanswered.
    unanswered: Option<Instant>,
    /// When the next bind goes out.
    next_bind: Instant,
    /// When the port was granted.
    granted: Instant,
}

impl UdpRelay {
    fn new(port: RelayPort, now: Instant) -> Self {
        UdpRelay {
            port,
            counter: 0,
            acked_counter: 0,
            usable: false,
            unanswered: None,
            next_bind: now,
            granted: now,
        }
    }

    /// The port's address.
    pub fn addr(&self) -> SocketAddr {
        self.port.addr
    }

    /// Whether packets to the peer go to the port now: both sites are
    /// bound and the port answered lately.
    pub fn usable(&self) -> bool {
        self.usable
    }
}

impl PeerState {
    /// Where the peer's WireGuard packets go: the direct endpoint, else the
    /// UDP relay port when usable; `None`: the QUIC relay.
    pub fn send_addr(&self) -> Option<SocketAddr> {
        self.endpoint.or_else(|| {
            self.relay
                .as_ref()
                .filter(|r| r.usable())
                .map(UdpRelay::addr)
        })
    }

    /// Whether `addr` is the peer's relay port (packets from it came
    /// through the relay, not from the peer's own address).
    pub fn is_relay_port(&self, addr: SocketAddr) -> bool {
        self.relay.as_ref().is_some_and(|r| r.addr() == addr)
    }
}

impl Site {
    /// A rendezvous at `server` granted (`Some`) or took back (`None`) a
    /// relay port for `key`'s peer. A grant from another rendezvous does
    /// not replace a port in use.
    pub fn handle_relay_port(
        &self,
        now: Instant,
        key: &[u8; 32],
        server: SocketAddr,
        port: Option<RelayPort>,
    ) {
        let peers = self.peers();
        let Some(index) = peers.by_key(key) else {
            return;
        };
        let peer = peers.get(index);
        let mut state = peer.lock();
        let current = state.relay.as_ref().map(|r| r.port);
        match port {
            Some(p) if current == Some(p) => {}
            Some(p) if current.is_none_or(|c| c.addr.ip() == p.addr.ip()) => {
                info!(peer = peer.name(), relay_port = %p.addr, "relay port granted");
                state.relay = Some(UdpRelay::new(p, now));
            }
            Some(_) => {}
            None if current.is_some_and(|c| c.addr.ip() == server.ip()) => {
                info!(
                    peer = peer.name(),
                    "relay port withdrawn: back to the QUIC relay"
                );
                state.relay = None;
            }
            None => {}
        }
    }

    /// A bind ack arrived on the WireGuard socket from `from`.
    pub fn handle_relay_ack(&self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        if self.standby_drop() {
            return;
        }
        for peer in self.peers().iter() {
            let mut state = peer.lock();
            let Some(relay) = state.relay.as_mut().filter(|r| r.addr() == from) else {
                continue;
            };
            // Only an ack newer than the last one counts (an older one may
            // be a replay, or says something stale about the peer); not
            // only of the latest bind, which a long round trip outruns.
            match relay.port.token.open_ack(datagram) {
                Some((counter, peer_bound))
                    if counter > relay.acked_counter && counter <= relay.counter =>
                {
                    relay.acked_counter = counter;
                    let was = relay.usable;
                    relay.usable = peer_bound;
                    relay.unanswered = None;
                    if peer_bound {
                        relay.next_bind = now + REFRESH;
                    }
                    if peer_bound && !was && state.endpoint.is_none() {
                        info!(peer = peer.name(), relay_port = %from, "relaying through the UDP relay port");
                    }
                    return;
                }
                _ => {}
            }
        }
        self.drop_packet(
            None,
            DropReason::Rejected,
            format_args!("relay ack from {from}: not for a port of ours"),
        );
    }

    /// Sends a bind when due, for a peer on the relay; forgets a port that
    /// stopped answering.
    pub(super) fn relay_port_timers(
        &self,
        now: Instant,
        peer: &Peer,
        state: &mut PeerState,
        io: &mut impl Io,
    ) {
        let direct = state.endpoint.is_some();
        let Some(relay) = state.relay.as_mut() else {
            return;
        };
        if relay.usable
            && relay
                .unanswered
                .is_some_and(|sent| now.saturating_duration_since(sent) >= ACK_TIMEOUT)
        {
            info!(peer = peer.name(), relay_port = %relay.addr(), "relay port silent: back to the QUIC relay");
            relay.usable = false;
            relay.next_bind = now;
        }
        if direct || relay.next_bind > now {
            return;
        }
        relay.counter += 1;
        let fast = !relay.usable && now.saturating_duration_since(relay.granted) < FAST_BINDS;
        relay.next_bind = now + if fast { RETRY } else { REFRESH };
        relay.unanswered = relay.unanswered.or(Some(now));
        let bind = relay.port.token.bind(relay.counter);
        if let Err(e) = io.send(relay.addr(), &bind) {
            debug!(peer = peer.name(), "relay bind to {}: {e}", relay.addr());
        }
    }

    /// A packet for `peer` went through the QUIC relay: ask for a relay
    /// port, at most every [`REQUEST_INTERVAL`].
    pub(super) fn want_relay_port(&self, peer: &Arc<Peer>, io: &mut impl Io) {
        if self.take_turn(&peer.relay_port_asked, REQUEST_INTERVAL) {
            io.request_relay_port(peer);
        }
    }
}
