//! The site's side: one QUIC connection to one rendezvous, kept up with
//! reconnects. The daemon runs one client per configured rendezvous.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tracing::Instrument;
use x25519_dalek::{PublicKey, StaticSecret};

use super::auth::{self, AuthKey, Exporter};
use super::proto::CloseCode;
use super::relay;
use super::session::{ClientSession, Lost, Transmit};
use super::session::{ClientStats, ConnectError, RelayError, RendezvousEvent};
use super::tls::{self, SERVER_NAME};

/// Events buffered for the caller; relayed packets beyond it are dropped.
const EVENT_QUEUE: usize = 1024;

/// Counters of what the driver did with the session's output.
#[derive(Default)]
struct Counters {
    relay_tx_packets: AtomicU64,
    relay_tx_bytes: AtomicU64,
    relay_tx_datagrams: AtomicU64,
    events_dropped: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// What the driver and the handles share.
struct Shared {
    /// Every decision.
    session: ClientSession,
    /// The connection while one is up (for relay sends from the handles).
    conn: Option<quinn::Connection>,
}

struct Inner {
    server: SocketAddr,
    state: Mutex<Shared>,
    /// The session has something to transmit (a handle changed it).
    changed: Notify,
    counters: Counters,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
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
        let (driver, events) = setup(server, pinned, site_secret, peers)?;
        let mut driver = driver;
        driver.establish().await?;
        Ok(Self::spawn(driver, events))
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
        let (driver, events) = setup(server, pinned, site_secret, peers)?;
        Ok(Self::spawn(driver, events))
    }

    fn spawn(driver: Driver, events: mpsc::Receiver<RendezvousEvent>) -> Self {
        let span = tracing::info_span!("rendezvous", server = %driver.inner.server);
        let handle = RendezvousHandle {
            inner: driver.inner.clone(),
        };
        let endpoint = driver.endpoint.clone();
        let driver = tokio::spawn(driver.run().instrument(span));
        Self {
            handle,
            events,
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
        let (conn, target) = {
            let mut shared = self.inner.lock();
            let conn = shared.conn.clone().ok_or(RelayError::NotConnected)?;
            (conn, shared.session.relay_target(peer)?)
        };
        let max = conn
            .max_datagram_size()
            .ok_or(RelayError::DatagramsUnsupported)?;
        let datagrams = relay::fragment(target.relay_id, target.packet_id, packet, max)?;
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
        let conn = {
            let shared = self.inner.lock();
            if !shared.session.is_registered() {
                return None;
            }
            shared.conn.clone()?
        };
        conn.max_datagram_size()
            .map(|max| max.saturating_sub(relay::HEADER_LEN))
    }

    /// Replaces this site's candidates and re-registers (now if connected,
    /// else on the next connection).
    pub fn update_candidates(&self, candidates: Vec<SocketAddr>) {
        self.inner.lock().session.update_candidates(candidates);
        self.inner.changed.notify_one();
    }

    /// Replaces the list of peers to be introduced to (a config reload) and
    /// re-registers.
    pub fn update_peers(&self, peers: Vec<PublicKey>) {
        self.inner.lock().session.update_peers(peers);
        self.inner.changed.notify_one();
    }

    /// Asks the rendezvous for a UDP relay port for this site and `peer`
    /// (granted only to mutual peers; it comes as a
    /// [`RendezvousEvent::RelayPort`]). Does nothing while not registered,
    /// with the peer offline, or with a port granted already.
    pub fn request_relay_port(&self, peer: &PublicKey) {
        self.inner.lock().session.request_relay_port(peer);
        self.inner.changed.notify_one();
    }

    /// Whether the client is connected and registered now.
    pub fn is_connected(&self) -> bool {
        self.inner.lock().session.is_registered()
    }

    /// The address the rendezvous last saw this client's QUIC socket at.
    pub fn observed(&self) -> Option<SocketAddr> {
        self.inner.lock().session.observed()
    }

    /// The peers online through this rendezvous now.
    pub fn online_peers(&self) -> Vec<PublicKey> {
        self.inner.lock().session.online_peers()
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
            events_dropped: get(&c.events_dropped),
            ..self.inner.lock().session.stats()
        }
    }
}

#[cfg(test)]
impl RendezvousHandle {
    /// The relay id this client uses for `peer`.
    pub(crate) fn relay_id_of(&self, peer: &PublicKey) -> Option<u32> {
        self.inner.lock().session.relay_id_of(peer)
    }

    /// Makes this client believe `peer` has relay id `id` (attack tests).
    pub(crate) fn force_relay_id(&self, peer: &PublicKey, id: u32) {
        self.inner.lock().session.force_relay_id(peer, id);
    }
}

fn setup(
    server: SocketAddr,
    pinned: PublicKey,
    site_secret: StaticSecret,
    peers: Vec<PublicKey>,
) -> Result<(Driver, mpsc::Receiver<RendezvousEvent>), ConnectError> {
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
    let session = ClientSession::new(
        server,
        pinned,
        site_public,
        auth_key,
        peers,
        Instant::now(),
        rand::random(),
    );
    let inner = Arc::new(Inner {
        server,
        state: Mutex::new(Shared {
            session,
            conn: None,
        }),
        changed: Notify::new(),
        counters: Counters::default(),
    });
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let driver = Driver {
        inner,
        endpoint,
        config,
        link: Link::Down,
        events: tx,
    };
    Ok((driver, rx))
}

/// A connection that is up, with its control stream.
struct Dialled {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    exporter: Option<Exporter>,
}

type Dialling = Pin<Box<dyn Future<Output = Result<Dialled, Lost>> + Send>>;

/// The I/O objects of the current connection attempt.
enum Link {
    /// No connection.
    Down,
    /// Dialling (QUIC handshake, control stream).
    Dialling(Dialling),
    /// Up. A stream half is `None` once it failed or finished; the
    /// connection's close then says why.
    Up {
        conn: quinn::Connection,
        send: Option<quinn::SendStream>,
        recv: Option<quinn::RecvStream>,
    },
}

/// What happened, for the session.
enum Input {
    Timeout,
    Changed,
    Dialled(Result<Dialled, Lost>),
    Stream(Result<Option<quinn::Chunk>, quinn::ReadError>),
    Datagram(Result<bytes::Bytes, quinn::ConnectionError>),
    Closed(quinn::ConnectionError),
}

fn lost(e: &quinn::ConnectionError) -> Lost {
    let closed_by_rendezvous = match e {
        quinn::ConnectionError::ApplicationClosed(close) => Some((
            close.error_code.into_inner(),
            String::from_utf8_lossy(&close.reason).into_owned(),
        )),
        _ => None,
    };
    Lost {
        closed_by_rendezvous,
        description: e.to_string(),
    }
}

async fn dial(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    server: SocketAddr,
) -> Result<Dialled, Lost> {
    let conn = endpoint
        .connect_with(config, server, SERVER_NAME)
        .map_err(|e| Lost {
            closed_by_rendezvous: None,
            description: e.to_string(),
        })?
        .await
        .map_err(|e| lost(&e))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    let mut exporter = [0u8; 32];
    let exporter = conn
        .export_keying_material(&mut exporter, auth::EXPORTER_LABEL, auth::EXPORTER_CONTEXT)
        .ok()
        .map(|()| exporter);
    Ok(Dialled {
        conn,
        send,
        recv,
        exporter,
    })
}

/// Moves bytes and time between quinn and the [`ClientSession`]; decides
/// nothing.
struct Driver {
    inner: Arc<Inner>,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    link: Link,
    events: mpsc::Sender<RendezvousEvent>,
}

impl Driver {
    /// Drives the first attempt: `Ok` once registered, or why it failed.
    async fn establish(&mut self) -> Result<(), ConnectError> {
        loop {
            self.flush().await;
            {
                let mut shared = self.inner.lock();
                if let Some(e) = shared.session.take_failure() {
                    return Err(e);
                }
                if shared.session.is_registered() {
                    return Ok(());
                }
            }
            self.step().await;
        }
    }

    async fn run(mut self) {
        loop {
            self.flush().await;
            self.step().await;
        }
    }

    /// Carries out what the session asks for, then hands its events to the
    /// site.
    async fn flush(&mut self) {
        loop {
            let transmit = self.inner.lock().session.poll_transmit();
            let Some(transmit) = transmit else { break };
            match transmit {
                Transmit::Connect => {
                    let dialling = dial(
                        self.endpoint.clone(),
                        self.config.clone(),
                        self.inner.server,
                    );
                    self.link = Link::Dialling(Box::pin(dialling));
                }
                Transmit::Stream(bytes) => {
                    // A write error means the connection closed: its close
                    // reason says why.
                    if let Link::Up { send, .. } = &mut self.link
                        && let Some(stream) = send
                        && stream.write_all(&bytes).await.is_err()
                    {
                        *send = None;
                    }
                }
                Transmit::Close { code, reason } => {
                    if let Link::Up { conn, .. } = std::mem::replace(&mut self.link, Link::Down) {
                        conn.close(code.varint(), reason.as_bytes());
                    }
                    self.inner.lock().conn = None;
                }
            }
        }
        loop {
            let event = self.inner.lock().session.poll_event();
            match event {
                None => break,
                Some(event @ RendezvousEvent::Relayed { .. }) => {
                    if self.events.try_send(event).is_err() {
                        bump(&self.inner.counters.events_dropped, 1);
                    }
                }
                Some(event) => {
                    let _ = self.events.send(event).await;
                }
            }
        }
    }

    /// Waits for the next thing to happen and gives it to the session.
    async fn step(&mut self) {
        let deadline = self.inner.lock().session.poll_timeout();
        let timer = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let changed = self.inner.changed.notified();
        let input = match &mut self.link {
            Link::Down => tokio::select! {
                () = timer => Input::Timeout,
                () = changed => Input::Changed,
            },
            Link::Dialling(dialling) => tokio::select! {
                () = timer => Input::Timeout,
                () = changed => Input::Changed,
                dialled = dialling => Input::Dialled(dialled),
            },
            Link::Up { conn, recv, .. } => tokio::select! {
                () = timer => Input::Timeout,
                () = changed => Input::Changed,
                chunk = read_chunk(recv) => Input::Stream(chunk),
                datagram = conn.read_datagram() => Input::Datagram(datagram),
                e = conn.closed() => Input::Closed(e),
            },
        };
        let now = Instant::now();
        let mut shared = self.inner.lock();
        match input {
            Input::Timeout => shared.session.handle_timeout(now),
            Input::Changed => {}
            Input::Dialled(Ok(d)) => {
                shared.conn = Some(d.conn.clone());
                self.link = Link::Up {
                    conn: d.conn,
                    send: Some(d.send),
                    recv: Some(d.recv),
                };
                shared.session.connected(now, d.exporter);
            }
            Input::Dialled(Err(lost)) => {
                self.link = Link::Down;
                shared.session.connection_lost(now, lost);
            }
            Input::Stream(Ok(Some(chunk))) => shared.session.stream_received(now, &chunk.bytes),
            Input::Stream(Ok(None)) => {
                if let Link::Up { recv, .. } = &mut self.link {
                    *recv = None;
                }
                shared.session.stream_finished(now);
            }
            // The connection's close says why.
            Input::Stream(Err(_)) => {
                if let Link::Up { recv, .. } = &mut self.link {
                    *recv = None;
                }
            }
            Input::Datagram(Ok(datagram)) => shared.session.datagram_received(now, &datagram),
            Input::Datagram(Err(e)) | Input::Closed(e) => {
                shared.session.connection_lost(now, lost(&e));
            }
        }
    }
}

/// The next chunk of the control stream; never ready once the stream is
/// gone.
async fn read_chunk(
    recv: &mut Option<quinn::RecvStream>,
) -> Result<Option<quinn::Chunk>, quinn::ReadError> {
    match recv {
        Some(recv) => recv.read_chunk(64 * 1024, true).await,
        None => std::future::pending().await,
    }
}
