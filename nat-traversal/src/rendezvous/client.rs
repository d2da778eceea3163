//! The site's side: one connection to one rendezvous, kept up with
//! reconnects. The daemon runs one client per configured rendezvous.
//!
//! The connection is QUIC. Where UDP to the rendezvous gets no answer
//! (an egress firewall that lets only TCP out), and the rendezvous has a
//! TLS-over-TCP address, the same session runs over TLS on TCP instead
//! (see [`super::tcp`]): each attempt dials QUIC first and TCP too after
//! [`TCP_HEAD_START`] (at once after a connection over TCP), and takes
//! whichever is up first. While on TCP, QUIC
//! is tried again every [`UDP_RETRY`]; once it answers, the client moves
//! back to it.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tracing::Instrument;
use x25519_dalek::{PublicKey, StaticSecret};

use super::auth::{AuthKey, Exporter};
use super::proto::CloseCode;
use super::relay;
use super::session::{ClientSession, Lost, Transmit};
use super::session::{ClientStats, ConnectError, RelayError, RendezvousEvent};
use super::tcp::{self, Carrier, Record, TcpHandle, TcpReader};
use super::tls::{self, SERVER_NAME};

/// Events buffered for the caller; relayed packets beyond it are dropped.
const EVENT_QUEUE: usize = 1024;
/// How long a QUIC attempt runs alone before TLS over TCP is tried too.
const TCP_HEAD_START: Duration = Duration::from_millis(500);
/// While connected over TCP, QUIC is tried again this often.
const UDP_RETRY: Duration = Duration::from_secs(10);
/// A QUIC attempt while connected over TCP gives up after this long.
const UDP_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a rendezvous is: its QUIC address and, optionally, its TLS-over-TCP
/// address for when UDP gets no answer. A bare `SocketAddr` is QUIC only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RendezvousAddr {
    /// The QUIC (UDP) address.
    pub quic: SocketAddr,
    /// The TLS-over-TCP address, if the rendezvous listens on one.
    pub tcp: Option<SocketAddr>,
}

impl From<SocketAddr> for RendezvousAddr {
    fn from(quic: SocketAddr) -> Self {
        Self { quic, tcp: None }
    }
}

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
    conn: Option<Carrier>,
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
        server: impl Into<RendezvousAddr>,
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
        server: impl Into<RendezvousAddr>,
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
            conn.close(CloseCode::Normal, b"site closing");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

impl Drop for RendezvousClient {
    fn drop(&mut self) {
        self.driver.abort();
        if let Some(conn) = self.handle.inner.lock().conn.take() {
            conn.close(CloseCode::Normal, b"site closing");
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
            conn.send_datagram(datagram).map_err(RelayError::Send)?;
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
    /// with the peer offline, with a port granted already, or while
    /// connected over TCP (UDP gets no answer: the port would be useless).
    pub fn request_relay_port(&self, peer: &PublicKey) {
        let mut shared = self.inner.lock();
        if matches!(shared.conn, Some(Carrier::Tcp(_))) {
            return;
        }
        shared.session.request_relay_port(peer);
        drop(shared);
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

    /// The rendezvous' (QUIC) address.
    pub fn server(&self) -> SocketAddr {
        self.inner.server
    }

    /// How the client is connected now: `"quic"`, `"tcp"` (TLS over TCP,
    /// UDP got no answer), or `None`.
    pub fn transport(&self) -> Option<&'static str> {
        let shared = self.inner.lock();
        if !shared.session.is_registered() {
            return None;
        }
        shared.conn.as_ref().map(Carrier::transport)
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
    server: impl Into<RendezvousAddr>,
    pinned: PublicKey,
    site_secret: StaticSecret,
    peers: Vec<PublicKey>,
) -> Result<(Driver, mpsc::Receiver<RendezvousEvent>), ConnectError> {
    let RendezvousAddr { quic: server, tcp } = server.into();
    let auth_key =
        AuthKey::derive(&site_secret, &pinned).ok_or(ConnectError::UnusableKey { server })?;
    let config = tls::client_config()?;
    let tcp = match tcp {
        Some(addr) => Some((
            addr,
            tokio_rustls::TlsConnector::from(tls::tcp_client_config()?),
        )),
        None => None,
    };
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
        tcp,
        link: Link::Down,
        events: tx,
        ready: None,
        probe: Probe::Off,
        udp_failed: false,
    };
    Ok((driver, rx))
}

/// A TLS-over-TCP connection to the rendezvous, as a site holds it.
type ClientTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A connection that is up, with its control stream.
struct Dialled {
    up: Up,
    exporter: Option<Exporter>,
}

/// A connection that is up. Over QUIC, a stream half is `None` once it
/// failed or finished; the connection's close then says why.
enum Up {
    Quic {
        conn: quinn::Connection,
        send: Option<quinn::SendStream>,
        recv: Option<quinn::RecvStream>,
    },
    Tcp {
        handle: TcpHandle,
        reader: TcpReader<ClientTls>,
    },
}

impl Up {
    fn carrier(&self) -> Carrier {
        match self {
            Up::Quic { conn, .. } => Carrier::Quic(conn.clone()),
            Up::Tcp { handle, .. } => Carrier::Tcp(handle.clone()),
        }
    }
}

type Dialling = Pin<Box<dyn Future<Output = Result<Dialled, Lost>> + Send>>;

/// The I/O objects of the current connection attempt.
enum Link {
    /// No connection.
    Down,
    /// Dialling (QUIC handshake, control stream; or TCP and TLS).
    Dialling(Dialling),
    /// Up.
    Up(Up),
}

/// While connected over TCP: when QUIC is tried again, or the attempt.
enum Probe {
    /// Not on TCP.
    Off,
    /// The next QUIC attempt is due when this sleep ends.
    At(Pin<Box<tokio::time::Sleep>>),
    /// A QUIC attempt is running.
    Dialling(Dialling),
}

impl Probe {
    /// The next QUIC attempt `delay` from now.
    fn after(delay: Duration) -> Probe {
        Probe::At(Box::pin(tokio::time::sleep(delay)))
    }
}

/// What happened, for the session.
enum Input {
    Timeout,
    Changed,
    Dialled(Result<Dialled, Lost>),
    Stream(bytes::Bytes),
    StreamFinished,
    /// The stream failed; the connection's close says why.
    StreamFailed,
    Datagram(bytes::Bytes),
    Closed(Lost),
    /// The QUIC attempt made while on TCP: up, or not.
    Probed(Option<Dialled>),
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

fn unreachable(description: String) -> Lost {
    Lost {
        closed_by_rendezvous: None,
        description,
    }
}

async fn dial_quic(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    server: SocketAddr,
) -> Result<Dialled, Lost> {
    let conn = endpoint
        .connect_with(config, server, SERVER_NAME)
        .map_err(|e| unreachable(e.to_string()))?
        .await
        .map_err(|e| lost(&e))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    let exporter = tls::quic_exporter(&conn);
    Ok(Dialled {
        up: Up::Quic {
            conn,
            send: Some(send),
            recv: Some(recv),
        },
        exporter,
    })
}

async fn dial_tcp(
    connector: tokio_rustls::TlsConnector,
    server: SocketAddr,
) -> Result<Dialled, Lost> {
    let stream = tokio::net::TcpStream::connect(server)
        .await
        .map_err(|e| unreachable(format!("TCP {server}: {e}")))?;
    // Relayed packets go out as they come, not Nagle-delayed.
    let _ = stream.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)
        .map_err(|e| unreachable(e.to_string()))?;
    let tls = connector
        .connect(name, stream)
        .await
        .map_err(|e| unreachable(format!("TLS over TCP {server}: {e}")))?;
    let exporter = tls::tcp_exporter(tls.get_ref().1);
    let (reader, handle) = tcp::start(tls);
    Ok(Dialled {
        up: Up::Tcp { handle, reader },
        exporter,
    })
}

/// Dials QUIC, and after `head_start` (or once QUIC failed) TCP as well,
/// if there is a TCP address: the first that is up wins, the other is
/// dropped.
async fn dial_either(
    quic: Dialling,
    tcp: Option<Dialling>,
    head_start: Duration,
) -> Result<Dialled, Lost> {
    let Some(mut tcp) = tcp else {
        return quic.await;
    };
    let mut quic = Some(quic);
    let mut quic_lost = None;
    if let Some(attempt) = quic.as_mut() {
        tokio::select! {
            result = attempt => match result {
                Ok(d) => return Ok(d),
                Err(e) => {
                    quic = None;
                    quic_lost = Some(e);
                }
            },
            () = tokio::time::sleep(head_start) => {}
        }
    }
    let mut tcp_lost: Option<Lost> = None;
    loop {
        let quic_attempt = async {
            match quic.as_mut() {
                Some(attempt) => attempt.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = quic_attempt => match result {
                Ok(d) => return Ok(d),
                Err(e) => {
                    quic = None;
                    quic_lost = Some(e);
                }
            },
            result = &mut tcp, if tcp_lost.is_none() => match result {
                Ok(d) => return Ok(d),
                Err(e) => tcp_lost = Some(e),
            },
        }
        if let (Some(q), Some(t)) = (&quic_lost, &tcp_lost) {
            return Err(Lost {
                closed_by_rendezvous: q.closed_by_rendezvous.clone(),
                description: format!("{}; {}", q.description, t.description),
            });
        }
    }
}

/// Moves bytes and time between quinn (or the TCP connection) and the
/// [`ClientSession`]; decides nothing but which transport to dial.
struct Driver {
    inner: Arc<Inner>,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    /// The rendezvous' TLS-over-TCP address and the TLS connector, if it
    /// has one.
    tcp: Option<(SocketAddr, tokio_rustls::TlsConnector)>,
    link: Link,
    events: mpsc::Sender<RendezvousEvent>,
    /// A QUIC connection made while on TCP, for the next dial.
    ready: Option<Dialled>,
    probe: Probe,
    /// The last connection was over TCP: the next attempt dials TCP at
    /// once, beside QUIC (a reconnect behind the same firewall).
    udp_failed: bool,
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

    fn quic_attempt(&self) -> Dialling {
        Box::pin(dial_quic(
            self.endpoint.clone(),
            self.config.clone(),
            self.inner.server,
        ))
    }

    /// Carries out what the session asks for, then hands its events to the
    /// site.
    async fn flush(&mut self) {
        loop {
            let transmit = self.inner.lock().session.poll_transmit();
            let Some(transmit) = transmit else { break };
            match transmit {
                Transmit::Connect => {
                    let dialling: Dialling = match self.ready.take() {
                        Some(ready) => Box::pin(std::future::ready(Ok(ready))),
                        None => {
                            let tcp = self.tcp.as_ref().map(|(addr, connector)| -> Dialling {
                                Box::pin(dial_tcp(connector.clone(), *addr))
                            });
                            let head_start = if self.udp_failed {
                                Duration::ZERO
                            } else {
                                TCP_HEAD_START
                            };
                            Box::pin(dial_either(self.quic_attempt(), tcp, head_start))
                        }
                    };
                    self.link = Link::Dialling(dialling);
                }
                Transmit::Stream(bytes) => {
                    // A write error means the connection closed: its close
                    // reason says why.
                    match &mut self.link {
                        Link::Up(Up::Quic { send, .. }) => {
                            if let Some(stream) = send
                                && stream.write_all(&bytes).await.is_err()
                            {
                                *send = None;
                            }
                        }
                        Link::Up(Up::Tcp { handle, .. }) => {
                            let _ = handle.write_control(&bytes).await;
                        }
                        Link::Down | Link::Dialling(_) => {}
                    }
                }
                Transmit::Close { code, reason } => {
                    if let Link::Up(up) = std::mem::replace(&mut self.link, Link::Down) {
                        up.carrier().close(code, reason.as_bytes());
                    }
                    self.probe = Probe::Off;
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
            Link::Up(Up::Quic { conn, recv, .. }) => tokio::select! {
                () = timer => Input::Timeout,
                () = changed => Input::Changed,
                chunk = read_chunk(recv) => match chunk {
                    Ok(Some(chunk)) => Input::Stream(chunk.bytes),
                    Ok(None) => Input::StreamFinished,
                    Err(_) => Input::StreamFailed,
                },
                datagram = conn.read_datagram() => match datagram {
                    Ok(d) => Input::Datagram(d),
                    Err(e) => Input::Closed(lost(&e)),
                },
                e = conn.closed() => Input::Closed(lost(&e)),
            },
            Link::Up(Up::Tcp { reader, .. }) => {
                let (endpoint, config) = (&self.endpoint, &self.config);
                let server = self.inner.server;
                let probe = &mut self.probe;
                tokio::select! {
                    () = timer => Input::Timeout,
                    () = changed => Input::Changed,
                    record = reader.next() => match record {
                        Ok(Some(Record::Control(bytes))) => Input::Stream(bytes),
                        Ok(Some(Record::Datagram(d))) => Input::Datagram(d),
                        Ok(Some(Record::Close(code, reason))) => Input::Closed(Lost {
                            description: format!("closed by the rendezvous: {reason}"),
                            closed_by_rendezvous: Some((code, reason)),
                        }),
                        Ok(None) => Input::Closed(unreachable(
                            "the rendezvous closed the TCP connection".into(),
                        )),
                        Err(e) => Input::Closed(unreachable(format!("over TCP: {e}"))),
                    },
                    probed = next_probe(probe, endpoint, config, server) => Input::Probed(probed),
                }
            }
        };
        let now = Instant::now();
        let mut shared = self.inner.lock();
        match input {
            Input::Timeout => shared.session.handle_timeout(now),
            Input::Changed => {}
            Input::Dialled(Ok(d)) => {
                let carrier = d.up.carrier();
                self.udp_failed = matches!(carrier, Carrier::Tcp(_));
                self.probe = match carrier {
                    Carrier::Tcp(_) => {
                        tracing::warn!(
                            tcp = ?self.tcp.as_ref().map(|(addr, _)| addr),
                            "UDP to the rendezvous gets no answer; connected over TLS on TCP (QUIC is tried again every {} s)",
                            UDP_RETRY.as_secs()
                        );
                        Probe::after(UDP_RETRY)
                    }
                    Carrier::Quic(_) => Probe::Off,
                };
                shared.conn = Some(carrier);
                self.link = Link::Up(d.up);
                shared.session.connected(now, d.exporter);
            }
            Input::Dialled(Err(lost)) => {
                self.link = Link::Down;
                shared.session.connection_lost(now, lost);
            }
            Input::Stream(bytes) => shared.session.stream_received(now, &bytes),
            Input::StreamFinished => {
                if let Link::Up(Up::Quic { recv, .. }) = &mut self.link {
                    *recv = None;
                }
                shared.session.stream_finished(now);
            }
            Input::StreamFailed => {
                if let Link::Up(Up::Quic { recv, .. }) = &mut self.link {
                    *recv = None;
                }
            }
            Input::Datagram(datagram) => shared.session.datagram_received(now, &datagram),
            Input::Closed(lost) => shared.session.connection_lost(now, lost),
            Input::Probed(Some(quic)) if shared.session.is_registered() => {
                tracing::info!("UDP reaches the rendezvous again; moving back to QUIC");
                self.ready = Some(quic);
                shared.session.redial(now);
            }
            Input::Probed(Some(quic)) => quic.up.carrier().close(CloseCode::Normal, b"not needed"),
            Input::Probed(None) => {}
        }
    }
}

/// While on TCP: waits for the next QUIC attempt to be due, makes it, and
/// gives its result (`None`: no answer; the next is scheduled). Cancel-safe:
/// the attempt is kept in `probe`.
async fn next_probe(
    probe: &mut Probe,
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    server: SocketAddr,
) -> Option<Dialled> {
    loop {
        match probe {
            Probe::Off => return std::future::pending().await,
            Probe::At(sleep) => {
                sleep.as_mut().await;
                let attempt = tokio::time::timeout(
                    UDP_PROBE_TIMEOUT,
                    dial_quic(endpoint.clone(), config.clone(), server),
                );
                *probe = Probe::Dialling(Box::pin(async move {
                    attempt
                        .await
                        .unwrap_or_else(|_| Err(unreachable("no answer".into())))
                }));
            }
            Probe::Dialling(attempt) => {
                let result = attempt.await;
                *probe = Probe::after(UDP_RETRY);
                return result.ok();
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
