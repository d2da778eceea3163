//! The per-packet decisions: a packet from the TUN on its way to a peer
//! (route, remap, MSS clamp, encrypt) and a datagram from a peer on its way
//! to the TUN (find the peer, decrypt, roam, source check, remap, export
//! and allow-list checks, MSS clamp). The caller owns the buffers and does
//! the reading and writing; nothing here allocates.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, TunnResult};
use causeway_nat::path::Path;

use super::{DropReason, Io, Peer, Peers, Site, Source};
use crate::packet::{self, Verdict};

/// How long after a handshake data under a session we do not have is
/// taken for packets still in flight rather than for a peer that talks to
/// another holder of our key.
const STALE_SESSION_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether boringtun refused a data packet because it names a session we
/// do not have (or one with other keys under the same index).
fn is_stale_session(e: &boringtun::noise::errors::WireGuardError) -> bool {
    use boringtun::noise::errors::WireGuardError as E;
    matches!(e, E::WrongIndex | E::InvalidAeadTag | E::NoCurrentSession)
}

/// Message type of a WireGuard cookie reply: the one answer boringtun gives
/// without having authenticated the sender.
const COOKIE_REPLY: u8 = 3;

/// What became of a packet from the TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Encrypted into the first `len` bytes of the output buffer; send it
    /// to `to`.
    Send {
        /// The peer's endpoint.
        to: SocketAddr,
        /// Length of the WireGuard message.
        len: usize,
    },
    /// Too big for the tunnel: the first `len` bytes of the ICMP buffer are
    /// the "fragmentation needed" / "packet too big" answer for the TUN.
    Icmp(usize),
    /// Nothing for the caller: queued until a handshake completes, handed
    /// to the relay, or dropped (and counted).
    Done,
}

impl Site {
    /// Prepares one packet from the TUN (remap, MSS clamp) and encrypts it
    /// into `out` (room for the packet plus 148 bytes); or answers it with
    /// ICMP "too big" in `icmp`; or hands it to the relay; or drops it.
    /// `now` tells the peer's path machine that traffic went out on the
    /// direct path (see `PeerPaths::notify_traffic_sent`).
    pub fn encapsulate(
        &self,
        now: Instant,
        peers: &Peers,
        packet: &mut [u8],
        out: &mut [u8],
        icmp: &mut [u8],
        io: &mut impl Io,
    ) -> Outbound {
        if self.standby_drop() {
            return Outbound::Done;
        }
        let summary = match packet::parse(packet) {
            Ok(summary) => summary,
            Err(e) => {
                self.drop_packet(
                    None,
                    DropReason::Malformed,
                    format_args!("{}-byte packet from TUN: {e}", packet.len()),
                );
                return Outbound::Done;
            }
        };
        let dst = summary.dst;
        if packet.len() > self.mtu {
            let reply = packet::too_big_reply(packet, self.mtu as u16, icmp);
            self.drop_packet(
                None,
                DropReason::TooBig,
                format_args!(
                    "{}-byte packet to {dst} exceeds MTU {}",
                    packet.len(),
                    self.mtu
                ),
            );
            return reply.map_or(Outbound::Done, Outbound::Icmp);
        }
        let Some((index, view)) = peers.route(dst) else {
            if is_link_local_noise(dst) {
                // The kernel's own chatter on a fresh link (IPv6 router
                // solicitations, MLD): counted, not worth a warning.
                self.drops.count(DropReason::NoRoute);
            } else {
                self.drop_packet(
                    None,
                    DropReason::NoRoute,
                    format_args!("no peer owns {dst}"),
                );
            }
            return Outbound::Done;
        };
        let peer = peers.get(index);
        let view = &peer.views()[view];
        if view.is_remapped()
            && let Err(e) = view.egress_parsed(packet, &summary)
        {
            self.drop_packet(
                Some(peer),
                DropReason::Malformed,
                format_args!("remapping packet to {dst}: {e}"),
            );
            return Outbound::Done;
        }
        let mut state = peer.lock();
        let direct = state.endpoint.is_some();
        let endpoint = state.send_addr();
        if summary.is_tcp_syn() {
            packet::clamp_mss(packet, self.mss(dst.is_ipv6(), endpoint.is_none()));
        }
        if endpoint.is_none() && !self.has_traversal() {
            drop(state);
            self.drop_packet(
                Some(peer),
                DropReason::NoEndpoint,
                format_args!("to {dst}: endpoint of peer not known yet"),
            );
            return Outbound::Done;
        }
        match state.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(message) => {
                if direct && let Some(paths) = state.paths.as_mut() {
                    paths.notify_traffic_sent(now);
                }
                drop(state);
                if !direct && endpoint.is_some() {
                    // To the UDP relay port.
                    peer.counters.relay_tx_packets.fetch_add(1, Relaxed);
                }
                peer.counters.tx_packets.fetch_add(1, Relaxed);
                peer.counters
                    .tx_bytes
                    .fetch_add(packet.len() as u64, Relaxed);
                match endpoint {
                    Some(to) => Outbound::Send {
                        to,
                        len: message.len(),
                    },
                    None => {
                        self.relay(peer, message, io);
                        Outbound::Done
                    }
                }
            }
            // Queued inside boringtun until the handshake completes.
            TunnResult::Done => Outbound::Done,
            TunnResult::Err(e) => {
                drop(state);
                self.drop_packet(
                    Some(peer),
                    DropReason::Rejected,
                    format_args!("encapsulate: {e:?}"),
                );
                Outbound::Done
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Outbound::Done,
        }
    }

    /// A WireGuard message the relay brought from the peer with key `from`.
    /// Returns what [`Site::decapsulate`] returns.
    pub fn decapsulate_relayed(
        &self,
        now: Instant,
        peers: &Peers,
        from: &[u8; 32],
        datagram: &[u8],
        out: &mut [u8],
        io: &mut impl Io,
    ) -> Option<usize> {
        let peer = peers.get(peers.by_key(from)?);
        peer.counters.relay_rx_packets.fetch_add(1, Relaxed);
        let source = Source::Relay(peer.id);
        self.decapsulate(now, peers, source, datagram, out, io)
    }

    /// Handles one WireGuard datagram that came over UDP, or through the
    /// relay from the peer the relay names. Returns the length of the inner
    /// packet decrypted into `out` when it passed every check and is to be
    /// written to the TUN (source already translated to our view, MSS
    /// clamped); answers, handshake messages and drops are dealt with here.
    pub fn decapsulate(
        &self,
        now: Instant,
        peers: &Peers,
        source: Source,
        datagram: &[u8],
        out: &mut [u8],
        io: &mut impl Io,
    ) -> Option<usize> {
        if self.standby_drop() {
            return None;
        }
        // Under load, boringtun accepts a handshake only with a cookie for
        // its source address (mac2), and refuses it outright without one.
        // Relayed messages get a stable address of their own per peer, so
        // that the cookie mechanism works through the relay too.
        let (from_ip, relayed) = match source {
            Source::Udp(from) => (from.ip(), false),
            Source::Relay(id) if peers.by_id(id).is_some() => (relay_cookie_address(id), true),
            Source::Relay(_) => {
                // Nobody to answer, and nobody it can be from.
                self.drop_packet(
                    None,
                    DropReason::UnknownPeer,
                    format_args!("relayed from a peer id we do not have"),
                );
                return None;
            }
        };
        let from_ip = Some(from_ip);
        let mut cookie = [0u8; 64];
        let packet = match self
            .rate_limiter
            .verify_packet(from_ip, datagram, &mut cookie)
        {
            Ok(packet) => packet,
            Err(TunnResult::WriteToNetwork(reply)) => {
                // Under load: answer with a cookie instead of doing the DH.
                self.reply(source, reply, io);
                return None;
            }
            Err(e) => {
                self.drop_packet(
                    None,
                    DropReason::Malformed,
                    format_args!("{} bytes from {source}: {e:?}", datagram.len()),
                );
                return None;
            }
        };
        let index = match &packet {
            Packet::HandshakeInit(init) => {
                parse_handshake_anon(&self.private_key, &self.public_key, init)
                    .ok()
                    .and_then(|half| peers.by_key(&half.peer_static_public))
            }
            Packet::HandshakeResponse(p) => peers.by_receiver_index(p.receiver_idx),
            Packet::PacketCookieReply(p) => peers.by_receiver_index(p.receiver_idx),
            Packet::PacketData(p) => peers.by_receiver_index(p.receiver_idx),
        };
        let index = match (index, source) {
            (Some(index), Source::Udp(_)) => index,
            // The relay vouches for nothing: the packet must be the claimed peer's.
            (Some(index), Source::Relay(claimed)) if peers.get(index).id == claimed => index,
            _ => {
                self.drop_packet(
                    None,
                    DropReason::UnknownPeer,
                    format_args!("from {source}: not one of our peers"),
                );
                return None;
            }
        };
        let peer = peers.get(index);
        let mut state = peer.lock();
        // Through the peer's UDP relay port: relayed as much as through
        // the QUIC relay, though it came over UDP (but no datagram limit,
        // so no relay MSS below).
        let via_port = matches!(source, Source::Udp(from) if state.is_relay_port(from));
        if via_port {
            peer.counters.relay_rx_packets.fetch_add(1, Relaxed);
        }
        match state.tunn.decapsulate(from_ip, datagram, out) {
            TunnResult::WriteToNetwork(reply) => {
                let authenticated = reply.first() != Some(&COOKIE_REPLY);
                if authenticated {
                    state.roam(source, now);
                    if (relayed || via_port) && matches!(packet, Packet::HandshakeInit(_)) {
                        // A new session offered through the relay: the peer
                        // restarted, or another replica of its gateway took
                        // over, and the direct path we had may lead to the
                        // old one. One its path machine found must answer
                        // at once or is given up; one it never checked
                        // (learnt by roaming) is left for the relay now.
                        match state.paths.as_mut() {
                            Some(paths) if paths.path() == Path::Relay => state.endpoint = None,
                            Some(paths) => paths.notify_relayed_handshake(now),
                            None => {}
                        }
                    }
                }
                self.reply(source, reply, io);
                // Packets that waited for our handshake go out now. Not
                // after we answered the peer's initiation: that session is
                // not confirmed, and asking boringtun to send now would make
                // it start another initiation that replaces ours while its
                // answer is on the way.
                if !matches!(packet, Packet::HandshakeInit(_)) {
                    while let TunnResult::WriteToNetwork(queued) =
                        state.tunn.decapsulate(None, &[], out)
                    {
                        self.send_to_peer(peer, state.send_addr(), queued, io);
                    }
                }
                None
            }
            TunnResult::WriteToTunnelV4(inner, src) => {
                state.roam(source, now);
                drop(state);
                self.deliver(peer, inner, IpAddr::V4(src), relayed)
                    .then_some(inner.len())
            }
            TunnResult::WriteToTunnelV6(inner, src) => {
                state.roam(source, now);
                drop(state);
                self.deliver(peer, inner, IpAddr::V6(src), relayed)
                    .then_some(inner.len())
            }
            TunnResult::Done => {
                // A keepalive or a completed handshake: authenticated either way.
                if matches!(packet, Packet::PacketData(_) | Packet::HandshakeResponse(_)) {
                    state.roam(source, now);
                }
                // The peer is under load and sent a cookie for our handshake:
                // initiate again now, with it, rather than after boringtun's
                // 5-second retry. (A cookie reply decrypts only for our latest
                // handshake message, so this happens once per message.)
                if matches!(packet, Packet::PacketCookieReply(_))
                    && let TunnResult::WriteToNetwork(init) =
                        state.tunn.format_handshake_initiation(out, true)
                {
                    self.reply(source, init, io);
                }
                None
            }
            TunnResult::Err(e) => {
                if matches!(packet, Packet::PacketData(_)) && is_stale_session(&e) {
                    self.offer_new_session(peer, &mut state, source, io);
                }
                drop(state);
                self.drop_packet(
                    Some(peer),
                    DropReason::Rejected,
                    format_args!("from {source}: {e:?}"),
                );
                None
            }
        }
    }

    /// The peer sends data under a session we do not have: it is talking
    /// to another holder of our key (the other replica of our gateway,
    /// before a failover or while both were active, or our own previous
    /// run). Offer it a new session now, where the data came from, rather
    /// than after WireGuard's 15 s of unanswered traffic. At most one
    /// initiation per [`STALE_SESSION_GRACE`] and none while one is
    /// pending: a spoofed packet gains nothing but a handshake.
    fn offer_new_session(
        &self,
        peer: &Arc<Peer>,
        state: &mut super::PeerState,
        source: Source,
        io: &mut impl Io,
    ) {
        if state
            .tunn
            .time_since_last_handshake()
            .is_some_and(|age| age < STALE_SESSION_GRACE)
        {
            return;
        }
        let mut buf = [0u8; 256];
        if let TunnResult::WriteToNetwork(init) =
            state.tunn.format_handshake_initiation(&mut buf, false)
        {
            tracing::debug!(
                peer = peer.name(),
                "data under a session we do not have: new handshake"
            );
            self.reply(source, init, io);
        }
    }

    /// Whether a decrypted packet may go to the kernel: its source is the
    /// peer's and the allow-list lets it in. Translates its source to our
    /// view and clamps the MSS of a SYN on the way; counts it as received.
    fn deliver(&self, peer: &Arc<Peer>, inner: &mut [u8], src: IpAddr, relayed: bool) -> bool {
        let Some(view) = peer.view_of_source(src) else {
            self.drop_packet(
                Some(peer),
                DropReason::SpoofedSource,
                format_args!("inner source {src} is outside the peer's cidrs"),
            );
            return false;
        };
        // Parsed once, before the source is translated: the checks below look
        // at the destination, protocol and ports, which translation keeps.
        let summary = match packet::parse(inner) {
            Ok(summary) => summary,
            Err(e) => {
                self.drop_packet(
                    Some(peer),
                    DropReason::Malformed,
                    format_args!("packet from {src}: {e}"),
                );
                return false;
            }
        };
        if view.is_remapped()
            && let Err(e) = view.ingress_parsed(inner, &summary)
        {
            self.drop_packet(
                Some(peer),
                DropReason::Malformed,
                format_args!("remapping packet from {src}: {e}"),
            );
            return false;
        }
        if !self.pod_cidrs.iter().any(|c| c.contains(&summary.dst)) {
            self.drop_packet(
                Some(peer),
                DropReason::NotExported,
                format_args!("from {src} to {}: not exported", summary.dst),
            );
            return false;
        }
        if let Verdict::Deny(reason) = packet::allowed(&peer.allow, &summary) {
            self.drop_packet(
                Some(peer),
                DropReason::from_deny(reason),
                format_args!(
                    "{src} -> {} proto {} port {:?}: {}",
                    summary.dst,
                    summary.protocol,
                    summary.dst_port,
                    reason.label()
                ),
            );
            return false;
        }
        if summary.is_tcp_syn() {
            packet::clamp_mss(inner, self.mss(summary.dst.is_ipv6(), relayed));
        }
        peer.counters.rx_packets.fetch_add(1, Relaxed);
        peer.counters
            .rx_bytes
            .fetch_add(inner.len() as u64, Relaxed);
        true
    }
}

/// The address that stands for the relay link to the peer with `id` in
/// WireGuard's cookie mechanism: a multicast address (ff0e::/16 prefix
/// with a private tag), which is never the source of a datagram on the
/// UDP socket, so no one can share a relayed peer's cookies.
pub(crate) fn relay_cookie_address(id: u32) -> IpAddr {
    let [a, b, c, d] = id.to_be_bytes();
    IpAddr::V6(std::net::Ipv6Addr::new(
        0xff0e,
        0x6361,
        0x7573,
        0x6577,
        0x6179,
        0,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
    ))
}

fn is_link_local_noise(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast() || a.is_unicast_link_local(),
    }
}

/// What the core's unit tests share: a recording [`Io`] and a site.
#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests_support {
    use super::*;
    use crate::core::{SiteParams, TraversalParams};
    use x25519_dalek::{PublicKey, StaticSecret};

    /// Collects what a site hands to the relay and sends over UDP.
    #[derive(Default)]
    pub(super) struct Wire {
        pub(super) relayed: Vec<Vec<u8>>,
        pub(super) sent: Vec<(SocketAddr, Vec<u8>)>,
    }

    impl Io for Wire {
        fn send(&mut self, to: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
            self.sent.push((to, bytes.to_vec()));
            Ok(())
        }
        fn send_with_ttl(&mut self, to: SocketAddr, bytes: &[u8], _: u8) -> std::io::Result<()> {
            self.send(to, bytes)
        }
        fn relay(&mut self, _: &Arc<Peer>, bytes: &[u8]) -> bool {
            self.relayed.push(bytes.to_vec());
            true
        }
        fn publish_candidates(&mut self, _: &[SocketAddr]) {}
    }

    /// A site with traversal (so a relay) whose only peer has `peer_secret`.
    pub(super) fn site(secret: [u8; 32], peer_secret: [u8; 32], own: &str, peer: &str) -> Site {
        let peer_cidr: ipnet::IpNet = peer.parse().unwrap();
        let cfg = crate::config::PeerConfig {
            name: "peer".to_owned(),
            public_key: PublicKey::from(&StaticSecret::from(peer_secret)),
            cidrs: vec![peer_cidr],
            views: vec![crate::packet::View::identity(peer_cidr)],
            allow: Vec::new(),
            endpoint: None,
            persistent_keepalive: None,
        };
        Site::new(
            SiteParams {
                private_key: StaticSecret::from(secret),
                pod_cidrs: vec![own.parse().unwrap()],
                mtu: 1420,
                traversal: Some(TraversalParams::new(Vec::new(), Vec::new(), Vec::new())),
                seed: u64::from(secret[0]),
                role: crate::core::Role::Active,
            },
            &[cfg],
            Instant::now(),
        )
    }

    /// An ICMP echo request from `src` to `dst`.
    pub(super) fn ping(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0xf7, 0xfe,
            0, 1, 0, 0,
        ];
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let mut sum: u32 = p[..20]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        p
    }

    pub(super) fn has_session(site: &Site) -> bool {
        let peers = site.peers();
        let state = peers.get(0).lock();
        state.tunn.time_since_last_handshake().is_some()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::tests_support::*;
    use super::*;
    use x25519_dalek::StaticSecret;

    #[test]
    fn relayed_handshake_completes_while_the_udp_port_is_flooded() {
        let (sa, sb) = ([0xA1; 32], [0xB2; 32]);
        let a = site(sa, sb, "10.0.0.0/16", "10.1.0.0/16");
        let b = site(sb, sa, "10.1.0.0/16", "10.0.0.0/16");
        let now = Instant::now();
        // A flood of initiations with a valid mac1 (anyone who knows B's
        // public key can make them) puts B's rate limiter under load.
        let flooder = StaticSecret::from([0xEE; 32]);
        let mut tunn = boringtun::noise::Tunn::new(flooder, *b.public_key(), None, None, 1, None);
        let attacker: SocketAddr = "203.0.113.66:4000".parse().unwrap();
        let mut flood_io = Wire::default();
        let mut buf = [0u8; 2048];
        let mut out = [0u8; 2048];
        let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, true)
        else {
            panic!("no initiation");
        };
        let init = init.to_vec();
        for _ in 0..super::super::HANDSHAKE_RATE_LIMIT + 100 {
            let peers = b.peers();
            b.decapsulate(
                now,
                &peers,
                Source::Udp(attacker),
                &init,
                &mut out,
                &mut flood_io,
            );
        }
        assert!(
            flood_io.sent.iter().any(|(_, m)| m[0] == COOKIE_REPLY),
            "B is under load: the flood gets cookies"
        );

        // A and B reach each other only through the relay.
        let (a_key, b_key) = (a.public_key().to_bytes(), b.public_key().to_bytes());
        let mut to_b = Wire::default();
        a.handle_peer_update(now, &b_key, Vec::new(), true, &mut to_b);
        assert_eq!(to_b.relayed.len(), 1, "A initiates through the relay");
        for _ in 0..10 {
            let mut to_a = Wire::default();
            for m in std::mem::take(&mut to_b.relayed) {
                let peers = b.peers();
                b.decapsulate_relayed(now, &peers, &a_key, &m, &mut out, &mut to_a);
            }
            for m in to_a.relayed {
                let peers = a.peers();
                a.decapsulate_relayed(now, &peers, &b_key, &m, &mut out, &mut to_b);
            }
        }
        assert!(
            has_session(&a) && has_session(&b),
            "no handshake under load"
        );
        assert_eq!(b.drops.get(DropReason::Malformed), 0);
    }

    /// Relays everything queued between `x` (key `x_key`) and `y` (key
    /// `y_key`) back and forth until neither has anything more to say.
    fn exchange(x: &Site, y: &Site, mut to_y: Wire) {
        let (x_key, y_key) = (x.public_key().to_bytes(), y.public_key().to_bytes());
        let mut out = [0u8; 2048];
        for _ in 0..10 {
            let mut to_x = Wire::default();
            for m in std::mem::take(&mut to_y.relayed) {
                let peers = y.peers();
                y.decapsulate_relayed(Instant::now(), &peers, &x_key, &m, &mut out, &mut to_x);
            }
            for m in to_x.relayed {
                let peers = x.peers();
                x.decapsulate_relayed(Instant::now(), &peers, &y_key, &m, &mut out, &mut to_y);
            }
        }
    }

    #[test]
    fn a_standby_sends_nothing_and_takes_over_with_a_handshake() {
        use crate::core::Role;
        let (sa, sb) = ([0xA1; 32], [0xB2; 32]);
        let a = site(sa, sb, "10.0.0.0/16", "10.1.0.0/16");
        let standby = site(sa, sb, "10.0.0.0/16", "10.1.0.0/16");
        let b = site(sb, sa, "10.1.0.0/16", "10.0.0.0/16");
        let mut quiet = Wire::default();
        assert!(standby.set_role(Role::Standby, &mut quiet));
        assert!(!standby.set_role(Role::Standby, &mut quiet), "no change");
        let now = Instant::now();
        let b_key = b.public_key().to_bytes();

        // A and B talk (through the relay); B believes in a direct path to A.
        let mut to_b = Wire::default();
        a.handle_peer_update(now, &b_key, Vec::new(), true, &mut to_b);
        exchange(&a, &b, to_b);
        assert!(has_session(&a) && has_session(&b));
        let old: SocketAddr = "198.51.100.7:51820".parse().unwrap();
        b.peers().get(0).lock().endpoint = Some(old);

        // The standby hears the rendezvous, B's packets, its timers: and
        // says nothing, counting what reached it.
        let mut out = [0u8; 2048];
        let mut to_b = Wire::default();
        standby.handle_peer_update(now, &b_key, Vec::new(), true, &mut quiet);
        standby.handle_timeout(now + std::time::Duration::from_secs(30), &mut quiet);
        let mut tunn = boringtun::noise::Tunn::new(
            StaticSecret::from(sb),
            *standby.public_key(),
            None,
            None,
            9,
            None,
        );
        let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut out, true)
        else {
            panic!("no initiation");
        };
        let init = init.to_vec();
        let peers = standby.peers();
        let from = Source::Udp("198.51.100.9:51820".parse().unwrap());
        assert_eq!(
            standby.decapsulate(now, &peers, from, &init, &mut out, &mut quiet),
            None
        );
        assert!(
            quiet.sent.is_empty() && quiet.relayed.is_empty(),
            "a standby sent something"
        );
        assert_eq!(standby.drops.get(DropReason::Standby), 1);
        assert!(!has_session(&standby));

        // A fails; the standby takes over. Once the rendezvous says B is
        // online, it initiates through the relay, and B, which still
        // believes in its direct path to the old A, answers through the
        // relay and sends there from now on.
        assert!(standby.set_role(Role::Active, &mut to_b));
        standby.handle_peer_update(now, &b_key, Vec::new(), true, &mut to_b);
        assert_eq!(to_b.relayed.len(), 1, "one initiation, through the relay");
        exchange(&standby, &b, to_b);
        assert!(
            has_session(&standby),
            "the new active completed a handshake"
        );
        assert_eq!(
            b.peers().get(0).lock().endpoint,
            None,
            "B left the dead direct path"
        );

        // Handing the role back forgets the sessions.
        assert!(standby.set_role(Role::Standby, &mut quiet));
        assert!(!has_session(&standby));
        assert!(quiet.sent.is_empty() && quiet.relayed.is_empty());
    }

    #[test]
    fn data_under_a_session_we_do_not_have_gets_a_new_handshake_once_a_second() {
        let (sa, sb) = ([0xA1; 32], [0xB2; 32]);
        let a = site(sa, sb, "10.0.0.0/16", "10.1.0.0/16");
        let other = site(sa, sb, "10.0.0.0/16", "10.1.0.0/16");
        let b = site(sb, sa, "10.1.0.0/16", "10.0.0.0/16");
        let now = Instant::now();
        let b_key = b.public_key().to_bytes();
        // A and B have a session; then the other replica with A's key
        // makes one with B, and B sends data under it.
        let mut to_b = Wire::default();
        a.handle_peer_update(now, &b_key, Vec::new(), true, &mut to_b);
        exchange(&a, &b, to_b);
        let mut to_b = Wire::default();
        other.handle_peer_update(now, &b_key, Vec::new(), true, &mut to_b);
        exchange(&other, &b, to_b);
        assert!(has_session(&a) && has_session(&other) && has_session(&b));
        // An ICMP echo from B's pod 10.1.0.5 to A's pod 10.0.0.7.
        let mut ping = ping([10, 1, 0, 5], [10, 0, 0, 7]);
        let (mut out, mut icmp) = ([0u8; 2048], [0u8; 2048]);
        let mut to_a = Wire::default();
        let peers = b.peers();
        b.encapsulate(now, &peers, &mut ping, &mut out, &mut icmp, &mut to_a);
        let data = to_a
            .relayed
            .pop()
            .expect("B sends its data through the relay");

        // A cannot read it: it offers a new session where it came from.
        // A's session is a moment old, so only after a second.
        let from = Source::Udp("198.51.100.20:51820".parse().unwrap());
        let mut answers = Wire::default();
        let peers = a.peers();
        a.decapsulate(now, &peers, from, &data, &mut out, &mut answers);
        assert!(
            answers.sent.is_empty(),
            "a handshake younger than a second is kept"
        );
        std::thread::sleep(STALE_SESSION_GRACE);
        a.decapsulate(Instant::now(), &peers, from, &data, &mut out, &mut answers);
        assert_eq!(answers.sent.len(), 1, "one new handshake");
        assert_eq!(answers.sent[0].1[0], 1, "a handshake initiation");
        // More of it: no second initiation while that one is pending.
        for _ in 0..10 {
            a.decapsulate(Instant::now(), &peers, from, &data, &mut out, &mut answers);
        }
        assert_eq!(answers.sent.len(), 1);
        assert!(a.peers().get(0).counters.drops.get(DropReason::Rejected) >= 12);
    }
}

/// Random schedules of the start of a pair: initiations through the relay
/// from both sides, a direct path found by either side at any moment (with
/// its handshake kick), data, and every message delayed, reordered or
/// duplicated (a lost handshake message waits for WireGuard's retry
/// timer, which is not what this is about). Once the network is quiet, each side's data must be
/// readable by the other within a few round trips and without any time
/// passing: the pair must never depend on a timer to agree on a session.
#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod crossing {
    use super::tests_support::*;
    use super::*;
    use rand::{Rng as _, SeedableRng as _};

    const A_ADDR: &str = "192.0.2.1:51820";
    const B_ADDR: &str = "192.0.2.2:51820";

    /// A message on its way: to A (`true`) or B, relayed or over UDP.
    #[derive(Clone, Debug)]
    struct Msg {
        id: usize,
        to_a: bool,
        relayed: bool,
        bytes: Vec<u8>,
    }

    struct Net {
        a: Site,
        b: Site,
        flight: Vec<Msg>,
        sent: usize,
        log: Vec<String>,
    }

    impl Net {
        fn site(&self, a: bool) -> &Site {
            if a { &self.a } else { &self.b }
        }

        /// Queues what `from_a`'s side just emitted.
        fn emit(&mut self, from_a: bool, wire: Wire) {
            let messages = (wire.relayed.into_iter().map(|b| (true, b)))
                .chain(wire.sent.into_iter().map(|(_, b)| (false, b)));
            for (relayed, bytes) in messages {
                let id = self.sent;
                self.sent += 1;
                self.log.push(format!(
                    "  #{id}: type {} from {} ({})",
                    bytes[0],
                    if from_a { "A" } else { "B" },
                    if relayed { "relay" } else { "udp" },
                ));
                self.flight.push(Msg {
                    id,
                    to_a: !from_a,
                    relayed,
                    bytes,
                });
            }
        }

        /// Hands `m` to its site; whether it came out as an inner packet.
        fn deliver(&mut self, m: &Msg) -> bool {
            let mut out = [0u8; 2048];
            let mut wire = Wire::default();
            let to = self.site(m.to_a);
            let peers = to.peers();
            let (from_key, from_addr) = if m.to_a {
                (self.b.public_key().to_bytes(), B_ADDR)
            } else {
                (self.a.public_key().to_bytes(), A_ADDR)
            };
            let inner = if m.relayed {
                to.decapsulate_relayed(
                    Instant::now(),
                    &peers,
                    &from_key,
                    &m.bytes,
                    &mut out,
                    &mut wire,
                )
            } else {
                let source = Source::Udp(from_addr.parse().unwrap());
                to.decapsulate(
                    Instant::now(),
                    &peers,
                    source,
                    &m.bytes,
                    &mut out,
                    &mut wire,
                )
            };
            self.log.push(format!(
                "deliver #{}{}",
                m.id,
                if inner.is_some() { ": data read" } else { "" }
            ));
            self.emit(m.to_a, wire);
            inner.is_some()
        }

        /// `from_a`'s side sends a ping to the other's pod.
        fn data(&mut self, from_a: bool) {
            let mut packet = if from_a {
                ping([10, 0, 0, 7], [10, 1, 0, 5])
            } else {
                ping([10, 1, 0, 5], [10, 0, 0, 7])
            };
            let (mut out, mut icmp) = ([0u8; 2048], [0u8; 2048]);
            let mut wire = Wire::default();
            let site = self.site(from_a);
            let peers = site.peers();
            let outbound = site.encapsulate(
                Instant::now(),
                &peers,
                &mut packet,
                &mut out,
                &mut icmp,
                &mut wire,
            );
            if let Outbound::Send { to, len } = outbound {
                wire.sent.push((to, out[..len].to_vec()));
            }
            self.log
                .push(format!("data from {}", if from_a { "A" } else { "B" }));
            self.emit(from_a, wire);
        }

        /// `from_a`'s side finds the direct path and kicks a handshake.
        fn direct(&mut self, from_a: bool) {
            let mut wire = Wire::default();
            let site = self.site(from_a);
            let peers = site.peers();
            let peer = peers.get(0);
            {
                let mut state = peer.lock();
                let other = if from_a { B_ADDR } else { A_ADDR };
                state.endpoint = Some(other.parse().unwrap());
                site.kick_handshake(peer, &mut state, &mut wire);
            }
            self.log
                .push(format!("direct path at {}", if from_a { "A" } else { "B" }));
            self.emit(from_a, wire);
        }

        /// `at_a`'s side hears from the rendezvous that the other is online.
        fn online(&mut self, at_a: bool) {
            let mut wire = Wire::default();
            let site = self.site(at_a);
            let other = if at_a { &self.b } else { &self.a };
            site.handle_peer_update(
                Instant::now(),
                &other.public_key().to_bytes(),
                Vec::new(),
                true,
                &mut wire,
            );
            self.log
                .push(format!("online at {}", if at_a { "A" } else { "B" }));
            self.emit(at_a, wire);
        }

        /// Delivers everything in flight, in order, until quiet.
        fn drain(&mut self) -> (usize, usize) {
            let (mut read_by_a, mut read_by_b) = (0, 0);
            while !self.flight.is_empty() {
                let m = self.flight.remove(0);
                if self.deliver(&m) {
                    if m.to_a {
                        read_by_a += 1;
                    } else {
                        read_by_b += 1;
                    }
                }
            }
            (read_by_a, read_by_b)
        }
    }

    #[test]
    fn a_pair_agrees_on_a_session_whatever_the_order_of_its_start() {
        let (sa, sb) = ([0xA1; 32], [0xB2; 32]);
        let mut failed = Vec::new();
        for seed in 0..2000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut net = Net {
                a: site(sa, sb, "10.0.0.0/16", "10.1.0.0/16"),
                b: site(sb, sa, "10.1.0.0/16", "10.0.0.0/16"),
                flight: Vec::new(),
                sent: 0,
                log: Vec::new(),
            };
            // The start: each event at most once, except data and delivery.
            let mut events = vec!["online A", "online B", "direct A", "direct B"];
            for _ in 0..rng.gen_range(4..40) {
                let k = rng.gen_range(0..10);
                if k < 2 && !events.is_empty() {
                    let e = events.remove(rng.gen_range(0..events.len()));
                    match e {
                        "online A" => net.online(true),
                        "online B" => net.online(false),
                        "direct A" => net.direct(true),
                        _ => net.direct(false),
                    }
                } else if k < 4 {
                    net.data(rng.gen_bool(0.5));
                } else if !net.flight.is_empty() {
                    let i = rng.gen_range(0..net.flight.len());
                    let m = net.flight[i].clone();
                    match rng.gen_range(0..10) {
                        0 => {
                            net.deliver(&m); // duplicated: it stays in flight
                        }
                        _ => {
                            net.flight.remove(i);
                            net.deliver(&m);
                        }
                    }
                }
            }
            // Whatever did not happen yet happens now: both online, direct.
            for e in events {
                match e {
                    "online A" => net.online(true),
                    "online B" => net.online(false),
                    "direct A" => net.direct(true),
                    _ => net.direct(false),
                }
            }
            net.drain();
            // Now both sides talk, a few round trips, no time passing.
            let mut read = (0, 0);
            for _ in 0..4 {
                net.data(true);
                net.data(false);
                let (by_a, by_b) = net.drain();
                read = (read.0 + by_a, read.1 + by_b);
            }
            let last = {
                net.data(true);
                net.data(false);
                net.drain()
            };
            if last != (1, 1) {
                failed.push(format!(
                    "seed {seed}: after the start, A read {} and B read {} of the last round's \
                     data ({read:?} in 4 rounds before)\n{}",
                    last.0,
                    last.1,
                    net.log.join("\n")
                ));
            }
        }
        assert!(
            failed.is_empty(),
            "{} of 2000 schedules end with data nobody can read; the first:\n{}",
            failed.len(),
            failed[0]
        );
    }
}
