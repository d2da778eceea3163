//! The site's side: one QUIC connection to one rendezvous, kept up with
//! reconnects. The daemon runs one client per configured rendezvous.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tracing::{Instrument, debug, error, info, warn};
use x25519_dalek::{PublicKey, StaticSecret};

use super::auth::{self, AuthKey, Role};
use super::proto::{
    CloseCode, FrameDecoder, PROTOCOL_VERSION, RendezvousMessage, SiteMessage, Wire32,
};
use super::relay::{self, FragmentError, Reassembler};
use super::stream::{ReadFailure, read_frame, write_frame};
use super::tls::{self, SERVER_NAME, TlsError};
use causeway_common::keys;

/// How long one connection attempt (QUIC handshake plus authentication)
/// may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// First reconnect delay; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// Events buffered for the caller; relayed packets beyond it are dropped.
const EVENT_QUEUE: usize = 1024;
/// How often partly reassembled packets are expired.
const EXPIRE_TICK: Duration = Duration::from_millis(250);

/// What the rendezvous tells the site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RendezvousEvent {
    /// Authenticated and registered (again). `observed` is the address the
    /// rendezvous sees this client's QUIC socket at; it is *not* the
    /// WireGuard socket's server-reflexive address (a different socket),
    /// only a hint about the NAT in front of the site.
    Connected {
        /// The QUIC socket's address as the rendezvous sees it.
        observed: SocketAddr,
    },
    /// A peer that lists this site (and that this site lists) came online,
    /// changed its candidates, or went offline. While offline (or while
    /// this client is disconnected) it cannot be relayed to through this
    /// rendezvous.
    PeerUpdate {
        /// The peer's WireGuard public key.
        peer: PublicKey,
        /// Its candidates (empty when offline).
        candidates: Vec<SocketAddr>,
        /// Whether it is connected to this rendezvous.
        online: bool,
    },
    /// A WireGuard packet relayed from a peer (reassembled).
    Relayed {
        /// The sending peer.
        from: PublicKey,
        /// The packet, byte for byte as the peer sent it.
        packet: Vec<u8>,
    },
    /// The connection dropped (every peer learned through it went offline:
    /// a `PeerUpdate` was emitted for each first), or an attempt to
    /// reconnect failed. The client keeps reconnecting with backoff by
    /// itself.
    Disconnected {
        /// Why, for logs.
        reason: String,
    },
}

/// Why connecting to a rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The local UDP socket or QUIC endpoint could not be set up.
    #[error("cannot open a local socket for rendezvous {server}: {source}")]
    Local {
        /// The rendezvous.
        server: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// TLS configuration failed (never expected).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The pinned rendezvous key is a low-order point, not a real key.
    #[error(
        "the pinned public key of rendezvous {server} is not a usable X25519 key; copy the key the rendezvous logs at start"
    )]
    UnusableKey {
        /// The rendezvous.
        server: SocketAddr,
    },
    /// No QUIC connection could be made.
    #[error("cannot reach rendezvous {server}: {reason}")]
    Unreachable {
        /// The rendezvous.
        server: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The rendezvous does not list this site's key.
    #[error(
        "rendezvous {server} rejected this site: unknown site key {site_key}; ask its operator to add it as a [[site]]"
    )]
    UnknownSiteKey {
        /// The rendezvous.
        server: SocketAddr,
        /// This site's public key.
        site_key: String,
    },
    /// The rendezvous could not verify this site's proof.
    #[error("rendezvous {server} rejected this site: bad proof ({message})")]
    BadProof {
        /// The rendezvous.
        server: SocketAddr,
        /// What the rendezvous said.
        message: String,
    },
    /// The server is not the rendezvous whose key was pinned: it said so, or
    /// it could not prove the pinned key (a different server, or a man in
    /// the middle).
    #[error(
        "wrong rendezvous key for {server}: {detail}; check the public_key pinned for this rendezvous"
    )]
    WrongRendezvousKey {
        /// The rendezvous.
        server: SocketAddr,
        /// What happened.
        detail: String,
    },
    /// The rendezvous refused for another reason (version, timeout…).
    #[error("rendezvous {server} closed the connection: {code}: {message}")]
    Rejected {
        /// The rendezvous.
        server: SocketAddr,
        /// The close code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The rendezvous broke the protocol.
    #[error("rendezvous {server} broke the protocol: {reason}")]
    Protocol {
        /// The rendezvous.
        server: SocketAddr,
        /// What it did.
        reason: String,
    },
}

impl ConnectError {
    /// Whether retrying soon is pointless until an operator changes a
    /// configuration (the retry backoff goes to its maximum).
    fn needs_operator(&self) -> bool {
        matches!(
            self,
            Self::UnusableKey { .. }
                | Self::UnknownSiteKey { .. }
                | Self::BadProof { .. }
                | Self::WrongRendezvousKey { .. }
        )
    }
}

/// Why a packet could not be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// Not connected to the rendezvous right now.
    #[error("not connected to the rendezvous")]
    NotConnected,
    /// The peer is not online at this rendezvous (or does not list this site).
    #[error("peer is not reachable through this rendezvous")]
    PeerUnavailable,
    /// The rendezvous connection does not carry datagrams.
    #[error("the rendezvous connection does not carry datagrams")]
    DatagramsUnsupported,
    /// The packet cannot be fragmented.
    #[error(transparent)]
    Fragment(#[from] FragmentError),
    /// The connection refused the datagram.
    #[error("relay send failed: {0}")]
    Send(String),
}

/// Counters of one client.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    /// Packets handed to the relay.
    pub relay_tx_packets: u64,
    /// Bytes of those packets.
    pub relay_tx_bytes: u64,
    /// Datagrams those packets took (more than packets when fragmented).
    pub relay_tx_datagrams: u64,
    /// Relayed packets received whole.
    pub relay_rx_packets: u64,
    /// Bytes of those packets.
    pub relay_rx_bytes: u64,
    /// Partly received packets dropped (fragments missing after 1 s, or the
    /// reassembly table full).
    pub relay_incomplete: u64,
    /// Relay datagrams dropped as malformed or from an unknown peer.
    pub relay_malformed: u64,
    /// Relayed packets dropped because the caller did not take events fast
    /// enough.
    pub events_dropped: u64,
    /// Connections established (1 + reconnects).
    pub connections: u64,
}

#[derive(Default)]
struct Counters {
    relay_tx_packets: AtomicU64,
    relay_tx_bytes: AtomicU64,
    relay_tx_datagrams: AtomicU64,
    relay_rx_packets: AtomicU64,
    relay_rx_bytes: AtomicU64,
    relay_incomplete: AtomicU64,
    relay_malformed: AtomicU64,
    events_dropped: AtomicU64,
    connections: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

#[derive(Default)]
struct ClientState {
    peers: Vec<PublicKey>,
    candidates: Vec<SocketAddr>,
    conn: Option<quinn::Connection>,
    observed: Option<SocketAddr>,
    /// Online peers: key → relay id, and back.
    online: HashMap<[u8; 32], u32>,
    by_relay: HashMap<u32, [u8; 32]>,
    next_packet_id: u32,
}

struct Inner {
    server: SocketAddr,
    pinned: PublicKey,
    site_public: PublicKey,
    auth_key: AuthKey,
    state: Mutex<ClientState>,
    changed: Notify,
    counters: Counters,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A cloneable handle for the data path and for configuration changes,
/// usable while the [`RendezvousClient`] lives.
#[derive(Clone)]
pub struct RendezvousHandle {
    inner: Arc<Inner>,
}

/// A site's connection to one rendezvous: authenticated, registered, and
/// re-established with backoff whenever it drops.
///
/// Runs on any tokio runtime, a current-thread one included. Dropping it
/// closes the connection.
pub struct RendezvousClient {
    handle: RendezvousHandle,
    events: mpsc::Receiver<RendezvousEvent>,
    driver: tokio::task::JoinHandle<()>,
    endpoint: quinn::Endpoint,
}

struct Session {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    observed: SocketAddr,
}

impl RendezvousClient {
    /// Connects to the rendezvous at `server`, checks it holds the private
    /// key of `pinned`, proves `site_secret`, and registers `peers` (the
    /// public keys of the sites to be introduced to). Returns once
    /// registered, or with the reason it could not be; after that the client
    /// reconnects by itself whenever the connection drops.
    pub async fn connect(
        server: SocketAddr,
        pinned: PublicKey,
        site_secret: StaticSecret,
        peers: Vec<PublicKey>,
    ) -> Result<Self, ConnectError> {
        let (inner, endpoint, config) = setup(server, pinned, site_secret, peers)?;
        let session = establish(&inner, &endpoint, &config).await?;
        Ok(Self::spawn(inner, endpoint, config, Some(session)))
    }

    /// Like [`connect`](Self::connect), but returns at once and connects in
    /// the background (retrying with backoff; failures are logged and
    /// reported as `Disconnected` events). Fails only if no local socket can
    /// be opened. Must be called inside a tokio runtime.
    pub fn start(
        server: SocketAddr,
        pinned: PublicKey,
        site_secret: StaticSecret,
        peers: Vec<PublicKey>,
    ) -> Result<Self, ConnectError> {
        let (inner, endpoint, config) = setup(server, pinned, site_secret, peers)?;
        Ok(Self::spawn(inner, endpoint, config, None))
    }

    fn spawn(
        inner: Arc<Inner>,
        endpoint: quinn::Endpoint,
        config: quinn::ClientConfig,
        first: Option<Session>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let span = tracing::info_span!("rendezvous", server = %inner.server);
        let driver = tokio::spawn(
            drive(inner.clone(), endpoint.clone(), config, tx, first).instrument(span),
        );
        Self {
            handle: RendezvousHandle { inner },
            events: rx,
            driver,
            endpoint,
        }
    }

    /// The next event; `None` only if the client's background task ended
    /// (it does not, short of a panic).
    pub async fn next_event(&mut self) -> Option<RendezvousEvent> {
        self.events.recv().await
    }

    /// The next event if one is waiting, without waiting.
    pub fn try_next_event(&mut self) -> Option<RendezvousEvent> {
        self.events.try_recv().ok()
    }

    /// A cloneable handle for sending relay packets and updating the
    /// registration from elsewhere.
    pub fn handle(&self) -> RendezvousHandle {
        self.handle.clone()
    }

    /// See [`RendezvousHandle::send_relay`].
    pub fn send_relay(&self, peer: &PublicKey, packet: &[u8]) -> Result<(), RelayError> {
        self.handle.send_relay(peer, packet)
    }

    /// See [`RendezvousHandle::update_candidates`].
    pub fn update_candidates(&self, candidates: Vec<SocketAddr>) {
        self.handle.update_candidates(candidates);
    }

    /// See [`RendezvousHandle::update_peers`].
    pub fn update_peers(&self, peers: Vec<PublicKey>) {
        self.handle.update_peers(peers);
    }

    /// Closes the connection cleanly and waits (briefly) for the rendezvous
    /// to acknowledge it.
    pub async fn close(self) {
        self.driver.abort();
        let conn = self.handle.inner.lock().conn.take();
        if let Some(conn) = conn {
            conn.close(CloseCode::Normal.varint(), b"site closing");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

impl Drop for RendezvousClient {
    fn drop(&mut self) {
        self.driver.abort();
        if let Some(conn) = self.handle.inner.lock().conn.take() {
            conn.close(CloseCode::Normal.varint(), b"site closing");
        }
    }
}

impl RendezvousHandle {
    /// Sends one WireGuard packet to `peer` through the rendezvous,
    /// fragmented to the connection's datagram size. Never blocks; like any
    /// datagram it may be lost.
    pub fn send_relay(&self, peer: &PublicKey, packet: &[u8]) -> Result<(), RelayError> {
        let (conn, relay_id, packet_id) = {
            let mut state = self.inner.lock();
            let conn = state.conn.clone().ok_or(RelayError::NotConnected)?;
            let relay_id = *state
                .online
                .get(peer.as_bytes())
                .ok_or(RelayError::PeerUnavailable)?;
            let packet_id = state.next_packet_id;
            state.next_packet_id = packet_id.wrapping_add(1);
            (conn, relay_id, packet_id)
        };
        let max = conn
            .max_datagram_size()
            .ok_or(RelayError::DatagramsUnsupported)?;
        let datagrams = relay::fragment(relay_id, packet_id, packet, max)?;
        let count = datagrams.len() as u64;
        for datagram in datagrams {
            conn.send_datagram(datagram)
                .map_err(|e| RelayError::Send(e.to_string()))?;
        }
        bump(&self.inner.counters.relay_tx_datagrams, count);
        bump(&self.inner.counters.relay_tx_packets, 1);
        bump(&self.inner.counters.relay_tx_bytes, packet.len() as u64);
        Ok(())
    }

    /// The largest WireGuard packet that goes through the relay in one
    /// datagram, unfragmented, at the connection's current datagram size
    /// (it grows as QUIC discovers the path MTU); `None` when not connected.
    pub fn max_unfragmented(&self) -> Option<usize> {
        let conn = self.inner.lock().conn.clone()?;
        conn.max_datagram_size()
            .map(|max| max.saturating_sub(relay::HEADER_LEN))
    }

    /// Replaces this site's candidates and re-registers (now if connected,
    /// else on the next connection).
    pub fn update_candidates(&self, candidates: Vec<SocketAddr>) {
        self.inner.lock().candidates = candidates;
        self.inner.changed.notify_one();
    }

    /// Replaces the list of peers to be introduced to (a config reload) and
    /// re-registers.
    pub fn update_peers(&self, peers: Vec<PublicKey>) {
        self.inner.lock().peers = peers;
        self.inner.changed.notify_one();
    }

    /// Whether the client is connected and registered now.
    pub fn is_connected(&self) -> bool {
        self.inner.lock().conn.is_some()
    }

    /// The address the rendezvous last saw this client's QUIC socket at.
    pub fn observed(&self) -> Option<SocketAddr> {
        self.inner.lock().observed
    }

    /// The peers online through this rendezvous now.
    pub fn online_peers(&self) -> Vec<PublicKey> {
        self.inner
            .lock()
            .online
            .keys()
            .map(|k| PublicKey::from(*k))
            .collect()
    }

    /// The rendezvous' address.
    pub fn server(&self) -> SocketAddr {
        self.inner.server
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            relay_tx_packets: get(&c.relay_tx_packets),
            relay_tx_bytes: get(&c.relay_tx_bytes),
            relay_tx_datagrams: get(&c.relay_tx_datagrams),
            relay_rx_packets: get(&c.relay_rx_packets),
            relay_rx_bytes: get(&c.relay_rx_bytes),
            relay_incomplete: get(&c.relay_incomplete),
            relay_malformed: get(&c.relay_malformed),
            events_dropped: get(&c.events_dropped),
            connections: get(&c.connections),
        }
    }
}

#[cfg(test)]
impl RendezvousHandle {
    /// The relay id this client uses for `peer`.
    pub(crate) fn relay_id_of(&self, peer: &PublicKey) -> Option<u32> {
        self.inner.lock().online.get(peer.as_bytes()).copied()
    }

    /// Makes this client believe `peer` has relay id `id` (attack tests).
    pub(crate) fn force_relay_id(&self, peer: &PublicKey, id: u32) {
        self.inner.lock().online.insert(peer.to_bytes(), id);
    }
}

fn setup(
    server: SocketAddr,
    pinned: PublicKey,
    site_secret: StaticSecret,
    peers: Vec<PublicKey>,
) -> Result<(Arc<Inner>, quinn::Endpoint, quinn::ClientConfig), ConnectError> {
    let auth_key =
        AuthKey::derive(&site_secret, &pinned).ok_or(ConnectError::UnusableKey { server })?;
    let config = tls::client_config()?;
    let local: SocketAddr = if server.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint =
        quinn::Endpoint::client(local).map_err(|source| ConnectError::Local { server, source })?;
    let site_public = PublicKey::from(&site_secret);
    let inner = Arc::new(Inner {
        server,
        pinned,
        site_public,
        auth_key,
        state: Mutex::new(ClientState {
            peers,
            next_packet_id: rand::random(),
            ..ClientState::default()
        }),
        changed: Notify::new(),
        counters: Counters::default(),
    });
    Ok((inner, endpoint, config))
}

fn register_message(state: &ClientState) -> SiteMessage {
    SiteMessage::Register {
        peers: state.peers.iter().map(|k| Wire32(k.to_bytes())).collect(),
        candidates: state.candidates.clone(),
    }
}

/// Connects, authenticates both ways and registers; logs one line on failure.
async fn establish(
    inner: &Inner,
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
) -> Result<Session, ConnectError> {
    let result = tokio::time::timeout(CONNECT_TIMEOUT, establish_inner(inner, endpoint, config))
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Unreachable {
                server: inner.server,
                reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            })
        });
    match &result {
        Ok(session) => {
            let mut state = inner.lock();
            state.conn = Some(session.conn.clone());
            state.observed = Some(session.observed);
            state.online.clear();
            state.by_relay.clear();
            drop(state);
            info!(observed = %session.observed, "connected to the rendezvous");
        }
        Err(e) if e.needs_operator() => error!("{e}"),
        Err(e) => warn!("{e}"),
    }
    result
}

fn closed_error(
    server: SocketAddr,
    site_key: &PublicKey,
    e: &quinn::ConnectionError,
) -> ConnectError {
    if let quinn::ConnectionError::ApplicationClosed(close) = e {
        let message = String::from_utf8_lossy(&close.reason).into_owned();
        return rejection_error(server, site_key, close.error_code.into_inner(), message);
    }
    ConnectError::Unreachable {
        server,
        reason: e.to_string(),
    }
}

fn rejection_error(
    server: SocketAddr,
    site_key: &PublicKey,
    code: u64,
    message: String,
) -> ConnectError {
    match CloseCode::from_u64(code) {
        Some(CloseCode::UnknownSiteKey) => ConnectError::UnknownSiteKey {
            server,
            site_key: keys::encode_public(site_key),
        },
        Some(CloseCode::BadProof) => ConnectError::BadProof { server, message },
        Some(CloseCode::WrongRendezvousKey) => ConnectError::WrongRendezvousKey {
            server,
            detail: message,
        },
        Some(code) => ConnectError::Rejected {
            server,
            code: code.to_string(),
            message,
        },
        None => ConnectError::Rejected {
            server,
            code: format!("code {code}"),
            message,
        },
    }
}

async fn establish_inner(
    inner: &Inner,
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
) -> Result<Session, ConnectError> {
    let server = inner.server;
    let unreachable = |reason: String| ConnectError::Unreachable { server, reason };
    let conn = endpoint
        .connect_with(config.clone(), server, SERVER_NAME)
        .map_err(|e| unreachable(e.to_string()))?
        .await
        .map_err(|e| closed_error(server, &inner.site_public, &e))?;
    let result = authenticate(inner, &conn).await;
    if let Err(e) = &result {
        let (code, reason) = match e {
            ConnectError::WrongRendezvousKey { .. } => (
                CloseCode::WrongRendezvousKey,
                "the rendezvous did not prove the pinned key",
            ),
            ConnectError::Protocol { .. } => (CloseCode::Protocol, "protocol error"),
            _ => (CloseCode::Normal, "giving up"),
        };
        conn.close(code.varint(), reason.as_bytes());
    }
    result
}

async fn authenticate(inner: &Inner, conn: &quinn::Connection) -> Result<Session, ConnectError> {
    let server = inner.server;
    let lost = |e: &quinn::ConnectionError| closed_error(server, &inner.site_public, e);
    let protocol = |reason: String| ConnectError::Protocol { server, reason };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    let mut exporter = [0u8; 32];
    conn.export_keying_material(&mut exporter, auth::EXPORTER_LABEL, auth::EXPORTER_CONTEXT)
        .map_err(|_| protocol("no TLS exporter".into()))?;
    let proof = inner
        .auth_key
        .proof(Role::Site, &exporter, &inner.site_public, &inner.pinned);
    let hello = SiteMessage::Hello {
        version: PROTOCOL_VERSION,
        site_key: Wire32(inner.site_public.to_bytes()),
        rendezvous_key: Wire32(inner.pinned.to_bytes()),
        proof: Wire32(proof),
    };
    // A write error means the connection closed: its close reason says why.
    if write_frame(&mut send, &hello).await.is_err() {
        return Err(lost(&conn.closed().await));
    }
    let mut decoder = FrameDecoder::default();
    let reply = match read_frame::<RendezvousMessage>(&mut recv, &mut decoder).await {
        Ok(Some(m)) => m,
        Ok(None) | Err(ReadFailure::Closed(_)) => return Err(lost(&conn.closed().await)),
        Err(ReadFailure::Protocol(e)) => return Err(protocol(e)),
    };
    let (observed, relay_id) = match reply {
        RendezvousMessage::Welcome {
            proof,
            relay_id,
            observed,
        } => {
            if !inner.auth_key.verify(
                Role::Rendezvous,
                &exporter,
                &inner.site_public,
                &inner.pinned,
                &proof.0,
            ) {
                return Err(ConnectError::WrongRendezvousKey {
                    server,
                    detail: format!(
                        "the server did not prove it holds the private key of {} (another server, or a man in the middle)",
                        keys::encode_public(&inner.pinned)
                    ),
                });
            }
            (observed, relay_id)
        }
        RendezvousMessage::Reject { code, message } => {
            return Err(rejection_error(
                server,
                &inner.site_public,
                code.into(),
                message,
            ));
        }
        RendezvousMessage::PeerUpdate { .. } => {
            return Err(protocol("peer update before welcome".into()));
        }
    };
    // Only now, with the rendezvous proven, say who our peers are.
    let register = register_message(&inner.lock());
    if write_frame(&mut send, &register).await.is_err() {
        return Err(lost(&conn.closed().await));
    }
    debug!(relay_id, "registered");
    Ok(Session {
        conn: conn.clone(),
        send,
        recv,
        decoder,
        observed,
    })
}

/// Exponential backoff with jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: MIN_BACKOFF }
    }

    fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }

    fn max_out(&mut self) {
        self.next = MAX_BACKOFF;
    }

    /// The delay before the next attempt (±25% jitter).
    fn delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        let jitter = 0.75 + rand::random::<f64>() * 0.5;
        base.mul_f64(jitter)
    }
}

async fn drive(
    inner: Arc<Inner>,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    events: mpsc::Sender<RendezvousEvent>,
    mut session: Option<Session>,
) {
    let mut backoff = Backoff::new();
    // `start` tries at once; after that, every attempt waits its backoff.
    let mut wait = session.is_some();
    loop {
        if let Some(s) = session.take() {
            let started = Instant::now();
            let reason = run_session(&inner, s, &events).await;
            info!(%reason, "disconnected from the rendezvous; reconnecting");
            go_offline(&inner, &events, reason).await;
            if started.elapsed() >= STABLE {
                backoff.reset();
            }
        }
        if wait {
            tokio::time::sleep(backoff.delay()).await;
        }
        wait = true;
        match establish(&inner, &endpoint, &config).await {
            Ok(s) => session = Some(s),
            Err(e) => {
                if e.needs_operator() {
                    backoff.max_out();
                }
                let _ = events
                    .send(RendezvousEvent::Disconnected {
                        reason: e.to_string(),
                    })
                    .await;
            }
        }
    }
}

async fn go_offline(inner: &Inner, events: &mpsc::Sender<RendezvousEvent>, reason: String) {
    let gone: Vec<[u8; 32]> = {
        let mut state = inner.lock();
        state.conn = None;
        state.by_relay.clear();
        state.online.drain().map(|(k, _)| k).collect()
    };
    for peer in gone {
        let _ = events
            .send(RendezvousEvent::PeerUpdate {
                peer: PublicKey::from(peer),
                candidates: Vec::new(),
                online: false,
            })
            .await;
    }
    let _ = events.send(RendezvousEvent::Disconnected { reason }).await;
}

/// Serves one established connection until it ends; returns why it ended.
async fn run_session(inner: &Inner, s: Session, events: &mpsc::Sender<RendezvousEvent>) -> String {
    let Session {
        conn,
        mut send,
        mut recv,
        mut decoder,
        observed,
    } = s;
    bump(&inner.counters.connections, 1);
    let _ = events.send(RendezvousEvent::Connected { observed }).await;
    let mut reassembler = Reassembler::default();
    let mut tick = tokio::time::interval(EXPIRE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        tokio::select! {
            read = read_frame::<RendezvousMessage>(&mut recv, &mut decoder) => match read {
                Ok(Some(RendezvousMessage::PeerUpdate { peer, relay_id, candidates, online })) => {
                    {
                        let mut state = inner.lock();
                        if let Some(old) = state.online.remove(&peer.0) {
                            state.by_relay.remove(&old);
                        }
                        if online {
                            state.online.insert(peer.0, relay_id);
                            state.by_relay.insert(relay_id, peer.0);
                        }
                    }
                    debug!(peer = %keys::encode_bytes(&peer.0), online, ?candidates, "peer update");
                    let _ = events.send(RendezvousEvent::PeerUpdate {
                        peer: PublicKey::from(peer.0),
                        candidates,
                        online,
                    }).await;
                }
                Ok(Some(other)) => {
                    conn.close(CloseCode::Protocol.varint(), b"unexpected message");
                    break format!("protocol error: unexpected {other:?}");
                }
                Ok(None) => {
                    conn.close(CloseCode::Normal.varint(), b"control stream finished");
                    break "the rendezvous finished the control stream".to_owned();
                }
                Err(ReadFailure::Protocol(e)) => {
                    conn.close(CloseCode::Protocol.varint(), b"bad frame");
                    break format!("protocol error: {e}");
                }
                Err(ReadFailure::Closed(_)) => break conn.closed().await.to_string(),
            },
            () = inner.changed.notified() => {
                let register = register_message(&inner.lock());
                if write_frame(&mut send, &register).await.is_err() {
                    break conn.closed().await.to_string();
                }
            }
            datagram = conn.read_datagram() => match datagram {
                Ok(d) => receive_datagram(inner, &mut reassembler, &d, events),
                Err(e) => break e.to_string(),
            },
            _ = tick.tick() => {
                reassembler.expire(Instant::now());
                sync_reassembly_stats(inner, &mut reassembler);
            }
        }
    };
    sync_reassembly_stats(inner, &mut reassembler);
    inner.lock().conn = None;
    reason
}

fn sync_reassembly_stats(inner: &Inner, r: &mut Reassembler) {
    let dropped = std::mem::take(&mut r.stats.dropped_incomplete);
    if dropped > 0 {
        bump(&inner.counters.relay_incomplete, dropped);
    }
}

fn receive_datagram(
    inner: &Inner,
    reassembler: &mut Reassembler,
    datagram: &[u8],
    events: &mpsc::Sender<RendezvousEvent>,
) {
    let Ok((header, payload)) = relay::parse(datagram) else {
        bump(&inner.counters.relay_malformed, 1);
        return;
    };
    let Some(from) = inner.lock().by_relay.get(&header.relay_id).copied() else {
        bump(&inner.counters.relay_malformed, 1);
        return;
    };
    let Some(packet) = reassembler.push(Instant::now(), header.relay_id, &header, payload) else {
        return;
    };
    bump(&inner.counters.relay_rx_packets, 1);
    bump(&inner.counters.relay_rx_bytes, packet.len() as u64);
    let event = RendezvousEvent::Relayed {
        from: PublicKey::from(from),
        packet,
    };
    if events.try_send(event).is_err() {
        bump(&inner.counters.events_dropped, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new();
        let first = b.delay();
        assert!(first >= MIN_BACKOFF.mul_f64(0.75) && first <= MIN_BACKOFF.mul_f64(1.25));
        for _ in 0..20 {
            let d = b.delay();
            assert!(d <= MAX_BACKOFF.mul_f64(1.25));
        }
        assert_eq!(b.next, MAX_BACKOFF);
        b.reset();
        assert_eq!(b.next, MIN_BACKOFF);
    }
}
