//! TUN → encrypt → UDP.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use causeway_netlink::{MAX_SEGMENTS, RECV_SCRATCH};

use super::udp::MAX_GSO_BYTES;
use super::{BATCH, Ctx, Stop, wait_fd};
use crate::core::{DropReason, Outbound};

/// The largest IPv4 or IPv6 packet (without jumbograms).
const MAX_IP_PACKET: usize = 65_535;

/// Room an encrypted packet may need beyond its plaintext: WireGuard's 32
/// bytes, or a whole 148-byte handshake initiation sent instead.
const OVERHEAD: usize = 148;

/// Encrypted packets of one batch, laid out back to back so that a run of
/// equal-size packets to one endpoint goes out as one GSO send.
struct SendQueue {
    arena: Vec<u8>,
    used: usize,
    runs: Vec<Run>,
}

/// Consecutive datagrams in the arena for one destination, all `segment`
/// bytes long except possibly the last.
struct Run {
    dst: SocketAddr,
    start: usize,
    segment: usize,
    len: usize,
    closed: bool,
}

impl SendQueue {
    fn new(mtu: usize) -> Self {
        SendQueue {
            arena: vec![0; BATCH * (mtu + OVERHEAD)],
            used: 0,
            runs: Vec::with_capacity(BATCH),
        }
    }

    /// Space for the next packet.
    fn slot(&mut self, plaintext: usize) -> &mut [u8] {
        let end = (self.used + plaintext + OVERHEAD).min(self.arena.len());
        &mut self.arena[self.used..end]
    }

    /// Accepts the `len` bytes just written at the slot, bound for `dst`.
    fn commit(&mut self, dst: SocketAddr, len: usize, max_segments: usize) {
        let extend = match self.runs.last_mut() {
            Some(run) => {
                let fits = !run.closed
                    && run.dst == dst
                    && len <= run.segment
                    && run.start + run.len == self.used
                    && run.len / run.segment < max_segments
                    && run.len + len <= MAX_GSO_BYTES;
                if fits {
                    run.len += len;
                    run.closed = len < run.segment;
                }
                fits
            }
            None => false,
        };
        if !extend {
            self.runs.push(Run {
                dst,
                start: self.used,
                segment: len,
                len,
                closed: false,
            });
        }
        self.used += len;
    }

    fn flush(&mut self, ctx: &Ctx) {
        for run in self.runs.drain(..) {
            let bytes = &self.arena[run.start..run.start + run.len];
            let segment = (run.len > run.segment).then_some(run.segment);
            if let Err(e) = ctx.udp.send(run.dst, bytes, segment) {
                let n = run.len.div_ceil(run.segment);
                for _ in 0..n {
                    ctx.site.drop_packet(
                        None,
                        DropReason::IoError,
                        format_args!("send to {}: {e}", run.dst),
                    );
                }
            }
        }
        self.used = 0;
    }
}

pub(super) fn run(ctx: &Ctx, stop: &Stop) {
    let mtu = ctx.site.mtu();
    // The kernel hands over TCP super-packets of up to 64 KiB, split here
    // into segments that each fit the MTU. A plain packet is copied whole,
    // so that one over the MTU is seen as such and answered with ICMP
    // rather than cut. One arena, touched only where packets land.
    let mut arena = vec![0u8; BATCH * MAX_IP_PACKET];
    let mut bufs: Vec<&mut [u8]> = arena.chunks_exact_mut(MAX_IP_PACKET).collect();
    let mut lens = [0usize; BATCH];
    let mut scratch = vec![0u8; RECV_SCRATCH].into_boxed_slice();
    let mut icmp = vec![0u8; 1280].into_boxed_slice();
    let mut queue = SendQueue::new(mtu);
    loop {
        let mut n = 0;
        // Another read only while a whole super-packet still fits.
        while BATCH - n >= MAX_SEGMENTS {
            match ctx
                .tun
                .recv_segments(&mut scratch, &mut bufs[n..], &mut lens[n..])
            {
                Ok(segments) => n += segments,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => ctx.site.drop_packet(
                    None,
                    DropReason::Malformed,
                    format_args!("offloaded packet from TUN: {e}"),
                ),
                Err(e) => {
                    // The interface was deleted (EBADFD) or the device
                    // failed: polling again would spin. The thread ends, so
                    // /healthz and the watchdog report the data path down.
                    tracing::error!(
                        "reading from TUN {}: {e}; the outbound packet thread stops",
                        ctx.tun.name()
                    );
                    return;
                }
            }
        }
        if n == 0 {
            match wait_fd(ctx.tun.as_fd(), libc::POLLIN, Some(stop), -1) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    tracing::error!("poll TUN: {e}");
                    return;
                }
            }
        }
        // One peer-table snapshot per batch, not per packet.
        let peers = ctx.site.peers();
        let mut io = ctx.io();
        let now = std::time::Instant::now();
        for (buf, &len) in bufs.iter_mut().zip(&lens[..n]) {
            let packet = &mut buf[..len];
            let out = queue.slot(packet.len());
            match ctx
                .site
                .encapsulate(now, &peers, packet, out, &mut icmp, &mut io)
            {
                Outbound::Send { to, len } => queue.commit(to, len, ctx.udp.max_segments()),
                Outbound::Icmp(len) => {
                    let _ = ctx.tun.send(&icmp[..len]);
                }
                Outbound::Done => {}
            }
        }
        queue.flush(ctx);
    }
}
