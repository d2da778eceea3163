#![allow(clippy::unwrap_used)] // tests may panic
//! The rendezvous over loopback: a real server and real clients on one
//! current-thread tokio runtime, ports bound to 0.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use causeway_nat::rendezvous::{
    ConnectError, RelayError, RelayPorts, RendezvousClient, RendezvousEvent, RendezvousServer,
    ServerStats, SiteEntry,
};
use causeway_nat::stun;
use causeway_nat::udp_relay::RelayPort;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use x25519_dalek::{PublicKey, StaticSecret};

const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(400);

fn keypair() -> (StaticSecret, PublicKey) {
    let secret = causeway_common::keys::generate();
    let public = PublicKey::from(&secret);
    (secret, public)
}

struct Site {
    name: &'static str,
    secret: StaticSecret,
    public: PublicKey,
}

fn site(name: &'static str) -> Site {
    let (secret, public) = keypair();
    Site {
        name,
        secret,
        public,
    }
}

struct Server {
    addr: SocketAddr,
    /// The TLS-over-TCP listener, if the server has one.
    tcp: Option<SocketAddr>,
    stun: SocketAddr,
    public: PublicKey,
    stats: ServerStats,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(WAIT, self.task).await.unwrap().unwrap();
    }
}

fn start_server_on(secret: StaticSecret, sites: &[&Site], quic: UdpSocket) -> Server {
    start_server_with(
        secret,
        sites,
        quic,
        RelayPorts::Any,
        Duration::from_secs(30),
    )
}

/// A server that also listens on TCP (TLS) on loopback.
fn start_server_with_tcp(sites: &[&Site]) -> Server {
    let quic = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stun_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let server =
        RendezvousServer::with_sockets(keypair().0, &entries(sites), quic, Some(stun_socket))
            .with_tcp(tcp);
    run_server(server)
}

fn entries(sites: &[&Site]) -> Vec<SiteEntry> {
    sites
        .iter()
        .map(|s| SiteEntry {
            name: s.name.into(),
            public_key: s.public,
        })
        .collect()
}

fn start_server_with(
    secret: StaticSecret,
    sites: &[&Site],
    quic: UdpSocket,
    relay_ports: RelayPorts,
    relay_idle: Duration,
) -> Server {
    let stun_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = RendezvousServer::with_sockets(secret, &entries(sites), quic, Some(stun_socket))
        .with_relay_ports(relay_ports)
        .with_relay_port_idle(relay_idle);
    run_server(server)
}

fn run_server(server: RendezvousServer) -> Server {
    let addr = server.quic_addr().unwrap();
    let tcp = server.tcp_addr();
    let stun = server.stun_addr().unwrap();
    let public = server.public_key();
    let stats = server.stats();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Server {
        addr,
        tcp,
        stun,
        public,
        stats,
        stop: Some(tx),
        task,
    }
}

fn start_server(sites: &[&Site]) -> (Server, StaticSecret) {
    let (secret, _) = keypair();
    let quic = UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = start_server_on(secret.clone(), sites, quic);
    (server, secret)
}

async fn connect(
    server: &Server,
    s: &Site,
    peers: &[&Site],
) -> Result<RendezvousClient, ConnectError> {
    RendezvousClient::connect(
        server.addr,
        server.public,
        s.secret.clone(),
        peers.iter().map(|p| p.public).collect(),
    )
    .await
}

async fn next(client: &mut RendezvousClient) -> RendezvousEvent {
    timeout(WAIT, client.next_event())
        .await
        .expect("an event in time")
        .expect("the client is alive")
}

/// The next event that is not `Connected`.
async fn next_update(client: &mut RendezvousClient) -> RendezvousEvent {
    loop {
        match next(client).await {
            RendezvousEvent::Connected { .. } => continue,
            e => return e,
        }
    }
}

/// The next `PeerUpdate` (skipping connection events, e.g. failed
/// reconnection attempts).
async fn next_peer_update(client: &mut RendezvousClient) -> RendezvousEvent {
    loop {
        match next(client).await {
            RendezvousEvent::Connected { .. } | RendezvousEvent::Disconnected { .. } => continue,
            e => return e,
        }
    }
}

async fn assert_quiet(client: &mut RendezvousClient) {
    let event = timeout(QUIET, client.next_event()).await;
    assert!(event.is_err(), "unexpected event: {event:?}");
}

async fn expect_online(client: &mut RendezvousClient, peer: &Site, candidates: &[SocketAddr]) {
    match next_peer_update(client).await {
        RendezvousEvent::PeerUpdate {
            peer: p,
            candidates: c,
            online: true,
        } => {
            assert_eq!(p, peer.public, "update about {}", peer.name);
            assert_eq!(c, candidates);
        }
        e => panic!("expected {} online, got {e:?}", peer.name),
    }
}

#[tokio::test]
async fn site_authenticates_and_learns_its_observed_address() {
    let a = site("a");
    let (server, _) = start_server(&[&a]);
    let mut client = connect(&server, &a, &[]).await.unwrap();
    match next(&mut client).await {
        RendezvousEvent::Connected { observed } => {
            assert_eq!(
                observed.ip(),
                "127.0.0.1".parse::<std::net::IpAddr>().unwrap()
            );
            assert_ne!(observed.port(), 0);
            assert_ne!(observed, server.addr);
        }
        e => panic!("{e:?}"),
    }
    let handle = client.handle();
    assert!(handle.is_connected());
    let stats = server.stats.site("a").unwrap();
    assert!(stats.connected);
    assert_eq!(stats.public_key, a.public);
    client.close().await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_site_is_rejected() {
    let a = site("a");
    let stranger = site("stranger");
    let (server, _) = start_server(&[&a]);
    let err = connect(&server, &stranger, &[&a])
        .await
        .err()
        .expect("rejected");
    assert!(
        matches!(err, ConnectError::UnknownSiteKey { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("unknown site key"), "{text}");
    assert!(
        text.contains(&causeway_common::keys::encode_public(&stranger.public)),
        "names the key: {text}"
    );
    assert!(!server.stats.site("a").unwrap().connected);
    server.stop().await;
}

#[tokio::test]
async fn wrong_pinned_rendezvous_key_is_rejected() {
    let a = site("a");
    let (server, _) = start_server(&[&a]);
    let (_, wrong) = keypair();
    let err = RendezvousClient::connect(server.addr, wrong, a.secret.clone(), vec![])
        .await
        .err()
        .expect("rejected");
    assert!(
        matches!(err, ConnectError::WrongRendezvousKey { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("wrong rendezvous key"), "{err}");
    assert!(!server.stats.site("a").unwrap().connected);
    server.stop().await;
}

/// Sites a and b listing each other, c listing a but not listed by it,
/// all connected; a and b have seen each other online, c has seen its
/// connection.
async fn a_and_b_mutual_c_one_sided() -> (Server, [Site; 3], [RendezvousClient; 3]) {
    let (a, b, c) = (site("a"), site("b"), site("c"));
    let (server, _) = start_server(&[&a, &b, &c]);
    let mut ca = connect(&server, &a, &[&b]).await.unwrap();
    let mut cb = connect(&server, &b, &[&a]).await.unwrap();
    let mut cc = connect(&server, &c, &[&a]).await.unwrap();
    expect_online(&mut ca, &b, &[]).await;
    expect_online(&mut cb, &a, &[]).await;
    assert!(matches!(
        next(&mut cc).await,
        RendezvousEvent::Connected { .. }
    ));
    (server, [a, b, c], [ca, cb, cc])
}

#[tokio::test]
async fn introductions_only_between_sites_that_list_each_other() {
    let (server, [a, b, c], [mut ca, mut cb, mut cc]) = a_and_b_mutual_c_one_sided().await;
    assert_quiet(&mut cc).await;
    assert_quiet(&mut ca).await;

    // Candidates flow to mutual peers only.
    let cands: Vec<SocketAddr> = vec![
        "192.0.2.10:51820".parse().unwrap(),
        "[2001:db8::1]:51820".parse().unwrap(),
    ];
    ca.update_candidates(cands.clone());
    expect_online(&mut cb, &a, &cands).await;
    assert_quiet(&mut cc).await;
    cc.update_candidates(vec!["198.51.100.1:1".parse().unwrap()]);
    assert_quiet(&mut ca).await;

    // C cannot relay to A: it never learned A's relay id.
    assert_eq!(
        cc.send_relay(&a.public, &[1, 2, 3]),
        Err(RelayError::PeerUnavailable)
    );

    // B leaves: A hears it; C hears nothing.
    cb.close().await;
    match next_update(&mut ca).await {
        RendezvousEvent::PeerUpdate {
            peer,
            online: false,
            candidates,
        } => {
            assert_eq!(peer, b.public);
            assert!(candidates.is_empty());
        }
        e => panic!("{e:?}"),
    }
    // A drops C from nothing, adds C: now mutual, both learn.
    ca.update_peers(vec![b.public, c.public]);
    expect_online(&mut cc, &a, &cands).await;
    match next_update(&mut ca).await {
        RendezvousEvent::PeerUpdate {
            peer,
            online: true,
            candidates,
        } => {
            assert_eq!(peer, c.public);
            assert_eq!(
                candidates,
                vec!["198.51.100.1:1".parse::<SocketAddr>().unwrap()]
            );
        }
        e => panic!("{e:?}"),
    }
    ca.close().await;
    cc.close().await;
    server.stop().await;
}

fn packet(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends until the packet arrives (datagrams may be lost, even on loopback
/// under load); returns how many sends it took.
async fn relay_once(
    from: &RendezvousClient,
    to: &mut RendezvousClient,
    from_key: &PublicKey,
    to_key: &PublicKey,
    pkt: &[u8],
) -> usize {
    for attempt in 1..=5 {
        from.send_relay(to_key, pkt).unwrap();
        let got = timeout(Duration::from_millis(1000), async {
            loop {
                match to.next_event().await {
                    Some(RendezvousEvent::Relayed { from, packet }) => return (from, packet),
                    Some(_) => continue,
                    None => panic!("client gone"),
                }
            }
        })
        .await;
        if let Ok((from, packet)) = got {
            assert_eq!(&from, from_key);
            assert_eq!(packet, pkt, "byte-exact");
            return attempt;
        }
    }
    panic!("packet of {} bytes never relayed", pkt.len());
}

#[tokio::test]
async fn relay_carries_full_size_and_small_packets_both_ways() {
    let a = site("a");
    let b = site("b");
    let (server, _) = start_server(&[&a, &b]);
    let mut ca = connect(&server, &a, &[&b]).await.unwrap();
    let mut cb = connect(&server, &b, &[&a]).await.unwrap();
    expect_online(&mut ca, &b, &[]).await;
    expect_online(&mut cb, &a, &[]).await;

    // 1452 bytes: a full-size WireGuard packet of a 1420-MTU tunnel, larger
    // than one QUIC datagram.
    let mut sends = 0;
    for (len, seed) in [(1452, 1), (60, 2), (1452, 3), (1, 4), (9000, 5)] {
        sends += relay_once(&ca, &mut cb, &a.public, &b.public, &packet(len, seed)).await;
        sends += relay_once(&cb, &mut ca, &b.public, &a.public, &packet(len, seed + 100)).await;
    }
    let sa = server.stats.site("a").unwrap();
    let sb = server.stats.site("b").unwrap();
    // Every send reached the rendezvous as one packet.
    assert_eq!(sa.relay_rx_packets + sb.relay_rx_packets, sends as u64);
    assert!(sa.relay_rx_bytes >= 1452 * 2 + 60 + 1 + 9000);
    assert_eq!(sa.relay_dropped, 0);
    let stats = ca.handle().stats();
    assert!(stats.relay_rx_packets >= 5);
    assert_eq!(stats.relay_malformed, 0);
    // The 1452- and 9000-byte packets were fragmented: more datagrams than
    // packets.
    assert!(
        stats.relay_tx_datagrams >= stats.relay_tx_packets + 1 + 1 + 6,
        "{stats:?}"
    );

    // Too large for the relay.
    assert!(matches!(
        ca.send_relay(&b.public, &vec![0; 70_000]),
        Err(RelayError::Fragment(_))
    ));
    ca.close().await;
    cb.close().await;
    server.stop().await;
}

#[tokio::test]
async fn clients_reconnect_and_reregister_after_a_rendezvous_restart() {
    let a = site("a");
    let b = site("b");
    let (server, secret) = start_server(&[&a, &b]);
    let addr = server.addr;
    let mut ca = connect(&server, &a, &[&b]).await.unwrap();
    let mut cb = connect(&server, &b, &[&a]).await.unwrap();
    expect_online(&mut ca, &b, &[]).await;
    expect_online(&mut cb, &a, &[]).await;
    let cands: Vec<SocketAddr> = vec!["192.0.2.7:51820".parse().unwrap()];
    ca.update_candidates(cands.clone());
    expect_online(&mut cb, &a, &cands).await;

    server.stop().await;
    for (client, peer) in [(&mut ca, &b), (&mut cb, &a)] {
        match next_update(client).await {
            RendezvousEvent::PeerUpdate {
                peer: p,
                online: false,
                ..
            } => assert_eq!(p, peer.public),
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            next(client).await,
            RendezvousEvent::Disconnected { .. }
        ));
        assert!(!client.handle().is_connected());
    }
    assert_eq!(
        ca.send_relay(&b.public, &[1]),
        Err(RelayError::NotConnected)
    );

    // The same rendezvous comes back on the same port.
    let quic = loop {
        match UdpSocket::bind(addr) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let server = start_server_on(secret, &[&a, &b], quic);
    // Both reconnect (backoff from 250 ms) and re-register, with the
    // candidates A had.
    expect_online(&mut ca, &b, &[]).await;
    expect_online(&mut cb, &a, &cands).await;
    relay_once(&ca, &mut cb, &a.public, &b.public, &packet(1452, 9)).await;
    relay_once(&cb, &mut ca, &b.public, &a.public, &packet(60, 9)).await;
    assert_eq!(ca.handle().stats().connections, 2);
    ca.close().await;
    cb.close().await;
    server.stop().await;
}

/// Decodes XOR-MAPPED-ADDRESS by hand (independently of the stun module).
fn xor_mapped(response: &[u8], tx: &[u8; 12]) -> SocketAddr {
    assert_eq!(&response[0..2], &[0x01, 0x01], "Binding success");
    assert_eq!(&response[4..8], &[0x21, 0x12, 0xA4, 0x42]);
    assert_eq!(&response[8..20], tx);
    let mut at = 20;
    while at + 4 <= response.len() {
        let kind = u16::from_be_bytes([response[at], response[at + 1]]);
        let len = usize::from(u16::from_be_bytes([response[at + 2], response[at + 3]]));
        let value = &response[at + 4..at + 4 + len];
        if kind == 0x0020 {
            let port = u16::from_be_bytes([value[2], value[3]]) ^ 0x2112;
            return match value[1] {
                1 => {
                    let ip =
                        u32::from_be_bytes([value[4], value[5], value[6], value[7]]) ^ 0x2112_A442;
                    SocketAddr::from((std::net::Ipv4Addr::from(ip), port))
                }
                2 => {
                    let mut mask = [0u8; 16];
                    mask[..4].copy_from_slice(&0x2112_A442u32.to_be_bytes());
                    mask[4..].copy_from_slice(tx);
                    let mut ip = [0u8; 16];
                    for i in 0..16 {
                        ip[i] = value[4 + i] ^ mask[i];
                    }
                    SocketAddr::from((std::net::Ipv6Addr::from(ip), port))
                }
                f => panic!("family {f}"),
            };
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    panic!("no XOR-MAPPED-ADDRESS");
}

#[tokio::test]
async fn stun_responder_answers_with_the_mapped_address() {
    let a = site("a");
    let (server, _) = start_server(&[&a]);
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = client.local_addr().unwrap();
    let tx = stun::TransactionId([7; 12]);
    let mut req = [0u8; stun::BINDING_REQUEST_LEN];
    let n = stun::encode_binding_request(&tx, &mut req);
    // Garbage first: ignored, no answer, no crash.
    client.send_to(b"hello", server.stun).await.unwrap();
    client.send_to(&req[..n], server.stun).await.unwrap();
    let mut buf = [0u8; 1500];
    let (len, from) = timeout(WAIT, client.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from, server.stun);
    assert_eq!(xor_mapped(&buf[..len], &tx.0), local);
    match stun::parse(&buf[..len]).unwrap() {
        stun::StunMessage::BindingSuccess { tx: t, mapped } => {
            assert_eq!(t, tx);
            assert_eq!(mapped, local);
        }
        m => panic!("{m:?}"),
    }
    assert_eq!(server.stats.stun_answered(), 1);
    server.stop().await;
}

#[tokio::test]
async fn stun_responder_on_ipv6_loopback() {
    let Ok(stun_socket) = UdpSocket::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let a = site("a");
    let (secret, _) = keypair();
    let quic = UdpSocket::bind("[::1]:0").unwrap();
    let entries = [SiteEntry {
        name: "a".into(),
        public_key: a.public,
    }];
    let server = RendezvousServer::with_sockets(secret, &entries, quic, Some(stun_socket));
    let stun_addr = server.stun_addr().unwrap();
    let quic_addr = server.quic_addr().unwrap();
    let pinned = server.public_key();
    let (tx_stop, rx_stop) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx_stop.await;
    }));
    let client = tokio::net::UdpSocket::bind("[::1]:0").await.unwrap();
    let tx = stun::TransactionId([9; 12]);
    let mut req = [0u8; stun::BINDING_REQUEST_LEN];
    let n = stun::encode_binding_request(&tx, &mut req);
    client.send_to(&req[..n], stun_addr).await.unwrap();
    let mut buf = [0u8; 1500];
    let (len, _) = timeout(WAIT, client.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(xor_mapped(&buf[..len], &tx.0), client.local_addr().unwrap());
    // And a site over IPv6.
    let mut c = RendezvousClient::connect(quic_addr, pinned, a.secret.clone(), vec![])
        .await
        .unwrap();
    match next(&mut c).await {
        RendezvousEvent::Connected { observed } => {
            assert!(observed.ip().is_loopback() && observed.is_ipv6())
        }
        e => panic!("{e:?}"),
    }
    c.close().await;
    let _ = tx_stop.send(());
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();
}

#[test]
fn client_runs_on_a_current_thread_runtime() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let a = site("a");
        let b = site("b");
        let (server, _) = start_server(&[&a, &b]);
        let mut ca = connect(&server, &a, &[&b]).await.unwrap();
        let mut cb = connect(&server, &b, &[&a]).await.unwrap();
        expect_online(&mut ca, &b, &[]).await;
        expect_online(&mut cb, &a, &[]).await;
        relay_once(&ca, &mut cb, &a.public, &b.public, &packet(1452, 1)).await;
        drop(ca);
        // Dropping a client closes its connection: B hears A leave.
        match next_update(&mut cb).await {
            RendezvousEvent::PeerUpdate {
                online: false,
                peer,
                ..
            } => assert_eq!(peer, a.public),
            e => panic!("{e:?}"),
        }
        cb.close().await;
        server.stop().await;
    });
}

#[test]
fn public_types_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RendezvousClient>();
    send_sync::<causeway_nat::rendezvous::RendezvousHandle>();
    send_sync::<RendezvousServer>();
    send_sync::<ServerStats>();
    fn send<T: Send>(_: &T) {}
    let (secret, _) = keypair();
    let server =
        RendezvousServer::with_sockets(secret, &[], UdpSocket::bind("127.0.0.1:0").unwrap(), None);
    send(&server.run(std::future::pending::<()>()));
}

/// Captures log output in memory.
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

impl Capture {
    fn take(&self) -> Vec<String> {
        let bytes = std::mem::take(&mut *self.0.lock().unwrap());
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[test]
fn each_rejection_logs_one_clear_line_on_each_side() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let a = site("a");
        let stranger = site("stranger");
        let (server, _) = start_server(&[&a]);
        let key = causeway_common::keys::encode_public(&stranger.public);

        connect(&server, &stranger, &[]).await.err().unwrap();
        let lines = capture.take();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        let server_line = lines
            .iter()
            .find(|l| l.contains("rejected a site"))
            .unwrap();
        assert!(server_line.contains("WARN"), "{server_line}");
        assert!(
            server_line.contains(&format!("unknown site key {key}")),
            "{server_line}"
        );
        let client_line = lines
            .iter()
            .find(|l| l.contains("rejected this site"))
            .unwrap();
        assert!(client_line.contains("ERROR"), "{client_line}");
        assert!(
            client_line.contains(&format!("unknown site key {key}")),
            "{client_line}"
        );

        let (_, wrong) = keypair();
        RendezvousClient::connect(server.addr, wrong, a.secret.clone(), vec![])
            .await
            .err()
            .unwrap();
        let lines = capture.take();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("WARN") && l.contains("rejected a site: wrong rendezvous key")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("ERROR") && l.contains("wrong rendezvous key for")),
            "{lines:#?}"
        );
        server.stop().await;
    });
}

#[tokio::test]
async fn started_client_connects_once_the_rendezvous_is_up() {
    let a = site("a");
    let b = site("b");
    // Reserve an address, then free it: nothing listens there yet.
    let addr = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (secret, _) = keypair();
    let pinned = PublicKey::from(&secret);
    let mut ca = RendezvousClient::start(addr, pinned, a.secret.clone(), vec![b.public]).unwrap();
    let mut cb = RendezvousClient::start(addr, pinned, b.secret.clone(), vec![a.public]).unwrap();
    assert!(!ca.handle().is_connected());
    assert_eq!(
        ca.send_relay(&b.public, &[1]),
        Err(RelayError::NotConnected)
    );
    // The first attempts fail (nothing answers; QUIC waits for its handshake
    // timeout or an ICMP error) and are reported.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = start_server_on(secret, &[&a, &b], UdpSocket::bind(addr).unwrap());
    let long = Duration::from_secs(30);
    timeout(long, expect_online(&mut ca, &b, &[]))
        .await
        .unwrap();
    timeout(long, expect_online(&mut cb, &a, &[]))
        .await
        .unwrap();
    relay_once(&ca, &mut cb, &a.public, &b.public, &packet(1452, 3)).await;
    ca.close().await;
    cb.close().await;
    server.stop().await;
}

/// Accepts any server certificate (the tests below are not sites; they
/// only need a QUIC connection to the rendezvous).
#[derive(Debug)]
struct AnyCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A QUIC client endpoint on `bind` that speaks the rendezvous' ALPN but
/// never authenticates.
fn stranger_endpoint(bind: &str) -> quinn::Endpoint {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"causeway-rendezvous/1".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client(bind.parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    ep
}

/// One source opens many connections and never authenticates: only a few
/// are let in to authenticate at once, the rest are refused, and a site
/// from another address still connects and is introduced.
#[tokio::test]
async fn one_source_cannot_lock_out_the_others() {
    let a = site("a");
    let b = site("b");
    let (server, _) = start_server(&[&a, &b]);
    // The attacker is 127.0.0.2; the sites dial from 127.0.0.1.
    let attacker = stranger_endpoint("127.0.0.2:0");
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        match timeout(
            WAIT,
            attacker
                .connect(server.addr, "causeway-rendezvous")
                .unwrap(),
        )
        .await
        {
            Ok(Ok(conn)) => {
                // Datagrams before authentication are dropped unread.
                let _ = conn.send_datagram(vec![0u8; 1000].into());
                held.push(conn);
            }
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("a connection attempt neither succeeded nor failed"),
        }
    }
    assert!(
        held.len() <= 8,
        "{} of 40 connections from one source are authenticating",
        held.len()
    );
    assert_eq!(held.len() + refused, 40);
    let abuse = server.stats.abuse();
    assert!(abuse.refused >= 32, "{abuse:?}");
    let mut ca = connect(&server, &a, &[&b]).await.unwrap();
    let mut cb = connect(&server, &b, &[&a]).await.unwrap();
    expect_online(&mut ca, &b, &[]).await;
    expect_online(&mut cb, &a, &[]).await;
    assert!(server.stats.abuse().unauthenticated_datagrams >= 1);
    ca.close().await;
    cb.close().await;
    drop(held);
    server.stop().await;
}

/// Before authentication a frame may not be longer than a hello: an
/// oversized length prefix closes the connection at once, with a protocol
/// error, before its body is read.
#[tokio::test]
async fn an_oversized_frame_before_authentication_closes_the_connection() {
    let a = site("a");
    let (server, _) = start_server(&[&a]);
    let ep = stranger_endpoint("127.0.0.1:0");
    let conn = ep
        .connect(server.addr, "causeway-rendezvous")
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&4096u32.to_be_bytes()).await.unwrap();
    send.write_all(&[b' '; 1000]).await.unwrap();
    let closed = timeout(Duration::from_secs(2), conn.closed())
        .await
        .expect("closed at once, not at the authentication timeout");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code.into_inner(),
                u64::from(causeway_nat::rendezvous::CloseCode::Protocol.as_u32())
            );
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            assert!(reason.contains("4096"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(server.stats.abuse().auth_failures, 1);
    server.stop().await;
}

/// A connection that never says hello is closed within 5 s of its first
/// packet (the QUIC handshake counts), and its place is given back.
#[tokio::test]
async fn a_silent_connection_is_closed_within_5_s() {
    let a = site("a");
    let (server, _) = start_server(&[&a]);
    let ep = stranger_endpoint("127.0.0.1:0");
    let started = std::time::Instant::now();
    let conn = ep
        .connect(server.addr, "causeway-rendezvous")
        .unwrap()
        .await
        .unwrap();
    assert_eq!(server.stats.pending_auth(), 1);
    let closed = timeout(Duration::from_secs(7), conn.closed())
        .await
        .expect("closed at the authentication timeout");
    let elapsed = started.elapsed();
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(
            c.error_code.into_inner(),
            u64::from(causeway_nat::rendezvous::CloseCode::Timeout.as_u32())
        ),
        e => panic!("{e:?}"),
    }
    assert!(elapsed <= Duration::from_millis(5_500), "{elapsed:?}");
    assert_eq!(server.stats.pending_auth(), 0);
    assert_eq!(server.stats.abuse().auth_timeouts, 1);
    server.stop().await;
}

/// The next `RelayPort` event, skipping the others.
async fn next_relay_port(client: &mut RendezvousClient) -> (PublicKey, Option<RelayPort>) {
    loop {
        if let RendezvousEvent::RelayPort { peer, port } = next(client).await {
            return (peer, port);
        }
    }
}

/// Receives on `socket` within [`QUIET`], if anything comes (an ICMP
/// error from a closed port counts as nothing).
async fn recv_within(socket: &tokio::net::UdpSocket) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    let n = timeout(QUIET, socket.recv(&mut buf)).await.ok()?.ok()?;
    Some(buf[..n].to_vec())
}

/// A UDP relay port: granted to mutual peers only, forwards between the
/// two addresses that bound with their tokens and nothing else, and is
/// closed when the pair stops being mutual.
#[tokio::test]
async fn udp_relay_port_serves_the_two_bound_sites_only() {
    let (server, [a, b, _], [mut ca, mut cb, mut cc]) = a_and_b_mutual_c_one_sided().await;
    // C lists A but A does not list C: C never learns of A, so it has
    // nothing to ask for (the registry's tests cover a request anyway).
    cc.handle().request_relay_port(&a.public);
    ca.handle().request_relay_port(&b.public);
    let (peer, pa) = next_relay_port(&mut ca).await;
    assert_eq!(peer, b.public);
    let pa = pa.expect("a port for a and b");
    let (peer, pb) = next_relay_port(&mut cb).await;
    assert_eq!(peer, a.public);
    let pb = pb.expect("the same port, told to b");
    assert_eq!(pa.addr, pb.addr);
    assert_ne!(pa.token, pb.token, "each site has its own token");
    assert_eq!(pa.addr.ip(), server.addr.ip());
    assert_quiet(&mut cc).await;

    let udp = || async {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.connect(pa.addr).await.unwrap();
        s
    };
    let (ua, ub, stranger) = (udp().await, udp().await, udp().await);
    let data = |seed: u8| packet(1400, seed);

    // Nothing passes before both are bound.
    ua.send(&data(1)).await.unwrap();
    assert_eq!(recv_within(&ub).await, None);
    ua.send(&pa.token.bind(1)).await.unwrap();
    let ack = recv_within(&ua).await.expect("an ack");
    assert_eq!(
        pa.token.open_ack(&ack),
        Some((1, false)),
        "b is not bound yet"
    );
    ua.send(&data(2)).await.unwrap();
    assert_eq!(recv_within(&ub).await, None);
    ub.send(&pb.token.bind(1)).await.unwrap();
    let ack = recv_within(&ub).await.expect("an ack");
    assert_eq!(pb.token.open_ack(&ack), Some((1, true)));

    for seed in 0..3 {
        ua.send(&data(seed)).await.unwrap();
        assert_eq!(
            recv_within(&ub).await,
            Some(data(seed)),
            "byte-exact, a to b"
        );
    }
    ub.send(&data(9)).await.unwrap();
    assert_eq!(recv_within(&ua).await, Some(data(9)), "b to a");

    // A stranger's data and a replay of a's bind move nothing.
    stranger.send(&data(5)).await.unwrap();
    stranger.send(&pa.token.bind(1)).await.unwrap();
    assert_eq!(recv_within(&ub).await, None);
    assert_eq!(recv_within(&stranger).await, None, "no ack for a replay");
    ub.send(&data(10)).await.unwrap();
    assert_eq!(
        recv_within(&ua).await,
        Some(data(10)),
        "a is still where it bound"
    );

    let stats = server.stats.site("a").unwrap();
    assert_eq!(stats.relay_rx_packets, 3);
    assert_eq!(stats.relay_rx_bytes, 3 * 1400);
    assert_eq!(stats.relay_dropped, 1, "the one sent before b bound");
    assert_eq!(
        server.stats.abuse().relay_strangers,
        3,
        "before a bound, and the stranger's two"
    );

    // B drops A: the port closes, and A is told.
    cb.handle().update_peers(vec![]);
    loop {
        let (peer, port) = next_relay_port(&mut ca).await;
        assert_eq!(peer, b.public);
        if port.is_none() {
            break;
        }
    }
    ua.send(&data(11)).await.unwrap();
    assert_eq!(recv_within(&ub).await, None);
    for c in [ca, cb, cc] {
        c.close().await;
    }
    server.stop().await;
}

/// `relay_ports`: a range is kept to; "off" grants nothing (the pair
/// stays on the QUIC relay).
#[tokio::test]
async fn relay_ports_come_from_the_configured_range_or_not_at_all() {
    for (ports, want) in [
        (RelayPorts::Range(47000, 47009), true),
        (RelayPorts::Off, false),
    ] {
        let (a, b) = (site("a"), site("b"));
        let quic = UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = start_server_with(keypair().0, &[&a, &b], quic, ports, WAIT);
        let mut ca = connect(&server, &a, &[&b]).await.unwrap();
        let mut cb = connect(&server, &b, &[&a]).await.unwrap();
        expect_online(&mut ca, &b, &[]).await;
        expect_online(&mut cb, &a, &[]).await;
        ca.handle().request_relay_port(&b.public);
        if want {
            let (_, port) = next_relay_port(&mut ca).await;
            let port = port.expect("a port").addr.port();
            assert!((47000..=47009).contains(&port), "{port}");
        } else {
            assert_quiet(&mut ca).await;
            // The QUIC relay still carries the pair.
            relay_once(&ca, &mut cb, &a.public, &b.public, &packet(100, 1)).await;
        }
        ca.close().await;
        cb.close().await;
        server.stop().await;
    }
}

/// A relay port nothing reaches for the idle time closes by itself and
/// both sites are told; binds keep it open.
#[tokio::test]
async fn an_unused_relay_port_closes_and_both_sites_are_told() {
    let (a, b) = (site("a"), site("b"));
    let quic = UdpSocket::bind("127.0.0.1:0").unwrap();
    let idle = Duration::from_millis(600);
    let server = start_server_with(keypair().0, &[&a, &b], quic, RelayPorts::Any, idle);
    let mut ca = connect(&server, &a, &[&b]).await.unwrap();
    let mut cb = connect(&server, &b, &[&a]).await.unwrap();
    expect_online(&mut ca, &b, &[]).await;
    expect_online(&mut cb, &a, &[]).await;
    ca.handle().request_relay_port(&b.public);
    let port = next_relay_port(&mut ca).await.1.expect("a port");
    next_relay_port(&mut cb)
        .await
        .1
        .expect("the port, told to b");
    // Binding every 200 ms keeps it for three idle times.
    let ua = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    ua.connect(port.addr).await.unwrap();
    for counter in 1..=9 {
        ua.send(&port.token.bind(counter)).await.unwrap();
        let ack = recv_within(&ua).await.expect("an ack");
        assert_eq!(port.token.open_ack(&ack), Some((counter, false)));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then silence: closed, and both are told.
    let t = std::time::Instant::now();
    assert_eq!(next_relay_port(&mut ca).await, (b.public, None));
    assert_eq!(next_relay_port(&mut cb).await, (a.public, None));
    assert!(t.elapsed() < idle * 2, "{:?}", t.elapsed());
    ua.send(&port.token.bind(10)).await.unwrap();
    assert_eq!(recv_within(&ua).await, None, "the port is gone");
    // Asking again gets a new one.
    ca.handle().request_relay_port(&b.public);
    assert!(next_relay_port(&mut ca).await.1.is_some());
    ca.close().await;
    cb.close().await;
    server.stop().await;
}

/// A UDP forwarder in front of the rendezvous' QUIC port that drops
/// everything until opened: a site dialling through it gets no answer over
/// UDP, as behind an egress firewall that lets only TCP out.
struct UdpGate {
    addr: SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl UdpGate {
    async fn to(server: SocketAddr) -> UdpGate {
        let outside = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let inside = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        inside.connect(server).await.unwrap();
        let addr = outside.local_addr().unwrap();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let is_open = open.clone();
        let task = tokio::spawn(async move {
            let (mut out_buf, mut in_buf) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = outside.recv_from(&mut out_buf) => {
                        if is_open.load(std::sync::atomic::Ordering::Relaxed) {
                            client = Some(from);
                            let _ = inside.send(&out_buf[..n]).await;
                        }
                    }
                    Ok(n) = inside.recv(&mut in_buf) => {
                        if let Some(client) = client {
                            let _ = outside.send_to(&in_buf[..n], client).await;
                        }
                    }
                }
            }
        });
        UdpGate { addr, open, task }
    }

    fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for UdpGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_site_without_udp_joins_over_tls_on_tcp_and_moves_back_to_quic() {
    let a = site("a");
    let b = site("b");
    let server = start_server_with_tcp(&[&a, &b]);
    let gate = UdpGate::to(server.addr).await;
    let behind_firewall = causeway_nat::rendezvous::RendezvousAddr {
        quic: gate.addr,
        tcp: server.tcp,
    };
    let started = std::time::Instant::now();
    let mut ca = RendezvousClient::connect(
        behind_firewall,
        server.public,
        a.secret.clone(),
        vec![b.public],
    )
    .await
    .unwrap();
    let joined = started.elapsed();
    eprintln!("joined over TCP after {joined:?}");
    assert_eq!(ca.handle().transport(), Some("tcp"));
    // QUIC had its head start, then TCP took over at once (not after the
    // 10 s connect timeout).
    assert!(joined < Duration::from_secs(3), "{joined:?}");
    let mut cb = connect(&server, &b, &[&a]).await.unwrap();
    assert_eq!(cb.handle().transport(), Some("quic"));
    expect_online(&mut ca, &b, &[]).await;
    expect_online(&mut cb, &a, &[]).await;
    let seen = server.stats.site("a").unwrap();
    assert!(seen.connected && seen.over_tcp, "{seen:?}");
    assert!(!server.stats.site("b").unwrap().over_tcp);

    // Relayed both ways, byte-exact: the TCP side sends whole packets, the
    // rendezvous fragments them for b's QUIC datagrams.
    for (len, seed) in [(1452, 1), (60, 2), (9000, 3)] {
        relay_once(&ca, &mut cb, &a.public, &b.public, &packet(len, seed)).await;
        relay_once(&cb, &mut ca, &b.public, &a.public, &packet(len, seed + 100)).await;
    }
    let tcp_sent = ca.handle().stats();
    assert_eq!(
        tcp_sent.relay_tx_datagrams, tcp_sent.relay_tx_packets,
        "unfragmented over TCP"
    );

    // UDP works again: the site moves back to QUIC by itself.
    gate.open();
    let moved = timeout(Duration::from_secs(15), async {
        while ca.handle().transport() != Some("quic") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(moved.is_ok(), "still on {:?}", ca.handle().transport());
    eprintln!("back on QUIC after {:?}", started.elapsed());
    let seen = server.stats.site("a").unwrap();
    assert!(seen.connected && !seen.over_tcp, "{seen:?}");
    relay_once(&ca, &mut cb, &a.public, &b.public, &packet(1452, 7)).await;
    relay_once(&cb, &mut ca, &b.public, &a.public, &packet(1452, 8)).await;
    ca.close().await;
    cb.close().await;
    server.stop().await;
}

#[tokio::test]
async fn garbage_and_silence_on_the_tcp_port_are_closed_and_the_port_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = site("a");
    let server = start_server_with_tcp(&[&a]);
    let tcp = server.tcp.unwrap();
    // Not TLS at all: the handshake fails and the connection is closed.
    let mut garbage = tokio::net::TcpStream::connect(tcp).await.unwrap();
    garbage
        .write_all(&[0x16, 3, 1, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = timeout(WAIT, async {
        loop {
            match garbage.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "a garbage connection was not closed");
    // Silent: closed at the authentication deadline, and counted.
    let mut silent = tokio::net::TcpStream::connect(tcp).await.unwrap();
    let started = std::time::Instant::now();
    let closed = timeout(Duration::from_secs(7), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert!(started.elapsed() <= Duration::from_millis(5_500));
    assert_eq!(server.stats.abuse().auth_timeouts, 1);
    assert_eq!(server.stats.pending_auth(), 0);
    // A real site still gets in over TCP.
    let only_tcp = causeway_nat::rendezvous::RendezvousAddr {
        quic: UdpGate::to(server.addr).await.addr,
        tcp: Some(tcp),
    };
    let mut ca = RendezvousClient::connect(only_tcp, server.public, a.secret.clone(), vec![])
        .await
        .unwrap();
    assert_eq!(ca.handle().transport(), Some("tcp"));
    // A clean stop closes it at once (not after the 15 s idle timeout).
    let stopped = std::time::Instant::now();
    server.stop().await;
    let told = timeout(Duration::from_secs(3), async {
        loop {
            if let Some(RendezvousEvent::Disconnected { reason }) = ca.next_event().await {
                return reason;
            }
        }
    })
    .await
    .expect("told of the stop");
    assert!(told.contains("shutting down"), "{told}");
    assert!(stopped.elapsed() < Duration::from_secs(3));
    ca.close().await;
}
