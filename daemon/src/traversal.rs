//! NAT traversal in the daemon: the drivers around `causeway-nat`'s sans-IO
//! parts.
//!
//! - **STUN** from the WireGuard socket itself (so the reflexive address is
//!   the one peers must use), to every rendezvous and `stun_servers`.
//! - **Probes** on the WireGuard socket, one [`PeerPaths`] state machine per
//!   peer that has no static endpoint; its `PathChanged` events set where
//!   the data path sends (`Direct` → that address, `Relay` → the relay).
//! - **Rendezvous clients**, one per configured server: they carry our
//!   candidates out, the peers' candidates in, and relayed ciphertext both
//!   ways.
//!
//! Everything here runs on the control runtime except [`on_stun`] and
//! [`on_probe`], which the inbound packet thread calls for the datagrams
//! that are not WireGuard.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use causeway_nat::path::{Event, Path, PeerPaths};
use causeway_nat::probe::{self, Probe};
use causeway_nat::rendezvous::{RendezvousClient, RendezvousEvent, RendezvousHandle};
use causeway_nat::stun::{self, StunMessage, TransactionId};
use rand::RngCore;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::Config;
use crate::datapath::{Ctx, RELAY_QUEUE, RelayPacket, Source, TunBatch, inbound_handle};
use crate::peer::{DropReason, Peer, PeerState};

/// How often the reflexive address is asked for again (NAT mappings change).
const STUN_INTERVAL: Duration = Duration::from_secs(20);
/// A STUN request unanswered this long is forgotten.
const STUN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the site knows about its own addresses.
#[derive(Default)]
pub(crate) struct LocalAddrs {
    /// Operator-advertised endpoints.
    pub(crate) advertised: Vec<SocketAddr>,
    /// Host addresses with the WireGuard port.
    pub(crate) host: Vec<SocketAddr>,
    /// Server-reflexive addresses (one per STUN server that answered).
    srflx: Vec<(SocketAddr, SocketAddr)>,
    /// STUN requests in flight: transaction, server, sent at.
    pending: Vec<(TransactionId, SocketAddr, Instant)>,
    next_stun: Option<Instant>,
}

impl LocalAddrs {
    /// What the site knows before asking any STUN server.
    pub(crate) fn new(advertised: Vec<SocketAddr>, host: Vec<SocketAddr>) -> Self {
        LocalAddrs {
            advertised,
            host,
            ..Default::default()
        }
    }

    /// Our candidates in the order peers should try them.
    pub(crate) fn candidates(&self) -> Vec<SocketAddr> {
        let srflx: Vec<SocketAddr> = self.srflx.iter().map(|&(_, mapped)| mapped).collect();
        causeway_nat::path::local_candidates(&self.advertised, &srflx, &self.host)
    }
}

/// The traversal state shared by the packet threads and the control tasks.
pub(crate) struct Traversal {
    pub(crate) local: Mutex<LocalAddrs>,
    stun_servers: Vec<SocketAddr>,
    candidates: watch::Sender<Vec<SocketAddr>>,
    /// The rendezvous connections, for relaying and for status.
    pub(crate) rendezvous: Mutex<Vec<RendezvousHandle>>,
}

impl Traversal {
    pub(crate) fn new(stun_servers: Vec<SocketAddr>, local: LocalAddrs) -> Self {
        let (candidates, _) = watch::channel(local.candidates());
        Traversal {
            local: Mutex::new(local),
            stun_servers,
            candidates,
            rendezvous: Mutex::new(Vec::new()),
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, LocalAddrs> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A STUN message arrived on the WireGuard socket.
pub(crate) fn on_stun(ctx: &Ctx, from: SocketAddr, datagram: &[u8]) {
    let Some(traversal) = ctx.traversal.as_ref() else {
        return;
    };
    let Ok(StunMessage::BindingSuccess { tx, mapped }) = stun::parse(datagram) else {
        ctx.drops.count(DropReason::Malformed);
        return;
    };
    let mut local = traversal.local();
    let Some(i) = local
        .pending
        .iter()
        .position(|(t, server, _)| t.0 == tx.0 && *server == from)
    else {
        ctx.drops.count(DropReason::Rejected);
        return;
    };
    local.pending.swap_remove(i);
    let mapped = SocketAddr::new(mapped.ip().to_canonical(), mapped.port());
    match local.srflx.iter_mut().find(|(server, _)| *server == from) {
        Some((_, old)) if *old == mapped => return,
        Some((_, old)) => *old = mapped,
        None => local.srflx.push((from, mapped)),
    }
    info!(server = %from, reflexive = %mapped, "server-reflexive address of the WireGuard socket");
    let candidates = local.candidates();
    drop(local);
    traversal.candidates.send_replace(candidates);
}

/// A probe arrived on the WireGuard socket.
pub(crate) fn on_probe(ctx: &Ctx, from: SocketAddr, datagram: &[u8]) {
    let peers = ctx.peers();
    let Some(index) = probe::sender(datagram).and_then(|key| peers.by_key(&key)) else {
        ctx.drop_packet(
            None,
            DropReason::UnknownPeer,
            format_args!("probe from {from}: not one of our peers"),
        );
        return;
    };
    let peer = peers.get(index);
    let Some(key) = peer.probe_key.as_ref() else {
        return;
    };
    let probe = match probe::open(key, datagram) {
        Ok(probe) => probe,
        Err(e) => {
            ctx.drop_packet(
                Some(peer),
                DropReason::Rejected,
                format_args!("probe from {from}: {e}"),
            );
            return;
        }
    };
    let now = Instant::now();
    let mut state = peer.lock();
    match state.paths.as_mut() {
        Some(paths) => {
            paths.handle_probe(now, from, probe);
            pump(ctx, peer, &mut state);
        }
        None => {
            drop(state);
            // A peer with a static endpoint needs no path selection here,
            // but the other side may: answer its pings.
            if let Probe::Ping { tx } = probe {
                let mut buf = [0u8; probe::MAX_PROBE_LEN];
                let n = probe::encode(key, &Probe::Pong { tx, observed: from }, &mut buf);
                let _ = ctx.udp.send(from, &buf[..n], None);
            }
        }
    }
}

/// Sends what a peer's path machine wants sent and applies its decisions.
fn pump(ctx: &Ctx, peer: &Arc<Peer>, state: &mut PeerState) {
    let Some(key) = peer.probe_key.as_ref() else {
        return;
    };
    let mut buf = [0u8; probe::MAX_PROBE_LEN];
    loop {
        let Some(paths) = state.paths.as_mut() else {
            return;
        };
        while let Some(t) = paths.poll_transmit() {
            let n = probe::encode(key, &t.probe, &mut buf);
            if let Err(e) = ctx.udp.send(t.dst, &buf[..n], None) {
                tracing::debug!(peer = peer.name(), "probe to {}: {e}", t.dst);
            }
        }
        let Some(Event::PathChanged(path)) = paths.poll_event() else {
            return;
        };
        match path {
            Path::Direct(addr) => {
                info!(peer = peer.name(), %addr, "direct path");
                state.endpoint = Some(addr);
                kick_handshake(ctx, peer, state);
            }
            Path::Relay => {
                info!(peer = peer.name(), "no direct path: using the relay");
                state.endpoint = None;
                // Our mapping may have changed: ask STUN again and tell
                // the peer (through the rendezvous) even if nothing changed,
                // so that both sides start probing together.
                if let Some(traversal) = ctx.traversal.as_ref() {
                    traversal.local().next_stun = None;
                    traversal.candidates.send_modify(|_| {});
                }
            }
        }
    }
}

/// Starts a WireGuard handshake at once when a peer without a session just
/// became reachable, instead of waiting out boringtun's 5-second retry of an
/// initiation that had nowhere to go.
fn kick_handshake(ctx: &Ctx, peer: &Arc<Peer>, state: &mut PeerState) {
    if state.tunn.time_since_last_handshake().is_some() {
        return;
    }
    let mut buf = [0u8; 256];
    if let boringtun::noise::TunnResult::WriteToNetwork(init) =
        state.tunn.format_handshake_initiation(&mut buf, true)
    {
        ctx.send_to_peer(peer, state.endpoint, init);
    }
}

/// Drives timers: path machines, STUN. Called on every data-path tick.
pub(crate) fn tick(ctx: &Ctx, now: Instant) {
    let Some(traversal) = ctx.traversal.as_ref() else {
        return;
    };
    for peer in ctx.peers().iter() {
        let mut state = peer.lock();
        if let Some(paths) = state.paths.as_mut() {
            if paths.poll_timeout().is_some_and(|(at, _)| at <= now) {
                paths.handle_timeout(now);
            }
            pump(ctx, peer, &mut state);
        }
    }
    let mut local = traversal.local();
    local
        .pending
        .retain(|&(_, _, at)| now.duration_since(at) < STUN_TIMEOUT);
    if local.next_stun.is_some_and(|at| at > now) {
        return;
    }
    local.next_stun = Some(now + STUN_INTERVAL);
    let mut rng = rand::thread_rng();
    let mut buf = [0u8; 64];
    for &server in &traversal.stun_servers {
        let tx = TransactionId::random(&mut rng);
        let n = stun::encode_binding_request(&tx, &mut buf);
        if ctx.udp.send(server, &buf[..n], None).is_ok() {
            local.pending.push((tx, server, now));
        }
    }
}

/// Starts one client per configured rendezvous and the relay sender.
/// Returns the tasks to abort on shutdown.
pub(crate) fn start(ctx: &Arc<Ctx>, config: &Config) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(traversal) = ctx.traversal.as_ref() else {
        return Vec::new();
    };
    let mut tasks = Vec::new();
    let keys: Vec<_> = config.peers.iter().map(|p| p.public_key).collect();
    for r in &config.rendezvous {
        let addr = r.address.addr;
        let client = match RendezvousClient::start(
            addr,
            r.public_key,
            ctx.private_key.clone(),
            keys.clone(),
        ) {
            Ok(client) => client,
            Err(e) => {
                warn!(rendezvous = %addr, "cannot start rendezvous client: {e}");
                continue;
            }
        };
        client.update_candidates(traversal.candidates.borrow().clone());
        traversal
            .rendezvous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(client.handle());
        tasks.push(tokio::spawn(drive_rendezvous(
            Arc::clone(ctx),
            client,
            traversal.candidates.subscribe(),
        )));
    }
    let (tx, rx) = mpsc::channel(RELAY_QUEUE);
    if ctx.relay.set(tx).is_ok() {
        tasks.push(tokio::spawn(send_relayed(Arc::clone(ctx), rx)));
    }
    tasks
}

/// Relayed packets written to the TUN together at most.
const RELAY_BATCH: usize = 64;

/// One rendezvous: candidates out, candidates and relayed packets in.
async fn drive_rendezvous(
    ctx: Arc<Ctx>,
    mut client: RendezvousClient,
    mut candidates: watch::Receiver<Vec<SocketAddr>>,
) {
    let mut batch = TunBatch::new(RELAY_BATCH, ctx.mtu);
    let mut cookie = [0u8; 64];
    loop {
        tokio::select! {
            event = client.next_event() => {
                let Some(event) = event else { return };
                on_event(&ctx, event, &mut batch, &mut cookie);
                // Relayed packets come in bursts: take what is already
                // waiting, so that they reach the TUN in one coalesced batch.
                for _ in 1..RELAY_BATCH {
                    let Some(event) = client.try_next_event() else { break };
                    on_event(&ctx, event, &mut batch, &mut cookie);
                }
                batch.flush(&ctx);
            }
            changed = candidates.changed() => {
                if changed.is_err() {
                    return;
                }
                let list = candidates.borrow_and_update().clone();
                client.update_candidates(list);
            }
        }
    }
}

/// Acts on one event from a rendezvous; relayed packets go into `batch`
/// (written out by the caller).
fn on_event(ctx: &Ctx, event: RendezvousEvent, batch: &mut TunBatch, cookie: &mut [u8; 64]) {
    match event {
        RendezvousEvent::Connected { observed } => {
            info!(%observed, "registered with the rendezvous")
        }
        // The client logs its own failures; this is for debugging.
        RendezvousEvent::Disconnected { reason } => {
            tracing::debug!("rendezvous disconnected: {reason}")
        }
        RendezvousEvent::PeerUpdate {
            peer,
            candidates,
            online,
        } => {
            let peers = ctx.peers();
            let Some(index) = peers.by_key(peer.as_bytes()) else {
                return;
            };
            let p = peers.get(index);
            info!(peer = p.name(), online, candidates = ?candidates, "peer update from the rendezvous");
            let candidates = reachable(ctx, candidates);
            let mut state = p.lock();
            if let Some(paths) = state.paths.as_mut() {
                if online {
                    paths.set_remote_candidates(Instant::now(), candidates);
                }
                pump(ctx, p, &mut state);
            }
            if online {
                // Reachable through the relay from now on.
                kick_handshake(ctx, p, &mut state);
            }
        }
        RendezvousEvent::Relayed { from, packet } => {
            let peers = ctx.peers();
            let Some(index) = peers.by_key(from.as_bytes()) else {
                return;
            };
            let p = peers.get(index);
            p.counters
                .relay_rx_packets
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = p.id;
            inbound_handle(ctx, &peers, Source::Relay(id), &packet, batch, cookie);
        }
    }
}

/// The candidates worth probing: not inside our own pod networks or any
/// peer's view (those route into the tunnel itself, not to the peer's
/// gateway).
fn reachable(ctx: &Ctx, candidates: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let inside_overlay = |ip: std::net::IpAddr| {
        ctx.pod_cidrs.iter().any(|n| n.contains(&ip)) || ctx.peers().route(ip).is_some()
    };
    candidates
        .into_iter()
        .filter(|c| !inside_overlay(c.ip()))
        .collect()
}

/// Sends the packets the data path hands to the relay through the first
/// rendezvous that can reach the peer.
async fn send_relayed(ctx: Arc<Ctx>, mut packets: mpsc::Receiver<RelayPacket>) {
    while let Some(RelayPacket { peer: p, bytes }) = packets.recv().await {
        let handles = ctx
            .traversal
            .as_ref()
            .map(|t| {
                t.rendezvous
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            })
            .unwrap_or_default();
        let sent = handles
            .iter()
            .find(|h| h.send_relay(p.public_key(), &bytes).is_ok());
        if let Some(size) = sent.and_then(|h| h.max_unfragmented()) {
            ctx.relay_unfragmented
                .store(size, std::sync::atomic::Ordering::Relaxed);
        }
        let sent = sent.is_some();
        if sent {
            p.counters
                .relay_tx_packets
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            ctx.drop_packet(
                Some(&p),
                DropReason::NoEndpoint,
                format_args!("no direct path and no rendezvous can relay to the peer"),
            );
        }
    }
}

/// A fresh path machine for a peer found through the rendezvous.
pub(crate) fn new_paths() -> PeerPaths {
    PeerPaths::new(Default::default(), rand::thread_rng().next_u64())
}

/// Tells every rendezvous the new list of peers to be introduced to.
pub(crate) fn update_peers(ctx: &Ctx, keys: Vec<x25519_dalek::PublicKey>) {
    if let Some(traversal) = ctx.traversal.as_ref() {
        for handle in traversal
            .rendezvous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            handle.update_peers(keys.clone());
        }
    }
}
