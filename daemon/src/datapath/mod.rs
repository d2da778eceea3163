//! The data path: TUN → encrypt → UDP and UDP → decrypt → TUN.
//!
//! Two OS threads move packets, each in batches, with segmentation offloads
//! at both ends: `outbound` reads TCP super-packets of up to 64 KiB from
//! the TUN (TSO), splits them into up to [`BATCH`] MTU-size segments,
//! encrypts them into one arena and sends them with as few system calls as
//! possible (UDP GSO for runs of equal-size packets to one endpoint);
//! `inbound` receives up to 32 buffers per `recvmmsg` (each possibly several
//! GRO-coalesced datagrams), decrypts them into a [`TunBatch`] and writes it
//! to the TUN with consecutive TCP segments coalesced again (GRO), so the
//! local stack sees a few large packets. Nothing is allocated per packet. A timer task on the
//! control runtime drives boringtun's timers (handshake retries, rekeys,
//! keepalives). Bad input is dropped and counted (see [`DropReason`]), and
//! logged at a bounded rate.

mod inbound;
mod outbound;
mod udp;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use causeway_netlink::Tun;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::peer::{DropReason, Drops, Peer, Peers};
pub(crate) use inbound::{TunBatch, handle as inbound_handle};
pub(crate) use udp::UdpPort;

/// Packets (segments) read from the TUN per batch: room for two whole
/// super-packets.
pub(crate) const BATCH: usize = 2 * causeway_netlink::MAX_SEGMENTS;
/// Handshakes per second accepted before WireGuard's cookie mechanism
/// kicks in ("under load"). Each handshake is checked twice (once to find
/// its peer, once inside boringtun), hence the factor.
const HANDSHAKE_RATE_LIMIT: u64 = 2 * 100;
/// Bytes WireGuard adds to an inner packet (header, counter, tag).
const WIREGUARD_DATA_OVERHEAD: usize = 32;
/// No relay MSS below TCP's default (RFC 9293): a relay datagram smaller
/// than that gets fragmented rather than starving TCP.
const MIN_RELAY_MSS: u16 = 536;
/// How often boringtun's timers are driven.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// At most one log line per drop reason in this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// What both packet threads share.
pub(crate) struct Ctx {
    pub(crate) tun: Tun,
    pub(crate) udp: UdpPort,
    /// The peers; swapped as a whole on reload (see [`Ctx::peers`]).
    peer_table: arc_swap::ArcSwap<Peers>,
    pub(crate) private_key: StaticSecret,
    pub(crate) public_key: PublicKey,
    pub(crate) rate_limiter: Arc<RateLimiter>,
    /// Drops not attributable to a peer.
    pub(crate) drops: Drops,
    pub(crate) mtu: usize,
    /// Largest TCP MSS that fits the tunnel, for IPv4 and IPv6.
    pub(crate) max_mss: [u16; 2],
    /// Largest WireGuard packet the relay carries in one datagram (0 until
    /// known); connections set up through the relay get an MSS that fits
    /// it, so that their packets are not fragmented (see [`Ctx::mss`]).
    pub(crate) relay_unfragmented: std::sync::atomic::AtomicUsize,
    /// The local site's exported networks: the only destinations a peer's
    /// packets may have.
    pub(crate) pod_cidrs: Vec<ipnet::IpNet>,
    /// Where packets for peers without a direct path go, once a rendezvous
    /// relay is set up.
    pub(crate) relay: std::sync::OnceLock<tokio::sync::mpsc::Sender<RelayPacket>>,
    /// NAT traversal (STUN, probes, rendezvous), when the site uses a
    /// rendezvous or STUN servers.
    pub(crate) traversal: Option<crate::traversal::Traversal>,
    /// Packet threads currently running (for the watchdog).
    threads_running: AtomicU64,
    started: Instant,
    next_log_ms: [AtomicU64; DropReason::ALL.len()],
}

impl Ctx {
    pub(crate) fn new(
        tun: Tun,
        udp: UdpPort,
        peers: Peers,
        private_key: StaticSecret,
        rate_limiter: Arc<RateLimiter>,
        site: &crate::config::SiteConfig,
        traversal: Option<crate::traversal::Traversal>,
    ) -> Self {
        let mtu = site.mtu;
        Ctx {
            tun,
            udp,
            peer_table: arc_swap::ArcSwap::from_pointee(peers),
            public_key: PublicKey::from(&private_key),
            private_key,
            rate_limiter,
            drops: Drops::default(),
            mtu: usize::from(mtu),
            max_mss: [
                crate::packet::max_mss(mtu, false),
                crate::packet::max_mss(mtu, true),
            ],
            relay_unfragmented: std::sync::atomic::AtomicUsize::new(0),
            pod_cidrs: site.pod_cidrs.clone(),
            relay: std::sync::OnceLock::new(),
            traversal,
            threads_running: AtomicU64::new(0),
            started: Instant::now(),
            next_log_ms: Default::default(),
        }
    }

    /// The current peer table (a snapshot: a reload swaps in a new one).
    pub(crate) fn peers(&self) -> arc_swap::Guard<Arc<Peers>> {
        self.peer_table.load()
    }

    /// Switches the data path to a new peer table.
    pub(crate) fn set_peers(&self, peers: Peers) {
        self.peer_table.store(Arc::new(peers));
    }

    /// The MSS to clamp a SYN to: what fits the tunnel, or, for one that
    /// goes through the relay, what fits one relay datagram (a full-size
    /// WireGuard packet would take two, doubling the relay's work).
    pub(crate) fn mss(&self, ipv6: bool, relayed: bool) -> u16 {
        let tunnel = self.max_mss[usize::from(ipv6)];
        let relay = self.relay_unfragmented.load(Relaxed);
        if !relayed || relay == 0 {
            return tunnel;
        }
        let inner = relay.saturating_sub(WIREGUARD_DATA_OVERHEAD);
        let inner = u16::try_from(inner).unwrap_or(u16::MAX);
        tunnel.min(crate::packet::max_mss(inner, ipv6).max(MIN_RELAY_MSS))
    }

    /// Makes the shared rate limiter for a site key.
    pub(crate) fn rate_limiter(public_key: &PublicKey) -> Arc<RateLimiter> {
        Arc::new(RateLimiter::new(public_key, HANDSHAKE_RATE_LIMIT))
    }

    /// Whether a drop for `reason` may be logged now (one line per reason
    /// per [`LOG_INTERVAL`]; the line carries the running total).
    pub(crate) fn may_log(&self, reason: DropReason) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let slot = &self.next_log_ms[reason as usize];
        let next = slot.load(Relaxed);
        now >= next
            && slot
                .compare_exchange(
                    next,
                    now + LOG_INTERVAL.as_millis() as u64,
                    Relaxed,
                    Relaxed,
                )
                .is_ok()
    }

    /// Counts a drop against peer `peer` (or the site) and logs it at a
    /// bounded rate.
    pub(crate) fn drop_packet(
        &self,
        peer: Option<&Peer>,
        reason: DropReason,
        detail: std::fmt::Arguments<'_>,
    ) {
        let (total, name) = match peer {
            Some(p) => (p.counters.drops.count(reason), p.name()),
            None => (self.drops.count(reason), "-"),
        };
        if self.may_log(reason) {
            tracing::warn!(
                peer = name,
                reason = reason.name(),
                total,
                "dropped packet: {detail}"
            );
        }
    }
}

/// Where a WireGuard datagram came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Our UDP socket, from this address.
    Udp(SocketAddr),
    /// The relay, which says it comes from this peer (id).
    Relay(u32),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Udp(addr) => write!(f, "{addr}"),
            Source::Relay(_) => f.write_str("the relay"),
        }
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

impl Ctx {
    /// Whether both packet threads are still running.
    pub(crate) fn alive(&self) -> bool {
        self.threads_running.load(Relaxed) == 2
    }

    /// Whether peers without a direct path can be reached through a relay.
    pub(crate) fn has_relay(&self) -> bool {
        self.relay.get().is_some()
    }

    /// Sends a WireGuard message to peer `index`: straight to `endpoint`
    /// when there is one, through the relay otherwise.
    pub(crate) fn send_to_peer(
        &self,
        peer: &Arc<Peer>,
        endpoint: Option<SocketAddr>,
        bytes: &[u8],
    ) {
        match endpoint {
            Some(ep) => {
                if let Err(e) = self.udp.send(ep, bytes, None) {
                    self.drop_packet(
                        Some(peer),
                        DropReason::IoError,
                        format_args!("send to {ep}: {e}"),
                    );
                }
            }
            None => self.relay(peer, bytes),
        }
    }

    /// Answers a datagram where it came from.
    pub(crate) fn reply(&self, source: Source, bytes: &[u8]) {
        match source {
            Source::Udp(to) => {
                if let Err(e) = self.udp.send(to, bytes, None) {
                    tracing::debug!("send to {to}: {e}");
                }
            }
            Source::Relay(id) => {
                let peers = self.peers();
                if let Some(i) = peers.by_id(id) {
                    self.relay(peers.get(i), bytes);
                }
            }
        }
    }

    /// Hands a WireGuard message for peer `index` to the relay.
    pub(crate) fn relay(&self, peer: &Arc<Peer>, bytes: &[u8]) {
        let Some(queue) = self.relay.get() else {
            self.drop_packet(
                Some(peer),
                DropReason::NoEndpoint,
                format_args!("no endpoint and no relay for the peer"),
            );
            return;
        };
        if queue
            .try_send(RelayPacket {
                peer: Arc::clone(peer),
                bytes: bytes.to_vec(),
            })
            .is_err()
        {
            self.drop_packet(
                Some(peer),
                DropReason::IoError,
                format_args!("relay queue full or closed"),
            );
        }
    }
}

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

/// Drives boringtun's timers: handshake retries, rekeying, keepalives, and
/// the handshake rate limiter's window.
async fn drive_timers(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 256];
    let mut last_reset = Instant::now();
    loop {
        tick.tick().await;
        crate::traversal::tick(&ctx, Instant::now());
        if last_reset.elapsed() >= Duration::from_secs(1) {
            ctx.rate_limiter.reset_count();
            last_reset = Instant::now();
        }
        for peer in ctx.peers().iter() {
            let mut state = peer.lock();
            let endpoint = state.endpoint;
            match state.tunn.update_timers(&mut buf) {
                TunnResult::WriteToNetwork(packet) => ctx.send_to_peer(peer, endpoint, packet),
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => tracing::debug!(peer = peer.name(), "timers: {e:?}"),
                _ => {}
            }
        }
    }
}

impl AsFd for Ctx {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.udp.as_fd()
    }
}
