//! The rendezvous server: QUIC for sites (authentication, introductions,
//! relay) and a STUN responder. A thin async driver around
//! [`super::registry`], [`super::auth`], [`super::proto`] and
//! [`super::relay`].

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, warn};
use x25519_dalek::{PublicKey, StaticSecret};

use super::auth::{self, AuthKey, Role};
use super::config::{RelayPorts, ServerConfig, SiteEntry};
use super::limits::{
    Admission, Coalescer, MAX_CANDIDATES, PendingTable, REGISTER_BURST, REGISTER_INTERVAL,
    UpdateQueue, configured_peers,
};
use super::proto::{
    CloseCode, FrameDecoder, MAX_FRAME_LEN, MAX_HELLO_LEN, PROTOCOL_VERSION, RendezvousMessage,
    SiteMessage, Wire32, encode_frame,
};
use super::registry::{ConnId, PairKey, Registry, RelayRequest, RouteError, SiteKey, Update};
use super::relay;
use super::relay_port::{RelayPort, SideCounters};
use super::stream::{ReadFailure, read_frame, write_frame};
use super::tcp::{self, Carrier, Record, TcpHandle, TcpReader};
use super::tls::{self, TlsError};
use crate::stun;
use crate::udp_relay::{RelayPair, RelayToken};
use causeway_common::keys::{self, KeyError};

/// How long a new connection has to finish the QUIC handshake, open its
/// control stream and prove its key.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Peer updates queued for one site before it counts as overloaded. The
/// queue holds one update per peer, so only a rendezvous serving more
/// sites than this reaches it.
const CONTROL_QUEUE: usize = 1024;
/// Connection-level flow-control window of an authenticated site (before
/// authentication it is the transport's, a few KiB).
const SITE_RECEIVE_WINDOW: u32 = 2 * MAX_FRAME_LEN as u32;
/// Rejections logged per [`REJECTION_LOG_WINDOW`]; the rest are counted.
const REJECTION_LOG_BUDGET: u32 = 20;
/// See [`REJECTION_LOG_BUDGET`].
const REJECTION_LOG_WINDOW: Duration = Duration::from_secs(60);
/// How long shutdown waits for connections to close cleanly.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Receive and send buffers asked for the QUIC socket. One socket carries
/// every site's connection: Linux' default (208 KiB, about 300 small
/// datagrams once the kernel's per-datagram overhead is counted) fills in
/// a fraction of a second at 10,000 sites (keep-alives alone are 2,000
/// datagrams a second), so a server that is not scheduled for a moment
/// loses datagrams, and QUIC recovers them only after its loss timers
/// (hundreds of ms to seconds). The kernel caps these at
/// `net.core.rmem_max` / `net.core.wmem_max`.
const SOCKET_BUFFER: usize = 4 << 20;
/// A relay port that nothing reached for this long is closed.
const RELAY_PORT_IDLE: Duration = Duration::from_secs(30);

/// Why the rendezvous could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The private key file could not be read or created.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A listening socket could not be bound.
    #[error("cannot bind {field} = \"{addr}\": {source}; pick a free port or another address")]
    Bind {
        /// The config field (`listen` or `stun_listen`).
        field: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC endpoint could not be set up on the socket.
    #[error("cannot start the QUIC endpoint: {0}")]
    Endpoint(io::Error),
}

/// Relay and connection counters of one configured site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteStats {
    /// The site's configured name.
    pub name: String,
    /// Its public key.
    pub public_key: PublicKey,
    /// Whether it is connected and authenticated now.
    pub connected: bool,
    /// Whether that connection is TLS over TCP (UDP from the site gets
    /// no answer), not QUIC.
    pub over_tcp: bool,
    /// WireGuard packets relayed from it, by its relay ports and over
    /// QUIC (once per packet, however many fragments it took).
    pub relay_rx_packets: u64,
    /// Bytes of WireGuard packets relayed from it (relay headers excluded).
    pub relay_rx_bytes: u64,
    /// Relay datagrams from it that were dropped: not addressed to a
    /// connected mutual peer, sent before the peer bound its relay port,
    /// or malformed.
    pub relay_dropped: u64,
}

/// What the rendezvous refused or dropped from clients, cumulative.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AbuseCounters {
    /// Connection attempts refused: too many authenticating, in all or from
    /// their source.
    pub refused: u64,
    /// Connection attempts asked to validate their address (QUIC Retry).
    pub retried: u64,
    /// Connections closed for not authenticating in time.
    pub auth_timeouts: u64,
    /// Connections that failed to authenticate (bad hello, unknown key,
    /// bad proof, oversized frame…).
    pub auth_failures: u64,
    /// Datagrams received before authentication, dropped unread.
    pub unauthenticated_datagrams: u64,
    /// Registrations coalesced into a later one (rate limit).
    pub registrations_coalesced: u64,
    /// Peer keys and candidates dropped from registrations (not a
    /// configured site, duplicates, beyond 16 candidates).
    pub registration_entries_dropped: u64,
    /// Queued peer updates replaced by a newer one about the same peer.
    pub updates_coalesced: u64,
    /// Datagrams to relay ports from addresses that had not bound to
    /// them (or binds that verify for neither site), dropped.
    pub relay_strangers: u64,
}

/// A handle on a running (or about to run) server's counters.
#[derive(Clone)]
pub struct ServerStats {
    shared: Arc<Shared>,
}

impl ServerStats {
    /// Per-site counters, sorted by site name.
    pub fn sites(&self) -> Vec<SiteStats> {
        let state = self.shared.lock();
        let mut out: Vec<SiteStats> = state
            .registry
            .sites()
            .map(|(key, name)| {
                let c = state.registry.counters(key);
                let udp = |f: fn(&SideCounters) -> &AtomicU64| {
                    self.shared
                        .relay_sides
                        .get(key)
                        .map_or(0, |s| f(s).load(Ordering::Relaxed))
                };
                SiteStats {
                    name: name.to_owned(),
                    public_key: PublicKey::from(*key),
                    connected: state.registry.is_connected(key),
                    over_tcp: state
                        .registry
                        .connection(key)
                        .and_then(|id| state.conns.get(&id))
                        .is_some_and(|h| matches!(h.conn, Carrier::Tcp(_))),
                    relay_rx_packets: c.packets + udp(|s| &s.packets),
                    relay_rx_bytes: c.bytes + udp(|s| &s.bytes),
                    relay_dropped: c.dropped + udp(|s| &s.dropped),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The counters of the site named `name`.
    pub fn site(&self, name: &str) -> Option<SiteStats> {
        self.sites().into_iter().find(|s| s.name == name)
    }

    /// STUN Binding requests answered.
    pub fn stun_answered(&self) -> u64 {
        self.shared.stun_answered.load(Ordering::Relaxed)
    }

    /// What was refused or dropped from clients.
    pub fn abuse(&self) -> AbuseCounters {
        let a = &self.shared.abuse;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AbuseCounters {
            refused: get(&a.refused),
            retried: get(&a.retried),
            auth_timeouts: get(&a.auth_timeouts),
            auth_failures: get(&a.auth_failures),
            unauthenticated_datagrams: get(&a.unauthenticated_datagrams),
            registrations_coalesced: get(&a.registrations_coalesced),
            registration_entries_dropped: get(&a.registration_entries_dropped),
            updates_coalesced: get(&a.updates_coalesced),
            relay_strangers: get(&self.shared.relay_strangers),
        }
    }

    /// Connections authenticating now.
    pub fn pending_auth(&self) -> usize {
        self.shared.pending_total()
    }
}

/// The atomic form of [`AbuseCounters`].
#[derive(Default)]
struct Abuse {
    refused: AtomicU64,
    retried: AtomicU64,
    auth_timeouts: AtomicU64,
    auth_failures: AtomicU64,
    unauthenticated_datagrams: AtomicU64,
    registrations_coalesced: AtomicU64,
    registration_entries_dropped: AtomicU64,
    updates_coalesced: AtomicU64,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The peer updates waiting for one site, and the wake-up of its writer.
#[derive(Default)]
struct Outbox {
    queue: Mutex<UpdateQueue>,
    ready: Notify,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, UpdateQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct ConnHandle {
    conn: Carrier,
    outbox: Arc<Outbox>,
}

struct State {
    registry: Registry,
    conns: HashMap<ConnId, ConnHandle>,
    /// Which ports relay ports are bound on, and how long an unused one
    /// lives.
    relay_settings: (RelayPorts, Duration),
    /// The running relay ports' tasks, by port.
    relay_tasks: HashMap<u16, tokio::task::AbortHandle>,
}

struct Shared {
    state: Mutex<State>,
    secret: StaticSecret,
    public: PublicKey,
    /// A key that no site has, to verify the proofs of unknown keys with
    /// (so that they take as long to refuse as bad proofs).
    decoy: PublicKey,
    next_conn: AtomicU64,
    pending: Mutex<PendingTable>,
    pending_total: AtomicUsize,
    stun_answered: AtomicU64,
    abuse: Abuse,
    rejection_log: Mutex<LogBudget>,
    /// Where relay ports are bound: the QUIC socket's address.
    relay_ip: IpAddr,
    /// What each configured site sent through relay ports.
    relay_sides: HashMap<SiteKey, Arc<SideCounters>>,
    relay_strangers: Arc<AtomicU64>,
}

/// Rejections are logged at most [`REJECTION_LOG_BUDGET`] times a minute
/// (an unconfigured host may retry in a loop); the rest are counted and
/// summarized.
#[derive(Default)]
struct LogBudget {
    window: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl Shared {
    /// Whether a rejection may be logged now (see [`LogBudget`]).
    fn may_log_rejection(&self) -> bool {
        let now = Instant::now();
        let mut budget = self.rejection_log.lock().unwrap_or_else(|e| e.into_inner());
        if budget
            .window
            .is_none_or(|start| now.duration_since(start) >= REJECTION_LOG_WINDOW)
        {
            if budget.suppressed > 0 {
                warn!(
                    suppressed = budget.suppressed,
                    "{} more rejected connections were not logged in the last minute",
                    budget.suppressed
                );
            }
            *budget = LogBudget {
                window: Some(now),
                used: 0,
                suppressed: 0,
            };
        }
        if budget.used < REJECTION_LOG_BUDGET {
            budget.used += 1;
            true
        } else {
            budget.suppressed += 1;
            false
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state for
        // counters and routing; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, PendingTable> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending_total(&self) -> usize {
        self.pending_total.load(Ordering::Relaxed)
    }
}

impl State {
    /// Stops the relay ports of pairs that stopped being mutual.
    fn close_freed_ports(&mut self) {
        for port in self.registry.take_freed_ports() {
            if let Some(task) = self.relay_tasks.remove(&port) {
                task.abort();
                debug!(port, "relay port closed");
            }
        }
    }

    /// Queues updates on their connections, replacing a queued update about
    /// the same peer (the newer one says all). A site whose queue still
    /// grows beyond [`CONTROL_QUEUE`] is disconnected (it reconnects and
    /// gets a fresh picture).
    fn dispatch(&mut self, updates: Vec<Update>, abuse: &Abuse) {
        for u in updates {
            let Some(handle) = self.conns.get(&u.to) else {
                continue;
            };
            let mut queue = handle.outbox.lock();
            bump(&abuse.updates_coalesced, queue.push(u) as u64);
            let overloaded = queue.len() > CONTROL_QUEUE;
            drop(queue);
            handle.outbox.ready.notify_one();
            if overloaded {
                handle
                    .conn
                    .close(CloseCode::Overloaded, b"control stream overloaded");
            }
        }
    }
}

/// A rendezvous server with its sockets bound, ready to [`run`](Self::run).
pub struct RendezvousServer {
    shared: Arc<Shared>,
    quic: std::net::UdpSocket,
    stun: Option<std::net::UdpSocket>,
    tcp: Option<std::net::TcpListener>,
}

/// Runs the rendezvous described by `config` until `shutdown` completes:
/// loads (or creates) the private key, binds `listen` and `stun_listen`, and
/// serves. The caller owns the shutdown signal.
pub async fn serve(
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    RendezvousServer::bind(&config)?.run(shutdown).await
}

/// Binds `addr` with `bind`; `[::]` on a host without IPv6 falls back to
/// IPv4 only.
fn bind_socket<T>(
    field: &'static str,
    addr: SocketAddr,
    bind: impl Fn(SocketAddr) -> io::Result<T>,
) -> Result<T, ServeError> {
    match bind(addr) {
        Ok(s) => Ok(s),
        Err(e)
            if addr.is_ipv6()
                && addr.ip().is_unspecified()
                && !matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
                ) =>
        {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            warn!(%addr, fallback = %v4, error = %e, "cannot listen on IPv6; listening on IPv4 only");
            bind(v4).map_err(|source| ServeError::Bind {
                field,
                addr: v4,
                source,
            })
        }
        Err(source) => Err(ServeError::Bind {
            field,
            addr,
            source,
        }),
    }
}

impl RendezvousServer {
    /// Loads (or creates) the private key and binds the QUIC and STUN
    /// sockets of `config`.
    pub fn bind(config: &ServerConfig) -> Result<Self, ServeError> {
        let secret = config.load_private_key()?;
        let quic = bind_socket("listen", config.listen, std::net::UdpSocket::bind)?;
        let stun = bind_socket("stun_listen", config.stun_listen, std::net::UdpSocket::bind)?;
        let tcp = config
            .tcp_listen
            .map(|addr| bind_socket("tcp_listen", addr, std::net::TcpListener::bind))
            .transpose()?;
        let server = Self::with_sockets(secret, &config.sites, quic, Some(stun))
            .with_relay_ports(config.relay_ports);
        Ok(match tcp {
            Some(tcp) => server.with_tcp(tcp),
            None => server,
        })
    }

    /// Also serves sites over TLS on TCP on `listener` (for sites that
    /// can send no UDP). Call before [`Self::run`].
    pub fn with_tcp(mut self, listener: std::net::TcpListener) -> Self {
        self.tcp = Some(listener);
        self
    }

    /// Binds the pairs' UDP relay ports from `ports` (by default any free
    /// port; [`RelayPorts::Off`]: none, pairs relay over QUIC only). Call
    /// before [`Self::run`].
    pub fn with_relay_ports(self, ports: RelayPorts) -> Self {
        self.shared.lock().relay_settings.0 = ports;
        self
    }

    /// Closes a relay port that nothing reached for `idle` (default
    /// 30 s; a site relaying through it binds every 2 s), telling both
    /// sites: pairs that went direct do not keep ports. Call before
    /// [`Self::run`].
    pub fn with_relay_port_idle(self, idle: Duration) -> Self {
        self.shared.lock().relay_settings.1 = idle;
        self
    }

    /// A server on sockets the caller bound (tests bind port 0); `stun`
    /// `None` runs no STUN responder.
    pub fn with_sockets(
        secret: StaticSecret,
        sites: &[SiteEntry],
        quic: std::net::UdpSocket,
        stun: Option<std::net::UdpSocket>,
    ) -> Self {
        let public = PublicKey::from(&secret);
        let relay_ip = quic
            .local_addr()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
        let relay_sides = sites
            .iter()
            .map(|s| (s.public_key.to_bytes(), Arc::default()))
            .collect();
        let registry = Registry::new(
            sites
                .iter()
                .map(|s| (s.public_key.to_bytes(), s.name.clone())),
            rand::random::<u32>() >> 1,
        );
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    registry,
                    conns: HashMap::new(),
                    relay_settings: (RelayPorts::Any, RELAY_PORT_IDLE),
                    relay_tasks: HashMap::new(),
                }),
                secret,
                public,
                decoy: PublicKey::from(&keys::generate()),
                next_conn: AtomicU64::new(1),
                pending: Mutex::new(PendingTable::default()),
                pending_total: AtomicUsize::new(0),
                stun_answered: AtomicU64::new(0),
                abuse: Abuse::default(),
                rejection_log: Mutex::new(LogBudget::default()),
                relay_ip,
                relay_sides,
                relay_strangers: Arc::default(),
            }),
            quic,
            stun,
            tcp: None,
        }
    }

    /// The rendezvous' public key (what sites pin).
    pub fn public_key(&self) -> PublicKey {
        self.shared.public
    }

    /// The QUIC socket's address.
    pub fn quic_addr(&self) -> io::Result<SocketAddr> {
        self.quic.local_addr()
    }

    /// The STUN socket's address, if there is one.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// The TCP listener's address, if there is one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// A handle on the counters, usable while and after the server runs.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` completes, then closes every connection
    /// (waiting up to 2 s for them to close cleanly). Must run inside a
    /// tokio runtime (a current-thread one is enough).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let quic_addr = self.quic.local_addr().map_err(ServeError::Endpoint)?;
        grow_socket_buffers(&self.quic);
        let mut server_config = tls::server_config()?;
        tls::limit_incoming(&mut server_config);
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            self.quic,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(ServeError::Endpoint)?;

        let mut background = JoinSet::new();
        let mut stun_addr = None;
        if let Some(stun) = self.stun {
            stun_addr = stun.local_addr().ok();
            stun.set_nonblocking(true).map_err(ServeError::Endpoint)?;
            let socket = tokio::net::UdpSocket::from_std(stun).map_err(ServeError::Endpoint)?;
            let shared = self.shared.clone();
            background
                .spawn(stun_responder(socket, shared).instrument(tracing::info_span!("stun")));
        }
        let tcp = match self.tcp {
            Some(listener) => {
                listener
                    .set_nonblocking(true)
                    .map_err(ServeError::Endpoint)?;
                let listener =
                    tokio::net::TcpListener::from_std(listener).map_err(ServeError::Endpoint)?;
                let acceptor = tokio_rustls::TlsAcceptor::from(tls::tcp_server_config()?);
                Some((listener, acceptor))
            }
            None => None,
        };
        let tcp_addr = tcp.as_ref().and_then(|(l, _)| l.local_addr().ok());
        let sites = self.shared.lock().registry.sites().count();
        info!(
            public_key = %keys::encode_public(&self.shared.public),
            listen = %quic_addr,
            stun_listen = %stun_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
            tcp_listen = %tcp_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
            sites,
            "rendezvous serving; sites pin its public key"
        );

        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    // The slot is taken here, before the task runs, so that
                    // a burst of attempts cannot overshoot the limits.
                    let Some((incoming, slot)) = admit(incoming, &self.shared) else {
                        continue;
                    };
                    let id = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    connections.spawn(handle_connection(incoming, id, slot));
                }
                (stream, remote, acceptor) = accept_tcp(tcp.as_ref()) => {
                    let Some(slot) = admit_tcp(remote, &self.shared) else {
                        continue;
                    };
                    let id = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    connections.spawn(handle_tcp(stream, acceptor, id, slot, remote));
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        info!("rendezvous shutting down");
        // Sites on TCP are closed one by one (a close record after what is
        // queued), those on QUIC with the endpoint.
        for handle in self.shared.lock().conns.values() {
            handle
                .conn
                .close(CloseCode::Normal, b"rendezvous shutting down");
        }
        endpoint.close(CloseCode::Normal.varint(), b"rendezvous shutting down");
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            endpoint.wait_idle().await;
            while connections.join_next().await.is_some() {}
        })
        .await;
        connections.shutdown().await;
        background.shutdown().await;
        for (_, task) in self.shared.lock().relay_tasks.drain() {
            task.abort();
        }
        Ok(())
    }
}

/// Asks for [`SOCKET_BUFFER`] bytes of receive and send buffer on the QUIC
/// socket; warns when the kernel gives less than half of it.
fn grow_socket_buffers(socket: &std::net::UdpSocket) {
    use quinn::udp::{UdpSockRef, UdpSocketState};
    let Ok(state) = UdpSocketState::new(UdpSockRef::from(socket)) else {
        return;
    };
    let _ = state.set_recv_buffer_size(UdpSockRef::from(socket), SOCKET_BUFFER);
    let _ = state.set_send_buffer_size(UdpSockRef::from(socket), SOCKET_BUFFER);
    // Linux reports twice what was set (its bookkeeping overhead).
    let got = |size: std::io::Result<usize>| size.map_or(0, |b| b / 2);
    let recv = got(state.recv_buffer_size(UdpSockRef::from(socket)));
    let send = got(state.send_buffer_size(UdpSockRef::from(socket)));
    if recv < SOCKET_BUFFER / 2 || send < SOCKET_BUFFER / 2 {
        warn!(
            receive_kib = recv / 1024,
            send_kib = send / 1024,
            "the QUIC socket's buffers are small for many sites (datagrams are lost in bursts); raise net.core.rmem_max and net.core.wmem_max to {} or more",
            SOCKET_BUFFER
        );
    } else {
        debug!(
            receive_kib = recv / 1024,
            send_kib = send / 1024,
            "QUIC socket buffers"
        );
    }
}

/// The address without IPv4-mapped IPv6 form (what a dual-stack socket
/// reports for IPv4 clients).
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

async fn stun_responder(socket: tokio::net::UdpSocket, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 2048];
    let mut out = [0u8; stun::MAX_ENCODED_LEN];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "STUN socket receive error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(datagram) = buf.get(..n) else {
            continue;
        };
        let len = match stun::parse(datagram) {
            Ok(stun::StunMessage::BindingRequest { tx }) => {
                stun::encode_binding_success(&tx, canonical(from), &mut out)
            }
            Err(stun::StunError::UnknownAttribute { tx, .. }) => {
                stun::encode_binding_error(&tx, 420, &mut out)
            }
            // Responses, indications, other methods and non-STUN: ignored.
            _ => continue,
        };
        let Some(reply) = out.get(..len) else {
            continue;
        };
        match socket.send_to(reply, from).await {
            Ok(_) => {
                shared.stun_answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => debug!(%from, error = %e, "STUN reply not sent"),
        }
    }
}

/// A connection's place among those authenticating; given back when dropped.
struct PendingSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl PendingSlot {
    /// The slot the pending table just gave a connection from `ip`.
    fn taken(shared: &Arc<Shared>, ip: IpAddr) -> PendingSlot {
        shared.pending_total.fetch_add(1, Ordering::Relaxed);
        PendingSlot {
            shared: shared.clone(),
            ip,
        }
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.shared.pending().release(self.ip);
        self.shared.pending_total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decides about a connection attempt (see [`PendingTable::admit`]):
/// a slot, or `None` after sending a Retry or a refusal.
fn admit(
    incoming: quinn::Incoming,
    shared: &Arc<Shared>,
) -> Option<(quinn::Incoming, PendingSlot)> {
    let remote = canonical(incoming.remote_address());
    let ip = remote.ip();
    let admission = shared
        .pending()
        .admit(ip, incoming.remote_address_validated());
    match admission {
        Admission::Accept => Some((incoming, PendingSlot::taken(shared, ip))),
        Admission::Validate => {
            bump(&shared.abuse.retried, 1);
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            None
        }
        Admission::Refuse => {
            bump(&shared.abuse.refused, 1);
            debug!(%remote, "too many connections authenticating; refused");
            incoming.refuse();
            None
        }
    }
}

/// The next TCP connection (never, without a listener). Errors (out of
/// file descriptors, a connection reset before it was accepted) are logged
/// and waited out.
async fn accept_tcp(
    tcp: Option<&(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
) -> (tokio::net::TcpStream, SocketAddr, tokio_rustls::TlsAcceptor) {
    let Some((listener, acceptor)) = tcp else {
        return std::future::pending().await;
    };
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => return (stream, canonical(remote), acceptor.clone()),
            Err(e) => {
                debug!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Decides about a TCP connection (its address is validated by the TCP
/// handshake): a slot, or `None` (the stream is dropped, which resets it).
fn admit_tcp(remote: SocketAddr, shared: &Arc<Shared>) -> Option<PendingSlot> {
    let ip = remote.ip();
    match shared.pending().admit(ip, true) {
        Admission::Accept => Some(PendingSlot::taken(shared, ip)),
        Admission::Validate | Admission::Refuse => {
            bump(&shared.abuse.refused, 1);
            debug!(%remote, "too many connections authenticating; TCP connection refused");
            None
        }
    }
}

/// A rejection: the close code and a message for the site.
struct Rejection {
    code: CloseCode,
    message: String,
}

/// A TLS-over-TCP connection of a site, as the server holds it.
type ServerTls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// A site's connection, as its session reads and writes it: QUIC (the
/// control stream and datagrams) or TLS over TCP (records, see
/// [`super::tcp`]).
enum Link {
    Quic {
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    Tcp {
        reader: TcpReader<ServerTls>,
        handle: TcpHandle,
    },
}

/// What arrived on a site's connection.
enum Arrived {
    Frame(SiteMessage),
    Datagram(Bytes),
    /// The site finished its control stream.
    Finished,
    /// The connection is gone (why, for logs).
    Closed(String),
    /// The site sent something that is not a valid frame or record.
    Protocol(String),
}

impl Link {
    fn carrier(&self) -> Carrier {
        match self {
            Link::Quic { conn, .. } => Carrier::Quic(conn.clone()),
            Link::Tcp { handle, .. } => Carrier::Tcp(handle.clone()),
        }
    }

    /// The next message or datagram. Cancel-safe.
    async fn next(&mut self, decoder: &mut FrameDecoder) -> Arrived {
        match self {
            Link::Quic { conn, recv, .. } => tokio::select! {
                read = read_frame::<SiteMessage>(recv, decoder) => match read {
                    Ok(Some(m)) => Arrived::Frame(m),
                    Ok(None) => Arrived::Finished,
                    Err(ReadFailure::Closed(e)) => Arrived::Closed(e),
                    Err(ReadFailure::Protocol(e)) => Arrived::Protocol(e),
                },
                datagram = conn.read_datagram() => match datagram {
                    Ok(d) => Arrived::Datagram(d),
                    Err(e) => Arrived::Closed(e.to_string()),
                },
            },
            Link::Tcp { reader, .. } => loop {
                match decoder.next::<SiteMessage>() {
                    Ok(Some(m)) => return Arrived::Frame(m),
                    Ok(None) => {}
                    Err(e) => return Arrived::Protocol(e.to_string()),
                }
                match reader.next().await {
                    Ok(Some(Record::Control(bytes))) => decoder.push(&bytes),
                    Ok(Some(Record::Datagram(d))) => return Arrived::Datagram(d),
                    Ok(Some(Record::Close(_, reason))) => {
                        return Arrived::Closed(format!("closed by the site: {reason}"));
                    }
                    Ok(None) => return Arrived::Closed("the site closed the connection".into()),
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        return Arrived::Protocol(e.to_string());
                    }
                    Err(e) => return Arrived::Closed(e.to_string()),
                }
            },
        }
    }

    async fn write_frame<T: serde::Serialize>(&mut self, message: &T) -> Result<(), String> {
        match self {
            Link::Quic { send, .. } => write_frame(send, message).await,
            Link::Tcp { handle, .. } => handle.write_control(&encode_frame(message)).await,
        }
    }

    /// Sends `Reject` if `tell` (and gives the site a moment to read it),
    /// then closes with the matching code.
    async fn reject(&mut self, tell: bool, r: Rejection) {
        if tell {
            let frame = RendezvousMessage::Reject {
                code: r.code.as_u32(),
                message: r.message.clone(),
            };
            let sent = self.write_frame(&frame).await.is_ok();
            if let Link::Quic { conn, send, .. } = self
                && sent
            {
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
            }
        }
        // Over TCP the close record follows what is queued.
        self.carrier().close(r.code, r.message.as_bytes());
    }
}

struct Authenticated {
    decoder: FrameDecoder,
    site_key: PublicKey,
    site_name: String,
    auth_key: AuthKey,
}

async fn handle_connection(incoming: quinn::Incoming, id: ConnId, slot: PendingSlot) {
    let shared = slot.shared.clone();
    let remote = canonical(incoming.remote_address());
    let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, error = %e, "QUIC handshake failed");
            return;
        }
    };
    let conn = match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            bump(&shared.abuse.auth_timeouts, 1);
            debug!(%remote, "QUIC handshake did not finish in time");
            return;
        }
    };
    // Datagrams before the control stream are read and dropped, so that
    // they do not fill the connection's buffer.
    let streams = tokio::select! {
        streams = tokio::time::timeout_at(deadline, conn.accept_bi()) => streams,
        () = drain_datagrams(&conn, &shared) => return,
    };
    let (send, recv) = match streams {
        Ok(Ok(streams)) => streams,
        Ok(Err(_)) => return,
        Err(_) => {
            // Counted and closed as a missing hello, as before the control
            // stream and the hello had deadlines of their own.
            let r = auth_timed_out(&shared);
            bump(&shared.abuse.auth_failures, 1);
            conn.close(r.code.varint(), r.message.as_bytes());
            return;
        }
    };
    let exporter = tls::quic_exporter(&conn);
    let link = Link::Quic { conn, send, recv };
    serve_site(link, exporter, id, slot, remote, deadline).await;
}

/// A site's TLS-over-TCP connection: the TLS handshake, then the same
/// authentication and session as over QUIC.
async fn handle_tcp(
    stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    id: ConnId,
    slot: PendingSlot,
    remote: SocketAddr,
) {
    let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
    let _ = stream.set_nodelay(true);
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            bump(&slot.shared.abuse.auth_timeouts, 1);
            debug!(%remote, "TLS handshake did not finish in time");
            return;
        }
    };
    let exporter = tls::tcp_exporter(tls.get_ref().1);
    let (reader, handle) = tcp::start(tls);
    let link = Link::Tcp { reader, handle };
    serve_site(link, exporter, id, slot, remote, deadline).await;
}

/// Authenticates a site on `link` (by `deadline`) and runs its session.
async fn serve_site(
    mut link: Link,
    exporter: Option<auth::Exporter>,
    id: ConnId,
    slot: PendingSlot,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
) {
    let shared = slot.shared.clone();
    let Some(exporter) = exporter else {
        let r = Rejection {
            code: CloseCode::Protocol,
            message: "no TLS exporter".into(),
        };
        link.reject(false, r).await;
        return;
    };
    let result = match tokio::time::timeout_at(
        deadline,
        authenticate(&mut link, &shared, &exporter, remote),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(Some(auth_timed_out(&shared))),
    };
    drop(slot);
    let authed = match result {
        Ok(authed) => authed,
        Err(Some(rejection)) => {
            bump(&shared.abuse.auth_failures, 1);
            link.reject(false, rejection).await;
            return;
        }
        Err(None) => return, // the connection went away, or was rejected
    };
    let span = tracing::info_span!("site", name = %authed.site_name);
    run_session(link, id, authed, &exporter, shared, remote)
        .instrument(span)
        .await;
}

/// A connection did not authenticate within [`AUTH_TIMEOUT`]: counted,
/// and the rejection it gets.
fn auth_timed_out(shared: &Shared) -> Rejection {
    bump(&shared.abuse.auth_timeouts, 1);
    Rejection {
        code: CloseCode::Timeout,
        message: format!("no valid hello within {} s", AUTH_TIMEOUT.as_secs()),
    }
}

/// Reads and drops datagrams until the connection is gone.
async fn drain_datagrams(conn: &quinn::Connection, shared: &Shared) {
    while conn.read_datagram().await.is_ok() {
        bump(&shared.abuse.unauthenticated_datagrams, 1);
    }
}

/// Runs the authentication exchange. `Err(None)`: the connection is gone
/// (nothing to tell the site).
async fn authenticate(
    link: &mut Link,
    shared: &Shared,
    exporter: &auth::Exporter,
    remote: SocketAddr,
) -> Result<Authenticated, Option<Rejection>> {
    let mut decoder = FrameDecoder::with_limit(MAX_HELLO_LEN);
    let hello = loop {
        match link.next(&mut decoder).await {
            Arrived::Frame(m) => break m,
            // Datagrams before authentication are dropped unread.
            Arrived::Datagram(_) => bump(&shared.abuse.unauthenticated_datagrams, 1),
            Arrived::Finished | Arrived::Closed(_) => return Err(None),
            Arrived::Protocol(message) => {
                return Err(Some(Rejection {
                    code: CloseCode::Protocol,
                    message,
                }));
            }
        }
    };
    match check_hello(shared, hello, exporter, remote) {
        Ok((site_key, site_name, auth_key)) => Ok(Authenticated {
            decoder,
            site_key,
            site_name,
            auth_key,
        }),
        Err(rejection) => {
            bump(&shared.abuse.auth_failures, 1);
            link.reject(true, rejection).await;
            Err(None)
        }
    }
}

/// Checks a site's `Hello`, logging one clear line for each rejection.
fn check_hello(
    shared: &Shared,
    hello: SiteMessage,
    exporter: &auth::Exporter,
    remote: SocketAddr,
) -> Result<(PublicKey, String, AuthKey), Rejection> {
    let SiteMessage::Hello {
        version,
        site_key,
        rendezvous_key,
        proof,
    } = hello
    else {
        return Err(Rejection {
            code: CloseCode::Protocol,
            message: "expected hello".into(),
        });
    };
    let own = keys::encode_public(&shared.public);
    if version != PROTOCOL_VERSION {
        if shared.may_log_rejection() {
            warn!(%remote, version, "rejected a site: unsupported protocol version {version} (this rendezvous speaks {PROTOCOL_VERSION}); run the same Causeway version on both");
        }
        return Err(Rejection {
            code: CloseCode::Version,
            message: format!(
                "unsupported protocol version {version}; this rendezvous speaks {PROTOCOL_VERSION}"
            ),
        });
    }
    let site_text = keys::encode_bytes(&site_key.0);
    if rendezvous_key.0 != shared.public.to_bytes() {
        let pinned = keys::encode_bytes(&rendezvous_key.0);
        if shared.may_log_rejection() {
            warn!(%remote, site_key = %site_text, %pinned, "rejected a site: wrong rendezvous key; the site pinned {pinned} but this rendezvous' public key is {own}");
        }
        return Err(Rejection {
            code: CloseCode::WrongRendezvousKey,
            message: format!("the site pinned {pinned}, but this rendezvous' public key is {own}"),
        });
    }
    let name = shared
        .lock()
        .registry
        .site_name(&site_key.0)
        .map(str::to_owned);
    // An unknown key is refused exactly like a bad proof (same work, same
    // code and message), so that the answer does not tell which keys this
    // rendezvous serves. Only the local log says which it was.
    let site = PublicKey::from(site_key.0);
    let checked = if name.is_some() { site } else { shared.decoy };
    let key = AuthKey::derive(&shared.secret, &checked);
    let valid = key
        .as_ref()
        .is_some_and(|k| k.verify(Role::Site, exporter, &checked, &shared.public, &proof.0));
    let refusal = Rejection {
        code: CloseCode::UnknownSiteKey,
        message: "unknown site key or bad proof".into(),
    };
    match (name, key) {
        (Some(name), Some(key)) if valid => Ok((site, name, key)),
        (None, _) => {
            if shared.may_log_rejection() {
                warn!(%remote, site_key = %site_text, "rejected a site: unknown site key {site_text}; add it as a [[site]] in the rendezvous config if it should connect");
            }
            Err(refusal)
        }
        (Some(name), _) => {
            if shared.may_log_rejection() {
                warn!(%remote, site = %name, site_key = %site_text, "rejected a site: bad proof; it does not hold the private key of {site_text}, or its proof was made for another session (a man in the middle)");
            }
            Err(refusal)
        }
    }
}

async fn run_session(
    mut link: Link,
    id: ConnId,
    authed: Authenticated,
    exporter: &auth::Exporter,
    shared: Arc<Shared>,
    remote: SocketAddr,
) {
    let Authenticated {
        mut decoder,
        site_key,
        site_name: _,
        auth_key,
    } = authed;
    // Authenticated: frames and flow control up to a registered site's size.
    decoder.set_limit(MAX_FRAME_LEN);
    if let Link::Quic { conn, .. } = &link {
        conn.set_receive_window(quinn::VarInt::from_u32(SITE_RECEIVE_WINDOW));
    }
    let carrier = link.carrier();
    let outbox = Arc::new(Outbox::default());
    let relay_id = {
        let mut state = shared.lock();
        let (relay_id, replaced, updates) = state.registry.connect(id, site_key.to_bytes());
        if let Some(old) = replaced.and_then(|old| state.conns.remove(&old)) {
            old.conn.close(
                CloseCode::Replaced,
                b"replaced by a newer connection of the same site",
            );
        }
        state.conns.insert(
            id,
            ConnHandle {
                conn: carrier.clone(),
                outbox: outbox.clone(),
            },
        );
        state.dispatch(updates, &shared.abuse);
        relay_id
    };
    let mut registrations = Coalescer::new(Instant::now(), REGISTER_BURST, REGISTER_INTERVAL);
    let welcome = RendezvousMessage::Welcome {
        proof: Wire32(auth_key.proof(Role::Rendezvous, exporter, &site_key, &shared.public)),
        relay_id,
        observed: remote,
    };
    let transport = carrier.transport();
    info!(%remote, relay_id, transport, site_key = %keys::encode_public(&site_key), "site connected");

    let outcome: Result<(), (CloseCode, String)> = async {
        link.write_frame(&welcome)
            .await
            .map_err(|e| (CloseCode::Normal, e))?;
        loop {
            let wake = registrations.wake_at().map(tokio::time::Instant::from_std);
            tokio::select! {
                arrived = link.next(&mut decoder) => match arrived {
                    Arrived::Frame(SiteMessage::Register { peers, candidates }) => {
                        // Applied now, or coalesced into the latest one and
                        // applied when the site's rate allows.
                        if registrations.waiting() {
                            bump(&shared.abuse.registrations_coalesced, 1);
                        }
                        if let Some(r) = registrations.offer(Instant::now(), (peers, candidates)) {
                            apply_registration(&shared, id, r);
                        }
                    }
                    Arrived::Frame(SiteMessage::RelayRequest { peer }) => {
                        grant_relay_port(&shared, id, &peer.0);
                    }
                    Arrived::Frame(SiteMessage::Hello { .. }) => {
                        return Err((CloseCode::Protocol, "hello after authentication".into()));
                    }
                    Arrived::Datagram(d) => forward(&shared, id, d),
                    Arrived::Finished => return Ok(()),
                    Arrived::Closed(e) => return Err((CloseCode::Normal, e)),
                    Arrived::Protocol(e) => return Err((CloseCode::Protocol, e)),
                },
                () = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(r) = registrations.poll(Instant::now()) {
                        apply_registration(&shared, id, r);
                    }
                }
                () = outbox.ready.notified() => {
                    loop {
                        let next = outbox.lock().pop();
                        let Some(u) = next else { break };
                        let message = RendezvousMessage::PeerUpdate {
                            peer: Wire32(u.peer),
                            relay_id: u.relay_id,
                            candidates: u.candidates,
                            online: u.online,
                            relay_port: u.relay.map(|g| g.port),
                            relay_token: u.relay.map(|g| Wire32(g.token)),
                        };
                        link.write_frame(&message)
                            .await
                            .map_err(|e| (CloseCode::Normal, e))?;
                    }
                }
            }
        }
    }
    .await;
    let mut reason = match &outcome {
        Ok(()) => {
            carrier.close(CloseCode::Normal, b"control stream closed");
            "control stream closed".to_owned()
        }
        Err((code, reason)) => {
            if *code != CloseCode::Normal {
                warn!(%remote, %code, reason, "closing the site's connection");
            }
            carrier.close(*code, reason.as_bytes());
            reason.clone()
        }
    };
    if let Link::Quic { conn, .. } = &link {
        reason = conn
            .close_reason()
            .map(|e| e.to_string())
            .unwrap_or_default();
    }
    let mut state = shared.lock();
    let updates = state.registry.disconnect(id);
    state.dispatch(updates, &shared.abuse);
    state.close_freed_ports();
    state.conns.remove(&id);
    drop(state);
    info!(%remote, %reason, transport, "site disconnected");
}

/// Applies a site's registration, bounded: only configured sites count as
/// peers (each once), and at most [`MAX_CANDIDATES`] candidates are kept.
fn apply_registration(
    shared: &Shared,
    id: ConnId,
    (peers, mut candidates): (Vec<Wire32>, Vec<std::net::SocketAddr>),
) {
    let mut state = shared.lock();
    let (peers, mut dropped) = configured_peers(peers.into_iter().map(|k| k.0), |k| {
        state.registry.site_name(k).is_some()
    });
    dropped += candidates.len().saturating_sub(MAX_CANDIDATES);
    candidates.truncate(MAX_CANDIDATES);
    bump(&shared.abuse.registration_entries_dropped, dropped as u64);
    debug!(peers = peers.len(), candidates = ?candidates, dropped, "register");
    let updates = state.registry.register(id, peers, candidates);
    state.dispatch(updates, &shared.abuse);
    state.close_freed_ports();
}

/// Site `id` asks for a relay port to `peer`: tells it the pair's port
/// again, or binds one (outside the lock) and tells both sites. Refused
/// silently unless the two are mutual peers.
fn grant_relay_port(shared: &Arc<Shared>, id: ConnId, peer: &SiteKey) {
    let (pair, range, idle): (PairKey, _, _) = {
        let mut state = shared.lock();
        let (range, idle) = state.relay_settings;
        match state.registry.request_relay_port(id, peer) {
            RelayRequest::NotAuthorized => {
                debug!("relay port refused: not a mutual peer");
                return;
            }
            RelayRequest::Existing(updates) => {
                state.dispatch(updates, &shared.abuse);
                return;
            }
            RelayRequest::New(_) if range == RelayPorts::Off => {
                debug!("relay port refused: relay_ports = \"off\"");
                return;
            }
            RelayRequest::New(pair) => (pair, range, idle),
        }
    };
    let bound = match range {
        RelayPorts::Off => return,
        RelayPorts::Any => RelayPort::bind(shared.relay_ip, 0),
        RelayPorts::Range(low, high) => {
            // From a random place in the range, the first free port.
            let span = u32::from(high - low) + 1;
            let start = rand::random::<u32>() % span;
            (0..span)
                .map(|i| low + ((start + i) % span) as u16)
                .map(|port| RelayPort::bind(shared.relay_ip, port))
                .find(|r| !matches!(r, Err(e) if e.kind() == io::ErrorKind::AddrInUse))
                .unwrap_or_else(|| Err(io::ErrorKind::AddrInUse.into()))
        }
    }
    .and_then(|p| Ok((p.port()?, p)));
    let (number, port) = match bound {
        Ok(bound) => bound,
        Err(e) => {
            warn!(error = %e, "cannot bind a relay port; the pair stays on the QUIC relay");
            return;
        }
    };
    let tokens = [
        RelayToken::random(&mut rand::thread_rng()),
        RelayToken::random(&mut rand::thread_rng()),
    ];
    let sides = [&pair.0, &pair.1].map(|k| shared.relay_sides.get(k).cloned().unwrap_or_default());
    let strangers = shared.relay_strangers.clone();
    let owner = shared.clone();
    let task = tokio::spawn(
        async move {
            port.run(RelayPair::new(tokens), sides, strangers, idle)
                .await;
            // Closed by itself (unused): forget it and tell both sites,
            // while the port is still bound (so that its number is not
            // handed out again before it is forgotten).
            let mut state = owner.lock();
            state.relay_tasks.remove(&number);
            let updates = state.registry.release_relay_port(pair, number);
            state.dispatch(updates, &owner.abuse);
            drop(state);
            drop(port);
        }
        .instrument(tracing::info_span!("relay_port", port = number)),
    );
    let mut state = shared.lock();
    state.relay_tasks.insert(number, task.abort_handle());
    let updates = state
        .registry
        .grant_relay_port(pair, number, tokens.map(|t| t.0));
    if !updates.is_empty() {
        debug!(port = number, "relay port granted");
    }
    state.dispatch(updates, &shared.abuse);
    state.close_freed_ports();
}

/// Forwards one relay datagram from connection `from`, if its destination
/// is a connected mutual peer.
fn forward(shared: &Shared, from: ConnId, datagram: Bytes) {
    let Ok((header, payload)) = relay::parse(&datagram) else {
        shared.lock().registry.count_malformed(from);
        return;
    };
    let route = {
        let mut state = shared.lock();
        match state
            .registry
            .route(from, header.relay_id, payload.len(), header.offset == 0)
        {
            Ok((to, src_id)) => state.conns.get(&to).map(|h| (h.conn.clone(), src_id)),
            Err(e) => {
                if e == RouteError::NotAuthorized {
                    debug!(dst = header.relay_id, "relay refused: not a mutual peer");
                }
                None
            }
        }
    };
    let Some((to, src_id)) = route else { return };
    let Some(max) = to.max_datagram_size() else {
        return;
    };
    match relay::readdress(header, payload, src_id, max) {
        Ok(datagrams) => {
            for d in datagrams {
                if to.send_datagram(d).is_err() {
                    break;
                }
            }
        }
        Err(e) => debug!(error = %e, "relay datagram not forwarded"),
    }
}
