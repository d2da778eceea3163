//! The UDP relay ports' driver: one task per port, around
//! [`crate::udp_relay::RelayPair`]. Batched receive (recvmmsg and GRO) and
//! segmented send (GSO) via quinn-udp, like the daemon's data path: a
//! coalesced batch from one bound site leaves as one send to the other,
//! unchanged and uncopied.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::debug;

use crate::udp_relay::{CONTROL_LEN, DropCause, RelayPair, Verdict};

/// Receive buffers per batch. Each holds up to 64 KiB (one GRO batch).
const BATCH: usize = 8;
/// Socket buffers of a relay port: enough for a burst at a few Gbit/s,
/// small enough not to queue more than about a millisecond.
const SOCKET_BUFFER: usize = 1 << 20;

/// What one site sent through relay ports, cumulative.
#[derive(Debug, Default)]
pub(super) struct SideCounters {
    /// Datagrams forwarded from it.
    pub packets: AtomicU64,
    /// Their bytes.
    pub bytes: AtomicU64,
    /// Datagrams from it dropped: the other site not bound yet, a bind
    /// that does not verify, or a send that failed.
    pub dropped: AtomicU64,
}

/// A bound relay port, ready to [`run`](RelayPort::run).
pub(super) struct RelayPort {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl RelayPort {
    /// Binds `port` on `ip` (the rendezvous' QUIC address; port 0 picks a
    /// free one).
    pub(super) fn bind(ip: std::net::IpAddr, port: u16) -> io::Result<Self> {
        let socket = std::net::UdpSocket::bind((ip, port))?;
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let _ = state.set_recv_buffer_size(UdpSockRef::from(&socket), SOCKET_BUFFER);
        let _ = state.set_send_buffer_size(UdpSockRef::from(&socket), SOCKET_BUFFER);
        Ok(Self {
            socket: UdpSocket::from_std(socket)?,
            state,
        })
    }

    pub(super) fn port(&self) -> io::Result<u16> {
        Ok(self.socket.local_addr()?.port())
    }

    /// Forwards until the task is aborted (the pair stopped being mutual),
    /// nothing arrives for `idle` (the pair is not relaying: a site that
    /// relays binds every 2 s), or the socket fails. `sides` counts per
    /// site, in `pair`'s order; `strangers` counts datagrams from
    /// addresses that are neither site's.
    pub(super) async fn run(
        &self,
        mut pair: RelayPair,
        sides: [Arc<SideCounters>; 2],
        strangers: Arc<AtomicU64>,
        idle: Duration,
    ) {
        let mut storage = vec![vec![0u8; 1 << 16]; BATCH];
        let mut meta = [RecvMeta::default(); BATCH];
        loop {
            let received = self.socket.async_io(Interest::READABLE, || {
                let mut bufs: Vec<IoSliceMut<'_>> =
                    storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                self.state
                    .recv(UdpSockRef::from(&self.socket), &mut bufs, &mut meta)
            });
            let Ok(received) = tokio::time::timeout(idle, received).await else {
                debug!("relay port unused: closing it");
                return;
            };
            let n = match received {
                Ok(n) => n,
                // ICMP errors of an earlier send surface here: not fatal.
                Err(e) if is_transient(&e) => continue,
                Err(e) => {
                    debug!(error = %e, "relay port stops");
                    return;
                }
            };
            for (m, buf) in meta.iter().zip(&storage).take(n) {
                let data = &buf[..m.len];
                let stride = m.stride.max(1);
                let last = match m.len % stride {
                    0 => stride,
                    r => r,
                };
                // The fast path: a bound site's data, forwarded as it came.
                // A bind or ack (30 bytes, which no WireGuard message is)
                // takes the slow path, even as the tail of a GRO batch.
                if let Some((to, side)) = pair.route(m.addr)
                    && stride != CONTROL_LEN
                    && last != CONTROL_LEN
                {
                    let counters = &sides[side];
                    match self.send(to, data, stride).await {
                        Ok(()) => {
                            counters
                                .packets
                                .fetch_add(m.len.div_ceil(stride) as u64, Ordering::Relaxed);
                            counters.bytes.fetch_add(m.len as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            counters
                                .dropped
                                .fetch_add(m.len.div_ceil(stride) as u64, Ordering::Relaxed);
                        }
                    }
                    continue;
                }
                for datagram in data.chunks(stride) {
                    let verdict = pair.handle(m.addr, datagram);
                    let side = |addr| (0..2).find(|&i| pair.addr(i) == Some(addr));
                    match verdict {
                        Verdict::Forward { to, from_side } => {
                            let c = &sides[from_side];
                            if self.send(to, datagram, datagram.len()).await.is_ok() {
                                c.packets.fetch_add(1, Ordering::Relaxed);
                                c.bytes.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                            } else {
                                c.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Verdict::Ack(ack) => {
                            let _ = self.send(m.addr, &ack, CONTROL_LEN).await;
                        }
                        Verdict::Drop(DropCause::Stranger) => {
                            strangers.fetch_add(1, Ordering::Relaxed);
                        }
                        Verdict::Drop(cause) => match side(m.addr) {
                            Some(i) => {
                                sides[i].dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            // A bind that verifies for neither token, from
                            // an address that is not bound.
                            None => {
                                debug_assert_eq!(cause, DropCause::BadControl);
                                strangers.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                    }
                }
            }
        }
    }

    /// Sends `contents` to `to` as datagrams of `stride` bytes (GSO when
    /// there are several), waiting while the socket buffer is full.
    async fn send(&self, to: SocketAddr, contents: &[u8], stride: usize) -> io::Result<()> {
        let max = stride * self.state.max_gso_segments().max(1);
        for chunk in contents.chunks(max) {
            let transmit = Transmit {
                destination: to,
                ecn: None,
                contents: chunk,
                segment_size: (chunk.len() > stride).then_some(stride),
                src_ip: None,
            };
            let sent = self
                .socket
                .async_io(Interest::WRITABLE, || {
                    self.state
                        .try_send(UdpSockRef::from(&self.socket), &transmit)
                })
                .await;
            match sent {
                Ok(()) => {}
                // No GSO on this path after all (quinn-udp turns it off):
                // one by one.
                Err(e)
                    if transmit.segment_size.is_some()
                        && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) =>
                {
                    for datagram in chunk.chunks(stride) {
                        Box::pin(self.send(to, datagram, datagram.len())).await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Errors a UDP socket reports for an earlier datagram (ICMP), after which
/// it keeps working.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EINTR)
    )
}
