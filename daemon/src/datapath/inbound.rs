//! UDP → decrypt → TUN.

use std::io::{self, IoSliceMut};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use causeway_netlink::{GroTable, TUN_HEADROOM};
use quinn_udp::RecvMeta;

use super::backlog::{Backlog, SMALL};
use super::udp::canonical;
use super::{Ctx, Stop, wait_fd};
use crate::core::{DropReason, Source};

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

/// Decrypted bulk packets held at most (see [`Backlog`]): more than the
/// standing queue one bulk TCP stream builds (about 700 datagrams here).
const BACKLOG: usize = 3072;
/// The socket is read again only while the backlog holds at most this
/// many, so that what one `recvmmsg` brings (up to 32 GRO bursts of about
/// 45 datagrams) usually fits; when it does not, the backlog is written
/// out in order to make room.
const READ_BELOW: usize = 1024;
/// How long after the last small packet bulk is still held back. Holding
/// costs a copy of every bulk packet (decrypted into the backlog, then
/// into the TUN batch, out of cache by then: about a tenth more CPU on
/// this path), so under bulk alone, with no small packet to let ahead,
/// the thread decrypts straight into the TUN batch as before.
const HOLD_FOR: Duration = Duration::from_millis(10);

pub(super) fn run(ctx: &Ctx, stop: &Stop) {
    let mut bufs: Vec<Box<[u8]>> = (0..RECV_BATCH)
        .map(|_| vec![0u8; RECV_BUF].into_boxed_slice())
        .collect();
    let mut meta = [RecvMeta::default(); RECV_BATCH];
    let mut batch = TunBatch::new(TUN_BATCH, ctx.site.mtu());
    let mut backlog = Backlog::new(BACKLOG, batch.slot);
    let mut last_small: Option<Instant> = None;
    loop {
        // Reading and decrypting come first, writing the held bulk after:
        // a small packet is read out of the socket's FIFO sooner and waits
        // only for the decryption of what is ahead of it, not for its
        // writing (see `backlog`).
        if backlog.len() <= READ_BELOW {
            let received = {
                let mut slices = bufs.iter_mut();
                let mut iovs: [IoSliceMut<'_>; RECV_BATCH] = std::array::from_fn(|_| {
                    IoSliceMut::new(slices.next().map_or(&mut [][..], |b| &mut b[..]))
                });
                ctx.udp.recv(&mut iovs, &mut meta)
            };
            match received {
                Ok(n) => {
                    let now = Instant::now();
                    let hold = last_small.is_some_and(|t| now.duration_since(t) < HOLD_FOR);
                    let state = (&mut batch, &mut backlog);
                    if handle_batch(ctx, now, &bufs, &meta[..n], state, hold) {
                        last_small = Some(now);
                    }
                    // What may go ahead, now.
                    batch.flush(ctx);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && backlog.is_empty() => {
                    match wait_fd(ctx.udp.as_fd(), libc::POLLIN, Some(stop), -1) {
                        Ok(true) => continue,
                        Ok(false) => return,
                        Err(e) => {
                            tracing::error!("poll UDP: {e}");
                            return;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // e.g. ICMP port unreachable reported on the socket: not fatal.
                    tracing::debug!("UDP receive: {e}");
                    continue;
                }
            }
        }
        write_held(ctx, &mut backlog, &mut batch);
    }
}

/// Handles what one `recvmmsg` brought, in order; bulk goes through the
/// backlog when `hold`, else straight into the TUN batch. Returns whether
/// a small packet was decrypted.
fn handle_batch(
    ctx: &Ctx,
    now: Instant,
    bufs: &[Box<[u8]>],
    meta: &[RecvMeta],
    (batch, backlog): (&mut TunBatch, &mut Backlog),
    hold: bool,
) -> bool {
    // One peer-table snapshot and one clock reading per batch, not
    // per datagram.
    let peers = ctx.site.peers();
    let mut io = ctx.io();
    let mut small = false;
    if !hold {
        // What is held goes first.
        write_all_held(ctx, backlog, batch);
    }
    for (buf, m) in bufs.iter().zip(meta) {
        let from = canonical(m.addr);
        let stride = m.stride.max(1);
        for datagram in buf[..m.len].chunks(stride) {
            // One socket carries WireGuard, STUN answers and path probes.
            if causeway_nat::udp_relay::is_control(datagram) {
                ctx.site.handle_relay_ack(now, from, datagram);
            } else if causeway_nat::probe::is_probe(datagram) {
                ctx.site.handle_probe(now, from, datagram, &mut io);
            } else if causeway_nat::stun::is_stun(datagram) {
                ctx.site.handle_stun(from, datagram, &mut io);
            } else {
                let source = Source::Udp(from);
                let oversize = datagram.len() > backlog.slot_len();
                if !hold || oversize {
                    // Straight to the TUN batch, after what is held (only
                    // while holding; a datagram too large for a slot is not
                    // one of ours: those fit).
                    write_all_held(ctx, backlog, batch);
                    let out = batch.slot(datagram.len());
                    if let Some(len) = ctx
                        .site
                        .decapsulate(now, &peers, source, datagram, out, &mut io)
                    {
                        small |= len <= SMALL;
                        batch.commit(ctx, len);
                    }
                    continue;
                }
                if backlog.is_full() {
                    // Written in order to make room.
                    write_all_held(ctx, backlog, batch);
                }
                let out = backlog.next_slot();
                let Some(len) = ctx
                    .site
                    .decapsulate(now, &peers, source, datagram, out, &mut io)
                else {
                    continue;
                };
                small |= len <= SMALL;
                if let Some(packet) = backlog.admit(len) {
                    let out = batch.slot(packet.len());
                    out[..packet.len()].copy_from_slice(packet);
                    batch.commit(ctx, packet.len());
                }
            }
        }
    }
    small
}

/// Writes everything held, in order, after what went ahead of it.
fn write_all_held(ctx: &Ctx, backlog: &mut Backlog, batch: &mut TunBatch) {
    while !backlog.is_empty() {
        write_held(ctx, backlog, batch);
    }
}

/// Writes the oldest held packets, one TUN batch of them, after what went
/// ahead of them.
fn write_held(ctx: &Ctx, backlog: &mut Backlog, batch: &mut TunBatch) {
    batch.flush(ctx);
    for _ in 0..TUN_BATCH {
        let Some(packet) = backlog.pop() else { break };
        let out = batch.slot(packet.len());
        out[..packet.len()].copy_from_slice(packet);
        batch.commit(ctx, packet.len());
    }
    batch.flush(ctx);
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
    pub(super) fn slot(&mut self, datagram: usize) -> &mut [u8] {
        let buf = &mut self.bufs[self.used];
        let want = TUN_HEADROOM + datagram.clamp(self.slot, MAX_IP_PACKET);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        &mut buf[TUN_HEADROOM..]
    }

    /// Takes the `len`-byte packet just decrypted into the slot; writes
    /// the batch out once it is full.
    pub(super) fn commit(&mut self, ctx: &Ctx, len: usize) {
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
            ctx.site
                .drop_packet(None, DropReason::IoError, format_args!("write to TUN: {e}"));
        }
        // Buffers keep their lengths: `slot` grows one again when reused.
        self.used = 0;
    }
}
