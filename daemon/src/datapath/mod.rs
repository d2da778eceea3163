//! The drivers of the site core: they move bytes and time in and out of
//! [`crate::core::Site`], which makes every decision.
//!
//! Two OS threads move packets, each in batches, with segmentation offloads
//! at both ends: `outbound` reads TCP super-packets of up to 64 KiB from
//! the TUN (TSO), splits them into up to [`BATCH`] MTU-size segments,
//! encrypts them into one arena and sends them with as few system calls as
//! possible (UDP GSO for runs of equal-size packets to one endpoint);
//! `inbound` receives up to 32 buffers per `recvmmsg` (each possibly several
//! GRO-coalesced datagrams), decrypts them in order into a backlog and
//! writes that to the TUN through a [`TunBatch`], consecutive TCP segments
//! coalesced again (GRO), so the local stack sees a few large packets. It
//! reads and decrypts before it writes, and a small packet whose flow has
//! nothing in the backlog is written at once, ahead of the bulk (`backlog`;
//! only while small packets arrive: holding costs a copy).
//! Nothing is allocated per packet.
//! A timer task on the control runtime drives the core's timers every
//! 100 ms; the rendezvous tasks (`rendezvous`) carry candidates out, peer
//! updates in and relayed ciphertext both ways.

mod backlog;
mod inbound;
mod outbound;
mod portmap;
mod rendezvous;
mod udp;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use causeway_nat::rendezvous::RendezvousHandle;
use causeway_netlink::Tun;
use tokio::sync::{mpsc, watch};

use crate::core::{Io, Peer, Site};
pub(crate) use inbound::TunBatch;
pub(crate) use rendezvous::{Rendezvous, update_peers};
pub(crate) use udp::UdpPort;

/// Packets (segments) read from the TUN per batch: room for two whole
/// super-packets.
pub(crate) const BATCH: usize = 2 * causeway_netlink::MAX_SEGMENTS;
/// How often the core's timers are driven.
const TIMER_TICK: Duration = Duration::from_millis(100);

/// What the packet threads and the tasks share: the site core and the
/// I/O it is driven with.
pub(crate) struct Ctx {
    pub(crate) site: Site,
    pub(crate) tun: Tun,
    pub(crate) udp: UdpPort,
    /// Where packets for peers without a direct path go, while the
    /// rendezvous clients run (only on the active replica).
    relay: arc_swap::ArcSwapOption<mpsc::Sender<RelayPacket>>,
    /// The site's candidates, as last published by the core; the
    /// rendezvous clients follow it.
    candidates: watch::Sender<Vec<SocketAddr>>,
    /// The rendezvous connections, for relaying and for status.
    pub(crate) rendezvous: std::sync::Mutex<Vec<RendezvousHandle>>,
    /// Packet threads currently running (for the watchdog).
    threads_running: AtomicU64,
}

impl Ctx {
    pub(crate) fn new(site: Site, tun: Tun, udp: UdpPort) -> Self {
        let (candidates, _) = watch::channel(site.candidates());
        Ctx {
            site,
            tun,
            udp,
            relay: arc_swap::ArcSwapOption::empty(),
            candidates,
            rendezvous: std::sync::Mutex::new(Vec::new()),
            threads_running: AtomicU64::new(0),
        }
    }

    /// The I/O the core is driven with.
    pub(crate) fn io(&self) -> Wire<'_> {
        Wire(self)
    }

    /// Whether both packet threads are still running.
    pub(crate) fn alive(&self) -> bool {
        self.threads_running.load(Relaxed) == 2
    }
}

/// The core's [`Io`]: the UDP socket, the relay queue and the candidate
/// channel to the rendezvous clients.
pub(crate) struct Wire<'a>(&'a Ctx);

impl Io for Wire<'_> {
    fn send(&mut self, to: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        self.0.udp.send(to, bytes, None)
    }

    fn send_with_ttl(&mut self, to: SocketAddr, bytes: &[u8], ttl: u8) -> io::Result<()> {
        self.0.udp.send_with_ttl(to, bytes, ttl)
    }

    fn relay(&mut self, peer: &Arc<Peer>, bytes: &[u8]) -> bool {
        self.0.relay.load().as_ref().is_some_and(|queue| {
            queue
                .try_send(RelayPacket {
                    peer: Arc::clone(peer),
                    bytes: bytes.to_vec(),
                })
                .is_ok()
        })
    }

    fn request_relay_port(&mut self, peer: &Peer) {
        // From the first rendezvous that has the peer online (the one the
        // relay sender uses).
        let handles = self.0.rendezvous.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = handles
            .iter()
            .find(|h| h.online_peers().contains(peer.public_key()))
        {
            h.request_relay_port(peer.public_key());
        }
    }

    fn publish_candidates(&mut self, candidates: &[SocketAddr]) {
        // Notifies the clients even when the list is unchanged: the core
        // asks for that on purpose (see `core::traversal`).
        self.0.candidates.send_replace(candidates.to_vec());
    }
}

/// A WireGuard packet for a peer, to go through the relay.
pub(crate) struct RelayPacket {
    /// The peer.
    pub(crate) peer: Arc<Peer>,
    /// The WireGuard message (ciphertext).
    pub(crate) bytes: Vec<u8>,
}

/// Packets for the relay queue up to this depth, then are dropped.
pub(crate) const RELAY_QUEUE: usize = 1024;

/// A shutdown signal the packet threads can poll on (an eventfd).
pub(crate) struct Stop(OwnedFd);

impl Stop {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is checked and then owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Stop(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// Waits until `fd` has `events`, `stop` fires, or `timeout_ms` passes.
/// Returns `Ok(false)` when stopped.
pub(crate) fn wait_fd(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    stop: Option<&Stop>,
    timeout_ms: i32,
) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.map_or(-1, |s| s.0.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd (a negative fd is ignored).
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(true)
        } else {
            Err(e)
        };
    }
    Ok(fds[1].revents == 0)
}

/// The running packet threads.
pub(crate) struct Datapath {
    ctx: Arc<Ctx>,
    stop: Arc<Stop>,
    threads: Vec<JoinHandle<()>>,
    timers: tokio::task::JoinHandle<()>,
}

impl Datapath {
    /// Starts the threads and the timer task (on the current tokio runtime).
    pub(crate) fn start(ctx: Arc<Ctx>) -> io::Result<Self> {
        let stop = Arc::new(Stop::new()?);
        let mut threads = Vec::new();
        for (name, run) in [
            ("cw-outbound", outbound::run as fn(&Ctx, &Stop)),
            ("cw-inbound", inbound::run as fn(&Ctx, &Stop)),
        ] {
            let (ctx, stop) = (Arc::clone(&ctx), Arc::clone(&stop));
            ctx.threads_running.fetch_add(1, Relaxed);
            threads.push(
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || {
                        // Counted down however the thread ends, a panic included.
                        struct Running<'a>(&'a AtomicU64);
                        impl Drop for Running<'_> {
                            fn drop(&mut self) {
                                self.0.fetch_sub(1, Relaxed);
                            }
                        }
                        let _running = Running(&ctx.threads_running);
                        run(&ctx, &stop);
                    })?,
            );
        }
        let timers = tokio::spawn(drive_timers(Arc::clone(&ctx)));
        Ok(Datapath {
            ctx,
            stop,
            threads,
            timers,
        })
    }

    pub(crate) fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// Stops and joins the threads.
    pub(crate) fn stop(self) {
        self.timers.abort();
        self.stop.signal();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Drives the core's timers: boringtun's (handshake retries, rekeying,
/// keepalives), the handshake rate limiter's window, path machines, STUN.
async fn drive_timers(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        ctx.site.handle_timeout(Instant::now(), &mut ctx.io());
    }
}

impl AsFd for Ctx {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.udp.as_fd()
    }
}
