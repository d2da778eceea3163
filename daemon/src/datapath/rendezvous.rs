//! The rendezvous tasks: one client per configured server carrying the
//! core's candidates out, peer updates and relayed ciphertext in; and the
//! relay sender, which takes what the core hands to the relay and sends it
//! through the first rendezvous that can reach the peer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use causeway_nat::rendezvous::{RendezvousAddr, RendezvousClient, RendezvousEvent};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{Ctx, RELAY_QUEUE, RelayPacket, TunBatch};
use crate::config::Config;
use crate::core::DropReason;

/// Relayed packets written to the TUN together at most.
const RELAY_BATCH: usize = 64;

/// The running rendezvous clients and relay sender of an active replica:
/// dropping it stops them (closing their connections); packets for the
/// relay are dropped from then on.
pub(crate) struct Rendezvous {
    ctx: Arc<Ctx>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Rendezvous {
    /// Starts one client per configured rendezvous and the relay sender.
    pub(crate) fn start(ctx: &Arc<Ctx>, config: &Config) -> Rendezvous {
        Rendezvous {
            ctx: Arc::clone(ctx),
            tasks: start(ctx, config),
        }
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        self.ctx.relay.store(None);
        self.ctx
            .rendezvous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn start(ctx: &Arc<Ctx>, config: &Config) -> Vec<tokio::task::JoinHandle<()>> {
    if !ctx.site.has_traversal() {
        return Vec::new();
    }
    let mut tasks = Vec::new();
    let keys: Vec<_> = config.peers.iter().map(|p| p.public_key).collect();
    for r in &config.rendezvous {
        let addr = r.address.addr;
        let server = RendezvousAddr {
            quic: addr,
            tcp: r.tcp.as_ref().map(|tcp| tcp.addr),
        };
        let client = match RendezvousClient::start(
            server,
            r.public_key,
            ctx.site.private_key.clone(),
            keys.clone(),
        ) {
            Ok(client) => client,
            Err(e) => {
                warn!(rendezvous = %addr, "cannot start rendezvous client: {e}");
                continue;
            }
        };
        client.update_candidates(ctx.candidates.borrow().clone());
        ctx.rendezvous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(client.handle());
        tasks.push(tokio::spawn(drive(
            Arc::clone(ctx),
            client,
            ctx.candidates.subscribe(),
        )));
    }
    let (tx, rx) = mpsc::channel(RELAY_QUEUE);
    ctx.relay.store(Some(Arc::new(tx)));
    tasks.push(tokio::spawn(send_relayed(Arc::clone(ctx), rx)));
    if config.site.port_mapping {
        match ctx.udp.local_port() {
            Ok(port) => tasks.push(tokio::spawn(super::portmap::run(Arc::clone(ctx), port))),
            Err(e) => warn!("port mapping: the WireGuard port is unknown: {e}"),
        }
    }
    tasks
}

/// Tells every rendezvous the new list of peers to be introduced to.
pub(crate) fn update_peers(ctx: &Ctx, keys: Vec<x25519_dalek::PublicKey>) {
    for handle in ctx
        .rendezvous
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        handle.update_peers(keys.clone());
    }
}

/// One rendezvous: candidates out, peer updates and relayed packets in.
async fn drive(
    ctx: Arc<Ctx>,
    mut client: RendezvousClient,
    mut candidates: watch::Receiver<Vec<SocketAddr>>,
) {
    let mut batch = TunBatch::new(RELAY_BATCH, ctx.site.mtu());
    let server = client.handle().server();
    loop {
        tokio::select! {
            event = client.next_event() => {
                let Some(event) = event else { return };
                on_event(&ctx, server, event, &mut batch);
                // Relayed packets come in bursts: take what is already
                // waiting, so that they reach the TUN in one coalesced batch.
                for _ in 1..RELAY_BATCH {
                    let Some(event) = client.try_next_event() else { break };
                    on_event(&ctx, server, event, &mut batch);
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

/// Hands one event from a rendezvous to the core; relayed packets that
/// pass go into `batch` (written out by the caller).
fn on_event(ctx: &Ctx, server: SocketAddr, event: RendezvousEvent, batch: &mut TunBatch) {
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
        } => ctx.site.handle_peer_update(
            Instant::now(),
            peer.as_bytes(),
            candidates,
            online,
            &mut ctx.io(),
        ),
        RendezvousEvent::RelayPort { peer, port } => {
            ctx.site
                .handle_relay_port(Instant::now(), peer.as_bytes(), server, port)
        }
        RendezvousEvent::Relayed { from, packet } => {
            let peers = ctx.site.peers();
            let out = batch.slot(packet.len());
            let delivered = ctx.site.decapsulate_relayed(
                Instant::now(),
                &peers,
                from.as_bytes(),
                &packet,
                out,
                &mut ctx.io(),
            );
            if let Some(len) = delivered {
                batch.commit(ctx, len);
            }
        }
    }
}

/// Sends the packets the core hands to the relay through the first
/// rendezvous that can reach the peer.
async fn send_relayed(ctx: Arc<Ctx>, mut packets: mpsc::Receiver<RelayPacket>) {
    while let Some(RelayPacket { peer: p, bytes }) = packets.recv().await {
        let handles = ctx
            .rendezvous
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let sent = handles
            .iter()
            .find(|h| h.send_relay(p.public_key(), &bytes).is_ok());
        if let Some(size) = sent.and_then(|h| h.max_unfragmented()) {
            ctx.site.set_relay_unfragmented(size);
        }
        if sent.is_some() {
            p.counters.relay_tx_packets.fetch_add(1, Relaxed);
        } else {
            ctx.site.drop_packet(
                Some(&p),
                DropReason::NoEndpoint,
                format_args!("no direct path and no rendezvous can relay to the peer"),
            );
        }
    }
}
