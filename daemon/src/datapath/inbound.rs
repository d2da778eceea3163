//! UDP → decrypt → TUN.

use std::io::{self, IoSliceMut};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::Relaxed;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, TunnResult};
use causeway_netlink::{GroTable, TUN_HEADROOM};
use quinn_udp::RecvMeta;

use super::udp::canonical;
use super::{Ctx, Source, Stop, wait_fd};
use crate::packet::{self, Verdict};
use crate::peer::{DropReason, Peer, Peers};

/// Buffers per `recvmmsg` (quinn-udp's own batch size on Linux).
const RECV_BATCH: usize = 32;
/// Size of one receive buffer: a whole GRO-coalesced burst must fit, or the
/// kernel would cut it.
const RECV_BUF: usize = 64 * 1024;
/// Decrypted packets written to the TUN per system call at most (before
/// coalescing).
const TUN_BATCH: usize = causeway_netlink::MAX_SEGMENTS;
/// The largest IP packet: a coalesced one grows up to this.
const MAX_IP_PACKET: usize = 65_535;
/// Message type of a WireGuard cookie reply: the one answer boringtun gives
/// without having authenticated the sender.
const COOKIE_REPLY: u8 = 3;

pub(super) fn run(ctx: &Ctx, stop: &Stop) {
    let mut bufs: Vec<Box<[u8]>> = (0..RECV_BATCH)
        .map(|_| vec![0u8; RECV_BUF].into_boxed_slice())
        .collect();
    let mut meta = [RecvMeta::default(); RECV_BATCH];
    let mut batch = TunBatch::new(TUN_BATCH, ctx.mtu);
    let mut cookie = [0u8; 64];
    loop {
        let received = {
            let mut slices = bufs.iter_mut();
            let mut iovs: [IoSliceMut<'_>; RECV_BATCH] = std::array::from_fn(|_| {
                IoSliceMut::new(slices.next().map_or(&mut [][..], |b| &mut b[..]))
            });
            ctx.udp.recv(&mut iovs, &mut meta)
        };
        let n = match received {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match wait_fd(ctx.udp.as_fd(), libc::POLLIN, Some(stop), -1) {
                    Ok(true) => continue,
                    Ok(false) => return,
                    Err(e) => {
                        tracing::error!("poll UDP: {e}");
                        return;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // e.g. ICMP port unreachable reported on the socket: not fatal.
                tracing::debug!("UDP receive: {e}");
                continue;
            }
        };
        // One peer-table snapshot per batch, not per datagram.
        let peers = ctx.peers();
        for (buf, m) in bufs.iter().zip(&meta[..n]) {
            let from = canonical(m.addr);
            let stride = m.stride.max(1);
            for datagram in buf[..m.len].chunks(stride) {
                // One socket carries WireGuard, STUN answers and path probes.
                if causeway_nat::probe::is_probe(datagram) {
                    crate::traversal::on_probe(ctx, from, datagram);
                } else if causeway_nat::stun::is_stun(datagram) {
                    crate::traversal::on_stun(ctx, from, datagram);
                } else {
                    handle(
                        ctx,
                        &peers,
                        Source::Udp(from),
                        datagram,
                        &mut batch,
                        &mut cookie,
                    );
                }
            }
        }
        batch.flush(ctx);
    }
}

/// Decrypted packets on their way to the TUN, written together so that
/// consecutive TCP segments of a flow reach the kernel as one packet.
///
/// Each buffer keeps [`TUN_HEADROOM`] bytes in front of its packet and the
/// capacity of the largest IP packet, so that coalescing never allocates.
pub(crate) struct TunBatch {
    bufs: Vec<Vec<u8>>,
    used: usize,
    /// Bytes a slot offers for decryption unless a datagram needs more.
    slot: usize,
    gro: GroTable,
}

impl TunBatch {
    /// A batch of `capacity` packets; slots of `mtu` plus WireGuard's slack.
    pub(crate) fn new(capacity: usize, mtu: usize) -> Self {
        let slot = mtu.max(1500) + 64;
        TunBatch {
            bufs: (0..capacity.max(1))
                .map(|_| {
                    let mut buf = Vec::with_capacity(TUN_HEADROOM + MAX_IP_PACKET);
                    buf.resize(TUN_HEADROOM + slot, 0);
                    buf
                })
                .collect(),
            used: 0,
            slot,
            gro: GroTable::default(),
        }
    }

    /// Room to decrypt a datagram of `datagram` bytes into (the plaintext
    /// is never longer).
    fn slot(&mut self, datagram: usize) -> &mut [u8] {
        let buf = &mut self.bufs[self.used];
        let want = TUN_HEADROOM + datagram.clamp(self.slot, MAX_IP_PACKET);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        &mut buf[TUN_HEADROOM..]
    }

    /// Takes the `len`-byte packet just decrypted into the slot; writes
    /// the batch out once it is full.
    fn commit(&mut self, ctx: &Ctx, len: usize) {
        self.bufs[self.used].truncate(TUN_HEADROOM + len);
        self.used += 1;
        if self.used == self.bufs.len() {
            self.flush(ctx);
        }
    }

    /// Writes the waiting packets to the TUN.
    pub(crate) fn flush(&mut self, ctx: &Ctx) {
        if self.used == 0 {
            return;
        }
        let bufs = &mut self.bufs[..self.used];
        if let Err(e) = ctx.tun.send_batch(&mut self.gro, bufs) {
            ctx.drop_packet(None, DropReason::IoError, format_args!("write to TUN: {e}"));
        }
        // Buffers keep their lengths: `slot` grows one again when reused.
        self.used = 0;
    }
}

/// Handles one WireGuard datagram that came over UDP from `from`, or
/// through the relay from the peer the relay names.
pub(crate) fn handle(
    ctx: &Ctx,
    peers: &Peers,
    source: Source,
    datagram: &[u8],
    batch: &mut TunBatch,
    cookie: &mut [u8; 64],
) {
    let from_ip = match source {
        Source::Udp(from) => Some(from.ip()),
        Source::Relay(_) => None,
    };
    let relayed = from_ip.is_none();
    let packet = match ctx.rate_limiter.verify_packet(from_ip, datagram, cookie) {
        Ok(packet) => packet,
        Err(TunnResult::WriteToNetwork(reply)) => {
            // Under load: answer with a cookie instead of doing the DH.
            ctx.reply(source, reply);
            return;
        }
        Err(e) => {
            ctx.drop_packet(
                None,
                DropReason::Malformed,
                format_args!("{} bytes from {source}: {e:?}", datagram.len()),
            );
            return;
        }
    };
    let index = match &packet {
        Packet::HandshakeInit(init) => {
            parse_handshake_anon(&ctx.private_key, &ctx.public_key, init)
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
            ctx.drop_packet(
                None,
                DropReason::UnknownPeer,
                format_args!("from {source}: not one of our peers"),
            );
            return;
        }
    };
    let peer = peers.get(index);
    let mut state = peer.lock();
    let out = batch.slot(datagram.len());
    match state.tunn.decapsulate(from_ip, datagram, out) {
        TunnResult::WriteToNetwork(reply) => {
            let authenticated = reply.first() != Some(&COOKIE_REPLY);
            if authenticated {
                state.roam(source);
            }
            ctx.reply(source, reply);
            // Packets that waited for this handshake go out now.
            while let TunnResult::WriteToNetwork(queued) = state.tunn.decapsulate(None, &[], out) {
                ctx.send_to_peer(peer, state.endpoint, queued);
            }
        }
        TunnResult::WriteToTunnelV4(inner, src) => {
            state.roam(source);
            drop(state);
            if deliver(ctx, peer, inner, IpAddr::V4(src), relayed) {
                let len = inner.len();
                batch.commit(ctx, len);
            }
        }
        TunnResult::WriteToTunnelV6(inner, src) => {
            state.roam(source);
            drop(state);
            if deliver(ctx, peer, inner, IpAddr::V6(src), relayed) {
                let len = inner.len();
                batch.commit(ctx, len);
            }
        }
        TunnResult::Done => {
            // A keepalive or a completed handshake: authenticated either way.
            if matches!(packet, Packet::PacketData(_) | Packet::HandshakeResponse(_)) {
                state.roam(source);
            }
        }
        TunnResult::Err(e) => {
            drop(state);
            ctx.drop_packet(
                Some(peer),
                DropReason::Rejected,
                format_args!("from {source}: {e:?}"),
            );
        }
    }
}

/// Whether a decrypted packet may go to the kernel: its source is the
/// peer's and the allow-list lets it in. Translates its source to our view
/// and clamps the MSS of a SYN on the way; counts it as received.
fn deliver(ctx: &Ctx, peer: &Peer, inner: &mut [u8], src: IpAddr, relayed: bool) -> bool {
    let Some(mapping) = peer.view_of_source(src) else {
        ctx.drop_packet(
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
            ctx.drop_packet(
                Some(peer),
                DropReason::Malformed,
                format_args!("packet from {src}: {e}"),
            );
            return false;
        }
    };
    if mapping.is_remapped()
        && let Err(e) = mapping.ingress_parsed(inner, &summary)
    {
        ctx.drop_packet(
            Some(peer),
            DropReason::Malformed,
            format_args!("remapping packet from {src}: {e}"),
        );
        return false;
    }
    if !ctx.pod_cidrs.iter().any(|c| c.contains(&summary.dst)) {
        ctx.drop_packet(
            Some(peer),
            DropReason::NotExported,
            format_args!("from {src} to {}: not exported", summary.dst),
        );
        return false;
    }
    if let Verdict::Deny(reason) = packet::allowed(&peer.allow, &summary) {
        ctx.drop_packet(
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
        packet::clamp_mss(inner, ctx.mss(summary.dst.is_ipv6(), relayed));
    }
    peer.counters.rx_packets.fetch_add(1, Relaxed);
    peer.counters
        .rx_bytes
        .fetch_add(inner.len() as u64, Relaxed);
    true
}
